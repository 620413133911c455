"""Makes `lm_eval --model depthjax` work: registers depthjax's lm-evaluation-harness model.

A .pth file (depthjax-lm-eval.pth, installed with depthjax) imports this module when
Python starts, so it imports nothing heavy: it waits for lm_eval's model registry to be
imported and registers "depthjax" there as a lazy placeholder
("depthjax.eval.harness:DepthjaxLM"), the mechanism lm_eval uses for its own models.
depthjax itself loads only when lm_eval asks for that model.
"""

import importlib.abc
import importlib.machinery
import sys

REGISTRY = "lm_eval.api.registry"
TARGET = "depthjax.eval.harness:DepthjaxLM"


def register(registry_module) -> None:
    registry = getattr(registry_module, "model_registry", None)  # lm-eval >= 0.4.13
    if registry is not None and "depthjax" not in registry:
        registry.register("depthjax", target=TARGET)


class _RegisteringLoader(importlib.abc.Loader):
    """Runs the registry module as its own loader would, then registers depthjax."""

    def __init__(self, inner):
        self._inner = inner

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module):
        self._inner.exec_module(module)
        register(module)

    def __getattr__(self, name):  # resource readers and the like
        return getattr(self._inner, name)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != REGISTRY:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisteringLoader(spec.loader)
        return spec


def install() -> None:
    if REGISTRY in sys.modules:
        register(sys.modules[REGISTRY])
    elif not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


install()
