"""depthjax.kernels: Pallas kernels, each beside a pure-JAX reference.

This folder is installed as the package `depthjax.kernels` (see setup.py).
"""
