"""Depth transforms: pure functions DepthModel -> DepthModel, steps indexed by position.

Program-only edits (drop, drop_sublayers, repeat, reorder, parallelize) share the block
table's buffers; table edits (tie, materialize, compact, grow) rewrite it; quantize stores
it in integers with a bit width per row; linear_expand builds a table of any depth from a
two-row learngene (TLEG); stitch joins two models of different widths through a
linear map (a `Stitched` model); fold bakes gates, scales and adapters into a plain sequential table
(what an export needs).
"""

from .edit import drop, drop_sublayers, parallelize, reorder, repeat, select_steps
from .expansion import LearngeneError, is_expanded, learngene, linear_expand
from .folding import FoldError, fold
from .merge import average, lines
from .quantization import (
    QuantizedError,
    allocate,
    dequantize,
    quantize,
    row_bits,
    row_importance,
    table_bytes,
)
from .spec import from_spec, load_spec, to_spec
from .stitching import Stitched, StitchError, fit_map, stitch, tune_map
from .table import compact, grow, materialize, step_rows
from .tying import relax, tie, tie_map

__all__ = [
    "FoldError",
    "LearngeneError",
    "QuantizedError",
    "StitchError",
    "Stitched",
    "allocate",
    "average",
    "compact",
    "dequantize",
    "drop",
    "drop_sublayers",
    "fit_map",
    "fold",
    "from_spec",
    "grow",
    "is_expanded",
    "learngene",
    "linear_expand",
    "lines",
    "load_spec",
    "materialize",
    "parallelize",
    "quantize",
    "relax",
    "reorder",
    "repeat",
    "row_bits",
    "row_importance",
    "select_steps",
    "step_rows",
    "stitch",
    "table_bytes",
    "tie",
    "tie_map",
    "to_spec",
    "tune_map",
]
