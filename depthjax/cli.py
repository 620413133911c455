"""The `depthjax` command line. Subcommands are registered in COMMANDS."""

from __future__ import annotations

import argparse
import sys
import time

from . import train_cli
from .depth import cli as depth_cli
from .hf import convert as hf_convert
from . import generate_cli


def _demo(args) -> int:
    """A small end-to-end job: build a model, run real text through it, report per-step
    residual norms and how much each step changes the residual stream."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import depthjax as dj
    from depthjax import corpus

    t0 = time.time()
    cfg = dj.configs.get(args.model)
    model = dj.init(cfg, jax.random.key(args.seed))
    print(f"[demo] {model!r}".splitlines()[0], flush=True)
    tokens = corpus.byte_batch(args.batch_size, args.seq_len, seed=args.seed)
    forward = jax.jit(lambda m, t: dj.apply(m, t, trace=True))
    logits, trace = forward(model, tokens)
    res = trace.residual.astype(jnp.float32)
    norm = jnp.linalg.norm(res, axis=-1).mean(axis=(1, 2))
    cos = (jnp.sum(res[:-1] * res[1:], -1) /
           (jnp.linalg.norm(res[:-1], axis=-1) * jnp.linalg.norm(res[1:], axis=-1))).mean((1, 2))
    loss = -jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), tokens[:, 1:, None], -1).mean()
    print(f"[demo] {tokens.shape[0]}x{tokens.shape[1]} bytes of Python stdlib source, "
          f"loss {float(loss):.3f} (uniform: {np.log(cfg.vocab_size):.3f})")
    print(f"{'step':>5} {'block':>5} {'|residual in|':>14} {'1 - cos(in, out)':>17}")
    for i in range(model.depth):
        print(f"{i:>5} {int(model.program.block[i]):>5} {float(norm[i]):>14.3f} "
              f"{1 - float(cos[i]):>17.5f}")
    print(f"[demo] done in {time.time() - t0:.1f}s")
    return 0


def _add_demo(sub):
    p = sub.add_parser("demo", help="run the main job on the embedded default data")
    p.add_argument("--model", default="llama-tiny", help="preset name (default llama-tiny)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_demo)


def _presets(args) -> int:
    import depthjax as dj
    for name in dj.configs.names():
        cfg = dj.configs.get(name)
        print(f"{name:14} {cfg.family:6} d_model={cfg.d_model:<5} layers={cfg.n_layers:<3} "
              f"heads={cfg.n_heads}/{cfg.n_kv_heads} vocab={cfg.vocab_size}")
    return 0


def _add_presets(sub):
    sub.add_parser("presets", help="list named model configs").set_defaults(func=_presets)


COMMANDS = [_add_demo, _add_presets, train_cli.add_command]
COMMANDS.append(hf_convert.add_command)
COMMANDS.append(depth_cli.add_command)
COMMANDS.append(generate_cli.add_command)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="depthjax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
