"""`Stitched`: two models of different widths joined by a linear stitching map.

    h_b = h_a @ W + c        W float32 [D_a, D_b], c float32 [D_b]

The front part (model a, its program cut to its first `at` steps) runs a's embedding and
those steps; the map carries a's residual [B, T, D_a] into b's residual space [B, T, D_b];
the back part (model b, its program cut to the steps from `resume` on) runs those steps,
then b's final norm and head. Each part walks its own table with the one walker
(`core.walk`): two scans, since one scan carries one width. Built by `dj.depth.stitch`;
`dj.apply`, `dj.eval`, `dj.generate` and `dj.save` / `dj.load` take it like a model.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from ..errors import DepthjaxError
from . import flops as flops_lib
from .model import (
    DepthModel,
    InputError,
    check_inputs,
    count_params,
    default_positions,
    embed,
    output_head,
)
from .walk import run_blocks


class StitchError(DepthjaxError):
    """Models that cannot be stitched, or a stitched model asked for what it cannot do."""


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["front", "back", "W", "c"],
    meta_fields=["at", "resume"],
)
@dataclasses.dataclass(frozen=True)
class Stitched:
    """front: model a with its program cut to steps 0..at-1; back: model b with its program
    cut to steps resume..b.depth-1 (b's per-step parameters cut alike); W [D_a, D_b] and
    c [D_b] float32: the stitching map. `at` and `resume` are the cut points in a's and b's
    original programs (recorded for display and saving)."""

    front: DepthModel
    back: DepthModel
    W: jax.Array
    c: jax.Array
    at: int
    resume: int

    @property
    def parts(self) -> tuple[DepthModel, DepthModel]:
        return self.front, self.back

    @property
    def config(self):
        """b's config (vocabulary, head, causality) with the shorter max_seq_len of the two:
        what evaluation and decoding read of "the model's config"."""
        n = min(self.front.config.max_seq_len, self.back.config.max_seq_len)
        return self.back.config.replace(max_seq_len=n)

    @property
    def depth(self) -> int:
        """Steps run per token: the front's plus the back's."""
        return self.front.depth + self.back.depth

    @property
    def n_params(self) -> int:
        """Values stored: both parts' whole tables (rows outside the cut included) + the map."""
        return self.front.n_params + self.back.n_params + count_params((self.W, self.c))

    def replace(self, **changes) -> Stitched:
        return dataclasses.replace(self, **changes)

    def apply(
        self,
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
        """`dj.apply` of the stitched model: tokens int [B, T] -> logits float32 [B, T, V]
        (output="hidden": b's final hidden states [B, T, D_b]). trace=True is refused: the
        residual streams of the two parts have different widths (trace each part)."""
        if output not in ("logits", "hidden"):
            raise InputError(f"output must be 'logits' or 'hidden', got {output!r}")
        if trace:
            raise StitchError(
                "trace=True: a stitched model has two residual streams of different widths "
                "(D_a, D_b); trace its parts (stitched.front, stitched.back) instead"
            )
        if token_types is not None:
            raise StitchError("a stitched model takes no token_types (decoders only)")
        for part in self.parts:
            check_inputs(part, tokens_BT, mask, None, segment_ids)
        if positions is None:
            positions = default_positions(tokens_BT, segment_ids)
        walk = functools.partial(
            walk_part,
            positions_BT=positions,
            mask_BT=mask,
            segment_ids_BT=segment_ids,
            unroll=unroll,
        )
        x_BTD = walk(self.front, embed(self.front, tokens_BT, positions))
        x_BTD = walk(self.back, self.map(x_BTD))
        return output_head(self.back.config, self.back.params, x_BTD, logits=output == "logits")

    def map(self, x_BTDa):
        """The stitching map on a's residual [..., D_a] -> b's [..., D_b] (float32 matmul)."""
        y = jnp.einsum("...a,ab->...b", x_BTDa.astype(jnp.float32), self.W, precision="highest")
        return (y + self.c).astype(self.back.config.dtype)

    def flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token (core.flops conventions): the front's sublayers, the map
        (2 D_a D_b), the back's sublayers and b's head; a's head is not run."""
        a, b = self.parts
        front = flops_lib.forward_flops_per_token(a.config, seq_len, a.program)
        front -= flops_lib.sublayer_flops_per_token(a.config, seq_len)["head"]
        back = flops_lib.forward_flops_per_token(b.config, seq_len, b.program)
        return front + 2.0 * a.config.d_model * b.config.d_model + back

    def __repr__(self) -> str:
        a, b = self.parts
        return (
            f"Stitched(a: d_model={a.config.d_model} steps 0..{self.at - 1}, "
            f"map {a.config.d_model}->{b.config.d_model}, "
            f"b: d_model={b.config.d_model} steps {self.resume}..{self.resume + b.depth - 1}, "
            f"depth={self.depth}, params={self.n_params:,})"
        )


def walk_part(
    model: DepthModel, x_BTD, *, positions_BT, mask_BT=None, segment_ids_BT=None, unroll=False
):
    """The residual after walking `model`'s whole program from x [B, T, D] (the forward
    walk of `dj.apply`, without embedding or head)."""
    x_BTD, _ = run_blocks(
        model.config,
        model.params["blocks"],
        model.program,
        x_BTD,
        positions_BT,
        step_params=model.params.get("steps"),
        segment_ids_BT=segment_ids_BT,
        kv_mask_BT=mask_BT,
        unroll=unroll,
    )
    return x_BTD


def check(s: Stitched) -> None:
    """Raise StitchError unless the parts and the map fit together (host-side)."""
    a, b = s.parts
    check_parts(a, b)
    want = (a.config.d_model, b.config.d_model)
    if tuple(np.shape(s.W)) != want or tuple(np.shape(s.c)) != want[1:]:
        raise StitchError(
            f"the stitching map is W {tuple(np.shape(s.W))}, c {tuple(np.shape(s.c))}; "
            f"the parts need W {want} and c ({want[1]},)"
        )


def check_parts(a: DepthModel, b: DepthModel) -> None:
    """Raise StitchError unless a and b are decoders with one vocabulary."""
    if not (isinstance(a, DepthModel) and isinstance(b, DepthModel)):
        raise StitchError("a stitched model's parts are DepthModels")
    for name, m in (("a", a), ("b", b)):
        if not m.config.causal:
            raise StitchError(
                f"model {name} is a bidirectional {m.config.family} encoder; stitching "
                "joins decoders (causal language models)"
            )
    if a.config.vocab_size != b.config.vocab_size:
        raise StitchError(
            f"the parts' vocabularies differ ({a.config.vocab_size} vs {b.config.vocab_size} "
            "tokens): a stitched model needs one tokenizer"
        )
