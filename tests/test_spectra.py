"""End-to-end singular-value spectra by stochastic Lanczos quadrature (`e2e_spectrum`), against
dense float64 Jacobians + SVD, closed forms of delta-orthogonal conv nets, the spectral norm,
and the scanned/unrolled twins; and the density figure."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import resflax
from resflax import diagnostics as dg
from resflax.models import unroll_variables
from experiments import plots

F64 = dict(dtype="float64", param_dtype="float64")


def setup(fields, shape, seed=0):
    model = resflax.build_model(fields)
    x = jax.random.normal(jax.random.key(seed), shape, model.config.dtype)
    variables = model.init(jax.random.key(seed + 1), x)
    return model, variables, x


def diagnose(model, variables, x, **options):
    labels = jnp.arange(x.shape[0]) % model.config.num_classes
    fn = dg.make_diagnostics(model, dg.Options(e2e_spectrum=True, **options))
    return dg.to_python(fn(variables, x, labels, jax.random.key(3)))


def body_and_x0(model, variables, x):
    """The frozen-statistics body map x_0 -> x_L (as the diagnostics use it) and x_0."""
    (_, signals), _ = model.apply(variables, x, train=True, mutable=["batch_stats"])
    frozen = model.clone(freeze_norm_stats=True)

    def body(z):
        return frozen.apply(variables, z, True, method="body", mutable=["batch_stats"])[0][0]

    return body, signals[0][0]


def dense_per_example(f, x):
    """[B, d_out, d_in] by jax.jacfwd of the batch map (independent of the diagnostics)."""
    full = np.asarray(jax.jacfwd(f)(x))
    b = x.shape[0]
    full = full.reshape(b, -1, b, x[0].size)
    return np.stack([full[i, :, i, :] for i in range(b)])


NETS = {
    "mlp_tanh": (dict(family="mlp", depth=3, width=6, activation="tanh", bias_scale=0.2), (3, 6)),
    # x_0: 4x4x2 = 32, x_L: 1x1x8 = 8: Lanczos on J J^T.
    "cnn_v1_bn": (dict(family="cifar_resnet", depth=8, width=2, activation="elu", block="v1",
                       shortcut="B"), (3, 4, 4, 2)),
}


@pytest.mark.parametrize("net", NETS)
def test_full_dimension_slq_gives_every_singular_value_and_exact_moments(net):
    fields, shape = NETS[net]
    with jax.enable_x64(True):
        model, variables, x = setup(dict(fields, **F64), shape)
        out = diagnose(model, variables, x, slq_steps=64, end_to_end=True, jacobians=False)
        body, x0 = body_and_x0(model, variables, x)
        jac = dense_per_example(body, x0)
        want = np.linalg.svd(jac, compute_uv=False)  # [B, min(d_out, d_in)]
        nodes, weights = np.asarray(out["e2e_slq_nodes"]), np.asarray(out["e2e_slq_weights"])
        assert nodes.shape == want.shape == weights.shape
        np.testing.assert_allclose(nodes, want, rtol=1e-9, atol=1e-12 * want.max())
        np.testing.assert_allclose(weights.sum(1), 1.0, rtol=1e-12)
        np.testing.assert_allclose(out["e2e_slq_sigma_max"], want[:, 0], rtol=1e-9)
        np.testing.assert_allclose(out["e2e_slq_sigma_min"], want[:, -1], rtol=1e-9,
                                   atol=1e-12 * want.max())

        # m < n steps on J^T J from a start vector v of our own: Gauss quadrature is exact,
        # sum_i tau_i^2 theta_i^k = v^T (J^T J)^k v for k <= 2m - 1.
        m = 3
        jvp_fn, vjp_fn = dg._linear_maps(body, x0)
        v = np.random.default_rng(0).standard_normal(x0.shape)
        v /= np.linalg.norm(v.reshape(v.shape[0], -1), axis=1).reshape((-1,) + (1,) * (v.ndim - 1))
        s, tau2 = map(np.asarray, dg._slq(jvp_fn, vjp_fn, jnp.asarray(v), jax.random.key(0), m))
        gram = np.einsum("boi,boj->bij", jac, jac)
        vf = v.reshape(v.shape[0], -1)
        for k in range(2 * m):
            exact = np.einsum("bi,bi->b", vf, np.einsum(
                "bij,bj->bi", np.linalg.matrix_power(gram, k), vf))
            np.testing.assert_allclose(np.sum(tau2 * s ** (2 * k), 1), exact, rtol=1e-9,
                                       err_msg=f"moment {k}")

        # Few steps through the diagnostics (Rademacher v / sqrt(n) on the smaller Gram G): the
        # first moment ||J v||^2 is Hutchinson's estimate of tr(G) / n; Var = 2 sum_{i!=j}
        # G_ij^2 / n^2 exactly.
        few = diagnose(model, variables, x, slq_steps=2, jacobians=False)
        grams = gram if jac.shape[1] >= jac.shape[2] else np.einsum("bik,bjk->bij", jac, jac)
        n = grams.shape[-1]
        first = np.sum(np.asarray(few["e2e_slq_weights"]) * np.asarray(few["e2e_slq_nodes"]) ** 2, 1)
        off = grams - np.einsum("bii->bi", grams)[:, :, None] * np.eye(n)
        std = np.sqrt(2 * np.sum(off**2, (1, 2))) / n
        err = np.abs(first - np.einsum("bii->b", grams) / n)
        assert np.all(err <= 4 * std + 1e-12), (err, std)


def test_delta_orthogonal_conv_block_spectrum_is_the_union_over_pixels():
    """With only the centre tap nonzero, a plain block is a 1x1 conv per pixel p: its Jacobian
    is block-diagonal over pixels with blocks diag(phi'(h2_p)) W2^T diag(phi'(h1_p)) W1^T
    (W = the centre taps, h = the pre-activations): its singular values are the union over p."""
    fields = dict(family="cifar_resnet", block="plain", depth=8, width=3, norm="none",
                  init="delta_orthogonal", weight_scale=1.3, bias_scale=0.3,
                  activation="tanh", scan=False, **F64)
    with jax.enable_x64(True):
        model, variables, x = setup(fields, (2, 4, 4, 3))
        (_, signals), _ = model.apply(variables, x, train=True, mutable=["batch_stats"])
        seg = model.segments()[0]
        block_vars = dg._block_variables(variables, seg.path)
        x0 = signals[0][0]
        f = lambda z: dg._apply_block(seg.block, block_vars, z, True)
        got = dg.jacobian_spectrum(f, x0, jax.random.key(0), steps=48)
        p = block_vars["params"]
        w1, b1 = np.asarray(p["w_0"]["kernel"]), np.asarray(p["w_0"]["bias"])
        w2, b2 = np.asarray(p["w_1"]["kernel"]), np.asarray(p["w_1"]["bias"])
        assert np.all(w1[[0, 0, 2, 2], [0, 2, 0, 2]] == 0)  # Only the centre tap.
        w1, w2 = w1[1, 1], w2[1, 1]
        dtanh = lambda h: 1 - np.tanh(h) ** 2
        want = []
        for xi in np.asarray(x0, np.float64).reshape(2, -1, 3):  # [pixels, C] per example
            per_pixel = []
            for xp in xi:
                h1 = xp @ w1 + b1
                h2 = np.tanh(h1) @ w2 + b2
                jp = np.diag(dtanh(h2)) @ w2.T @ np.diag(dtanh(h1)) @ w1.T
                per_pixel.append(np.linalg.svd(jp, compute_uv=False))
            want.append(np.sort(np.concatenate(per_pixel))[::-1])
        np.testing.assert_allclose(got["nodes"], np.array(want), rtol=1e-9)


@pytest.mark.parametrize("gain", [0.9, 1.2])
def test_linear_delta_orthogonal_conv_net_has_every_singular_value_equal_to_gain_power(gain):
    """Linear delta-orthogonal convs are isometries times the gain. A stride-1 block: every
    singular value is gain^2. The whole body (6 convs, two of them stride 2 and widening
    semi-orthogonally): J J^T on x_L (2x2x8 = 32) has the 8 = 2x2 pixels x 2 input channels of
    the range at gain^6, the other 24 at 0, and full-dimension SLQ finds exactly that."""
    fields = dict(family="cifar_resnet", block="plain", depth=8, width=2, norm="none",
                  init="delta_orthogonal", weight_scale=gain, activation="identity", **F64)
    with jax.enable_x64(True):
        model, variables, x = setup(fields, (2, 8, 8, 3))
        (_, signals), _ = model.apply(variables, x, train=True, mutable=["batch_stats"])
        seg = model.segments()[0]
        block_vars = dg._block_variables(variables, seg.path)
        if seg.stacked:
            block_vars = jax.tree.map(lambda a: a[0], block_vars)
        f = lambda z: dg._apply_block(seg.block, block_vars, z, True)
        block = dg.jacobian_spectrum(f, signals[0][0], jax.random.key(0), steps=16)
        np.testing.assert_allclose(block["nodes"], gain**2, rtol=1e-12)
        np.testing.assert_allclose(np.sum(block["weights"], 1), 1.0, rtol=1e-12)
        out = diagnose(model, variables, x, slq_steps=32, jacobians=False)
    nodes = np.asarray(out["e2e_slq_nodes"])
    want = np.concatenate([np.full(8, gain**6), np.zeros(24)])
    np.testing.assert_allclose(nodes, np.broadcast_to(want, nodes.shape), rtol=1e-10,
                               atol=1e-10 * gain**6)
    np.testing.assert_allclose(out["e2e_slq_sigma_max"], gain**6, rtol=1e-10)
    np.testing.assert_allclose(out["e2e_jac_spectral"], gain**6, rtol=1e-10)


def test_extreme_singular_values_bracket_and_agree_with_the_spectral_norm():
    """float32, 24 steps on a 64-dim Gram: Ritz values lie inside [sigma_min, sigma_max] and the
    largest has converged to sigma_max, as `e2e_jac_spectral` has."""
    fields = dict(family="cifar_resnet", depth=8, width=4, block="v1")
    model, variables, x = setup(fields, (3, 8, 8, 3))
    out = diagnose(model, variables, x, slq_steps=24, jacobians=False, power_iterations=200,
                   power_tol=1e-7, singular_values_max_dim=256)
    dense = np.asarray(out["e2e_singular_values"], np.float64)  # [B, 64], tested elsewhere
    nodes = np.asarray(out["e2e_slq_nodes"], np.float64)
    assert nodes.shape == (3, 24)
    top, bottom = dense[:, :1], dense[:, -1:]
    assert np.all(nodes <= top * (1 + 1e-5)) and np.all(nodes >= bottom * (1 - 1e-5) - 1e-6 * top)
    np.testing.assert_allclose(out["e2e_slq_sigma_max"], dense[:, 0], rtol=1e-4)
    np.testing.assert_allclose(np.mean(out["e2e_slq_sigma_max"]), out["e2e_jac_spectral"],
                               rtol=1e-4)
    assert np.all(np.asarray(out["e2e_slq_sigma_min"]) >= dense[:, -1] * (1 - 1e-5))
    np.testing.assert_allclose(np.sum(out["e2e_slq_weights"], 1), 1.0, rtol=1e-5)


def test_scanned_and_unrolled_nets_give_the_same_spectra():
    fields = dict(family="cifar_resnet", depth=14, width=2, block="v2", **F64)
    with jax.enable_x64(True):
        scanned, variables, x = setup(dict(fields, scan=True), (2, 4, 4, 3))
        assert any(seg.stacked for seg in scanned.segments())
        unrolled = resflax.build_model(dict(fields, scan=False))
        a = diagnose(scanned, variables, x, slq_steps=8, jacobians=False)
        b = diagnose(unrolled, unroll_variables(variables), x, slq_steps=8, jacobians=False)
    for key in ("e2e_slq_nodes", "e2e_slq_weights", "e2e_slq_sigma_min"):
        np.testing.assert_allclose(a[key], b[key], rtol=1e-9, atol=1e-12, err_msg=key)


def test_identity_jacobian_breaks_down_cleanly():
    # J = I: the Krylov space is 1-dim; restarts keep every Ritz value at 1 (no spurious zeros).
    fields = dict(family="mlp", block="v2", depth=3, width=8, zero_init_residual=True)
    model, variables, x = setup(fields, (2, 8))
    out = diagnose(model, variables, x, slq_steps=8, jacobians=False)
    np.testing.assert_allclose(out["e2e_slq_nodes"], 1.0, rtol=1e-6)
    np.testing.assert_allclose(np.sum(out["e2e_slq_weights"], 1), 1.0, rtol=1e-6)


def test_spectrum_is_off_by_default_and_steps_are_validated():
    model, variables, x = setup(dict(family="mlp", depth=2, width=4), (2, 4))
    labels = jnp.zeros(2, jnp.int32)
    out = dg.make_diagnostics(model)(variables, x, labels, jax.random.key(0))
    assert not any(k.startswith("e2e_slq") for k in out)
    with pytest.raises(ValueError):
        dg.Options(slq_steps=0)


def test_density_figure_is_written(tmp_path):
    rng = np.random.default_rng(0)
    nodes = [np.exp(rng.standard_normal((4, 8))), np.concatenate(
        [np.full((4, 6), 1.2**3), np.zeros((4, 2))], 1)]
    weights = [np.full((4, 8), 1 / 8)] * 2
    path = os.path.join(tmp_path, "spectrum.png")
    plots.singular_value_density(path, nodes, weights, ["tanh, gaussian", "linear, orthogonal"],
                                 theory_mean_sq=[np.e**2, None], theory_values=[None, 1.2**3])
    assert os.path.getsize(path) > 1000
