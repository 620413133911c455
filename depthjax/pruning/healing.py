"""Trained recovery: per-step LoRA (and adapters, where present) on a pruned program, one
training loop for the two objectives of `dj.recover`:

* "lora":    the next-token loss of the pruned program (`lm_objective`);
* "distill": T^2 * KL(teacher_T || student_T) of the next-token distributions at every real
  position, where p_T = softmax(logits / T), plus `hidden` times the mean squared
  difference between the student's and the teacher's residual stream after every kept
  step (`distill_objective`). The T^2 keeps the gradient's scale independent of T
  (Hinton et al. 2015). The teacher is the original program walking the same block table
  with the base parameters (no LoRA), so one copy of the weights serves both.

Losses are computed in float32 whatever the compute dtype.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .. import progress
from ..core.loss import kl_rows, nll_sums
from ..core.model import DepthModel, apply
from ..depth.table import step_rows

DEFAULT_TEMPERATURE = 1.0
DEFAULT_HIDDEN = 0.0
# What a trained recovery trains: LoRA always, the bias/linear adapters where present.
TRAINED = ("lora", "adapter", "final_adapter")


def init_lora(model: DepthModel, rank: int, key) -> dict:
    """Per-step LoRA on every kernel the program runs: a [depth, in, r] ~ N(0, 1/in) and
    b [depth, r, out] = 0, so the model starts unchanged."""
    from flax import traverse_util

    from ..core import step_params as steps_lib

    # Shapes only: gathering the rows of every step would copy the table.
    shapes = jax.eval_shape(lambda: step_rows(model))
    lora = {}
    for i, (path, w) in enumerate(traverse_util.flatten_dict(shapes).items()):
        if path[-1] != "kernel":
            continue
        n_in = math.prod(w.shape[1 : 1 + steps_lib.kernel_in_dims(path)])
        S, n_out = w.shape[0], math.prod(w.shape[1:]) // n_in
        a = jax.random.normal(jax.random.fold_in(key, i), (S, n_in, rank))
        lora[path + ("a",)] = a / np.sqrt(n_in)
        lora[path + ("b",)] = jnp.zeros((S, rank, n_out))
    return traverse_util.unflatten_dict(lora)


def with_trained(frozen: DepthModel, trained: dict) -> DepthModel:
    """`frozen` with the trained entries (subset of TRAINED) in its parameters."""
    steps = dict(frozen.params.get("steps") or {})
    steps.update({k: v for k, v in trained.items() if k in ("lora", "adapter")})
    params = {**frozen.params, "steps": steps}
    if "final_adapter" in trained:
        params["final_adapter"] = trained["final_adapter"]
    return frozen.replace(params=params)


def kl_sums(student_BTV, teacher_BTV, mask_BT, temperature: float = DEFAULT_TEMPERATURE):
    """(sum over real positions (mask 1) of KL(softmax(teacher / T) || softmax(student / T)),
    number of real positions), float32 scalars."""
    kl_BT = kl_rows(
        teacher_BTV.astype(jnp.float32) / temperature, student_BTV.astype(jnp.float32) / temperature
    )
    w_BT = jnp.asarray(mask_BT, jnp.float32)
    return jnp.sum(kl_BT * w_BT), jnp.sum(w_BT)


def hidden_sums(student_KBTD, teacher_KBTD, mask_BT):
    """(sum of squared differences over the K paired residuals, real tokens and features,
    the number of terms), float32 scalars. Their ratio is the mean squared error."""
    diff = student_KBTD.astype(jnp.float32) - teacher_KBTD.astype(jnp.float32)
    w_BT = jnp.asarray(mask_BT, jnp.float32)
    K, D = diff.shape[0], diff.shape[-1]
    return jnp.sum(jnp.square(diff) * w_BT[None, :, :, None]), K * D * jnp.sum(w_BT)


def lm_objective(student: DepthModel, aux, tokens_BT, mask_BT):
    """Mean next-token loss of the student over real targets."""
    s, n = nll_sums(apply(student, tokens_BT, mask=mask_BT), tokens_BT, mask_BT)
    return s / n


def teacher_model(frozen: DepthModel, teacher: dict) -> DepthModel:
    """The teacher: `teacher["program"]` walking frozen's table and shared parameters, with
    the teacher's own per-step parameters (`teacher["params"]`: "steps", "final_adapter")."""
    shared = {k: v for k, v in frozen.params.items() if k not in ("steps", "final_adapter")}
    return frozen.replace(params={**shared, **teacher["params"]}, program=teacher["program"])


def distill_objective(
    student: DepthModel,
    teacher: dict,
    tokens_BT,
    mask_BT,
    *,
    temperature: float,
    hidden: float,
    kept,
):
    """T^2 * mean KL(teacher || student) + hidden * MSE of residuals after kept steps.

    `teacher` = {"program", "params"} (see `teacher_model`); it is run here, on the fly,
    under stop_gradient: caching its logits would hold [B, T, vocab] floats per calibration
    batch (and its residuals [depth, B, T, D] with `hidden`), while running it costs one
    forward beside the student's forward and backward. `kept` [K]: for each pruned step,
    its step in the teacher's program (a static numpy array)."""
    want = hidden > 0
    t_out = apply(teacher_model(student, teacher), tokens_BT, mask=mask_BT, trace=want)
    t_logits, t_tr = jax.lax.stop_gradient(t_out if want else (t_out, None))
    s_out = apply(student, tokens_BT, mask=mask_BT, trace=want)
    s_logits, s_tr = s_out if want else (s_out, None)
    s, n = kl_sums(s_logits, t_logits, mask_BT, temperature)
    loss = temperature**2 * s / n
    if want:
        kept = np.asarray(kept)
        hs, hn = hidden_sums(s_tr.residual[1:], t_tr.residual[kept + 1], mask_BT)
        loss = loss + hidden * hs / hn
    return loss


def train(
    frozen: DepthModel,
    trainable: dict,
    objective,
    aux,
    data,
    *,
    steps: int,
    learning_rate: float,
    label: str,
    log_every: int = 0,
) -> DepthModel:
    """Adam on `trainable` (entries of TRAINED) for `steps` steps, cycling through `data`
    (a list of metrics Batches); objective(student, aux, tokens, mask) -> float32 loss.
    Every other parameter of `frozen` stays as it is. Returns the trained model."""
    opt = optax.adam(learning_rate)

    # frozen and aux are arguments, not closure constants: XLA would embed the weights.
    @jax.jit
    def update(tr, state, frozen, aux, tokens, mask):
        loss = lambda t: objective(with_trained(frozen, t), aux, tokens, mask)
        value, grads = jax.value_and_grad(loss)(tr)
        upd, state = opt.update(grads, state, tr)
        return optax.apply_updates(tr, upd), state, value

    state = opt.init(trainable)
    every = log_every or max(1, steps // 20)  # reading the loss syncs with the device
    with progress.bar(label, total=steps) as bar:
        for t in range(steps):
            b = data[t % len(data)]
            trainable, state, value = update(trainable, state, frozen, aux, b.tokens, b.mask)
            last = t == steps - 1
            if bar.drawing:
                bar.advance(**({"loss": float(value)} if t % every == 0 or last else {}))
            elif log_every and (t % log_every == 0 or last) and not progress.silenced():
                print(f"[{label}] step {t + 1}/{steps} loss {float(value):.4f}", flush=True)
    return with_trained(frozen, trainable)
