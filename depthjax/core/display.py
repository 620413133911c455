"""Notebook rendering of DepthModel and Program: `_repr_html_` tables of the depth program.

One row per program step: the table row (block id) it runs, its attention and MLP gates,
its parallel group, the other steps that run the same row (ties), and the per-step
parameters it carries (params["steps"]: untied deltas, LoRA, update scale, recovery
adapter). A strip above the table draws the program left to right, parallel groups
stacked, tied rows in one colour, gated-off sublayers faded.

The structured rows (`step_rows`) are what the HTML is made from; the plain-text
`__repr__` of Program stays in program.py. This module attaches the `_repr_html_` hooks to
DepthModel and Program when it is imported (depthjax/core/__init__.py imports it), so that
model.py and program.py never import their renderer.
"""

from __future__ import annotations

import dataclasses
import html

import jax
import numpy as np
from flax import traverse_util

from . import kinds
from .model import DepthModel, count_params
from .program import Program

# Pastel colours for table rows run by more than one step (ties); dark text on top.
_PALETTE = (
    "#ffd8a8",
    "#b2f2bb",
    "#a5d8ff",
    "#eebefa",
    "#ffec99",
    "#99e9f2",
    "#ffc9c9",
    "#d0bfff",
    "#c0eb75",
    "#fcc2d7",
    "#bac8ff",
    "#96f2d7",
)
_MAX_ROWS = 256  # longer programs show their first and last steps


@dataclasses.dataclass(frozen=True)
class StepRow:
    """What one program step does. `group` numbers parallel groups (steps that read one
    shared input) from 0; `tied` lists the other steps that run the same table row."""

    step: int
    block: int
    attn: float
    mlp: float
    group: int
    group_size: int
    tied: tuple[int, ...]
    extras: tuple[str, ...]


def _host(x) -> np.ndarray:
    return np.asarray(jax.device_get(x))


def _first(program: Program) -> Program:
    """The first program of a batch of programs (leading axes, for vmap)."""
    if program.block.ndim == 1:
        return program
    return jax.tree.map(lambda a: a.reshape(-1, a.shape[-1])[0], program)


def _nonzero_per_step(leaf, depth: int) -> np.ndarray:
    return np.any(_host(leaf).reshape(depth, -1) != 0, axis=1)


def _rank_per_step(a_step_in_r) -> np.ndarray:
    """Nonzero columns of each step's LoRA/adapter factor a [depth, in, r]: its rank in use
    (adapters are zero-padded to a common rank)."""
    a = _host(a_step_in_r)
    return np.any(a != 0, axis=1).sum(axis=-1)


def _has_values(tree) -> bool:
    """True when every leaf holds values (not tracers or abstract shapes)."""
    return all(
        hasattr(x, "__array__") and not isinstance(x, jax.core.Tracer)
        for x in jax.tree.leaves(tree)
    )


def step_extras(steps: dict | None, depth: int) -> list[tuple[str, ...]]:
    """Per step, short labels of the per-step parameters that change what it computes."""
    out = [[] for _ in range(depth)]
    if not steps or not _has_values(steps):
        return [tuple(["per-step params"] if steps else []) for _ in range(depth)]
    delta = {
        p: _nonzero_per_step(leaf, depth)
        for p, leaf in traverse_util.flatten_dict(steps.get("delta") or {}).items()
    }
    for i in range(depth):
        names = sorted({p[0] for p, nonzero in delta.items() if nonzero[i]})
        if names:
            out[i].append("Δ " + ", ".join(names))
    lora = traverse_util.flatten_dict(steps.get("lora") or {})
    kernels = sorted({p[:-1] for p in lora})
    if kernels:
        ranks = np.stack([_rank_per_step(lora[k + ("a",)]) for k in kernels])  # [kernels, depth]
        for i in range(depth):
            used = ranks[:, i][ranks[:, i] > 0]
            if used.size:
                r = f"{used.max()}" if used.min() == used.max() else f"{used.min()}-{used.max()}"
                out[i].append(f"LoRA r={r} on {used.size} kernels")
    if "scale" in steps:
        for i, s in enumerate(_host(steps["scale"]).reshape(depth)):
            if s != 1:
                out[i].append(f"update ×{s:.3g}")
    adapter = steps.get("adapter")
    if adapter:
        has_bias = _nonzero_per_step(adapter["bias"], depth)
        ranks = _rank_per_step(adapter["a"]) if "a" in adapter else np.zeros(depth, int)
        for i in range(depth):
            if has_bias[i] or ranks[i]:
                out[i].append("adapter: bias" + (f" + rank {ranks[i]}" if ranks[i] else ""))
    return [tuple(x) for x in out]


def step_rows(program: Program, steps: dict | None = None, cfg=None) -> list[StepRow]:
    """The rows of the step table for a concrete program (the first one of a batch).
    With the model's `cfg`, a model whose rows differ in attention kind (sliding windows,
    a local RoPE base) lists each step's kind with its extras."""
    p = _first(program)
    block, attn, mlp, par = (_host(getattr(p, f)) for f in ("block", "attn", "mlp", "parallel"))
    group = np.cumsum(~par) - 1
    sizes = np.bincount(group)
    extras = step_extras(steps, len(block))
    if cfg is not None and (kinds.windowed(cfg) or cfg.local_rope_theta is not None):
        extras = [(kinds.describe(cfg, int(b)),) + e for b, e in zip(block, extras)]
    rows = []
    for i, b in enumerate(block):
        tied = tuple(int(j) for j in np.flatnonzero(block == b) if j != i)
        rows.append(
            StepRow(
                i,
                int(b),
                float(attn[i]),
                float(mlp[i]),
                int(group[i]),
                int(sizes[group[i]]),
                tied,
                extras[i],
            )
        )
    return rows


# -- HTML ----------------------------------------------------------------------------------
_TABLE = "border-collapse:collapse;font-family:monospace;font-size:12px"
_CELL = "padding:1px 8px;border-bottom:1px solid #ddd;text-align:right"
_CELL_L = "padding:1px 8px;border-bottom:1px solid #ddd;text-align:left"
_NUMERIC = ("step", "block", "attn", "mlp")  # right-aligned columns
_FADED = "color:#999"


def _colours(rows: list[StepRow]) -> dict[int, str]:
    """A colour for every table row that more than one step runs."""
    shared = sorted({r.block for r in rows if r.tied})
    return {b: _PALETTE[k % len(_PALETTE)] for k, b in enumerate(shared)}


def _gate(g: float) -> str:
    if g == 0:
        return f'<span style="{_FADED}">off</span>'
    return "1" if g == 1 else f"{g:.3g}"


def _group_mark(r: StepRow, rows: list[StepRow]) -> str:
    """A bracket joining the steps of a parallel group."""
    if r.group_size == 1:
        return ""
    first = r.step == 0 or rows[r.step - 1].group != r.group
    last = r.step == len(rows) - 1 or rows[r.step + 1].group != r.group
    return f"g{r.group} " + ("┐" if first else "┘" if last else "│")


def _ties(r: StepRow) -> str:
    if not r.tied:
        return ""
    shown = ", ".join(map(str, r.tied[:8])) + (", …" if len(r.tied) > 8 else "")
    return f"steps {shown}"


def _strip(rows: list[StepRow], colours: dict[int, str]) -> str:
    """The program drawn left to right: one box per step labelled with its block id,
    parallel groups stacked in one column."""
    columns: list[list[StepRow]] = []
    for r in rows:
        if columns and columns[-1][0].group == r.group:
            columns[-1].append(r)
        else:
            columns.append([r])
    parts = []
    for col in columns:
        boxes = []
        for r in col:
            off = r.attn == 0 and r.mlp == 0
            half = (r.attn == 0) != (r.mlp == 0)
            bg = colours.get(r.block, "#e9ecef")
            title = f"step {r.step}: block {r.block}, attn {r.attn:g}, mlp {r.mlp:g}"
            style = (
                f"background:{bg};color:#000;border:1px solid #adb5bd;border-radius:3px;"
                f"padding:0 4px;margin:1px;min-width:14px;text-align:center;"
                f"opacity:{0.3 if off else 0.65 if half else 1}"
                + (";border-style:dashed" if half else "")
            )
            boxes.append(f'<div title="{title}" style="{style}">{r.block}</div>')
        parts.append(
            '<div style="display:flex;flex-direction:column;justify-content:center">'
            + "".join(boxes)
            + "</div>"
        )
    return (
        '<div style="display:flex;flex-wrap:wrap;align-items:center;font-family:monospace;'
        'font-size:11px;margin:4px 0">' + "".join(parts) + "</div>"
    )


def _table(rows: list[StepRow], colours: dict[int, str]) -> str:
    any_par = any(r.group_size > 1 for r in rows)
    any_extra = any(r.extras for r in rows)
    heads = (
        ["step", "block", "attn", "mlp"]
        + (["parallel"] if any_par else [])
        + ["tied with"]
        + (["per-step params"] if any_extra else [])
    )
    out = [
        f'<table style="{_TABLE}"><thead><tr>'
        + "".join(f'<th style="{_CELL if h in _NUMERIC else _CELL_L}">{h}</th>' for h in heads)
        + "</tr></thead><tbody>"
    ]
    half = _MAX_ROWS // 2
    shown = rows if len(rows) <= _MAX_ROWS else rows[:half] + [None] + rows[-half:]
    for r in shown:
        if r is None:
            hidden = len(rows) - _MAX_ROWS
            out.append(
                f'<tr><td colspan="{len(heads)}" style="{_CELL};text-align:center">'
                f"… {hidden} steps not shown …</td></tr>"
            )
            continue
        bg = colours.get(r.block)
        block_style = _CELL + (f";background:{bg};color:#000" if bg else "")
        cells = [
            f'<td style="{_CELL}">{r.step}</td>',
            f'<td style="{block_style}">{r.block}</td>',
            f'<td style="{_CELL}">{_gate(r.attn)}</td>',
            f'<td style="{_CELL}">{_gate(r.mlp)}</td>',
        ]
        if any_par:
            cells.append(f'<td style="{_CELL_L}">{_group_mark(r, rows)}</td>')
        cells.append(f'<td style="{_CELL_L}">{_ties(r)}</td>')
        if any_extra:
            cells.append(f'<td style="{_CELL_L}">{html.escape("; ".join(r.extras))}</td>')
        out.append("<tr>" + "".join(cells) + "</tr>")
    return "".join(out) + "</tbody></table>"


def _summary(rows: list[StepRow], n_blocks: int | None) -> str:
    used = sorted({r.block for r in rows})
    parts = [f"depth {len(rows)}", f"{len(used)} distinct table rows"]
    groups = {r.group for r in rows if r.group_size > 1}
    if groups:
        parts.append(f"{len(groups)} parallel group{'s' * (len(groups) > 1)}")
    off = {k: sum(getattr(r, k) == 0 for r in rows) for k in ("attn", "mlp")}
    parts += [f"{n} {k} gated off" for k, n in off.items() if n]
    if n_blocks is not None:
        unused = sorted(set(range(n_blocks)) - set(used))
        if unused:
            parts.append(f"table rows not run: {', '.join(map(str, unused))}")
    return " · ".join(parts)


def program_html(
    program: Program, steps: dict | None = None, *, n_blocks: int | None = None, cfg=None
) -> str:
    """HTML for a program: a strip of its steps, a summary line and the step table."""
    if not _has_values(program):
        return f"<pre>Program(depth={program.depth}, no values: traced or abstract)</pre>"
    rows = step_rows(program, steps, cfg)
    colours = _colours(rows)
    batch = ""
    if program.block.ndim > 1:
        batch = (
            f"<div>a batch of programs {tuple(program.block.shape[:-1])}; showing the first</div>"
        )
    return (
        f'<div style="font-family:monospace;font-size:12px">{batch}'
        f"<div><b>Program</b> · {_summary(rows, n_blocks)}</div>"
        f"{_strip(rows, colours)}{_table(rows, colours)}</div>"
    )


def model_html(model) -> str:
    """HTML for a DepthModel: its config, parameter counts by part, then its program."""
    cfg = model.config
    fields = [
        f"{cfg.family}",
        f"d_model={cfg.d_model}",
        f"heads={cfg.n_heads}/{cfg.n_kv_heads}",
        f"d_ff={cfg.d_ff}",
        f"vocab={cfg.vocab_size}",
        f"norm={cfg.norm}/{cfg.norm_placement}",
        f"dtype={cfg.dtype}",
    ]
    counts = {k: count_params(v) for k, v in model.params.items()}
    total = model.n_params
    per_part = " · ".join(f"{k} {n:,}" for k, n in counts.items())
    head = (
        f"<div><b>DepthModel</b> · {html.escape(', '.join(fields))}</div>"
        f"<div>table of {model.n_blocks} blocks · {total:,} parameters "
        f"({html.escape(per_part)})"
        + (" · final adapter before the head" if "final_adapter" in model.params else "")
        + "</div>"
    )
    body = program_html(
        model.program, model.params.get("steps"), n_blocks=model.n_blocks, cfg=model.config
    )
    return f'<div style="font-family:monospace;font-size:12px">{head}{body}</div>'


DepthModel._repr_html_ = model_html
Program._repr_html_ = program_html
