"""Every diagnostic against an independent computation: closed forms, dense float64 Jacobians +
SVD and per-layer `jax.grad` calls on tiny nets, and mean-field theory on wide ones."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import resflax
from resflax import diagnostics as dg
from resflax import theory
from resflax.models import unroll_variables


def run(fields, x, labels=None, seed=0, **options):
    model = resflax.build_model(fields)
    variables = model.init(jax.random.key(seed), x)
    if labels is None:
        labels = jnp.arange(x.shape[0]) % model.config.num_classes
    fn = dg.make_diagnostics(model, dg.Options(**options))
    return model, variables, labels, dg.to_python(fn(variables, x, labels, jax.random.key(seed + 1)))


# ------------------------------------------------------------------ closed forms


@pytest.mark.parametrize("gain", [0.8, 1.0, 1.3])
def test_linear_orthogonal_net_has_every_singular_value_equal_to_the_gain(gain):
    depth, width = 5, 16
    fields = dict(family="mlp", block="plain", depth=depth, width=width, activation="identity",
                  init="orthogonal", weight_scale=gain)
    x = jax.random.normal(jax.random.key(0), (6, 10))
    _, _, _, out = run(fields, x, power_tol=0.0, power_iterations=5)
    np.testing.assert_allclose(out["jac_spectral"], [gain] * depth, rtol=1e-5)
    np.testing.assert_allclose(out["jac_fro_sq"], [gain**2] * depth, rtol=1e-5)
    np.testing.assert_allclose(out["e2e_singular_values"], np.full((6, width), gain**depth), rtol=1e-5)
    np.testing.assert_allclose(out["e2e_jac_spectral"], gain**depth, rtol=1e-5)
    np.testing.assert_allclose(out["e2e_jac_fro_sq"], gain ** (2 * depth), rtol=1e-5)
    # Forward: ||g Q x||^2 = g^2 ||x||^2 exactly, per layer.
    fwd = np.asarray(out["fwd_sq"])
    np.testing.assert_allclose(fwd[1:] / fwd[:-1], gain**2, rtol=1e-5)
    assert out["jac_fro_method"] == "exact"


def test_hutchinson_is_exact_for_an_orthogonal_jacobian():
    # ||g Q v||^2 = g^2 ||v||^2 = g^2 dim for every Rademacher v: zero variance.
    fields = dict(family="mlp", depth=3, width=32, activation="identity", init="orthogonal",
                  weight_scale=1.2)
    x = jax.random.normal(jax.random.key(1), (4, 32))
    _, _, _, out = run(fields, x, fro_method="hutchinson", num_probes=2)
    np.testing.assert_allclose(out["jac_fro_sq"], [1.44] * 3, rtol=1e-5)
    np.testing.assert_allclose(out["jac_fro_sq_stderr"], [0.0] * 3, atol=1e-6)
    assert out["jac_fro_method"] == "hutchinson"


@pytest.mark.parametrize("norm", ["none", "batch"])
def test_zero_residual_branches_give_identity_jacobians_and_equal_gradients(norm):
    fields = dict(family="mlp", block="v2", depth=6, width=8, layers_per_block=2, norm=norm,
                  zero_init_residual=True)
    x = jax.random.normal(jax.random.key(2), (5, 8))
    _, _, _, out = run(fields, x, singular_values_max_dim=64)
    np.testing.assert_allclose(out["jac_spectral"], [1.0] * 6, rtol=1e-5)
    np.testing.assert_allclose(out["jac_fro_sq"], [1.0] * 6, rtol=1e-5)
    np.testing.assert_allclose(out["e2e_singular_values"], np.ones((5, 8)), rtol=1e-5)
    # Every x_l is x_0, so dS/dx_l is the same at every block.
    np.testing.assert_allclose(out["act_grad_sq"], [out["act_grad_sq"][0]] * 7, rtol=1e-5)


def test_zero_residual_conv_blocks_are_identities_or_their_shared_preactivation():
    """v2 with zero branches: a repeated block is the identity (J = I). The first unit of each
    stage maps x to s(relu(BN(x))) (its shortcut takes the pre-activation), whose per-example
    Jacobian, with the batch statistics held fixed, is s o diag(1[h > 0] / sqrt(var_c + eps)):
    ||J||_F^2 and sigma_max follow in closed form from the block's input."""
    fields = dict(family="cifar_resnet", block="v2", depth=8, width=4, zero_init_residual=True)
    x = jax.random.normal(jax.random.key(3), (2, 8, 8, 3))
    model, variables, _, out = run(fields, x, fro_method="hutchinson", num_probes=2,
                                   end_to_end=False, power_iterations=400, power_tol=0.0)
    (_, signals), _ = model.apply(variables, x, train=True, mutable=["batch_stats"])
    xs = [s[i] for s in signals for i in range(s.shape[0])]
    firsts = [seg.path[1] == "first" for seg in model.segments() for _ in range(seg.length)]
    assert sum(firsts) == 3
    for l, first in enumerate(firsts, start=1):
        prev = np.asarray(xs[l - 1], np.float64)
        if not first:
            np.testing.assert_allclose(out["jac_spectral"][l - 1], 1.0, rtol=1e-5)
            np.testing.assert_allclose(out["jac_fro_sq"][l - 1], 1.0, rtol=1e-5)
            continue
        mean, var = prev.mean((0, 1, 2)), prev.var((0, 1, 2))
        d = np.where(prev > mean, 1 / np.sqrt(var + 1e-5), 0.0)  # [B, H, W, C]
        stride = prev.shape[1] // xs[l].shape[1]
        kept = d[:, ::stride, ::stride, :]  # Option A keeps these entries (zeros padded on).
        # Hutchinson with Rademacher probes is exact for a diagonal map.
        np.testing.assert_allclose(out["jac_fro_sq"][l - 1],
                                   np.mean(np.sum(kept**2, (1, 2, 3))) / prev[0].size, rtol=1e-4)
        np.testing.assert_allclose(out["jac_spectral"][l - 1],
                                   np.mean(np.max(kept, (1, 2, 3))), rtol=1e-4)


# ------------------------------------------------------------------ brute force, float64


def brute_force(fields, x, labels, variables, train):
    """Every quantity from the unrolled model, dense per-example Jacobians and separate grads."""
    model = resflax.build_model(dict(fields, scan=False))
    frozen = model.clone(freeze_norm_stats=True)
    variables = unroll_variables(variables)
    mutable = ["batch_stats"] if train else False

    def forward(m, perturbations=None):
        out = m.apply(variables, x, train=train, perturbations=perturbations, mutable=mutable)
        return out[0] if train else out

    logits, signals = forward(model)
    xs = [np.asarray(s[0]) for s in signals]
    zeros = tuple(jnp.zeros_like(s) for s in signals)
    batch, depth = x.shape[0], len(xs) - 1

    def total_loss(pert_l, l, params=variables["params"]):
        perts = zeros[:l] + (pert_l,) + zeros[l + 1 :]
        out = model.apply({**variables, "params": params}, x, train=train, perturbations=perts,
                          mutable=mutable)
        logits = (out[0] if train else out)[0]
        return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, labels))

    grad_at = jax.jit(jax.grad(total_loss), static_argnums=1)  # A separate grad per layer.
    act_grad_sq = [
        float(np.sum(np.asarray(grad_at(zeros[l], l)) ** 2)) / batch for l in range(depth + 1)
    ]
    grads = jax.grad(lambda p: total_loss(zeros[0], 0, p) / batch)(variables["params"])
    param_grad_norm = [
        float(np.sqrt(sum(np.sum(np.asarray(g) ** 2) for g in jax.tree.leaves(grads[stage][name]))))
        for path in (seg.path for seg in model.segments())
        for stage, name in [path[:2]]
    ]

    def dense_jacobian(l_out, l_in):
        """Per-example d x_{l_out} / d x_{l_in}, [B, d_out, d_in], through the whole network."""
        def f(p):
            perts = zeros[:l_in] + (p,) + zeros[l_in + 1 :]
            return forward(frozen, perts)[1][l_out][0]

        full = np.asarray(jax.jit(jax.jacfwd(f))(zeros[l_in]))  # [B, *out, 1, B, *in]
        full = full.reshape(batch, -1, batch, xs[l_in][0].size)
        return np.stack([full[i, :, i, :] for i in range(batch)])

    jac_fro_sq, jac_spectral = [], []
    for l in range(1, depth + 1):
        jac = dense_jacobian(l, l - 1)
        svals = np.linalg.svd(jac, compute_uv=False)
        jac_fro_sq.append(np.mean(np.sum(svals**2, axis=-1)) / jac.shape[-1])
        jac_spectral.append(np.mean(svals[:, 0]))
    e2e = np.linalg.svd(dense_jacobian(depth, 0), compute_uv=False)
    channel_axes = tuple(range(x.ndim - 1))
    return dict(
        loss=float(np.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))),
        fwd_sq=[np.mean(a**2) for a in xs],
        fwd_chan_mean_sq=[np.mean(np.mean(a, axis=channel_axes) ** 2) for a in xs],
        fwd_chan_var=[np.mean(np.var(a, axis=channel_axes)) for a in xs],
        act_grad_sq=act_grad_sq,
        param_grad_norm=param_grad_norm,
        jac_fro_sq=jac_fro_sq,
        jac_spectral=jac_spectral,
        e2e_jac_fro_sq=np.mean(np.sum(e2e**2, axis=-1)) / xs[0][0].size,
        e2e_jac_spectral=np.mean(e2e[:, 0]),
        e2e_singular_values=e2e,
    )


CASES = [
    (dict(family="mlp", depth=3, width=5, layers_per_block=2, activation="tanh"), (4, 6)),
    (dict(family="cifar_resnet", depth=8, width=2, activation="elu"), (3, 4, 4, 2)),
]


@pytest.mark.parametrize(
    "case,norm",
    [(0, "none"), (0, "batch"), (1, "batch")],  # MLPs with and without batch norm; CNNs with.
)
@pytest.mark.parametrize("block", ["plain", "v1", "v2"])
def test_every_quantity_matches_brute_force_in_float64(case, block, norm):
    base, shape = CASES[case]
    fields = dict(base, block=block, norm=norm, dtype="float64", param_dtype="float64",
                  bias_scale=0.1 if norm == "none" else 0.0, shortcut="B")
    with jax.enable_x64(True):
        x = jax.random.normal(jax.random.key(case), shape, jnp.float64)
        labels = jnp.arange(shape[0]) % 10
        model = resflax.build_model(fields)
        variables = model.init(jax.random.key(7), x)
        options = dg.Options(train=True, fro_method="exact", exact_max_dim=64,
                             power_iterations=1000, power_tol=1e-11, singular_values_max_dim=64)
        got = dg.to_python(dg.make_diagnostics(model, options)(variables, x, labels, jax.random.key(1)))
        want = brute_force(fields, x, labels, variables, train=True)
    for name in ("loss", "fwd_sq", "fwd_chan_mean_sq", "fwd_chan_var", "act_grad_sq",
                 "param_grad_norm", "jac_fro_sq", "e2e_jac_fro_sq", "e2e_singular_values"):
        np.testing.assert_allclose(got[name], want[name], rtol=1e-9, atol=1e-12, err_msg=name)
    # Power iteration: converged to the top singular value (a lower bound while converging).
    np.testing.assert_allclose(got["jac_spectral"], want["jac_spectral"], rtol=1e-5)
    np.testing.assert_allclose(got["e2e_jac_spectral"], want["e2e_jac_spectral"], rtol=1e-5)
    assert np.all(np.asarray(got["jac_spectral"]) <= np.asarray(want["jac_spectral"]) * (1 + 1e-9))


def test_eval_mode_uses_running_statistics_and_matches_brute_force():
    base, shape = CASES[1]
    fields = dict(base, block="v1", norm="batch", dtype="float64", param_dtype="float64")
    with jax.enable_x64(True):
        x = jax.random.normal(jax.random.key(5), shape, jnp.float64)
        labels = jnp.arange(shape[0]) % 10
        model = resflax.build_model(fields)
        variables = model.init(jax.random.key(8), x)
        # Non-trivial running statistics, so eval and train modes differ.
        variables = {**variables, "batch_stats": jax.tree.map(
            lambda a: a + 0.3, variables["batch_stats"])}
        options = dg.Options(train=False, fro_method="exact", power_iterations=1000,
                             power_tol=1e-11, singular_values_max_dim=64)
        got = dg.to_python(dg.make_diagnostics(model, options)(variables, x, labels, jax.random.key(1)))
        want = brute_force(fields, x, labels, variables, train=False)
    for name in ("loss", "act_grad_sq", "param_grad_norm", "jac_fro_sq", "e2e_jac_fro_sq"):
        np.testing.assert_allclose(got[name], want[name], rtol=1e-9, err_msg=name)


# ------------------------------------------------------------------ estimators vs exact


def test_hutchinson_and_power_iteration_agree_with_exact_values_within_their_tolerance():
    fields = dict(family="cifar_resnet", depth=8, width=2, block="v1")
    x = jax.random.normal(jax.random.key(6), (3, 4, 4, 3))
    common = dict(end_to_end=True, power_iterations=500, power_tol=1e-6)
    *_, exact = run(fields, x, fro_method="exact", **common)
    *_, hutch = run(fields, x, fro_method="hutchinson", num_probes=64, **common)
    err = np.abs(np.asarray(hutch["jac_fro_sq"]) - exact["jac_fro_sq"])
    stderr = np.asarray(hutch["jac_fro_sq_stderr"])
    assert np.all(stderr > 0) and np.all(err < 5 * stderr), (err, stderr)
    assert abs(hutch["e2e_jac_fro_sq"] - exact["e2e_jac_fro_sq"]) < 5 * hutch["e2e_jac_fro_sq_stderr"]
    # The power-iteration estimate is converged as reported.
    assert np.all(np.asarray(exact["jac_spectral_rel_change"]) <= 1e-6)


@pytest.mark.parametrize("scale", [1e-30, 1e10, 1e30])
def test_spectral_norm_neither_overflows_nor_underflows(scale):
    # sigma_max of J = scale * I is `scale` (float32: sigma^2 = 1e60 would overflow).
    x = jnp.ones((2, 4))
    jvp_fn, vjp_fn = dg._linear_maps(lambda z: scale * z, x)
    sigma, change, _ = dg._spectral(jvp_fn, vjp_fn, x, jax.random.key(0), dg.Options())
    np.testing.assert_allclose(sigma, [scale, scale], rtol=1e-5)


@pytest.mark.parametrize("scale", [1e-20, 1.0, 1e20])
def test_lanczos_finds_sigma_max_of_a_dense_matrix_in_few_steps(scale):
    """Per-example maps z -> A_i z with Gaussian A_i (64 x 64), whose top singular values are
    close (power iteration converges like (sigma_2 / sigma_1)^(2k): slowly). 30 Golub-Kahan-
    Lanczos steps give numpy's sigma_max to float32 precision, from below."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((3, 64, 64)).astype(np.float32) * np.float32(scale)
    want = np.linalg.svd(a.astype(np.float64), compute_uv=False)[:, 0]
    x = jnp.ones((3, 64))
    jvp_fn, vjp_fn = dg._linear_maps(lambda z: jnp.einsum("bij,bj->bi", a, z), x)
    sigma, _, steps = dg._spectral(jvp_fn, vjp_fn, x, jax.random.key(1),
                                   dg.Options(power_iterations=30, power_tol=0.0))
    assert int(steps) <= 30  # Earlier when the estimate stops changing at all.
    np.testing.assert_allclose(sigma, want, rtol=2e-5)
    assert np.all(np.asarray(sigma, np.float64) <= want * (1 + 1e-5))


def test_spectral_norm_reports_non_convergence():
    fields = dict(family="mlp", depth=2, width=16, activation="tanh")
    x = jax.random.normal(jax.random.key(9), (3, 16))
    *_, out = run(fields, x, power_iterations=2, power_tol=0.0)
    assert np.all(np.asarray(out["jac_spectral_iterations"]) == 2)
    assert np.all(np.asarray(out["jac_spectral_rel_change"]) > 0)


# ------------------------------------------------------------------ theory vs measurement

SEEDS = range(4)


def measure_against_theory(fields, batch=128, input_scale=1.0):
    """Per-seed relative deviations measured/predicted - 1, for fwd_sq and act_grad_sq."""
    model = resflax.build_model(fields)
    fn = jax.jit(functools.partial(dg.gradient_statistics, model, train=True))
    devs = {"fwd_sq": [], "act_grad_sq": []}
    for seed in SEEDS:
        key_x, key_y, key_init = jax.random.split(jax.random.key(100 + seed), 3)
        x = input_scale * jax.random.normal(key_x, (batch, 64))
        labels = jax.random.randint(key_y, (batch,), 0, 10)
        variables = model.init(key_init, x)
        out = fn(variables, x, labels)
        blocks = {k: np.asarray(out[k], np.float64) for k in ("fwd_sq", "act_grad_sq", "fwd_chan_var")}
        pred = theory.predict(
            model.config, fwd_sq0=blocks["fwd_sq"][0],
            act_grad_sq_last=blocks["act_grad_sq"][-1], fwd_chan_var0=blocks["fwd_chan_var"][0],
        )
        assert pred is not None
        for name in devs:
            devs[name].append(blocks[name] / np.asarray(pred[name]) - 1)
    return {name: np.stack(d) for name, d in devs.items()}  # [seeds, L+1]


def assert_theory_holds(devs, width, depth):
    """Mean deviation over seeds within 4 standard errors of the seed-to-seed spread, plus a
    finite-width bias of 2 / width per layer of recursion (mean-field theory is exact only as
    width -> infinity; its corrections are O(steps / width), Hanin & Rolnick 2018). The forward
    curve recurses from x_0 (l steps), the backward one from the head's gradient (L - l steps)."""
    for name, d in devs.items():
        layers = np.arange(d.shape[1])
        steps = layers if name == "fwd_sq" else depth - layers
        stderr = d.std(axis=0, ddof=1) / np.sqrt(d.shape[0])
        bias = 2.0 * (1 + steps) / width
        assert np.all(np.abs(d.mean(axis=0)) <= 4 * stderr + bias), (name, d.mean(0), stderr)


MEAN_FIELD_CASES = {
    "relu_he": dict(activation="relu", init="he_normal"),
    "tanh_ordered": dict(activation="tanh", init="normal", weight_scale=0.8),
    "tanh_chaotic": dict(activation="tanh", init="normal", weight_scale=2.0, bias_scale=0.1),
    "sigmoid_glorot": dict(activation="sigmoid", init="glorot_normal"),
}


@pytest.mark.parametrize("case", sorted(MEAN_FIELD_CASES))
def test_plain_mlp_matches_mean_field_theory(case):
    width, depth = 256, 8
    fields = dict(family="mlp", block="plain", depth=depth, width=width, **MEAN_FIELD_CASES[case])
    devs = measure_against_theory(fields)
    assert_theory_holds(devs, width, depth)


def test_mean_field_phases_show_in_the_measurements():
    """Vanishing (chi_1 < 1) and non-vanishing (chi_1 = 1) gradients, as predicted."""
    width, depth = 256, 8
    ratios = {}
    for case in ("relu_he", "tanh_ordered", "sigmoid_glorot"):
        fields = dict(family="mlp", block="plain", depth=depth, width=width, **MEAN_FIELD_CASES[case])
        model = resflax.build_model(fields)
        x = jax.random.normal(jax.random.key(0), (128, 64))
        variables = model.init(jax.random.key(1), x)
        out = dg.gradient_statistics(model, variables, x, jnp.zeros(128, jnp.int32))
        ratios[case] = float(out["act_grad_sq"][1] / out["act_grad_sq"][-1])
    assert 0.7 < ratios["relu_he"] < 1.4  # chi_1 = 1: flat.
    assert ratios["tanh_ordered"] < 0.64**6  # chi_1 <= sigma_w^2 = 0.64 per layer.
    assert ratios["sigmoid_glorot"] < 0.1**6  # sigma_w^2 E[sigmoid'^2] < 1/16 per layer.


@pytest.mark.parametrize(
    "extra",
    [
        dict(activation="identity", init="normal", weight_scale=0.5),  # (1 + sigma_w^2)^l
        dict(activation="relu", init="he_normal"),  # doubles per block
        dict(activation="relu", init="he_normal", norm="batch"),  # grows linearly
        dict(activation="tanh", init="normal", residual_scale=0.5),
    ],
)
def test_residual_mlp_matches_the_growth_laws(extra):
    width, depth = 256, 8
    fields = dict(family="mlp", block="v2", depth=depth, width=width, **extra)
    devs = measure_against_theory(fields)
    assert_theory_holds(devs, width, depth)


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "options,match",
    [
        (dict(fro_method="dense"), r"fro_method='dense'.*allowed values"),
        (dict(num_probes=0), r"num_probes=0 must be an integer >= 1"),
        (dict(power_iterations=0), r"power_iterations=0"),
        (dict(power_tol=-1.0), r"power_tol=-1.0"),
    ],
)
def test_bad_options_raise_clear_errors(options, match):
    with pytest.raises(ValueError, match=match):
        dg.Options(**options)


def _e2e_spread(fields, depth, width=64, batch=4):
    """mean over examples of p90 / p10 of the singular values of dx_L/dx_0, at init."""
    model = resflax.build_model(dict(fields, family="mlp", block="plain", depth=depth,
                                     width=width, norm="none"))
    x = jax.random.normal(jax.random.key(1), (batch, width))
    variables = model.init(jax.random.key(0), x)
    fn = dg.make_diagnostics(model, dg.Options(jacobians=False, fro_method="exact",
                                               singular_values_max_dim=width))
    s = np.asarray(fn(variables, x, jnp.zeros(batch, jnp.int32), jax.random.key(2))
                   ["e2e_singular_values"], np.float64)
    return float(np.mean(np.percentile(s, 90, axis=1) / np.percentile(s, 10, axis=1)))


def test_orthogonal_tanh_at_criticality_keeps_the_end_to_end_spectrum_concentrated():
    """Dynamical isometry (Pennington et al. 2017): orthogonal weights + tanh on the critical
    line (`theory.critical_sigma_w2`, small sigma_b2 so q* is small) keep the spread of the
    end-to-end singular values bounded from 50 to 200 plain layers; Gaussian ReLU (He) nets
    have rank-deficient Jacobians whose spread is astronomical at either depth."""
    sigma_b2 = 1e-5
    sigma_w2 = theory.critical_sigma_w2("tanh", sigma_b2)
    iso = dict(activation="tanh", init="orthogonal", weight_scale=math.sqrt(sigma_w2),
               bias_scale=math.sqrt(sigma_b2))
    he = dict(activation="relu", init="he_normal")
    iso_50, iso_200 = _e2e_spread(iso, 50), _e2e_spread(iso, 200)
    he_50 = _e2e_spread(he, 50)
    assert iso_200 < 100 and iso_200 < 2 * iso_50  # Bounded as depth grows 4x.
    assert he_50 > 1e6 * iso_200
