"""Training throughput: tokens/s and MFU of the real jitted train step for a config.

    python benchmarks/train_throughput.py model=llama-1b model.dtype=bfloat16 \
        model.remat=dots_no_batch batch_size=8 seq_len=2048 [steps=10] [any train key]

Synthetic tokens (the data pipeline is timed separately by the trainer's own log), the
same train_step, optimizer and shardings as `depthjax train`. Prints one line per timed
step and a summary: tokens/s, step time, model FLOPs/token, MFU (null where the device's
peak is unknown, e.g. CPU, unless peak_tflops= is given).
"""

from __future__ import annotations

import functools
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from depthjax.core import flops as flops_lib, sharding as shd
from depthjax.core.model import count_params, init
from depthjax.core.program import Program
from depthjax.train import config as train_config
from depthjax.train.loop import state_shardings
from depthjax.train.step import TrainState, learning_rate, optimizer, train_step, trainable_mask


def main(argv) -> int:
    argv = list(argv)
    steps = next((int(a.split("=")[1]) for a in argv if a.startswith("steps=")), 10)
    argv = [a for a in argv if not a.startswith("steps=")]
    tc = train_config.parse(["steps=1000"] + argv)
    cfg = tc.model_config()
    mesh = shd.make_mesh(tc.mesh.data, tc.mesh.fsdp, tc.mesh.tensor)
    program = Program.sequential(cfg.n_layers)
    abstract = jax.eval_shape(lambda k: init(cfg, k).params, jax.random.key(0))
    mask = trainable_mask(abstract, tc.trainable)
    tx = optimizer(tc)
    state_sh = state_shardings(abstract, mask, tx, mesh)

    def fresh(key):
        params = init(cfg, key).params
        return TrainState(
            jnp.int32(0),
            params,
            tx.init(jax.tree.map(lambda m, x: x if m else None, mask, params)),
            jnp.int32(-1),
            jnp.int32(0),
        )

    state = jax.jit(fresh, out_shardings=state_sh)(jax.random.key(0))
    step = jax.jit(
        functools.partial(
            train_step,
            cfg=cfg,
            tx=tx,
            mask=mask,
            grad_accum=tc.grad_accum,
            nan_policy=tc.nan_policy,
            schedule=learning_rate(tc),
        ),
        in_shardings=(state_sh, shd.batch_sharding(mesh), state_sh.step),
        out_shardings=(state_sh, state_sh.step),
        donate_argnums=0,
    )
    rng = np.random.default_rng(0)
    B, T = tc.batch_size, tc.seq_len

    def batch():
        tokens = rng.integers(0, cfg.vocab_size, (B, T + 1)).astype(np.int32)
        return jax.device_put(
            {
                "inputs": tokens[:, :-1],
                "targets": tokens[:, 1:],
                "segment_ids": np.ones((B, T), np.int32),
                "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)),
            },
            shd.batch_sharding(mesh),
        )

    n_params = count_params(abstract)
    per_token = flops_lib.train_flops_per_token(cfg, T)
    peak = tc.peak_tflops * 1e12 if tc.peak_tflops else flops_lib.peak_flops(dtype=cfg.dtype)
    print(
        f"[bench] {tc.model} {n_params / 1e6:.1f}M params, dtype={cfg.dtype}, remat="
        f"{cfg.remat.value}, batch {B}x{T}, {jax.device_count()}x "
        f"{jax.devices()[0].device_kind}, mesh {dict(mesh.shape)}",
        flush=True,
    )
    t0 = time.perf_counter()
    state, m = step(state, batch(), program)
    jax.block_until_ready(m["loss"])
    print(
        f"[bench] compile + first step {time.perf_counter() - t0:.1f}s, loss "
        f"{float(m['loss']):.3f}",
        flush=True,
    )
    times = []
    for i in range(steps):
        b = batch()
        t0 = time.perf_counter()
        state, m = step(state, b, program)
        jax.block_until_ready(m["loss"])
        times.append(time.perf_counter() - t0)
        print(f"[bench] step {i + 1}/{steps} {times[-1] * 1e3:.1f} ms", flush=True)
    dt = float(np.median(times))
    tps = B * T / dt
    mfu = tps * per_token / (peak * jax.device_count()) if peak else None
    print(
        f"[bench] median step {dt * 1e3:.1f} ms  tokens/s {tps:,.0f}  "
        f"model TFLOP/s per device {tps * per_token / jax.device_count() / 1e12:.2f}  "
        f"MFU {'null (unknown peak)' if mfu is None else f'{100 * mfu:.1f}%'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
