"""DepthModel, init and apply: embeddings, a table of stacked blocks walked by a Program
in one `lax.scan`, and the output head.

Parameters: {"embed": ..., "blocks": every leaf [n_blocks, ...], "head": ...} and
optionally "steps" (per-step parameters, leaves [depth, ...]; see depthjax.core.step_params) and
"final_adapter" (applied to the last residual before the head; see depthjax.pruning.recovery).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ..errors import DepthjaxError
from . import program as program_lib, rows as rows_lib, step_params as steps_lib
from .block import Block
from .config import ModelConfig
from .layers import init_normal, make_norm
from .program import Program, ProgramError
from .walk import run_blocks


class InputError(DepthjaxError):
    """Model inputs (tokens, masks, token types, positions) that do not fit the model."""


def check_ids(ids, size: int, what: str, error=InputError) -> None:
    """Raise `error` unless every id of a concrete array is in 0..size-1 (an id outside the
    vocabulary would silently read a clamped or wrapped embedding row). No-op when traced."""
    if isinstance(ids, jax.core.Tracer):
        return
    a = np.asarray(ids)
    if a.size and (a.min() < 0 or a.max() >= size):
        bad = np.unique(a[(a < 0) | (a >= size)])
        raise error(
            f"{what} hold ids outside the vocabulary 0..{size - 1}: "
            f"{bad[:5].tolist()}{' ...' if bad.size > 5 else ''}"
        )


class Embed(nn.Module):
    """Token (+ learned position, + token type) embeddings, then the optional embed norm.
    Token embeddings are multiplied by `embed_scale` where the family has one (Gemma)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens_BT, positions_BT, token_types_BT=None):
        cfg = self.cfg
        # looked up in float32 (exact for any param_dtype), cast to cfg.dtype at the end
        embed = lambda n, name: nn.Embed(
            n,
            cfg.d_model,
            dtype=jnp.float32,
            param_dtype=cfg.param_dtype,
            embedding_init=init_normal(cfg),
            name=name,
        )
        x_BTD = embed(cfg.vocab_size, "tok")(tokens_BT)
        if cfg.embed_scale is not None:
            x_BTD = x_BTD * jnp.asarray(cfg.embed_scale, x_BTD.dtype)
        if cfg.position == "learned":
            x_BTD = x_BTD + embed(cfg.max_seq_len, "pos")(positions_BT)
        if cfg.type_vocab_size:
            types = jnp.zeros_like(tokens_BT) if token_types_BT is None else token_types_BT
            x_BTD = x_BTD + embed(cfg.type_vocab_size, "type")(types)
        if cfg.embed_norm:
            x_BTD = make_norm(cfg, "norm")(x_BTD)
        return x_BTD.astype(cfg.dtype)


class Head(nn.Module):
    """Final norm, then logits: tied (x @ tok_embedding.T) or an untied `out` projection,
    soft-capped (cap * tanh(logits / cap)) where the family does it (Gemma 2)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTD, tok_embedding_VD=None, *, logits: bool = True):
        cfg = self.cfg
        if cfg.final_norm:
            x_BTD = make_norm(cfg, "norm")(x_BTD)
        if not logits:
            return x_BTD
        if cfg.tie_embeddings:
            out = jnp.einsum(
                "btd,vd->btv",
                x_BTD,
                tok_embedding_VD.astype(cfg.dtype),
                preferred_element_type=jnp.float32,
            )
        else:
            out = nn.Dense(
                cfg.vocab_size,
                use_bias=False,
                dtype=cfg.dtype,
                param_dtype=cfg.param_dtype,
                kernel_init=init_normal(cfg),
                name="out",
            )(x_BTD).astype(jnp.float32)
        if cfg.final_softcap is not None:
            out = cfg.final_softcap * jnp.tanh(out / cfg.final_softcap)
        return out


def count_params(tree) -> int:
    """Number of values in a parameter tree (arrays or jax.ShapeDtypeStruct leaves)."""
    return sum(math.prod(np.shape(x)) for x in jax.tree.leaves(tree))


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=["params", "program"], meta_fields=["config"]
)
@dataclasses.dataclass(frozen=True)
class DepthModel:
    """A config (static), its parameters, and the program that walks the block table."""

    config: ModelConfig
    params: dict
    program: Program

    @property
    def n_blocks(self) -> int:
        """Rows of the block table."""
        return rows_lib.count(self.params["blocks"])

    @property
    def depth(self) -> int:
        """Steps of the program."""
        return self.program.depth

    @property
    def n_params(self) -> int:
        """Parameter values stored (a tied block counts once, per-step parameters count)."""
        return count_params(self.params)

    def replace(self, **changes) -> DepthModel:
        return dataclasses.replace(self, **changes)

    def with_program(self, program: Program) -> DepthModel:
        program_lib.validate(program, self.n_blocks)
        return self.replace(program=program)

    def __repr__(self) -> str:
        return (
            f"DepthModel({self.config.family}, d_model={self.config.d_model}, "
            f"blocks={self.n_blocks}, depth={self.depth}, params={self.n_params:,})\n"
            f"{self.program!r}"
        )

    # `_repr_html_` (notebooks) is attached by depthjax/core/display.py.


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["residual", "attn_out", "mlp_out"],
    meta_fields=[],
)
@dataclasses.dataclass(frozen=True)
class Trace:
    """Per-step activations. residual[i] is the input of step i, residual[i+1] its output.

    residual [depth+1, B, T, D]; attn_out, mlp_out [depth, B, T, D] are the gated updates,
    so for a sequential program residual[i+1] == residual[i] + attn_out[i] + mlp_out[i]
    (plus the step's recovery adapter, if it has one). Inside a parallel group,
    residual[i+1] is the group's input plus the updates of its steps up to i.
    """

    residual: jax.Array
    attn_out: jax.Array
    mlp_out: jax.Array


def init(
    cfg: ModelConfig,
    key: jax.Array,
    program: Program | None = None,
    *,
    param_dtype: str | None = None,
) -> DepthModel:
    """Random parameters for `cfg.n_layers` table rows; the default program is sequential.

    Parameters are created in `cfg.param_dtype` (float32 by default); `param_dtype` (e.g.
    "bfloat16") overrides it and is recorded in the returned model's config. Values are
    drawn in float32 and rounded, so a bfloat16 init equals the float32 init cast.
    """
    if param_dtype is not None:
        cfg = cfg.replace(param_dtype=param_dtype)
    k_embed, k_blocks, k_head = jax.random.split(key, 3)
    tokens = jnp.zeros((1, 1), jnp.int32)
    x = jnp.zeros((1, 1, cfg.d_model), jnp.float32)
    embed = Embed(cfg).init(k_embed, tokens, tokens)["params"]
    init_block = lambda k: Block(cfg).init(k, x, 1.0, 1.0, tokens)["params"]
    blocks = jax.vmap(init_block)(jax.random.split(k_blocks, cfg.n_layers))
    head = Head(cfg).init(k_head, x, embed["tok"]["embedding"])
    params = {"embed": embed, "blocks": blocks, "head": head.get("params", {})}
    program = Program.sequential(cfg.n_layers) if program is None else program
    program_lib.validate(program, cfg.n_layers)
    return DepthModel(cfg, params, program)


def segment_positions(segment_ids_BT):
    """Positions that restart at 0 where a new segment (packed document) begins."""
    T = segment_ids_BT.shape[1]
    idx = jnp.broadcast_to(jnp.arange(T), segment_ids_BT.shape)
    starts = jnp.concatenate(
        [
            jnp.ones_like(segment_ids_BT[:, :1], bool),
            segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1],
        ],
        axis=1,
    )
    return idx - jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)


def default_positions(tokens_BT, segment_ids_BT=None):
    """0..T-1 on every row, restarting at each packed segment when segment ids are given."""
    if segment_ids_BT is not None:
        return segment_positions(segment_ids_BT)
    return jnp.broadcast_to(jnp.arange(tokens_BT.shape[1]), tokens_BT.shape)


def check_inputs(model: DepthModel, tokens_BT, mask_BT, token_types_BT, segment_ids_BT):
    cfg = model.config
    if jnp.ndim(tokens_BT) != 2:
        raise InputError(f"tokens must be [batch, time], got shape {jnp.shape(tokens_BT)}")
    if not jnp.issubdtype(jnp.asarray(tokens_BT).dtype, jnp.integer):
        raise InputError(f"tokens must be integers, got {jnp.asarray(tokens_BT).dtype}")
    check_ids(tokens_BT, cfg.vocab_size, "tokens")
    T = tokens_BT.shape[1]
    if cfg.position == "learned" and T > cfg.max_seq_len:
        raise InputError(f"sequence length {T} exceeds max_seq_len={cfg.max_seq_len}")
    for name, arr in (
        ("mask", mask_BT),
        ("token_types", token_types_BT),
        ("segment_ids", segment_ids_BT),
    ):
        if arr is not None and jnp.shape(arr) != jnp.shape(tokens_BT):
            raise InputError(
                f"{name} shape {jnp.shape(arr)} != tokens shape {jnp.shape(tokens_BT)}"
            )
    if token_types_BT is not None and not cfg.type_vocab_size:
        raise InputError(f"token_types given but the {cfg.family} config has no token types")
    if token_types_BT is not None and not isinstance(token_types_BT, jax.core.Tracer):
        types = np.asarray(token_types_BT)
        if types.size and (types.min() < 0 or types.max() >= cfg.type_vocab_size):
            raise InputError(f"token_types hold values outside 0..{cfg.type_vocab_size - 1}")
    sizes = {leaf.shape[0] for leaf in rows_lib.leading(model.params["blocks"])}
    if sizes != {model.n_blocks}:
        raise ProgramError(f"block table leaves disagree on the number of rows: {sorted(sizes)}")
    if model.program.block.ndim != 1:
        raise ProgramError(
            f"apply takes one program; got a batch {model.program.block.shape} "
            "(vmap over programs instead)"
        )
    program_lib.validate(model.program, model.n_blocks)
    steps_lib.check(model.params.get("steps"), model.program.depth)


def embed(model: DepthModel, tokens_BT, positions_BT, token_types_BT=None):
    """The residual stream's start x0 [B, T, D] (token, position and type embeddings)."""
    params = {"params": model.params["embed"]}
    return Embed(model.config).apply(params, tokens_BT, positions_BT, token_types_BT)


def output_head(cfg: ModelConfig, params: dict, x_BTD, *, logits: bool = True):
    """The last residual [B, T, D] -> logits float32 [B, T, vocab] (or, logits=False, the
    final hidden states after the final norm). Shared by `apply` and decoding."""
    if "final_adapter" in params:  # emulates steps removed after the last one (recover)
        x_BTD = x_BTD + steps_lib.adapter_update(params["final_adapter"], x_BTD)
    tok = params["embed"]["tok"]["embedding"]
    return Head(cfg).apply({"params": params["head"]}, x_BTD, tok, logits=logits)


def apply(
    model: DepthModel,
    tokens_BT,
    *,
    mask=None,
    token_types=None,
    segment_ids=None,
    positions=None,
    trace: bool = False,
    unroll: bool = False,
    output: str = "logits",
):
    """Forward pass. tokens int [B, T] -> logits float32 [B, T, vocab].

    mask [B, T]: 1 for real tokens, 0 for padding (keys that may not be attended to).
    segment_ids [B, T]: packed documents; attention stays within a segment and positions
    restart at each segment unless `positions` is given. output="hidden" returns the final
    hidden states [B, T, D] (after the final norm) instead of logits. With trace=True,
    returns (out, Trace). unroll=True walks the program in Python (same block function).
    """
    if not isinstance(model, DepthModel):
        parts = getattr(model, "apply", None)  # a model of parts (core.stitched) walks each
        if parts is None:
            raise InputError(f"apply takes a DepthModel, got {type(model).__name__}")
        options = dict(mask=mask, token_types=token_types, segment_ids=segment_ids)
        return parts(
            tokens_BT, positions=positions, trace=trace, unroll=unroll, output=output, **options
        )
    if output not in ("logits", "hidden"):
        raise InputError(f"output must be 'logits' or 'hidden', got {output!r}")
    check_inputs(model, tokens_BT, mask, token_types, segment_ids)
    cfg, params = model.config, model.params
    if positions is None:
        positions = default_positions(tokens_BT, segment_ids)
    x0_BTD = embed(model, tokens_BT, positions, token_types)
    x_BTD, ys = run_blocks(
        cfg,
        params["blocks"],
        model.program,
        x0_BTD,
        positions,
        step_params=params.get("steps"),
        segment_ids_BT=segment_ids,
        kv_mask_BT=mask,
        trace=trace,
        unroll=unroll,
    )
    out = output_head(cfg, params, x_BTD, logits=output == "logits")
    if not trace:
        return out
    residual, attn_out, mlp_out = ys
    return out, Trace(jnp.concatenate([x0_BTD[None], residual]), attn_out, mlp_out)
