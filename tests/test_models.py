"""The model zoo: published architectures, exact parameter counts, structural claims, errors."""

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import resflax
from resflax import costs, layers
from resflax.blocks import pad_shortcut

CIFAR = (1, 32, 32, 3)


def shapes(fields, input_shape=CIFAR):
    """Abstract variables of a model (no compute)."""
    model = resflax.build_model(fields)
    return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(input_shape))


def num_params(fields, input_shape=CIFAR):
    return costs.count_params(shapes(fields, input_shape)["params"])


def init(fields, x, seed=0):
    model = resflax.build_model(fields)
    return model, model.init(jax.random.key(seed), x)


def unstack(signals):
    """x_0 .. x_L as a list from the model's segments."""
    return [seg[i] for seg in signals for i in range(seg.shape[0])]


# ------------------------------------------------------------------ published parameter counts

# He et al. 2015 CIFAR nets, option A, BN affine, FC bias; 10 classes.
CIFAR_PARAMS = {20: 269_722, 32: 464_154, 44: 658_586, 56: 853_018, 110: 1_727_962}
# torchvision's published counts (v1, option B, 1000 classes).
IMAGENET_PARAMS = {
    18: 11_689_512,
    34: 21_797_672,
    50: 25_557_032,
    101: 44_549_160,
    152: 60_192_808,
}


@pytest.mark.parametrize("depth", sorted(CIFAR_PARAMS))
def test_cifar_resnet_parameter_counts(depth):
    fields = dict(family="cifar_resnet", depth=depth, block="v1", shortcut="A")
    assert num_params(fields) == CIFAR_PARAMS[depth]
    # The plain twin has exactly the parameters of the option-A ResNet; so does v2.
    assert num_params(dict(fields, block="plain")) == CIFAR_PARAMS[depth]
    assert num_params(dict(fields, block="v2")) == CIFAR_PARAMS[depth]


@pytest.mark.parametrize("depth", sorted(IMAGENET_PARAMS))
def test_imagenet_resnet_parameter_counts(depth):
    fields = dict(family="imagenet_resnet", depth=depth)
    assert num_params(fields, (1, 224, 224, 3)) == IMAGENET_PARAMS[depth]


def test_projection_shortcuts_add_what_they_should():
    base = dict(family="cifar_resnet", depth=20)
    a = num_params(dict(base, shortcut="A"))
    # B: two 1x1 projections (16->32, 32->64), each followed by BN (scale + bias) in v1.
    assert num_params(dict(base, shortcut="B")) - a == (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)
    # v2 projections branch off after the pre-activation and carry no norm of their own.
    assert num_params(dict(base, shortcut="B", block="v2")) - a == 16 * 32 + 32 * 64
    # C: a projection on every one of the 9 blocks; (in, out) channels per block.
    io = [(16, 16)] * 3 + [(16, 32)] + [(32, 32)] * 2 + [(32, 64)] + [(64, 64)] * 2
    assert num_params(dict(base, shortcut="C")) - a == sum(i * o + 2 * o for i, o in io)


def test_learnable_residual_scale_adds_one_scalar_per_block():
    base = dict(family="cifar_resnet", depth=20)
    assert num_params(dict(base, residual_scale=0.0, learnable_residual_scale=True)) - num_params(base) == 9


def test_mlp_parameter_count():
    # stem 5->8, 3 blocks of 8->8 (bias), head 8->10.
    fields = dict(family="mlp", depth=3, width=8)
    assert num_params(fields, (1, 5)) == (5 * 8 + 8) + 3 * (8 * 8 + 8) + (8 * 10 + 10)


def test_resnet20_multiply_adds_match_he_et_al():
    model = resflax.build_model(dict(family="cifar_resnet", depth=20))
    x = jnp.zeros(CIFAR)
    variables = shapes(dict(family="cifar_resnet", depth=20))
    # He et al. 2015: 40.55 M multiply-adds; the extra 640 are the 64x10 classifier.
    assert costs.count_macs(lambda v: model.apply(v, x), variables) == 40_551_040


def test_bottleneck_presets_have_the_right_structure():
    fields = dict(family="cifar_resnet", depth=164, bottleneck=True, block="v2", shortcut="B")
    assert resflax.build_model(fields).num_blocks() == 54
    # 1x1-3x3-1x1 with stride on the 3x3 and 4x expansion.
    variables = shapes(fields)
    first = variables["params"]["stages_1"]["first"]["block"]
    assert first["w_0"]["kernel"].shape == (1, 1, 64, 32)
    assert first["w_1"]["kernel"].shape == (3, 3, 32, 32)
    assert first["w_2"]["kernel"].shape == (1, 1, 32, 128)
    assert first["proj"]["kernel"].shape == (1, 1, 64, 128)
    # He et al. 2016: pre-activation ResNet-164 has 1.7 M parameters.
    assert abs(costs.count_params(variables["params"]) - 1.70e6) < 0.01e6


def test_projections_appear_only_where_the_shape_changes():
    params = shapes(dict(family="cifar_resnet", depth=20, shortcut="B"))["params"]
    with_proj = {
        "/".join(path)
        for path, _ in flax.traverse_util.flatten_dict(params).items()
        if "proj" in path
        for path in [tuple(p for p in path if p != "proj")[:2]]
    }
    assert with_proj == {"stages_1/first", "stages_2/first"}


# ------------------------------------------------------------------ structural claims


def assert_close(a, b, tol=1e-6):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)


def shortcut_of(prev, cur):
    return pad_shortcut(prev, cur.shape[-1], prev.shape[1] // cur.shape[1]) if prev.ndim == 4 else prev


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize(
    "family,extra",
    [("cifar_resnet", {}), ("mlp", {"layers_per_block": 2, "norm": "batch"}), ("mlp", {})],
)
@pytest.mark.parametrize("how", [{"zero_init_residual": True}, {"residual_scale": 0.0}])
def test_v2_with_silent_branches_is_the_identity_except_each_conv_stages_first_unit(
    family, extra, how, train
):
    """With every residual branch 0, a v2 block maps x to its shortcut of x -- the identity where
    the shape is kept -- except the first unit of each conv stage, whose shortcut branches off
    after its pre-activation (He et al. 2016, appendix): it maps x to s(relu(BN(x))), BN with
    the batch statistics (train) or the running ones (eval: mean 0, var 1, at init)."""
    fields = dict(family=family, block="v2", depth=8 if family != "mlp" else 4, shortcut="A")
    fields.update(extra, **how)
    if family == "mlp":
        fields["width"] = 4
    x = jax.random.normal(jax.random.key(1), (4, 8, 8, 3) if family != "mlp" else (4, 6))
    model, variables = init(fields, x)
    (_, signals), _ = model.apply(variables, x, train=train, mutable=["batch_stats"])
    xs = unstack(signals)
    assert len(xs) == model.num_blocks() + 1
    firsts = [seg.path[1] == "first" for seg in model.segments() for _ in range(seg.length)]
    assert sum(firsts) == (3 if family != "mlp" else 0)
    for prev, cur, first in zip(xs, xs[1:], firsts):
        if first:
            axes = tuple(range(prev.ndim - 1))
            mean, var = (prev.mean(axes), prev.var(axes)) if train else (0.0, 1.0)
            prev = jax.nn.relu((prev - mean) / jnp.sqrt(var + 1e-5))
        assert_close(cur, shortcut_of(prev, cur), 1e-5)


def _bn(x, p):
    """Batch norm with batch statistics over all axes but the last, by hand."""
    axes = tuple(range(x.ndim - 1))
    return (x - x.mean(axes)) / jnp.sqrt(x.var(axes) + 1e-5) * p["scale"] + p["bias"]


def _conv(x, w, stride=1):
    pad = w.shape[0] // 2
    return jax.lax.conv_general_dilated(x, w, (stride, stride), ((pad, pad), (pad, pad)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _float64_signals(fields, shape, seed):
    """`(input, [x_0 .. x_L], params)` of a float64 net in train mode, its parameters moved off
    their initial values (BN scales and biases no longer 1 and 0). Call under 64-bit JAX."""
    x = jax.random.normal(jax.random.key(seed), shape, jnp.float64)
    model, variables = init(fields, x)
    leaves, tree = jax.tree.flatten(variables["params"])
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    params = jax.tree.unflatten(tree, [
        leaf + 0.2 * jax.random.normal(k, leaf.shape, leaf.dtype) for leaf, k in zip(leaves, keys)])
    (_, signals), _ = model.apply({**variables, "params": params}, x, train=True,
                                  mutable=["batch_stats"])
    return x, unstack(signals), params


def test_v2_cifar_first_unit_is_he_et_al_2016s_formula_by_hand_in_float64():
    """x_0 = conv1(input); x_1 = relu(BN(x_0)) + W_1 relu(BN(W_0 relu(BN(x_0)))): the first unit
    activates conv1's output before splitting (He et al. 2016, appendix), the shortcut included."""
    fields = dict(family="cifar_resnet", block="v2", depth=14, width=4, dtype="float64",
                  param_dtype="float64")
    with jax.enable_x64(True):
        x, xs, params = _float64_signals(fields, (4, 8, 8, 3), seed=3)
        unit = params["stages_0"]["first"]["block"]
        x0 = _conv(x, params["stem"]["layer"]["kernel"])
        preact = jax.nn.relu(_bn(x0, unit["norm_0"]))
        h = _conv(jax.nn.relu(_bn(_conv(preact, unit["w_0"]["kernel"]), unit["norm_1"])),
                  unit["w_1"]["kernel"])
        np.testing.assert_allclose(xs[0], x0, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(xs[1], preact + h, rtol=1e-11, atol=1e-12)
        # The stage's later units keep the raw x on the shortcut.
        second = jax.tree.map(lambda a: a[0], params["stages_0"]["rest"]["block"])
        h2 = _conv(jax.nn.relu(_bn(_conv(jax.nn.relu(_bn(xs[1], second["norm_0"])),
                                         second["w_0"]["kernel"]), second["norm_1"])),
                   second["w_1"]["kernel"])
        np.testing.assert_allclose(xs[2], xs[1] + h2, rtol=1e-11, atol=1e-12)
    # Parameter counts are those of the plain and v1 twins (option A): the fix moves no weight.
    for depth in (20, 56, 110):
        counts = {b: num_params(dict(family="cifar_resnet", depth=depth, block=b))
                  for b in ("plain", "v1", "v2")}
        assert counts["v2"] == counts["v1"] == counts["plain"]


def test_v2_imagenet_first_unit_takes_the_stems_activation_as_its_preactivation():
    """fb.resnet.torch's pre-activation ImageNet nets (preresnet.lua, 'no_preact'): conv-BN-ReLU-
    maxpool stem, and a first unit with no BN-ReLU of its own (no two BN-ReLUs in a row):
    x_1 = x_0 + W_1 relu(BN(W_0 x_0)) with x_0 = maxpool(relu(BN(conv7x7/2(input))))."""
    fields = dict(family="imagenet_resnet", block="v2", depth=18, width=4, num_classes=5,
                  dtype="float64", param_dtype="float64")
    with jax.enable_x64(True):
        x, xs, params = _float64_signals(fields, (3, 32, 32, 3), seed=5)
        unit = params["stages_0"]["first"]["block"]
        assert "norm_0" not in unit and "norm_0" in params["stages_1"]["first"]["block"]
        stem = jax.nn.relu(_bn(_conv(x, params["stem"]["layer"]["kernel"], 2), params["stem"]["norm"]))
        x0 = jax.lax.reduce_window(stem, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1),
                                   ((0, 0), (1, 1), (1, 1), (0, 0)))
        h = _conv(jax.nn.relu(_bn(_conv(x0, unit["w_0"]["kernel"]), unit["norm_1"])),
                  unit["w_1"]["kernel"])
        np.testing.assert_allclose(xs[0], x0, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(xs[1], x0 + h, rtol=1e-11, atol=1e-12)
    # The convs and the head are v1's (11,689,512 with v1's norms, torchvision); the norms (scale
    # + bias per channel) are the stem's (64), every block's norm_1 (its width) and norm_0 (its
    # input channels) but the first unit's, and the final one (512):
    # 64 + (64 + 64+64) + (64+128 + 128+128) + (128+256 + 256+256) + (256+512 + 512+512) + 512.
    fields = dict(family="imagenet_resnet", depth=18)
    all_params = lambda f: shapes(f, (1, 224, 224, 3))["params"]
    norms = lambda f: sum(a.size for path, a in flax.traverse_util.flatten_dict(
        all_params(f)).items() if any("norm" in p for p in path))
    assert num_params(dict(fields, block="v1"), (1, 224, 224, 3)) == 11_689_512
    assert norms(dict(fields, block="v2")) == 2 * 3904
    assert (num_params(dict(fields, block="v2"), (1, 224, 224, 3)) - 2 * 3904
            == num_params(dict(fields, block="v1"), (1, 224, 224, 3)) - norms(dict(fields, block="v1")))


@pytest.mark.parametrize("how", [{"zero_init_residual": True}, {"residual_scale": 0.0}])
def test_v1_with_silent_branches_is_the_activation(how):
    # tanh, so that act(x) != x on the block inputs.
    fields = dict(family="cifar_resnet", block="v1", depth=8, activation="tanh", shortcut="A", **how)
    x = jax.random.normal(jax.random.key(2), (4, 16, 16, 3))
    model, variables = init(fields, x)
    (_, signals), _ = model.apply(variables, x, train=True, mutable=["batch_stats"])
    xs = unstack(signals)
    for prev, cur in zip(xs, xs[1:]):
        assert_close(cur, jnp.tanh(shortcut_of(prev, cur)))


def test_mlp_plain_is_exactly_the_mean_field_network():
    sigma_w, sigma_b, width, depth = 1.7, 0.3, 16, 4
    fields = dict(
        family="mlp", block="plain", depth=depth, width=width, layers_per_block=1, norm="none",
        init="normal", weight_scale=sigma_w, bias_scale=sigma_b, activation="tanh",
    )
    u = jax.random.normal(jax.random.key(3), (5, 7))
    model, variables = init(fields, u)
    logits, signals = model.apply(variables, u)
    p = variables["params"]
    kernels = p["stages_0"]["rest"]["block"]["w_0"]["kernel"]  # [L, n, n]
    biases = p["stages_0"]["rest"]["block"]["w_0"]["bias"]
    x = u @ p["stem"]["layer"]["kernel"] + p["stem"]["layer"]["bias"]  # Linear stem.
    expected = [x]
    for l in range(depth):
        x = jnp.tanh(x @ kernels[l] + biases[l])
        expected.append(x)
    for got, want in zip(unstack(signals), expected):
        assert_close(got, want, 1e-5)
    assert_close(logits, x @ p["head"]["kernel"] + p["head"]["bias"], 1e-5)


def test_mlp_weights_have_the_mean_field_variance():
    sigma_w, sigma_b, n = 1.5, 0.5, 256
    fields = dict(family="mlp", depth=8, width=n, init="normal", weight_scale=sigma_w,
                  bias_scale=sigma_b)
    _, variables = init(fields, jnp.zeros((1, n)))
    w = variables["params"]["stages_0"]["rest"]["block"]["w_0"]
    k, b = np.asarray(w["kernel"]), np.asarray(w["bias"])
    # Variance of 8 * 256^2 samples: relative standard error ~ sqrt(2 / 524288) = 0.2%.
    assert abs(k.var() * n / sigma_w**2 - 1) < 0.01
    assert abs(k.mean()) < 5 * k.std() / np.sqrt(k.size)
    # Biases: 8 * 256 samples, relative standard error ~ 3%.
    assert abs(b.var() / sigma_b**2 - 1) < 0.15


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("block", ["plain", "v1", "v2"])
def test_scanned_and_unrolled_stages_agree(block, train):
    fields = dict(family="cifar_resnet", depth=14, block=block, width=4)
    x = jax.random.normal(jax.random.key(4), (3, 8, 8, 3))
    scanned, variables = init(fields, x)
    unrolled = resflax.build_model(dict(fields, scan=False))
    converted = resflax.models.unroll_variables(variables)
    assert jax.tree.structure(converted) == jax.tree.structure(
        jax.eval_shape(unrolled.init, jax.random.key(0), x)
    )
    (a_logits, a_sig), _ = scanned.apply(variables, x, train=train, mutable=["batch_stats"])
    (b_logits, b_sig), _ = unrolled.apply(converted, x, train=train, mutable=["batch_stats"])
    assert_close(a_logits, b_logits, 1e-5)
    for a, b in zip(unstack(a_sig), unstack(b_sig)):
        assert_close(a, b, 1e-5)


def test_remat_changes_memory_not_values():
    fields = dict(family="cifar_resnet", depth=8, width=4)
    x = jax.random.normal(jax.random.key(5), (2, 8, 8, 3))
    model, variables = init(fields, x)
    rematted = resflax.build_model(dict(fields, remat=True))

    def loss(m, params):
        (logits, _), _ = m.apply(
            {**variables, "params": params}, x, train=True, mutable=["batch_stats"]
        )
        return jnp.sum(logits**2)

    g1 = jax.grad(functools.partial(loss, model))(variables["params"])
    g2 = jax.grad(functools.partial(loss, rematted))(variables["params"])
    jax.tree.map(lambda a, b: assert_close(a, b, 1e-5), g1, g2)
    jaxpr = str(jax.make_jaxpr(jax.grad(functools.partial(loss, rematted)))(variables["params"]))
    assert "remat" in jaxpr or "checkpoint" in jaxpr


def test_perturbations_give_the_gradient_with_respect_to_every_block_output():
    fields = dict(family="cifar_resnet", depth=8, width=4)
    x = jax.random.normal(jax.random.key(6), (2, 8, 8, 3))
    model, variables = init(fields, x)
    _, signals = model.apply(variables, x)
    zeros = jax.tree.map(jnp.zeros_like, signals)
    f = lambda p: jnp.sum(model.apply(variables, x, perturbations=p)[0] ** 2)
    grads = jax.grad(f)(zeros)
    assert jax.tree.structure(grads) == jax.tree.structure(signals)
    # The gradient at x_L, checked against a direct derivative through the readout.
    x_last = unstack(signals)[-1]
    direct = jax.grad(lambda z: jnp.sum(model.apply(variables, z, method="readout") ** 2))(x_last)
    assert_close(unstack(grads)[-1], direct, 1e-5)


# ------------------------------------------------------------------ batch norm modes


def test_batch_norm_train_and_eval_modes():
    x = 3.0 + 2.0 * jax.random.normal(jax.random.key(7), (64, 5, 5, 4))
    bn = layers.BatchNorm(momentum=0.9)
    variables = bn.init(jax.random.key(0), x, train=False)
    # Train mode: normalized by the batch's own statistics...
    y, updates = bn.apply(variables, x, train=True, mutable=["batch_stats"])
    assert_close(y.mean(axis=(0, 1, 2)), jnp.zeros(4), 1e-5)
    assert_close(y.var(axis=(0, 1, 2)), jnp.ones(4), 1e-3)
    # ...and the running averages move by (1 - momentum) towards them.
    stats = updates["batch_stats"]
    assert_close(stats["mean"], 0.1 * x.mean(axis=(0, 1, 2)), 1e-5)
    assert_close(stats["var"], 0.9 + 0.1 * x.var(axis=(0, 1, 2)), 1e-4)
    # Eval mode uses the running statistics, never the batch's.
    y_eval = bn.apply({**variables, **updates}, x, train=False)
    expected = (x - stats["mean"]) / jnp.sqrt(stats["var"] + 1e-5)
    assert_close(y_eval, expected, 1e-5)


def test_train_mode_couples_examples_and_eval_mode_does_not():
    fields = dict(family="cifar_resnet", depth=8, width=4)
    x = jax.random.normal(jax.random.key(8), (4, 8, 8, 3))
    model, variables = init(fields, x)
    x2 = x.at[1:].multiply(3.0)  # Change every example but the first.
    (train_a, _), _ = model.apply(variables, x, train=True, mutable=["batch_stats"])
    (train_b, _), _ = model.apply(variables, x2, train=True, mutable=["batch_stats"])
    assert not np.allclose(train_a[0], train_b[0], atol=1e-4)
    assert_close(model.apply(variables, x)[0][0], model.apply(variables, x2)[0][0], 1e-6)


def test_frozen_batch_statistics_make_examples_independent_under_differentiation():
    fields = dict(family="mlp", depth=3, width=6, norm="batch", block="v2")
    x = jax.random.normal(jax.random.key(9), (5, 6))
    model, variables = init(fields, x)
    frozen = model.clone(freeze_norm_stats=True)

    def jac(m):
        f = lambda z: m.apply(variables, z, train=True, mutable=["batch_stats"])[0][0]
        return jax.jacfwd(f)(x)  # [B, classes, B, features]

    j_frozen, j_coupled = jac(frozen), jac(model)
    off_diagonal = np.ones((5, 5), bool) & ~np.eye(5, dtype=bool)
    assert np.abs(np.asarray(j_frozen).transpose(0, 2, 1, 3)[off_diagonal]).max() == 0
    assert np.abs(np.asarray(j_coupled).transpose(0, 2, 1, 3)[off_diagonal]).max() > 1e-3
    # Same forward values either way.
    assert_close(
        frozen.apply(variables, x, train=True, mutable=["batch_stats"])[0][0],
        model.apply(variables, x, train=True, mutable=["batch_stats"])[0][0],
    )


# ------------------------------------------------------------------ compile time flat in depth


def test_program_size_does_not_grow_with_depth():
    x = jnp.zeros(CIFAR)
    sizes, hlo = [], []
    for depth in (20, 110):
        model = resflax.build_model(dict(family="cifar_resnet", depth=depth))
        variables = shapes(dict(family="cifar_resnet", depth=depth))
        fwd = lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"])
        sizes.append(costs.program_size(fwd, variables, x))
        hlo.append(len(jax.jit(fwd).lower(variables, x).as_text()))
    assert sizes[0] == sizes[1]
    assert abs(hlo[1] - hlo[0]) / hlo[0] < 0.02
    # Unrolled, the program grows with depth: the check above can fail.
    unrolled = []
    for depth in (20, 32):
        fields = dict(family="cifar_resnet", depth=depth, scan=False)
        model = resflax.build_model(fields)
        unrolled.append(costs.program_size(model.apply, shapes(fields), x))
    assert unrolled[1] > unrolled[0]


# ------------------------------------------------------------------ registries and initializers


def test_every_required_name_is_registered():
    assert set(layers.ACTIVATIONS) >= {
        "identity", "relu", "leaky_relu", "elu", "selu", "gelu", "swish", "softplus", "tanh",
        "sigmoid", "erf",
    }
    assert set(layers.INITIALIZERS) >= {
        "normal", "he_normal", "he_uniform", "glorot_normal", "glorot_uniform", "lecun_normal",
        "orthogonal", "delta_orthogonal", "zeros",
    }
    assert set(layers.NORMS) == {"none", "batch", "layer", "group"}


@pytest.mark.parametrize(
    "name,variance",
    [
        ("normal", lambda fi, fo: 1 / fi),
        ("lecun_normal", lambda fi, fo: 1 / fi),
        ("he_normal", lambda fi, fo: 2 / fi),
        ("he_uniform", lambda fi, fo: 2 / fi),
        ("glorot_normal", lambda fi, fo: 2 / (fi + fo)),
        ("glorot_uniform", lambda fi, fo: 2 / (fi + fo)),
        ("orthogonal", None),
    ],
)
def test_initializer_variances(name, variance):
    gain, shape = 1.3, (3, 3, 64, 128)
    fan_in, fan_out = 3 * 3 * 64, 3 * 3 * 128
    w = np.asarray(layers.initializer(name, gain)(jax.random.key(0), shape))
    if name == "orthogonal":
        # The kernel as a [fan_in=576, 128] matrix has orthogonal columns of norm `gain`.
        m = w.reshape(-1, 128)
        assert_close(m.T @ m, gain**2 * np.eye(128), 1e-4)
        return
    # Relative standard error of a sample variance: sqrt(2 / N) (Gaussian; less for uniform).
    assert abs(w.var() / (gain**2 * variance(fan_in, fan_out)) - 1) < 5 * np.sqrt(2 / w.size)


@pytest.mark.parametrize("c_in,c_out", [(16, 32), (32, 16), (8, 8)])
def test_delta_orthogonal_is_an_orthogonal_centre_tap(c_in, c_out):
    gain = 2.0
    w = np.asarray(layers.initializer("delta_orthogonal", gain)(jax.random.key(1), (3, 3, c_in, c_out)))
    centre = w[1, 1]
    off_centre = w.copy()
    off_centre[1, 1] = 0
    assert np.all(off_centre == 0)
    gram = centre @ centre.T if c_in <= c_out else centre.T @ centre
    assert_close(gram, gain**2 * np.eye(min(c_in, c_out)), 1e-5)


@pytest.mark.parametrize("norm", ["none", "batch", "layer", "group"])
@pytest.mark.parametrize("activation", ["gelu", "selu", "sigmoid", "erf"])
def test_every_norm_and_activation_builds_and_runs(norm, activation):
    fields = dict(family="cifar_resnet", depth=8, width=4, norm=norm, activation=activation,
                  block="v2", init="delta_orthogonal")
    x = jax.random.normal(jax.random.key(10), (2, 8, 8, 3))
    model, variables = init(fields, x)
    logits, _ = model.apply(variables, x)
    assert logits.shape == (2, 10) and np.all(np.isfinite(logits))


def test_bfloat16_compute():
    fields = dict(family="cifar_resnet", depth=8, width=4, dtype="bfloat16")
    x = jnp.ones((2, 8, 8, 3))
    model, variables = init(fields, x)
    logits, signals = model.apply(variables, x)
    assert logits.dtype == jnp.bfloat16 and signals[-1].dtype == jnp.bfloat16
    assert jax.tree.leaves(variables["params"])[0].dtype == jnp.float32


def test_build_model_accepts_a_config_dict():
    import ml_collections

    cfg = ml_collections.ConfigDict(dict(family="mlp", depth=2, width=3))
    assert resflax.build_model(cfg).config.width == 3


# ------------------------------------------------------------------ clear errors


@pytest.mark.parametrize(
    "fields,match",
    [
        (dict(activation="relu6"), r"activation='relu6'.*allowed values:.*'tanh'"),
        (dict(init="kaiming"), r"init='kaiming'.*allowed values:.*'he_normal'"),
        (dict(norm="instance"), r"norm='instance'.*allowed values:.*'batch'"),
        (dict(family="vgg"), r"family='vgg'.*allowed values:.*'cifar_resnet'"),
        (dict(block="v3"), r"block='v3'.*allowed values:.*'plain'"),
        (dict(family="cifar_resnet", shortcut="D"), r"shortcut='D'.*allowed values"),
        (dict(family="cifar_resnet", depth=21), r"depth=21.*6n\+2"),
        (dict(family="cifar_resnet", depth=26, bottleneck=True), r"depth=26.*9n\+2"),
        (dict(family="imagenet_resnet", depth=42), r"depth=42.*allowed values: \[18, 34"),
        (dict(family="imagenet_resnet", depth=18, bottleneck=True), r"bottleneck=True contradicts"),
        (dict(bottleneck=True), r"bottleneck=True is not supported for family='mlp'"),
        (dict(depth=0), r"depth=0 must be an integer >= 1"),
        (dict(width=-4), r"width=-4 must be an integer >= 1"),
        (dict(weight_scale=-1.0), r"weight_scale=-1.0 must be a finite number >= 0"),
        (dict(layers_per_block=3), r"layers_per_block=3.*allowed values: \[1, 2\]"),
        (dict(family="cifar_resnet", layers_per_block=2), r"layers_per_block=2 applies to"),
        (dict(residual_scale="big"), r"residual_scale='big' must be a number"),
        (dict(learnable_residual_scale=True), r"learnable_residual_scale=True needs a skip connection"),
        (dict(residual_scale=0.5), r"residual_scale=0.5 needs a skip connection"),
        (dict(dtype="float8"), r"dtype='float8'.*allowed values"),
        (dict(dtype="float64"), r"jax_enable_x64"),
        (dict(depht=3), r"unknown model field\(s\) \['depht'\]; allowed fields"),
    ],
)
def test_bad_fields_raise_clear_errors(fields, match):
    with pytest.raises(ValueError, match=match):
        resflax.build_model(fields)


@pytest.mark.parametrize("family,shape", [("cifar_resnet", (4, 8, 8, 3)), ("mlp", (6, 5))])
def test_running_variance_is_biased_by_default_and_unbiased_on_request(family, shape):
    """m <- 0.9 m + 0.1 v: v is the biased batch variance (flax's convention, the default) or
    n / (n - 1) times it (Torch7 / PyTorch, 'unbiased'), n = values per channel."""
    x = jax.random.normal(jax.random.key(7), shape)
    updated = {}
    for convention in ("biased", "unbiased"):
        fields = dict(family=family, depth=8 if family != "mlp" else 2, width=4, norm="batch",
                      bn_running_var=convention)
        model, variables = init(fields, x)
        _, state = model.apply(variables, x, train=True, mutable=["batch_stats"])
        # The first batch norm: the CIFAR stem's, or the first MLP block's (stacked).
        stats = state["batch_stats"]
        updated[convention] = (stats["stem"]["norm"] if family != "mlp" else
                               stats["stages_0"]["rest"]["block"]["norm_0"])["var"]
    var_b, var_u = (np.asarray(updated[c]) for c in ("biased", "unbiased"))
    n = np.prod(shape[:-1])
    np.testing.assert_allclose((var_u - 0.9) / (var_b - 0.9), n / (n - 1), rtol=1e-4)
    with pytest.raises(ValueError, match=r"bn_running_var='torch'.*allowed values"):
        resflax.build_model(dict(family=family, bn_running_var="torch"))
