"""Static costs of a model, read off its traced program: parameters, multiply-adds, program size.

Multiply-adds are counted exactly from the jaxpr: every convolution (`conv_general_dilated`,
or `resflax.conv`'s canonical `conv_p`) contributes `prod(out.shape) * prod(kernel.shape) /
out_features` and every `dot_general`
`prod(out.shape) * prod(contracted dims)`; the body of a `scan` counts `length` times. Normalization,
activations, pooling and additions are not multiply-adds and are not counted (the convention of
He et al. 2015, whose ResNet-20 does 40.55 M multiply-adds per 32x32 image).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
from jax.extend import core as jex_core

from resflax import conv


def count_params(tree: Any) -> int:
    """Number of scalars in a pytree of arrays (or of `jax.ShapeDtypeStruct`s).

    Args:
      tree: any pytree whose leaves have a `.shape`, e.g. `variables["params"]` or the output
        of `jax.eval_shape(model.init, ...)`.

    Returns:
      `sum over leaves of prod(leaf.shape)` (a scalar leaf counts 1).
    """
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def _sub_jaxprs(params: dict) -> list[tuple[Any, int]]:
    """(jaxpr, repeat count) for every sub-program of an equation."""
    found = []
    for key, value in params.items():
        values = value if isinstance(value, (tuple, list)) else [value]
        for v in values:
            if isinstance(v, jex_core.ClosedJaxpr):
                v = v.jaxpr
            if isinstance(v, jex_core.Jaxpr):
                found.append((v, key))
    return found


def _macs(jaxpr) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "conv_general_dilated":
            rhs = eqn.invars[1].aval.shape
            out_feature_dim = eqn.params["dimension_numbers"].rhs_spec[0]
            out = eqn.outvars[0].aval.shape
            total += math.prod(out) * math.prod(rhs) // rhs[out_feature_dim]
        elif eqn.primitive is conv.conv_p:  # NHWC x HWIO: the output features are last.
            rhs = eqn.invars[1].aval.shape
            total += math.prod(eqn.outvars[0].aval.shape) * math.prod(rhs[:3])
        elif name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            out = eqn.outvars[0].aval.shape
            total += math.prod(out) * math.prod(lhs[d] for d in lhs_contract)
        subs = _sub_jaxprs(eqn.params)
        if name == "cond":
            total += max((_macs(j) for j, _ in subs), default=0)
        elif name == "while":
            if any(_macs(j) for j, _ in subs):
                raise ValueError("multiply-adds inside a while loop have no static count")
        else:
            repeat = eqn.params.get("length", 1) if name == "scan" else 1
            total += repeat * sum(_macs(j) for j, _ in subs)
    return total


def count_macs(fn: Callable[..., Any], *args, **kwargs) -> int:
    """Exact multiply-adds of `fn(*args, **kwargs)` (conv and dense contractions), by tracing.

    Per equation of the jaxpr (module docstring): a convolution counts
    `prod(out.shape) * prod(kernel.shape) / out_features`, a `dot_general`
    `prod(out.shape) * prod(contracted dims)`; a `scan` body counts `length` times, other
    sub-programs (`pjit`, `remat`, custom derivatives, ...) once, and `cond` counts its most
    expensive branch. Nothing else is a multiply-add. Only tracing happens: nothing is compiled
    or run, so abstract inputs (`jax.ShapeDtypeStruct`) work.

    Args:
      fn: a jax-traceable function, e.g. `lambda x: model.apply(variables, x)`.
      *args: its positional arguments (arrays or `jax.ShapeDtypeStruct`s); their shapes set the
        count (the batch size included: divide by it for a per-example count).
      **kwargs: its keyword arguments.

    Returns:
      The number of multiply-adds of one call, an int.

    Raises:
      ValueError: a `while` loop contains multiply-adds (its trip count is not static).
    """
    return _macs(jax.make_jaxpr(fn)(*args, **kwargs).jaxpr)


def program_size(fn: Callable[..., Any], *args, **kwargs) -> int:
    """Number of equations of the traced program, sub-programs included once each.

    This is the size XLA compiles: a scan body counts once however long the scan, so the size
    of a model whose repeated blocks are scanned does not grow with depth.

    Args:
      fn: a jax-traceable function.
      *args: its positional arguments (arrays or `jax.ShapeDtypeStruct`s).
      **kwargs: its keyword arguments.

    Returns:
      The number of jaxpr equations, each sub-program's (scan, while and cond bodies, pjit,
      custom derivatives, ...) counted once, an int.
    """

    def size(jaxpr) -> int:
        return len(jaxpr.eqns) + sum(size(j) for e in jaxpr.eqns for j, _ in _sub_jaxprs(e.params))

    return size(jax.make_jaxpr(fn)(*args, **kwargs).jaxpr)
