"""Self-speculative decoding against references: greedy output equals plain greedy decoding
token for token (padded batches whose rows accept different numbers of drafts, looped and
attention-dropped programs, a draft with steps of its own, eos), the cache it leaves equals
plain decoding's, the sampled output follows the full model's exact sequence distribution
(computed by enumerating a 4-token vocabulary), and bad settings are named."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

import depthjax as dj
from depthjax.core.program import ProgramError
from depthjax.inference.sampling import GenerationError, filter_logits
from depthjax.inference.speculative import shared_prefix
from tests.test_generate import CONFIGS, _prompt
from tests.test_model import _model

N = 9  # new tokens: with draft_tokens=3, several rounds of different acceptance


def _variants():
    base = _model(CONFIGS["llama"], seed=3)
    looped = dj.depth.repeat(dj.depth.drop_sublayers(base, attn=[1]), [1, 2], 2)  # depth 6
    parallel = dj.depth.parallelize(base, [[1, 2]])
    return {
        # (full model, draft, eos): the first k steps, on plain and looped/attention-dropped
        # programs; on a parallel program, a draft with steps of its own (it shares step 0
        # only: its steps past the prefix keep their own cache).
        "prefix k=2": (base, 2, None),
        "looped attn-dropped k=3": (looped, 3, "row1"),
        "parallel, own steps": (parallel, dj.depth.drop(parallel, [1]), None),
    }


@pytest.fixture(scope="module")
def variants():
    return _variants()


@pytest.mark.parametrize(
    "name",
    [
        "prefix k=2",
        pytest.param("looped attn-dropped k=3", marks=pytest.mark.slow),
        "parallel, own steps",
    ],
)
def test_greedy_speculative_equals_greedy(variants, name):
    model, draft, eos = variants[name]
    tokens, mask = _prompt()
    plain = dj.generate(model, tokens, N, mask=mask, temperature=0.0)
    if eos == "row1":  # stop row 1 at its 4th token; the others run on
        eos = int(plain.tokens[1, 3])
        plain = dj.generate(model, tokens, N, mask=mask, temperature=0.0, eos_id=eos)
    spec = dj.generate(
        model, tokens, N, mask=mask, temperature=0.0, eos_id=eos, draft=draft, draft_tokens=3
    )
    np.testing.assert_array_equal(spec.tokens, plain.tokens)
    np.testing.assert_array_equal(spec.lengths, plain.lengths)
    st = spec.draft
    assert (np.asarray(st.drafted) == 3 * np.asarray(st.rounds)).all()
    assert (np.asarray(st.accepted) <= np.asarray(st.drafted)).all()
    # Every round emits accepted + 1 tokens (the first token comes from the prefill).
    assert (np.asarray(st.rounds) + np.asarray(st.accepted) >= np.asarray(spec.lengths) - 1).all()
    if eos is None:
        # The cache it leaves holds exactly plain decoding's keys and values: the draft wrote
        # the shared steps' entries of every accepted token, verification the rest.
        valid = np.asarray(plain.cache.valid)
        S = valid.shape[-1]
        assert spec.cache.steps == plain.cache.steps
        np.testing.assert_array_equal(np.asarray(spec.cache.valid)[..., :S], valid)
        for a, b in ((spec.cache.k, plain.cache.k), (spec.cache.v, plain.cache.v)):
            np.testing.assert_allclose(
                np.asarray(a)[:, :, :S][valid], np.asarray(b)[valid], atol=1e-5
            )


def test_rows_accept_different_numbers_of_drafts(variants):
    model, _, _ = variants["prefix k=2"]
    tokens, mask = _prompt()
    spec = dj.generate(model, tokens, N, mask=mask, temperature=0.0, draft=2, draft_tokens=3)
    assert len(set(np.asarray(spec.draft.rounds).tolist())) > 1, spec.draft
    assert 0 < spec.draft.acceptance < 1


def test_shared_prefix_is_the_common_prefix_cut_to_a_group_boundary(variants):
    m = variants["prefix k=2"][0]
    D = dj.depth
    assert shared_prefix(m, D.drop(m, [2, 3])) == 2
    assert shared_prefix(m, D.drop(m, [1])) == 1
    assert shared_prefix(m, D.drop_sublayers(m, attn=[3])) == 3
    # Steps 0-1 agree, but residual[2] is inside the full program's parallel group {1, 2}.
    assert shared_prefix(D.parallelize(m, [[1, 2]]), D.drop(m, [3])) == 1
    # Per-step parameters count: a step whose own scale differs is not shared.
    scaled = m.replace(params={**m.params, "steps": {"scale": jnp.ones(4)}})
    other = scaled.replace(params={**m.params, "steps": {"scale": jnp.array([1, 1, 2, 1.0])}})
    assert shared_prefix(scaled, other) == 2
    assert shared_prefix(scaled, D.drop(scaled, [3])) == 3
    assert shared_prefix(scaled, D.drop(m, [3])) == 0  # params["steps"] only on one side


# ---------------------------------------------------------------- sampled: exact distribution
V, NEW, PROMPT = 4, 4, [1, 2]


def _sequence_probs(model, temperature, top_k):
    """The exact probability of every NEW-token continuation (V**NEW of them) under
    `model`'s sampling distribution, from one full forward over all of them."""
    seqs = np.array(list(itertools.product(range(V), repeat=NEW)), np.int32)
    full = np.concatenate([np.tile(PROMPT, (len(seqs), 1)), seqs], 1)
    logits = dj.apply(model, jnp.asarray(full))[:, len(PROMPT) - 1 : -1]  # predicts seqs
    flat = filter_logits(logits.reshape(-1, V) / temperature, top_k=top_k)
    logp = np.asarray(jax.nn.log_softmax(flat, -1)).reshape(len(seqs), NEW, V)
    return np.exp(np.take_along_axis(logp, seqs[..., None], -1)[..., 0].sum(1))


def _chi2_pvalue(counts, probs):
    probs = np.asarray(probs, np.float64)
    expected = probs / probs.sum() * counts.sum()
    big = expected >= 5  # pool the rare cells
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    return stats.chisquare(obs, exp).pvalue


@pytest.mark.slow
def test_sampled_speculative_follows_the_full_model_exactly():
    cfg = dj.configs.get("llama-tiny", n_layers=4, vocab_size=V, d_model=32, init_std=0.4)
    model = _model(cfg, seed=7)
    temperature, top_k, k, rows = 0.8, 3, 2, 20000
    full_p = _sequence_probs(model, temperature, top_k)
    draft_p = _sequence_probs(dj.depth.drop(model, [2, 3]), temperature, top_k)
    assert abs(full_p.sum() - 1) < 1e-5
    tv = 0.5 * np.abs(full_p - draft_p).sum()
    assert tv > 0.2, f"the draft should differ from the full model (TV {tv:.3f})"
    out = dj.generate(
        model,
        np.tile(PROMPT, (rows, 1)).astype(np.int32),
        NEW,
        draft=k,
        draft_tokens=2,
        temperature=temperature,
        top_k=top_k,
        key=jax.random.key(0),
    )
    assert 0.1 < out.draft.acceptance < 0.95, out.draft.acceptance  # both branches exercised
    index = np.asarray(out.tokens) @ (V ** np.arange(NEW)[::-1])
    counts = np.bincount(index, minlength=V**NEW)
    # Fixed seeds: a deterministic test. The full model's distribution fits (p > 1e-3), the
    # draft's, 0.2+ away in total variation, is rejected by the same statistic.
    assert _chi2_pvalue(counts, full_p) > 1e-3
    assert _chi2_pvalue(counts, draft_p) < 1e-12
    np.testing.assert_allclose(counts / rows, full_p, atol=0.015)


# ---------------------------------------------------------------- bad settings
def test_bad_settings_name_the_problem(variants):
    model, _, _ = variants["prefix k=2"]
    tokens, mask = _prompt()
    gen = lambda **kw: dj.generate(model, tokens, 4, mask=mask, temperature=0.0, **kw)
    for k in (0, -1, 4, 9):
        with pytest.raises(GenerationError, match=rf"draft={k}: .*1 <= k <= 3"):
            gen(draft=k)
    for n in (0, -2, 1.5):
        with pytest.raises(GenerationError, match="draft_tokens must be an integer >= 1"):
            gen(draft=2, draft_tokens=n)
    with pytest.raises(GenerationError, match="cannot be combined with exit_at"):
        gen(draft=2, exit_at=2)
    with pytest.raises(ProgramError, match="splits a parallel group"):
        dj.generate(dj.depth.parallelize(model, [[1, 2]]), tokens, 4, temperature=0.0, draft=2)
    with pytest.raises(GenerationError, match="whole full program"):
        gen(draft=dj.depth.repeat(model, [3], 2))
    other = _model(CONFIGS["llama"], seed=4)
    with pytest.raises(GenerationError, match="model's own block table"):
        gen(draft=dj.depth.drop(other, [3]))
    with pytest.raises(GenerationError, match="a depth k, a Program or a DepthModel"):
        gen(draft="2")
    with pytest.raises(GenerationError, match="a depth k, a Program or a DepthModel"):
        gen(draft=True)
    with pytest.raises(ProgramError, match="out of range"):
        gen(draft=dj.Program.create([0, 7]))
