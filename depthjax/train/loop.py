"""`depthjax train`: sharded, checkpointed, resumable training.

    run(out_dir, TrainConfig) -> final TrainState

One process per host (jax.distributed on TPU pods / multi-GPU), a Mesh(data, fsdp,
tensor) over all devices, parameters sharded by the rules in depthjax.core.sharding, the step
jitted with explicit shardings. The run directory is owned (run_dir: run.json says which
run it holds, run.lock who writes it). Checkpoints (orbax CheckpointManager, async,
keep-last-N, atomic, sealed with the SHA-256 of every file) hold the train state, the
data iterator states and the config/program, so a run killed at any moment resumes from
the latest complete checkpoint and continues bit-for-bit; one that fails verification or
restore is set aside with its reason. The global batch of step k is a function of the
seed, k and the data keys only (data.ShardedBatches), so a run also resumes on any
number of processes whose devices split the batch along data-shard boundaries.

Seeds as an axis (`seeds=N`): the TrainState gets a leading [N] axis (seed seed+i's init
in row i; the axis is not sharded), `jax.vmap` of the train step maps it and a [N, B, T]
batch stacked from one data stream per seed, sharing the program; evaluation is vmapped
the same way. Each seed's numbers equal a separate run with that seed (to float
tolerance: XLA may fuse the batched step differently), checkpoints hold the stacked state
and every seed's data state, and the final models go to DIR/models/seed-S. With seeds=1
nothing is vmapped: the step is the one a single run always compiled.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from ..core import flops as flops_lib, sharding as shd
from ..core.model import DepthModel, count_params, init
from ..core.program import Program
from ..errors import DepthjaxError
from ..files import atomic, checkpoint as native_ckpt
from ..files.model_dir import ModelDir
from . import data as data_lib, hosts, memory, run_dir
from .checkpoints import TrainCheckpoints
from .config import TrainConfig, TrainConfigError
from .layerskip import LayerSkip
from .logs import RunLog
from .step import TrainState, eval_loss_sums, learning_rate, optimizer, train_step, trainable_mask


class NonFiniteLossError(DepthjaxError, RuntimeError):
    """Training stopped because a loss or gradient was NaN/inf (nan_policy='stop'). Still a
    RuntimeError too; `depthjax train` reports it with exit code 3, not as bad input."""


def maybe_initialize_distributed(mode: str, heartbeat_timeout: int = 100) -> None:
    """jax.distributed.initialize() for multi-process launches (TPU pods, multi-GPU SLURM
    or explicit JAX_COORDINATOR_ADDRESS); a no-op for one process. A process that sends
    no heartbeat for `heartbeat_timeout` seconds is declared dead, and every other process
    then exits with jax's "another task died" error instead of hanging."""
    if mode == "off" or jax.distributed.is_initialized():
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
        if "heartbeat_timeout_seconds" in inspect.signature(jax.distributed.initialize).parameters:
            explicit["heartbeat_timeout_seconds"] = heartbeat_timeout
        jax.distributed.initialize(**explicit)
    if jax.process_count() > 1 and jax.default_backend() == "cpu":
        # jax's persistent compilation cache hands a process the CPU executable another
        # process compiled for its own devices; with gloo, the step's all-reduces then wait
        # for partners that never come (the run hangs until the collective timeout).
        jax.config.update("jax_enable_compilation_cache", False)


# -- setup -------------------------------------------------------------------------------
def _initial_model(tc: TrainConfig) -> tuple:
    """(config, program, params init fn or loaded params) for a fresh run."""
    if tc.init_from:
        # native or Hugging Face, as float32 master weights whatever dtype it was saved in
        model = ModelDir.read(tc.init_from, param_dtype="float32").model
        cfg = model.config.replace(**tc.model_overrides) if tc.model_overrides else model.config
        native_ckpt.check_params(cfg, model.params)
        return cfg, model.program, model.params
    cfg = tc.model_config()
    return cfg, Program.sequential(cfg.n_layers), None


def data_shards(tc: TrainConfig) -> int:
    """The number of data shards: `data_shards`, or gcd(batch_size, 64)."""
    return tc.data_shards or math.gcd(tc.batch_size, 64)


def describe_data(tc: TrainConfig) -> str:
    """How batches are drawn, for the run's first log line."""
    shuffle = (
        f"shuffle window {tc.shuffle_window}"
        if tc.shuffle_window > 1
        else f"no shuffling (shuffle_window={tc.shuffle_window}: documents in file order)"
    )
    return f"{data_shards(tc)} data shards, {shuffle}"


def local_shards(sharding, tc: TrainConfig) -> list[int]:
    """The data shards whose rows this process's devices hold."""
    rows, held = tc.batch_size // data_shards(tc), set()
    for index in sharding.addressable_devices_indices_map((tc.batch_size, tc.seq_len)).values():
        r = index[0]
        held.update(range(r.start or 0, tc.batch_size if r.stop is None else r.stop))
    return sorted({row // rows for row in held})


def _documents(tc: TrainConfig, split: str, out_dir: Path):
    kw = dict(
        data_files=tc.data_files,
        tfds_name=tc.tfds_name,
        text_key=tc.text_key,
        data_dir=tc.tfds_data_dir or (str(out_dir / "data") if tc.data == "files" else None),
        train_split=tc.train_split,
        valid_split=tc.valid_split,
    )
    docs = data_lib.documents(tc.data, split, **kw) if jax.process_index() == 0 else None
    hosts.barrier(f"depthjax-data-{split}")  # data=files is prepared once, by process 0
    return docs if docs is not None else data_lib.documents(tc.data, split, **kw)


def run_seeds(tc: TrainConfig) -> list[int]:
    """The seeds one run trains: seed, seed+1, ..., seed+seeds-1."""
    return list(range(tc.seed, tc.seed + tc.seeds))


def _data_iter(tc: TrainConfig, split: str, out_dir: Path, vocab_size: int, shards):
    """One data stream per seed (data_lib.SeedBatches), over documents read once."""
    tok = data_lib.load_tokenizer(tc.tokenizer)
    if tok.vocab_size > vocab_size:
        raise data_lib.DataError(
            f"tokenizer has {tok.vocab_size} tokens but the model's vocab_size is {vocab_size}"
        )
    return data_lib.SeedBatches(
        _documents(tc, split, out_dir),
        tok,
        seeds=run_seeds(tc),
        seq_len=tc.seq_len,
        batch_size=tc.batch_size,
        n_shards=data_shards(tc),
        shards=shards,
        shuffle_window=tc.shuffle_window,
    )


def _global_batch(seed_batches: list[dict], sharding, tc: TrainConfig) -> dict:
    """The global arrays from this process's shards (shard s holds rows [s*b, (s+1)*b));
    each device gets its rows. seed_batches: one {shard: batch} per seed; int32
    [batch_size, seq_len] each for one seed, [seeds, batch_size, seq_len] for several."""
    stacked = tc.seeds > 1  # then axis 0 is the (unsharded) seed axis
    rows, first = tc.batch_size // data_shards(tc), min(seed_batches[0])
    out = {}
    for key in seed_batches[0][first]:
        local = np.stack(
            [
                np.concatenate([np.asarray(b[s][key], np.int32) for s in sorted(b)])
                for b in seed_batches
            ]
        )  # [seeds, local rows, seq_len]

        def rows_of(index, local=local):
            r = index[int(stacked)]
            stop = tc.batch_size if r.stop is None else r.stop
            local_rows = slice((r.start or 0) - first * rows, stop - first * rows)
            return local[index[0], local_rows] if stacked else local[0, local_rows]

        out[key] = jax.make_array_from_callback(_batch_shape(tc), sharding, rows_of)
    return out


def _batch_shape(tc: TrainConfig) -> tuple[int, ...]:
    """A global batch array's shape: [batch_size, seq_len], with a leading [seeds] axis
    when the run trains several seeds."""
    one = (tc.batch_size, tc.seq_len)
    return one if tc.seeds == 1 else (tc.seeds, *one)


def _seed_axis(sharding: NamedSharding) -> NamedSharding:
    """The sharding of a [seeds, ...] stack of arrays sharded like `sharding`."""
    return NamedSharding(sharding.mesh, P(None, *sharding.spec))


def _fields(name: str, values, tc: TrainConfig, reduce=np.mean) -> dict:
    """Log fields of a metric: {name: value} for one seed; for several, their `reduce`
    (mean) as `name` and each seed's as "name/seed-S"."""
    values = np.asarray(values)
    if tc.seeds == 1:
        return {name: values.item()}
    return {
        name: reduce(values).item(),
        **{f"{name}/seed-{s}": v.item() for s, v in zip(run_seeds(tc), values)},
    }


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


# -- the run directory ---------------------------------------------------------------------
def _claim(out_dir: Path) -> run_dir.RunLock | None:
    """Process 0 takes the run's lock; every process raises if it could not."""
    lock, problem = None, None
    if jax.process_index() == 0:
        try:
            lock = run_dir.RunLock(out_dir).acquire()
        except run_dir.RunDirError as e:
            problem = str(e)
    problem = hosts.first_problem(problem)
    if problem:
        raise run_dir.RunInUse(problem)
    return lock


def _own(out_dir: Path, record: dict, ckpts_dir: Path, fresh: bool) -> tuple[int, list[str]]:
    """Check that out_dir holds this run (or none) and record it. Returns the record's
    `unsealed_before` and messages for the log (opened only once the directory is ours)."""
    main, messages = jax.process_index() == 0, []
    if fresh:
        aside = run_dir.move_aside(out_dir) if main else None
        hosts.barrier("depthjax-fresh")
        if aside:
            messages.append(f"--fresh: moved the previous run to {aside}")
    stored = run_dir.read_record(out_dir)
    steps = (
        sorted(int(p.name) for p in ckpts_dir.glob("*") if p.name.isdigit())
        if ckpts_dir.is_dir()
        else []
    )
    if stored is None and steps:  # a run started before run.json: its newest meta says
        stored = _legacy_record(ckpts_dir, steps[-1])
    unsealed_before = 0
    if stored is not None:
        defaults = run_dir.flat(json.loads(json.dumps(TrainConfig().to_dict())))
        refused, warned = run_dir.differences(stored, record, defaults)
        if refused:
            raise run_dir.refuse(out_dir, refused)
        if warned:
            messages.append(
                "WARNING: resuming with changed keys "
                + "; ".join(warned)
                + "; the run will not match an uninterrupted one"
            )
        unsealed_before = stored.get("unsealed_before", steps[-1] + 1 if steps else 0)
    if main:
        run_dir.write_record(out_dir, {**record, "unsealed_before": unsealed_before})
    return unsealed_before, messages


def _legacy_record(ckpts_dir: Path, step: int) -> dict | None:
    meta = ckpts_dir / str(step) / "meta" / "metadata"
    try:
        m = json.loads(meta.read_text())
        return run_dir.describe(m["model_config"], m["program"], m["train_config"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


# -- the loop ----------------------------------------------------------------------------
def run(out_dir, tc: TrainConfig, *, stream=None, fresh: bool = False) -> TrainState:
    """Train into `out_dir` (resuming from its checkpoints). Returns the final state and
    writes the final model with dj.save to out_dir/model; with seeds > 1 the state has a
    leading [seeds] axis and seed S's model goes to out_dir/models/seed-S.

    Refuses (run_dir.RunDirError) a directory that another process is writing, or that
    holds a different run; fresh=True first moves a previous run to DIR.prev-TIMESTAMP."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise run_dir.RunDirError(f"--out {out_dir} is a file; a run directory is a directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    maybe_initialize_distributed(tc.distributed, tc.heartbeat_timeout)
    lock = _claim(out_dir)
    try:
        return _run(out_dir, tc, stream, fresh, lock)
    except jax.errors.JaxRuntimeError as e:
        if jax.process_count() > 1:  # a collective with a process that stopped answering
            raise hosts.lost("a collective (train step, gather or checkpoint)", e) from e
        raise
    finally:
        if lock is not None:
            lock.release()


def _run(out_dir: Path, tc: TrainConfig, stream, fresh: bool, lock) -> TrainState:
    main_process = jax.process_index() == 0
    cfg, program, loaded_params = _initial_model(tc)
    tc.check_model(cfg)
    layerskip = LayerSkip.from_config(tc, program)  # None when both are off
    mesh = shd.make_mesh(tc.mesh.data, tc.mesh.fsdp, tc.mesh.tensor)
    if tc.batch_size % (shd.batch_divisor(mesh) * tc.grad_accum):
        raise TrainConfigError(
            f"batch_size={tc.batch_size} must be divisible by grad_accum="
            f"{tc.grad_accum} x the {shd.batch_divisor(mesh)} data-parallel "
            "devices"
        )
    abstract_params = (
        jax.eval_shape(lambda k: init(cfg, k).params, jax.random.key(0))
        if loaded_params is None
        else jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), loaded_params)
    )
    mask = trainable_mask(abstract_params, tc.trainable)
    trainable = jax.tree.map(lambda x, m: x if m else None, abstract_params, mask)
    memory.check_fits(
        cfg,
        tc,
        depth=program.depth,
        n_params=count_params(abstract_params),
        n_trainable=count_params(trainable),
        mesh=mesh,
    )
    ckpts_dir = (out_dir / "checkpoints").absolute()
    meta = {
        "model_config": cfg.to_dict(),
        "program": program.to_dict(),
        "train_config": json.loads(json.dumps(tc.to_dict())),
    }
    unsealed_before, messages = _own(
        out_dir,
        run_dir.describe(meta["model_config"], meta["program"], meta["train_config"]),
        ckpts_dir,
        fresh,
    )
    log = RunLog(out_dir, tc.steps, tensorboard=tc.tensorboard, enabled=main_process, stream=stream)
    for text in ([lock.took_over] if lock is not None and lock.took_over else []) + messages:
        log.message(text)
    if main_process:  # leftovers of a killed final save (we hold the lock: nobody else writes)
        for path in model_paths(out_dir, tc):
            atomic.clean_stale(path, any_owner=True)

    tx, schedule = optimizer(tc), learning_rate(tc)
    state_sh = state_shardings(abstract_params, mask, tx, mesh)
    repl, batch_sh = shd.replicated(mesh), shd.batch_sharding(mesh)
    shards = local_shards(batch_sh, tc)
    if tc.seeds > 1:
        state_sh, batch_sh = jax.tree.map(_seed_axis, state_sh), _seed_axis(batch_sh)
    param_sh = state_sh.params

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

    # seeds > 1: one state per seed, stacked; row i from key(seed + i) as its own run's.
    keys = jax.random.key(tc.seed)
    if tc.seeds > 1:
        fresh_state = jax.vmap(fresh_state)
        keys = jax.vmap(jax.random.key)(jnp.asarray(run_seeds(tc)))
    ckpts = TrainCheckpoints(ckpts_dir, tc, unsealed_before=unsealed_before)
    abstract_state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        jax.eval_shape(fresh_state, keys),
        state_sh,
    )
    data_it = _data_iter(tc, "train", out_dir, cfg.vocab_size, shards)

    restored = ckpts.restore_latest(abstract_state, log)
    if restored is not None:
        step0, state, data_state, _ = restored
        data_it.set_state(data_state)
        log.message(f"resumed from checkpoint {step0} in {ckpts_dir}")
        if not main_process:
            print(
                f"[train] process {jax.process_index()}: resumed from checkpoint {step0}",
                file=stream or sys.stderr,
                flush=True,
            )
    else:
        step0 = 0
        state = jax.jit(fresh_state, out_shardings=state_sh)(keys)

    program_dev = jax.device_put(program, repl)
    batch_struct = {
        k: jax.ShapeDtypeStruct(_batch_shape(tc), jnp.int32, sharding=batch_sh)
        for k in data_lib.BATCH_KEYS
    }
    one_step = functools.partial(
        train_step,
        cfg=cfg,
        tx=tx,
        mask=mask,
        grad_accum=tc.grad_accum,
        nan_policy=tc.nan_policy,
        schedule=schedule,
        layerskip=layerskip,
    )
    one_eval = functools.partial(eval_loss_sums, cfg=cfg)
    if tc.seeds > 1:  # (state, batch) mapped over seeds, the program shared
        one_step = jax.vmap(one_step, in_axes=(0, 0, None))
        one_eval = jax.vmap(one_eval, in_axes=(0, 0, None))
    # Compiled ahead of the loop, then a barrier, so that all processes start the first
    # step together: gloo gives a process 30 s to join a collective it has not run before.
    step_fn = (
        jax.jit(
            one_step,
            in_shardings=(state_sh, batch_sh, repl),
            out_shardings=(state_sh, repl),
            donate_argnums=0,
        )
        .lower(abstract_state, batch_struct, program_dev)
        .compile()
    )
    eval_fn = jax.jit(one_eval, in_shardings=(param_sh, batch_sh, repl))
    if tc.eval_every:
        eval_fn = eval_fn.lower(abstract_state.params, batch_struct, program_dev).compile()
    hosts.barrier("depthjax-compiled")
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
            f"device(s), {jax.process_count()} process(es), {describe_data(tc)}"
        )

    def check_finite(state, step):
        bad_steps = np.ravel(jax.device_get(state.bad_step))  # one per seed
        first = int(np.argmax(bad_steps >= 0))
        bad = int(bad_steps[first])
        if bad >= 0:
            ckpts.wait()
            good = ckpts.latest_step()
            where = (
                f"checkpoint {good} in {ckpts_dir}"
                if good is not None
                else "no checkpoint (none was saved yet)"
            )
            seed = f" of seed {run_seeds(tc)[first]}" if tc.seeds > 1 else ""
            raise NonFiniteLossError(
                f"non-finite loss or gradient at step {bad + 1}{seed}: "
                f"training stopped at step {step}; last good state: "
                f"{where} (nan_policy=skip would skip such steps)"
            )

    step, last_t, last_step = step0, time.time(), step0
    try:
        log.start(step0)  # cuts what an earlier attempt logged after step0
        while step < tc.steps:
            state, metrics = step_fn(state, _global_batch(next(data_it), batch_sh, tc), program_dev)
            step += 1
            done = step == tc.steps
            if step % tc.log_every == 0 or done:
                m = jax.device_get(metrics)
                now = time.time()
                tokens = tc.seeds * tc.batch_size * tc.seq_len  # every seed's
                tps = (step - last_step) * tokens / (now - last_t)
                record = {
                    "step": step,
                    "time": now,
                    **_fields("loss", m["loss"], tc),
                    **_fields("grad_norm", m["grad_norm"], tc),
                    "lr": float(np.ravel(m["lr"])[0]),  # one schedule for every seed
                    "tokens_per_s": tps,
                    "mfu": (tps * flops_per_token / (peak * jax.device_count()) if peak else None),
                    "step_time_s": (now - last_t) / (step - last_step),
                }
                if layerskip is not None:
                    record.update(_fields("objective", m["objective"], tc))
                    for i, k in enumerate(layerskip.exits):
                        record.update(_fields(f"exit_loss_{k}", m["exit_loss"][..., i], tc))
                if tc.nan_policy == "skip":
                    skipped = jax.device_get(state.skipped)
                    record.update(_fields("skipped", skipped, tc, reduce=np.sum))
                if tc.eval_every and (step % tc.eval_every == 0 or done):
                    eval_loss = _evaluate(
                        tc, out_dir, cfg, eval_fn, state, program_dev, batch_sh, shards
                    )
                    record.update(_fields("eval_loss", eval_loss, tc))
                check_finite(state, step)
                log.log(record)
                last_t, last_step = time.time(), step
            if step % tc.checkpoint_every == 0 or done:
                check_finite(state, step)
                log.flush()
                ckpts.save(step, state, hosts.merged_json(data_it.get_state()), meta)
        ckpts.wait()
        paths = model_paths(out_dir, tc)
        _save_final(paths, DepthModel(cfg, state.params, program))
        where = paths[0] if tc.seeds == 1 else f"{out_dir / 'models'}/seed-*"
        log.message(f"done: {step} steps; final model in {where}")
    finally:
        ckpts.close()
        log.close()
    return state


def model_paths(out_dir: Path, tc: TrainConfig) -> list[Path]:
    """Where run(out_dir, tc) puts its final models: [out_dir/model], or
    out_dir/models/seed-S for each seed S of a multi-seed run."""
    if tc.seeds == 1:
        return [out_dir / "model"]
    return [out_dir / "models" / f"seed-{s}" for s in run_seeds(tc)]


def _save_final(paths: list[Path], model: DepthModel) -> None:
    """dj.save the trained model(s) from process 0 (parameters gathered from every host);
    with several paths, model.params has a leading seed axis and row i goes to paths[i]."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        params = multihost_utils.process_allgather(model.params, tiled=True)
    else:
        params = jax.device_get(model.params)
    if jax.process_index() == 0:
        if len(paths) == 1:
            native_ckpt.save(model.replace(params=params), paths[0])
            return
        for i, path in enumerate(paths):
            path.parent.mkdir(exist_ok=True)
            native_ckpt.save(model.replace(params=jax.tree.map(lambda x, i=i: x[i], params)), path)


def _evaluate(tc, out_dir, cfg, eval_fn, state, program_dev, batch_sh, shards) -> np.ndarray:
    """Mean loss over the first `eval_batches` validation batches (the same every time),
    float64 [] or [seeds]: each seed's own validation stream, as its separate run's."""
    it = _data_iter(tc, "valid", out_dir, cfg.vocab_size, shards)
    total, count = 0.0, 0.0
    for _ in range(tc.eval_batches):
        s, n = eval_fn(state.params, _global_batch(next(it), batch_sh, tc), program_dev)
        total, count = total + np.asarray(s, np.float64), count + np.asarray(n, np.float64)
    return total / np.maximum(count, 1.0)
