"""Early-exit training (LayerSkip, Elhoushi et al. 2024): layer dropout and early-exit losses.

Layer dropout skips whole program steps per sequence: step l of L is dropped with
probability ``p_max * D(l) * S(t)``, where D grows with depth (``exp``: 2^(l/(L-1)) - 1 as
in the paper, so step 0 is never dropped and the last step at p_max; ``linear``: l/(L-1);
``uniform``: 1) and S follows the training step t of T (``constant``: 1; ``linear``:
t/(T-1); ``exp``: 2^(t/(T-1)) - 1, the paper's schedule for pretraining from scratch). A
dropped step adds nothing to the residual stream (its update is scaled by 0, see
`depthjax.core.step_params`; outputs are not rescaled, as in the paper). The masks are drawn
from ``fold_in(key(seed), step)``: a function of the seed and the step only, so a resumed
run draws exactly the masks of an uninterrupted one, and the mask of a global batch is
drawn before it is split into micro-batches (gradient accumulation changes nothing).

The early-exit loss adds the next-token cross-entropy of decoding residual[k] (the output
of step k-1) through the model's own final norm and head, for each exit k:

    objective = (CE_final + sum_i c_i(t) w_i CE_{k_i}) / (1 + sum_i c_i(t) w_i)

with weights w_i and a curriculum c_i(t) in {0, 1}: ``none`` (all exits always on),
``rotational`` (exit i is on at steps t with i % R == t % R) or ``gradual`` (exits turn on
from the deepest to the shallowest: exit i of n, in increasing depth, at step
(n - i) * Tc / (n + 1), all on after Tc steps).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from ..core.config import ModelConfig
from ..core.loss import packed_nll_sums
from ..core.model import DepthModel, apply, output_head
from ..core.program import Program, is_concrete
from .config import TrainConfigError

DEPTH_SCALES = ("exp", "linear", "uniform")
SCHEDULES = ("constant", "linear", "exp")
CURRICULA = ("none", "rotational", "gradual")
_DROPOUT_STREAM = 0x1A7E5  # folded into the seed: dropout bits independent of init's key


class LayerSkipError(TrainConfigError):
    """Early-exit training settings that do not fit the model or each other."""


@dataclasses.dataclass(frozen=True)
class LayerSkip:
    """Static settings of early-exit training for a program of `depth` steps (hashable:
    a jit static argument). `exits` are residual indices k in 1..depth-1."""

    depth: int
    total_steps: int
    dropout: float = 0.0
    dropout_depth: str = "exp"
    dropout_schedule: str = "constant"
    exits: tuple[int, ...] = ()
    weights: tuple[float, ...] = ()
    curriculum: str = "none"
    rotation: int = 2
    curriculum_steps: int = 0
    seed: int = 0

    def __post_init__(self):
        if not 0.0 <= self.dropout <= 1.0:
            raise LayerSkipError(f"layer_dropout must be in [0, 1], got {self.dropout}")
        for name, value, known in (
            ("layer_dropout_depth", self.dropout_depth, DEPTH_SCALES),
            ("layer_dropout_schedule", self.dropout_schedule, SCHEDULES),
            ("exit_curriculum", self.curriculum, CURRICULA),
        ):
            if value not in known:
                raise LayerSkipError(f"{name}={value!r} is not one of {known}")
        bad = [k for k in self.exits if not 1 <= k < self.depth]
        if bad:
            raise LayerSkipError(
                f"exit_steps {bad} outside 1..{self.depth - 1}: an exit k reads "
                f"residual[k], the output of step k-1 of the {self.depth}-step "
                "program (the final output is always trained)"
            )
        if len(set(self.exits)) != len(self.exits) or list(self.exits) != sorted(self.exits):
            raise LayerSkipError(
                f"exit_steps must be increasing and distinct, got {list(self.exits)}"
            )
        if len(self.weights) != len(self.exits):
            raise LayerSkipError(
                f"exit_weights has {len(self.weights)} entries for {len(self.exits)} exit_steps"
            )
        if any(not w >= 0 for w in self.weights):
            raise LayerSkipError(f"exit_weights must be >= 0, got {list(self.weights)}")
        if self.rotation < 1:
            raise LayerSkipError(f"exit_rotation must be >= 1, got {self.rotation}")

    @classmethod
    def from_config(cls, tc, program: Program) -> LayerSkip | None:
        """The settings of a TrainConfig for `program`, or None when both are off (then the
        training step is exactly the plain one)."""
        exits = resolve_exits(tc.exit_steps, program.depth)
        if not tc.layer_dropout and not exits:
            return None
        weights = tuple(float(w) for w in tc.exit_weights) or (1.0,)
        if len(weights) == 1:  # one weight for every exit
            weights = weights * len(exits)
        ls = cls(
            depth=program.depth,
            total_steps=tc.steps,
            dropout=float(tc.layer_dropout),
            dropout_depth=tc.layer_dropout_depth,
            dropout_schedule=tc.layer_dropout_schedule,
            exits=exits,
            weights=weights,
            curriculum=tc.exit_curriculum,
            rotation=tc.exit_rotation,
            curriculum_steps=tc.exit_curriculum_steps or tc.steps,
            seed=tc.seed,
        )
        check_exits(program, ls.exits)
        return ls

    # -- layer dropout ------------------------------------------------------------------
    def depth_scale(self) -> np.ndarray:
        """D(l), float32 [depth]."""
        L = self.depth
        frac = np.arange(L) / max(L - 1, 1)
        scale = {"exp": 2.0**frac - 1.0, "linear": frac, "uniform": np.ones(L)}
        return scale[self.dropout_depth].astype(np.float32)

    def time_scale(self, step):
        """S(t) for the 0-based optimizer step t (traced or concrete)."""
        frac = jnp.asarray(step, jnp.float32) / max(self.total_steps - 1, 1)
        return {"constant": jnp.ones_like(frac), "linear": frac, "exp": 2.0**frac - 1.0}[
            self.dropout_schedule
        ]

    def drop_rates(self, step):
        """float32 [depth]: each step's drop probability at optimizer step `step`."""
        return jnp.clip(self.dropout * self.depth_scale() * self.time_scale(step), 0.0, 1.0)

    def keep_mask(self, step, batch: int):
        """bool [batch, depth]: False where a sequence drops a step, drawn from the seed and
        the step only."""
        if not self.dropout:
            return jnp.ones((batch, self.depth), bool)
        key = jax.random.fold_in(
            jax.random.fold_in(jax.random.key(self.seed), _DROPOUT_STREAM), step
        )
        return jax.random.uniform(key, (batch, self.depth)) >= self.drop_rates(step)

    # -- early exits --------------------------------------------------------------------
    def exit_weights(self, step):
        """float32 [n_exits]: w_i * c_i(t), the weight of each exit at optimizer step t."""
        n = len(self.exits)
        i = jnp.arange(n)
        t = jnp.asarray(step, jnp.int32)
        if self.curriculum == "none":
            on = jnp.ones((n,), bool)
        elif self.curriculum == "rotational":
            on = i % self.rotation == t % self.rotation
        else:
            start = np.floor((n - np.arange(n)) * self.curriculum_steps / (n + 1)).astype(np.int32)
            on = t >= start
        return jnp.asarray(self.weights, jnp.float32) * on


def resolve_exits(exit_steps, depth: int) -> tuple[int, ...]:
    """exit_steps (ints, or ["all"]: every step boundary) -> exit depths."""
    return tuple(range(1, depth)) if list(exit_steps) == ["all"] else tuple(exit_steps)


def check_exits(program: Program, exits) -> None:
    """An exit must not split a parallel group (residual[k] is then a partial sum)."""
    if not is_concrete(program):
        return
    parallel = np.asarray(program.parallel)
    split = [k for k in exits if k < program.depth and parallel[k]]
    if split:
        raise LayerSkipError(
            f"exit_steps {split} split a parallel group (step k reads the same "
            "input as step k-1); exit at group boundaries"
        )


def with_dropout(params: dict, keep_BxS) -> dict:
    """Parameters whose per-step update scale drops step s of row b where keep[b, s] is
    False: `params["steps"]["scale"]` becomes [depth, B, 1, 1] (times any existing scale)."""
    keep_SB11 = keep_BxS.T.astype(jnp.float32)[:, :, None, None]
    steps = dict(params.get("steps") or {})
    if "scale" in steps:
        keep_SB11 = keep_SB11 * steps["scale"].reshape(-1, 1, 1, 1)
    return {**params, "steps": {**steps, "scale": keep_SB11}}


def loss_sums(params, cfg: ModelConfig, program: Program, batch, ls: LayerSkip, step):
    """Early-exit training loss of one (micro-)batch.

    batch: int32 [B, T] inputs, targets, segment_ids (0 = padding), positions, and bool
    keep [B, depth] (layer dropout). Returns (objective sum, (token count, nll sums
    [1 + n_exits]: the final output first, then each exit)); objective sum / count is the
    normalized objective of the module docstring.
    """
    params = with_dropout(params, batch["keep"]) if ls.dropout else params
    logits_BTV, trace = apply(
        DepthModel(cfg, params, program),
        batch["inputs"],
        segment_ids=batch["segment_ids"],
        positions=batch["positions"],
        trace=True,
    )
    sums = lambda logits_BTV: packed_nll_sums(logits_BTV, batch["targets"], batch["segment_ids"])
    final, count = sums(logits_BTV)
    nll = jnp.stack(
        [final] + [sums(output_head(cfg, params, trace.residual[k]))[0] for k in ls.exits]
    )
    w = jnp.concatenate([jnp.ones((1,)), ls.exit_weights(step)])
    return jnp.sum(w * nll) / jnp.sum(w), (count, nll)
