"""A small training loop for the adaptive-depth objectives (MoD, recurrent depth, FiRST).

    params, history = fit(lambda p, tokens: mod.loss(model.replace(params=p), spec, tokens),
                          model.params, lambda step: (next_batch(),), steps=300, lr=3e-3)

It reuses depthjax.train's optimizer (AdamW, warmup + cosine decay, global-norm clipping,
no weight decay on norms and biases) and its trainable-mask split: parameters whose path
does not match `trainable` stay frozen and get no optimizer state. `batch_fn(step)` returns
the arguments after the parameters for that step (e.g. a token batch and a loop count
drawn for it), so everything that varies per step is data: one compilation.
`depthjax train` remains the sharded, checkpointed trainer for ordinary programs.
"""

from __future__ import annotations

import time

import jax
import numpy as np
import optax

from ..progress import bar
from ..train.config import TrainConfig
from ..train.step import merge, optimizer, split, trainable_mask


def fit(
    loss_fn,
    params,
    batch_fn,
    *,
    steps: int,
    lr: float = 3e-3,
    trainable: str = ".*",
    warmup_steps: int | None = None,
    weight_decay: float = 0.1,
    clip_norm: float = 1.0,
    log_every: int = 0,
    log=print,
    description: str = "train",
):
    """Minimize loss_fn(params, *batch_fn(step)) -> (loss, stats dict) for `steps` steps.

    Returns (params, history): history is a list of {"step", "loss", **stats, "time_s"}
    for every step. log_every=N also prints a line every N steps through `log`.
    """
    tc = TrainConfig(
        steps=steps,
        lr=lr,
        weight_decay=weight_decay,
        clip_norm=clip_norm,
        warmup_steps=min(50, max(steps // 10, 1)) if warmup_steps is None else warmup_steps,
    )
    tx = optimizer(tc)
    mask = trainable_mask(params, trainable)
    train, frozen = split(params, mask)
    opt_state = tx.init(train)

    @jax.jit
    def step(train, opt_state, frozen, *args):
        grad_fn = jax.value_and_grad(lambda t: loss_fn(merge(t, frozen), *args), has_aux=True)
        (loss, stats), grads = grad_fn(train)
        updates, opt_state = tx.update(grads, opt_state, train)
        return optax.apply_updates(train, updates), opt_state, loss, stats

    history, t0 = [], time.perf_counter()
    with bar(description, total=steps) as b:
        for i in range(steps):
            train, opt_state, loss, stats = step(train, opt_state, frozen, *batch_fn(i))
            row = {
                "step": i,
                "loss": float(loss),
                **{k: float(np.asarray(v)) for k, v in stats.items()},
                "time_s": time.perf_counter() - t0,
            }
            history.append(row)
            b.advance(loss=row["loss"])
            if log_every and (i % log_every == 0 or i == steps - 1):
                log(
                    f"{description} step {i}: "
                    + ", ".join(f"{k} {v:.4f}" for k, v in row.items() if k not in ("step",))
                )
    return merge(train, frozen), history
