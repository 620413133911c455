"""Decoding with the step-indexed KV cache against the full forward (dj.apply over the
whole sequence), padding invariance, cache layout, early exit, sampling and errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import depthjax as dj
from depthjax.core.program import ProgramError
from depthjax.inference.sampling import filter_logits, sample
from tests.test_model import _model

TOL = dict(rtol=1e-4, atol=1e-4)
CONFIGS = {
    "llama": dj.configs.get("llama-tiny", n_layers=4),
    "gpt2": dj.configs.get("gpt2-tiny", n_layers=4),
}


def _programs(base):
    """The program shapes decoding must support (all from depthjax.depth)."""
    tied = dj.depth.tie(base, 2)
    return {
        "ordinary": base,
        "looped": dj.depth.repeat(base, [1, 2], 2),
        "attn_dropped": dj.depth.drop_sublayers(base, attn=[1, 3], mlp=[2]),
        "tied_relaxed": dj.depth.relax(tied, base, rank=2),
        "grown": dj.depth.grow(base, 1, init="copy"),
        "parallel": dj.depth.parallelize(base, [[1, 2]], combine="mean"),
    }


def _prompt(B=3, T=6, seed=1):
    """Row 0 full, row 1 left-padded, row 2 right-padded."""
    tokens = np.asarray(jax.random.randint(jax.random.key(seed), (B, T), 0, 256), np.int32)
    mask = np.ones((B, T), bool)
    mask[1, :2] = False
    mask[2, -3:] = False
    return tokens, mask


def _reference_logits(model, tokens, mask, fed):
    """Full forward over prompt + fed tokens; logits [B, 1 + n_fed, V] at each decode point."""
    seq = np.concatenate([tokens, fed], 1)
    full_mask = np.concatenate([mask, np.ones(fed.shape, bool)], 1)
    positions = np.maximum(np.cumsum(full_mask, 1) - 1, 0)
    logits = np.asarray(
        dj.apply(
            model, jnp.asarray(seq), mask=jnp.asarray(full_mask), positions=jnp.asarray(positions)
        )
    )
    T = tokens.shape[1]
    last = T - 1 - np.argmax(mask[:, ::-1], 1)
    first = logits[np.arange(len(seq)), last][:, None]
    return np.concatenate([first, logits[:, T:]], 1)


def _decode_logits(model, tokens, mask, fed, **kw):
    logits, cache = dj.prefill(model, tokens, mask, max_len=tokens.shape[1] + fed.shape[1])
    out = [np.asarray(logits)]
    for i in range(fed.shape[1]):
        logits, cache, _ = dj.decode_step(model, cache, fed[:, i], **kw)
        out.append(np.asarray(logits))
    return np.stack(out, 1), cache


@pytest.mark.parametrize("family", CONFIGS)
@pytest.mark.parametrize(
    "variant", ["ordinary", "looped", "attn_dropped", "tied_relaxed", "grown", "parallel"]
)
def test_incremental_decoding_matches_full_forward(family, variant):
    model = _programs(_model(CONFIGS[family]))[variant]
    tokens, mask = _prompt()
    fed = np.asarray(jax.random.randint(jax.random.key(2), (3, 4), 0, 256), np.int32)
    got, cache = _decode_logits(model, tokens, mask, fed)
    np.testing.assert_allclose(got, _reference_logits(model, tokens, mask, fed), **TOL)
    assert cache.n_slots == int((np.asarray(model.program.attn) != 0).sum())


def test_padding_does_not_change_generation():
    model = _model(CONFIGS["llama"])
    tokens, mask = _prompt()
    batch = dj.generate(model, tokens, 5, mask=mask, temperature=0.0)
    for b in range(len(tokens)):
        alone = dj.generate(model, tokens[b : b + 1, mask[b]], 5, temperature=0.0)
        np.testing.assert_array_equal(batch.tokens[b], alone.tokens[0])
        assert alone.tokens.shape == (1, 5)


def test_greedy_generation_feeds_back_argmax():
    model = _model(CONFIGS["gpt2"])
    tokens, mask = _prompt()
    out = dj.generate(model, tokens, 6, mask=mask, temperature=0.0)
    want = _reference_logits(model, tokens, mask, np.asarray(out.tokens)[:, :-1]).argmax(-1)
    np.testing.assert_array_equal(out.tokens, want)
    np.testing.assert_array_equal(out.lengths, [6, 6, 6])


def test_eos_stops_a_row_and_pads_it():
    model = _model(CONFIGS["llama"])
    tokens, mask = _prompt()
    free = np.asarray(dj.generate(model, tokens, 6, mask=mask, temperature=0.0).tokens)
    eos = int(free[1, 2])  # row 1's third token
    out = dj.generate(model, tokens, 6, mask=mask, temperature=0.0, eos_id=eos)
    for b in range(3):
        hits = np.flatnonzero(free[b] == eos)
        n = hits[0] + 1 if hits.size else 6
        np.testing.assert_array_equal(out.tokens[b, :n], free[b, :n])
        assert (np.asarray(out.tokens[b, n:]) == eos).all() and int(out.lengths[b]) == n


def test_cache_allocates_only_attention_steps():
    model = _model(CONFIGS["llama"])
    tokens, mask = _prompt()
    full = dj.prefill(model, tokens, mask, max_len=16)[1]
    dropped = dj.prefill(dj.depth.drop_sublayers(model, attn=[0, 2]), tokens, mask, max_len=16)[1]
    looped = dj.prefill(dj.depth.repeat(model, [1], 3), tokens, mask, max_len=16)[1]
    assert (full.n_slots, dropped.n_slots, looped.n_slots) == (4, 2, 6)
    assert dropped.steps == (1, 3) and looped.steps == tuple(range(6))
    assert dropped.nbytes * 2 == full.nbytes and looped.nbytes * 4 == full.nbytes * 6
    cfg = model.config
    assert full.nbytes == 2 * 4 * 3 * 16 * cfg.n_kv_heads * cfg.head_dim * 4


def test_exit_at_equals_truncated_model():
    model = _model(CONFIGS["llama"])
    tokens, mask = _prompt()
    fed = np.asarray(jax.random.randint(jax.random.key(3), (3, 3), 0, 256), np.int32)
    truncated = dj.depth.drop(model, [2, 3])
    want = _reference_logits(truncated, tokens, mask, fed)
    # Per call on a cache built with only the first two steps...
    logits, cache = dj.prefill(model, tokens, mask, max_len=9, exit_at=2)
    assert cache.n_slots == 2
    got = [np.asarray(logits)]
    for i in range(3):
        logits, cache, exit_B = dj.decode_step(model, cache, fed[:, i], exit_at=2)
        got.append(np.asarray(logits))
    np.testing.assert_allclose(np.stack(got, 1), want, **TOL)
    np.testing.assert_array_equal(exit_B, [2, 2, 2])
    # ...and as a draft pass on the full model's cache (self-speculative decoding).
    _, cache = dj.prefill(model, tokens, mask, max_len=9)
    draft, _, _ = dj.decode_step(model, cache, fed[:, 0], exit_at=2)
    np.testing.assert_allclose(draft, want[:, 1], **TOL)


@pytest.mark.slow
def test_confidence_exit_picks_first_confident_depth():
    model = _model(CONFIGS["llama"], seed=3)
    tokens, mask = _prompt()
    nxt = np.array([5, 6, 7], np.int32)
    # Independent reference: each candidate depth k is the truncated model's full forward.
    per_k = {
        k: _reference_logits(dj.depth.drop(model, list(range(k, 4))), tokens, mask, nxt[:, None])[
            :, 1
        ]
        for k in (1, 2, 3, 4)
    }
    conf = {k: np.asarray(jax.nn.softmax(v)).max(-1) for k, v in per_k.items()}
    threshold = float(np.median(np.concatenate([conf[1], conf[2]])))
    want_exit = [next((k for k in (1, 2, 3) if conf[k][b] >= threshold), 4) for b in range(3)]
    assert len(set(want_exit)) > 1, "the threshold should split the batch"
    _, cache = dj.prefill(model, tokens, mask, max_len=8)
    logits, _, exit_B = dj.decode_step(model, cache, nxt, exit_threshold=threshold)
    np.testing.assert_array_equal(exit_B, want_exit)
    np.testing.assert_allclose(
        logits, np.stack([per_k[k][b] for b, k in enumerate(want_exit)]), **TOL
    )


@pytest.mark.parametrize("exit_kv", ["skip", pytest.param("propagate", marks=pytest.mark.slow)])
def test_confidence_exit_is_per_sequence(exit_kv):
    """A row's results do not depend on which other rows exited (batch vs alone)."""
    model = _model(CONFIGS["llama"], seed=3)
    tokens, mask = _prompt()
    # A threshold between the rows' confidences after step 1 (next token after the prompt).
    last = np.asarray(dj.apply(dj.depth.drop(model, [1, 2, 3]), jnp.asarray(tokens[:1])))[0, -1]
    threshold = float(np.asarray(jax.nn.softmax(last)).max()) * 0.999
    kw = dict(temperature=0.0, exit_threshold=threshold, exit_steps=[1, 2], exit_kv=exit_kv)
    batch = dj.generate(model, tokens, 6, mask=mask, **kw)
    exits = np.asarray(batch.exit_steps)
    assert len(np.unique(exits)) > 1, f"expected mixed exits, got {exits}"
    for b in range(3):
        alone = dj.generate(model, tokens[b : b + 1, mask[b]], 6, **kw)
        np.testing.assert_array_equal(alone.tokens[0], batch.tokens[b])
        np.testing.assert_array_equal(alone.exit_steps[0], exits[b])


def test_threshold_one_never_exits():
    model = _model(CONFIGS["gpt2"])
    tokens, mask = _prompt()
    plain = dj.generate(model, tokens, 4, mask=mask, temperature=0.0)
    never = dj.generate(model, tokens, 4, mask=mask, temperature=0.0, exit_threshold=1.0)
    np.testing.assert_array_equal(plain.tokens, never.tokens)
    assert (np.asarray(never.exit_steps) == 4).all()


# ---------------------------------------------------------------- sampling
def _naive_filter(logits, top_k, top_p):
    out = logits.astype(np.float64).copy()
    for row in out:
        order = np.argsort(-row, kind="stable")
        keep = np.ones(len(row), bool)
        if top_k is not None:  # then top-p renormalizes over the top-k survivors
            keep &= row >= row[order[top_k - 1]]
            row[~keep] = -np.inf
        if top_p is not None:
            p = np.exp(row - row.max())
            p /= p.sum()
            mass, kept = 0.0, set()
            for i in order:
                kept.add(i)
                mass += p[i]
                if mass >= top_p:
                    break
            cut = min(row[i] for i in kept)
            keep &= row >= cut
        row[~keep] = -np.inf
    return out


@pytest.mark.parametrize("top_k,top_p", [(5, None), (None, 0.5), (8, 0.3), (None, 1.0), (1, None)])
def test_filter_logits_matches_naive(top_k, top_p):
    logits = np.asarray(jax.random.normal(jax.random.key(0), (4, 40)) * 2, np.float32)
    got = np.asarray(filter_logits(jnp.asarray(logits), top_k=top_k, top_p=top_p))
    want = _naive_filter(logits, top_k, top_p)
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
    np.testing.assert_allclose(got[~np.isinf(got)], want[~np.isinf(want)], rtol=1e-6)


def test_sampling_frequencies_follow_tempered_softmax():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    n = 20000
    draws = jax.vmap(lambda k: sample(logits, k, temperature=2.0, top_k=3))(
        jax.random.split(jax.random.key(0), n)
    )[:, 0]
    p = np.array([0.5, 0.3, 0.15]) ** 0.5
    p /= p.sum()
    freq = np.bincount(np.asarray(draws), minlength=4) / n
    assert freq[3] == 0
    np.testing.assert_allclose(freq[:3], p, atol=0.015)


# ---------------------------------------------------------------- bad input
def test_errors_name_the_problem():
    model = _model(CONFIGS["llama"])
    tokens, mask = _prompt()
    with pytest.raises(ValueError, match="causal"):
        dj.generate(_model(dj.configs.get("bert-tiny")), tokens, 2, temperature=0.0)
    with pytest.raises(ValueError, match="no real token"):
        dj.generate(model, tokens, 2, mask=np.zeros_like(mask), temperature=0.0)
    with pytest.raises(ValueError, match="PRNG key"):
        dj.generate(model, tokens, 2, temperature=0.7)
    with pytest.raises(ValueError, match="exit_at=9"):
        dj.generate(model, tokens, 2, temperature=0.0, exit_at=9)
    with pytest.raises(ProgramError, match="parallel group"):
        dj.generate(dj.depth.parallelize(model, [[1, 2]]), tokens, 2, temperature=0.0, exit_at=2)
    with pytest.raises(ValueError, match="max_seq_len"):
        dj.generate(_model(CONFIGS["gpt2"]), tokens, 2000, temperature=0.0)
    _, cache = dj.prefill(model, tokens, mask, max_len=7)
    with pytest.raises(ProgramError, match="attention steps"):
        dj.decode_step(dj.depth.drop_sublayers(model, attn=[1]), cache, tokens[:, 0])
    with pytest.raises(ValueError, match="covers 2 steps"):
        dj.decode_step(
            model, dj.prefill(model, tokens, mask, max_len=7, exit_at=2)[1], tokens[:, 0]
        )
    with pytest.raises(ValueError, match=r"int tokens \[3\]"):
        dj.decode_step(model, cache, tokens[:2, 0])
    _, cache, _ = dj.decode_step(model, cache, tokens[:, 0])
    with pytest.raises(ValueError, match="cache is full"):
        dj.decode_step(model, cache, tokens[:, 0])
    with pytest.raises(ValueError, match="top_p"):
        filter_logits(jnp.zeros((1, 4)), top_p=0.0)


# ---------------------------------------------------------------- CLI
def test_cli_generates_from_native_and_hf_directories(tmp_path, capsys):
    from depthjax.cli import main

    model = _model(CONFIGS["llama"])
    dj.save(model, tmp_path / "native")
    dj.hf.save(model, str(tmp_path / "hf"))
    prompt = "def f(x):"
    ids = np.frombuffer(prompt.encode(), np.uint8).astype(np.int32)[None]
    want = bytes(
        np.asarray(dj.generate(model, ids, 8, temperature=0.0).tokens[0], np.uint8)
    ).decode("utf-8", errors="replace")
    for d, extra in (("native", []), ("hf", []), ("native", ["--draft", "2"])):
        assert (
            main(
                [
                    "generate",
                    "--model",
                    str(tmp_path / d),
                    "--prompt",
                    prompt,
                    "--max-new-tokens",
                    "8",
                    *extra,
                ]
            )
            == 0
        )
        out = capsys.readouterr()
        assert out.out.splitlines()[-1] == (prompt + want).splitlines()[-1]
        assert ("self-speculative: draft 2 steps" in out.err) == bool(extra)
    assert (
        main(["generate", "--model", str(tmp_path / "native"), "--prompt", "x", "--draft", "9"])
        == 2
    )
    assert "draft=9" in capsys.readouterr().err
    assert main(["generate", "--model", str(tmp_path), "--prompt", "x"]) == 2
    assert "neither a depthjax checkpoint" in capsys.readouterr().err
