"""depthjax.kernels: Pallas kernels, each beside a pure-JAX reference.

This folder is installed as the package `depthjax.kernels` (see setup.py).

* `flash_attention` (flash.py): fused attention, forward + backward (Triton backend on GPU;
  any backend with interpret=True); `reference_attention` (reference.py) is its naive
  float32 reference;
* `splash_attention` (splash.py): the TPU path, a wrapper over JAX's splash attention
  kernel.

The modules are not named for the functions, so `depthjax.kernels.flash_attention` is the
function and never hides its module.
"""

from .flash import flash_attention
from .reference import reference_attention
from .splash import splash_attention

__all__ = ["flash_attention", "reference_attention", "splash_attention"]
