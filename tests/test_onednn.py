"""`resflax.onednn` under `resflax.conv`: oneDNN's float32 convolutions give XLA's numbers for
values and every derivative, in and out of `lax.scan`; float64 stays on XLA; 'auto' takes oneDNN
from `conv.ONEDNN_MIN_MACS` multiply-adds. Skipped without the `onednn` extra (or without g++)."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from resflax import conv, onednn

from test_conv import ZOO_SHAPES

pytestmark = pytest.mark.skipif(
    jax.default_backend() != "cpu" or not onednn.available(),
    reason="oneDNN not available (pip install -e '.[onednn]', g++)",
)

CALLS = ("resflax_onednn_forward", "resflax_onednn_backward_data",
         "resflax_onednn_backward_weights")


def convs(kernel, stride):
    strides, padding = (stride, stride), ((kernel // 2,) * 2,) * 2
    return {impl: (lambda x, w, impl=impl: conv.conv2d(x, w, strides, padding, impl=impl))
            for impl in ("onednn", "canonical")}


def operands(size, kernel, c_in, c_out, dtype=jnp.float32):
    k = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(k[0], (3, size, size, c_in), dtype)
    w = jax.random.normal(k[1], (kernel, kernel, c_in, c_out), dtype)
    return x, w, jax.random.normal(k[2], x.shape, dtype), jax.random.normal(k[3], w.shape, dtype)


def derivatives(f, x, w, tx, tw):
    """Value, jvp, vjp, jvp of vjp, vjp of vjp and a Hessian-vector product of `f` at (x, w)."""
    g = jnp.sin(f(x, w))
    vjp = lambda x, w: jax.vjp(f, x, w)[1](g)
    scalar = lambda x, w: jnp.sum(jnp.cos(f(x, w)) * f(x, w))
    return dict(
        value=f(x, w),
        jvp=jax.jvp(f, (x, w), (tx, tw))[1],
        vjp=vjp(x, w),
        jvp_of_vjp=jax.jvp(vjp, (x, w), (tx, tw))[1],
        vjp_of_vjp=jax.vjp(vjp, x, w)[1](vjp(tx, tw)),
        hvp=jax.jvp(jax.grad(scalar, argnums=(0, 1)), (x, w), (tx, tw))[1],
    )


def assert_close(got, want, rtol):
    for p, q in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        scale = max(1.0, float(np.max(np.abs(q))))
        np.testing.assert_allclose(np.asarray(p), np.asarray(q), rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize("size,kernel,stride,c_in,c_out", ZOO_SHAPES)
def test_float32_values_and_every_derivative_equal_xla(size, kernel, stride, c_in, c_out):
    fs = convs(kernel, stride)
    args = operands(size, kernel, c_in, c_out)
    program = {impl: jax.jit(lambda *a, f=f: derivatives(f, *a)) for impl, f in fs.items()}
    text = program["onednn"].lower(*args).as_text()
    assert all(call in text for call in CALLS)  # oneDNN runs every one of the three.
    assert "resflax_onednn" not in program["canonical"].lower(*args).as_text()
    assert_close(program["onednn"](*args), program["canonical"](*args), rtol=2e-5)


def test_derivatives_inside_scan_and_under_vmap_equal_xla():
    x, _, tx, _ = operands(8, 3, 4, 4)
    ws = jax.random.normal(jax.random.key(2), (3, 3, 3, 4, 4), jnp.float32) / 6

    def programs(f):
        def scanned(ws, x):
            h, _ = lax.scan(lambda h, w: (jnp.tanh(f(h, w)), None), x, ws)
            return jnp.sum(h**2)

        return jax.jit(lambda ws, x, tx: dict(
            grad=jax.grad(scanned, argnums=(0, 1))(ws, x),
            jvp_of_grad=jax.jvp(lambda z: jax.grad(scanned, 1)(ws, z), (x,), (tx,))[1],
            vmap_jvp=jax.vmap(lambda t: jax.jvp(lambda z: f(z, ws[0]), (x,), (t,))[1])(
                jnp.stack([tx, x])),
            vmap_grad=jax.vmap(jax.grad(lambda x: jnp.sum(jnp.sin(f(x[None], ws[0])))))(x),
        ))

    fs = convs(3, 1)
    got, want = programs(fs["onednn"]), programs(fs["canonical"])
    assert all(call in got.lower(ws, x, tx).as_text() for call in CALLS)
    assert_close(got(ws, x, tx), want(ws, x, tx), rtol=2e-5)


@pytest.mark.parametrize("size,kernel,stride,c_in,c_out", ZOO_SHAPES[:2])
def test_float64_falls_back_to_xla(size, kernel, stride, c_in, c_out):
    with jax.enable_x64(True):
        fs = convs(kernel, stride)
        args = operands(size, kernel, c_in, c_out, jnp.float64)
        program = {impl: jax.jit(lambda *a, f=f: derivatives(f, *a)) for impl, f in fs.items()}
        assert "resflax_onednn" not in program["onednn"].lower(*args).as_text()
        assert_close(program["onednn"](*args), program["canonical"](*args), rtol=1e-12)


def test_auto_takes_onednn_from_the_size_threshold_and_the_switch_turns_it_off():
    assert conv.resolve_impl("auto") == "onednn"
    assert conv.resolve_impl("onednn") == "onednn"

    def lowered(batch, impl="auto"):  # One 3x3 convolution, 4 -> 4 channels at 8x8.
        x, w, _, _ = operands(8, 3, 4, 4)
        x = jnp.tile(x, (batch, 1, 1, 1))[:batch]
        f = lambda x, w: jax.grad(lambda x, w: jnp.sum(conv.conv2d(x, w, (1, 1), ((1, 1),) * 2,
                                                                  impl=impl) ** 2), (0, 1))(x, w)
        return jax.jit(f).lower(x, w).as_text()

    # 8 x 8 x 9 x 4 x 4 = 9216 multiply-adds per example.
    small = conv.ONEDNN_MIN_MACS // 9216  # Just below the threshold ...
    assert "resflax_onednn" not in lowered(small)
    assert "resflax_onednn" in lowered(small, impl="onednn")  # ... unless forced;
    assert all(call in lowered(small + 1) for call in CALLS)  # just above it, all three.
    assert "resflax_onednn" not in lowered(small + 1, impl="canonical")
    code = "from resflax import conv, onednn; print(conv.resolve_impl('auto'), onednn.available())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ, RESFLAX_ONEDNN="0", JAX_PLATFORMS="cpu"))
    assert out.stdout.split() == ["canonical", "False"]


def test_multiply_adds_of_the_three_primitives_agree():
    x, w, _, _ = operands(8, 3, 4, 6)
    params = dict(window_strides=(2, 2), padding=((1, 1), (1, 1)), lhs_dilation=(1, 1),
                  rhs_dilation=(1, 1), precision=None, onednn="never")
    y = jax.eval_shape(lambda x, w: conv.conv_p.bind(x, w, **params), x, w)
    want = 3 * 4 * 4 * 9 * 4 * 6  # B H' W' kh kw C_in C_out
    assert conv.multiply_adds(conv.conv_p, (x, w), params) == want
    assert conv.multiply_adds(conv.conv_dx_p, (y, w), dict(params, x_spatial=(8, 8))) == want
    assert conv.multiply_adds(conv.conv_dw_p, (x, y), dict(params, w_spatial=(3, 3))) == want
