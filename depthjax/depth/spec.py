"""A declarative, shareable description of a program over a block table, in the spirit of
mergekit's slices. YAML or JSON:

    description: loop the middle, drop an MLP, run two blocks in parallel
    slices:
      - layer_range: [0, 4]     # table rows 0..3, one step each (half-open, as mergekit)
      - layer_range: [4, 6]
        repeat: 2               # the slice runs twice in a row: 4 5 4 5
      - layers: [7, 6]          # explicit rows, in this order
        mlp: 0                  # gate(s) on the slice's steps: a number or one per step
      - layer_range: [8, 10]
        parallel: true          # the slice's steps read one shared input (summed updates)

Reusing rows is how ties and loops are written. `to_spec(model)` writes the shortest such
description of a model's program; `from_spec(model, spec)` builds the program on the
model's table (the table is shared, not copied).
"""

from __future__ import annotations

import difflib
from pathlib import Path

import numpy as np
import yaml

from ..core.model import DepthModel
from ..core.program import Program, ProgramError

_TOP_KEYS = {"description", "slices"}
_SLICE_KEYS = {"layer_range", "layers", "repeat", "attn", "mlp", "parallel"}


def _unknown(keys, known, where):
    for k in keys:
        if k not in known:
            close = difflib.get_close_matches(k, known, n=1)
            raise ProgramError(
                f"unknown key {k!r} in {where}"
                + (f" (did you mean {close[0]!r}?)" if close else "")
            )


def load_spec(path) -> dict:
    """Read a YAML or JSON spec file."""
    try:
        spec = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ProgramError(f"{path} is not a text file (a spec is YAML or JSON)") from None
    except yaml.YAMLError as e:
        raise ProgramError(f"{path} is not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(spec, dict):
        raise ProgramError(f"{path}: a spec is a mapping with a 'slices' list")
    return spec


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _is_number(x) -> bool:
    return _is_int(x) or isinstance(x, (float, np.floating))


def _gates(value, n, name, where):
    values = value if isinstance(value, list) else [1.0 if value is None else value]
    if not all(_is_number(v) for v in values):
        raise ProgramError(
            f"{where}: {name} must be a number or a list of numbers (0 switches "
            f"the sublayer off), got {value!r}"
        )
    g = (
        np.broadcast_to(np.asarray(values[0], float), (n,))
        if not isinstance(value, list)
        else np.asarray(values, float)
    )
    if g.shape != (n,):
        raise ProgramError(f"{where}: {name} has {g.size} values for {n} steps")
    return g


def from_spec(model: DepthModel, spec: dict) -> DepthModel:
    """The model running the program that `spec` describes, on the same table."""
    if model.params.get("steps"):
        raise ProgramError(
            "the model has per-step parameters, which a spec cannot place; "
            "apply the spec before relaxing or recovering, or materialize first"
        )
    _unknown(spec, _TOP_KEYS, "spec")
    slices = spec.get("slices")
    if not isinstance(slices, list) or not slices:
        raise ProgramError("spec needs a non-empty 'slices' list")
    block, attn, mlp, parallel = [], [], [], []
    for i, sl in enumerate(slices):
        where = f"slice {i}"
        if not isinstance(sl, dict):
            raise ProgramError(f"{where}: each slice is a mapping, got {sl!r}")
        _unknown(sl, _SLICE_KEYS, where)
        if ("layer_range" in sl) == ("layers" in sl):
            raise ProgramError(f"{where}: give exactly one of 'layer_range' or 'layers'")
        if "layer_range" in sl:
            r = sl["layer_range"]
            if not (
                isinstance(r, list) and len(r) == 2 and all(_is_int(x) for x in r) and r[0] < r[1]
            ):
                raise ProgramError(
                    f"{where}: layer_range must be [start, stop] with start < stop, got {r!r}"
                )
            rows = list(range(r[0], r[1]))
        else:
            rows = sl["layers"] if isinstance(sl["layers"], list) else [sl["layers"]]
            if not rows:
                raise ProgramError(f"{where}: layers is empty; list at least one table row")
        bad = [r for r in rows if not _is_int(r) or not 0 <= r < model.n_blocks]
        if bad:
            raise ProgramError(
                f"{where}: rows {bad} are not in the table (0..{model.n_blocks - 1})"
            )
        times = sl.get("repeat", 1)
        if not _is_int(times) or times < 1:
            raise ProgramError(f"{where}: repeat must be a positive integer, got {times!r}")
        a = _gates(sl.get("attn"), len(rows), "attn", where)
        m = _gates(sl.get("mlp"), len(rows), "mlp", where)
        par = sl.get("parallel", False)
        if not isinstance(par, bool):
            raise ProgramError(f"{where}: parallel must be true or false, got {par!r}")
        for _ in range(times):
            block += rows
            attn += a.tolist()
            mlp += m.tolist()
            parallel += [False] + [par] * (len(rows) - 1)
    program = Program.create(block, attn, mlp, parallel, n_blocks=model.n_blocks)
    return model.with_program(program)


def _slice(rows, attn, mlp, par) -> dict:
    out = (
        {"layer_range": [rows[0], rows[-1] + 1]}
        if rows == list(range(rows[0], rows[-1] + 1))
        else {"layers": rows}
    )
    for name, g in (("attn", attn), ("mlp", mlp)):
        g = [int(x) if float(x).is_integer() else x for x in g]
        if any(x != 1 for x in g):
            out[name] = g[0] if len(set(g)) == 1 else g
    if par:
        out["parallel"] = True
    return out


def to_spec(model: DepthModel, description: str | None = None) -> dict:
    """The shortest slice description of the model's program (per-step parameters, if any,
    are not part of a spec)."""
    p = {k: np.asarray(v).tolist() for k, v in model.program.to_dict().items()}
    # Parallel groups first: each is one slice; runs of sequential steps are cut where the
    # rows stop being consecutive or the gates change.
    groups, i = [], 0
    while i < len(p["block"]):
        j = i + 1
        while j < len(p["block"]) and p["parallel"][j]:
            j += 1
        groups.append((i, j))
        i = j
    slices = []
    for i, j in groups:
        rows, a, m = p["block"][i:j], p["attn"][i:j], p["mlp"][i:j]
        if j - i > 1:
            slices.append(_slice(rows, a, m, True))
            continue
        last = slices[-1] if slices else None
        if (
            last
            and "layer_range" in last
            and "parallel" not in last
            and last["layer_range"][1] == rows[0]
            and last.get("attn", 1) == a[0]
            and last.get("mlp", 1) == m[0]
            and not isinstance(last.get("attn", 1), list)
            and not isinstance(last.get("mlp", 1), list)
        ):
            last["layer_range"][1] += 1
        else:
            slices.append(_slice(rows, a, m, False))
    merged = []
    for sl in slices:  # identical neighbours become one slice with repeat
        if merged and {k: v for k, v in merged[-1].items() if k != "repeat"} == sl:
            merged[-1]["repeat"] = merged[-1].get("repeat", 1) + 1
        else:
            merged.append(sl)
    spec = {"slices": merged}
    if description:
        spec = {"description": description, **spec}
    return spec
