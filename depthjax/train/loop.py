"""`depthjax train`: sharded, checkpointed, resumable training.

    run(out_dir, TrainConfig) -> final TrainState

One process per host (jax.distributed on TPU pods / multi-GPU), a Mesh(data, fsdp,
tensor) over all devices, parameters sharded by the rules in depthjax.sharding, the step
jitted with explicit shardings. Checkpoints (orbax CheckpointManager, async, keep-last-N,
atomic) hold the train state, the grain iterator state and the config/program, so a run
killed at any moment resumes from the latest complete checkpoint and continues
bit-for-bit. A checkpoint that fails to restore is moved aside with a warning.
"""

from __future__ import annotations

import functools
import json
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .. import checkpoint as native_ckpt, data as data_lib, sharding as shd
from ..model import DepthModel, count_params, init
from ..program import Program
from . import flops as flops_lib
from .checkpoints import TrainCheckpoints
from .config import TrainConfig
from .layerskip import LayerSkip
from .logs import RunLog
from .step import TrainState, eval_loss_sums, learning_rate, optimizer, train_step, trainable_mask

# Keys that may change between a run and its resumption without breaking bit-exactness.
_RESUMABLE_CHANGES = {
    "log_every",
    "checkpoint_every",
    "keep_checkpoints",
    "async_checkpoint",
    "tensorboard",
    "eval_every",
    "eval_batches",
    "peak_tflops",
    "distributed",
}


class NonFiniteLossError(RuntimeError):
    """Training stopped because a loss or gradient was NaN/inf (nan_policy='stop')."""


def maybe_initialize_distributed(mode: str) -> None:
    """jax.distributed.initialize() for multi-process launches (TPU pods, multi-GPU SLURM
    or explicit JAX_COORDINATOR_ADDRESS); a no-op for one process."""
    if mode == "off":
        return
    env = os.environ
    detected = (
        bool(env.get("JAX_COORDINATOR_ADDRESS"))
        or int(env.get("SLURM_NTASKS", "1")) > 1
        or "," in env.get("TPU_WORKER_HOSTNAMES", "")
        or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
    )
    if mode == "on" or detected:
        # jax reads JAX_COORDINATOR_ADDRESS itself but not the process count/id: pass them.
        explicit = {
            k: int(env[v])
            for k, v in (("num_processes", "JAX_NUM_PROCESSES"), ("process_id", "JAX_PROCESS_ID"))
            if v in env
        }
        jax.distributed.initialize(**explicit)


# -- setup -------------------------------------------------------------------------------
def _initial_model(tc: TrainConfig) -> tuple:
    """(config, program, params init fn or loaded params) for a fresh run."""
    if tc.init_from:
        model = native_ckpt.load_model(tc.init_from)  # native or Hugging Face
        cfg = model.config.replace(**tc.model_overrides) if tc.model_overrides else model.config
        native_ckpt.check_params(cfg, model.params)
        return cfg, model.program, model.params
    cfg = tc.model_config()
    return cfg, Program.sequential(cfg.n_layers), None


def _data_iter(
    tc: TrainConfig, split: str, out_dir: Path, vocab_size: int, local_batch: int, seed: int
):
    tok = data_lib.load_tokenizer(tc.tokenizer)
    if tok.vocab_size > vocab_size:
        raise data_lib.DataError(
            f"tokenizer has {tok.vocab_size} tokens but the model's vocab_size is {vocab_size}"
        )
    docs = data_lib.documents(
        tc.data,
        split,
        data_files=tc.data_files,
        data_dir=tc.tfds_data_dir or (str(out_dir / "data") if tc.data == "files" else None),
        tfds_name=tc.tfds_name,
        text_key=tc.text_key,
        train_split=tc.train_split,
        valid_split=tc.valid_split,
    )
    return data_lib.pipeline(
        docs,
        tok,
        seq_len=tc.seq_len,
        batch_size=local_batch,
        seed=seed,
        shard_index=jax.process_index(),
        shard_count=jax.process_count(),
        shuffle_window=tc.shuffle_window,
    )


def _global_batch(local: dict, sharding, global_rows: int):
    return {
        k: jax.make_array_from_process_local_data(
            sharding, np.asarray(v, np.int32), (global_rows, v.shape[1])
        )
        for k, v in local.items()
    }


def _check_resume_compatible(stored: dict, tc: TrainConfig, log: RunLog) -> None:
    now = json.loads(json.dumps(tc.to_dict()))
    changed = sorted(
        k
        for k in set(stored) | set(now)
        if stored.get(k) != now.get(k) and k not in _RESUMABLE_CHANGES
    )
    if changed:
        log.message(
            "WARNING: resuming with changed keys "
            + ", ".join(f"{k}: {stored.get(k)!r} -> {now.get(k)!r}" for k in changed)
            + "; the run will not match an uninterrupted one"
        )


def state_shardings(abstract_params, mask, tx, mesh) -> TrainState:
    """Shardings of a TrainState: params by the rules table, optimizer moments like their
    parameters, counters replicated."""
    param_sh = shd.param_shardings(abstract_params, mesh)
    repl = shd.replicated(mesh)
    trainable_sh = jax.tree.map(lambda m, s: s if m else None, mask, param_sh)
    abstract_opt = jax.eval_shape(
        tx.init, jax.tree.map(lambda m, x: x if m else None, mask, abstract_params)
    )
    opt_sh = optax.tree_map_params(
        tx,
        lambda _, s: s,
        abstract_opt,
        trainable_sh,
        transform_non_params=lambda _: repl,
        is_leaf=lambda x: x is None,
    )
    return TrainState(step=repl, params=param_sh, opt_state=opt_sh, bad_step=repl, skipped=repl)


# -- the loop ----------------------------------------------------------------------------
def run(out_dir, tc: TrainConfig, *, stream=None) -> TrainState:
    """Train into `out_dir` (resuming from its checkpoints). Returns the final state and
    writes the final model with dj.save to out_dir/model."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    maybe_initialize_distributed(tc.distributed)
    main_process = jax.process_index() == 0
    log = RunLog(out_dir, tc.steps, tensorboard=tc.tensorboard, enabled=main_process, stream=stream)
    mesh = shd.make_mesh(tc.mesh.data, tc.mesh.fsdp, tc.mesh.tensor)
    if (
        tc.batch_size % (shd.batch_divisor(mesh) * tc.grad_accum)
        or tc.batch_size % jax.process_count()
    ):
        raise ValueError(
            f"batch_size={tc.batch_size} must be divisible by grad_accum="
            f"{tc.grad_accum} x the {shd.batch_divisor(mesh)} data-parallel "
            f"devices and by the {jax.process_count()} processes"
        )

    cfg, program, loaded_params = _initial_model(tc)
    layerskip = LayerSkip.from_config(tc, program)  # None when both are off
    abstract_params = (
        jax.eval_shape(lambda k: init(cfg, k).params, jax.random.key(0))
        if loaded_params is None
        else jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), loaded_params)
    )
    mask = trainable_mask(abstract_params, tc.trainable)
    tx, schedule = optimizer(tc), learning_rate(tc)
    state_sh = state_shardings(abstract_params, mask, tx, mesh)
    param_sh, repl = state_sh.params, state_sh.step

    def fresh_state(key):
        params = init(cfg, key).params if loaded_params is None else loaded_params
        opt_state = tx.init(jax.tree.map(lambda m, x: x if m else None, mask, params))
        return TrainState(
            step=jnp.int32(0),
            params=params,
            opt_state=opt_state,
            bad_step=jnp.int32(-1),
            skipped=jnp.int32(0),
        )

    ckpts = TrainCheckpoints((out_dir / "checkpoints").absolute(), tc)
    abstract_state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        jax.eval_shape(fresh_state, jax.random.key(0)),
        state_sh,
    )
    local_rows = tc.batch_size // jax.process_count()
    train_ds = _data_iter(tc, "train", out_dir, cfg.vocab_size, local_rows, tc.seed)
    data_it = iter(train_ds)
    meta = {
        "model_config": cfg.to_dict(),
        "program": program.to_dict(),
        "train_config": json.loads(json.dumps(tc.to_dict())),
    }

    restored = ckpts.restore_latest(abstract_state, log)
    if restored is not None:
        step0, state, data_state, stored_meta = restored
        if (
            stored_meta["model_config"] != meta["model_config"]
            or stored_meta["program"] != meta["program"]
        ):
            raise ValueError(
                f"{out_dir} holds a run of a different model or program; use "
                "another --out or the same model keys"
            )
        _check_resume_compatible(stored_meta["train_config"], tc, log)
        data_it.set_state(data_state)
        log.message(f"resumed from checkpoint {step0} in {out_dir / 'checkpoints'}")
    else:
        step0 = 0
        state = jax.jit(fresh_state, out_shardings=state_sh)(jax.random.key(tc.seed))

    step_fn = jax.jit(
        functools.partial(
            train_step,
            cfg=cfg,
            tx=tx,
            mask=mask,
            grad_accum=tc.grad_accum,
            nan_policy=tc.nan_policy,
            schedule=schedule,
            layerskip=layerskip,
        ),
        in_shardings=(state_sh, shd.batch_sharding(mesh), repl),
        out_shardings=(state_sh, repl),
        donate_argnums=0,
    )
    eval_fn = jax.jit(
        functools.partial(eval_loss_sums, cfg=cfg),
        in_shardings=(param_sh, shd.batch_sharding(mesh), repl),
    )
    program_dev = jax.device_put(program, repl)
    flops_per_token = flops_lib.train_flops_per_token(cfg, tc.seq_len, program.depth)
    peak = (
        tc.peak_tflops * 1e12
        if tc.peak_tflops
        else flops_lib.peak_flops(jax.devices()[0], cfg.dtype)
    )
    if step0 == 0:
        log.message(
            f"{cfg.family} model, {count_params(abstract_params):,} parameters, mesh "
            f"{dict(mesh.shape)}, {jax.device_count()} {jax.devices()[0].device_kind} "
            f"device(s), {jax.process_count()} process(es)"
        )

    def check_finite(state, step):
        bad = int(jax.device_get(state.bad_step))
        if bad >= 0:
            ckpts.wait()
            good = ckpts.manager.latest_step()
            where = (
                f"checkpoint {good} in {out_dir / 'checkpoints'}"
                if good is not None
                else "no checkpoint (none was saved yet)"
            )
            raise NonFiniteLossError(
                f"non-finite loss or gradient at step {bad + 1}: "
                f"training stopped at step {step}; last good state: "
                f"{where} (nan_policy=skip would skip such steps)"
            )

    step, last_t, last_step = step0, time.time(), step0
    try:
        log.start(step0)  # cuts what an earlier attempt logged after step0
        while step < tc.steps:
            local = next(data_it)
            state, metrics = step_fn(
                state, _global_batch(local, shd.batch_sharding(mesh), tc.batch_size), program_dev
            )
            step += 1
            done = step == tc.steps
            if step % tc.log_every == 0 or done:
                m = jax.device_get(metrics)
                now = time.time()
                tps = (step - last_step) * tc.batch_size * tc.seq_len / (now - last_t)
                record = {
                    "step": step,
                    "time": now,
                    "loss": float(m["loss"]),
                    "grad_norm": float(m["grad_norm"]),
                    "lr": float(m["lr"]),
                    "tokens_per_s": tps,
                    "mfu": (tps * flops_per_token / (peak * jax.device_count()) if peak else None),
                    "step_time_s": (now - last_t) / (step - last_step),
                }
                if layerskip is not None:
                    record["objective"] = float(m["objective"])
                    record.update(
                        {
                            f"exit_loss_{k}": float(v)
                            for k, v in zip(layerskip.exits, m["exit_loss"])
                        }
                    )
                if tc.nan_policy == "skip":
                    record["skipped"] = int(jax.device_get(state.skipped))
                if tc.eval_every and (step % tc.eval_every == 0 or done):
                    record["eval_loss"] = _evaluate(
                        tc, out_dir, cfg, eval_fn, state, program_dev, mesh
                    )
                check_finite(state, step)
                log.log(record)
                last_t, last_step = time.time(), step
            if step % tc.checkpoint_every == 0 or done:
                check_finite(state, step)
                ckpts.save(step, state, data_it.get_state(), meta)
        ckpts.wait()
        if main_process or jax.process_count() == 1:
            final = jax.device_get(state.params) if jax.process_count() == 1 else None
            if final is not None:
                native_ckpt.save(DepthModel(cfg, final, program), out_dir / "model")
        log.message(f"done: {step} steps; final model in {out_dir / 'model'}")
    finally:
        ckpts.close()
        log.close()
    return state


def _evaluate(tc, out_dir, cfg, eval_fn, state, program_dev, mesh) -> float:
    """Mean loss over the first `eval_batches` validation batches (the same every time)."""
    it = iter(
        _data_iter(
            tc, "valid", out_dir, cfg.vocab_size, tc.batch_size // jax.process_count(), seed=tc.seed
        )
    )
    total, count = 0.0, 0.0
    for _ in range(tc.eval_batches):
        s, n = eval_fn(
            state.params,
            _global_batch(next(it), shd.batch_sharding(mesh), tc.batch_size),
            program_dev,
        )
        total, count = total + float(s), count + float(n)
    return total / max(count, 1.0)
