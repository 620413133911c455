"""The package's structure, checked from the source so it cannot regress (issue #24): no
import cycles, a short root, one error base, one `generate`, no module hidden by an
attribute of its package, no `sys.modules` aliases, and no private depthjax names used by
benchmarks, experiments or notebooks. Fast: an `ast` pass and imports, no compiles."""

from __future__ import annotations

import ast
import importlib
import json
import pkgutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from depthjax.errors import DepthjaxError

ROOT = Path(__file__).resolve().parents[1]
# Source directories and the package each installs as (kernels/ is depthjax.kernels).
SOURCES = {"depthjax": ROOT / "depthjax", "depthjax.kernels": ROOT / "kernels"}
MAX_ROOT_MODULES = 12
JAX_PRIVATE_OK = {"_cache_size"}  # jax's own method on jitted functions


# -- the library's modules, from the source ---------------------------------------------
def _module_files() -> dict[str, Path]:
    """Module name -> file, for every .py file under depthjax/ and kernels/."""
    out = {}
    for package, directory in SOURCES.items():
        for path in sorted(directory.rglob("*.py")):
            parts = path.relative_to(directory).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join((package, *parts))] = path
    return out


MODULES = _module_files()


def _parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _is_package(module: str) -> bool:
    return MODULES[module].name == "__init__.py"


def _import_targets(module: str, node: ast.Import | ast.ImportFrom) -> Iterator[str]:
    """The depthjax modules an import statement in `module` names explicitly: a name that
    is a module resolves to that module, any other name to the package it comes from.
    Parent packages, which Python imports implicitly on the way, are not targets."""
    if isinstance(node, ast.Import):
        for alias in node.names:
            name = alias.name
            while name and name not in MODULES:
                name = name.rpartition(".")[0]
            if name:
                yield name
        return
    if node.level:
        base = module if _is_package(module) else module.rpartition(".")[0]
        for _ in range(node.level - 1):
            base = base.rpartition(".")[0]
        base = f"{base}.{node.module}" if node.module else base
    else:
        base = node.module or ""
    if base not in MODULES:
        return
    for alias in node.names:
        yield f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base


def _import_graph() -> dict[str, dict[str, int]]:
    """module -> {imported module: line of the first such import}, imports inside
    functions included."""
    graph = {}
    for module, path in MODULES.items():
        edges = graph.setdefault(module, {})
        for node in ast.walk(_parse(path)):
            if isinstance(node, ast.Import | ast.ImportFrom):
                for target in _import_targets(module, node):
                    if target != module:
                        edges.setdefault(target, node.lineno)
    return graph


def _cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One shortest cycle through each strongly connected set of modules (Tarjan)."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_shortest_cycle(graph, component) for component in components]


def _shortest_cycle(graph, component: set[str]) -> list[str]:
    start = min(component)
    paths, seen = [[start]], {start}
    while paths:
        path = paths.pop(0)
        for w in sorted(graph[path[-1]]):
            if w == start:
                return path + [start]
            if w in component and w not in seen:
                seen.add(w)
                paths.append(path + [w])
    raise AssertionError(f"no cycle through {start}")


def test_no_import_cycles():
    graph = _import_graph()
    cycles = _cycles(graph)
    lines = []
    for cycle in cycles:
        lines.append(" -> ".join(cycle))
        for a, b in zip(cycle, cycle[1:]):
            lines.append(f"    {MODULES[a].relative_to(ROOT)}:{graph[a][b]} imports {b}")
    assert not cycles, "import cycles between depthjax modules:\n" + "\n".join(lines)


def test_the_graph_sees_every_kind_of_import():
    """The edges the cycle check relies on (a check that sees no edges finds no cycles)."""
    graph = _import_graph()
    assert "depthjax.core.display" in graph["depthjax.core"]  # from . import display
    assert "depthjax.core.model" in graph["depthjax.core.display"]  # from .model import X
    assert "depthjax.kernels.flash" in graph["depthjax.kernels.splash"]
    assert "depthjax.errors" in graph["depthjax.cli"]  # from ..errors import X
    assert "depthjax.core.rope" in graph["depthjax.core.config"]
    assert "depthjax" not in graph["depthjax.core.model"]  # parents are not edges
    src = ast.parse("from ..core import model, ProgramError\nimport depthjax.core.rope")
    found = {t for node in src.body for t in _import_targets("depthjax.depth.edit", node)}
    assert found == {"depthjax.core.model", "depthjax.core", "depthjax.core.rope"}
    assert _cycles({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {}}) == [["a", "b", "c", "a"]]


def test_the_root_is_short():
    files = sorted(p.name for p in SOURCES["depthjax"].glob("*.py"))
    assert len(files) <= MAX_ROOT_MODULES, (
        f"{len(files)} modules directly in depthjax/ (at most {MAX_ROOT_MODULES}): {files}; "
        "put new modules in the subpackage named for what they hold"
    )


def _functions_named(name: str) -> list[str]:
    return [
        f"{path.relative_to(ROOT)}:{node.lineno}"
        for path in MODULES.values()
        for node in ast.walk(_parse(path))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == name
    ]


def test_one_generate():
    found = _functions_named("generate")
    assert len(found) == 1, f"one decode driver `generate` (DESIGN.md), found {found}"


def _sys_modules_writes(tree: ast.Module) -> list[int]:
    def is_sys_modules(node) -> bool:
        return (
            isinstance(node, ast.Attribute)
            and node.attr == "modules"
            and isinstance(node.value, ast.Name)
            and node.value.id == "sys"
        )

    lines = []
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AugAssign | ast.AnnAssign):
            targets = [node.target]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if is_sys_modules(node.func.value) and node.func.attr in (
                "__setitem__",
                "update",
                "setdefault",
            ):
                lines.append(node.lineno)
        for target in targets:
            for t in ast.walk(target):
                if isinstance(t, ast.Subscript) and is_sys_modules(t.value):
                    lines.append(node.lineno)
    return lines


def test_no_sys_modules_aliases():
    found = [
        f"{path.relative_to(ROOT)}:{line}"
        for path in MODULES.values()
        for line in _sys_modules_writes(_parse(path))
    ]
    assert not found, f"sys.modules written at {found}: import the module by its real name"
    example = ast.parse("import sys\nsys.modules['depthjax.x'] = sys.modules[__name__]")
    assert _sys_modules_writes(example) == [2]


# -- the library's modules, imported ----------------------------------------------------
def _import_everything() -> dict[str, object]:
    """Every depthjax module by name (pkgutil's walk of depthjax and depthjax.kernels),
    except `__main__` modules and the lm-eval adapter when lm_eval is not installed."""
    import depthjax.kernels

    modules = {}
    for package in (depthjax, depthjax.kernels):
        modules[package.__name__] = package
        walk = pkgutil.walk_packages(package.__path__, package.__name__ + ".")
        for info in walk:
            if info.name.rpartition(".")[2] == "__main__":
                continue
            try:
                modules[info.name] = importlib.import_module(info.name)
            except ImportError as e:
                lm_eval_missing = (e.name or "").partition(".")[0] == "lm_eval"
                if not (info.name == "depthjax.eval.harness" and lm_eval_missing):
                    raise
    return modules


@pytest.fixture(scope="module")
def imported():
    modules = _import_everything()
    missed = {
        m
        for m in MODULES
        if m not in modules and not m.endswith(".__main__") and m != "depthjax.eval.harness"
    }
    assert not missed, f"modules in the source that the import walk did not reach: {missed}"
    return modules


def _source_error_classes() -> set[tuple[str, str]]:
    """(module, name) of every class named *Error in the source, nested ones included."""
    return {
        (module, node.name)
        for module, path in MODULES.items()
        for node in ast.walk(_parse(path))
        if isinstance(node, ast.ClassDef) and node.name.endswith("Error")
    }


def test_every_error_is_a_depthjax_error(imported):
    """Every exception class the library defines (every class named *Error, and user errors
    named otherwise such as AttentionUnavailable) derives from DepthjaxError, so the CLI's
    one `except DepthjaxError` reports each as a user error."""
    defined = {
        (name, obj.__name__): obj
        for name, module in imported.items()
        for obj in vars(module).values()
        if isinstance(obj, type) and obj.__module__ == name
    }
    errors = {
        key: cls
        for key, cls in defined.items()
        if key[1].endswith("Error")
        or (issubclass(cls, BaseException) and not key[1].startswith("_"))
    }
    not_imported = {
        (m, n) for m, n in _source_error_classes() if m in imported and (m, n) not in defined
    }
    assert not not_imported, (
        f"error classes in the source but not in the imported modules: {not_imported} (define "
        "them at module level; is depthjax or depthjax.kernels imported from another checkout? "
        f"{imported['depthjax'].__file__}, {imported['depthjax.kernels'].__file__})"
    )
    wrong = sorted(
        f"{m}.{n}" for (m, n), cls in errors.items() if not issubclass(cls, DepthjaxError)
    )
    assert not wrong, f"not derived from depthjax.errors.DepthjaxError: {wrong}"
    assert ("depthjax.core.attention", "AttentionUnavailable") in errors
    assert len(errors) >= 25


def test_no_module_is_shadowed_by_an_attribute_of_its_package(imported):
    shadowed = []
    for name, module in imported.items():
        package, _, child = name.rpartition(".")
        found = getattr(imported.get(package), child, None)
        if package in imported and found is not module:
            shadowed.append(f"{package}.{child} is {found!r}, not the module")
    assert not shadowed, "\n".join(shadowed)


# -- benchmarks, experiments and notebooks use public names -----------------------------
def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__") and name not in JAX_PRIVATE_OK


def _strip_magics(code: str) -> str:
    """IPython magics and shell lines blanked out (they are not Python)."""
    lines = code.splitlines()
    return "\n".join("" if line.lstrip().startswith(("%", "!")) else line for line in lines)


def _notebook_code(path: Path) -> str:
    """The code cells of a notebook, joined (line numbers count through all of them)."""
    cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    sources = (c["source"] if isinstance(c["source"], str) else "".join(c["source"]) for c in cells)
    return "\n".join(_strip_magics(source) for source in sources)


def _private_uses(tree: ast.Module) -> list[str]:
    """`from depthjax... import _x`, private module names in depthjax imports, and
    `alias._x` where `alias` was bound by an import from depthjax."""
    bound, found = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.partition(".")[0] == "depthjax":
                    bound.add(alias.asname or "depthjax")
                    found += [f"{node.lineno}: import {alias.name}"] * any(
                        _is_private(p) for p in alias.name.split(".")
                    )
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            if node.module.partition(".")[0] == "depthjax":
                for alias in node.names:
                    bound.add(alias.asname or alias.name)
                    parts = [*node.module.split("."), alias.name]
                    if any(_is_private(p) for p in parts):
                        found.append(f"{node.lineno}: from {node.module} import {alias.name}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _is_private(node.attr):
            root = node.value
            while isinstance(root, ast.Attribute):
                root = root.value
            if isinstance(root, ast.Name) and root.id in bound:
                found.append(f"{node.lineno}: {ast.unparse(node)}")
    return sorted(found, key=lambda use: int(use.partition(":")[0]))


def _user_code() -> Iterator[tuple[str, str]]:
    for directory in ("benchmarks", "experiments"):
        for path in sorted((ROOT / directory).rglob("*.py")):
            yield str(path.relative_to(ROOT)), path.read_text()
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        yield str(path.relative_to(ROOT)), _notebook_code(path)


def test_benchmarks_experiments_and_notebooks_use_public_names():
    found = [
        f"{name}:{use}"
        for name, source in _user_code()
        for use in _private_uses(ast.parse(source, filename=name))
    ]
    assert not found, "private depthjax names outside the library:\n" + "\n".join(found)


def test_private_uses_are_seen():
    source = """
import depthjax as dj
import depthjax.metrics.coalitions as C
from depthjax.metrics import coalitions as co, _hidden
from depthjax.eval import scoring
import numpy as np
dj.metrics.coalitions._prefix_sums(1)
C._batched_sums._cache_size()
co._x
scoring.score._cache_size()
np._private
"""
    assert _private_uses(ast.parse(source)) == [
        "4: from depthjax.metrics import _hidden",
        "7: dj.metrics.coalitions._prefix_sums",
        "8: C._batched_sums",
        "9: co._x",
    ]
    assert _strip_magics("%time x = 1\n  !ls\nx = 2") == "\n\nx = 2"
