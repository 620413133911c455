"""Early-exit training (depthjax.train.layerskip) against references: the early-exit loss
equals a naive per-exit cross-entropy of truncated models, a dropped step equals the
program without it, rate 0 equals plain training, rates / curricula follow their formulas,
masks depend on (seed, step) only, and a killed run resumes bit-exactly."""

import json
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import depthjax as dj
from depthjax.train import config as train_config
from depthjax.train.layerskip import LayerSkip, LayerSkipError, loss_sums, with_dropout
from depthjax.train.step import (
    learning_rate,
    loss_sums as plain_loss_sums,
    optimizer,
    train_step,
    trainable_mask,
)
from tests.test_model import _model
from tests.test_train_step import _setup

_apply = jax.jit(dj.apply)


def _naive_ce(model, batch):
    """Sum of next-token cross-entropies over real targets, from log_softmax by hand."""
    logits = _apply(
        model, batch["inputs"], segment_ids=batch["segment_ids"], positions=batch["positions"]
    )
    logp = np.asarray(jax.nn.log_softmax(logits), np.float64)
    w = np.asarray(batch["segment_ids"]) > 0
    picked = np.take_along_axis(logp, np.asarray(batch["targets"])[..., None], -1)[..., 0]
    return -(picked * w).sum()


@pytest.fixture(scope="module")
def tiny():
    """A 4-step llama-tiny (the generation tests' model) and a packed, padded batch."""
    model = _model(dj.configs.get("llama-tiny", n_layers=4))
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 256, (4, 17)).astype(np.int32)
    seg = np.ones((4, 16), np.int32)
    seg[1, 10:] = 2
    seg[3, 12:] = 0  # padding
    batch = {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "segment_ids": seg,
        "positions": np.asarray(dj.core.model.segment_positions(jnp.asarray(seg))),
    }
    return model, batch


def _with_keep(batch, ls, step=0):
    return {**batch, "keep": ls.keep_mask(step, batch["inputs"].shape[0])}


def test_early_exit_loss_equals_naive_per_exit_cross_entropy(tiny):
    model, batch = tiny
    ls = LayerSkip(depth=4, total_steps=10, exits=(1, 3), weights=(0.5, 2.0))
    total, (count, nll) = jax.jit(lambda p, b: loss_sums(p, model.config, model.program, b, ls, 0))(
        model.params, _with_keep(batch, ls)
    )
    # Reference: exit k is the model with every step from k on switched off (both gates 0:
    # the final residual is residual[k]), the loss computed by hand.
    off = lambda k: dj.depth.drop_sublayers(model, attn=range(k, 4), mlp=range(k, 4))
    want = [_naive_ce(model, batch)] + [_naive_ce(off(k), batch) for k in (1, 3)]
    np.testing.assert_allclose(nll, want, rtol=1e-5)
    np.testing.assert_allclose(total, (want[0] + 0.5 * want[1] + 2.0 * want[2]) / 3.5, rtol=1e-5)
    assert count == (np.asarray(batch["segment_ids"]) > 0).sum()


def test_dropped_steps_equal_the_program_without_them(tiny):
    model = dj.depth.parallelize(tiny[0], [[2, 3]])  # a dropped member of a parallel group too
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (3, 10)), jnp.int32)
    keep = np.array([[1, 1, 1, 1], [1, 0, 1, 0], [1, 1, 0, 1]], bool)
    got = _apply(model.replace(params=with_dropout(model.params, jnp.asarray(keep))), tokens)
    for b in range(3):  # reference: the program with those steps' gates at 0 (same depth)
        gone = np.flatnonzero(~keep[b])
        dropped = dj.depth.drop_sublayers(model, attn=gone, mlp=gone)
        np.testing.assert_allclose(got[b], _apply(dropped, tokens[b : b + 1])[0], atol=1e-5)


@pytest.mark.slow
def test_rate_zero_equals_plain_training(tiny):
    """The dropout path with every rate 0 (the exp schedule is 0 at step 0) gives the plain
    loss and gradient, and with both features off the config builds no LayerSkip at all."""
    model, batch = tiny
    assert LayerSkip.from_config(train_config.parse([]), model.program) is None
    ls = LayerSkip(depth=4, total_steps=10, dropout=0.9, dropout_schedule="exp")
    assert float(jnp.max(ls.drop_rates(0))) == 0.0 and float(jnp.max(ls.drop_rates(5))) > 0
    cfg, program = model.config, model.program
    plain = jax.jit(jax.value_and_grad(lambda p: plain_loss_sums(p, cfg, program, batch)[0]))
    skip = jax.jit(
        jax.value_and_grad(lambda p: loss_sums(p, cfg, program, _with_keep(batch, ls), ls, 0)[0])
    )
    (want, want_g), (got, got_g) = plain(model.params), skip(model.params)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(want_g), jax.tree.leaves(got_g)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_drop_rates_follow_depth_and_time_scales():
    L, T = 5, 11
    ls = LayerSkip(depth=L, total_steps=T, dropout=0.4, dropout_schedule="linear")
    steps = np.arange(L)
    np.testing.assert_allclose(ls.drop_rates(5), 0.4 * (2 ** (steps / 4) - 1) * 0.5, rtol=1e-6)
    lin = LayerSkip(
        depth=L, total_steps=T, dropout=0.4, dropout_depth="linear", dropout_schedule="exp"
    )
    np.testing.assert_allclose(lin.drop_rates(10), 0.4 * steps / 4 * 1.0, rtol=1e-6)
    uni = LayerSkip(depth=L, total_steps=T, dropout=0.3, dropout_depth="uniform")
    np.testing.assert_allclose(uni.drop_rates(3), np.full(L, 0.3), rtol=1e-6)
    # The masks drop at those rates (statistically: 20000 rows, 4.5 sigma)...
    keep = np.asarray(uni.keep_mask(7, 20000))
    rate = 1 - keep.mean(0)
    assert np.all(np.abs(rate - 0.3) < 4.5 * np.sqrt(0.3 * 0.7 / 20000)), rate
    # ...independently per row and step, and as a function of (seed, step) only.
    assert abs(np.corrcoef(keep[:, 0], keep[:, 1])[0, 1]) < 0.05
    np.testing.assert_array_equal(uni.keep_mask(7, 64), uni.keep_mask(7, 64))
    assert not np.array_equal(uni.keep_mask(7, 64), uni.keep_mask(8, 64))
    other = LayerSkip(depth=L, total_steps=T, dropout=0.3, dropout_depth="uniform", seed=1)
    assert not np.array_equal(uni.keep_mask(7, 64), other.keep_mask(7, 64))


def test_exit_curricula():
    kw = dict(depth=5, total_steps=100, exits=(1, 2, 3), weights=(1.0, 2.0, 3.0))
    none = LayerSkip(**kw)
    np.testing.assert_array_equal(none.exit_weights(17), [1, 2, 3])
    rot = LayerSkip(**kw, curriculum="rotational", rotation=2)
    np.testing.assert_array_equal(rot.exit_weights(0), [1, 0, 3])
    np.testing.assert_array_equal(rot.exit_weights(1), [0, 2, 0])
    grad = LayerSkip(**kw, curriculum="gradual", curriculum_steps=80)
    # exit i of 3 turns on at (3 - i) * 80 / 4: the deepest at 20, the shallowest at 60.
    for t, want in (
        (0, [0, 0, 0]),
        (19, [0, 0, 0]),
        (20, [0, 0, 3]),
        (40, [0, 2, 3]),
        (59, [0, 2, 3]),
        (60, [1, 2, 3]),
    ):
        np.testing.assert_array_equal(grad.exit_weights(t), want, err_msg=str(t))


@pytest.mark.slow
def test_grad_accumulation_with_dropout_equals_one_big_batch():
    model, state, batch, _ = _setup()
    # Adam's first step is ~ lr * sign(grad): a gradient within float error of 0 flips it, so
    # eps=1e-3 makes the step continuous in the gradient (the property is grad == grad).
    tc = train_config.parse(["model.n_layers=2", "warmup_steps=0", "lr=1e-2", "eps=1e-3"])
    ls = LayerSkip(
        depth=2, total_steps=10, dropout=0.7, dropout_depth="uniform", exits=(1,), weights=(0.5,)
    )
    mask = trainable_mask(model.params, ".*")
    run = jax.jit(
        lambda s, b, accum: train_step(
            s,
            b,
            model.program,
            cfg=model.config,
            tx=optimizer(tc),
            mask=mask,
            grad_accum=accum,
            nan_policy="stop",
            schedule=learning_rate(tc),
            layerskip=ls,
        ),
        static_argnums=2,
    )
    (one, m1), (two, m2) = run(state, batch, 1), run(state, batch, 2)
    assert not np.asarray(ls.keep_mask(0, 4)).all(), "the mask should drop something"
    for k in ("loss", "objective", "exit_loss", "grad_norm"):
        np.testing.assert_allclose(m1[k], m2[k], rtol=1e-5, err_msg=k)
    for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(two.params), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4)  # Adam's first step ~ lr * sign(grad)


def test_bad_settings_name_the_problem():
    program = dj.Program.sequential(4)
    parse = lambda *keys: train_config.parse(list(keys))
    with pytest.raises(LayerSkipError, match=r"exit_steps \[4\] outside 1..3"):
        LayerSkip.from_config(parse("exit_steps=2,4"), program)
    with pytest.raises(LayerSkipError, match="parallel group"):
        LayerSkip.from_config(
            parse("exit_steps=2"), program.replace(parallel=jnp.array([False, False, True, False]))
        )
    with pytest.raises(LayerSkipError, match="increasing"):
        LayerSkip.from_config(parse("exit_steps=3,1"), program)
    with pytest.raises(LayerSkipError, match="2 entries for 3"):
        LayerSkip.from_config(parse("exit_steps=all", "exit_weights=1,2"), program)
    assert LayerSkip.from_config(parse("exit_steps=all", "exit_weights=0.3"), program).weights == (
        0.3,
        0.3,
        0.3,
    )
    for keys, match in (
        (["layer_dropout=1.5"], r"layer_dropout must be in \[0, 1\]"),
        (["exit_steps=a,b"], "exit_steps must be integers"),
        (["exit_steps=1,2", "exit_weights=1,2,3"], "3 entries for exit_steps"),
        (["exit_curriculum=sometimes"], "exit_curriculum"),
    ):
        with pytest.raises(train_config.TrainConfigError, match=match):
            parse(*keys)
    assert LayerSkip.from_config(parse("exit_steps=all"), program).exits == (1, 2, 3)
    assert parse("exit_steps=2").exit_steps == [2]


# ------------------------------------------------------------------ whole runs
@pytest.mark.slow
def test_continued_pretraining_from_hf_resumes_bit_exactly_after_kill9(tmp_path):
    """`depthjax train init_from=<HF dir>` with layer dropout and early exits: a run killed
    (SIGKILL) right after checkpoint 4 was issued resumes from checkpoint 2 and logs the
    losses of the uninterrupted run."""
    from tests.test_train import _losses, _train

    model = dj.init(dj.configs.get("llama-tiny", n_layers=2), jax.random.key(5))
    dj.hf.save(model, str(tmp_path / "hf"))
    keys = [
        f"init_from={tmp_path / 'hf'}",
        "layer_dropout=0.5",
        "layer_dropout_depth=uniform",
        "exit_steps=1",
        "exit_weights=0.5",
        "exit_curriculum=rotational",
        "steps=5",
        "checkpoint_every=2",
    ]
    _train(tmp_path / "ref", *keys)
    proc = _train(tmp_path / "run", *keys, env={"DEPTHJAX_TEST_KILL_IN_SAVE": "4"}, check=False)
    assert proc.returncode == -signal.SIGKILL
    proc = _train(tmp_path / "run", *keys)
    assert "resumed from checkpoint 2" in proc.stderr
    ref, got = _losses(tmp_path / "ref"), _losses(tmp_path / "run")
    assert sorted(got) == sorted(ref) == [1, 2, 3, 4, 5]
    for step, losses in got.items():
        assert all(loss == ref[step][0] for loss in losses), (step, losses, ref[step])
    rows = [
        json.loads(line) for line in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()
    ]
    assert {"objective", "exit_loss_1"} <= set(rows[0])
    # Rotational curriculum: the exit is on at steps t = 0, 2, 4 (logged as steps 1, 3, 5).
    for r in rows:
        want = (r["loss"] + 0.5 * r["exit_loss_1"]) / 1.5 if r["step"] % 2 else r["loss"]
        assert abs(r["objective"] - want) < 1e-5, r
    trained = dj.load(tmp_path / "ref" / "model")
    assert trained.depth == 2 and trained.config == model.config
