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

The gradients as primitives. `conv_dx_p` (g, w -> dx) and `conv_dw_p` (x, g -> dw) carry the
forward convolution's geometry; XLA lowers them to the two formulas above. The three are one
trilinear form `<g, conv(x, w)>` read three ways, so each one's transposes are the other two
(e.g. `conv_dx_p`'s transpose in g is `conv_p`, in w `conv_dw_p`): every derivative of every order
is again one of the three.

oneDNN. On CPU, with the `onednn` extra installed, each of the three can lower to an XLA FFI
custom call into oneDNN's forward / backward-data / backward-weights convolution
(`resflax.onednn`, what PyTorch runs on CPU; 1.7-5.5x faster than XLA:CPU's kernels per layer
from batch 32 of 8x8x8 up to ResNet-20's batch-128 layers), for float32 without input dilation;
anything else (float64, the formulas' inner input-dilated convolutions under `vmap`, oneDNN
missing) lowers to XLA. Custom calls run inside loops like any other op. The primitives' `onednn`
parameter says when: 'always', 'by_size' (when the convolution has at least `ONEDNN_MIN_MACS`
multiply-adds: below that oneDNN's fixed cost per call loses to XLA's kernels) or 'never'.

Which to use. `conv2d(..., impl='auto')` (the default) takes `conv_p` on CPU, lowered to oneDNN
by size where oneDNN is available and to XLA otherwise, and `lax.conv_general_dilated` on
GPU/TPU, whose compilers (cuDNN, the TPU convolution emitter) choose layouts themselves.
'onednn' forces oneDNN for every float32 convolution, 'canonical' forces XLA's kernels (`conv_p`
without oneDNN), 'xla' is `lax.conv_general_dilated`; `RESFLAX_ONEDNN=0` turns oneDNN off
process-wide. All give the same numbers up to float rounding (tests compare them in float64,
values and derivatives, in and out of loops; oneDNN in float32). Measured on 2 cores
(`benchmarks/onednn_conv.py --shapes=crossover --batch=4|8|32|128`, 2026-12-08, AMD EPYC, load
0.6-2.1), oneDNN's over XLA's time for fwd + dx + dw of one 3x3 convolution: 1.26-1.73 at 0.9-1.8e4
multiply-adds, 0.57-0.83 at 3.7-7.4e4, 0.86-1.10 at 1.5e5 (three shapes at batch 4), 0.73-0.91
at 2.9e5 and 0.18-0.80 at every size from 5.9e5 on (the digits-size CIFAR nets' convolutions
are 1.2e6 at batch 32: 0.52-0.58); hence `ONEDNN_MIN_MACS` = 2e5. The ResNet-20 train step at
batch 128: 0.61-0.63x PyTorch's images/s with oneDNN, 0.43-0.44x without (README, Benchmarks).
"""

from __future__ import annotations

import functools
import math
import re
from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import core
from jax.interpreters import ad, batching, mlir

from resflax import onednn as onednn_lib

Array = jax.Array

IMPLS = ("auto", "onednn", "canonical", "xla")
ONEDNN_MODES = ("always", "by_size", "never")  # The primitives' `onednn` parameter.
# 'by_size' lowers a convolution to oneDNN from this many multiply-adds (per pass: the forward
# and both gradients of one convolution have the same count): above the sizes where it was
# measured to lose or break even (module docstring).
ONEDNN_MIN_MACS = 200_000
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


def _canonical(x, w, window_strides, padding, lhs_dilation, rhs_dilation, precision):
    """The canonical convolution as one HLO convolution (what XLA lowers every primitive to)."""
    return _lax_conv(x, w, window_strides=window_strides, padding=padding,
                     lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation, precision=precision)


# ----------------------------------------------------------------------------- the formulas


def _dx_formula(g, w, x_spatial, window_strides, padding, lhs_dilation, rhs_dilation, precision,
                conv):
    """dx = (d conv / d x)^T g: g correlated with the flipped kernel, features swapped."""
    w_shape = w.shape
    pad = []
    for d in range(2):
        lhs = _dilate(x_spatial[d], lhs_dilation[d])
        window = _dilate(w_shape[d], rhs_dilation[d])
        out = _dilate(g.shape[1 + d], window_strides[d])
        before = window - padding[d][0] - 1
        pad.append((before, lhs + window - 1 - out - before))
    w_t = jnp.transpose(lax.rev(w, (0, 1)), (0, 1, 3, 2))  # [kh, kw, Co, Ci]
    return conv(g, w_t, lhs_dilation, pad, window_strides, rhs_dilation, precision)


# Examples per kernel-gradient convolution. XLA:CPU computes `dw` as one convolution whose
# "window" is the whole image and whose contraction runs over the batch; in chunks of 16
# examples, summed, it stays in cache: measured on 2 cores (batch 128, 3x3, NHWC), 24.4 -> 7.9 ms
# at 16 channels / 32x32, 20.7 -> 7.5 ms at 32 / 16x16, 10.5 -> 6.0 ms at 64 / 8x8.
DW_BATCH_CHUNK = 16


def _dw_formula(x, g, w_spatial, window_strides, padding, lhs_dilation, rhs_dilation, precision,
                conv):
    """dw = (d conv / d w)^T g: batch and features of x swapped, g as the kernel; summed over
    chunks of `DW_BATCH_CHUNK` examples."""
    x_shape = x.shape
    pad = []
    for d in range(2):
        lhs = _dilate(x_shape[1 + d], lhs_dilation[d])
        window = _dilate(w_spatial[d], rhs_dilation[d])
        out = _dilate(g.shape[1 + d], window_strides[d])
        lo = padding[d][0]
        pad.append((lo, (out - lhs) + (window - lo - 1)))
    dw = None
    for start in range(0, max(x_shape[0], 1), DW_BATCH_CHUNK):
        stop = min(start + DW_BATCH_CHUNK, x_shape[0])
        lhs_t = jnp.transpose(x[start:stop], (3, 1, 2, 0))  # [Ci, H, W, b]
        rhs_t = jnp.transpose(g[start:stop], (1, 2, 0, 3))  # [H', W', b, Co]
        part = conv(lhs_t, rhs_t, rhs_dilation, pad, lhs_dilation, window_strides, precision)
        dw = part if dw is None else dw + part
    return jnp.transpose(dw, (1, 2, 0, 3))  # [kh, kw, Ci, Co]


# ----------------------------------------------------------------------------- the primitives

# Each takes the forward convolution's geometry (`window_strides`, `padding`, `lhs_dilation`,
# `rhs_dilation`, `precision`) and `onednn` (of `ONEDNN_MODES`: when to lower to oneDNN on CPU,
# see `_onednn_call`); the gradients also the spatial shape of the operand they produce.
conv_p = core.Primitive("resflax_conv_nhwc")  # (x, w) -> y
conv_dx_p = core.Primitive("resflax_conv_nhwc_dx")  # (g, w) -> dx; x_spatial
conv_dw_p = core.Primitive("resflax_conv_nhwc_dw")  # (x, g) -> dw; w_spatial


def _geometry(params):
    return tuple(params[k] for k in ("window_strides", "padding", "lhs_dilation", "rhs_dilation",
                                     "precision"))


def _check(name, a, b, a_axis, b_axis, what):
    if a.ndim != 4 or b.ndim != 4 or a.shape[a_axis] != b.shape[b_axis]:
        raise ValueError(f"{name}: expected {what}, got {a.shape} and {b.shape}")
    if a.dtype != b.dtype:
        raise TypeError(f"{name}: operands must have one dtype, got {a.dtype} and {b.dtype}")


@conv_p.def_abstract_eval
def _abstract_eval(x, w, *, window_strides, padding, lhs_dilation, rhs_dilation, precision,
                   onednn):
    del precision, onednn
    _check("conv", x, w, 3, 2, "x [B, H, W, C_in] and w [kh, kw, C_in, C_out]")
    shape = _out_shape(x.shape, w.shape, window_strides, padding, lhs_dilation, rhs_dilation)
    return x.update(shape=shape, weak_type=False)


@conv_dx_p.def_abstract_eval
def _abstract_eval_dx(g, w, *, x_spatial, **params):
    _check("conv dx", g, w, 3, 3, "g [B, H', W', C_out] and w [kh, kw, C_in, C_out]")
    return g.update(shape=(g.shape[0], *x_spatial, w.shape[2]), weak_type=False)


@conv_dw_p.def_abstract_eval
def _abstract_eval_dw(x, g, *, w_spatial, **params):
    _check("conv dw", x, g, 0, 0, "x [B, H, W, C_in] and g [B, H', W', C_out]")
    return x.update(shape=(*w_spatial, x.shape[3], g.shape[3]), weak_type=False)


def _xla_fwd(x, w, *, onednn, **geometry):
    del onednn
    return _lax_conv(x, w, **geometry)


def _xla_dx(g, w, *, x_spatial, onednn, **params):
    del onednn
    return _dx_formula(g, w, x_spatial, *_geometry(params), conv=_canonical)


def _xla_dw(x, g, *, w_spatial, onednn, **params):
    del onednn
    return _dw_formula(x, g, w_spatial, *_geometry(params), conv=_canonical)


_XLA = {conv_p: _xla_fwd, conv_dx_p: _xla_dx, conv_dw_p: _xla_dw}
for _prim, _fn in _XLA.items():
    _prim.def_impl(_fn)
    mlir.register_lowering(_prim, mlir.lower_fun(_fn, multiple_results=False))


def multiply_adds(prim, avals, params) -> int:
    """Multiply-adds of the convolution that `prim` (any of the three) computes on `avals`: the
    forward's `B H' W' kh kw C_in C_out`, the same for both of its transposes."""
    if prim is conv_p:
        x, w = avals
        y_shape = _out_shape(x.shape, w.shape, params["window_strides"], params["padding"],
                             params["lhs_dilation"], params["rhs_dilation"])
        return math.prod(y_shape) * math.prod(w.shape[:3])
    if prim is conv_dx_p:
        g, w = avals
        return math.prod(g.shape) * math.prod(w.shape[:3])
    x, g = avals
    return math.prod(g.shape) * math.prod(params["w_spatial"]) * x.shape[3]


def _onednn_call(prim, avals, params):
    """The oneDNN custom call computing `prim` (`resflax.onednn`), or None where oneDNN does not
    apply: `onednn='never'`, `'by_size'` below `ONEDNN_MIN_MACS`, not float32, input dilation
    (only the XLA formulas' inner convolutions have it), an empty or negatively padded operand,
    or oneDNN unavailable."""
    mode = params["onednn"]
    if mode == "never" or any(a.dtype != jnp.float32 for a in avals):
        return None
    if mode == "by_size" and multiply_adds(prim, avals, params) < ONEDNN_MIN_MACS:
        return None
    if params["lhs_dilation"] != (1, 1) or min(min(p) for p in params["padding"]) < 0:
        return None
    if any(d == 0 for a in avals for d in a.shape) or not onednn_lib.available():
        return None
    geometry = dict(window_strides=params["window_strides"], padding=params["padding"],
                    rhs_dilation=params["rhs_dilation"])
    if prim is conv_p:
        x, w = avals
        y_shape = _out_shape(x.shape, w.shape, params["window_strides"], params["padding"],
                             (1, 1), params["rhs_dilation"])
        return lambda x, w: onednn_lib.forward(x, w, y_shape, **geometry)
    if prim is conv_dx_p:
        g, w = avals
        x_shape = (g.shape[0], *params["x_spatial"], w.shape[2])
        return lambda g, w: onednn_lib.backward_data(g, w, x_shape, **geometry)
    x, g = avals
    w_shape = (*params["w_spatial"], x.shape[3], g.shape[3])
    return lambda x, g: onednn_lib.backward_weights(x, g, w_shape, **geometry)


def _cpu_lowering(prim):
    def lower(ctx, a, b, **params):
        fn = _onednn_call(prim, ctx.avals_in, params) or functools.partial(_XLA[prim], **params)
        return mlir.lower_fun(fn, multiple_results=False)(ctx, a, b)
    return lower


for _prim in _XLA:
    mlir.register_lowering(_prim, _cpu_lowering(_prim), platform="cpu")


def _bind(x, w, window_strides, padding, lhs_dilation=(1, 1), rhs_dilation=(1, 1), precision=None,
          onednn="never"):
    if onednn not in ONEDNN_MODES:
        raise ValueError(f"onednn={onednn!r} is not supported; allowed values: {ONEDNN_MODES}")
    return conv_p.bind(
        x,
        w,
        window_strides=tuple(int(s) for s in window_strides),
        padding=tuple((int(lo), int(hi)) for lo, hi in padding),
        lhs_dilation=tuple(int(d) for d in lhs_dilation),
        rhs_dilation=tuple(int(d) for d in rhs_dilation),
        precision=precision,
        onednn=onednn,
    )


# ----------------------------------------------------------------------------- transposes
#
# The three primitives are one trilinear form <g, conv(x, w)> read three ways, so each one's
# transposes are the other two: a derivative of any order is again conv_p, conv_dx_p or conv_dw_p.


def _spatial(a):
    return tuple(a.aval.shape[1:3])


def _kernel_spatial(a):
    return tuple(a.aval.shape[:2])


ad.defbilinear(
    conv_p,
    lambda ct, x, w, **p: conv_dx_p.bind(ct, w, x_spatial=_spatial(x), **p),
    lambda ct, x, w, **p: conv_dw_p.bind(x, ct, w_spatial=_kernel_spatial(w), **p),
)
ad.defbilinear(
    conv_dx_p,
    lambda ct, g, w, *, x_spatial, **p: conv_p.bind(ct, w, **p),
    lambda ct, g, w, *, x_spatial, **p: conv_dw_p.bind(ct, g, w_spatial=_kernel_spatial(w), **p),
)
ad.defbilinear(
    conv_dw_p,
    lambda ct, x, g, *, w_spatial, **p: conv_dx_p.bind(g, ct, x_spatial=_spatial(x), **p),
    lambda ct, x, g, *, w_spatial, **p: conv_p.bind(x, ct, **p),
)


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


def _gradient_batch_rule(prim, formula, shape_param):
    """vmap of conv_dx_p / conv_dw_p: the gradient's formula in conv_p (whose batch rule keeps
    it canonical); for dx with an unbatched kernel, one larger batch instead."""
    def rule(args, dims, **params):
        if prim is conv_dx_p and dims[1] is None:
            g = jnp.moveaxis(args[0], dims[0], 0)
            k, b = g.shape[:2]
            dx = prim.bind(g.reshape((k * b,) + g.shape[2:]), args[1], **params)
            return dx.reshape((k, b) + dx.shape[1:]), 0
        spatial = params.pop(shape_param)
        conv = functools.partial(_bind, onednn=params.pop("onednn"))
        fn = lambda a, b: formula(a, b, spatial, *_geometry(params), conv=conv)
        return jax.vmap(fn, dims)(*args), 0
    return rule


batching.primitive_batchers[conv_p] = _batch_rule
batching.primitive_batchers[conv_dx_p] = _gradient_batch_rule(conv_dx_p, _dx_formula, "x_spatial")
batching.primitive_batchers[conv_dw_p] = _gradient_batch_rule(conv_dw_p, _dw_formula, "w_spatial")


# ----------------------------------------------------------------------------- public entry


def resolve_impl(impl: str) -> str:
    """What `impl` runs here: 'auto' -> 'xla' on GPU/TPU, on CPU 'onednn' where oneDNN is
    available (for convolutions of at least `ONEDNN_MIN_MACS` multiply-adds; module docstring,
    Which to use), else 'canonical'; any other name is checked and returned."""
    if impl not in IMPLS:
        raise ValueError(f"conv_impl={impl!r} is not supported; allowed values: {list(IMPLS)}")
    if impl == "auto":
        if jax.default_backend() != "cpu":
            return "xla"
        return "onednn" if onednn_lib.available() else "canonical"
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
      precision: as for `lax.conv_general_dilated` (oneDNN computes float32 in float32).
      impl: 'auto' (CPU: `conv_p`, on oneDNN where available from `ONEDNN_MIN_MACS`
        multiply-adds; GPU/TPU: 'xla'), 'onednn' (`conv_p` and its gradients on oneDNN on CPU,
        float32; XLA otherwise), 'canonical' (`conv_p` on XLA) or 'xla'
        (`lax.conv_general_dilated`); module docstring, Which to use.

    Returns:
      `[B, H', W', C_out]`, `H' = floor((H + lo_h + hi_h - r_h (kh - 1) - 1) / s_h) + 1`.
    """
    padding = tuple(tuple(p) for p in padding)
    resolved = resolve_impl(impl)
    if resolved == "xla":
        return _lax_conv(
            x, w, window_strides=tuple(strides), padding=padding, lhs_dilation=(1, 1),
            rhs_dilation=tuple(rhs_dilation), precision=precision,
        )
    onednn = "never" if resolved == "canonical" else "by_size" if impl == "auto" else "always"
    return _bind(x, w, strides, padding, (1, 1), rhs_dilation, precision, onednn=onednn)


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
