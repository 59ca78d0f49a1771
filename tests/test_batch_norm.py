"""resflax.layers.batch_norm_train: its closed-form derivative against autodiff of the textbook
forward formula, in float64: values, jvp, vjp and second order (jvp of vjp, vjp of jvp), dense
and conv shapes, inside and outside lax.scan / while_loop; and BatchNorm's modes around it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resflax import layers

EPS = 1e-5


def reference(x, scale, bias):
    """The forward formula, differentiated by autodiff (an independent implementation)."""
    axes = tuple(range(x.ndim - 1))
    mean = x.mean(axes)
    var = ((x - mean) ** 2).mean(axes)
    return (x - mean) / jnp.sqrt(var + EPS) * scale + bias, mean, var


def closed_form(x, scale, bias):
    return layers.batch_norm_train(x, scale, bias, EPS, x.dtype)


def draw(shape, seed):
    keys = jax.random.split(jax.random.key(seed), 6)
    c = shape[-1]
    primals = (2.0 + 3.0 * jax.random.normal(keys[0], shape, jnp.float64),
               1.0 + jax.random.normal(keys[1], (c,), jnp.float64),
               jax.random.normal(keys[2], (c,), jnp.float64))
    tangents = (jax.random.normal(keys[3], shape, jnp.float64),
                jax.random.normal(keys[4], (c,), jnp.float64),
                jax.random.normal(keys[5], (c,), jnp.float64))
    return primals, tangents


def close(a, b, rtol=1e-10):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=rtol,
                                   atol=rtol * float(np.abs(np.asarray(v)).max()))


SHAPES = [(7, 5), (4, 3, 3, 2), (2, 4, 4, 6)]


@pytest.mark.parametrize("shape", SHAPES)
def test_values_and_every_derivative_equal_autodiff_of_the_formula(shape):
    with jax.enable_x64(True):
        primals, tangents = draw(shape, 0)
        close(closed_form(*primals), reference(*primals))
        close(jax.jvp(closed_form, primals, tangents), jax.jvp(reference, primals, tangents))
        # Reverse mode with a cotangent for each output (y, mean, var).
        y, _, _ = reference(*primals)
        cot = (jnp.cos(y), jnp.arange(shape[-1], dtype=jnp.float64),
               -jnp.ones(shape[-1], jnp.float64))
        close(jax.vjp(closed_form, *primals)[1](cot), jax.vjp(reference, *primals)[1](cot))

        # Second order: the Hessian-vector product of a scalar loss both ways round.
        def loss(f):
            return lambda *p: jnp.sum(jnp.sin(f(*p)[0]) * jnp.arange(y.size).reshape(y.shape))

        hvp = lambda f: jax.jvp(jax.grad(loss(f), argnums=(0, 1, 2)), primals, tangents)[1]
        close(hvp(closed_form), hvp(reference), 1e-8)
        vjp_of_jvp = lambda f: jax.grad(
            lambda *p: jnp.sum(jax.jvp(f, p, tangents)[1][0] ** 2), argnums=(0, 1, 2))(*primals)
        close(vjp_of_jvp(closed_form), vjp_of_jvp(reference), 1e-8)


def test_derivatives_inside_scan_and_while_loop():
    """A scanned stack of norms (the shape of a scanned net) and a power-iteration-like loop."""
    with jax.enable_x64(True):
        (x, scale, bias), (dx, _, _) = draw((3, 4, 4, 5), 1)
        scales = jnp.stack([scale, 2 * scale, scale + 1])
        biases = jnp.stack([bias, -bias, 0 * bias])

        def stack(f):
            def body(h, sb):
                return jnp.tanh(f(h, *sb)[0]), None
            return lambda z, s: jnp.sum(jax.lax.scan(body, z, (s, biases))[0] ** 3)

        for wrt in (0, 1):
            close(jax.grad(stack(closed_form), wrt)(x, scales),
                  jax.grad(stack(reference), wrt)(x, scales))
        close(jax.jvp(lambda z: stack(closed_form)(z, scales), (x,), (dx,)),
              jax.jvp(lambda z: stack(reference)(z, scales), (x,), (dx,)))

        def iterate(f):  # v <- J^T J v / |.|, five times: jvp and vjp in a while_loop.
            g = lambda z: f(z, scale, bias)[0]

            def body(_, v):
                _, jv = jax.jvp(g, (x,), (v,))
                w = jax.vjp(g, x)[1](jv)[0]
                return w / jnp.linalg.norm(w)
            return jax.lax.fori_loop(0, 5, body, dx)

        close(iterate(closed_form), iterate(reference), 1e-8)


def test_module_train_mode_matches_the_formula_and_updates_running_stats():
    x = 3.0 + 2.0 * jax.random.normal(jax.random.key(3), (16, 3, 3, 4))
    bn = layers.BatchNorm(momentum=0.8)
    variables = bn.init(jax.random.key(0), x, train=False)
    variables = {"params": {"scale": jnp.arange(1.0, 5.0), "bias": jnp.full(4, 0.5)},
                 "batch_stats": variables["batch_stats"]}
    y, updates = bn.apply(variables, x, train=True, mutable=["batch_stats"])
    expected, mean, var = reference(x, variables["params"]["scale"], 0.5)
    close(y, expected, 1e-5)
    close(updates["batch_stats"]["mean"], 0.2 * mean, 1e-5)
    close(updates["batch_stats"]["var"], 0.8 + 0.2 * var, 1e-5)
    # The running statistics carry no gradient; the output's gradient is the formula's.
    g = jax.grad(lambda v: jnp.sum(jnp.sin(
        bn.apply(v, x, train=True, mutable=["batch_stats"])[0])))(variables)
    g_ref = jax.grad(lambda p: jnp.sum(jnp.sin(reference(x, p["scale"], p["bias"])[0])))(
        variables["params"])
    close(g["params"], g_ref, 1e-4)


def test_low_precision_compute_dtype_keeps_float32_statistics():
    x = (3.0 + jax.random.normal(jax.random.key(4), (32, 4, 4, 3))).astype(jnp.bfloat16)
    y, mean, var = layers.batch_norm_train(x, jnp.ones(3), jnp.zeros(3), EPS, jnp.bfloat16)
    assert y.dtype == jnp.bfloat16 and mean.dtype == var.dtype == jnp.float32
    dy = jax.grad(lambda z: jnp.sum(layers.batch_norm_train(
        z, jnp.ones(3), jnp.zeros(3), EPS, jnp.bfloat16)[0].astype(jnp.float32) ** 2))(x)
    assert dy.dtype == jnp.bfloat16
    # sum(y^2) = n * var / (var + eps) is flat in x up to eps: its gradient is ~0.
    assert float(jnp.abs(dy.astype(jnp.float32)).max()) < 0.05
