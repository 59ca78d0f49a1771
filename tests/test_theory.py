"""Mean-field theory against closed forms, an independent integrator and wide random networks."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.integrate import simpson

import resflax
from resflax import theory
from resflax.layers import ACTIVATIONS

QS = [1e-4, 0.3, 1.0, 7.0, 1e4]


# --------------------------------------------------------------------------------------------
# Gaussian expectations: closed forms.


@pytest.mark.parametrize("q", QS)
def test_relu_second_moment_is_half_q_and_derivative_moment_is_half(q):
    m = theory.moments("relu", q)
    assert m.phi_sq == pytest.approx(q / 2, rel=1e-13)
    assert m.dphi_sq == pytest.approx(0.5, rel=1e-13)
    assert m.phi == pytest.approx(math.sqrt(q / (2 * math.pi)), rel=1e-12)  # E relu = sqrt(q/2pi)


def test_relu_at_q_zero_is_the_limit_from_above():
    assert theory.moments("relu", 0.0).dphi_sq == pytest.approx(0.5, rel=1e-13)
    assert theory.moments("relu", 0.0).phi_sq == 0.0


@pytest.mark.parametrize("q", QS)
def test_erf_moments_closed_form(q):
    # E[erf(sqrt(q) z)^2] = (2/pi) arcsin(2q / (1 + 2q)); erf' = (2/sqrt(pi)) exp(-x^2),
    # E[erf'(sqrt(q) z)^2] = (4/pi) / sqrt(1 + 4q).
    m = theory.moments("erf", q)
    assert m.phi_sq == pytest.approx(2 / math.pi * math.asin(2 * q / (1 + 2 * q)), rel=1e-12)
    assert m.dphi_sq == pytest.approx(4 / math.pi / math.sqrt(1 + 4 * q), rel=1e-12)
    assert abs(m.phi) < 1e-14  # Odd activation.


def test_gaussian_expectation_is_exact_for_polynomials_and_kinks_at_zero():
    assert theory.gaussian_expectation(lambda x: x**4, q=3.0) == pytest.approx(27.0, rel=1e-13)
    assert theory.gaussian_expectation(np.abs, q=4.0) == pytest.approx(
        2 * math.sqrt(2 / math.pi), rel=1e-13
    )


def _reference_moments(phi, qs, num=20_001, z_max=14.0):
    """[len(qs), 3]: E[phi], E[phi^2], E[phi'^2] at each q, by composite Simpson, float64.

    Independent of the Gauss rule under test: each half-line separately, t = 0 evaluated as
    the one-sided limit 0+.
    """
    t = np.linspace(0.0, z_max, num)
    t[0] = 1e-300
    density = np.exp(-t * t / 2) / math.sqrt(2 * math.pi)
    u = np.concatenate([sign * math.sqrt(q) * t for q in qs for sign in (1, -1)])
    with jax.enable_x64(True):
        values, slopes = phi(u), jax.vmap(jax.grad(phi))(u)
        stacked = np.asarray(jnp.stack([values, values**2, slopes**2]))
    both = stacked.reshape(3, len(qs), 2, num).sum(2)  # f(t) + f(-t)
    return simpson(density * both, x=t).T


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_every_registry_activation_matches_an_independent_integrator(name):
    qs = (0.3, 30.0)
    got = [theory.moments(name, q) for q in qs]
    want = _reference_moments(ACTIVATIONS[name], qs)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-13)
    fixed = theory.q_fixed_point(name, 1.0, 0.1)
    curves = theory.plain_mlp_curves(name, 1.0, 0.1, 4, 1.0, 1.0)
    assert all(np.isfinite(v).all() for v in curves.values())
    if name != "identity":  # Identity at sigma_w2 = 1 has no finite fixed point with a bias.
        assert fixed.converged and fixed.q > 0


def test_saturating_activations_stay_accurate_at_large_q():
    # The transition of erf(sqrt(q) z) has width 1/sqrt(q) in z; the graded panels resolve it.
    for q in (1e6, 1e10):
        m = theory.moments("erf", q)
        assert m.phi_sq == pytest.approx(2 / math.pi * math.asin(2 * q / (1 + 2 * q)), rel=1e-10)
        assert m.dphi_sq == pytest.approx(4 / math.pi / math.sqrt(1 + 4 * q), rel=1e-10)


# --------------------------------------------------------------------------------------------
# Plain networks: length map, fixed point, chi_1, depth scales.


def test_identity_length_map_is_linear():
    for q in (0.0, 0.5, 3.0, 100.0):
        assert theory.q_map("identity", 1.7, 0.3, q) == pytest.approx(1.7 * q + 0.3, rel=1e-13)


@pytest.mark.parametrize("sigma_w2", [0.5, 1.0, 2.0, 3.0])
def test_relu_chi_1_is_half_sigma_w2_and_he_init_is_critical(sigma_w2):
    chi = theory.chi_1("relu", sigma_w2, 0.0)
    assert chi == pytest.approx(sigma_w2 / 2, rel=1e-13)
    if sigma_w2 == 2.0:
        assert theory.depth_scale(chi) == math.inf
    else:
        assert theory.depth_scale(chi) == pytest.approx(-1 / math.log(sigma_w2 / 2), rel=1e-9)


def test_relu_fixed_point_closed_form():
    # q* = sigma_w2 q*/2 + sigma_b2  =>  q* = sigma_b2 / (1 - sigma_w2 / 2).
    fixed = theory.q_fixed_point("relu", 1.5, 0.2, q0=5.0)
    assert fixed.converged
    assert fixed.q == pytest.approx(0.2 / (1 - 0.75), rel=1e-9)
    diverged = theory.q_fixed_point("relu", 3.0, 0.0)
    assert diverged.q == math.inf and not diverged.converged


def test_tanh_ordered_phase_has_q_star_zero_and_chi_1_sigma_w2():
    fixed = theory.q_fixed_point("tanh", 0.5, 0.0)
    assert fixed.converged and fixed.q < 1e-9
    assert theory.chi_1("tanh", 0.5, 0.0) == pytest.approx(0.5, rel=1e-8)
    assert theory.depth_scale(0.5) == pytest.approx(1 / math.log(2), rel=1e-13)


def test_tanh_order_to_chaos_transition_at_sigma_w2_one_without_bias():
    # chi(q = 0) = sigma_w2 tanh'(0)^2 = 1 exactly at the critical point.
    assert theory.layer_chi("tanh", 1.0, 0.0) == pytest.approx(1.0, abs=1e-14)
    assert theory.depth_scale(theory.layer_chi("tanh", 1.0, 0.0)) == math.inf
    chaotic = theory.q_fixed_point("tanh", 1.5, 0.0)
    assert chaotic.converged and chaotic.q > 0.1
    assert theory.chi_1("tanh", 1.5, 0.0) > 1.0  # Exploding gradients.
    assert theory.depth_scale(theory.chi_1("tanh", 1.5, 0.0)) < 0
    assert theory.chi_1("tanh", 0.9, 0.0) < 1.0  # Vanishing gradients.


def test_sigmoid_has_a_positive_fixed_point_without_bias():
    # sigmoid(0) = 1/2: E[sigmoid^2] >= E[sigmoid]^2 = 1/4, so q* >= sigma_w2 / 4 > 0.
    fixed = theory.q_fixed_point("sigmoid", 1.0, 0.0)
    assert fixed.converged and fixed.q >= 0.25
    assert theory.moments("sigmoid", 2.0).phi == pytest.approx(0.5, abs=1e-14)


def test_plain_relu_he_curves_are_flat_and_linear_curves_geometric():
    he = theory.plain_mlp_curves("relu", 2.0, 0.0, 6, 1.3, 7.0)
    np.testing.assert_allclose(he["fwd_sq"], 1.3, rtol=1e-13)
    np.testing.assert_allclose(he["act_grad_sq"], 7.0, rtol=1e-13)
    lin = theory.plain_mlp_curves("identity", 0.8, 0.0, 5, 2.0, 3.0)
    l = np.arange(6)
    np.testing.assert_allclose(lin["fwd_sq"], 2.0 * 0.8**l, rtol=1e-13)
    np.testing.assert_allclose(lin["act_grad_sq"], 3.0 * 0.8 ** (5 - l), rtol=1e-13)
    np.testing.assert_allclose(lin["q"], 2.0 * 0.8 ** (l[1:]), rtol=1e-13)


def test_e2e_mean_squared_singular_value_is_product_of_layer_factors():
    assert theory.e2e_jacobian_mean_sq_singular_value("identity", 1.3, 0.0, 7, 1.0) == (
        pytest.approx(1.3**7, rel=1e-13)
    )
    assert theory.e2e_jacobian_mean_sq_singular_value("relu", 1.5, 0.4, 9, 2.0) == (
        pytest.approx(0.75**9, rel=1e-12)
    )
    # tanh at q* = 0: chi -> sigma_w2 (Pennington et al. 2017, small-q regime).
    got = theory.e2e_jacobian_mean_sq_singular_value("tanh", 0.9, 0.0, 10, 1e-8)
    assert got == pytest.approx(0.9**10, rel=1e-6)


# --------------------------------------------------------------------------------------------
# Residual networks.


@pytest.mark.parametrize("alpha", [1.0, 0.3])
def test_linear_residual_multiplies_by_one_plus_sigma_w2_per_block(alpha):
    curves = theory.residual_mlp_curves("identity", 0.7, 0.0, 6, 1.5, 2.0, alpha=alpha)
    l = np.arange(7)
    factor = 1 + alpha**2 * 0.7
    np.testing.assert_allclose(curves["fwd_sq"], 1.5 * factor**l, rtol=1e-13)
    np.testing.assert_allclose(curves["act_grad_sq"], 2.0 * factor ** (6 - l), rtol=1e-13)


def test_he_relu_residual_without_norm_doubles_per_block():
    curves = theory.residual_mlp_curves("relu", 2.0, 0.0, 8, 0.7, 1.0)
    l = np.arange(9)
    np.testing.assert_allclose(curves["fwd_sq"], 0.7 * 2.0**l, rtol=1e-13)
    np.testing.assert_allclose(curves["act_grad_sq"], 2.0 ** (8 - l), rtol=1e-13)


def test_residual_bias_adds_alpha2_sigma_b2_per_block():
    curves = theory.residual_mlp_curves("identity", 0.0, 0.25, 4, 1.0, 1.0, alpha=2.0)
    np.testing.assert_allclose(curves["fwd_sq"], 1.0 + np.arange(5), rtol=1e-13)


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_batch_norm_residual_variance_grows_linearly(alpha):
    # De & Smith 2020: q_l = q_0 + l alpha^2 sigma_w2 E[relu(z)^2] = q_0 + l alpha^2 sigma_w2 / 2.
    sigma_w2, v0 = 2.0, 0.8
    curves = theory.residual_mlp_curves(
        "relu", sigma_w2, 0.0, 10, 1.3, 5.0, norm="batch", alpha=alpha, fwd_chan_var0=v0
    )
    l = np.arange(11)
    np.testing.assert_allclose(curves["fwd_sq"], 1.3 + l * alpha**2 * sigma_w2 / 2, rtol=1e-13)
    # Per-feature batch variance grows by alpha^2 sigma_w2 Var[relu(z)] = (1/2 - 1/(2 pi)).
    var = v0 + l * alpha**2 * sigma_w2 * (0.5 - 0.5 / math.pi)
    np.testing.assert_allclose(curves["chan_var"], var, rtol=1e-12)
    chi = 1 + alpha**2 * sigma_w2 * 0.5 / var[:-1]
    np.testing.assert_allclose(curves["chi"], chi, rtol=1e-12)
    want = 5.0 * np.array([np.prod(chi[k:]) for k in range(11)])
    np.testing.assert_allclose(curves["act_grad_sq"], want, rtol=1e-12)


# --------------------------------------------------------------------------------------------
# Initializers and the model-fields dispatcher.


def test_effective_sigma_w2_per_initializer():
    assert theory.effective_sigma_w2("normal", 1.5, 64, 64) == pytest.approx(2.25)
    assert theory.effective_sigma_w2("he_normal", 1.0, 64, 64) == 2.0
    assert theory.effective_sigma_w2("he_uniform", 0.5, 64, 32) == 0.5
    assert theory.effective_sigma_w2("lecun_normal", 2.0, 10, 3) == 4.0
    assert theory.effective_sigma_w2("glorot_normal", 1.0, 64, 64) == 1.0
    assert theory.effective_sigma_w2("glorot_uniform", 1.0, 30, 10) == pytest.approx(1.5)
    assert theory.effective_sigma_w2("orthogonal", 1.2, 64, 64) == pytest.approx(1.44)
    assert theory.effective_sigma_w2("delta_orthogonal", 1.0, 64, 64) == 1.0
    assert theory.effective_sigma_w2("zeros", 1.0, 64, 64) == 0.0
    with pytest.raises(ValueError, match="init='kaiming'"):
        theory.effective_sigma_w2("kaiming", 1.0, 64, 64)


def _fields(**overrides):
    fields = dict(
        family="mlp",
        block="plain",
        depth=5,
        layers_per_block=1,
        activation="tanh",
        init="normal",
        weight_scale=1.2,
        bias_scale=0.1,
        norm="none",
        residual_scale=1.0,
        width=128,
    )
    fields.update(overrides)
    return resflax.ModelConfig(**fields)


def test_predict_dispatches_to_the_curves():
    got = theory.predict(_fields(), 2.0, 3.0)
    want = theory.plain_mlp_curves("tanh", 1.44, 0.01, 5, 2.0, 3.0)
    np.testing.assert_allclose(got["fwd_sq"], want["fwd_sq"], rtol=1e-14)
    np.testing.assert_allclose(got["act_grad_sq"], want["act_grad_sq"], rtol=1e-14)
    np.testing.assert_allclose(got["jac_fro_sq"], want["chi"], rtol=1e-14)
    assert got["e2e_jac_fro_sq"] == pytest.approx(np.prod(want["chi"]), rel=1e-14)
    assert len(got["fwd_sq"]) == len(got["act_grad_sq"]) == 6 and len(got["jac_fro_sq"]) == 5
    assert all(type(v) is float for v in got["fwd_sq"] + got["act_grad_sq"])

    he = _fields(block="v2", activation="relu", init="he_normal", weight_scale=1.0, bias_scale=0.0)
    np.testing.assert_allclose(theory.predict(he, 1.0, 1.0)["fwd_sq"], 2.0 ** np.arange(6))
    bn = theory.predict(he.replace(norm="batch", bias_scale=0.3, residual_scale=0.5), 1.0, 1.0)
    np.testing.assert_allclose(bn["fwd_sq"], 1.0 + 0.25 * np.arange(6), rtol=1e-13)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(family="cifar_resnet", depth=8, layers_per_block=None, width=4),
        dict(layers_per_block=2),
        dict(block="v1"),
        dict(block="plain", norm="batch"),
        dict(block="v2", norm="layer"),
        dict(block="v2", residual_scale=0.0, learnable_residual_scale=True),
    ],
)
def test_predict_returns_none_outside_the_theory(overrides):
    assert theory.predict(_fields(**overrides), 1.0, 1.0) is None


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda: theory.predict({"family": "mlp"}, 1.0, 1.0), "config must be a resflax.ModelConfig"),
        (lambda: theory.predict(_fields(activation="swishy"), 1.0, 1.0), "activation"),
        (lambda: theory.predict(_fields(init="kaiming"), 1.0, 1.0), "init"),
        (lambda: theory.predict(_fields(depth=-1), 1.0, 1.0), "depth"),
        (lambda: theory.predict(_fields(), -1.0, 1.0), "fwd_sq0"),
        (lambda: theory.predict(_fields(), 1.0, float("nan")), "act_grad_sq_last"),
        (lambda: theory.q_map("relu", -1.0, 0.0, 1.0), "sigma_w2"),
        (lambda: theory.moments("relu", 1.0, num_points=0), "num_points"),
        (lambda: theory.residual_mlp_curves("relu", 2.0, 0.0, 3, 1.0, 1.0, norm="x"), "norm"),
        (
            lambda: theory.residual_mlp_curves("relu", 2.0, 0.1, 3, 1.0, 1.0, norm="batch"),
            "sigma_b2",
        ),
        (lambda: theory.depth_scale(-0.5), "chi"),
    ],
)
def test_bad_inputs_raise_value_errors_naming_the_argument(call, name):
    with pytest.raises(ValueError, match=name):
        call()


# --------------------------------------------------------------------------------------------
# Monte-Carlo cross-checks on wide random networks (float32, plain jax, not resflax.models).
#
# Per seed we measure fwd_sq[l] = mean x_l^2 and act_grad_sq[l] = (1/B) sum_i ||dS/dx_l||^2
# for S = sum_i <c_i, x_L^(i)>, c ~ N(0, 1), anchor the theory at that seed's fwd_sq[0] and
# act_grad_sq[L], and compare the ratio measured / predicted over seeds. Tolerance: 6 standard
# errors over seeds (finite-width and finite-sample fluctuations; p ~ 1e-3 for a Student t with
# 5 degrees of freedom) plus depth / width (the O(1/width) per-layer bias of the infinite-width
# theory; with batch norm it also covers the O(1/batch) gradient projection the theory ignores).
# ReLU nets fluctuate most (relative variance ~5/width per layer), so their bound is the widest.

SEEDS, DEPTH, WIDTH = 6, 5, 2000


@pytest.fixture(scope="module")
def unit_weights():
    """Per seed, [DEPTH, WIDTH, WIDTH] float32 N(0, 1) draws shared by all Monte-Carlo tests."""
    return [
        jnp.asarray(rng.standard_normal((DEPTH, WIDTH, WIDTH), dtype=np.float32))
        for rng in map(np.random.default_rng, range(SEEDS))
    ]


@functools.partial(jax.jit, static_argnums=0)
def _measure(block, x0, w, b):
    """fwd_sq [L+1], act_grad_sq [L+1] of x_l = block(x_{l-1}, w_l, b_l) (perturbation trick).

    `w` [L, n, n] holds N(0, 1) draws; blocks scale products by sqrt(sigma_w2 / n).
    """
    c = jax.random.normal(jax.random.key(123), x0.shape)

    def total(eps):
        xs = [x0 + eps[0]]
        for l in range(DEPTH):
            xs.append(block(xs[-1], w[l], b[l]) + eps[l + 1])
        return jnp.sum(c * xs[-1]), xs

    grads, xs = jax.grad(total, has_aux=True)([jnp.zeros_like(x0)] * (DEPTH + 1))
    fwd_sq = jnp.stack([jnp.mean(x**2) for x in xs])
    return fwd_sq, jnp.stack([jnp.sum(g**2) / x0.shape[0] for g in grads])


def _plain_block(phi, w_scale, x, w, b):
    return phi(w_scale * (x @ w) + b)


def _v2_block(phi, batch_norm, alpha, w_scale, x, w, b):
    """x + alpha (W phi(N(x)) + b), N = training-mode batch norm (true batch gradient) or id."""
    h = x
    if batch_norm:
        mean = jnp.mean(x, 0)
        h = (x - mean) * jax.lax.rsqrt(jnp.mean((x - mean) ** 2, 0) + 1e-5)
    return x + alpha * (w_scale * (phi(h) @ w) + b)


def _check(measured, predicted, width):
    """measured/predicted over seeds within 6 standard errors + DEPTH / width, per layer."""
    ratio = np.asarray(measured) / np.asarray(predicted)  # [seeds, L+1]
    mean = ratio.mean(0)
    se = ratio.std(0, ddof=1) / math.sqrt(ratio.shape[0])
    tol = 6 * se + DEPTH / width
    assert np.all(np.abs(mean - 1) <= tol), (mean, se, tol)


@pytest.mark.parametrize(
    "name, sigma_w2, sigma_b2, q0",
    [
        ("relu", 2.0, 0.05, 1.0),  # He: flat gradients, slowly growing q from the bias.
        ("tanh", 1.6, 0.05, 4.0),  # Chaotic phase, starting far above q* (transient).
        ("erf", 0.6, 0.0, 2.0),  # Ordered phase: q -> 0, gradients vanish.
    ],
)
def test_plain_mlp_curves_match_a_wide_random_network(
    unit_weights, name, sigma_w2, sigma_b2, q0
):
    batch, phi = 64, ACTIVATIONS[name]
    block = functools.partial(_plain_block, phi, math.sqrt(sigma_w2 / WIDTH))
    measured, predicted = [], []
    for seed in range(SEEDS):
        kx, kb = jax.random.split(jax.random.key(seed))
        x0 = math.sqrt(q0) * jax.random.normal(kx, (batch, WIDTH))
        b = jax.random.normal(kb, (DEPTH, WIDTH)) * math.sqrt(sigma_b2)
        fwd, grad = np.asarray(_measure(block, x0, unit_weights[seed], b), dtype=np.float64)
        curves = theory.plain_mlp_curves(name, sigma_w2, sigma_b2, DEPTH, fwd[0], grad[-1])
        measured.append([fwd, grad])
        predicted.append([curves["fwd_sq"], curves["act_grad_sq"]])
    _check(measured, predicted, WIDTH)


@pytest.mark.parametrize(
    "name, norm, sigma_w2, sigma_b2, alpha",
    [
        ("relu", "none", 2.0, 0.05, 0.7),  # He branch: ~x (1 + alpha^2) per block.
        ("gelu", "batch", 1.0, 0.0, 0.8),  # Linear growth, gradients through batch statistics.
    ],
)
def test_residual_v2_curves_match_a_wide_random_network(
    unit_weights, name, norm, sigma_w2, sigma_b2, alpha
):
    width, batch = 1000, 128 if norm == "batch" else 64
    w_scale = math.sqrt(sigma_w2 / width)
    block = functools.partial(_v2_block, ACTIVATIONS[name], norm == "batch", alpha, w_scale)
    measured, predicted = [], []
    for seed in range(SEEDS):
        kx, km, kb = jax.random.split(jax.random.key(seed), 3)
        # Features of x_0 with nonzero batch means: fwd_chan_var0 ~ 1 < fwd_sq0 ~ 1.5.
        x0 = jax.random.normal(kx, (batch, width))
        x0 = x0 + math.sqrt(0.5) * jax.random.normal(km, (width,))
        w = unit_weights[seed][:, :width, :width]
        b = jax.random.normal(kb, (DEPTH, width)) * math.sqrt(sigma_b2)
        fwd, grad = np.asarray(_measure(block, x0, w, b), dtype=np.float64)
        chan_var0 = float(jnp.mean(jnp.var(x0, 0)))
        curves = theory.residual_mlp_curves(
            name, sigma_w2, sigma_b2, DEPTH, fwd[0], grad[-1], norm, alpha, chan_var0
        )
        measured.append([fwd, grad])
        predicted.append([curves["fwd_sq"], curves["act_grad_sq"]])
    _check(measured, predicted, width)


@pytest.mark.parametrize("sigma_b2", [1e-5, 0.05, 0.3])
def test_critical_sigma_w2_puts_chi_1_at_one(sigma_b2):
    sigma_w2 = theory.critical_sigma_w2("tanh", sigma_b2)
    assert theory.chi_1("tanh", sigma_w2, sigma_b2) == pytest.approx(1.0, abs=1e-8)
    below = theory.chi_1("tanh", sigma_w2 * 0.99, sigma_b2)
    above = theory.chi_1("tanh", sigma_w2 * 1.01, sigma_b2)
    assert below < 1.0 < above  # Ordered below the line, chaotic above it.


def test_critical_sigma_w2_closed_forms_and_errors():
    assert theory.critical_sigma_w2("relu", 0.0) == pytest.approx(2.0, abs=1e-8)  # He init.
    # tanh without bias: q* -> 0 where tanh'(0) = 1, so sigma_w2 -> 1 (approached slowly).
    assert theory.critical_sigma_w2("tanh", 1e-9) == pytest.approx(1.0, abs=2e-3)
    with pytest.raises(ValueError, match="no critical point"):
        theory.critical_sigma_w2("tanh", 0.05, max_sigma_w2=0.5)
    with pytest.raises(ValueError, match="sigma_b2"):
        theory.critical_sigma_w2("tanh", -1.0)
