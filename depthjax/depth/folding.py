"""fold: the same function as a plain sequential table, without per-step state.

A Hugging Face layer has no gates, per-step scales or recovery adapters, so exporting an
edited model needs them inside the weights, where that is exact:

* a sublayer gate g (and a step's scale s) multiplies that sublayer's update, so it goes
  into the weights that write the update: the output projection and its bias (pre-norm,
  GPT-J), or the output norm's scale and bias (peri, out); g = 0 zeroes them;
* a recovery adapter at step i adds bias + x (a b) to the stream x before step i. Its
  bias is what step i - 1's MLP writes last, so it becomes part of that down-projection's
  bias (pre-norm and GPT-J blocks; families without MLP biases get zero biases turned
  on, as Llama's attention_bias / mlp_bias). At step 0 the only writer is the embedding:
  bias and the linear map (I + a b) go into the token (and position / type) embeddings,
  and the head keeps reading the original table (tied embeddings are untied).

The linear part of an adapter at a later step (or of the final adapter) is not foldable:
every earlier writer also feeds the steps in between, which must not see it. Neither is
anything in a post-norm model or behind an output norm. `fold` raises FoldError naming the
adapter, gate or scale.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from ..core import kinds, quant, step_params as steps_lib
from ..core.model import DepthModel
from ..core.program import Program, ProgramError
from ..errors import DepthjaxError

# The leaves that write each sublayer's update, per norm placement (a path prefix in a row).
_WRITERS = {
    "pre": {"attn": ("attn", "o"), "mlp": ("mlp", "down")},
    "peri": {"attn": ("attn_out_norm",), "mlp": ("mlp_out_norm",)},
    "out": {"attn": ("attn_out_norm",), "mlp": ("mlp_out_norm",)},
}
_HIGHEST = jax.lax.Precision.HIGHEST


class FoldError(DepthjaxError):
    """A gate, per-step scale or adapter that cannot be folded into the weights exactly."""


def _placement(cfg) -> str:
    return "pre" if cfg.parallel_block else cfg.norm_placement


def adapters(model: DepthModel) -> list[tuple[int, jax.Array, jax.Array | None]]:
    """(step, bias [D], a @ b [D, D] or None) of every adapter that changes the stream, in
    step order; step == depth is the final adapter (applied before the head)."""
    out = []
    steps = model.params.get("steps") or {}
    found = (
        [(i, jax.tree.map(lambda a, i=i: a[i], steps["adapter"])) for i in range(model.depth)]
        if "adapter" in steps
        else []
    )
    if "final_adapter" in model.params:
        found.append((model.depth, model.params["final_adapter"]))
    for i, adapter in found:
        bias = jnp.asarray(adapter["bias"], jnp.float32)
        ab = None
        if "a" in adapter and np.any(np.asarray(adapter["a"]) @ np.asarray(adapter["b"])):
            ab = jnp.matmul(adapter["a"], adapter["b"], precision=_HIGHEST)
        if ab is not None or np.any(np.asarray(bias)):
            out.append((i, bias, ab))
    return out


def adapter_name(model: DepthModel, step: int) -> str:
    return (
        "the final adapter (params['final_adapter'])"
        if step == model.depth
        else f"the recovery adapter of step {step} (params['steps']['adapter'])"
    )


def check_foldable(model: DepthModel) -> None:
    """Raise FoldError (ProgramError for parallel groups) naming the first gate, scale or
    adapter that `fold` cannot fold exactly."""
    quant.require_float(model.params["blocks"], "fold")
    cfg = model.config
    if np.asarray(model.program.parallel).any():
        raise ProgramError(
            f"steps {np.flatnonzero(np.asarray(model.program.parallel)).tolist()} "
            "run in parallel groups, which a sequential table cannot express"
        )
    if _placement(cfg) == "post":
        factors = _factors(model)
        for name, factor in factors.items():
            bad = np.flatnonzero(factor != 1)
            if bad.size:
                raise FoldError(
                    f"{name} of steps {bad.tolist()} is scaled by "
                    f"{factor[bad].tolist()} (gate x per-step scale); a post-norm "
                    "model normalizes the stream after each sublayer, so no "
                    "weights express that"
                )
    for i, _, ab in adapters(model):
        name = adapter_name(model, i)
        if i == 0:
            if cfg.embed_norm:
                raise FoldError(
                    f"{name} cannot be folded into embeddings that are normalized "
                    "afterwards (embed_norm)"
                )
            continue
        if ab is not None:
            raise FoldError(
                f"{name} has a linear part (a @ b), which no weight of a plain "
                "layer expresses exactly: every earlier writer of the stream also "
                "feeds the steps in between"
            )
        if _placement(cfg) != "pre":
            raise FoldError(
                f"{name}: a {cfg.norm_placement}-norm block writes the stream "
                "through a norm, so no bias can hold the adapter's bias"
            )


def _factors(model: DepthModel) -> dict[str, np.ndarray]:
    """Per-step multiplier of each sublayer's update: its gate times the step's scale."""
    steps = model.params.get("steps") or {}
    scale = np.asarray(steps.get("scale", np.ones(model.depth)), np.float32)
    return {
        "attn": np.asarray(model.program.attn, np.float32) * scale,
        "mlp": np.asarray(model.program.mlp, np.float32) * scale,
    }


class Folded:
    """What `fold` makes, computed one leaf at a time (so an export never holds a second
    copy of a large table): `config`, `embed`, `head`, and `leaf(step, path)` for the
    folded row of each step (path inside a row, e.g. ("attn", "o", "kernel"))."""

    def __init__(self, model: DepthModel):
        check_foldable(model)
        self.model, cfg = model, model.config
        self.block = np.asarray(model.program.block)
        self.factors = _factors(model)
        found = adapters(model)
        self.late_bias = {i - 1: bias for i, bias, _ in found if i > 0}  # step -> down bias
        self.add_biases = bool(self.late_bias) and not cfg.bias
        if self.add_biases:
            cfg = cfg.replace(bias=True, qkv_bias=True)
        steps = model.params.get("steps") or {}
        self.delta = traverse_util.flatten_dict(steps.get("delta", {}))
        self.lora = traverse_util.flatten_dict(steps.get("lora", {}))
        self.table = traverse_util.flatten_dict(model.params["blocks"])
        embed = jax.tree.map(jnp.asarray, model.params["embed"])
        head = dict(model.params["head"])
        for i, bias, ab in found:
            if i > 0:
                continue
            if cfg.tie_embeddings:  # the head keeps reading the original table
                head["out"] = {"kernel": jnp.asarray(embed["tok"]["embedding"]).T}
                cfg = cfg.replace(tie_embeddings=False)
            if ab is not None:
                M = jnp.eye(ab.shape[0], dtype=jnp.float32) + ab
                for kind in ("tok", "pos", "type"):
                    if kind in embed:
                        embed[kind] = {
                            "embedding": jnp.matmul(embed[kind]["embedding"], M, precision=_HIGHEST)
                        }
            es = 1.0 if cfg.embed_scale is None else cfg.embed_scale  # stream = es * tok + ...
            embed["tok"] = {"embedding": embed["tok"]["embedding"] + bias / es}
        self.config = cfg.replace(
            n_layers=model.depth, layer_types=kinds.take(cfg, model.program.block)
        )
        self.embed, self.head = embed, head
        self.paths = list(self.table)
        if self.add_biases:
            self.paths += [p for p in self._bias_paths() if p not in self.table]

    def _bias_paths(self):
        return [("attn", n, "bias") for n in ("q", "k", "v", "o")] + [
            ("mlp", n, "bias") for n in ("gate", "up", "down") if ("mlp", n, "kernel") in self.table
        ]

    def shape(self, path: tuple) -> tuple[int, ...]:
        """Shape of one row's leaf at `path`."""
        if path in self.table:
            return self.table[path].shape[1:]
        return _zero_bias(self.model.config, path).shape

    @functools.cached_property
    def arrays(self) -> dict:
        """Every array a folded leaf reads, as one pytree (`fold_leaf`'s `arrays`). Only
        the factors that are not all 1 and the late biases that exist are in it, so its
        structure says what to fold, and a jitted function of it compiles once per kind of
        model, with no table baked into it as a constant."""
        arrays = {"table": self.table, "delta": self.delta, "lora": self.lora}
        arrays["block"] = self.block
        arrays["factors"] = {k: f for k, f in self.factors.items() if (f != 1).any()}
        if self.late_bias:
            late = np.zeros((self.model.depth, self.model.config.d_model), np.float32)
            for step, bias in self.late_bias.items():
                late[step] = np.asarray(bias, np.float32)
            arrays["late_bias"] = late
        return arrays

    def leaf(self, step: int, path: tuple):
        """The folded leaf at `path` of step `step`."""
        return fold_leaf(self.model.config, self.arrays, step, path)


def _zero_bias(cfg, path):
    heads = {"q": cfg.n_heads, "k": cfg.n_kv_heads, "v": cfg.n_kv_heads}
    if path[1] in heads:
        return jnp.zeros((heads[path[1]], cfg.head_dim), jnp.float32)
    if path[1] in ("o", "down"):
        return jnp.zeros((cfg.d_model,), jnp.float32)
    return jnp.zeros((cfg.d_ff,), jnp.float32)


def fold_leaf(cfg, arrays: dict, step, path: tuple):
    """The folded leaf at `path` of step `step` (an int, or a traced int32) of the model
    with config `cfg` whose arrays are `arrays` (Folded.arrays)."""
    take = lambda stacked, i: jax.lax.dynamic_index_in_dim(stacked, i, keepdims=False)
    table = arrays["table"]
    value = take(table[path], arrays["block"][step]) if path in table else _zero_bias(cfg, path)
    at_step = lambda flat: {
        p: take(flat[p], step) for p in (path, path + ("a",), path + ("b",)) if p in flat
    }
    value = steps_lib.effective_leaf(path, value, at_step(arrays["delta"]), at_step(arrays["lora"]))
    for name, prefix in _WRITERS.get(_placement(cfg), {}).items():
        # x * 1 is exact, so steps whose factor is 1 keep their weights bit for bit
        if path[: len(prefix)] == prefix and name in arrays["factors"]:
            value = value * arrays["factors"][name][step]
    if path == ("mlp", "down", "bias") and "late_bias" in arrays:
        value = value + arrays["late_bias"][step]
    return value


def fold(model: DepthModel) -> DepthModel:
    """`model` as one private table row per step with gates 1 and no params["steps"] or
    "final_adapter": LoRA and deltas, gates, per-step scales and recovery adapters folded
    into the weights (module docstring). Same function; raises FoldError where the math
    does not allow it and ProgramError for parallel programs."""
    f = Folded(model)
    blocks = {p: jnp.stack([f.leaf(i, p) for i in range(model.depth)]) for p in f.paths}
    params = {"embed": f.embed, "blocks": traverse_util.unflatten_dict(blocks), "head": f.head}
    return model.replace(
        config=f.config, params=params, program=Program.create(np.arange(model.depth))
    )
