"""A 2-D convolution whose every derivative is again a canonical NHWC x HWIO convolution.

Why it exists. XLA:CPU runs a convolution on its fast kernels only when the convolution's
dimension labels are canonical: input `[B, H, W, C_in]` (`b01f`), kernel `[kh, kw, C_in, C_out]`
(`01io`), output `[B, H', W', C_out]` (`b01f`). JAX differentiates `lax.conv_general_dilated`
into convolutions with permuted labels -- the kernel gradient is `f01b_i01o->01bf` -- and relies
on XLA to rewrite them. Outside loops XLA:CPU does; inside a `while` body (`nn.scan`, `lax.map`,
`fori_loop`, the diagnostics' Lanczos loop) it does not, and a naive loop runs instead: the
backward pass of a scanned ResNet was 18-25x slower than the same net unrolled (public report:
jax issue 12868, "Convolution is significantly slower inside a loop body (CPU)").

What it is. `conv_p`, a JAX primitive for one convolution in the canonical layout with general
strides, padding and input/kernel dilation. It is *bilinear*, and its two transposes are written
with the same primitive plus explicit `transpose`/`rev` of operands:

    y  = conv(x, w; s, p, dl, dr)                                    x: [B, H, W, Ci], w: [kh, kw, Ci, Co]
    dx = conv(g, flipped(w) with Ci <-> Co; strides dl, lhs dilation s, rhs dilation dr)
    dw = conv(x as [Ci, H, W, B], g as [H', W', B, Co]; strides dr, lhs dilation dl,
              rhs dilation s) -> [Ci, kh, kw, Co] -> [kh, kw, Ci, Co]

(the formulas of JAX's own transpose rules, with the operand permutations done by explicit
transposes so the convolution itself stays canonical). The jvp of a bilinear map is
`conv(dx, w) + conv(x, dw)`, so forward mode, reverse mode and any composition of them (jvp of
vjp, vjp of vjp, Hessian-vector products) only ever produce `conv_p` again: canonical at every
order, inside or outside loops. `vmap` is supported (batch folded into the batch or output
feature axis; both operands batched: one convolution per batch entry).

Which to use. `conv2d(..., impl='auto')` takes `conv_p` on CPU and `lax.conv_general_dilated`
on GPU/TPU, whose compilers (cuDNN, the TPU convolution emitter) choose layouts themselves. Both
give the same numbers (tests compare them in float64, values and derivatives, in and out of
loops).
"""

from __future__ import annotations

import re
from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import core
from jax.interpreters import ad, batching, mlir

Array = jax.Array

IMPLS = ("auto", "canonical", "xla")
_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")


def _dilate(size: int, dilation: int) -> int:
    """Size of an axis of `size` entries with `dilation - 1` zeros inserted between entries."""
    return 0 if size == 0 else 1 + dilation * (size - 1)


def _out_shape(x_shape, w_shape, window_strides, padding, lhs_dilation, rhs_dilation):
    spatial = []
    for d in range(2):
        size = _dilate(x_shape[1 + d], lhs_dilation[d]) + sum(padding[d])
        window = _dilate(w_shape[d], rhs_dilation[d])
        spatial.append((size - window) // window_strides[d] + 1 if size >= window else 0)
    return (x_shape[0], *spatial, w_shape[3])


def _lax_conv(x, w, *, window_strides, padding, lhs_dilation, rhs_dilation, precision):
    return lax.conv_general_dilated(
        x,
        w,
        window_strides=window_strides,
        padding=padding,
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=_DIMENSION_NUMBERS,
        precision=precision,
    )


conv_p = core.Primitive("resflax_conv_nhwc")
conv_p.def_impl(_lax_conv)


@conv_p.def_abstract_eval
def _abstract_eval(x, w, *, window_strides, padding, lhs_dilation, rhs_dilation, precision):
    del precision
    if x.ndim != 4 or w.ndim != 4 or x.shape[3] != w.shape[2]:
        raise ValueError(
            f"conv: expected x [B, H, W, C_in] and w [kh, kw, C_in, C_out], got {x.shape} and "
            f"{w.shape}"
        )
    if x.dtype != w.dtype:
        raise TypeError(f"conv: x and w must have one dtype, got {x.dtype} and {w.dtype}")
    shape = _out_shape(x.shape, w.shape, window_strides, padding, lhs_dilation, rhs_dilation)
    return x.update(shape=shape, weak_type=False)


mlir.register_lowering(conv_p, mlir.lower_fun(_lax_conv, multiple_results=False))


def _bind(x, w, window_strides, padding, lhs_dilation=(1, 1), rhs_dilation=(1, 1), precision=None):
    return conv_p.bind(
        x,
        w,
        window_strides=tuple(int(s) for s in window_strides),
        padding=tuple((int(lo), int(hi)) for lo, hi in padding),
        lhs_dilation=tuple(int(d) for d in lhs_dilation),
        rhs_dilation=tuple(int(d) for d in rhs_dilation),
        precision=precision,
    )


# ----------------------------------------------------------------------------- transposes


def _transpose_x(g, x, w, *, window_strides, padding, lhs_dilation, rhs_dilation, precision):
    """dx = (d conv / d x)^T g: g correlated with the flipped kernel, features swapped."""
    x_shape, w_shape = x.aval.shape, w.shape
    pad = []
    for d in range(2):
        lhs = _dilate(x_shape[1 + d], lhs_dilation[d])
        window = _dilate(w_shape[d], rhs_dilation[d])
        out = _dilate(g.shape[1 + d], window_strides[d])
        before = window - padding[d][0] - 1
        pad.append((before, lhs + window - 1 - out - before))
    w_t = jnp.transpose(lax.rev(w, (0, 1)), (0, 1, 3, 2))  # [kh, kw, Co, Ci]
    return _bind(g, w_t, lhs_dilation, pad, window_strides, rhs_dilation, precision)


# Examples per kernel-gradient convolution. XLA:CPU computes `dw` as one convolution whose
# "window" is the whole image and whose contraction runs over the batch; in chunks of 16
# examples, summed, it stays in cache: measured on 2 cores (batch 128, 3x3, NHWC), 24.4 -> 7.9 ms
# at 16 channels / 32x32, 20.7 -> 7.5 ms at 32 / 16x16, 10.5 -> 6.0 ms at 64 / 8x8.
DW_BATCH_CHUNK = 16


def _transpose_w(g, x, w, *, window_strides, padding, lhs_dilation, rhs_dilation, precision):
    """dw = (d conv / d w)^T g: batch and features of x swapped, g as the kernel; summed over
    chunks of `DW_BATCH_CHUNK` examples."""
    x_shape, w_shape = x.shape, w.aval.shape
    pad = []
    for d in range(2):
        lhs = _dilate(x_shape[1 + d], lhs_dilation[d])
        window = _dilate(w_shape[d], rhs_dilation[d])
        out = _dilate(g.shape[1 + d], window_strides[d])
        lo = padding[d][0]
        pad.append((lo, (out - lhs) + (window - lo - 1)))
    dw = None
    for start in range(0, max(x_shape[0], 1), DW_BATCH_CHUNK):
        stop = min(start + DW_BATCH_CHUNK, x_shape[0])
        lhs_t = jnp.transpose(x[start:stop], (3, 1, 2, 0))  # [Ci, H, W, b]
        rhs_t = jnp.transpose(g[start:stop], (1, 2, 0, 3))  # [H', W', b, Co]
        part = _bind(lhs_t, rhs_t, rhs_dilation, pad, lhs_dilation, window_strides, precision)
        dw = part if dw is None else dw + part
    return jnp.transpose(dw, (1, 2, 0, 3))  # [kh, kw, Ci, Co]


ad.defbilinear(conv_p, _transpose_x, _transpose_w)


# ----------------------------------------------------------------------------- vmap


def _batch_rule(args, dims, **params):
    x, w = args
    x_dim, w_dim = dims
    if w_dim is None:
        # [K, B, ...] -> [K * B, ...]: one convolution over a larger batch.
        x = jnp.moveaxis(x, x_dim, 0)
        k, b = x.shape[:2]
        y = conv_p.bind(x.reshape((k * b,) + x.shape[2:]), w, **params)
        return y.reshape((k, b) + y.shape[1:]), 0
    if x_dim is None:
        # [K, kh, kw, Ci, Co] -> [kh, kw, Ci, K * Co]: one convolution with more outputs.
        w = jnp.moveaxis(w, w_dim, 3)
        kh, kw, ci, k, co = w.shape
        y = conv_p.bind(x, w.reshape(kh, kw, ci, k * co), **params)
        y = y.reshape(y.shape[:3] + (k, co))
        return jnp.moveaxis(y, 3, 0), 0
    # Both mapped (e.g. `lax.map(..., batch_size=k)` over blocks with stacked weights): one
    # canonical convolution per entry. k is small there; a grouped convolution would need
    # grouped transposes, which XLA:CPU does not run on its fast kernels either.
    x = jnp.moveaxis(x, x_dim, 0)
    w = jnp.moveaxis(w, w_dim, 0)
    return jnp.stack([conv_p.bind(x[i], w[i], **params) for i in range(x.shape[0])]), 0


batching.primitive_batchers[conv_p] = _batch_rule


# ----------------------------------------------------------------------------- public entry


def resolve_impl(impl: str) -> str:
    """'auto' -> 'canonical' on CPU, 'xla' on GPU/TPU; otherwise checks the name."""
    if impl not in IMPLS:
        raise ValueError(f"conv_impl={impl!r} is not supported; allowed values: {list(IMPLS)}")
    if impl == "auto":
        return "canonical" if jax.default_backend() == "cpu" else "xla"
    return impl


def conv2d(
    x: Array,
    w: Array,
    strides: Sequence[int] = (1, 1),
    padding: Sequence[tuple[int, int]] = ((0, 0), (0, 0)),
    *,
    rhs_dilation: Sequence[int] = (1, 1),
    precision=None,
    impl: str = "auto",
) -> Array:
    """`y[b, i, j, o] = sum_{u, v, c} x_pad[b, s_h i + r_h u, s_w j + r_w v, c] w[u, v, c, o]`.

    Args:
      x: `[B, H, W, C_in]`.
      w: `[kh, kw, C_in, C_out]`, same dtype as `x`.
      strides: `(s_h, s_w)`.
      padding: `((lo_h, hi_h), (lo_w, hi_w))` zeros added around `x`'s spatial axes.
      rhs_dilation: `(r_h, r_w)`, kernel (atrous) dilation.
      precision: as for `lax.conv_general_dilated`.
      impl: 'canonical' (`conv_p`), 'xla' (`lax.conv_general_dilated`) or 'auto' (see the module
        docstring).

    Returns:
      `[B, H', W', C_out]`, `H' = floor((H + lo_h + hi_h - r_h (kh - 1) - 1) / s_h) + 1`.
    """
    padding = tuple(tuple(p) for p in padding)
    if resolve_impl(impl) == "xla":
        return _lax_conv(
            x, w, window_strides=tuple(strides), padding=padding, lhs_dilation=(1, 1),
            rhs_dilation=tuple(rhs_dilation), precision=precision,
        )
    return _bind(x, w, strides, padding, (1, 1), rhs_dilation, precision)


def noncanonical_loop_convolutions(hlo_text: str) -> list[str]:
    """Convolutions with non-canonical dimension labels inside loop bodies of compiled HLO.

    `hlo_text` is `jitted.lower(...).compile().as_text()`. A computation is inside a loop when a
    `while` instruction names it as `body=`/`condition=`, or when such a computation calls it
    (fusions, calls, conditionals, nested loops). Returns the offending instruction lines; empty
    when every convolution inside a loop is `b01f_01io->b01f` (NHWC x HWIO -> NHWC), the form
    XLA:CPU runs on its fast kernels.
    """
    computations: dict[str, list[str]] = {}
    current = None
    for line in hlo_text.splitlines():
        header = _COMPUTATION_HEADER.match(line)
        if header:
            current = header.group(1)
            computations[current] = []
        elif current is not None and line.startswith(" "):
            computations[current].append(line.strip())

    def called(lines, keys):
        names = []
        for line in lines:
            names += _CALLEE.findall(line) if keys is None else [
                name for key, name in _CALLEE_WITH_KEY.findall(line) if key in keys
            ]
            for group in _BRANCHES.findall(line):
                names += [n.strip().lstrip("%") for n in group.split(",")]
        return names

    frontier = called([l for ls in computations.values() for l in ls if " while(" in l],
                      ("body", "condition"))
    in_loop: set[str] = set()
    while frontier:
        name = frontier.pop()
        if name not in in_loop and name in computations:
            in_loop.add(name)
            frontier += called(computations[name], None)
    bad = []
    for name in sorted(in_loop):
        for line in computations[name]:
            if " convolution(" in line:
                labels = _DIM_LABELS.search(line)
                if labels is None or labels.group(1) != CANONICAL_DIM_LABELS:
                    bad.append(line)
    return bad


CANONICAL_DIM_LABELS = "b01f_01io->b01f"
_COMPUTATION_HEADER = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) \(.*\{$")
_CALLEE_WITH_KEY = re.compile(r"\b(body|condition|to_apply|calls)=%?([\w.\-]+)")
_CALLEE = re.compile(r"\b(?:body|condition|to_apply|calls)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_DIM_LABELS = re.compile(r"dim_labels=([\w>\-]+)")
