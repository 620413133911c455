"""Distillation recovery (dj.recover(method="distill")): its loss against a numpy KL and
MSE, and that training brings the pruned program closer to the full one."""

import jax
import numpy as np
import pytest

import depthjax as dj
import depthjax.depth as D
from depthjax.pruning import healing
from depthjax.pruning.recovery import kept_steps

RNG = np.random.default_rng(3)
CALIB = [RNG.integers(0, 256, (4, 16)).astype(np.int32) for _ in range(2)]
TEST = RNG.integers(0, 256, (2, 16)).astype(np.int32)


def np_kl(student, teacher, mask, T):
    """Mean over real positions of KL(softmax(teacher/T) || softmax(student/T)), float64."""

    def log_softmax(z):
        z = np.asarray(z, np.float64) / T
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    lp, lq = log_softmax(teacher), log_softmax(student)
    kl = (np.exp(lp) * (lp - lq)).sum(-1)
    return (kl * mask).sum() / mask.sum()


@pytest.fixture(scope="module")
def model():
    """A random model whose blocks and logits are large enough that dropping a step
    changes its predictions (a fresh init is nearly uniform: KL ~ 1e-3)."""
    m = dj.init(dj.configs.get("llama-tiny", n_layers=4, d_model=32), jax.random.key(0))
    p = m.params
    grow = lambda path, x: 3 * x if path[1].key in ("o", "down") else x
    head = {**p["head"], "norm": {"scale": 6 * p["head"]["norm"]["scale"]}}
    blocks = jax.tree_util.tree_map_with_path(grow, p["blocks"])
    return m.replace(params={**p, "blocks": blocks, "head": head})


def test_kl_sums_equal_numpy_on_given_logits():
    s = RNG.normal(size=(2, 5, 7)).astype(np.float32) * 3
    t = RNG.normal(size=(2, 5, 7)).astype(np.float32) * 3
    mask = np.ones((2, 5), np.float32)
    mask[1, 3:] = 0
    s[1, 3:] = 50.0  # padding: far from the teacher, must not count
    for T in (1.0, 2.5):
        total, n = healing.kl_sums(s, t, mask, T)
        assert float(n) == 8
        np.testing.assert_allclose(float(total / n), np_kl(s, t, mask, T), rtol=1e-5)
    assert float(healing.kl_sums(t, t, mask)[0]) == pytest.approx(0, abs=1e-6)


def test_distill_loss_equals_numpy_kl_plus_hidden_mse(model):
    """The objective on a model: teacher = the full program without the student's LoRA;
    hidden term = MSE between the student's residual after pruned step j and the
    teacher's after the original step it came from (drop step 1: steps 0, 2, 3)."""
    pruned = D.drop(model, [1])
    lora = healing.init_lora(pruned, 2, jax.random.key(1))
    lora = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(2), x.shape), lora)
    student = healing.with_trained(pruned, {"lora": lora})
    mask = np.ones(TEST.shape, np.float32)
    mask[0, 12:] = 0
    teacher = {"program": model.program, "params": {}}
    T, w = 2.0, 20.0
    got = healing.distill_objective(
        student, teacher, TEST, mask, temperature=T, hidden=w, kept=kept_steps(pruned, model)
    )
    s_logits, s_tr = dj.apply(student, TEST, mask=mask, trace=True)
    t_logits, t_tr = dj.apply(model, TEST, mask=mask, trace=True)
    diff = np.asarray(s_tr.residual[1:], np.float64) - np.asarray(t_tr.residual)[[1, 3, 4]]
    mse = (diff**2 * mask[None, :, :, None]).sum() / (3 * mask.sum() * diff.shape[-1])
    want = T**2 * np_kl(s_logits, t_logits, mask, T) + w * mse
    assert w * mse > 0.05 * want  # both terms count
    np.testing.assert_allclose(float(got), want, rtol=1e-4)


def test_kept_steps_align_dropped_and_gated_programs(model):
    assert kept_steps(D.drop(model, [0, 2]), model).tolist() == [1, 3]
    assert kept_steps(D.drop_sublayers(model, attn=[1]), model).tolist() == [0, 1, 2, 3]


def test_distillation_lowers_the_kl_to_the_teacher(model):
    pruned = D.drop(model, [1])
    full = jax.jit(dj.apply)
    kl = lambda m: np_kl(full(m, TEST), full(model, TEST), np.ones(TEST.shape), 1.0)
    healed = dj.recover(
        pruned, model, CALIB, method="distill", rank=4, lora_steps=40, learning_rate=3e-3
    )
    assert set(healed.params["steps"]) == {"lora"}
    assert kl(healed) < 0.5 * kl(pruned), (kl(healed), kl(pruned))  # held-out tokens


@pytest.mark.slow
def test_distillation_trains_earlier_adapters_and_the_hidden_term(model):
    """Starting from a bias recovery, distillation (with the residual term) trains the
    adapters too and improves on them; the table is never touched."""
    pruned = D.drop(model, [1, 3])  # step 3 was last: a final adapter too
    bias = dj.recover(pruned, model, CALIB, method="bias")
    healed = dj.recover(
        bias, model, CALIB, method="distill", hidden=0.5, lora_steps=40, learning_rate=3e-3
    )
    full = jax.jit(dj.apply)
    kl = lambda m: np_kl(full(m, TEST), full(model, TEST), np.ones(TEST.shape), 1.0)
    assert kl(healed) < kl(bias) < kl(pruned)
    moved = lambda k: np.abs(
        np.asarray(healed.params[k]["bias"]) - np.asarray(bias.params[k]["bias"])
    ).max()
    assert moved("final_adapter") > 0
    assert (
        np.abs(
            np.asarray(healed.params["steps"]["adapter"]["bias"])
            - np.asarray(bias.params["steps"]["adapter"]["bias"])
        ).max()
        > 0
    )
    assert healed.params["blocks"] is pruned.params["blocks"]


@pytest.mark.slow
def test_prune_cli_recovers_by_distillation(model, tmp_path, capsys):
    """`depthjax prune --recover distill` (with its options) writes the pruned model with
    its trained LoRA."""
    from depthjax import cli

    dj.save(model, tmp_path / "ck")
    argv = ["prune", "--model", str(tmp_path / "ck"), "--n", "1", "--recover", "distill"]
    argv += ["--lora-steps", "3", "--temperature", "2", "--hidden", "0.1"]
    argv += ["--random-subsets", "0", "--batches", "1", "--batch-size", "2", "--seq-len", "16"]
    assert cli.main([*argv, "--out", str(tmp_path / "p")]) == 0
    out = capsys.readouterr().out
    assert "after distill recovery" in out
    healed = dj.load(tmp_path / "p")
    assert healed.depth == 3 and "lora" in healed.params["steps"]
