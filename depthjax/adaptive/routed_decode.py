"""Decoding with routed steps: a step runs only for the tokens routed through it, and its
KV cache holds only their entries.

    logits_BV, cache = prefill(model, prompt_BT, max_len=64, mod=spec)
    logits_BV, cache, ran_BS = decode_step(model, cache, next_B, mod=spec)
    out = dj.generate(model, prompt_BT, 32, policy=Routed(mod=spec, routed_len=16))

Two kinds of routing, alone or together:

* `mod=MoD spec` (Mixture-of-Depths): at a routed step a token runs the block when its
  causal predictor says so (logit > threshold), weighted by its router as in training;
  at most `routed_len` tokens per row run each routed step (the cache of a routed step has
  `routed_len` entries per row, so a small value saves memory; tokens beyond it skip);
* `row_steps=bool [B, depth]` (FiRST, per sequence): row b runs step i iff row_steps[b, i].

Every step keeps, per row, only the entries of the tokens that ran it (depthjax.adaptive.
caches.RowView), and a step that no row of the batch runs for the current token is not
computed at all (`lax.cond`); rows that skip it while others run are masked. Positions
count real tokens, so left or right prompt padding decodes like the unpadded prompt.
Decoding equals `mod.apply(..., routing="causal", budget=routed_len)` (tested).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from ..core import walk as walk_lib
from ..core.model import DepthModel, embed, output_head
from ..core.program import is_concrete
from ..inference.cached import last_real, prompt_mask, prompt_positions, step_tokens
from ..inference.driver import TokenByToken
from ..inference.sampling import GenerationError
from . import mod as mod_lib
from .caches import RowView
from .common import AdaptiveError, gather_plan, reject_parallel, scatter_add, take


@dataclasses.dataclass(frozen=True)
class Layout:
    """Static shape of a routed cache: which steps are MoD-routed and the buffer lengths."""

    routed: tuple[bool, ...]  # per step
    max_len: int  # entries per row of an ordinary step
    routed_len: int  # entries per row of a routed step
    threshold: float

    def slots(self) -> tuple[np.ndarray, np.ndarray]:
        """(kind int32 [depth]: 1 = routed, slot int32 [depth]: index in its stack)."""
        kind = np.asarray(self.routed, np.int32)
        slot = np.where(kind, np.cumsum(kind) - 1, np.cumsum(1 - kind) - 1).astype(np.int32)
        return kind, slot


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["k", "v", "count", "rk", "rv", "rcount", "next_pos", "length"],
    meta_fields=["layout"],
)
@dataclasses.dataclass(frozen=True)
class RoutedCache:
    k: jax.Array  # [N, B, max_len, K, Dh] ordinary steps
    v: jax.Array
    count: jax.Array  # int32 [N, B]: entries of each row
    rk: jax.Array  # [Nr, B, routed_len, K, Dh] MoD-routed steps
    rv: jax.Array
    rcount: jax.Array  # int32 [Nr, B]
    next_pos: jax.Array  # int32 [B]
    length: jax.Array  # int32 []: tokens fed so far (prompt length + decoded)
    layout: Layout

    @classmethod
    def empty(cls, cfg, layout: Layout, batch: int) -> RoutedCache:
        n_r = sum(layout.routed)
        n = len(layout.routed) - n_r
        shape = lambda n, L: (max(n, 1), batch, L, cfg.n_kv_heads, cfg.head_dim)
        z = lambda n, L: jnp.zeros(shape(n, L), cfg.dtype)
        return cls(
            z(n, layout.max_len),
            z(n, layout.max_len),
            jnp.zeros((max(n, 1), batch), jnp.int32),
            z(n_r, layout.routed_len),
            z(n_r, layout.routed_len),
            jnp.zeros((max(n_r, 1), batch), jnp.int32),
            jnp.zeros((batch,), jnp.int32),
            jnp.zeros((), jnp.int32),
            layout,
        )

    @property
    def nbytes(self) -> int:
        """Bytes allocated for keys and values (stacks of an absent kind hold one dummy slot)."""
        n_r = sum(self.layout.routed)
        used = lambda a, n: a.size * a.dtype.itemsize * (n > 0)
        return 2 * used(self.k, len(self.layout.routed) - n_r) + 2 * used(self.rk, n_r)

    def entries(self) -> np.ndarray:
        """int [depth, B]: cache entries each step holds for each row (tokens that ran it)."""
        kind, slot = self.layout.slots()
        count, rcount = np.asarray(self.count), np.asarray(self.rcount)
        return np.stack([rcount[s] if k else count[s] for k, s in zip(kind, slot)])


def _layout(model: DepthModel, mod, max_len: int, routed_len, threshold) -> Layout:
    reject_parallel(model, "routed decoding")
    if not model.config.causal:
        raise GenerationError("generation needs a causal model")
    if mod is None:
        routed = (False,) * model.depth
    else:
        mod_lib.check(model, mod)
        if not is_concrete(mod):
            raise AdaptiveError("the routed cache layout needs a concrete MoD spec")
        routed = tuple(bool(r) for r in np.asarray(mod.routed))
    routed_len = max_len if routed_len is None else int(routed_len)
    if not 1 <= routed_len <= max_len:
        raise AdaptiveError(f"routed_len must be in 1..max_len={max_len}, got {routed_len}")
    return Layout(routed, int(max_len), routed_len, float(threshold))


def _row_steps(model: DepthModel, row_steps, B: int):
    if row_steps is None:
        return jnp.ones((B, model.depth), bool)
    row_steps = jnp.asarray(row_steps, bool)
    if row_steps.shape != (B, model.depth):
        raise AdaptiveError(
            f"row_steps must be bool [batch={B}, depth={model.depth}], got {row_steps.shape}"
        )
    return row_steps


def _walk(
    model: DepthModel,
    cache: RoutedCache,
    x_BTD,
    positions_BT,
    real_BT,
    row_steps_BS,
    *,
    prefill: bool,
):
    """Run every step on x, appending the tokens that run it.

    Returns (x, cache, ran [B, T, depth])."""
    cfg, blocks, lay = model.config, model.params["blocks"], cache.layout
    B, T, _ = x_BTD.shape
    kind, slot = lay.slots()
    stacks = {False: ("k", "v", "count", lay.max_len), True: ("rk", "rv", "rcount", lay.routed_len)}

    def run_step(routed: bool, step: walk_lib.Step, x, c, s, sel_BT):
        """One step of one kind (routed or ordinary) on the rows and tokens that run it."""
        kn, vn, cn, limit = stacks[routed]
        k, v, count = getattr(c, kn)[s], getattr(c, vn)[s], getattr(c, cn)[s]
        if routed:
            sel_BT = sel_BT & (mod_lib.predictor_logit(step.params["mod"], x) > lay.threshold)
            w_BT = mod_lib.router_weight(step.params["mod"], x)
        else:
            w_BT = jnp.ones((B, T))
        if prefill:
            sel_BT = sel_BT & (jnp.cumsum(sel_BT, axis=1) <= limit)
        else:
            sel_BT = sel_BT & (count < limit)[:, None]

        def compute(x, k, v, count):
            if prefill:
                idx, valid = gather_plan(sel_BT, min(T, limit))
                x_in, pos, w = take(x, idx), take(positions_BT, idx), take(w_BT, idx) * valid
                view = RowView(k, v, count, jnp.ones((B,), bool), prefill=True)
                mask = valid
            else:
                x_in, pos, w = x, positions_BT, w_BT * sel_BT
                view, mask = RowView(k, v, count, sel_BT[:, 0]), None
            carry, _, _, view = step.run(
                (x_in, jnp.zeros_like(x_in)),
                positions_BT=pos,
                kv_cache=view,
                attn=True,
                kv_mask_BT=mask,
            )
            delta = (step.residual(carry) - x_in) * w[..., None].astype(x.dtype)
            x = scatter_add(x, idx, delta) if prefill else x + delta
            return x, view.k, view.v, count + jnp.sum(sel_BT, axis=1, dtype=jnp.int32)

        x, k, v, count = jax.lax.cond(jnp.any(sel_BT), compute, lambda *a: a, x, k, v, count)
        c = dataclasses.replace(
            c,
            **{
                kn: getattr(c, kn).at[s].set(k),
                vn: getattr(c, vn).at[s].set(v),
                cn: getattr(c, cn).at[s].set(count),
            },
        )
        return x, c, sel_BT

    kinds = set(lay.routed)

    def policy(step: walk_lib.Step, carry, c, xs):
        """Routed-cache policy: the state is the RoutedCache; xs = (routed?, slot, on_B)."""
        is_routed, s, on_B = xs
        args = (step.residual(carry), c, s, real_BT & on_B[:, None])
        if len(kinds) == 1:
            x, c, sel_BT = run_step(next(iter(kinds)), step, *args)
        else:
            x, c, sel_BT = jax.lax.cond(
                is_routed,
                lambda *a: run_step(True, step, *a),
                lambda *a: run_step(False, step, *a),
                *args,
            )
        return (x, jnp.zeros_like(x)), c, sel_BT

    x_BTD, cache, ran_SBT = walk_lib.walk(
        cfg,
        blocks,
        model.program,
        model.params.get("steps"),
        x_BTD,
        positions_BT,
        policy=policy,
        state=cache,
        xs=(jnp.asarray(kind, bool), jnp.asarray(slot), row_steps_BS.T),
    )
    return x_BTD, cache, jnp.moveaxis(ran_SBT, 0, -1)


@functools.partial(jax.jit, static_argnames=("layout",))
def _prefill(model, tokens_BT, mask_BT, row_steps_BS, *, layout: Layout):
    cfg = model.config
    cache = RoutedCache.empty(cfg, layout, tokens_BT.shape[0])
    positions_BT = prompt_positions(mask_BT)
    x_BTD = embed(model, tokens_BT, positions_BT)
    x_BTD, cache, ran = _walk(
        model, cache, x_BTD, positions_BT, mask_BT, row_steps_BS, prefill=True
    )
    logits_BV = output_head(cfg, model.params, last_real(x_BTD, mask_BT))[:, 0]
    cache = dataclasses.replace(
        cache,
        next_pos=mask_BT.sum(1).astype(jnp.int32),
        length=jnp.asarray(tokens_BT.shape[1], jnp.int32),
    )
    return logits_BV, cache, ran


def _decode(model, cache: RoutedCache, tokens_B, row_steps_BS):
    pos_B1 = cache.next_pos[:, None]
    x_B1D = embed(model, tokens_B[:, None], pos_B1)
    real = jnp.ones(pos_B1.shape, bool)
    x_B1D, cache, ran = _walk(model, cache, x_B1D, pos_B1, real, row_steps_BS, prefill=False)
    logits_BV = output_head(model.config, model.params, x_B1D)[:, 0]
    cache = dataclasses.replace(cache, next_pos=cache.next_pos + 1, length=cache.length + 1)
    return logits_BV, cache, ran[:, 0]


_decode_jit = jax.jit(_decode)


def prefill(
    model: DepthModel,
    tokens_BT,
    mask_BT=None,
    *,
    max_len: int,
    mod=None,
    threshold: float = 0.0,
    routed_len: int | None = None,
    row_steps=None,
):
    """Run the prompt [B, T] and build a routed cache with room for `max_len` tokens.
    Returns (next-token logits float32 [B, V], RoutedCache, ran bool [B, T, depth])."""
    tokens_BT, mask_BT, _ = prompt_mask(model, tokens_BT, mask_BT)
    if max_len < tokens_BT.shape[1]:
        raise GenerationError(
            f"max_len={max_len} is shorter than the prompt ({tokens_BT.shape[1]})"
        )
    layout = _layout(model, mod, max_len, routed_len, threshold)
    return _prefill(
        model, tokens_BT, mask_BT, _row_steps(model, row_steps, tokens_BT.shape[0]), layout=layout
    )


def decode_step(model: DepthModel, cache: RoutedCache, tokens_B, *, row_steps=None):
    """Feed one token per row. Returns (logits [B, V], cache, ran bool [B, depth])."""
    if len(cache.layout.routed) != model.depth:
        raise AdaptiveError(
            f"the cache was built for {len(cache.layout.routed)} steps; the "
            f"program has {model.depth}"
        )
    lay = cache.layout
    tokens_B = step_tokens(model, tokens_B, cache.next_pos, cache.length, lay.max_len)
    return _decode_jit(model, cache, tokens_B, _row_steps(model, row_steps, tokens_B.shape[0]))


@dataclasses.dataclass(frozen=True)
class Routed:
    """The `dj.generate(..., policy=Routed(...))` policy: MoD-routed steps (`mod`, with its
    predictor `threshold` and `routed_len` cache entries per routed step) and / or per-row
    programs (`row_steps` bool [B, depth], e.g. FiRST's `first.choose`). Generation.ran
    [B, N, depth] says which steps each generated token's input ran (the prompt's last
    token first); Generation.cache is the RoutedCache."""

    mod: mod_lib.MoD | None = None
    threshold: float = 0.0
    routed_len: int | None = None
    row_steps: jax.Array | None = None

    def prepare(self, model: DepthModel, tokens_BT, mask_BT, max_new_tokens: int):
        B, T = tokens_BT.shape
        layout = _layout(model, self.mod, T + max_new_tokens - 1, self.routed_len, self.threshold)
        return RoutedDecoder(layout), _row_steps(model, self.row_steps, B)


@dataclasses.dataclass(frozen=True)
class RoutedDecoder(TokenByToken):
    """The static decoder of `Routed`; its data is row_steps bool [B, depth]."""

    layout: Layout

    def prefill(self, model, row_steps_BS, tokens_BT, mask_BT, max_len):
        logits_BV, cache, ran_BTS = _prefill(
            model, tokens_BT, mask_BT, row_steps_BS, layout=self.layout
        )
        ran_BS = last_real(ran_BTS, mask_BT)[:, 0]
        return logits_BV, cache, {"ran": ran_BS, "exit_steps": ran_BS.sum(-1, dtype=jnp.int32)}

    def decode(self, model, row_steps_BS, cache, tokens_B):
        logits_BV, cache, ran_BS = _decode(model, cache, tokens_B, row_steps_BS)
        return logits_BV, cache, {"ran": ran_BS, "exit_steps": ran_BS.sum(-1, dtype=jnp.int32)}
