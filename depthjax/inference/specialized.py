"""dj.specialize: one concrete program compiled as structure, the deploy path.

    fast = dj.specialize(model)
    logits = fast(tokens)                    # == dj.apply(model, tokens) (float tolerance)
    out = dj.generate(fast, prompt, 32)      # prefill and decoding walk the same plan

`dj.apply` runs every program of a depth through one compiled scan: the program is data,
a row is gathered at every step and a gated-off sublayer is skipped by a run-time cond.
`specialize` reads the program on the host and compiles that one program:

* a sublayer whose gate is 0 is not in the compiled function at all, and a step with
  nothing left to run (both gates 0, no recovery adapter) is removed;
* sequential steps with the same sublayers on form a *run*: one `lax.scan` over their
  rows, each read from the table in place by its index (known when compiling, and data to
  the loop: no per-step gather of the table); steps whose sublayers alternate in a short
  pattern (attention dropped at every other step) scan over repetitions of that pattern.
  A loop (`depth.repeat`) is a run whose rows repeat. Scans rather than unrolled steps
  matter on CPU too: XLA:CPU allocates a call's temp buffer afresh, and unrolled steps
  each hold their own buffers (more fresh memory to page in on every call);
* a parallel group runs as one call `vmap`-ed over its stacked rows (members with the
  same sublayers on together): the projections that read the group's shared input become
  one wider matmul. Before RMSNorm ("pre", "peri") each member's norm gain is folded into
  its q/k/v kernels so that the normalized input itself is shared (`fold_input_gain`);
  a LayerNorm's per-member bias keeps that input per member (a batched matmul). Prefill
  and decoding run a group's members one by one (each writes its own cache slot).

Gate values, per-step parameters (LoRA, deltas, scales, recovery adapters) and the final
adapter are honoured exactly as in `dj.apply`; updates are summed in the same order, so
outputs agree to float rounding. A `Specialized` is a pytree (the model is data, the plan
is static): it can be passed through `jax.jit` and differentiated. Build a new one after
editing the program or adding adapters.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np

from ..core import (
    kinds as kinds_lib,
    program as program_lib,
    rows as rows_lib,
    step_params as steps_lib,
)
from ..core.model import DepthModel, check_inputs, default_positions, embed, output_head
from ..core.program import ProgramError, is_concrete
from ..core.walk import rematerialized, sublayer_updates
from .kv_cache import StepCache


@dataclasses.dataclass(frozen=True)
class Parts:
    """What a sequential step runs (static): its sublayers, and whether it carries a
    recovery adapter (applied to the step's input)."""

    attn: bool
    mlp: bool
    adapter: bool


@dataclasses.dataclass(frozen=True)
class Run:
    """Sequential steps `steps` scanned as `times` repetitions of a body of len(pattern)
    steps: step k runs table row rows[k] with the sublayers pattern[k % len(pattern)]."""

    steps: tuple[int, ...]
    rows: tuple[int, ...]
    pattern: tuple[Parts, ...]

    @property
    def times(self) -> int:
        return len(self.steps) // len(self.pattern)

    def describe(self) -> str:
        rows = f"row{'s' if len(self.rows) > 1 else ''} {_span(self.rows)}"
        parts = ", ".join(_parts(p) for p in self.pattern)
        body = f" [{parts}] x{self.times}" if len(self.pattern) > 1 else f" [{parts}]"
        return f"steps {_span(self.steps)}: {rows}{body}"


@dataclasses.dataclass(frozen=True)
class Member:
    step: int
    row: int
    attn: bool
    mlp: bool


@dataclasses.dataclass(frozen=True)
class Group:
    """A parallel group: every member reads the group input (after the adapter of the
    group's first step, `adapter_step`, if it has one); their updates are summed."""

    members: tuple[Member, ...]
    adapter_step: int | None

    def batches(self) -> list[tuple[Member, ...]]:
        """Members that run as one vmapped call: those with the same sublayers on."""
        out: dict[tuple[bool, bool], list[Member]] = {}
        for m in self.members:
            out.setdefault((m.attn, m.mlp), []).append(m)
        return [tuple(v) for v in out.values()]

    def describe(self) -> str:
        parts = ", ".join(f"{m.step}:row {m.row} [{_parts(m)}]" for m in self.members)
        return f"parallel group ({parts})"


Segment = Run | Group


@dataclasses.dataclass(frozen=True)
class Plan:
    segments: tuple[Segment, ...]
    depth: int  # steps of the program (removed ones included)

    def describe(self) -> str:
        return "\n".join(s.describe() for s in self.segments) or "(no step runs)"


def _parts(s) -> str:
    parts = [
        name
        for name, on in (
            ("adapter", getattr(s, "adapter", False)),
            ("attn", s.attn),
            ("mlp", s.mlp),
        )
        if on
    ]
    return "+".join(parts) or "nothing"


def _span(steps) -> str:
    steps = list(steps)
    contiguous = steps == list(range(steps[0], steps[0] + len(steps)))
    if len(steps) == 1:
        return str(steps[0])
    return f"{steps[0]}-{steps[-1]}" if contiguous else ",".join(map(str, steps))


# ------------------------------------------------------------------ planning (host)
def _nonzero_per_step(tree, depth: int) -> np.ndarray:
    """bool [depth]: which steps have any non-zero leaf in `tree` (True when traced)."""
    out = np.zeros(depth, bool)
    for leaf in jax.tree.leaves(tree):
        if isinstance(leaf, jax.core.Tracer):
            return np.ones(depth, bool)
        out |= np.asarray(leaf).reshape(depth, -1).any(-1)
    return out


def make_plan(model: DepthModel) -> Plan:
    """The segments that run `model`'s (concrete) program; see the module docstring."""
    prog = model.program
    if not is_concrete(prog):
        raise ProgramError(
            "specialize needs a concrete program (it is compiled as structure); call it outside jit"
        )
    if prog.block.ndim != 1:
        raise ProgramError(f"specialize takes one program, got a batch {prog.block.shape}")
    program_lib.validate(prog, model.n_blocks)
    S = prog.depth
    steps_lib.check(model.params.get("steps"), S)
    block = np.asarray(prog.block)
    attn_on, mlp_on = np.asarray(prog.attn) != 0, np.asarray(prog.mlp) != 0
    parallel = np.asarray(prog.parallel)
    adapter_on = _nonzero_per_step((model.params.get("steps") or {}).get("adapter", {}), S)

    units: list[Group | tuple[int, int, Parts]] = []  # groups; (step, row, parts) of steps
    starts = [i for i in range(S) if not parallel[i]] + [S]
    for j, end in zip(starts[:-1], starts[1:]):
        members = [
            Member(i, int(block[i]), bool(attn_on[i]), bool(mlp_on[i]))
            for i in range(j, end)
            if attn_on[i] or mlp_on[i]
        ]
        if [m.step for m in members] in ([], [j]):
            if members or adapter_on[j]:
                parts = Parts(bool(attn_on[j]), bool(mlp_on[j]), bool(adapter_on[j]))
                units.append((j, int(block[j]), parts))
        else:
            units.append(Group(tuple(members), j if adapter_on[j] else None))
    segments: list[Segment] = []
    for is_group, stretch in itertools.groupby(units, lambda u: isinstance(u, Group)):
        stretch = list(stretch)
        segments += stretch if is_group else _runs(stretch)
    return Plan(tuple(segments), S)


MAX_PATTERN = 4  # longest body of steps a run unrolls inside its scan


def _runs(steps: list[tuple[int, int, Parts]]) -> list[Run]:
    """Split consecutive sequential (step, row, parts) into runs, greedily from the front:
    the pattern of at most MAX_PATTERN steps that repeats over the most steps (ties: the
    shortest), or a single step when nothing repeats."""
    parts = [p for _, _, p in steps]
    out, i = [], 0
    while i < len(steps):
        period, times = 1, 1
        for p in range(1, min(MAX_PATTERN, len(steps) - i) + 1):
            t = 1
            while parts[i + t * p : i + (t + 1) * p] == parts[i : i + p]:
                t += 1
            if t > 1 and t * p > period * times:
                period, times = p, t
        chunk = steps[i : i + period * times]
        out.append(
            Run(
                tuple(s for s, _, _ in chunk),
                tuple(r for _, r, _ in chunk),
                tuple(parts[i : i + period]),
            )
        )
        i += period * times
    return out


# ------------------------------------------------------------------ execution
def _take(tree, idx):
    """Leaves indexed by the static ints `idx` along axis 0: a slice when contiguous."""
    idx = list(idx)
    if idx == list(range(idx[0], idx[0] + len(idx))):
        return jax.tree.map(lambda a: a[idx[0] : idx[0] + len(idx)], tree)
    return jax.tree.map(lambda a: a[np.asarray(idx)], tree)


def _step_data(model: DepthModel, steps):
    """(attn gates, mlp gates, per-step params) of the static `steps`, leading axis len(steps)."""
    prog = model.program
    return _take((prog.attn, prog.mlp, model.params.get("steps")), steps)


def shares_normalized_input(cfg) -> bool:
    """Whether an RMS-normalized block input can be shared by a parallel group's members
    with each member's norm gain folded into the projections that read it (see
    `fold_input_gain`)."""
    return cfg.norm == "rms" and cfg.norm_placement in ("pre", "peri")


def fold_input_gain(cfg, row: dict) -> dict:
    """The row with its attention norm's gain g [D] moved into the kernels that read the
    normalized input: (xhat * g) @ W == xhat @ (g[:, None] * W), and the norm's scale set
    to ones (a constant, so under vmap over a group's members the normalized input is
    not batched and each projection is one wider matmul over the members' kernels).
    A parallel block's MLP reads the same norm: its gate and up kernels are folded too."""
    g_D = row["attn_norm"]["scale"]
    scaled = lambda layer: {
        **layer,
        "kernel": layer["kernel"] * g_D.reshape((-1,) + (1,) * (layer["kernel"].ndim - 1)),
    }
    attn = {**row["attn"], **{n: scaled(row["attn"][n]) for n in ("q", "k", "v")}}
    out = {**row, "attn": attn, "attn_norm": {**row["attn_norm"], "scale": jnp.ones_like(g_D)}}
    if cfg.parallel_block:
        out["mlp"] = {
            **row["mlp"],
            **{n: scaled(row["mlp"][n]) for n in ("gate", "up") if n in row["mlp"]},
        }
    return out


def _run(cfg, model, run: Run, x_BTD, positions_BT, cache=None, prefill=True, **attn_kwargs):
    """One Run: a scan over its repetitions, each the pattern's steps in turn. Returns
    (x, cache).

    Each step reads its row from the table in place (a dynamic slice of the loop-invariant
    table, as dj.apply does): scanning over a gathered copy table[rows] would copy the
    run's rows before the loop."""
    blocks = model.params["blocks"]
    period, times = len(run.pattern), run.times
    ga, gm, sp = _step_data(model, run.steps)
    slots = (
        np.zeros(len(run.steps), np.int32) if cache is None else cache.slot_map()[list(run.steps)]
    )
    rows = np.asarray(run.rows, np.int32)
    reshape = lambda t: jax.tree.map(lambda a: a.reshape((times, period) + a.shape[1:]), t)
    xs = reshape((jnp.asarray(rows), ga, gm, sp, jnp.asarray(slots)))

    def step(carry, xs, parts: Parts):
        x, kv = carry
        r, a, m, s, slot = xs
        uses_cache = cache is not None and parts.attn
        row = rows_lib.take(blocks, r)
        kind = kinds_lib.row_kind(cfg, r)  # each row's attention kind travels with it
        view = StepCache(kv, slot, jnp.ones(x.shape[:1], bool), prefill) if uses_cache else None
        if parts.adapter:  # a recovery adapter on the step's input
            x = x + steps_lib.adapter_update(s["adapter"], x)
        out = sublayer_updates(
            cfg,
            row,
            x,
            a,
            m,
            s,
            positions_BT,
            attn=parts.attn,
            mlp=parts.mlp,
            kv_cache=view,
            **attn_kwargs,
            **kind,
        )
        x = x + (out[0] + out[1])
        return x, out[2].cache if uses_cache else kv

    # as in dj.apply; CSE is only a risk for the forward outside a scan
    steps = [
        rematerialized(cfg, functools.partial(step, parts=parts), prevent_cse=times == 1)
        for parts in run.pattern
    ]

    def repetition(carry, xs):
        for k, one in enumerate(steps):
            carry = one(carry, jax.tree.map(lambda a, k=k: a[k], xs))
        return carry, None

    carry = (x_BTD, cache)
    if times == 1:
        carry, _ = repetition(carry, jax.tree.map(lambda a: a[0], xs))
    else:
        carry, _ = jax.lax.scan(repetition, carry, xs)
    return carry


def _group(cfg, model, group: Group, x_BTD, positions_BT, cache=None, prefill=True, **attn_kwargs):
    """One parallel group. Returns (x_in + sum of member updates in step order, cache)."""
    if group.adapter_step is not None:
        adapter = _step_data(model, [group.adapter_step])[2]["adapter"]
        x_BTD = x_BTD + steps_lib.adapter_update(jax.tree.map(lambda a: a[0], adapter), x_BTD)
    updates = {}
    blocks = model.params["blocks"]
    if cache is None:  # one vmapped call per batch of members with the same sublayers
        for batch in group.batches():
            idx = [m.row for m in batch]
            rows = (
                _take(blocks, idx)
                if rows_lib.is_plain(blocks)
                else rows_lib.take(blocks, np.asarray(idx, np.int32))
            )
            kind = kinds_lib.row_kind(cfg, jnp.asarray([m.row for m in batch]))
            ga, gm, sp = _step_data(model, [m.step for m in batch])
            fold = batch[0].attn and len(batch) > 1 and shares_normalized_input(cfg)
            updates_fn = functools.partial(
                sublayer_updates,
                cfg,
                attn=batch[0].attn,
                mlp=batch[0].mlp,
                row_fn=functools.partial(fold_input_gain, cfg) if fold else None,
                **attn_kwargs,
            )
            member = rematerialized(
                cfg,
                lambda r, k, a, m, s, fn=updates_fn: fn(r, x_BTD, a, m, s, positions_BT, **k),
            )
            u_attn, u_mlp = jax.vmap(member)(rows, kind, ga, gm, sp)
            updates.update({m.step: (u_attn[k], u_mlp[k]) for k, m in enumerate(batch)})
    else:  # decoding: member by member, each writing its own slot
        slot_map = cache.slot_map()
        for m in group.members:
            row = rows_lib.take(blocks, m.row)
            ga, gm, sp = jax.tree.map(lambda a: a[0], _step_data(model, [m.step]))
            view = (
                StepCache(
                    cache, jnp.asarray(slot_map[m.step]), jnp.ones(x_BTD.shape[:1], bool), prefill
                )
                if m.attn
                else None
            )
            out = sublayer_updates(
                cfg,
                row,
                x_BTD,
                ga,
                gm,
                sp,
                positions_BT,
                attn=m.attn,
                mlp=m.mlp,
                kv_cache=view,
                **attn_kwargs,
                **kinds_lib.row_kind(cfg, m.row),
            )
            u_attn, u_mlp = out[:2]
            view = out[2] if m.attn else None
            cache = view.cache if m.attn else cache
            updates[m.step] = (u_attn, u_mlp)
    acc = jnp.zeros_like(x_BTD)
    for step in sorted(updates):  # dj.apply's summation order
        acc = acc + updates[step][0] + updates[step][1]
    return x_BTD + acc, cache


def run_plan(
    model: DepthModel, plan: Plan, x_BTD, positions_BT, *, cache=None, prefill=True, **attn_kwargs
):
    """Run the plan's segments on the embedded input. Returns (residual_BTD, cache)."""
    for seg in plan.segments:
        run = _run if isinstance(seg, Run) else _group
        x_BTD, cache = run(
            model.config, model, seg, x_BTD, positions_BT, cache, prefill, **attn_kwargs
        )
    return x_BTD, cache


@functools.partial(jax.jit, static_argnames=("output",))
def _forward(
    fast: Specialized,
    tokens_BT,
    mask_BT,
    token_types_BT,
    segment_ids_BT,
    positions_BT,
    *,
    output: str,
):
    model = fast.model
    cfg, params = model.config, model.params
    if positions_BT is None:
        positions_BT = default_positions(tokens_BT, segment_ids_BT)
    x_BTD = embed(model, tokens_BT, positions_BT, token_types_BT)
    x_BTD, _ = run_plan(
        model, fast.plan, x_BTD, positions_BT, segment_ids_BT=segment_ids_BT, kv_mask_BT=mask_BT
    )
    return output_head(cfg, params, x_BTD, logits=output == "logits")


@functools.partial(jax.tree_util.register_dataclass, data_fields=["model"], meta_fields=["plan"])
@dataclasses.dataclass(frozen=True)
class Specialized:
    """A model compiled for its own program: call it like `dj.apply` (see module docstring)."""

    model: DepthModel
    plan: Plan

    @property
    def config(self):
        return self.model.config

    @property
    def depth(self) -> int:
        return self.plan.depth

    def replace(self, **changes) -> Specialized:
        """E.g. fast.replace(model=model.replace(params=p)) to differentiate the parameters
        (the plan stays: use it for parameter changes, not program edits)."""
        return dataclasses.replace(self, **changes)

    def __call__(
        self,
        tokens_BT,
        *,
        mask=None,
        token_types=None,
        segment_ids=None,
        positions=None,
        output: str = "logits",
    ):
        """tokens int [B, T] -> logits float32 [B, T, vocab] (output="hidden": final hidden
        states [B, T, D]); the arguments mean what they mean in `dj.apply`."""
        if output not in ("logits", "hidden"):
            raise ValueError(f"output must be 'logits' or 'hidden', got {output!r}")
        check_inputs(self.model, tokens_BT, mask, token_types, segment_ids)
        return _forward(self, tokens_BT, mask, token_types, segment_ids, positions, output=output)

    def __repr__(self) -> str:
        return f"Specialized(depth={self.depth})\n{self.plan.describe()}"


def specialize(model: DepthModel) -> Specialized:
    """The static fast path of `model` with its current (concrete) program."""
    return Specialized(model, make_plan(model))
