"""`gated(gate, fn, *args)`: gate * fn(*args), where a gate of 0 skips fn's compute.

This is how a program's runtime gates pay off: a sublayer whose gate is 0 at run time is
not computed (a `lax.cond` returns an all-zero update instead), so the same compiled
forward serves every program of a depth and a pruned program costs what it runs.

Derivatives are those of gate * fn(*args), exactly:

* with respect to the args (parameters, activations) they flow through the cond: a
  skipped call gets a zero gradient, as it would from a multiplication by 0;
* with respect to the gate, d/dgate = fn(*args) is not 0 at gate == 0. A custom JVP with
  symbolic zeros keeps the cond only while the gate's tangent is a symbolic zero (the gate
  is not being differentiated); when it is, fn runs, so gate gradients at 0 are right,
  and so are second derivatives over gates (jax.hessian). One order is not covered: a
  gate derivative taken *outside* a derivative over the args (jacfwd over the gate of a
  parameter gradient) sees the skip and gives 0 at gate == 0; differentiate gates
  innermost, or over (args, gate) together, for mixed second derivatives.

Under `vmap` with a batched gate (many programs at once) the cond becomes a select: fn
runs for the whole batch and each row still gets exactly gate * fn. Batch the gates only
where that is what you want (depthjax.metrics.coalitions picks per call).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero


def gated(gate, fn, *args):
    """gate (a scalar) times fn(*args) (a pytree of arrays); fn does not run when gate == 0.

    fn must be a pure function of its args (apply a Flax module inside it)."""
    return _gated(fn, gate, args)


def _scaled(gate, tree):
    return jax.tree.map(lambda y: jnp.asarray(gate, y.dtype) * y, tree)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _gated(fn, gate, args):
    def skip():
        shapes = jax.eval_shape(fn, *args)
        return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    return jax.lax.cond(gate != 0, lambda: _scaled(gate, fn(*args)), skip)


def _zeros_for(tangent, primal):
    if not isinstance(tangent, SymbolicZero):
        return tangent
    if not jnp.issubdtype(jnp.result_type(primal), jnp.inexact):  # ints, bools
        return np.zeros(np.shape(primal), jax.dtypes.float0)
    return jnp.zeros(np.shape(primal), jnp.result_type(primal))


def _gated_jvp(fn, primals, tangents):
    gate, args = primals
    d_gate, d_args = tangents
    d_args = jax.tree.map(_zeros_for, d_args, args, is_leaf=lambda t: isinstance(t, SymbolicZero))
    if isinstance(d_gate, SymbolicZero):  # a constant gate: (gate * y, gate * dy), skippable

        def run():
            return _scaled(gate, jax.jvp(fn, args, d_args))

        def skip():
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(fn, *args))
            return zeros, zeros

        return jax.lax.cond(gate != 0, run, skip)
    y, dy = jax.jvp(fn, args, d_args)
    tangent = jax.tree.map(
        lambda y_, dy_: jnp.asarray(d_gate, y_.dtype) * y_ + jnp.asarray(gate, y_.dtype) * dy_,
        y,
        dy,
    )
    return _scaled(gate, y), tangent


_gated.defjvp(_gated_jvp, symbolic_zeros=True)
