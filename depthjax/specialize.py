"""dj.specialize: one concrete program compiled as structure, the deploy path.

    fast = dj.specialize(model)
    logits = fast(tokens)                    # == dj.apply(model, tokens) (float tolerance)
    out = dj.generate(fast, prompt, 32)      # prefill and decoding walk the same plan

`dj.apply` runs every program of a depth through one compiled scan: the program is data,
a row is gathered at every step and a gated-off sublayer is skipped by a run-time cond.
`specialize` reads the program on the host and compiles that one program:

* a sublayer whose gate is 0 is not in the compiled function at all, and a step with
  nothing left to run (both gates 0, no recovery adapter) is removed;
* consecutive steps that run consecutive table rows with the same sublayers on form a
  *run*: one `lax.scan` over rows a..b-1, each read in place from the table (the row
  index is a known range, not data from a program); a run repeated back to back (a loop,
  `depth.repeat`) is a scan over its repetitions, every repetition reading the same rows;
* a parallel group runs as one call `vmap`-ed over its stacked rows (members with the
  same sublayers on together): the projections that read the group's shared input become
  one wider matmul. Prefill and decoding run a group's members one by one (each writes
  its own cache slot).

Gate values, per-step parameters (LoRA, deltas, scales, recovery adapters) and the final
adapter are honoured exactly as in `dj.apply`; updates are summed in the same order, so
outputs agree to float rounding. A `Specialized` is a pytree (the model is data, the plan
is static): it can be passed through `jax.jit` and differentiated. Build a new one after
editing the program or adding adapters.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from . import kinds as kinds_lib, program as program_lib, step_params as steps_lib
from .block import step_updates
from .kv_cache import StepCache
from .model import DepthModel, Embed, check_inputs, default_positions, output_head, rematerialized
from .program import ProgramError, is_concrete


@dataclasses.dataclass(frozen=True)
class Run:
    """Sequential steps `steps` ([times * length]) running table rows row .. row+length-1,
    `times` times in a row, all with the same sublayers on."""

    steps: tuple[int, ...]
    row: int
    length: int
    times: int
    attn: bool
    mlp: bool
    adapter: bool  # the steps carry recovery adapters (applied to each step's input)

    def describe(self) -> str:
        rows = (
            f"row {self.row}"
            if self.length == 1
            else f"rows {self.row}-{self.row + self.length - 1}"
        )
        loop = f" x{self.times}" if self.times > 1 else ""
        return f"steps {_span(self.steps)}: {rows}{loop} [{_parts(self)}]"


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

    units: list[Segment] = []  # one per group; sequential steps become 1-step runs
    starts = [i for i in range(S) if not parallel[i]] + [S]
    for j, end in zip(starts[:-1], starts[1:]):
        members = [
            Member(i, int(block[i]), bool(attn_on[i]), bool(mlp_on[i]))
            for i in range(j, end)
            if attn_on[i] or mlp_on[i]
        ]
        if [m.step for m in members] in ([], [j]):
            m = members[0] if members else Member(j, int(block[j]), False, False)
            if members or adapter_on[j]:
                units.append(Run((j,), m.row, 1, 1, m.attn, m.mlp, bool(adapter_on[j])))
        else:
            units.append(Group(tuple(members), j if adapter_on[j] else None))
    return Plan(tuple(_merge_runs(units)), S)


def _merge_runs(units: list[Segment]) -> list[Segment]:
    """Join 1-step runs over consecutive rows, then back-to-back repeats of a run."""
    same = lambda a, b: (a.attn, a.mlp, a.adapter) == (b.attn, b.mlp, b.adapter)
    runs: list[Segment] = []
    for u in units:
        last = runs[-1] if runs else None
        if (
            isinstance(u, Run)
            and isinstance(last, Run)
            and last.times == 1
            and same(last, u)
            and u.row == last.row + last.length
        ):
            runs[-1] = dataclasses.replace(last, steps=last.steps + u.steps, length=last.length + 1)
        else:
            runs.append(u)
    out: list[Segment] = []
    for r in runs:
        last = out[-1] if out else None
        if (
            isinstance(r, Run)
            and isinstance(last, Run)
            and same(last, r)
            and (last.row, last.length) == (r.row, r.length)
        ):
            out[-1] = dataclasses.replace(last, steps=last.steps + r.steps, times=last.times + 1)
        else:
            out.append(r)
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


def _one_step(
    cfg,
    row,
    x_BTD,
    attn_gate,
    mlp_gate,
    step,
    positions_BT,
    *,
    attn,
    mlp,
    adapter,
    view=None,
    **attn_kwargs,
):
    """(x + the step's update, view'): a sequential step with static sublayers (program_step
    without the group bookkeeping). `view`: the step's StepCache when decoding."""
    if adapter:
        x_BTD = x_BTD + steps_lib.adapter_update(step["adapter"], x_BTD)
    u_attn, u_mlp, view = _updates(
        cfg,
        row,
        x_BTD,
        attn_gate,
        mlp_gate,
        step,
        positions_BT,
        attn=attn,
        mlp=mlp,
        view=view,
        **attn_kwargs,
    )
    return x_BTD + (u_attn + u_mlp), view


def _updates(
    cfg, row, x_BTD, attn_gate, mlp_gate, step, positions_BT, *, attn, mlp, view=None, **attn_kwargs
):
    row = steps_lib.effective_row(row, step)
    if view is not None and attn:
        u_attn, u_mlp, view = step_updates(
            cfg,
            row,
            x_BTD,
            attn_gate,
            mlp_gate,
            positions_BT,
            attn=True,
            mlp=mlp,
            kv_cache=view,
            **attn_kwargs,
        )
    else:
        u_attn, u_mlp = step_updates(
            cfg, row, x_BTD, attn_gate, mlp_gate, positions_BT, attn=attn, mlp=mlp, **attn_kwargs
        )
    s = steps_lib.scale(step)
    return u_attn * jnp.asarray(s, u_attn.dtype), u_mlp * jnp.asarray(s, u_mlp.dtype), view


def _run(cfg, model, run: Run, x_BTD, positions_BT, cache=None, prefill=True, **attn_kwargs):
    """One Run: a scan over its rows (inside a scan over repetitions). Returns (x, cache).

    Each step reads its row from the table in place (a dynamic slice of the loop-invariant
    table, as dj.apply does): scanning over a sliced copy table[a:b] would copy the run's
    rows before the loop."""
    blocks = model.params["blocks"]
    ga, gm, sp = _step_data(model, run.steps)
    slots = (
        np.zeros(len(run.steps), np.int32) if cache is None else cache.slot_map()[list(run.steps)]
    )
    rows = np.tile(np.arange(run.row, run.row + run.length, dtype=np.int32), run.times)
    reshape = lambda t: jax.tree.map(lambda a: a.reshape((run.times, run.length) + a.shape[1:]), t)
    xs = reshape((jnp.asarray(rows), ga, gm, sp, jnp.asarray(slots)))
    flags = dict(attn=run.attn, mlp=run.mlp, adapter=run.adapter)
    uses_cache = cache is not None and run.attn

    def step(carry, xs):
        x, kv = carry
        r, a, m, s, slot = xs
        row = jax.tree.map(lambda t: jax.lax.dynamic_index_in_dim(t, r, keepdims=False), blocks)
        kind = kinds_lib.row_kind(cfg, r)  # each row's attention kind travels with it
        view = StepCache(kv, slot, jnp.ones(x.shape[:1], bool), prefill) if uses_cache else None
        x, view = _one_step(
            cfg, row, x, a, m, s, positions_BT, view=view, **flags, **attn_kwargs, **kind
        )
        return (x, view.cache if uses_cache else kv), None

    # as in dj.apply; CSE is only a risk for the forward outside a scan
    step = rematerialized(cfg, step, prevent_cse=run.length == run.times == 1)
    first = lambda t: jax.tree.map(lambda a: a[0], t)

    def repetition(carry, xs):
        if run.length == 1:
            return step(carry, first(xs))
        return jax.lax.scan(step, carry, xs)

    carry = (x_BTD, cache)
    if run.times == 1:
        carry, _ = repetition(carry, first(xs))
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
            rows = _take(blocks, [m.row for m in batch])
            kind = kinds_lib.row_kind(cfg, jnp.asarray([m.row for m in batch]))
            ga, gm, sp = _step_data(model, [m.step for m in batch])
            updates_fn = functools.partial(
                _updates, cfg, attn=batch[0].attn, mlp=batch[0].mlp, **attn_kwargs
            )
            member = rematerialized(
                cfg,
                lambda r, k, a, m, s, fn=updates_fn: fn(r, x_BTD, a, m, s, positions_BT, **k),
            )
            u_attn, u_mlp, _ = jax.vmap(member)(rows, kind, ga, gm, sp)
            updates.update({m.step: (u_attn[k], u_mlp[k]) for k, m in enumerate(batch)})
    else:  # decoding: member by member, each writing its own slot
        slot_map = cache.slot_map()
        for m in group.members:
            row = jax.tree.map(lambda a, m=m: a[m.row], blocks)
            ga, gm, sp = jax.tree.map(lambda a: a[0], _step_data(model, [m.step]))
            view = (
                StepCache(
                    cache, jnp.asarray(slot_map[m.step]), jnp.ones(x_BTD.shape[:1], bool), prefill
                )
                if m.attn
                else None
            )
            u_attn, u_mlp, view = _updates(
                cfg,
                row,
                x_BTD,
                ga,
                gm,
                sp,
                positions_BT,
                attn=m.attn,
                mlp=m.mlp,
                view=view,
                **attn_kwargs,
                **kinds_lib.row_kind(cfg, m.row),
            )
            cache = view.cache if m.attn else cache
            updates[m.step] = (u_attn, u_mlp)
    acc = jnp.zeros_like(x_BTD)
    for step in sorted(updates):  # dj.apply's summation order
        acc = acc + updates[step][0] + updates[step][1]
    return x_BTD + acc, cache


def walk(
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
    x_BTD = Embed(cfg).apply({"params": params["embed"]}, tokens_BT, positions_BT, token_types_BT)
    x_BTD, _ = walk(
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
