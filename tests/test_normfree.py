"""Norm-free residual nets: Fixup (Zhang, Dauphin & Ma 2019) and NF-ResNets (Brock, De & Smith
2021), each against its paper's defining property at initialization, and adaptive gradient
clipping under `nn.scan` (per layer, exactly as the unrolled net).

- Fixup: every residual branch outputs exactly 0 at init (so every block is `phi(shortcut(x))`,
  the identity on the stem's post-ReLU signal), the logits are exactly 0 (zero head), and the
  non-last branch layers have He's std times `L^(-1/(2m-2))`.
- NF: the measured variance of every block input matches `beta_l^2` (`topology.nf_betas`), scaled
  weight standardization gives zero-mean, unit-norm rows, and scanned blocks each get their own
  beta.

Statistical tolerances are *data-driven*: a measured variance is a mean over units (features or
channels) of per-unit variances; its standard error is the spread of those over units / sqrt(n)
(the units have independent weights, and each per-unit variance is itself a mean over many
examples), which covers both the finite-width fluctuation of the weights and the sampling of
the inputs. We require |measured - predicted| <= 5 standard errors + 0.5% (a floor for the
O(1/width) bias of cross-correlated units; both are far above float32 rounding).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import resflax
from resflax import layers, models, theory, topology, training
from resflax.blocks import pad_shortcut
from resflax.config import ModelConfig
from resflax.models import unroll_variables
from resflax.topology import nf_betas

TINY_MLP = dict(family="mlp", depth=4, width=8, layers_per_block=2, num_classes=3)
TINY_CIFAR = dict(family="cifar_resnet", depth=8, width=4, num_classes=3)


def unstack(signals):
    """x_0 .. x_L as a list from the model's segments."""
    return [seg[i] for seg in signals for i in range(seg.shape[0])]


def inputs(config, batch=4, key=1):
    shape = (batch, 5) if config.family == "mlp" else (batch, 8, 8, 3)
    return jax.random.normal(jax.random.key(key), shape)


def build(fields, x, seed=0):
    config = ModelConfig.from_dict(fields)
    model = resflax.build_model(config)
    return config, model, model.init(jax.random.key(seed), x)


def jiggle(params, scale=0.3, seed=7):
    """Every parameter plus independent noise: no zero branch or head left, so outputs and
    gradients depend on every parameter."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return tree.unflatten(
        [p + scale * jax.random.normal(k, p.shape, p.dtype) for p, k in zip(leaves, keys)])


def assert_scan_matches_unrolled(fields, x, rtol=1e-5, atol=1e-6):
    """The scanned net on randomized params equals the unrolled net on the same params:
    logits, every signal, and every parameter's gradient."""
    scan_model = resflax.build_model(dict(fields, scan=True))
    flat_model = resflax.build_model(dict(fields, scan=False))
    params = jiggle(scan_model.init(jax.random.key(0), x)["params"])
    flat_params = unroll_variables({"params": params})["params"]

    def loss_and_out(model, p):
        logits, signals = model.apply({"params": p}, x)
        # sin of O(1) arguments: the jiggled nets' logits reach ~1e3-1e4, where sin's own
        # float32 range reduction (which differs between XLA's emitters) would dominate.
        scale = jax.lax.stop_gradient(1.0 + jnp.max(jnp.abs(logits)))
        return jnp.sum(jnp.sin(logits / scale)), (logits, unstack(signals))

    (_, (lg_s, sig_s)), g_s = jax.jit(jax.value_and_grad(
        lambda p: loss_and_out(scan_model, p), has_aux=True))(params)
    (_, (lg_f, sig_f)), g_f = jax.jit(jax.value_and_grad(
        lambda p: loss_and_out(flat_model, p), has_aux=True))(flat_params)
    np.testing.assert_allclose(lg_s, lg_f, rtol=rtol, atol=atol)
    for a, b in zip(sig_s, sig_f):
        # Float32 rounding is relative to the tensor's scale: a small entry of a signal of
        # entries ~1e3 (Fixup's jiggled scalar multipliers) carries ~1e-4 of absolute error.
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol * max(1.0, float(np.abs(b).max())))
    g_s = unroll_variables({"params": g_s})["params"]
    assert jax.tree.structure(g_s) == jax.tree.structure(g_f)
    for a, b in zip(jax.tree.leaves(g_s), jax.tree.leaves(g_f)):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------- Fixup


@pytest.mark.parametrize("fields", [
    dict(TINY_MLP, block="fixup"),
    dict(TINY_MLP, block="fixup", layers_per_block=1, shortcut="C"),
    dict(TINY_CIFAR, block="fixup", norm="none"),  # shortcut A, the reference's
    dict(TINY_CIFAR, block="fixup", norm="none", shortcut="B", bottleneck=True, depth=11),
])
def test_fixup_is_identity_with_zero_logits_at_init(fields):
    """Each residual branch is exactly 0: `x_l = phi(s(x_{l-1}))` (`s`: the shortcut, its
    projection for B/C), so on the (post-ReLU) cifar signal every non-projecting block is
    exactly the identity; the zero head gives exactly zero logits."""
    config = ModelConfig.from_dict(dict(fields, norm="none"))
    x = inputs(config)
    model = resflax.build_model(config)
    variables = model.init(jax.random.key(0), x)
    logits, signals = model.apply(variables, x)
    np.testing.assert_array_equal(logits, 0.0)
    xs = unstack(signals)
    flat = unroll_variables(variables)["params"]
    l = 0
    for seg in topology.segments(config.replace(scan=False)):
        l += 1
        block = seg.block()
        sub = flat
        for key in seg.path:
            sub = sub[key]
        x_in, out = xs[l - 1], xs[l]
        np.testing.assert_array_equal(block.apply({"params": sub}, x_in, False), out)
        projects = config.shortcut == "C" or "proj" in sub
        if projects:  # The branch is 0: phi(proj(x + bias1a)), bias1a = 0, a bias-free proj.
            kernel = sub["proj"]["kernel"]
            if kernel.ndim == 4:  # A 1x1 conv of stride s: subsample, then a matrix.
                stride = x_in.shape[1] // out.shape[1]
                x_in_s, kernel = x_in[:, ::stride, ::stride], kernel[0, 0]
            else:
                x_in_s = x_in
            assert "bias" not in sub["proj"]
            want = jax.nn.relu(x_in_s @ kernel)
        else:
            want = jax.nn.relu(pad_shortcut(x_in, out.shape[-1], x_in.shape[1] // out.shape[1])
                               if x_in.shape != out.shape else x_in)
        np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-6)
        if config.family == "cifar_resnet" and not projects:
            # The stem ends in a ReLU, so x_in >= 0 and the block is exactly the identity
            # (up to option A's subsample-and-pad).
            assert bool(jnp.all(x_in >= 0))
            if x_in.shape == out.shape:
                np.testing.assert_array_equal(out, x_in)
    assert l == config.num_blocks


def test_fixup_parameters_at_init():
    """Scalar biases 0 and multiplier 1 per branch, the last branch layer and the head 0."""
    config, _, variables = build(dict(TINY_CIFAR, block="fixup", norm="none", scan=False),
                                 jnp.zeros((1, 8, 8, 3)))
    params = variables["params"]
    np.testing.assert_array_equal(params["head"]["kernel"], 0.0)
    np.testing.assert_array_equal(params["head"]["bias"], 0.0)
    assert float(params["head_shift"]["bias"]) == 0.0
    block = params["stages_0"]["rest_0"]["block"]
    assert sorted(k for k in block if not k.startswith("w_")) == [
        "bias1a", "bias1b", "bias2a", "bias2b", "scale"]  # The reference's names and order.
    assert float(block["scale"]) == 1.0
    assert all(float(block[k]) == 0.0 for k in ("bias1a", "bias1b", "bias2a", "bias2b"))
    np.testing.assert_array_equal(block["w_1"]["kernel"], 0.0)
    assert "bias" not in block["w_0"]  # The scalar biases replace the layers' own.


@pytest.mark.parametrize("fields, layer, m", [
    # m = 2 (dense, L = 8): factor 8^(-1/2); a 256 x 256 kernel.
    (dict(family="mlp", depth=8, width=256, layers_per_block=2), ("stages_0", "rest", "block",
                                                                    "w_0"), 2),
    # m = 3 (bottleneck, L = 3): factor 3^(-1/4); the last stage's 3x3 conv, 3 x 3 x 64 x 64.
    (dict(family="cifar_resnet", depth=11, width=16, bottleneck=True, shortcut="B"),
     ("stages_2", "first", "block", "w_1"), 3),
])
def test_fixup_branch_init_std(fields, layer, m):
    """The std of a non-last branch layer is He's `sqrt(2 / fan_in)` times `L^(-1/(2m-2))`
    (Algorithm 1, step 2). The sample std of n Gaussian entries has relative standard error
    1/sqrt(2n) (< 0.3% here); we allow 5 of them."""
    config = ModelConfig.from_dict(dict(fields, block="fixup", norm="none"))
    model = resflax.build_model(config)
    shape = (1, 4) if config.family == "mlp" else (1, 8, 8, 3)
    params = model.init(jax.random.key(0), jnp.zeros(shape))["params"]
    kernel = params
    for key in layer:
        kernel = kernel[key]
    kernel = np.asarray(kernel["kernel"])
    if kernel.ndim == 3:  # Scanned: the first layer of the stack.
        kernel = kernel[0]
    fan_in = math.prod(kernel.shape[:-1])
    want = math.sqrt(2.0 / fan_in) * config.num_blocks ** (-1.0 / (2 * m - 2))
    assert resflax.blocks.Block(kind="fixup", width=4, num_branches=config.num_blocks,
                                bottleneck=m == 3, dense=m == 2).fixup_scale() == pytest.approx(
        config.num_blocks ** (-1.0 / (2 * m - 2)))
    assert abs(kernel.std() / want - 1) < 5 / math.sqrt(2 * kernel.size)
    assert abs(kernel.mean()) < 5 * want / math.sqrt(kernel.size)


@pytest.mark.parametrize("fields", [
    dict(TINY_MLP, block="fixup"),
    dict(TINY_CIFAR, block="fixup", depth=14, norm="none"),
])
def test_fixup_scan_equals_unrolled(fields):
    config = ModelConfig.from_dict(dict(fields, norm="none"))
    assert_scan_matches_unrolled(dict(fields, norm="none"), inputs(config, batch=2))


# ----------------------------------------------------------------------------- NF-ResNets


def test_nf_betas_follow_the_variance_recursion():
    a2 = 0.2**2
    mlp = ModelConfig(family="mlp", block="nf", depth=4, width=8)
    np.testing.assert_allclose(nf_betas(mlp), [math.sqrt(1 + k * a2) for k in range(4)])
    always = mlp.replace(shortcut="C")  # Every block projects: reset after each.
    np.testing.assert_allclose(nf_betas(always), [1.0] + [math.sqrt(1 + a2)] * 3)
    # CIFAR n = 2, shortcut B: stage 0 grows; the stride-2 first blocks project and reset.
    cifar = ModelConfig(family="cifar_resnet", block="nf", norm="none", shortcut="B", depth=14,
                        nf_alpha=0.5)
    np.testing.assert_allclose(np.square(nf_betas(cifar)), [1, 1.25, 1.5, 1.25, 1.5, 1.25])


def test_nf_gamma():
    """gamma * relu has unit variance on N(0, 1): gamma^2 = 2 / (1 - 1/pi); the gain of the
    other activations is by quadrature, which agrees for relu."""
    m = theory.moments("relu", 1.0)
    assert theory.nf_gamma("relu") == pytest.approx(1 / math.sqrt(m.phi_sq - m.phi**2), 1e-12)
    # deepmind nfnets' constant is a Monte-Carlo estimate of the same quantity (0.06% off).
    assert theory.nf_gamma("relu") == pytest.approx(1.7139588594436646, rel=1e-3)
    assert theory.nf_gamma("identity") == pytest.approx(1.0, 1e-12)
    # deepmind nfnets' Monte-Carlo gains (nfnets/base.py `nonlinearities`), 0.2% apart at most.
    nfnets = dict(gelu=1.7015043497085571, tanh=1.5939117670059204, sigmoid=4.803835391998291,
                  elu=1.2716004848480225, softplus=1.9203323125839233, swish=1.7881293296813965,
                  selu=1.0008515119552612)
    for name, value in nfnets.items():
        assert theory.nf_gamma(name) == pytest.approx(value, rel=2e-3), name


def test_nf_gamma_inside_a_traced_init():
    """Built while traced (init under jit), a quadrature gain is still a constant."""
    config = ModelConfig(family="mlp", block="nf", depth=2, width=4, activation="tanh")
    model = resflax.build_model(config)
    x = jnp.ones((2, 3))
    logits, _ = jax.jit(lambda k: model.apply(model.init(k, x), x))(jax.random.key(0))
    assert np.all(np.isfinite(logits))


@pytest.mark.parametrize("shape", [(3, 3, 5, 7), (6, 4)])
def test_scaled_weight_standardization(shape):
    """Per output unit: zero mean over the fan-in and `fan_in * Var(W_hat) = sum W_hat^2 =
    gain^2` (so unit variance inputs give unit variance outputs), for any kernel."""
    kernel = 3.0 + 2.0 * jax.random.normal(jax.random.key(0), shape)
    gain = jnp.linspace(0.5, 2.0, shape[-1])
    w_hat = np.asarray(layers.standardize_kernel(kernel, gain)).reshape(-1, shape[-1])
    np.testing.assert_allclose(w_hat.mean(0), 0.0, atol=1e-6)
    np.testing.assert_allclose(w_hat.shape[0] * w_hat.var(0), np.square(gain), rtol=1e-5)
    # The modules use it: the dense layer's output is x @ W_hat + b.
    dense = layers.StandardizedDense(4)
    x = jax.random.normal(jax.random.key(1), (2, 6))
    v = dense.init(jax.random.key(2), x)
    want = x @ layers.standardize_kernel(v["params"]["kernel"], v["params"]["gain"])
    np.testing.assert_allclose(dense.apply(v, x), want, rtol=1e-6)


def _check_variances(per_unit_vars, predicted):
    """`per_unit_vars` [n]: each unit's variance of one signal; see the module docstring."""
    measured = per_unit_vars.mean()
    se = per_unit_vars.std(ddof=1) / math.sqrt(per_unit_vars.size)
    assert abs(measured - predicted) <= 5 * se + 0.005 * predicted, (measured, predicted, se)
    return measured


def test_nf_mlp_signal_variance_matches_betas():
    """Gaussian inputs of unit variance, width 256 (input dimension too, so the stem's outputs
    are nearly uncorrelated), batch 1024: `Var(x_{l-1}) = beta_l^2`, `Var(x_L) = beta_L^2 +
    alpha^2`, each unit's variance over the batch."""
    config = ModelConfig(family="mlp", block="nf", depth=8, width=256, layers_per_block=2,
                         nf_alpha=0.5)
    model = resflax.build_model(config)
    x = jax.random.normal(jax.random.key(1), (1024, 256))
    variables = model.init(jax.random.key(0), x[:1])
    _, signals = jax.jit(model.apply)(variables, x)
    betas = nf_betas(config)
    predicted = [b**2 for b in betas] + [betas[-1] ** 2 + config.nf_alpha**2]
    measured = [_check_variances(np.var(np.asarray(s), axis=0, ddof=1), p)
                for s, p in zip(unstack(signals), predicted)]
    assert measured[-1] > 2.5  # 1 + 8 * 0.25 = 3: the growth is real, not 1 throughout.


def test_nf_conv_signal_variance_matches_betas():
    """cifar_resnet depth 14 (n = 2), width 8, alpha 0.5, 48x48 Gaussian inputs, batch 8:
    block inputs x_0..x_5 predicted 1, 1.25, 1.5 (stage 0 grows, inside one scan), 1.25 (the
    stride-2 projection resets), 1.5, 1.25.

    The theory ignores zero padding (a border position sees fewer inputs, and the weights'
    zero mean no longer cancels the inputs' mean), so each signal is measured only where the
    padding has no effect: where its value is the same when the image sits inside a larger
    canvas (aligned with the total stride 4). Per channel, the variance over batch and those
    positions (stationary there)."""
    config = ModelConfig(family="cifar_resnet", block="nf", norm="none", shortcut="B",
                         depth=14, width=8, nf_alpha=0.5)
    model = resflax.build_model(config)
    size, pad, batch = 48, 8, 8
    canvas = jax.random.normal(jax.random.key(1), (batch, size + 2 * pad, size + 2 * pad, 3))
    x = canvas[:, pad:pad + size, pad:pad + size]
    variables = model.init(jax.random.key(0), x[:1])
    apply = jax.jit(model.apply)
    inner, outer = unstack(apply(variables, x)[1]), unstack(apply(variables, canvas)[1])
    for s, s_big, beta in zip(inner, outer, nf_betas(config)):
        s, s_big = np.asarray(s), np.asarray(s_big)
        o = pad * s.shape[1] // size
        unaffected = np.all(np.abs(s_big[:, o:o + s.shape[1], o:o + s.shape[2]] - s) < 1e-4,
                            axis=(0, 3))
        assert unaffected.sum() >= 9  # Enough interior positions at every stride.
        values = s[:, unaffected].reshape(-1, s.shape[-1])
        _check_variances(np.var(values, axis=0, ddof=1), beta**2)


@pytest.mark.parametrize("fields", [
    dict(TINY_MLP, block="nf", depth=8),                          # one scan of 8, 8 betas
    dict(TINY_MLP, block="nf", depth=4, shortcut="C", layers_per_block=1),
    dict(TINY_CIFAR, block="nf", depth=14, norm="none", shortcut="B"),
])
def test_nf_scan_equals_unrolled(fields):
    config = ModelConfig.from_dict(fields)
    stacked = [s for s in topology.segments(config) if s.stacked and s.length > 1]
    if config.shortcut == "B":  # A stack whose blocks have distinct betas is what is tested.
        assert any(len(set(s.betas)) == s.length for s in stacked)
    assert_scan_matches_unrolled(fields, inputs(config, batch=2))


def test_nf_scanned_betas_are_per_block():
    """Replacing a stack's betas by its first block's value (the bug this guards against)
    changes the output: the scan really reads each block's beta."""
    fields = dict(TINY_MLP, block="nf", depth=4, nf_alpha=1.0)
    config = ModelConfig.from_dict(fields)
    model = resflax.build_model(config)
    x = inputs(config, batch=2)
    variables = model.init(jax.random.key(0), x)
    logits = model.apply(variables, x)[0]
    (seg,) = topology.segments(config)
    assert len(set(seg.betas)) == seg.length == 4
    seg = seg._replace(path=seg.path[1:])  # Within the stage.
    baked = seg._replace(betas=(seg.betas[0],) * seg.length)
    x0 = model.apply(variables, x, method="embed")
    stage_params = {"params": variables["params"]["stages_0"]}
    _, (ys,) = models.Stage((seg,)).apply(stage_params, x0, False)
    _, (ys_baked,) = models.Stage((baked,)).apply(stage_params, x0, False)
    x_last = model.apply(variables, x)[1][-1][-1]
    np.testing.assert_allclose(ys[-1], x_last, rtol=1e-6)
    assert not np.allclose(ys_baked[-1], x_last, rtol=1e-3)
    assert np.all(np.isfinite(logits))


def test_nf_block_needs_beta():
    block = resflax.blocks.Block(kind="nf", width=4, dense=True, norm=layers.NoNorm,
                                 use_bias=True)
    with pytest.raises(ValueError, match="needs beta"):
        block.init(jax.random.key(0), jnp.zeros((1, 4)), False)


# ----------------------------------------------------------------------------- AGC under scan


@pytest.mark.parametrize("fields", [
    dict(TINY_MLP, block="fixup", depth=4),                       # stacked dense + scalars
    dict(TINY_CIFAR, block="nf", depth=14, norm="none", shortcut="B"),  # stacked conv + gains
])
def test_adaptive_clip_scan_equals_unrolled(fields):
    """The AGC update of a scanned net, unrolled, equals the update of the unrolled net on the
    same parameters and gradients (optax alone reduces over the stacked layer axis)."""
    config = ModelConfig.from_dict(fields)
    model = resflax.build_model(config)
    params = jiggle(model.init(jax.random.key(0), inputs(config, batch=1))["params"], 1.0)
    grads = jiggle(jax.tree.map(jnp.zeros_like, params), 10.0, seed=3)  # Large: most clip.
    flat = lambda tree: unroll_variables({"params": tree})["params"]
    optim = dict(name="sgd", learning_rate=1.0, momentum=0.0, adaptive_clip=0.01)
    tx = training.make_optimizer(optim)
    update = jax.jit(lambda g, p: tx.update(g, tx.init(p), p)[0])  # One program, not ~100 ops.
    update_scan, update_flat = update(grads, params), update(flat(grads), flat(params))
    for a, b in zip(jax.tree.leaves(flat(update_scan)), jax.tree.leaves(update_flat)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    clipped = [not np.allclose(a, -b) for a, b in
               zip(jax.tree.leaves(update_flat), jax.tree.leaves(flat(grads)))]
    assert sum(clipped) > len(clipped) // 2  # The clip is active on most leaves.
    # optax's own transformation on the stacked layout does differ: the bug being fixed.
    plain = optax.adaptive_grad_clip(0.01)
    update_optax = jax.jit(lambda g, p: plain.update(g, plain.init(p), p)[0])(grads, params)
    assert not all(np.allclose(a, -b) for a, b in
                   zip(jax.tree.leaves(flat(update_optax)), jax.tree.leaves(update_flat)))


def test_adaptive_clip_unstacked_unchanged():
    """Outside a scanned stack the clip is optax's, bit for bit."""
    params = {"d": {"kernel": jnp.ones((5, 3)), "bias": jnp.ones(3)}, "s": jnp.ones(())}
    grads = jax.tree.map(lambda p: 100.0 * jnp.cumsum(jnp.ones_like(p)).reshape(p.shape), params)
    ours, _ = training.adaptive_grad_clip(0.01).update(grads, None, params)
    theirs, _ = optax.adaptive_grad_clip(0.01).update(grads, None, params)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
        np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------- config errors


@pytest.mark.parametrize("fields, message", [
    (dict(family="cifar_resnet", block="fixup"),  # the family's norm is batch
     r"^norm='batch' is not supported with block='fixup'.*allowed values: \['none'\]"),
    (dict(family="mlp", block="nf", norm="layer"),
     r"^norm='layer' is not supported with block='nf'"),
    (dict(family="cifar_resnet", block="nf", norm="none"),  # the family's shortcut is A
     r"^shortcut='A' is not supported with block='nf'.*allowed values: \['B', 'C'\]"),
    (dict(family="mlp", block="nf", learnable_residual_scale=True),
     r"^learnable_residual_scale=True is not supported with block='nf'"),
    (dict(family="mlp", block="fixup", residual_scale=0.5),
     r"^residual_scale=0.5 is not supported with block='fixup'.*allowed values: \[1.0\]"),
    (dict(family="mlp", block="nf", nf_alpha=-0.1), r"^nf_alpha=-0.1 must be a finite number"),
    (dict(family="mlp", block="nf", nf_alpha="big"), r"^nf_alpha='big' must be"),
])
def test_config_errors(fields, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_dict(fields)


def test_nf_alpha_round_trips():
    config = ModelConfig(family="mlp", block="nf", nf_alpha=0.3)
    assert ModelConfig.from_json(config.to_json()) == config
    assert ModelConfig(family="mlp").nf_alpha == 0.2


# ----------------------------------------------------------------------------- diagnostics


@pytest.mark.parametrize("scan", [True, False])
def test_nf_block_jacobians_use_each_blocks_beta(scan):
    """`diagnostics.block_jacobian_statistics` applies each block on its own; for 'nf' it must
    pass that block's beta. Ground truth: `d x_l / d x_{l-1}` of the whole network, through the
    perturbation added at `x_{l-1}`, densely (width 4, exact Frobenius norms)."""
    from resflax import diagnostics

    fields = dict(TINY_MLP, block="nf", depth=4, width=4, nf_alpha=1.0, scan=scan)
    config = ModelConfig.from_dict(fields)
    model = resflax.build_model(config)
    x = inputs(config, batch=2)
    variables = model.init(jax.random.key(0), x)
    _, signals = model.apply(variables, x)
    stats = diagnostics.block_jacobian_statistics(
        model, variables, signals, jax.random.key(1), diagnostics.Options(train=False))
    flat_model = resflax.build_model(dict(fields, scan=False))
    flat_vars = unroll_variables(variables)
    zeros = tuple(jnp.zeros((1,) + s.shape[1:]) for s in unstack(signals))

    def signal(l, k, pert):  # x_l as a function of the perturbation at x_k.
        perts = zeros[:k] + (pert[None],) + zeros[k + 1:]
        return unstack(flat_model.apply(flat_vars, x, perturbations=perts)[1])[l]

    for l in range(1, config.num_blocks + 1):
        jac = jax.jacfwd(lambda p: signal(l, l - 1, p))(jnp.zeros(x.shape[:1] + (4,)))
        # [B, 4, B, 4]: examples are independent, keep each example's own block.
        per_example = jnp.stack([jac[b, :, b, :] for b in range(x.shape[0])])
        want = jnp.mean(jnp.sum(per_example**2, axis=(1, 2))) / 4
        np.testing.assert_allclose(stats["jac_fro_sq"][l - 1], want, rtol=1e-4)
