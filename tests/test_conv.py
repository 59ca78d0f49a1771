"""`resflax.conv`: the same numbers as `lax.conv_general_dilated` for values and every derivative,
inside and outside loops, and no non-canonical convolution left in compiled loop bodies."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import resflax
from resflax import conv, onednn, parallel, training
from resflax import diagnostics as dg
from resflax.models import unroll_variables

# (spatial size, kernel, stride, C_in, C_out): every convolution of the zoo -- 3x3 stride 1 and 2
# (basic blocks, CIFAR stem), 1x1 stride 1 and 2 (bottlenecks, projections), 7x7 stride 2 pad 3
# (ImageNet stem) -- also on odd sizes, where a strided convolution skips the last row.
ZOO_SHAPES = [
    (8, 3, 1, 3, 4),
    (8, 3, 2, 4, 6),
    (7, 3, 2, 4, 4),
    (6, 1, 1, 8, 4),
    (8, 1, 2, 4, 8),
    (9, 1, 2, 3, 5),
    (15, 7, 2, 3, 5),
]


def lax_conv(x, w, strides, padding):
    return lax.conv_general_dilated(x, w, strides, padding,
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))


def both(size, kernel, stride):
    """The reference and the canonical convolution, as functions of (x, w)."""
    strides, padding = (stride, stride), ((kernel // 2,) * 2,) * 2
    ref = functools.partial(lax_conv, strides=strides, padding=padding)
    ours = functools.partial(conv.conv2d, strides=strides, padding=padding, impl="canonical")
    return ref, ours


def operands(size, kernel, c_in, c_out, seed=0):
    k = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.normal(k[0], (3, size, size, c_in), jnp.float64)
    w = jax.random.normal(k[1], (kernel, kernel, c_in, c_out), jnp.float64)
    tx = jax.random.normal(k[2], x.shape, jnp.float64)
    tw = jax.random.normal(k[3], w.shape, jnp.float64)
    return x, w, tx, tw


def assert_trees_equal(a, b, rtol=1e-12):
    for p, q in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert p.shape == q.shape
        np.testing.assert_allclose(np.asarray(p), np.asarray(q), rtol=rtol,
                                   atol=rtol * max(1.0, float(np.max(np.abs(q)))))


@pytest.mark.parametrize("size,kernel,stride,c_in,c_out", ZOO_SHAPES)
def test_values_and_every_derivative_equal_lax_in_float64(size, kernel, stride, c_in, c_out):
    with jax.enable_x64(True):
        ref, ours = both(size, kernel, stride)
        x, w, tx, tw = operands(size, kernel, c_in, c_out)
        results = []
        for f in (ref, ours):
            y = f(x, w)
            g = jnp.sin(y)  # A cotangent that is not a function of the primal's shape alone.
            vjp = lambda x, w, f=f, g=g: jax.vjp(f, x, w)[1](g)
            scalar = lambda x, w, f=f: jnp.sum(jnp.cos(f(x, w)) * f(x, w))
            results.append(dict(
                value=y,
                jvp=jax.jvp(f, (x, w), (tx, tw))[1],
                jvp_x=jax.jvp(lambda x: f(x, w), (x,), (tx,))[1],
                vjp=vjp(x, w),
                jvp_of_vjp=jax.jvp(vjp, (x, w), (tx, tw))[1],
                vjp_of_vjp=jax.vjp(vjp, x, w)[1](vjp(tx, tw)),
                hvp=jax.jvp(jax.grad(scalar, argnums=(0, 1)), (x, w), (tx, tw))[1],
                linear_transpose=jax.linear_transpose(lambda z: f(z, w), x)(g),
            ))
        for name in results[0]:
            assert_trees_equal(results[1][name], results[0][name])


@pytest.mark.parametrize("size,kernel,stride,c_in,c_out", ZOO_SHAPES[:3] + ZOO_SHAPES[-1:])
def test_vmap_over_either_or_both_operands(size, kernel, stride, c_in, c_out):
    with jax.enable_x64(True):
        ref, ours = both(size, kernel, stride)
        x, w, tx, tw = operands(size, kernel, c_in, c_out)
        xs, ws = jnp.stack([x, tx, x - tx]), jnp.stack([w, tw, 2 * w])
        for axes, args in (((0, None), (xs, w)), ((None, 0), (x, ws)), ((0, 0), (xs, ws))):
            assert_trees_equal(jax.vmap(ours, axes)(*args), jax.vmap(ref, axes)(*args))
            # Batched jvp: what the diagnostics' basis-vector maps do.
            assert_trees_equal(
                jax.vmap(lambda t: jax.jvp(lambda z: ours(z, w), (x,), (t,))[1])(xs),
                jax.vmap(lambda t: jax.jvp(lambda z: ref(z, w), (x,), (t,))[1])(xs),
            )


def test_derivatives_inside_scan_while_loop_and_lax_map_equal_lax():
    with jax.enable_x64(True):
        x, _, tx, _ = operands(8, 3, 4, 4, seed=1)
        ws = jax.random.normal(jax.random.key(2), (3, 3, 3, 4, 4), jnp.float64) / 6

        def programs(f):
            def scanned(ws, x):
                h, _ = lax.scan(lambda h, w: (jnp.tanh(f(h, w)), None), x, ws)
                return jnp.sum(h**2)

            def looped(w, x):  # A while loop applying the same strided block a data-dependent
                # number of times, as the power iteration does.
                def body(c):
                    i, h = c
                    return i + 1, jnp.tanh(f(h, w))[:, : h.shape[1], : h.shape[2]]
                return jnp.sum(lax.while_loop(lambda c: c[0] < 2, body, (0, x))[1] ** 2)

            def mapped(ws, x):  # lax.map over blocks with stacked weights, 2 at a time (vmap).
                return jnp.sum(lax.map(lambda w: jnp.tanh(f(x, w)), ws, batch_size=2) ** 2)

            return dict(
                scan_grad=jax.grad(scanned, argnums=(0, 1))(ws, x),
                scan_jvp=jax.jvp(lambda z: scanned(ws, z), (x,), (tx,))[1],
                scan_jvp_of_grad=jax.jvp(lambda z: jax.grad(scanned, 1)(ws, z), (x,), (tx,))[1],
                # Reverse mode through `while_loop` is not defined in JAX; forward mode is.
                while_jvp=jax.jvp(lambda z: looped(ws[0], z), (x,), (tx,))[1],
                map_grad=jax.grad(mapped, argnums=(0, 1))(ws, x),
            )

        ref = lambda h, w: lax_conv(h, w, (1, 1), ((1, 1), (1, 1)))
        ours = lambda h, w: conv.conv2d(h, w, (1, 1), ((1, 1), (1, 1)), impl="canonical")
        want, got = programs(ref), programs(ours)
        for name in want:
            assert_trees_equal(got[name], want[name], rtol=1e-11)


def test_auto_picks_conv_p_on_cpu_and_rejects_unknown_names():
    cpu = "onednn" if onednn.available() else "canonical"  # oneDNN by size (test_onednn).
    assert conv.resolve_impl("auto") == (cpu if jax.default_backend() == "cpu" else "xla")
    with pytest.raises(ValueError, match=r"conv_impl='cudnn'.*allowed values.*canonical"):
        conv.resolve_impl("cudnn")
    with pytest.raises(ValueError, match="conv_impl"):
        resflax.build_model(dict(family="cifar_resnet", conv_impl="fast"))


def test_layer_has_flax_conv_parameters_and_values():
    import flax.linen as nn

    x = jax.random.normal(jax.random.key(0), (2, 9, 9, 3))
    ours = resflax.layers.Conv(5, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    theirs = nn.Conv(5, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    variables = theirs.init(jax.random.key(1), x)
    assert jax.tree.map(jnp.shape, ours.init(jax.random.key(1), x)) == jax.tree.map(
        jnp.shape, variables)
    np.testing.assert_allclose(ours.apply(variables, x), theirs.apply(variables, x), rtol=1e-5,
                               atol=1e-6)


# ------------------------------------------------------------------ whole networks


@pytest.mark.parametrize("block", ["plain", "v2"])
def test_scanned_canonical_and_unrolled_xla_nets_give_the_same_loss_gradients_and_diagnostics(
    block,
):
    fields = dict(family="cifar_resnet", block=block, depth=14, width=4, dtype="float64",
                  param_dtype="float64")
    with jax.enable_x64(True):
        x = jax.random.normal(jax.random.key(0), (4, 8, 8, 3), jnp.float64)
        labels = jnp.arange(4) % 10
        scanned = resflax.build_model(dict(fields, conv_impl="canonical"))
        unrolled = resflax.build_model(dict(fields, scan=False, conv_impl="xla"))
        variables = scanned.init(jax.random.key(1), x)
        flat = unroll_variables(variables)

        def loss(model, params, variables):
            (logits, _), _ = model.apply({**variables, "params": params}, x, train=True,
                                         mutable=["batch_stats"])
            return jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(4), labels])

        for got, want in (
            (jax.value_and_grad(loss, 1)(scanned, variables["params"], variables),
             jax.value_and_grad(loss, 1)(unrolled, flat["params"], flat)),
        ):
            np.testing.assert_allclose(got[0], want[0], rtol=1e-12)
            assert_trees_equal(unroll_variables({"params": got[1]})["params"], want[1], 1e-10)

        options = dg.Options(fro_method="exact", exact_max_dim=64, power_iterations=200,
                             power_tol=1e-12, singular_values_max_dim=64)
        key = jax.random.key(2)
        got = dg.to_python(dg.make_diagnostics(scanned, options)(variables, x, labels, key))
        want = dg.to_python(dg.make_diagnostics(unrolled, options)(flat, x, labels, key))
    assert set(got) == set(want)
    for name in ("loss", "fwd_sq", "fwd_chan_mean_sq", "fwd_chan_var", "act_grad_sq",
                 "param_grad_norm", "jac_fro_sq", "jac_spectral", "e2e_jac_fro_sq",
                 "e2e_jac_spectral"):
        np.testing.assert_allclose(got[name], want[name], rtol=1e-8, err_msg=name)


def _compiled_text(fn, *args):
    return fn.lower(*args).compile().as_text()  # The jitted program, compiled for this backend.


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's loop-body convolutions")
def test_compiled_scanned_train_step_and_diagnostics_have_only_canonical_loop_convolutions():
    """Structural, not timed: every convolution inside a `while` body of the compiled programs is
    NHWC x HWIO -> NHWC. With XLA's own convolution (the control) the same check fails."""
    mesh = parallel.make_mesh()
    x = jnp.zeros((8, 16, 16, 3))
    batch = parallel.global_batch(mesh, {"image": np.zeros((8, 16, 16, 3), np.float32),
                                         "label": np.zeros((8,), np.int32)})
    optim = dict(name="sgd", learning_rate=0.1, momentum=0.9)
    for impl in ("canonical", "xla"):
        # Depth 20: two repeated blocks per stage, a loop XLA keeps (it unrolls trip count 1).
        model = resflax.build_model(dict(family="cifar_resnet", block="v2", depth=20, width=4,
                                         shortcut="B", conv_impl=impl))
        state = training.create_train_state(model, optim, jax.random.key(0), x, mesh)
        step_text = _compiled_text(training.make_train_step(model, optim, mesh), state, batch)
        variables = model.init(jax.random.key(0), x)
        diagnostics = dg.make_diagnostics(model, dg.Options(fro_method="hutchinson"))
        diag_text = _compiled_text(diagnostics, variables, x, jnp.zeros((8,), jnp.int32),
                                   jax.random.key(1))
        bad_step = conv.noncanonical_loop_convolutions(step_text)
        assert "while(" in step_text  # The stages are scanned: there are loop bodies to check.
        bad_diag = conv.noncanonical_loop_convolutions(diag_text)
        if impl == "canonical":
            assert bad_step == [] and bad_diag == []
        else:
            assert bad_step and bad_diag, "control: XLA's own convolution leaves permuted labels"
