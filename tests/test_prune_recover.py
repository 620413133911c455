"""prune picks exactly the right units; recovery is exact where it must be."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import depthjax as dj
import depthjax.depth as D
import depthjax.metrics as M
from depthjax.core.program import ProgramError
from depthjax.pruning.recovery import find_spans

RNG = np.random.default_rng(1)
CALIB = [RNG.integers(0, 256, (4, 32)).astype(np.int32) for _ in range(3)]  # 384 tokens > D
TEST = RNG.integers(0, 256, (2, 24)).astype(np.int32)


def set_row(model, step, path, value):
    """A copy of model whose table row `step` has parameter `path` set to `value`."""
    blocks = jax.tree_util.tree_map_with_path(
        lambda p, t: t.at[step].set(value(t[step])) if tuple(k.key for k in p) == path else t,
        model.params["blocks"],
    )
    return model.replace(params={**model.params, "blocks": blocks})


def test_prune_removes_exactly_the_idle_steps():
    m = dj.init(dj.configs.get("llama-tiny", n_layers=6), jax.random.key(0))
    for s in (1, 4):  # zero output projections: these steps add nothing
        m = set_row(m, s, ("attn", "o", "kernel"), jnp.zeros_like)
        m = set_row(m, s, ("mlp", "down", "kernel"), jnp.zeros_like)
    bi = M.block_influence(m, CALIB)
    assert bi.values[1] == 0 and bi.values[4] == 0 and (np.delete(bi.values, [1, 4]) > 0).all()
    pruned = dj.prune(m, bi, 2)
    assert np.asarray(pruned.program.block).tolist() == [0, 2, 3, 5]
    np.testing.assert_allclose(dj.apply(pruned, TEST), dj.apply(m, TEST), rtol=1e-5, atol=1e-5)
    # Untrained attention can hurt (negative ablation); rank by |effect|: idle ones are 0.
    abl = np.abs(M.ablation(m, CALIB, unit="attn").values)
    assert abl[1] == 0 and abl[4] == 0 and (np.delete(abl, [1, 4]) > 0).all()
    attn_off = dj.prune(m, abl, 2, unit="attn")
    assert np.asarray(attn_off.program.attn).tolist() == [1, 0, 1, 1, 0, 1]


@pytest.mark.slow
def test_prune_joint_iterative_and_errors():
    m = dj.init(dj.configs.get("llama-tiny"), jax.random.key(0))
    scores = np.array([5, 1, 7, 2, 3, 8, 0.5, 6.0])  # attn_0..3, mlp_0..3
    joint = dj.prune(m, scores, 3, unit="sublayer")
    assert np.asarray(joint.program.attn).tolist() == [1, 0, 1, 0]
    assert np.asarray(joint.program.mlp).tolist() == [1, 1, 0, 1]
    again = dj.prune(joint, scores, 1, unit="sublayer")  # skips units already off
    assert np.asarray(again.program.mlp).tolist() == [0, 1, 0, 1]
    calls = []
    metric = lambda mm: calls.append(mm.depth) or M.block_influence(mm, CALIB)
    it = dj.prune(m, None, 2, unit="block", metric=metric, iterative=True)
    assert calls == [4, 3] and it.depth == 2
    with pytest.raises(ValueError, match="must have 4 values"):
        dj.prune(m, np.ones(3), 1, unit="block")
    with pytest.raises(ValueError, match="every step"):
        dj.prune(m, np.ones(4), 4, unit="block")
    with pytest.raises(ValueError, match="can remove 0..4"):
        dj.prune(m, np.ones(4), 5, unit="attn")


def test_bias_recovery_is_exact_for_a_constant_update():
    m = dj.init(dj.configs.get("gpt2-tiny", n_layers=5), jax.random.key(2))
    # Row 2 computes a constant update: its projections are zero, its biases are not.
    m = set_row(m, 2, ("attn", "o", "kernel"), jnp.zeros_like)
    m = set_row(m, 2, ("mlp", "down", "kernel"), jnp.zeros_like)
    rand = lambda i: lambda b: b + 0.5 * jax.random.normal(jax.random.key(i), b.shape)
    # random: LayerNorm centers away a uniform shift
    m = set_row(m, 2, ("mlp", "down", "bias"), rand(0))
    m = set_row(m, 4, ("attn", "o", "kernel"), jnp.zeros_like)
    m = set_row(m, 4, ("mlp", "down", "kernel"), jnp.zeros_like)
    m = set_row(m, 4, ("attn", "o", "bias"), rand(1))
    pruned = D.drop(m, [2, 4])
    assert not np.allclose(dj.apply(pruned, TEST), dj.apply(m, TEST), atol=1e-3)
    rec = dj.recover(pruned, m, CALIB, method="bias")
    assert "final_adapter" in rec.params  # step 4 was the last
    np.testing.assert_allclose(dj.apply(rec, TEST), dj.apply(m, TEST), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_bias_recovery_of_a_constant_attention_sublayer():
    m = dj.init(dj.configs.get("gpt2-tiny"), jax.random.key(3))
    m = set_row(m, 1, ("attn", "o", "kernel"), jnp.zeros_like)
    m = set_row(
        m, 1, ("attn", "o", "bias"), lambda b: b + jax.random.normal(jax.random.key(2), b.shape)
    )
    pruned = D.drop_sublayers(m, attn=[1])
    spans = find_spans(pruned, m)
    assert [(s.start, s.end, s.target) for s in spans] == [((1, 0), (1, 1), 1)]
    rec = dj.recover(pruned, m, CALIB, method="bias")
    np.testing.assert_allclose(dj.apply(rec, TEST), dj.apply(m, TEST), rtol=1e-5, atol=1e-5)


def test_linear_recovery_is_exact_for_a_linear_step():
    m = dj.init(dj.configs.get("llama-tiny", n_layers=5), jax.random.key(4))
    D_ = m.config.d_model
    k = jax.random.split(jax.random.key(5), 3)
    adapter = {
        "bias": jnp.zeros((5, D_)).at[2].set(0.1 * jax.random.normal(k[0], (D_,))),
        "a": jnp.zeros((5, D_, 3)).at[2].set(0.3 * jax.random.normal(k[1], (D_, 3))),
        "b": jnp.zeros((5, 3, D_)).at[2].set(0.3 * jax.random.normal(k[2], (3, D_))),
    }
    # Step 2 adds only c + x A (rank 3) to its input: a linear step.
    linear = D.drop_sublayers(m, attn=[2], mlp=[2]).replace(
        params={**m.params, "steps": {"adapter": adapter}}
    )
    pruned = D.drop(linear, [2])
    rec = dj.recover(pruned, linear, CALIB, method="linear", rank=3)
    np.testing.assert_allclose(dj.apply(rec, TEST), dj.apply(linear, TEST), rtol=1e-4, atol=1e-4)
    biased = dj.recover(pruned, linear, CALIB, method="bias")
    err = lambda r: float(jnp.abs(dj.apply(r, TEST) - dj.apply(linear, TEST)).max())
    assert err(biased) > 10 * err(rec)


@pytest.mark.slow
def test_recovery_on_real_pruning_helps_and_lora_trains():
    m = dj.init(dj.configs.get("llama-tiny", n_layers=6), jax.random.key(6))
    pruned = dj.prune(m, M.block_influence(m, CALIB), 2)
    # Random bytes have nothing to generalize: healing must lower the loss it trains on.
    loss = lambda mm: M.loss(mm, CALIB)
    lin = dj.recover(pruned, m, CALIB, method="linear", rank=8)
    logit_gap = lambda mm: float(jnp.abs(dj.apply(mm, TEST) - dj.apply(m, TEST)).mean())
    assert logit_gap(lin) < logit_gap(pruned)
    healed = dj.recover(pruned, m, CALIB, method="lora", rank=2, lora_steps=15, learning_rate=1e-2)
    assert loss(healed) < loss(pruned)
    assert set(healed.params["steps"]) == {"lora"}


@pytest.mark.slow
def test_recover_rejects_unrelated_models():
    m = dj.init(dj.configs.get("llama-tiny"), jax.random.key(0))
    with pytest.raises(ProgramError, match="nothing was removed"):
        dj.recover(m, m, CALIB)
    with pytest.raises(ProgramError, match="matches no remaining original step"):
        dj.recover(D.reorder(m, [3, 2]), m, CALIB)
    with pytest.raises(dj.RecoverError, match="configs differ: d_model"):
        dj.recover(
            D.drop(m, [1]),
            dj.init(dj.configs.get("llama-tiny", d_model=32), jax.random.key(0)),
            CALIB,
        )


def test_linear_and_lora_recovery_have_a_default_rank():
    m = dj.init(dj.configs.get("llama-tiny"), jax.random.key(0))
    default = dj.recover(D.drop(m, [1]), m, CALIB, method="linear")
    explicit = dj.recover(D.drop(m, [1]), m, CALIB, method="linear", rank=16)
    assert default.params["steps"]["adapter"]["a"].shape[-1] == 16
    jax.tree.map(np.testing.assert_array_equal, default.params, explicit.params)


@pytest.mark.slow
def test_prune_and_depth_cli_carry_the_tokenizer_and_default_rank(tmp_path, capsys):
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    from depthjax import cli
    from depthjax.files import integrity

    m = dj.init(dj.configs.get("llama-tiny", n_layers=3, d_model=32), jax.random.key(0))
    dj.hf.save(m, str(tmp_path / "hf"))
    tok = Tokenizer(
        models.WordLevel({chr(i): i for i in range(255)} | {"[UNK]": 255}, unk_token="[UNK]")
    )
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # characters
    tok.save(str(tmp_path / "hf" / "tokenizer.json"))
    data = ["--batches", "1", "--batch-size", "2", "--seq-len", "16"]
    assert (
        cli.main(
            [
                "prune",
                "--model",
                str(tmp_path / "hf"),
                "--n",
                "1",
                "--recover",
                "linear",
                "--out",
                str(tmp_path / "pruned"),
                *data,
            ]
        )
        == 0
    )
    pruned = tmp_path / "pruned"
    original = (tmp_path / "hf" / "tokenizer.json").read_bytes()
    assert (pruned / "tokenizer.json").read_bytes() == original
    assert "tokenizer.json" in integrity.load_sealed(pruned / "manifest.json")["files"]
    assert dj.load(pruned).params["steps"]["adapter"]["a"].shape[-1] == 16  # min(16, d_model)
    # depth: the tokenizer of a native checkpoint goes into the edited one.
    dj.save(m, tmp_path / "native", files=[tmp_path / "hf" / "tokenizer.json"])
    (tmp_path / "spec.yaml").write_text("slices:\n  - layers: [1, 0]\n")
    assert (
        cli.main(
            [
                "depth",
                "--in",
                str(tmp_path / "native"),
                "--spec",
                str(tmp_path / "spec.yaml"),
                "--out",
                str(tmp_path / "reordered"),
            ]
        )
        == 0
    )
    assert (tmp_path / "reordered" / "tokenizer.json").exists()
    capsys.readouterr()


@pytest.mark.slow
def test_score_and_prune_cli(tmp_path, capsys):
    import json

    from depthjax import cli

    dj.save(dj.init(dj.configs.get("llama-tiny"), jax.random.key(0)), tmp_path / "ck")
    data = ["--batches", "1", "--batch-size", "2", "--seq-len", "32"]
    assert (
        cli.main(
            [
                "score",
                "--model",
                str(tmp_path / "ck"),
                "--out",
                str(tmp_path / "rep"),
                "--shapley-permutations",
                "2",
                *data,
            ]
        )
        == 0
    )
    report = json.loads((tmp_path / "rep" / "scores.json").read_text())
    assert len(report["scores"]["block_influence"]["values"]) == 4
    assert len(report["removal_curves"]["ablation_block"]) == 4
    assert (tmp_path / "rep" / "profiles.png").stat().st_size > 1000
    assert (
        cli.main(
            [
                "prune",
                "--model",
                str(tmp_path / "ck"),
                "--metric",
                "ablation",
                "--unit",
                "attn",
                "--n",
                "2",
                "--recover",
                "bias",
                "--out",
                str(tmp_path / "pruned"),
                *data,
            ]
        )
        == 0
    )
    pruned = dj.load(tmp_path / "pruned")
    assert float(pruned.program.attn.sum()) == 2 and "adapter" in pruned.params["steps"]
    out = capsys.readouterr().out
    assert "after bias recovery" in out
    # The random control: every one of the 4 choose 2 attention pairs, mean ± std.
    number = r"([\d.]+)"
    control = re.search(
        rf"random 2 attn units {number} ± {number} \(min {number}, max {number}\) "
        r"over all 6 subsets",
        out,
    )
    mean, std, lo, hi = map(float, control.groups())
    assert lo <= mean <= hi and std > 0
