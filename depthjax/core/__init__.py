"""The model: config, program, layers, attention, block, the scanned model, loss, FLOPs.

Importing the package imports `display`, which gives DepthModel and Program their notebook
`_repr_html_`.
"""

from . import display  # noqa: F401 (attaches the _repr_html_ hooks)
