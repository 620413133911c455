"""Step importance metrics. Each takes a model and batches (a token array [B, T], or an
iterable of arrays or of {"tokens", "mask"} dicts) and accumulates on device.

Trace metrics read one traced forward (block_influence, angular_distance,
relative_contribution, module_similarity, residual_norm; trace_metrics returns all of them
from one pass);
coalition metrics evaluate programs with units switched off through one compiled
function (ablation, shapley, present_minus_absent, removal_curve, and the random
controls random_pruning and random_removal_curves), by any measure ("loss", "logit",
"hidden" or a depthjax.eval task), each a reduction of the programs' outputs that
`strategies.evaluate` runs batched or from shared prefixes; gate metrics
differentiate the loss with respect to the sublayer gates (gate_gradient,
gate_interactions).
"""

from .batches import as_batches
from .coalitions import (
    ablation,
    active_units,
    coalition_measures,
    loss,
    present_minus_absent,
    removal_curve,
    shapley,
)
from .controls import RandomControl, random_pruning, random_removal_curves
from .gates import gate_derivatives, gate_gradient, gate_interactions, taylor_estimate
from .intervals import fmt, separated, spread
from .lens import logit_lens, skip_effect
from .scores import MetricError, Scores
from .trace import (
    angular_distance,
    block_influence,
    module_similarity,
    relative_contribution,
    residual_norm,
    trace_metrics,
    trace_statistics,
)

__all__ = [
    "MetricError",
    "RandomControl",
    "Scores",
    "ablation",
    "active_units",
    "angular_distance",
    "as_batches",
    "block_influence",
    "coalition_measures",
    "gate_derivatives",
    "gate_gradient",
    "fmt",
    "gate_interactions",
    "logit_lens",
    "loss",
    "module_similarity",
    "present_minus_absent",
    "random_pruning",
    "random_removal_curves",
    "relative_contribution",
    "removal_curve",
    "residual_norm",
    "separated",
    "shapley",
    "spread",
    "skip_effect",
    "taylor_estimate",
    "trace_metrics",
    "trace_statistics",
]
