"""Per-row attention kinds (sliding window, local RoPE base) against the naive forward.

Every depth transform of a Gemma-3-style model (mixed global / local rows with their own
RoPE bases) must leave each step running with the window and RoPE table of the source
row it came from, and compute the naive forward of the equivalent program of source rows
(tests/reference.py masks each row by its own window and rotates by its own base). A
windowed model also decodes through the KV cache to the full forward's logits past the
window, with padded rows."""

import warnings

import jax
import numpy as np
import pytest

import depthjax as dj
import depthjax.depth as D
from depthjax.core import kinds
from tests import reference
from tests.test_model import _model

TOL = dict(rtol=1e-5, atol=1e-5)
TOKENS = np.random.default_rng(4).integers(0, 256, (2, 12)).astype(np.int32)  # T > window
# gemma3-tiny's "LLG" pattern over 6 rows: LLGLLG, windows of 4, local RoPE base 1e4.
SOURCE = _model(dj.configs.get("gemma3-tiny", n_layers=6, sliding_window=4), seed=5)
_forward = jax.jit(dj.apply)
_relax_full = jax.jit(lambda model, original: D.relax(model, original, rank="full"))


def _steps(rows, attn=None, mlp=None):
    """reference.forward groups for running source rows `rows` (with gates) in sequence."""
    attn = [1.0] * len(rows) if attn is None else attn
    mlp = [1.0] * len(rows) if mlp is None else mlp
    return [[(int(r), float(a), float(m))] for r, a, m in zip(rows, attn, mlp)]


def _check(result, source_rows, attn=None, mlp=None):
    """Step i of `result` runs with the kind of SOURCE row source_rows[i] and the whole
    model equals the naive forward of SOURCE over those rows."""
    cfg, block = result.config, np.asarray(result.program.block)
    assert cfg.n_layers == result.n_blocks
    assert (cfg.rope_theta, cfg.local_rope_theta, cfg.sliding_window) == (1e6, 1e4, 4)
    for of in (kinds.row_windows, kinds.row_rope_tables):
        np.testing.assert_array_equal(of(cfg)[block], of(SOURCE.config)[np.asarray(source_rows)])
    want = reference.forward(SOURCE, TOKENS, _steps(source_rows, attn, mlp))
    np.testing.assert_allclose(_forward(result, TOKENS), want, **TOL)


def test_the_reference_sees_each_rows_window_and_rope_base():
    """The source model is the naive forward, and that forward differs once any row's
    window or RoPE base is changed (so the checks below can fail)."""
    got = _forward(SOURCE, TOKENS)
    np.testing.assert_allclose(got, reference.forward(SOURCE, TOKENS, _steps(range(6))), **TOL)
    for change in (dict(layer_types="LLGLGG"), dict(local_rope_theta=None)):
        other = SOURCE.replace(config=SOURCE.config.replace(**change))
        assert not np.allclose(got, reference.forward(other, TOKENS, _steps(range(6))), atol=1e-3)


# name -> (transform of SOURCE, the source row each step runs, gates of the steps)
TRANSFORMS = {
    "drop": (lambda m: D.drop(m, [1, 4]), [0, 2, 3, 5], None),
    "loop": (lambda m: D.repeat(m, [1, 2], 2), [0, 1, 2, 1, 2, 3, 4, 5], None),
    "reorder": (lambda m: D.reorder(m, [5, 0, 2, 2, 1]), [5, 0, 2, 2, 1], None),
    # cycle over rows 0, 1, 2 ("lower" init): every step keeps its kind
    "tie": (lambda m: D.tie(m, 3, init="lower"), [0, 1, 2, 0, 1, 2], None),
    # jitted: one compile instead of an eager SVD per kernel
    "relax": (lambda m: _relax_full(D.tie(m, 3, init="lower"), m), range(6), None),
    # rows 1, 2, 4, 5 renumbered 0..3: layer_types LLGLLG -> LGLG
    "compact": (lambda m: D.compact(D.drop(m, [0, 3])), [1, 2, 4, 5], None),
    "grow": (lambda m: D.grow(m, 2, init="copy"), [0, 1, 2, 2, 3, 4, 5], None),
    "materialize": (lambda m: D.materialize(D.reorder(m, [3, 2, 2, 0])), [3, 2, 2, 0], None),
    "fold": (
        lambda m: D.fold(
            m.with_program(dj.Program.create([2, 0, 2, 5], attn=[1, 0.5, 1, 1], mlp=[1, 2, 1, 0.5]))
        ),
        [2, 0, 2, 5],
        ([1, 0.5, 1, 1], [1, 2, 1, 0.5]),
    ),
}


@pytest.mark.parametrize("name", TRANSFORMS)
def test_depth_transforms_keep_each_rows_window_and_rope_base(name):
    transform, rows, gates = TRANSFORMS[name]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # none of these changes a step's kind: no warning
        result = transform(SOURCE)
    _check(result, list(rows), *(gates or ()))
    if name == "compact":
        assert result.config.layer_types == "LGLG"
    if name == "grow":  # the new row is a copy of global row 2
        assert result.config.layer_types == "LLGLLGG"


def test_tie_rows_keep_the_kind_of_the_step_their_weights_come_from():
    """stepwise K=2 shares the weights of steps 0 and 3 (both local): the global steps 2
    and 5 now run a local row, and the warning names them."""
    with pytest.warns(UserWarning, match=r"steps \[2, 5\] now run a shared row"):
        tied = D.tie(SOURCE, 2)
    assert tied.config.layer_types == "LL"
    _check(tied, [0, 3, 0, 3, 0, 3])


# ------------------------------------------------------------------ windowed decoding
# jitted (one compile per sequence length instead of one per op and shape)
_naive = jax.jit(lambda m, t: reference.forward(m, t, _steps(range(m.config.n_layers))))


def test_windowed_forward_and_cached_decoding_match_the_naive_forward():
    """Gemma 2 (local / global rows, soft-capping) over 20 tokens > window 8: the full
    forward equals the naive one, and decoding token by token through the KV cache (a
    full, a left-padded and a right-padded prompt row) gives each row the naive logits of
    its real tokens at every position."""
    model = _model(dj.configs.get("gemma2-tiny"), seed=2)
    assert model.config.sliding_window == 8 and model.config.layer_types == "LGLG"
    seq = np.random.default_rng(7).integers(0, 256, (3, 20)).astype(np.int32)
    naive = np.asarray(_naive(model, seq))
    np.testing.assert_allclose(_forward(model, seq), naive, rtol=2e-5, atol=2e-5)
    P = 6  # prompt columns; row 1 is left-padded by 2, row 2 right-padded by 2
    prompt, mask = seq[:, :P].copy(), np.ones((3, P), bool)
    mask[1, :2] = mask[2, -2:] = False
    fed = seq[:, P:]  # 14 tokens, positions up to 17 or 19: past the window
    # rows 1 and 2 have 4 + 14 real tokens; row 0's are seq[0]
    short = np.asarray(_naive(model, np.stack([np.r_[prompt[b, mask[b]], fed[b]] for b in (1, 2)])))
    want = np.stack([naive[0, P - 1 :], short[0, 3:], short[1, 3:]])
    logits, cache = dj.prefill(model, prompt, mask, max_len=P + fed.shape[1])
    got = [np.asarray(logits)]
    for i in range(fed.shape[1]):
        logits, cache, _ = dj.decode_step(model, cache, fed[:, i])
        got.append(np.asarray(logits))
    np.testing.assert_allclose(np.stack(got, 1), want, rtol=1e-4, atol=1e-4)


def test_relax_says_when_full_rank_cannot_reproduce_a_changed_kind():
    """Tying steps 2 and 5 (global) to local rows: full-rank LoRA restores the weights but
    not the window, so relax warns naming those steps, and the result differs from the
    original by exactly what the warning says."""
    with pytest.warns(UserWarning, match=r"steps \[2, 5\] now run"):
        tied = D.tie(SOURCE, 2)
    with pytest.warns(UserWarning, match=r"relax: steps \[2, 5\] run a row of another"):
        relaxed = D.relax(tied, SOURCE, rank="full")
    # the original weights with the tied rows' kinds: rows 2 and 5 local
    want = SOURCE.replace(config=SOURCE.config.replace(layer_types="LLLLLL"))
    want = reference.forward(want, TOKENS, _steps(range(6)))
    np.testing.assert_allclose(_forward(relaxed, TOKENS), want, **TOL)
