"""Kernel shaping (DKS, Leaky-ReLU TAT, smooth TAT): the solved transforms meet their defining
Q/C-map conditions by `resflax.theory`'s quadrature and by independent integrators
(Gauss-Hermite, closed forms, Monte Carlo, numerical differentiation); deep plain MLPs and plain
CIFAR conv nets built with them keep q ~ 1 and the predicted correlations (per pixel, for the
convs); the config fields validate."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy.polynomial.hermite_e import hermegauss
from scipy.stats import norm

import resflax
from resflax import kernel_shaping as ks
from resflax import theory
from resflax.topology import segments
from resflax.config import ModelConfig

TOL = 1e-6  # The brief's bound; theory's quadrature reaches ~1e-12.
DKS_CASES = [("tanh", 1), ("tanh", 50), ("softplus", 10), ("softplus", 50), ("erf", 7),
             ("sigmoid", 20), ("gelu", 30), ("swish", 12)]
# numpy twins of the smooth activations and their derivatives, for the Gauss-Hermite check.
NUMPY_PHI = {
    "tanh": (np.tanh, lambda x: 1.0 - np.tanh(x) ** 2),
    "softplus": (lambda x: np.logaddexp(0.0, x), lambda x: 1.0 / (1.0 + np.exp(-x))),
}
# And their second derivatives (smooth TAT's C''(1) = E[phi_hat''^2]).
NUMPY_D2PHI = {
    "tanh": lambda x: -2.0 * np.tanh(x) * (1.0 - np.tanh(x) ** 2),
    "softplus": lambda x: np.exp(-x) / (1.0 + np.exp(-x)) ** 2,
}


def hermite_rule(order=120):
    """Nodes and weights of E[f(z)], z ~ N(0, 1) (probabilists' Gauss-Hermite)."""
    z, w = hermegauss(order)
    return z, w / math.sqrt(2.0 * math.pi)


def numpy_phi_hat(transform):
    """phi_hat and phi_hat' in numpy, from the transform's parameters only."""
    phi, dphi = NUMPY_PHI[transform.activation]
    a, b = transform.input_scale, transform.input_shift
    g, d = transform.output_scale, transform.output_shift
    return (lambda x: g * (phi(a * x + b) + d)), (lambda x: g * a * dphi(a * x + b))


# ----------------------------------------------------------------------------- theory's C-map


@pytest.mark.parametrize("c", [-0.95, -0.3, 0.0, 0.4, 0.9, 0.999999, 1.0])
def test_c_map_matches_closed_forms(c):
    relu = (math.sqrt(1 - c * c) + (math.pi - math.acos(c)) * c) / (2 * math.pi)  # Cho & Saul
    assert theory.c_map("relu", c) == pytest.approx(relu, abs=1e-13)
    assert theory.c_map("relu", c, q=3.0) == pytest.approx(3 * relu, abs=1e-12)
    erf = 2 / math.pi * math.asin(2 * c / 3)  # Williams 1997, q = 1.
    assert theory.c_map("erf", c) == pytest.approx(erf, abs=1e-13)
    for a in (0.0, 0.2, 0.7):
        gain2 = 2 / (1 + a * a)
        phi = lambda x, a=a: jax.nn.leaky_relu(x, a)
        assert gain2 * theory.c_map(phi, c) == pytest.approx(ks.leaky_relu_c_map(c, a), abs=1e-13)


@pytest.mark.parametrize("c", [0.0, 0.5, 0.95])
def test_c_map_with_a_kink_off_zero_matches_a_semi_closed_form(c):
    # relu(u - k) relu(v - k): given z1, E_z2[relu(c z1 + s z2 - k)] = m Phi(m/s) + s phi(m/s),
    # m = c z1 - k; the remaining 1-D integral by the 1-D rule, graded at z1 = k.
    k, s = 0.4, math.sqrt(1 - c * c)
    phi = lambda x: jax.nn.relu(x - k)

    def inner(z1):
        m = c * np.asarray(z1) - k
        return np.maximum(np.asarray(z1) - k, 0) * (m * norm.cdf(m / s) + s * norm.pdf(m / s))

    want = theory.gaussian_expectation(inner, kink=k) if c else (
        norm.pdf(k) - k * norm.sf(k)) ** 2
    assert theory.c_map(phi, c, kink=k) == pytest.approx(want, abs=1e-12)
    assert abs(theory.c_map(phi, c) - want) > 1e-9  # Why the kink argument exists.


def test_gaussian_expectation_is_exact_for_a_kink_off_zero():
    k = -0.7  # E|z - k| = k (2 Phi(k) - 1) + 2 phi(k).
    want = k * (2 * norm.cdf(k) - 1) + 2 * norm.pdf(k)
    assert theory.gaussian_expectation(lambda x: np.abs(x - k), kink=k) == pytest.approx(
        want, abs=1e-14)
    # E|2 z - 2| = 2 E|z - 1|.
    assert theory.gaussian_expectation(lambda x: np.abs(x - 2.0), q=4.0, kink=2.0) == (
        pytest.approx(2 * (2 * norm.cdf(1.0) - 1 + 2 * norm.pdf(1.0)), abs=1e-13))


# ----------------------------------------------------------------------------- DKS


@pytest.mark.parametrize("activation,depth", DKS_CASES)
def test_dks_meets_its_conditions_by_theory(activation, depth):
    t = ks.solve_dks(activation, depth, 1.5)
    maps = ks.local_maps(t)
    assert maps.q_value == pytest.approx(1.0, abs=TOL)
    assert maps.q_slope == pytest.approx(1.0, abs=TOL)
    assert maps.c_slope == pytest.approx(1.5 ** (1 / depth), abs=TOL)
    assert maps.c_zero == pytest.approx(0.0, abs=TOL)
    # Q'(1) once more, as a central difference of theory's own Q-map.
    phi_hat, h = ks.transformed_activation(t), 1e-5
    slope = (theory.q_map(phi_hat, 1.0, 0.0, 1 + h) - theory.q_map(phi_hat, 1.0, 0.0, 1 - h)) / (
        2 * h)
    assert slope == pytest.approx(1.0, abs=1e-8)


@pytest.mark.parametrize("activation,depth", [c for c in DKS_CASES if c[0] in NUMPY_PHI])
def test_dks_meets_its_conditions_by_gauss_hermite(activation, depth):
    t = ks.solve_dks(activation, depth, 1.5)
    phi_hat, dphi_hat = numpy_phi_hat(t)
    z, w = hermite_rule()
    assert w @ phi_hat(z) ** 2 == pytest.approx(1.0, abs=TOL)  # Q(1)
    assert w @ (phi_hat(z) * dphi_hat(z) * z) == pytest.approx(1.0, abs=TOL)  # Q'(1)
    assert w @ dphi_hat(z) ** 2 == pytest.approx(1.5 ** (1 / depth), abs=TOL)  # C'(1)
    assert (w @ phi_hat(z)) ** 2 == pytest.approx(0.0, abs=TOL)  # C(0)
    # The 2-D local C-map at a few c: tensor-product Gauss-Hermite against theory.c_map.
    z1, z2 = np.meshgrid(z, z, indexing="ij")
    ww = np.outer(w, w)
    for c in (0.3, 0.8, -0.5):
        hermite = np.sum(ww * phi_hat(z1) * phi_hat(c * z1 + math.sqrt(1 - c * c) * z2))
        assert ks.local_c_map(t, c) == pytest.approx(hermite, abs=1e-9)


def test_dks_compound_slope_is_xi():
    t = ks.solve_dks("tanh", 8, 2.0)
    phi_hat = ks.transformed_activation(t)
    # theory's plain-MLP curves with orthogonal weights (sigma_w2 = 1), from q = 1: q stays 1
    # and the product of the per-layer slopes is C_f'(1) = xi.
    curves = theory.plain_mlp_curves(phi_hat, 1.0, 0.0, 8, 1.0, 1.0)
    np.testing.assert_allclose(curves["fwd_sq"], 1.0, atol=1e-10)
    assert np.prod(curves["chi"]) == pytest.approx(2.0, abs=1e-9)
    # And the compound C-map's slope at 1 by a one-sided difference.
    h = 1e-6
    assert (1 - ks.compound_c_map(t, 1 - h)) / h == pytest.approx(2.0, rel=1e-4)
    assert ks.compound_c_map(t, 0.0) == pytest.approx(0.0, abs=1e-10)


def test_dks_rejects_unreachable_targets_and_unsupported_activations():
    with pytest.raises(ValueError, match=r"^shaping_target=1.5 is not reachable by DKS"):
        ks.solve_dks("softplus", 1, 1.5)  # C'(1) <= ReLU's pi / (pi - 1) < 1.5.
    with pytest.raises(ValueError, match=r"^activation='relu' has no DKS transform"):
        ks.solve_dks("relu", 10, 1.5)
    with pytest.raises(ValueError, match="xi=1.0"):
        ks.solve_dks("tanh", 10, 1.0)


# ----------------------------------------------------------------------------- TAT


@pytest.mark.parametrize("depth,eta", [(14, 0.9), (50, 0.9), (3, 0.5), (100, 0.98)])
def test_tat_compound_c_map_hits_eta(depth, eta):
    t = ks.solve_tat(depth, eta)
    a = t.negative_slope
    assert 0.0 < a < 1.0
    assert t.output_scale == pytest.approx(math.sqrt(2 / (1 + a * a)))
    assert ks.leaky_relu_compound_c_zero(a, depth) == pytest.approx(eta, abs=1e-12)  # Closed form.
    assert ks.compound_c_map(t, 0.0) == pytest.approx(eta, abs=TOL)  # theory's quadrature.
    maps = ks.local_maps(t)  # Positively homogeneous: Q(q) = q.
    assert maps.q_value == pytest.approx(1.0, abs=TOL)
    assert maps.q_slope == pytest.approx(1.0, abs=TOL)
    assert maps.c_slope == pytest.approx(1.0, abs=TOL)
    assert maps.c_zero == pytest.approx(ks.leaky_relu_c_map(0.0, a), abs=TOL)


def test_tat_local_c_map_matches_monte_carlo():
    t = ks.solve_tat(50, 0.9)
    phi_hat = ks.transformed_activation(t)
    z = np.asarray(jax.random.normal(jax.random.key(0), (2, 1_000_000)), np.float64)
    for c in (0.0, 0.6):
        u, v = z[0], c * z[0] + math.sqrt(1 - c * c) * z[1]
        samples = np.asarray(phi_hat(u) * phi_hat(v))
        stderr = samples.std() / math.sqrt(samples.size)
        assert abs(samples.mean() - ks.local_c_map(t, c)) < 5 * stderr
        assert abs(np.mean(np.asarray(phi_hat(u)) ** 2) - 1.0) < 0.01  # Q(1) = 1.


def test_tat_rejects_unreachable_eta():
    with pytest.raises(ValueError, match=r"^shaping_target=0.9 is not reachable .* at most 0.604"):
        ks.solve_tat(3, 0.9)


# ----------------------------------------------------------------------------- TAT (smooth)

TAT_SMOOTH_CASES = [("tanh", 1, 0.3), ("tanh", 19, 0.3), ("tanh", 109, 0.3), ("softplus", 7, 0.3),
                    ("softplus", 55, 1.0), ("erf", 31, 0.3), ("gelu", 19, 0.3),
                    ("swish", 19, 0.1)]


def compound_curvature(transform, hs=(0.04, 0.02, 0.01, 0.005)):
    """C_f''(1) of the compound map composed from `theory.c_map`, by the one-sided difference
    (C_f(1) - 2 C_f(1 - h) + C_f(1 - 2h)) / h^2 (error a series in h) and Richardson's table."""
    f = functools.partial(ks.compound_c_map, transform)
    table = [(f(1.0) - 2 * f(1 - h) + f(1 - 2 * h)) / h**2 for h in hs]
    for k in range(1, len(hs)):  # Halving h: eliminate the h^k term.
        table = [(2**k * fine - coarse) / (2**k - 1) for coarse, fine in zip(table, table[1:])]
    return table[0]


@pytest.mark.parametrize("activation,depth,tau", TAT_SMOOTH_CASES)
def test_smooth_tat_meets_its_conditions_by_theory(activation, depth, tau):
    t = ks.solve_tat_smooth(activation, depth, tau)
    assert t.method == "tat" and t.negative_slope is None and t.depth == depth
    maps = ks.local_maps(t)
    assert maps.q_value == pytest.approx(1.0, abs=TOL)  # Q(1) = 1
    assert maps.q_slope == pytest.approx(1.0, abs=TOL)  # Q'(1) = 1
    assert maps.c_slope == pytest.approx(1.0, abs=TOL)  # C'(1) = 1
    assert maps.c_curvature == pytest.approx(tau / depth, abs=TOL)  # C''(1) = tau / L
    assert t.input_scale * t.output_scale < 2.0  # The reference's rejection rule.


@pytest.mark.parametrize("activation,depth,tau", [c for c in TAT_SMOOTH_CASES
                                                  if c[0] in NUMPY_PHI])
def test_smooth_tat_meets_its_conditions_by_gauss_hermite(activation, depth, tau):
    t = ks.solve_tat_smooth(activation, depth, tau)
    phi_hat, dphi_hat = numpy_phi_hat(t)
    a, b, g = t.input_scale, t.input_shift, t.output_scale
    d2phi_hat = lambda x: g * a * a * NUMPY_D2PHI[activation](a * x + b)
    z, w = hermite_rule()
    assert w @ phi_hat(z) ** 2 == pytest.approx(1.0, abs=TOL)  # Q(1)
    assert w @ (phi_hat(z) * dphi_hat(z) * z) == pytest.approx(1.0, abs=TOL)  # Q'(1)
    assert w @ dphi_hat(z) ** 2 == pytest.approx(1.0, abs=TOL)  # C'(1)
    # The compound curvature by the chain rule: with C(1) = C'(1) = 1 the layers' add up.
    assert depth * (w @ d2phi_hat(z) ** 2) == pytest.approx(tau, abs=TOL)


@pytest.mark.parametrize("activation,depth,tau", [("tanh", 10, 0.3), ("softplus", 5, 0.3),
                                                  ("gelu", 3, 1.0)])
def test_smooth_tat_compound_c_map_has_curvature_tau(activation, depth, tau):
    t = ks.solve_tat_smooth(activation, depth, tau)
    assert ks.compound_c_map(t, 1.0) == pytest.approx(1.0, abs=1e-12)
    h = 1e-4  # C_f'(1) = 1: the compound map is tangent to the identity at c = 1.
    assert (1 - ks.compound_c_map(t, 1 - h)) / h == pytest.approx(1.0, abs=tau * h)
    assert compound_curvature(t) == pytest.approx(tau, abs=TOL)


def test_smooth_tat_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"^activation='sigmoid' has no smooth TAT"):
        ks.solve_tat_smooth("sigmoid", 10)
    with pytest.raises(ValueError, match="tau=0.0"):
        ks.solve_tat_smooth("tanh", 10, 0.0)


# ----------------------------------------------------------------------------- deep MLPs

WIDTH, DEPTH, SEEDS = 64, 50, 16
CORRELATIONS = (0.0, 0.5, 0.9)


def _measure(config):
    """Per net (SEEDS orthogonal inits): q_l of every input [SEEDS, L+1, 2k] and the output
    correlation of each input pair [SEEDS, k]; pairs with input correlations CORRELATIONS,
    every input of q = ||u||^2 / n = 1 (the square orthogonal stem keeps it: q_0 = 1)."""
    a, b = np.asarray(jax.random.normal(jax.random.key(7), (2, WIDTH)), np.float64)
    b -= (a @ b) / (a @ a) * a
    a, b = a / np.linalg.norm(a), b / np.linalg.norm(b)
    pairs = [(a, c * a + math.sqrt(1 - c * c) * b) for c in CORRELATIONS]
    u = jnp.asarray(math.sqrt(WIDTH) * np.array([x for pair in pairs for x in pair]), jnp.float32)
    model = resflax.build_model(config)

    def one(key):
        _, signals = model.apply(model.init(key, u), u)
        x = jnp.concatenate(signals)  # [L+1, 2k, n]
        q = jnp.mean(x * x, -1)
        first, second = x[-1, 0::2], x[-1, 1::2]
        corr = jnp.sum(first * second, -1) / jnp.sqrt(
            jnp.sum(first**2, -1) * jnp.sum(second**2, -1))
        return q, corr

    q, corr = jax.jit(jax.vmap(one))(jax.random.split(jax.random.key(0), SEEDS))
    return np.asarray(q), np.asarray(corr)


SHAPINGS = [dict(activation="tanh", activation_transform="dks"),
            dict(activation="leaky_relu", activation_transform="tat"),
            dict(activation="tanh", activation_transform="tat")]


@pytest.mark.parametrize("fields", SHAPINGS)
def test_deep_plain_mlp_keeps_q_and_the_predicted_correlations(fields):
    config = ModelConfig(depth=DEPTH, width=WIDTH, init="orthogonal", num_classes=1, **fields)
    transform = ks.for_config(config)
    assert transform.depth == DEPTH
    q, corr = _measure(config)
    # q: 1 at every layer in expectation over nets (exactly so for TAT's homogeneous phi_hat
    # under orthogonal weights; DKS up to a finite-width drift O(L / n)). Per net q_l wanders
    # (log-normally, by ~sqrt(L / n)), so the bound is the sampling error of the mean over nets.
    np.testing.assert_allclose(q[:, 0], 1.0, atol=1e-5)
    per_net = q.mean(axis=2)  # [SEEDS, L+1]
    mean, stderr = per_net.mean(0), per_net.std(0) / math.sqrt(SEEDS)
    assert np.all(np.abs(mean - 1.0) < 4 * stderr + 0.05), (mean, stderr)
    assert 0.5 < np.median(per_net[:, -1]) < 2.0  # Neither collapsing nor exploding.
    for k, c0 in enumerate(CORRELATIONS):
        predicted = ks.compound_c_map(transform, c0)
        stderr = corr[:, k].std() / math.sqrt(SEEDS)
        # Sampling error of the mean over nets, plus a finite-width allowance.
        assert abs(corr[:, k].mean() - predicted) < 4 * stderr + 0.03, (c0, corr[:, k], predicted)


def test_without_the_transform_the_deep_plain_mlp_forgets_its_input():
    config = ModelConfig(depth=DEPTH, width=WIDTH, init="orthogonal", num_classes=1,
                         activation="leaky_relu", weight_scale=math.sqrt(2 / (1 + 0.01**2)))
    _, corr = _measure(config)
    assert corr[:, 0].mean() > 0.97  # Orthogonal inputs come out (nearly) parallel.


def test_predict_uses_the_transformed_activation():
    config = ModelConfig(depth=6, width=8, init="orthogonal", activation="tanh",
                         activation_transform="dks", shaping_target=1.8)
    got = theory.predict(config, 1.0, 1.0)
    np.testing.assert_allclose(got["fwd_sq"], 1.0, atol=1e-10)
    assert got["e2e_jac_fro_sq"] == pytest.approx(1.8, abs=1e-9)
    plain = theory.predict(config.replace(activation_transform="none"), 1.0, 1.0)
    assert plain["fwd_sq"][-1] < 0.5  # tanh at sigma_w = 1 decays towards q* = 0.


def test_transformed_activation_keeps_the_dtype():
    phi_hat = ks.transformed_activation(ks.solve_dks("tanh", 10))
    assert phi_hat(jnp.ones((3,), jnp.bfloat16)).dtype == jnp.bfloat16
    config = ModelConfig(depth=2, width=4, init="orthogonal", activation="tanh",
                         activation_transform="dks", dtype="bfloat16", param_dtype="bfloat16")
    model = resflax.build_model(config)
    x = jnp.ones((2, 3), jnp.bfloat16)
    logits, _ = model.apply(model.init(jax.random.key(0), x), x)
    assert logits.dtype == jnp.bfloat16


# ----------------------------------------------------------------------------- plain conv nets

CONV = dict(family="cifar_resnet", block="plain", norm="none", init="scaled_delta_orthogonal",
            num_classes=1)


def _pixel_pairs(key, c_in, correlations, size=8):
    """Images `[2k, size, size, c_in]`: pair j (images 2j, 2j+1) has, at every pixel, channel
    vectors of squared norm c_in (q = 1) and correlation `correlations[j]`, independent across
    pixels."""
    a, b = np.asarray(jax.random.normal(key, (2, size, size, c_in)), np.float64)
    a /= np.linalg.norm(a, axis=-1, keepdims=True)
    b -= np.sum(a * b, -1, keepdims=True) * a
    b /= np.linalg.norm(b, axis=-1, keepdims=True)
    images = [x for c in correlations for x in (a, c * a + math.sqrt(1 - c * c) * b)]
    return jnp.asarray(math.sqrt(c_in) * np.stack(images), jnp.float32)


def _layer_outputs(config, variables, x):
    """x_0 .. x_L of the net at `variables`, one array `[B, H_l, W_l, C_l]` each."""
    _, signals = resflax.build_model(config).apply(variables, x)
    return [layer for seg in signals for layer in seg]


def test_the_scaled_delta_orthogonal_conv_net_keeps_every_pixels_kernel_exactly():
    # A linear plain net (identity activation): every conv, the stem's 3 -> 8 and the stride-2
    # 8 -> 16 -> 32 widenings included, maps each (subsampled) pixel's channel vector by a
    # rescaled isometry, so the per-pixel Gram matrix over channels / C is the input's, border
    # pixels too ('SAME' padding meets only the zero off-centre taps).
    config = ModelConfig(**dict(CONV, depth=14, width=8, activation="identity"))
    x = jax.random.normal(jax.random.key(3), (3, 8, 8, 3))
    model = resflax.build_model(config)
    outputs = _layer_outputs(config, model.init(jax.random.key(0), x), x)
    assert len(outputs) == config.num_blocks + 1
    for h in outputs:
        stride = x.shape[1] // h.shape[1]
        sub = x[:, ::stride, ::stride, :]
        gram = jnp.einsum("bhwc,dhwc->hwbd", h, h) / h.shape[-1]
        want = jnp.einsum("bhwc,dhwc->hwbd", sub, sub) / x.shape[-1]
        np.testing.assert_allclose(gram, want, rtol=1e-5, atol=1e-5)
    # Plain delta-orthogonal keeps each pixel's norm, not q: the stem divides q by 8 / 3 and
    # each stage's widening halves it.
    plain = config.replace(init="delta_orthogonal")
    h = _layer_outputs(plain, resflax.build_model(plain).init(jax.random.key(0), x), x)[-1]
    ratio = jnp.mean(h * h) / jnp.mean(x[:, ::4, ::4, :] ** 2)
    assert float(ratio) == pytest.approx(3 / 8 / 4, rel=1e-4)


CONV_WIDTH, CONV_DEPTH, CONV_SEEDS = 32, 32, 12


@pytest.mark.parametrize("fields", SHAPINGS)
def test_deep_plain_conv_net_keeps_q_and_the_predicted_per_pixel_correlations(fields):
    # A plain CIFAR net of L = 31 shaped layers, widths 32 / 64 / 128 at 8x8 / 4x4 / 2x2, on
    # 32-channel inputs (a square stem): each pixel is a sample of the per-pixel kernel map.
    config = ModelConfig(**dict(CONV, depth=CONV_DEPTH, width=CONV_WIDTH), **fields)
    transform = ks.for_config(config)
    assert transform.depth == ks.nonlinear_depth(config) == CONV_DEPTH - 1
    x = _pixel_pairs(jax.random.key(7), CONV_WIDTH, CORRELATIONS)
    model = resflax.build_model(config)

    def one(key):
        outputs = _layer_outputs(config, model.init(key, x), x)
        q = jnp.stack([jnp.mean(h * h) for h in outputs])  # Mean per-pixel q, per layer.
        last = outputs[-1]
        first, second = last[0::2], last[1::2]
        corr = jnp.sum(first * second, -1) / jnp.sqrt(
            jnp.sum(first**2, -1) * jnp.sum(second**2, -1))
        return q, jnp.mean(corr, (1, 2))  # [L+1], [k]: averaged over the pixels.

    # A loop over the nets, not a vmap: batched QRs of these rectangular kernels (the
    # initializer's) hang XLA:CPU's LAPACK thread pool on the 2-core machine.
    one = jax.jit(one)
    runs = [one(key) for key in jax.random.split(jax.random.key(0), CONV_SEEDS)]
    q, corr = (np.stack([np.asarray(run[i]) for run in runs]) for i in (0, 1))
    np.testing.assert_allclose(q[:, 0], 1.0, atol=0.05)  # The square stem + phi_hat: Q(1) = 1.
    # E[q_l] = 1 at every layer, but per net q_l wanders log-normally (heavy upper tail: most
    # nets a little below 1, a few above; most for TAT's kinked Leaky ReLU), so the mean over
    # nets is judged with a 0.1 allowance beyond its sampling error, and the median must neither
    # collapse nor explode.
    mean, stderr = q.mean(0), q.std(0) / math.sqrt(CONV_SEEDS)
    assert np.all(np.abs(mean - 1.0) < 4 * stderr + 0.1), (mean, stderr)
    assert np.all((0.25 < np.median(q, 0)) & (np.median(q, 0) < 4.0)), np.median(q, 0)
    for k, c0 in enumerate(CORRELATIONS):
        predicted = ks.compound_c_map(transform, c0)
        stderr = corr[:, k].std() / math.sqrt(CONV_SEEDS)
        assert abs(corr[:, k].mean() - predicted) < 4 * stderr + 0.03, (c0, corr[:, k], predicted)


@pytest.mark.parametrize("depth", [8, 20, 56])
def test_nonlinear_depth_of_a_plain_conv_net_counts_every_activation_call(depth, monkeypatch):
    config = ModelConfig(**dict(CONV, depth=depth, width=4, activation="tanh",
                                activation_transform="tat", scan=False))
    calls = []
    phi_hat = ks.activation_for(config)

    def counted(cfg):
        return lambda h: calls.append(1) or phi_hat(h)

    monkeypatch.setattr(ks, "activation_for", counted)  # What `stems.layer_kit` calls.
    x = jnp.zeros((1, 8, 8, 3))
    variables = jax.eval_shape(resflax.build_model(config).init, jax.random.key(0), x)
    kernels = [leaf.ndim for leaf in jax.tree.leaves(variables["params"])
               if leaf.ndim >= 2]
    # He et al.'s plain nets: depth - 1 convs (plain-20: 19) and one fc, every conv followed by
    # the activation (the stem's too), the fc by none.
    assert kernels.count(4) == len(calls) == depth - 1 == ks.nonlinear_depth(config)
    assert kernels.count(2) == 1
    assert len(segments(config)) == config.num_blocks == (depth - 2) // 2


# ----------------------------------------------------------------------------- config


DKS = dict(family="mlp", depth=10, width=8, init="orthogonal", activation="tanh",
           activation_transform="dks")
TAT = dict(DKS, activation="leaky_relu", activation_transform="tat", depth=20)
TAT_SMOOTH = dict(TAT, activation="tanh")
CONV_DKS = dict(DKS, family="cifar_resnet", block="plain", norm="none", depth=8,
                init="scaled_delta_orthogonal")
CONV_TAT = dict(CONV_DKS, activation="leaky_relu", activation_transform="tat", depth=32)


def test_config_resolves_the_targets_and_depth():
    assert ModelConfig(**DKS).shaping_target == 1.5
    assert ModelConfig(**TAT).shaping_target == 0.9
    assert ModelConfig().activation_transform == "none" and ModelConfig().shaping_target is None
    two = ModelConfig(**dict(DKS, layers_per_block=2))
    assert ks.nonlinear_depth(two) == 20 and ks.for_config(two).depth == 20
    # A changed transform takes its own default target.
    assert ModelConfig(**DKS).replace(activation_transform="tat", activation="leaky_relu",
                                      depth=20).shaping_target == 0.9
    assert ModelConfig(**DKS).replace(activation_transform="none").shaping_target is None
    # Smooth TAT's target is tau, default 0.3; switching TAT's activation between Leaky ReLU
    # (eta) and a smooth one (tau) changes its meaning, so it takes the new default.
    smooth = ModelConfig(**TAT_SMOOTH)
    assert smooth.shaping_target == 0.3 and ks.for_config(smooth).negative_slope is None
    assert ModelConfig(**TAT).replace(activation="tanh").shaping_target == 0.3
    assert smooth.replace(activation="leaky_relu").shaping_target == 0.9
    assert smooth.replace(activation="softplus").shaping_target == 0.3
    assert smooth.replace(shaping_target=0.5).shaping_target == 0.5
    for conv in (CONV_DKS, CONV_TAT):  # Plain CIFAR nets: L = depth - 1.
        config = ModelConfig(**conv)
        assert config.layers_per_block is None
        assert ks.for_config(config).depth == conv["depth"] - 1
    assert ModelConfig.from_json(ModelConfig(**TAT).to_json()) == ModelConfig(**TAT)
    assert ks.activation_for(ModelConfig()) is resflax.layers.activation("relu")


@pytest.mark.parametrize("base,overrides,message", [
    (DKS, dict(activation_transform="DKS"), r"^activation_transform='DKS' is not supported"),
    (DKS, dict(init="he_normal"), r"^init='he_normal' is not supported with activation_transf"),
    (DKS, dict(weight_scale=2.0), r"^weight_scale=2.0 is not supported"),
    (DKS, dict(bias_scale=0.1), r"^bias_scale=0.1 is not supported"),
    (DKS, dict(norm="layer"), r"^norm='layer' is not supported"),
    (DKS, dict(block="v2"), r"^block='v2' is not supported"),
    (DKS, dict(family="imagenet_resnet", depth=18, layers_per_block=None),
     r"^family='imagenet_resnet' is not supported .* allowed values: \['mlp', 'cifar_resnet'\]"),
    (DKS, dict(init="he_normal"), r"^init='he_normal' .*allowed values: \['orthogonal', "
     r"'delta_orthogonal', 'scaled_delta_orthogonal'\]"),
    (CONV_DKS, dict(init="delta_orthogonal"), r"^init='delta_orthogonal' is not supported .*"
     r"sqrt\(C_out / C_in\).*allowed values: \['scaled_delta_orthogonal'\]"),
    (CONV_DKS, dict(init="orthogonal"), r"^init='orthogonal' is not supported"),
    (CONV_DKS, dict(block="v1"), r"^block='v1' is not supported .*allowed values: \['plain'\]"),
    (CONV_TAT, dict(block="v2"), r"^block='v2' is not supported"),
    (CONV_DKS, dict(norm="batch"), r"^norm='batch' is not supported .*allowed values: \['none'\]"),
    (CONV_TAT, dict(bottleneck=True, depth=20), r"^bottleneck=True is not supported"),
    (CONV_TAT, dict(weight_scale=1.1), r"^weight_scale=1.1 is not supported"),
    (CONV_TAT, dict(bias_scale=0.1), r"^bias_scale=0.1 is not supported"),
    (TAT_SMOOTH, dict(shaping_target=0.0), r"^shaping_target=0.0 must be a number > 0 .*tau"),
    (TAT_SMOOTH, dict(activation="sigmoid"), r"^activation='sigmoid' is not supported"),
    (DKS, dict(activation="relu"), r"^activation='relu' is not supported .*'tanh'\]"),
    (DKS, dict(shaping_target=0.9), r"^shaping_target=0.9 must be a number > 1"),
    (DKS, dict(shaping_target="1.5"), r"^shaping_target='1.5' must be a finite number"),
    (DKS, dict(activation="softplus", depth=1), r"^shaping_target=1.5 is not reachable by DKS"),
    (TAT, dict(activation="relu"), r"^activation='relu' is not supported .*\['leaky_relu', "
     r"'erf', 'gelu', 'softplus', 'swish', 'tanh'\]"),
    (TAT, dict(shaping_target=1.5), r"^shaping_target=1.5 must be in \(0, 1\)"),
    (TAT, dict(depth=5), r"^shaping_target=0.9 is not reachable by Leaky-ReLU TAT at depth L=5"),
    (dict(family="mlp"), dict(shaping_target=0.5), r"^shaping_target=0.5 applies only with"),
])
def test_config_errors_name_the_field(base, overrides, message):
    fields = dict(base, **overrides)
    with pytest.raises(ValueError, match=message):
        ModelConfig(**fields)
    with pytest.raises(ValueError, match=r"^config.model: " + message.lstrip("^")):
        resflax.config.from_config_dict(fields)
