"""Metrics against naive numpy computations and exact identities."""

import itertools
import math

import jax
import numpy as np
import pytest

import depthjax as dj
import depthjax.depth as D
import depthjax.metrics as M

RNG = np.random.default_rng(0)
BATCHES = [RNG.integers(0, 256, (3, 16)).astype(np.int32) for _ in range(2)]


@pytest.fixture(scope="module")
def model():
    """llama-tiny with step 2 gated off entirely."""
    m = dj.init(dj.configs.get("llama-tiny"), jax.random.key(5))
    return D.drop_sublayers(m, attn=[2], mlp=[2])


_apply = jax.jit(dj.apply)  # eager dj.apply retraces its scan on every call (~1 s each)


def naive_loss(model, tokens):
    logits = np.asarray(_apply(model, tokens), np.float64)
    logp = (
        logits
        - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
        - logits.max(-1, keepdims=True)
    )
    return -np.take_along_axis(logp[:, :-1], tokens[:, 1:, None], -1).mean()


def naive_value(model, keep):
    """Mean loss over BATCHES (equal sizes) with block units where keep == 0 gated off."""
    m = D.drop_sublayers(
        model,
        attn=np.flatnonzero(np.asarray(keep) == 0).tolist(),
        mlp=np.flatnonzero(np.asarray(keep) == 0).tolist(),
    )
    return np.mean([naive_loss(m, b) for b in BATCHES])


def test_trace_metrics_match_numpy(model):
    res = np.concatenate(
        [np.asarray(dj.apply(model, b, trace=True)[1].residual, np.float64) for b in BATCHES],
        axis=1,
    )  # [S+1, 6, T, D]
    cos = lambda a, b: (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    bi = M.block_influence(model, BATCHES)
    np.testing.assert_allclose(bi.values, (1 - cos(res[:-1], res[1:])).mean((1, 2)), atol=1e-6)
    np.testing.assert_allclose(
        bi.extra["residual_norm"], np.linalg.norm(res, axis=-1).mean((1, 2)), rtol=1e-5
    )
    ad = M.angular_distance(model, BATCHES, span=2)
    last = res[:, :, -1]
    want = np.arccos(np.clip(cos(last[:-2], last[2:]), -1, 1)).mean(1) / np.pi
    np.testing.assert_allclose(ad.values, want, atol=1e-4)
    assert ad.extra["best_start"] == int(np.argmin(want)) and ad.unit == "span"
    rc = M.relative_contribution(model, BATCHES)
    traces = [dj.apply(model, b, trace=True)[1] for b in BATCHES]
    ua = np.concatenate([np.asarray(t.attn_out) for t in traces], 1)
    um = np.concatenate([np.asarray(t.mlp_out) for t in traces], 1)
    n = lambda x: np.linalg.norm(x, axis=-1)
    np.testing.assert_allclose(rc["attn"].values, (n(ua) / n(res[:-1])).mean((1, 2)), rtol=1e-5)
    np.testing.assert_allclose(rc["mlp"].values, (n(um) / n(res[:-1] + ua)).mean((1, 2)), rtol=1e-5)
    np.testing.assert_allclose(
        rc["block"].values, (n(ua + um) / n(res[:-1])).mean((1, 2)), rtol=1e-5
    )


def test_gated_off_step_scores_zero(model):
    assert M.block_influence(model, BATCHES).values[2] == 0
    assert M.angular_distance(model, BATCHES).values[2] == 0
    assert M.ablation(model, BATCHES).values[2] == 0
    assert M.ablation(model, BATCHES, unit="attn", measure="logit").values[2] == 0
    assert M.shapley(model, BATCHES, num_permutations=6, key=jax.random.key(1)).values[2] == 0
    assert M.relative_contribution(model, BATCHES)["block"].values[2] == 0


def test_ablation_matches_naive_leave_one_out(model):
    abl = M.ablation(model, BATCHES)
    full = naive_value(model, np.ones(4))
    np.testing.assert_allclose(abl.extra["full"], full, rtol=1e-5)
    np.testing.assert_allclose(M.loss(model, BATCHES), full, rtol=1e-5)
    for i in range(4):
        np.testing.assert_allclose(
            abl.values[i], naive_value(model, 1 - np.eye(4)[i]) - full, atol=2e-5
        )


def test_shapley_exact_enumeration_and_efficiency(model):
    n = 4
    v = {
        S: -naive_value(model, [int(i in S) for i in range(n)])
        for r in range(n + 1)
        for S in itertools.combinations(range(n), r)
    }
    exact = np.zeros(n)
    for i in range(n):
        for S, value in v.items():
            if i not in S:
                w = math.factorial(len(S)) * math.factorial(n - len(S) - 1) / math.factorial(n)
                exact[i] += w * (v[tuple(sorted(S + (i,)))] - value)
    est = M.shapley(model, BATCHES, num_permutations=None)
    assert est.extra["exact"] and est.extra["coalitions"] == 16
    np.testing.assert_allclose(est.values, exact, atol=3e-5)
    np.testing.assert_allclose(est.values.sum(), v[(0, 1, 2, 3)] - v[()], atol=3e-5)
    for sampled in (
        M.shapley(model, BATCHES, num_permutations=3, key=jax.random.key(7)),
        M.shapley(model, BATCHES, num_permutations=3, antithetic=False),
    ):
        np.testing.assert_allclose(sampled.values.sum(), v[(0, 1, 2, 3)] - v[()], atol=3e-5)
        np.testing.assert_allclose(
            sampled.values.sum(), sampled.extra["v_all_minus_v_none"], atol=1e-9
        )
    assert M.shapley(model, BATCHES, num_permutations=3).extra["permutations"] == 4
    with pytest.raises(ValueError, match="max_coalitions"):
        M.shapley(model, BATCHES, unit="sublayer", num_permutations=None, max_coalitions=128)


def test_sublayer_units_and_present_minus_absent(model):
    sub = M.ablation(model, BATCHES, unit="sublayer")
    assert len(sub) == 8 and sub.values[2] == 0 and sub.values[6] == 0
    attn, mlp = M.ablation(model, BATCHES, unit="attn"), M.ablation(model, BATCHES, unit="mlp")
    np.testing.assert_allclose(sub.values, np.r_[attn.values, mlp.values], atol=1e-6)
    pma = M.present_minus_absent(model, BATCHES, num_samples=8)
    assert pma.name.startswith("present_minus_absent") and pma.extra["coalitions"] == 13


def test_logit_lens_and_removal_curve(model):
    lens = M.logit_lens(model, BATCHES)
    full = naive_value(model, np.ones(4))
    np.testing.assert_allclose(lens.values[-1], full, rtol=1e-5)
    assert abs(lens.extra["kl"][-1]) < 1e-6 and len(lens) == 5
    np.testing.assert_allclose(lens.values[2], lens.values[3], atol=1e-6)  # step 2 is off
    scores = np.array([0.3, 0.1, 0.0, 0.2])
    curve = M.removal_curve(model, BATCHES, scores, max_units=2, unit="block")
    np.testing.assert_allclose(curve, [full, full, naive_value(model, [1, 0, 0, 1])], rtol=1e-5)


@pytest.mark.slow
def test_skip_effect(model):
    eff = M.skip_effect(model, BATCHES)
    change, kl = eff["update_change"], eff["output_kl"]
    assert np.isnan(change[1, 0]) and np.isnan(change[1, 1])
    assert change[2, 3] < 1e-6 and kl[2] < 1e-7  # skipping a gated-off step changes nothing
    skipped = D.drop_sublayers(model, attn=[0], mlp=[0])

    def u(m, b):
        trace = dj.apply(m, b, trace=True)[1]
        return np.asarray(trace.attn_out + trace.mlp_out)

    with np.errstate(invalid="ignore"):  # step 2's update is 0 (it is gated off)
        rel = np.concatenate(
            [
                np.linalg.norm(u(skipped, b) - u(model, b), axis=-1)
                / np.linalg.norm(u(model, b), axis=-1)
                for b in BATCHES
            ],
            1,
        )
    np.testing.assert_allclose(change[0, 1], rel[1].mean(), rtol=1e-4)


def test_padding_mask_is_respected(model):
    tokens = BATCHES[0]
    padded = np.concatenate([tokens, np.zeros((3, 5), np.int32)], 1)
    mask = np.concatenate([np.ones((3, 16)), np.zeros((3, 5))], 1)
    a = M.block_influence(model, tokens).values
    b = M.block_influence(model, [{"tokens": padded, "mask": mask}]).values
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    c = M.angular_distance(model, [{"tokens": padded, "mask": mask}]).values
    np.testing.assert_allclose(M.angular_distance(model, tokens).values, c, atol=1e-6)


def naive_attn_value(model, off):
    """Mean loss over BATCHES with the attention sublayers of steps `off` gated off."""
    m = D.drop_sublayers(model, attn=list(off))
    return np.mean([naive_loss(m, b) for b in BATCHES])


def test_random_pruning_control_equals_numpy_over_separate_subsets(model):
    """The control's mean, std (ddof=1), min and max are numpy's over the same seed's
    subsets (drawn as documented: distinct, uniform, from the units still on), each
    evaluated alone by dj.apply; all subsets when there are no more than asked for."""
    c = M.random_pruning(model, BATCHES, n=2, num_subsets=4, seed=7)
    rng, drawn = np.random.default_rng(7), []
    while len(drawn) < 4:  # 6 pairs of 4 blocks: 4 distinct ones, in draw order
        pair = sorted(rng.choice(4, 2, replace=False).tolist())
        drawn += [pair] * (pair not in drawn)
    assert c.subsets.tolist() == drawn and not c.exhaustive
    values = np.array([naive_value(model, np.isin(range(4), s, invert=True)) for s in drawn])
    np.testing.assert_allclose(c.values, values, rtol=1e-5)
    np.testing.assert_allclose(c.mean, values.mean(), rtol=1e-5)
    np.testing.assert_allclose(c.std, values.std(ddof=1), rtol=1e-3)
    assert (c.min, c.max) == (c.values.min(), c.values.max())
    assert "± " in c.describe() and "4 random subsets" in c.describe()
    assert M.random_pruning(model, BATCHES, 2, num_subsets=4, seed=8).subsets.tolist() != drawn

    # Attention of step 2 is already off: the 3 others are every subset of one unit.
    a = M.random_pruning(model, BATCHES, n=1, unit="attn", num_subsets=16)
    assert a.exhaustive and a.subsets.tolist() == [[0], [1], [3]]
    values = np.array([naive_attn_value(model, s) for s in a.subsets])
    np.testing.assert_allclose(a.mean, values.mean(), rtol=1e-5)
    np.testing.assert_allclose(a.std, values.std(ddof=1), rtol=1e-3)

    # Random removal orders: prefix k of each order removed, k = 0 is the full model.
    curves = M.random_removal_curves(model, BATCHES, num_orders=2, seed=3)
    rng = np.random.default_rng(3)
    for row in curves:
        order = rng.permutation(4)
        naive = [naive_value(model, np.isin(range(4), order[:k], invert=True)) for k in range(4)]
        np.testing.assert_allclose(row, naive, rtol=1e-5)
    with pytest.raises(M.MetricError, match="can remove 1..3"):
        M.random_pruning(model, BATCHES, n=4)
    with pytest.raises(M.MetricError, match="num_subsets must be an integer >= 2"):
        M.random_pruning(model, BATCHES, n=1, num_subsets=1)


def test_bad_input(model):
    with pytest.raises(ValueError, match="no batches"):
        M.block_influence(model, [])
    with pytest.raises(ValueError, match="no real tokens"):
        M.block_influence(model, [{"tokens": BATCHES[0], "mask": np.zeros((3, 16))}])
    with pytest.raises(ValueError, match="measure must be"):
        M.ablation(model, BATCHES, measure="accuracy")
    bert = dj.init(dj.configs.get("bert-tiny"), jax.random.key(0))
    with pytest.raises(ValueError, match="measure='hidden'"):
        M.ablation(bert, BATCHES)


@pytest.mark.parametrize("strategy", ["batched", "prefix"])
def test_coalition_strategies_match_separate_forwards(model, strategy):
    """Both evaluation strategies against each coalition run alone through dj.apply, on a
    program with a parallel group (prefixes start at group boundaries) and fractional gates."""
    m = D.parallelize(model, [[0, 1]]).with_program(
        dj.Program.create(
            [0, 1, 2, 3], attn=[1, 0.5, 0, 1], mlp=[1, 1, 0, 2], parallel=[0, 1, 0, 0]
        )
    )
    keep = np.vstack([np.ones(8), 1 - np.eye(8), RNG.integers(0, 2, (5, 8))]).astype(np.int8)
    got = M.coalition_measures(m, BATCHES, "sublayer", keep, strategy=strategy)
    for k, row in enumerate(keep):
        prog = m.program.replace(attn=m.program.attn * row[:4], mlp=m.program.mlp * row[4:])
        want = np.mean([naive_loss(m.replace(program=prog), b) for b in BATCHES])
        np.testing.assert_allclose(got[k], want, rtol=2e-5)


def test_prefix_starts_and_costs(model):
    from depthjax.metrics import coalitions as C, strategies

    prog = dj.Program.create([0, 1, 2, 3], parallel=[0, 0, 1, 0])
    attn = np.array(
        [[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 1], [0, 1, 1, 1], [1, 1, 1, 1]], np.float32
    )
    block = np.array([[0, 1, 2, 3]] * 4 + [[0, 1, 2, 0]])
    programs = dj.Program(block, attn, np.ones((5, 4), np.float32), np.tile(prog.parallel, (5, 1)))
    # identical: only the head runs; a change at step 2 starts its group at step 1; another
    # block id starts where it is
    np.testing.assert_array_equal(strategies.prefix_starts(prog, programs), [4, 3, 1, 0, 3])
    n = 16
    deep = dj.init(dj.configs.get("llama-tiny", n_layers=n), jax.random.key(0))
    programs = C.programs_for(deep, "block", np.vstack([np.ones(n), 1 - np.eye(n)]))
    costs = strategies.evaluation_costs(deep, programs, seq_len=16)
    # all leave-one-outs: the traced forward plus sum_i (n - 1 - i) steps, vs n + 1 forwards
    steps = costs["prefix"] / costs["batched"] * (n + 1) * n
    assert steps < (n + n * (n - 1) / 2 + 0.2 * (n + 1))  # heads are the rest
