"""Depth transforms against independent expectations: the naive forward, explicit index
maps, and identities (full-rank relax, identity grow, compact/materialize)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import depthjax as dj
import depthjax.depth as D
from depthjax.core.program import ProgramError
from tests import reference

TOL = dict(rtol=2e-5, atol=2e-5)


@pytest.fixture(scope="module")
def model():
    return dj.init(dj.configs.get("llama-tiny", n_layers=6), jax.random.key(3))


def close(a, b, tol=TOL):
    np.testing.assert_allclose(a, b, **tol)


def program_of(m):
    return {k: np.asarray(v).tolist() for k, v in m.program.to_dict().items()}


def test_drop_equals_naive_skip(model, tokens):
    dropped = D.drop(model, [1, 4])
    assert program_of(dropped)["block"] == [0, 2, 3, 5]
    want = reference.forward(model, tokens, reference.sequential([0, 2, 3, 5]))
    close(dj.apply(dropped, tokens), want)


def test_program_edits_share_the_table(model):
    for edited in (
        D.drop(model, [0]),
        D.drop_sublayers(model, attn=[1]),
        D.repeat(model, [2, 3], 2),
        D.reorder(model, [5, 0, 0]),
        D.parallelize(model, [[1, 2]]),
    ):
        for a, b in zip(
            jax.tree.leaves(model.params["blocks"]), jax.tree.leaves(edited.params["blocks"])
        ):
            assert a is b


def test_drop_sublayers_matches_naive(model, tokens):
    m = D.drop_sublayers(model, attn=[0, 3], mlp=[3, 5])
    p = program_of(m)
    assert p["attn"] == [0, 1, 1, 0, 1, 1] and p["mlp"] == [1, 1, 1, 0, 1, 0]
    groups = [[(b, a, g)] for b, a, g in zip(p["block"], p["attn"], p["mlp"])]
    close(dj.apply(m, tokens), reference.forward(model, tokens, groups))


def test_repeat_and_reorder_programs(model, tokens):
    rep = D.repeat(model, [2, 3], 3)
    assert program_of(rep)["block"] == [0, 1, 2, 3, 2, 3, 2, 3, 4, 5]
    want = reference.forward(model, tokens, reference.sequential(program_of(rep)["block"]))
    close(dj.apply(rep, tokens), want)
    gated = D.drop_sublayers(model, mlp=[4])
    chain = D.reorder(gated, [0, 4, 4, 1])
    assert program_of(chain)["block"] == [0, 4, 4, 1] and program_of(chain)["mlp"] == [1, 0, 0, 1]
    groups = [[(0, 1, 1)], [(4, 1, 0)], [(4, 1, 0)], [(1, 1, 1)]]
    close(dj.apply(chain, tokens), reference.forward(model, tokens, groups))


def test_parallelize_sum_and_mean(model, tokens):
    par = D.parallelize(model, [[1, 2], [3, 4, 5]])
    assert program_of(par)["parallel"] == [False, False, True, False, True, True]
    groups = [[(0, 1, 1)], [(1, 1, 1), (2, 1, 1)], [(3, 1, 1), (4, 1, 1), (5, 1, 1)]]
    close(dj.apply(par, tokens), reference.forward(model, tokens, groups))
    mean = D.parallelize(model, [[1, 2]], combine="mean")
    # x + mean of the two layers' updates == mean of the two full layer outputs.
    groups = [[(0, 1, 1)], [(1, 0.5, 0.5), (2, 0.5, 0.5)], [(3, 1, 1)], [(4, 1, 1)], [(5, 1, 1)]]
    logits = dj.apply(mean, tokens, output="hidden")
    want = _mean_forward(model, tokens, [[0], [1, 2], [3], [4], [5]])
    close(logits, want)


def _mean_forward(model, tokens, groups):
    """Naive forward where each group's output is the mean of its layers' outputs."""
    cfg, params = model.config, model.params
    B, T = tokens.shape
    pos = np.broadcast_to(np.arange(T), (B, T))
    allowed = np.tril(np.ones((T, T), bool))[None].repeat(B, 0)
    x = params["embed"]["tok"]["embedding"][tokens]
    for g in groups:
        x = sum(reference.layer(cfg, reference.row(params, b), x, pos, allowed) for b in g) / len(g)
    return reference._norm(params["head"]["norm"], x, cfg.norm_eps, cfg.norm)


def test_drop_inside_parallel_group_keeps_groups_consistent(model, tokens):
    par = D.parallelize(model, [[1, 2, 3]])
    dropped = D.drop(par, [1])
    assert program_of(dropped)["parallel"] == [False, False, True, False, False]
    groups = [[(0, 1, 1)], [(2, 1, 1), (3, 1, 1)], [(4, 1, 1)], [(5, 1, 1)]]
    close(dj.apply(dropped, tokens), reference.forward(model, tokens, groups))


@pytest.mark.parametrize(
    "strategy, want", [("cycle", [0, 1, 2, 0, 1, 2]), ("sequence", [0, 0, 1, 1, 2, 2])]
)
def test_tie_index_maps(model, strategy, want):
    tied = D.tie(model, 3, strategy=strategy, init="lower")
    assert program_of(tied)["block"] == want and tied.n_blocks == 3 == tied.config.n_layers
    assert D.tie_map(7, 3, "cycle").tolist() == [0, 1, 2, 0, 1, 2, 0]


def test_tie_inits(model):
    rows = model.params["blocks"]
    pick = lambda t, idx: jax.tree.map(lambda a: a[np.asarray(idx)], t)
    stepwise = D.tie(model, 3, "sequence", init="stepwise")  # floor(k * 6 / 3) = 0, 2, 4
    chex.assert_trees_all_equal(stepwise.params["blocks"], pick(rows, [0, 2, 4]))
    lower = D.tie(model, 2, "cycle", init="lower")
    chex.assert_trees_all_equal(lower.params["blocks"], pick(rows, [0, 1]))
    avg = D.tie(model, 2, "cycle", init="average")  # slot 0: steps 0, 2, 4
    want = jax.tree.map(
        lambda a: np.stack([np.asarray(a)[[0, 2, 4]].mean(0), np.asarray(a)[[1, 3, 5]].mean(0)]),
        rows,
    )
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
        avg.params["blocks"],
        want,
    )


def test_tie_keep_ends_and_private_norms(model, tokens):
    tied = D.tie(model, 2, "cycle", init="average", keep_ends=True, share_norms=False)
    assert program_of(tied)["block"] == [0, 1, 2, 1, 2, 3] and tied.n_blocks == 4
    rows = D.step_rows(tied)
    for name in ("attn_norm", "mlp_norm"):  # every step runs its original norm weights
        np.testing.assert_allclose(
            rows[name]["scale"], model.params["blocks"][name]["scale"], atol=1e-7
        )
    for part in ("q", "o"):  # kernels of ends are private, middle ones are averages
        np.testing.assert_array_equal(
            rows["attn"][part]["kernel"][0], model.params["blocks"]["attn"][part]["kernel"][0]
        )


@pytest.mark.slow
def test_relax_full_rank_reproduces_original_and_rank_one_does_not(tokens):
    original = dj.init(dj.configs.get("gpt2-tiny", n_layers=4), jax.random.key(1))
    tied = D.tie(original, 2, "cycle", init="average")
    full = D.relax(tied, original, rank=64)  # min(in, out) of every kernel here is 64
    want = dj.apply(original, tokens)
    close(dj.apply(full, tokens), want, dict(rtol=1e-4, atol=1e-4))
    low = D.relax(tied, original, rank=1)
    assert not np.allclose(dj.apply(low, tokens), want, atol=1e-3)
    assert set(full.params["steps"]) == {"lora", "delta"}
    a = full.params["steps"]["lora"]["attn"]["q"]["kernel"]["a"]
    assert a.shape == (4, 64, 64)
    assert low.params["steps"]["lora"]["mlp"]["up"]["kernel"]["b"].shape == (4, 1, 256)
    with pytest.raises(ValueError, match="rank=65 is not in 1..64"):
        D.relax(tied, original, rank=65)


@pytest.mark.slow
def test_relax_lora_trains_alone(tokens):
    original = dj.init(dj.configs.get("llama-tiny"), jax.random.key(1))
    relaxed = D.relax(D.tie(original, 2), original, rank=2)

    def loss(lora):
        params = {**relaxed.params, "steps": {**relaxed.params["steps"], "lora": lora}}
        return jnp.mean(dj.apply(relaxed.replace(params=params), tokens) ** 2)

    grads = jax.grad(loss)(relaxed.params["steps"]["lora"])
    assert all(float(jnp.abs(g).sum()) > 0 for g in jax.tree.leaves(grads))


@pytest.mark.slow
def test_grow_identity_and_copy(model, tokens):
    for cfg in (
        model.config,
        dj.configs.get("gpt2-tiny"),
        dj.configs.get("llama-tiny", norm_placement="peri"),
    ):
        m = model if cfg is model.config else dj.init(cfg, jax.random.key(2))
        grown = D.grow(m, 1, init="identity")
        assert program_of(grown)["block"][:3] == [0, 1, m.n_blocks] and grown.depth == m.depth + 1
        close(dj.apply(grown, tokens), dj.apply(m, tokens))
    copied = D.grow(model, 2, init="copy")
    want = reference.forward(model, tokens, reference.sequential([0, 1, 2, 2, 3, 4, 5]))
    close(dj.apply(copied, tokens), want)
    with pytest.raises(ProgramError, match="post-norm"):
        D.grow(dj.init(dj.configs.get("bert-tiny"), jax.random.key(0)), 0)


def test_materialize_and_compact_keep_outputs(model, tokens):
    original = model
    relaxed = D.relax(D.tie(original, 3), original, rank=4)
    m = D.drop_sublayers(D.repeat(relaxed, [1, 2], 2), attn=[0, 3], mlp=[3])
    m = D.parallelize(m, [[5, 6]], combine="mean")
    want = dj.apply(m, tokens)
    mat = D.materialize(m)
    assert mat.n_blocks == m.depth and set(mat.params["steps"]) == {"scale"}
    close(dj.apply(mat, tokens), want)
    comp = D.compact(mat)
    assert comp.depth == m.depth - 1 and comp.n_blocks == comp.depth
    close(dj.apply(comp, tokens), want)
    unused = D.compact(D.drop(original, [0, 2]))
    assert unused.n_blocks == 4 and program_of(unused)["block"] == [0, 1, 2, 3]
    close(dj.apply(unused, tokens), dj.apply(D.drop(original, [0, 2]), tokens))


def test_transforms_compose_drop_tie_relax(model, tokens):
    dropped = D.drop(model, [5, 0])
    relaxed = D.relax(D.tie(dropped, 2, "sequence"), dropped, rank="full")
    want = reference.forward(model, tokens, reference.sequential([1, 2, 3, 4]))
    close(dj.apply(relaxed, tokens), want, dict(rtol=1e-4, atol=1e-4))


@pytest.mark.parametrize(
    "fn, message",
    [
        (lambda m: D.drop(m, [6]), r"\[6\] out of range.*6 steps"),
        (lambda m: D.drop(m, range(6)), "removes every step"),
        (lambda m: D.tie(m, 4, "sequence"), "sequence tying needs n_unique to divide"),
        (lambda m: D.tie(m, 7), "n_unique must be an integer in 1..6"),
        (lambda m: D.repeat(m, [1, 3], 2), "contiguous"),
        (lambda m: D.parallelize(m, [[1, 2], [2, 3]]), "overlap"),
        (lambda m: D.parallelize(m, [[1, 3]]), "consecutive"),
        (lambda m: D.reorder(m, []), "empty"),
        (lambda m: D.drop_sublayers(m, attn=[1.5]), "integers"),
        (lambda m: D.relax(D.tie(m, 2), D.drop(m, [0]), 2), "equal depth"),
        (lambda m: D.grow(m, 6), "out of range"),
    ],
)
def test_bad_input_is_rejected(model, fn, message):
    with pytest.raises((ProgramError, ValueError), match=message):
        fn(model)


def test_average_and_lines(model):
    other = dj.init(model.config, jax.random.key(9))
    soup = D.average([model, other], weights=[3, 1])
    mix = jax.tree.map(lambda a, b: 0.75 * a + 0.25 * b, model.params, other.params)
    chex.assert_trees_all_close(soup.params, mix, rtol=1e-6, atol=1e-7)
    short = other.replace(
        params={**other.params, "blocks": jax.tree.map(lambda a: a[:5], other.params["blocks"])}
    )
    with pytest.raises(ValueError, match=r"\['blocks'\]\['attn'\].*shape \(5, "):
        D.average([model, short])
    with pytest.raises(ValueError, match="different config"):
        D.average([model, D.tie(model, 3)])
    scaled = D.lines(model, other, alpha=0.5, beta=1.0)
    q, q0, q1 = (m.params["blocks"]["attn"]["q"]["kernel"] for m in (scaled, model, other))
    for i in range(6):
        lam = 0.5 + i / 5
        np.testing.assert_allclose(q[i], q0[i] + lam * (q1[i] - q0[i]), rtol=1e-5, atol=1e-6)
    tok = lambda m: m.params["embed"]["tok"]["embedding"]
    np.testing.assert_allclose(
        tok(scaled), tok(model) + 0.5 * (tok(other) - tok(model)), rtol=1e-5, atol=1e-6
    )
    with pytest.raises(ProgramError, match="materialize"):
        D.lines(D.repeat(model, [1], 2), D.repeat(other, [1], 2), 0.5, 1.0)


def test_spec_round_trip_and_errors(model, tmp_path):
    spec_text = """
description: loop and parallel
slices:
  - layer_range: [0, 2]
  - layer_range: [2, 4]
    repeat: 2
  - layers: [5, 4]
    mlp: [0, 1]
  - layer_range: [4, 6]
    parallel: true
"""
    path = tmp_path / "variant.yaml"
    path.write_text(spec_text)
    m = D.from_spec(model, D.load_spec(path))
    p = program_of(m)
    assert p["block"] == [0, 1, 2, 3, 2, 3, 5, 4, 4, 5]
    assert p["mlp"] == [1, 1, 1, 1, 1, 1, 0, 1, 1, 1]
    assert p["parallel"] == [False] * 9 + [True]
    again = D.from_spec(model, D.to_spec(m))
    assert program_of(again) == p
    seq = D.to_spec(model)
    assert seq == {"slices": [{"layer_range": [0, 6]}]}
    with pytest.raises(ProgramError, match="not in the table"):
        D.from_spec(model, {"slices": [{"layer_range": [4, 8]}]})
    with pytest.raises(ProgramError, match="unknown key 'layer_rang'.*'layer_range'"):
        D.from_spec(model, {"slices": [{"layer_rang": [0, 2]}]})
    with pytest.raises(ProgramError, match="non-empty 'slices'"):
        D.from_spec(model, {"slices": []})


def test_save_load_keeps_ties_and_cli_applies_spec(model, tokens, tmp_path):
    from depthjax import cli

    m = D.parallelize(
        D.relax(D.tie(model, 2, keep_ends=True, share_norms=False), model, rank=3),
        [[2, 3]],
        combine="mean",
    )
    dj.save(m, tmp_path / "tied")
    back = dj.load(tmp_path / "tied")
    assert back.n_blocks == 4 and back.config == m.config
    chex.assert_trees_all_equal((m.params, m.program), (back.params, back.program), strict=True)

    dj.save(model, tmp_path / "base")
    (tmp_path / "spec.yaml").write_text("slices:\n  - layer_range: [0, 3]\n  - layers: [1, 2]\n")
    assert (
        cli.main(
            [
                "depth",
                "--in",
                str(tmp_path / "base"),
                "--spec",
                str(tmp_path / "spec.yaml"),
                "--out",
                str(tmp_path / "variant"),
                "--compact",
            ]
        )
        == 0
    )
    variant = dj.load(tmp_path / "variant")
    assert program_of(variant)["block"] == [0, 1, 2, 1, 2] and variant.n_blocks == 3
    want = reference.forward(model, tokens, reference.sequential([0, 1, 2, 1, 2]))
    close(dj.apply(variant, tokens), want)
