"""The log-likelihood engine every task shares: (context, continuation) token requests ->
the continuation's summed log-probability and whether it is the greedy decode, for a batch
of programs, batched, padded and jitted on device.

Requests are sorted longest first, grouped into batches of `batch_size` rows and
right-padded to a length bucket (8 per power of two), so a task compiles a few times; every
program of one depth goes through that same compiled function (programs are data), with
`lax.map` walking the stacked programs in chunks. Right padding needs no attention mask:
a causal model's real positions never see the padding after them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ..core import program as program_lib
from ..core.model import DepthModel, apply
from ..core.program import Program, ProgramError
from ..core.stitched import Stitched
from ..errors import DepthjaxError
from ..metrics.strategies import Reduction, evaluate
from ..progress import track


class EvalError(DepthjaxError):
    """An evaluation that cannot run as asked (a model, tokenizer or request that does not fit)."""


class Request(NamedTuple):
    context: np.ndarray  # int32 [Tc], Tc >= 1: conditioning tokens
    continuation: np.ndarray  # int32 [Tn], Tn >= 1: the tokens scored


# -- tokenizers and programs -------------------------------------------------------------
def resolve_tokenizer(model: DepthModel, tokenizer=None):
    """An object with encode/decode: `tokenizer` itself, 'byte', a tokenizer.json or a model
    directory holding one; None means bytes, for a 256-token vocabulary only."""
    from ..files.tokenizer import ByteTokenizer, load_tokenizer, tokenizer_for

    vocab = model.config.vocab_size
    if tokenizer is None:
        if vocab != 256:
            raise EvalError(
                f"the model's vocabulary has {vocab} tokens, not 256 bytes: pass "
                "tokenizer= (a tokenizer.json, a model directory or an object "
                "with encode/decode)"
            )
        return ByteTokenizer()
    if isinstance(tokenizer, (str, Path)):
        return (
            tokenizer_for(tokenizer, vocab)
            if Path(tokenizer).is_dir()
            else load_tokenizer(str(tokenizer))
        )
    if not (hasattr(tokenizer, "encode") and hasattr(tokenizer, "decode")):
        raise EvalError(f"tokenizer {tokenizer!r} has no encode/decode")
    return tokenizer


def encode_pair(tokenizer, context: str, continuation: str) -> Request:
    """Tokens of (context, continuation) as lm-eval splits them: trailing whitespace of the
    context moves to the continuation, the pair is encoded whole, and the continuation is
    what follows the context's own tokens."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    ctx = np.asarray(tokenizer.encode(context), np.int32)
    whole = np.asarray(tokenizer.encode(context + continuation), np.int32)
    return Request(ctx, whole[len(ctx) :])


def stack_programs(model: DepthModel, programs) -> tuple[Program, bool]:
    """(programs [K, depth], whether the caller gave a batch). None is the model's own
    program; a Program is one (1-d) or a batch ([K, depth]); a sequence of Programs or
    DepthModels (sharing the model's table) is stacked. A stitched model runs its parts'
    own programs: (None, False)."""
    if isinstance(model, Stitched):
        if programs is not None:
            raise EvalError(
                "programs= walks one table; a stitched model (dj.depth.stitch) runs its "
                "two parts' own programs: evaluate it without programs="
            )
        return None, False
    if programs is None:
        programs, batched = model.program, False
    elif isinstance(programs, Program):
        batched = programs.block.ndim == 2
    else:
        items = [p.program if isinstance(p, DepthModel) else p for p in programs]
        if not items or not all(isinstance(p, Program) and p.block.ndim == 1 for p in items):
            raise ProgramError(
                "programs must be a Program, a [K, depth] batch of them, or a "
                "non-empty sequence of 1-d Programs"
            )
        depths = sorted({p.depth for p in items})
        if len(depths) > 1:
            raise ProgramError(
                f"programs of different depths {depths} cannot share one "
                "compiled call; evaluate each depth separately"
            )
        programs, batched = jax.tree.map(lambda *a: jnp.stack(a), *items), True
    if programs.block.ndim == 1:
        programs = jax.tree.map(lambda a: a[None], programs)
    if programs.block.ndim != 2:
        raise ProgramError(f"programs must be [K, depth], got block {programs.block.shape}")
    program_lib.validate(programs, model.n_blocks)
    steps = model.params.get("steps")
    if steps and programs.depth != model.depth:
        raise ProgramError(
            f"the model has per-step parameters for {model.depth} steps; "
            f"programs of depth {programs.depth} cannot use them"
        )
    return programs, batched


def require_causal(model: DepthModel, what: str) -> None:
    if not model.config.causal:
        raise EvalError(
            f"{what} needs next-token probabilities, which a bidirectional "
            f"{model.config.family} encoder does not define; use "
            "depthjax.eval.similarity"
        )


# -- the engine --------------------------------------------------------------------------
def _bucket(n: int, cap: int) -> int:
    """Padded length, at most `cap`: n rounded up to 8 steps per power of two (at least 8),
    so padding wastes under 1/8 of a batch and a task compiles for few lengths."""
    step = max(8, 1 << max(0, (n - 1).bit_length() - 3))
    return min(cap, -(-n // step) * step)


def _token_scores(logits_BTV, targets_BT, on_BT):
    """([B] summed log-probabilities of the targets where on, [B] all of them greedy)."""
    logp_BT = -optax.softmax_cross_entropy_with_integer_labels(logits_BTV, targets_BT)
    greedy_BT = jnp.argmax(logits_BTV, axis=-1) == targets_BT
    return jnp.sum(jnp.where(on_BT, logp_BT, 0.0), axis=1), jnp.all(greedy_BT | ~on_BT, axis=1)


def _request_scores(logits_BTV, full, tokens_BT, mask_BT, aux):
    """The reduction of each program's logits: `_token_scores` of (targets, weights) aux."""
    targets_BT, weights_BT = aux
    return _token_scores(logits_BTV, targets_BT, weights_BT > 0)


REQUEST_SCORES = Reduction(_request_scores, "logits")


@jax.jit
def _stitched_scores(model: Stitched, tokens_BT, targets_BT, weights_BT):
    """The request scores of a stitched model, with K = 1."""
    s, g = _token_scores(apply(model, tokens_BT), targets_BT, weights_BT > 0)
    return s[None], g[None]


def loglikelihoods(
    model: DepthModel,
    requests: Sequence[Request],
    *,
    programs=None,
    batch_size: int = 32,
    max_len: int | None = None,
    description: str = "loglikelihood",
    strategy: str = "auto",
) -> tuple[np.ndarray, np.ndarray]:
    """Summed log p(continuation | context) [K, N] (float64) and whether every continuation
    token is the argmax [K, N], for K programs (see `stack_programs`; K = 1 for None).
    `model` may be a stitched model (dj.depth.stitch; programs=None).

    A request longer than max_len + 1 tokens (default: the config's max_seq_len) loses
    context from the left, as lm-eval truncates; a continuation must fit in max_len.
    strategy: how the programs are evaluated (depthjax.metrics.strategies; "auto" picks
    the prefix strategy for programs that share a prefix with the model's own, e.g.
    ablations, where it computes fewer FLOPs).
    """
    require_causal(model, "log-likelihood scoring")
    programs, _ = stack_programs(model, programs)
    max_len = max_len or model.config.max_seq_len
    rows = []
    for i, (ctx, cont) in enumerate(requests):
        ctx, cont = np.asarray(ctx, np.int32).reshape(-1), np.asarray(cont, np.int32).reshape(-1)
        if not ctx.size or not cont.size:
            raise EvalError(
                f"request {i}: context and continuation need at least one token "
                f"each (got {ctx.size} and {cont.size})"
            )
        if cont.size > max_len:
            raise EvalError(
                f"request {i}: its continuation has {cont.size} tokens, more than "
                f"the {max_len} positions of one window"
            )
        seq = np.concatenate([ctx, cont])[-(max_len + 1) :]
        if seq.max() >= model.config.vocab_size or seq.min() < 0:
            raise EvalError(
                f"request {i}: token ids outside the vocabulary (0..{model.config.vocab_size - 1})"
            )
        rows.append((seq, cont.size))
    N, K = len(rows), 1 if programs is None else programs.block.shape[0]
    ll, greedy = np.zeros((K, N)), np.zeros((K, N), bool)
    if not N:
        return ll, greedy
    order = sorted(range(N), key=lambda i: -len(rows[i][0]))
    B = min(batch_size, 1 << (N - 1).bit_length())
    groups = [order[s : s + B] for s in range(0, N, B)]
    for group in track(groups, description):
        T = _bucket(max(len(rows[i][0]) - 1 for i in group), max_len)
        tokens, targets = np.zeros((B, T), np.int32), np.zeros((B, T), np.int32)
        weights = np.zeros((B, T), np.float32)
        for r, i in enumerate(group):
            seq, n = rows[i]
            L = len(seq) - 1
            tokens[r, :L], targets[r, :L] = seq[:-1], seq[1:]
            weights[r, L - n : L] = 1.0
        if programs is None:  # a stitched model
            s, g = _stitched_scores(model, tokens, targets, weights)
        else:
            s, g = evaluate(
                model, programs, tokens, None, REQUEST_SCORES, (targets, weights), strategy=strategy
            )
        ll[:, group], greedy[:, group] = (
            np.asarray(s)[:, : len(group)],
            np.asarray(g)[:, : len(group)],
        )
    return ll, greedy


def rolling_requests(
    ids, max_len: int, *, context_len: int = 1, prefix_token: int | None = None
) -> list[Request]:
    """Disjoint windows that score every token of a document once, as lm-eval's
    loglikelihood_rolling does: the first window predicts its tokens from `prefix_token`
    (None: the document's first token is context only, as in training); each later window
    predicts up to max_len - context_len + 1 new tokens, reading the max_len tokens before
    its last one."""
    ids = np.asarray(ids, np.int32).reshape(-1)
    if not 1 <= context_len <= max_len:
        raise EvalError(f"context_len must be in 1..{max_len}, got {context_len}")
    if prefix_token is None:
        prefix, ids = ids[:1], ids[1:]
    else:
        prefix = np.asarray([prefix_token], np.int32)
    out, done = [], 0
    if ids.size:
        first = min(max_len, ids.size)
        out.append(Request(prefix, ids[:first]))
        done = first
    pred_len = max_len - context_len + 1
    while done < ids.size:
        n = min(ids.size - done, pred_len)
        end = done + n
        window = ids[end - max_len - 1 : end - 1]  # the window's input tokens
        out.append(Request(window[: len(window) - n + 1], ids[end - n : end]))
        done = end
    return out
