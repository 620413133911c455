"""dj.search against independent references: the naive forward (tests/reference.py), the
depth transforms, brute-force enumeration, a naive greedy, known optima on constructed
models, and finite differences for the gate derivatives."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import depthjax as dj
import depthjax.depth as D
import depthjax.metrics as M
from depthjax import search
from depthjax.search.space import Candidate, Space
from . import reference as ref

RNG = np.random.default_rng(0)
BATCHES = [RNG.integers(0, 256, (2, 8)).astype(np.int32) for _ in range(2)]
# One chunk size and padded depth everywhere, so searches of one objective share a compile.
KW = dict(chunk=4, max_depth=6)  # chunk: the CPU default, as the CLI test uses
apply = jax.jit(dj.apply)  # eager dj.apply retraces its scan on every call


@pytest.fixture(scope="module")
def model(llama):
    return llama  # conftest's llama-tiny (4 steps), shared with other test files


def groups_of(program):
    """The program as the naive forward's groups of (row, attn gate, mlp gate)."""
    p = {k: np.asarray(v) for k, v in program.to_dict().items()}
    groups = []
    for b, a, m, par in zip(p["block"], p["attn"], p["mlp"], p["parallel"]):
        if par:
            groups[-1].append((int(b), float(a), float(m)))
        else:
            groups.append([(int(b), float(a), float(m))])
    return groups


def naive_loss(model, program, batches=BATCHES):
    """Token-mean next-token loss of the naive forward, in float64."""
    total = count = 0.0
    for tokens in batches:
        logits = np.asarray(ref.forward(model, tokens, groups_of(program)), np.float64)
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        nll = -np.take_along_axis(logp[:, :-1], tokens[:, 1:, None], -1)
        total, count = total + nll.sum(), count + nll.size
    return total / count


def test_moves_match_depth_transforms(model):
    space = Space(model)
    start = space.start
    by_program = {}
    for nb in space.neighbours(start):
        by_program[str(space.to_model(nb).program.to_dict())] = nb
    want = [
        D.drop(model, [1]),
        D.drop_sublayers(model, attn=[2]),
        D.drop_sublayers(model, mlp=[0]),
        D.repeat(model, [2], 2),
        D.reorder(model, [0, 2, 1, 3]),
        D.parallelize(model, [[1, 2]]),
    ]
    for m in want:
        assert str(m.program.to_dict()) in by_program, m.program
    # 4 drops + 8 sublayer drops + 4 repeats + 3 swaps + 3 parallelizations, all distinct
    assert len(space.neighbours(start)) == 22
    # a step with both gates off is the same program as the step dropped
    off = Candidate((0, 1, 2, 3), (1, 0, 1, 1), (1, 0, 1, 1), (False,) * 4)
    assert space.canonical(off) == Candidate((0, 2, 3), (1, 1, 1), (1, 1, 1), (False,) * 3)


def test_batched_scores_equal_naive_forward(model):
    """Every generation is one batch of padded programs; each score must equal the naive
    forward of that program alone (depths 2..6, repeats, swaps, parallel groups)."""
    res = search.run(model, "loss", batches=BATCHES, strategy=search.Beam(width=2, rounds=2), **KW)
    found = res.all
    assert res.evaluated == len(found) > 30
    depths = {f.depth for f in found}
    assert min(depths) < 4 < max(depths)  # padded ones and longer ones
    picks = (
        [f for f in found if f.depth != 4][:4]
        + [f for f in found if any(f.candidate.parallel)][:2]
        + [res.start]
    )
    for f in picks:
        np.testing.assert_allclose(f.score, naive_loss(model, f.program), rtol=2e-6)


def test_padding_steps_are_exact_no_ops(model):
    from depthjax.search.evaluate import candidate_model

    space = Space(model, max_depth=7)
    c = Candidate((2, 0, 0), (1, 1, 0), (1, 0, 1), (False, False, True))
    packed = {k: v[0] for k, v in space.pack([c]).items()}
    padded = apply(candidate_model(model, packed), BATCHES[0])
    plain = apply(space.to_model(c), BATCHES[0])
    assert packed["steps"].shape == (7,)
    np.testing.assert_array_equal(np.asarray(padded), np.asarray(plain))


def test_search_matches_brute_force_enumeration(model):
    """Drops only, budget 2 of 4 steps: the beam evaluates every 2-step subset, so it finds
    the optimum of all subsets; greedy follows the naive greedy path exactly."""
    subsets = [s for r in range(1, 5) for s in itertools.combinations(range(4), r)]
    loss = {s: naive_loss(model, D.reorder(model, list(s)).program) for s in subsets}
    best = min((s for s in subsets if len(s) <= 2), key=loss.get)
    beam = search.run(
        model,
        "loss",
        batches=BATCHES,
        budget=2,
        moves=("drop",),
        strategy=search.Beam(width=4),
        **KW,
    )
    assert beam.best.candidate.steps == best
    np.testing.assert_allclose(beam.best.score, loss[best], rtol=2e-6)
    ranked = sorted((s for s in subsets if len(s) <= 2), key=loss.get)
    assert [f.candidate.steps for f in beam.ranked] == ranked  # every subset, in order

    # Greedy by hand: drop the step whose removal hurts least until the program fits (the
    # block-pruning baseline), then keep dropping while that lowers the loss.
    cur = (0, 1, 2, 3)
    while len(cur) > 1:
        nxt = min((tuple(x for x in cur if x != d) for d in cur), key=loss.get)
        if len(cur) <= 2 and not loss[nxt] < loss[cur]:
            break
        cur = nxt
    greedy = search.run(
        model, "loss", batches=BATCHES, budget=2, moves=("drop",), strategy="greedy", **KW
    )
    assert greedy.best.candidate.steps == cur
    assert greedy.best.score >= beam.best.score - 1e-9


def distance(logits, batch):
    return jnp.mean((logits - batch["teacher"]) ** 2, axis=(1, 2))


def distance_to(teacher, batches=BATCHES, **kw):
    """Objective: mean squared distance of a program's logits to the `teacher` model's."""
    rows = [{"tokens": b, "teacher": np.asarray(apply(teacher, b))} for b in batches]
    return search.logits(distance, rows, **kw)


def test_idle_steps_are_dropped_first(model):
    """Steps whose blocks write nothing (zero output projections) cost nothing to drop:
    under a 2-step budget the search removes exactly those (distance 0 to the full model)."""
    blocks = jax.tree.map(lambda a: a, model.params["blocks"])
    for row in (1, 3):
        blocks["attn"]["o"]["kernel"] = blocks["attn"]["o"]["kernel"].at[row].set(0)
        blocks["mlp"]["down"]["kernel"] = blocks["mlp"]["down"]["kernel"].at[row].set(0)
    idle = model.replace(params={**model.params, "blocks": blocks})
    for strategy in ("greedy", "beam"):
        res = search.run(
            idle,
            distance_to(idle),
            budget=2,
            moves=("drop", "drop_sublayer"),
            strategy=strategy,
            **KW,
        )
        assert res.best.candidate.steps == (0, 2)
        assert res.best.score < 1e-12 < 1e-6 < res.ranked[1].score


def test_a_redundant_pair_loses_one_copy_for_free_not_both(model):
    """Steps 1 and 2 run the same row (0 1 1 2 3); the objective is the distance to the
    original model (0 1 2 3). Either copy alone is free to drop (distance exactly 0), both
    are not: with every 4- and 3-step subset scored (beam over 5 candidates; the 4-step
    ones are the leave-one-out ablations), the two one-copy drops rank first, and dropping
    the pair scores what the naive forward of the original without step 1 gives."""
    pair = D.reorder(model, [0, 1, 1, 2, 3])
    res = search.run(
        pair, distance_to(model), budget=3, moves=("drop",), strategy=search.Beam(width=5), **KW
    )
    score = {f.candidate.steps: f.score for f in res.all}
    subsets = lambda k: set(itertools.combinations(range(5), k))
    assert subsets(4) | subsets(3) <= set(score)
    four = sorted(subsets(4), key=score.get)
    assert set(four[:2]) == {(0, 1, 3, 4), (0, 2, 3, 4)}
    assert score[four[0]] < 1e-12 and score[four[1]] < 1e-12 < 1e-6 < score[four[2]]
    # Dropping both copies is the original without its step 1: far from free.
    teacher = [np.asarray(apply(model, b), np.float64) for b in BATCHES]
    without = [ref.forward(model, b, groups_of(D.drop(model, [1]).program)) for b in BATCHES]
    naive = np.mean([np.mean((np.asarray(w) - t) ** 2) for w, t in zip(without, teacher)])
    np.testing.assert_allclose(score[(0, 3, 4)], naive, rtol=1e-4)
    assert naive > 1e-6


@pytest.mark.parametrize("prior", ["gradient", "hessian"])
def test_priors_order_and_cut_candidates(model, prior):
    """Greedy(max_candidates=1) scores only the drop its Taylor estimate ranks best: the
    path equals one computed by hand from gate_gradient (and gate_interactions)."""
    S = model.depth
    g = M.gate_gradient(model, BATCHES)
    H = M.gate_interactions(model, BATCHES) if prior == "hessian" else None

    def estimate(steps):
        keep = np.zeros(2 * S)
        keep[list(steps)] = keep[[S + s for s in steps]] = 1
        return M.taylor_estimate(np.ones(2 * S), g.extra["grad"], keep, H)[0]

    path, cur = [], (0, 1, 2, 3)
    while len(cur) > 2:
        cur = min((tuple(x for x in cur if x != d) for d in cur), key=estimate)
        path.append(cur)
    res = search.run(
        model,
        "loss",
        batches=BATCHES,
        budget=2,
        moves=("drop",),
        prior=prior,
        strategy=search.Greedy(max_candidates=1, rounds=2),
        **KW,
    )
    assert [f.candidate.steps for f in res.all] == [(0, 1, 2, 3)] + path
    assert res.best.candidate.steps == path[-1] and res.evaluated == 3


@pytest.fixture(scope="module")
def teacher_objective(model):
    """Distance to a teacher program two moves away (a swap and a repeat): the known
    optimum is the teacher, at distance 0."""
    return distance_to(D.reorder(model, [0, 2, 1, 1, 3]))


@pytest.mark.parametrize(
    "strategy",
    [
        "greedy",
        search.Beam(width=3),
        search.Evolutionary(population=16, generations=8),
        search.MCTS(simulations=96, batch=16),
    ],
)
def test_strategies_find_a_known_optimum(model, teacher_objective, strategy):
    res = search.run(
        model,
        teacher_objective,
        strategy=strategy,
        key=jax.random.key(0),
        moves=("drop", "repeat", "swap"),
        **KW,
    )
    assert res.best.candidate.steps == (0, 2, 1, 1, 3), res
    assert res.best.score < 1e-12 < 1e-6 < res.start.score


def test_deterministic_given_the_key(model, teacher_objective):
    kw = dict(moves=("drop", "repeat", "swap"), **KW)
    for strategy in (
        search.Evolutionary(population=8, generations=3),
        search.MCTS(simulations=40, batch=8),
    ):
        runs = [
            search.run(model, teacher_objective, strategy=strategy, key=jax.random.key(k), **kw)
            for k in (1, 1, 2)
        ]
        same = lambda r: [(f.candidate, f.score) for f in r.all]
        assert same(runs[0]) == same(runs[1])
        assert same(runs[0]) != same(runs[2])


def test_per_example_equals_a_search_on_each_row(model):
    """Each example's program is what a pooled search on that row alone finds."""
    res = search.run(
        model, "loss", batches=BATCHES[:1], per_example=True, moves=("drop", "repeat"), **KW
    )
    assert len(res) == 2 and res.gain() > 0
    for e in range(2):
        row = BATCHES[0][[e, e]]  # the row twice: same loss, the batch shape of BATCHES
        alone = search.run(model, "loss", batches=[row], moves=("drop", "repeat"), **KW)
        assert res.best[e].candidate == alone.best.candidate
        np.testing.assert_allclose(res.best[e].score, alone.best.score, rtol=1e-6)
        np.testing.assert_allclose(
            res.best[e].score,
            naive_loss(model, res.best[e].program, [BATCHES[0][e : e + 1]]),
            rtol=2e-6,
        )


def test_latency_model_times_the_models_own_sublayers(model):
    """LatencyModel.measure runs row 0's sublayers (it raised a TypeError before)."""
    lat = search.LatencyModel.measure(model, (1, 8), repeats=2)
    assert lat.attn_s >= 0 and lat.mlp_s > 0 and lat.step_s == 0


def test_budgets_and_pareto(model):
    from depthjax.core.flops import sublayer_forward_flops

    space = Space(model)
    c = Candidate((0, 1, 1, 3), (1, 0, 1, 1), (1, 1, 1, 0), (False, False, True, False))
    p = space.program(c)
    cfg = model.config
    attn, mlp = sublayer_forward_flops(cfg, 64)
    assert search.Budget.steps().cost_of(cfg, p) == 4
    assert search.Budget.flops(seq_len=64).cost_of(cfg, p) == 3 * attn + 3 * mlp + 2 * 64 * 256
    assert search.Budget.kv_bytes().cost_of(cfg, p) == 3 * 2 * 2 * 16 * 4
    lat = search.LatencyModel(attn_s=2.0, mlp_s=1.0, step_s=0.5)
    assert lat(p) == 3 * 2 + 3 * 1 + 4 * 0.5
    # groups 0 | 1 1 | 3: the parallel pair costs its slower member with parallel="max"
    assert search.LatencyModel(2.0, 1.0, 0.5, parallel="max")(p) == 3.5 + 3.5 + 2.5
    start = space.program(space.start)
    half = search.Budget.flops(fraction=0.5).resolve(cfg, start)
    assert half.limit == 0.5 * search.Budget.flops().cost_of(cfg, start)

    res = search.run(
        model,
        "loss",
        batches=BATCHES,
        budget=search.Budget.kv_bytes(fraction=0.5),
        moves=("drop", "drop_sublayer"),
        strategy=search.Beam(width=2),
        **KW,
    )
    assert res.ranked and all(f.cost <= 2 * 256 for f in res.ranked)
    assert all(sum(f.candidate.attn) <= 2 for f in res.ranked) and res.best.measures == {}
    front = res.pareto()
    weakly = lambda g, f: g.cost <= f.cost and g.score <= f.score
    strictly = lambda g, f: weakly(g, f) and (g.cost, g.score) != (f.cost, f.score)
    assert front == sorted(front, key=lambda f: f.cost)
    assert not any(strictly(g, f) for f in front for g in res.all)
    assert all(any(weakly(g, f) for g in front) for f in res.all)


def _x64():
    return jax.enable_x64(True) if hasattr(jax, "enable_x64") else jax.experimental.enable_x64()


def naive_loss64(model, gates_K, batches):
    """Naive-forward loss [K] in float64 of the sequential program with gates [K, 2S]
    (attn_0.., mlp_0..), for finite differences without float32 rounding."""
    S = model.depth
    with _x64():
        m64 = model.replace(
            params=jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), model.params)
        )

        def one(g):
            total = 0.0
            for tokens in batches:
                groups = [[(i, g[i], g[S + i])] for i in range(S)]
                logp = jax.nn.log_softmax(ref.forward(m64, tokens, groups))
                total += -jnp.take_along_axis(logp[:, :-1], tokens[:, 1:, None], -1).mean()
            return total / len(batches)

        return np.asarray(jax.jit(jax.vmap(one))(jnp.asarray(gates_K, jnp.float64)))


def test_gate_derivatives_match_finite_differences(model):
    """dL/dg and d2L/dg2 against central differences of the naive forward in float64."""
    data = BATCHES[:1]
    S = model.depth
    n, h, cols = 2 * S, 1e-3, (0, S + 1)
    eye = np.eye(n)
    keep = np.ones(n)
    keep[[0, S]] = 0.9  # step 0's gates -0.1
    pts = np.vstack(
        [1 + h * eye, 1 - h * eye]
        + [
            1 + h * (si * eye[i] + sj * eye[j])
            for j in cols
            for i in range(n)
            for si, sj in ((1, 1), (1, -1), (-1, 1), (-1, -1))
        ]
        + [keep, np.ones(n)]
    )
    f = naive_loss64(model, pts, data)  # gates are all 1
    g = M.gate_gradient(model, data)
    fd_grad = (f[:n] - f[n : 2 * n]) / (2 * h)
    np.testing.assert_allclose(g.extra["grad"], fd_grad, atol=2e-6, rtol=1e-4)
    np.testing.assert_allclose(g.values, -fd_grad, atol=2e-6, rtol=1e-4)
    np.testing.assert_allclose(g.extra["loss"], f[-1], rtol=2e-6)
    assert M.gate_gradient(D.drop_sublayers(model, attn=[1]), data).values[1] == 0  # off: 0

    H = M.gate_interactions(model, data)
    np.testing.assert_array_equal(H, H.T)
    second = f[2 * n : -2].reshape(len(cols), n, 4)
    fd_cols = (second[..., 0] - second[..., 1] - second[..., 2] + second[..., 3]) / (4 * h * h)
    np.testing.assert_allclose(H[:, cols].T, fd_cols, atol=2e-5, rtol=1e-3)
    # Turning step 0 down: the second-order estimate is closer to the truth than the first.
    true = f[-2] - f[-1]
    first = M.taylor_estimate(np.ones(n), g.extra["grad"], keep)[0]
    with_h = M.taylor_estimate(np.ones(n), g.extra["grad"], keep, H)[0]
    assert abs(with_h - true) < abs(first - true)


def sq_distance(logits, batch):
    """Per-row summed squared distance to a target: quadratic in the logits."""
    return jnp.sum((logits - batch["target"]) ** 2, axis=(1, 2))


def test_interactions_equal_second_differences_where_the_loss_is_bilinear():
    """GPT-J blocks (attention and MLP read one input) in one parallel group and no final
    norm: the logits are affine in all four gates, a squared distance of them is quadratic,
    so the gate Hessian equals every pair's ablation second difference L(1,1) - L(1,0) -
    L(0,1) + L(0,0), computed by the naive forward in float64. Run sequentially, a pair
    across steps (attn_0 feeds step 1) no longer does; the last step's own pair still does."""
    cfg = dj.ModelConfig(
        d_model=32,
        n_layers=2,
        n_heads=2,
        parallel_block=True,
        final_norm=False,
        vocab_size=64,
        init_std=0.1,
    )
    seq = dj.init(cfg, jax.random.key(1))
    par = D.parallelize(seq, [[0, 1]])
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 64, (2, 6)).astype(np.int32)
    rows = [{"tokens": tokens, "target": rng.normal(size=(2, 6, 64)).astype(np.float32)}]
    obj = search.logits(sq_distance, rows, differentiable=True)
    pairs = list(itertools.combinations(range(4), 2))  # gates attn_0, attn_1, mlp_0, mlp_1

    corners = np.array(list(itertools.product((0.0, 1.0), repeat=4)))  # [16, 4]

    def second_differences(model, groups_of_gates):
        """[pairs] L(1,1) - L(1,0) - L(0,1) + L(0,0) (the other gates 1) of the naive
        forward in float64, L the objective: mean over rows of the summed squares."""
        with _x64():
            m64 = model.replace(
                params=jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), model.params)
            )
            target = jnp.asarray(rows[0]["target"], jnp.float64)

            def L(g):
                logits = ref.forward(m64, tokens, groups_of_gates(g))
                return jnp.sum((logits - target) ** 2) / len(tokens)

            at = dict(zip(map(tuple, corners), np.asarray(jax.jit(jax.vmap(L))(corners))))

        def corner(i, j, gi, gj):
            g = np.ones(4)
            g[[i, j]] = gi, gj
            return at[tuple(g)]

        return np.array(
            [
                corner(i, j, 1, 1) - corner(i, j, 1, 0) - corner(i, j, 0, 1) + corner(i, j, 0, 0)
                for i, j in pairs
            ]
        )

    one_group = lambda g: [[(0, g[0], g[2]), (1, g[1], g[3])]]
    in_turn = lambda g: [[(0, g[0], g[2])], [(1, g[1], g[3])]]
    for model, groups, exact in ((par, one_group, pairs), (seq, in_turn, [(1, 3)])):
        H = M.gate_interactions(model, list(obj.batches), obj.measure)
        H_pairs = np.array([H[i, j] for i, j in pairs])
        diff = second_differences(model, groups)
        for r, pair in enumerate(pairs):
            if pair in exact:
                np.testing.assert_allclose(H_pairs[r], diff[r], rtol=2e-5, atol=1e-6)
        if model is seq:  # attn_0 and attn_1: step 1 reads step 0's output
            r = pairs.index((0, 1))
            assert abs(H_pairs[r] - diff[r]) > 1e-2 * abs(diff[r]) + 1e-5


def test_bad_input(model):
    with pytest.raises(search.SearchError, match="strategy must be"):
        search.run(model, "loss", batches=BATCHES, strategy="annealing")
    with pytest.raises(search.SearchError, match="moves must be"):
        search.run(model, "loss", batches=BATCHES, moves=("jump",))
    with pytest.raises(search.SearchError, match="budget must be"):
        search.run(model, "loss", batches=BATCHES, budget="6")
    with pytest.raises(search.SearchError, match="needs batches"):
        search.run(model, "loss")
    with pytest.raises(search.SearchError, match="one value per row"):
        search.run(model, lambda lg, b: jnp.mean(lg), batches=BATCHES, per_example=True)
    with pytest.raises(search.SearchError, match="needs a prior"):
        search.run(model, "loss", batches=BATCHES, strategy=search.Greedy(max_candidates=2))
    with pytest.raises(search.SearchError, match="prior must be"):
        search.run(model, "loss", batches=BATCHES, prior="hessian2")
    with pytest.raises(search.SearchError, match="leading axis"):
        search.logits(lambda lg, b: lg[:, 0, 0], [{"tokens": BATCHES[0], "y": np.zeros(3)}])
    with pytest.raises(search.SearchError, match="max_depth"):
        search.run(model, "loss", batches=BATCHES, max_depth=2)
    nothing = search.run(
        model, "loss", batches=BATCHES, budget=search.Budget.flops(1.0), moves=("swap",), **KW
    )
    with pytest.raises(LookupError, match="no evaluated program fits"):
        nothing.best  # noqa: B018


def test_search_cli(model, tmp_path, capsys):
    import yaml

    from depthjax import cli
    from depthjax.cli import search as search_cli

    assert search_cli.MOVES == search.MOVES
    dj.save(model, tmp_path / "ck")
    data = [
        "--model",
        str(tmp_path / "ck"),
        "--batches",
        "1",
        "--batch-size",
        "2",
        "--seq-len",
        "8",
    ]
    # the default moves: the padded depth (6) and chunk (4) of KW, so compiles are shared
    assert (
        cli.main(
            ["search", *data, "--budget", "steps=75%", "--top", "3", "--out", str(tmp_path / "out")]
        )
        == 0
    )
    out = tmp_path / "out"
    import json

    res = json.loads((out / "results.json").read_text())
    assert res["budget"] == "steps <= 3 steps" and len(res["validation"]["ranked"]) == 3
    assert (out / "pareto.png").stat().st_size > 1000
    assert "| start |" in (out / "results.md").read_text()
    spec = yaml.safe_load((out / "specs" / "rank01.yaml").read_text())
    best = D.from_spec(model, spec)
    assert best.program.to_dict() == res["ranked"][0]["program"]
    from depthjax.files.corpus import sample_windows

    calib = sample_windows(2, 8, seed=0, split="train")  # what the command scored on
    np.testing.assert_allclose(M.loss(best, calib), res["ranked"][0]["score"], rtol=1e-5)
    for bad, msg in (
        ("steps", "expected one of"),
        ("flops=fast", "not a number"),
        ("steps=2.5", "whole number"),
    ):
        assert cli.main(["search", *data, "--budget", bad, "--out", str(tmp_path / "x")]) == 2
        assert msg in capsys.readouterr().err


def test_router_keeps_part_of_the_oracle_gain(model):
    """Router mechanics: labels are each row's best class program, its choices are the
    classifier's argmax, and no routing beats the class oracle."""
    data = search.loss(BATCHES)
    per = search.run(model, data, per_example=True, moves=("drop", "repeat"), **KW)
    router = search.fit_router(per, data, k=2, classes=3, steps=300, chunk=KW["chunk"])
    assert router.space.start in router.programs and len(router.programs) <= 4
    gains = search.routing_gain(router, data, per, chunk=KW["chunk"])
    assert gains["class oracle"] >= max(gains["router"], gains["single best program"]) - 1e-12
    assert gains["oracle"] == per.gain() >= gains["class oracle"] - 1e-12
    scores = search.router.class_scores(router.space, router.programs, data, KW["chunk"])
    for e, f in enumerate(per.best):  # class scores are the per-example scores
        if f.candidate in router.programs:
            assert scores[e, router.programs.index(f.candidate)] == pytest.approx(f.score)
    # 4 rows, at most 4 classes, 300 steps: the router fits its training labels
    assert gains["router"] == pytest.approx(gains["class oracle"])
    with pytest.raises(search.SearchError, match="k must be"):
        search.fit_router(per, data, k=9)


# -- task objectives (depthjax.eval tasks: task.measure(model, programs) -> [K]) ----------
TASK_EXAMPLES = [
    {"context": "def f(x):", "choices": [" return x", " pass"], "label": 0},
    {"context": "import ", "choices": ["os", "numpy"], "label": 1},
    {"context": "for i in", "choices": [" range(3):", " x:"], "label": 0},
]


@pytest.fixture(scope="module")
def task():
    # nll: a continuous measure, so rankings have no ties
    return dj.eval.MultipleChoice(TASK_EXAMPLES, metric="nll", name="tiny_mc")


class Recording:
    """A task that records the programs of every measure call it gets."""

    def __init__(self, task):
        self.task, self.name, self.calls = task, task.name, []

    def measure(self, model, programs):
        self.calls.append(None if programs is None else tuple(programs.block.shape))
        return self.task.measure(model, programs)


def test_task_search_equals_enumeration(model, task):
    """Drops only, budget 2 of 4 steps: the beam scores every subset of steps, each chunk of
    padded programs in one task.measure call; every score equals the task's measure of that
    subset's model alone (removed steps gated off), and the ranking is theirs."""
    rec = Recording(task)
    res = search.run(model, rec, budget=2, moves=("drop",), strategy=search.Beam(width=4), **KW)
    assert set(rec.calls) == {(KW["chunk"], KW["max_depth"])}  # [chunk, max_depth] batches
    assert res.generations > 1 and len(rec.calls) < res.evaluated
    subsets = [s for r in range(1, 5) for s in itertools.combinations(range(4), r)]

    def alone(s):
        off = [i for i in range(4) if i not in s]
        return task.measure(D.drop_sublayers(model, attn=off, mlp=off), None)[0]

    want = {s: alone(s) for s in subsets}
    assert sorted(f.candidate.steps for f in res.all) == sorted(subsets)
    for f in res.all:
        np.testing.assert_allclose(f.score, want[f.candidate.steps], rtol=1e-5)
    assert [f.candidate.steps for f in res.ranked] == sorted(
        (s for s in subsets if len(s) <= 2), key=want.get
    )
    assert (res.objective, res.maximize) == ("tiny_mc", False)
    again = search.rescore(res.ranked[:3], task)  # rescoring by a task: the same values
    np.testing.assert_allclose(again, [f.score for f in res.ranked[:3]], rtol=1e-5)


def test_task_search_with_per_step_params(model, task):
    """Recovery adapters (params["steps"]) travel with their steps, which one batch of
    programs on one model cannot express: each candidate model is measured alone. The beam
    over swaps reaches every order of the 3 steps; each score equals the task's measure of
    that order as dj.depth.reorder builds it, and the ranking is theirs."""
    healed = dj.recover(D.drop(model, [1]), model, BATCHES, method="bias")
    assert "adapter" in healed.params["steps"]
    rec = Recording(task)
    res = search.run(healed, rec, moves=("swap",), strategy=search.Beam(width=2), **KW)
    assert set(rec.calls) == {None} and len(rec.calls) == res.evaluated
    orders = list(itertools.permutations(range(3)))
    assert sorted(f.candidate.steps for f in res.all) == orders
    want = {s: task.measure(D.reorder(healed, list(s)), None)[0] for s in orders}
    for f in res.all:
        np.testing.assert_allclose(f.score, want[f.candidate.steps], rtol=1e-5)
    assert [f.candidate.steps for f in res.ranked] == sorted(orders, key=want.get)
    # the swapped program over adapters left in place (what one batch of programs would
    # run) is another model: scoring it would be wrong
    swap = next(f for f in res.all if f.candidate.steps == (1, 0, 2))
    unmoved = task.measure(healed, swap.program)[0]
    assert abs(unmoved - swap.score) > 1e-3


class Constant:
    name = "constant"

    def measure(self, model, programs):
        return np.zeros(2)  # not one value per program


def test_task_objective_errors(model, task):
    with pytest.raises(search.SearchError, match="a task has its own data"):
        search.run(model, task, batches=BATCHES)
    with pytest.raises(search.SearchError, match="per_example=True.*one value per program"):
        search.run(model, task, per_example=True)
    with pytest.raises(search.SearchError, match="prior='gradient'.*task 'tiny_mc'"):
        search.run(model, task, prior="gradient")
    with pytest.raises(search.SearchError, match="shape \\(2,\\) for 4 programs"):
        search.run(model, Constant(), moves=("drop",), **KW)
    with pytest.raises(search.SearchError, match="needs an object with .measure"):
        search.TaskObjective(object())


@pytest.mark.slow
def test_search_cli_by_task(model, task, tmp_path, capsys):
    import json

    import yaml

    from depthjax import cli

    dj.save(model, tmp_path / "ck")
    path = tmp_path / "tiny_mc.jsonl"
    path.write_text("".join(json.dumps(ex) + "\n" for ex in TASK_EXAMPLES))
    data = ["--model", str(tmp_path / "ck"), "--batches", "1", "--batch-size", "2"]
    data += ["--seq-len", "8", "--task", str(path), "--task-metric", "nll"]
    # the default moves: padded depth 6 and chunk 4, as KW, so compiles are shared
    out = tmp_path / "out"
    argv = ["search", *data, "--budget", "steps=75%", "--top", "2", "--out", str(out)]
    assert cli.main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["objective"] == "tiny_mc" and res["task"]["measure"] == "nll"
    assert res["task"]["ranked"] == [f["score"] for f in res["ranked"][:2]]
    assert len(res["validation"]["ranked"]) == 2  # held-out loss beside the task
    best = D.from_spec(model, yaml.safe_load((out / "specs" / "rank01.yaml").read_text()))
    np.testing.assert_allclose(task.measure(best, None)[0], res["ranked"][0]["score"], rtol=1e-5)
    table = (out / "results.md").read_text()
    assert "| rank | tiny_mc (nll) | loss (validation) |" in table
    assert (out / "pareto.png").stat().st_size > 1000
    # searched by loss, the task's measure is reported beside it
    argv = ["search", *data, "--objective", "loss", "--budget", "steps=75%", "--top", "2"]
    assert cli.main([*argv, "--out", str(tmp_path / "by_loss")]) == 0
    res = json.loads((tmp_path / "by_loss" / "results.json").read_text())
    assert res["objective"] == "loss" and len(res["task"]["ranked"]) == 2
    assert "| tiny_mc (nll) |" in (tmp_path / "by_loss" / "results.md").read_text()
    capsys.readouterr()
    plain = data[:-4]  # without --task
    for argv, msg in (
        ([*plain, "--objective", "task"], "needs --task"),
        ([*plain, "--objective", "accuracy"], "expected loss, task"),
        ([*data, "--prior", "gradient"], "--prior gradient"),
        ([*data, "--objective", str(tmp_path / "other.jsonl")], "give one task"),
    ):
        assert cli.main(["search", *argv, "--out", str(tmp_path / "x")]) == 2
        assert msg in capsys.readouterr().err
