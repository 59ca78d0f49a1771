"""SkipInit (De & Smith 2020) and ReZero (Bachlechner et al. 2020) at initialization.

Both put a learnable scalar alpha_l = 0 on every residual branch: `x_l = s(x_{l-1}) + alpha_l
F_l(x_{l-1})` (v2 without norm). So at init the network is its shortcut path exactly, and the
first gradient reaches every alpha_l (and nothing inside the branches): dL/dalpha_l =
<dL/dx_l, F_l(x_{l-1})>, while dL/dW = alpha_l * (...) = 0. The shortcut path is computed here
independently of the blocks: identity, or for the conv family's stage transitions option A
(subsample by 2, zero-pad the channels), after the shared pre-activation phi(x) of He et al.
2016's first unit of a stage.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resflax import ModelConfig, build_model, models, topology

SKIPINIT = dict(block="v2", norm="none", residual_scale=0.0, learnable_residual_scale=True)
NETS = {
    "mlp": (dict(SKIPINIT, family="mlp", depth=6, width=8, layers_per_block=2), (2, 12)),
    "cifar": (dict(SKIPINIT, family="cifar_resnet", depth=14, width=4), (2, 8, 8, 3)),
}


def _init(fields, shape, scan=True):
    model = build_model(dict(fields, scan=scan))
    x = jax.random.normal(jax.random.key(1), shape)
    variables = model.init(jax.random.key(0), x)
    return model, variables, x


def _signals(model, variables, x):
    logits, signals = model.apply(variables, x)
    """logits and [x_0, x_1, ..., x_L] (conv signals change shape at stage transitions)."""
    return logits, [x for segment in signals for x in np.asarray(segment)]


def _shortcut_path(config: ModelConfig, x0: np.ndarray) -> list[np.ndarray]:
    """x_1..x_L of the net with every branch removed, from the topology alone (numpy)."""
    xs, x = [], x0
    for plan in topology.stage_plan(config):
        for i in range(plan.num_repeated + plan.separate_first):
            first = plan.separate_first and i == 0
            if first and plan.first_preact == "shared":
                x = np.maximum(x, 0.0)  # The stage's first unit: phi(x) before the split.
            if first and x.ndim == 4:
                x = x[:, ::plan.strides, ::plan.strides, :]
                x = np.pad(x, [(0, 0)] * 3 + [(0, plan.width - x.shape[-1])])
            xs.append(x)
    return xs


@pytest.mark.parametrize("net", sorted(NETS))
def test_skipinit_net_is_its_shortcut_path_at_init(net):
    fields, shape = NETS[net]
    model, variables, x = _init(fields, shape)
    _, signals = _signals(model, variables, x)
    expected = _shortcut_path(model.config, signals[0])
    assert len(expected) == model.config.num_blocks == len(signals) - 1
    for l, want in enumerate(expected, start=1):
        np.testing.assert_array_equal(signals[l], want, err_msg=f"x_{l}")
    if net == "mlp":  # Uniform blocks: every x_l is x_0 itself.
        np.testing.assert_array_equal(signals[-1], signals[0])


@pytest.mark.parametrize("net", sorted(NETS))
def test_first_gradient_reaches_only_the_scales_among_branch_parameters(net):
    fields, shape = NETS[net]
    model, variables, x = _init(fields, shape)
    labels = jnp.arange(shape[0]) % 10

    def loss(params):
        logits, _ = model.apply({"params": params}, x)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))

    grads = jax.tree_util.tree_flatten_with_path(jax.grad(loss)(variables["params"]))[0]
    in_blocks = [(jax.tree_util.keystr(p), g) for p, g in grads
                 if "stages_" in jax.tree_util.keystr(p)]
    scales = [g for p, g in in_blocks if "residual_scale" in p]
    branch = [(p, g) for p, g in in_blocks if "residual_scale" not in p and "proj" not in p]
    assert sum(np.size(g) for g in scales) == model.config.num_blocks
    assert all(np.all(np.asarray(g) != 0) for g in scales)
    for p, g in branch:
        np.testing.assert_array_equal(np.asarray(g), 0.0, err_msg=p)


def test_scale_gradient_is_the_branch_output_against_the_signal_gradient():
    """dL/dalpha_l = <dL/dx_l, F_l(x_{l-1})>, summed over the batch: F_l applied on its own."""
    fields, shape = NETS["mlp"]
    model, variables, x = _init(fields, shape, scan=False)
    _, signals = _signals(model, variables, x)

    def loss_of(params, perturbations=None):
        logits, _ = model.apply({"params": params}, x, perturbations=perturbations)
        return jnp.sum(jnp.sin(logits))  # Any smooth loss.

    zeros = tuple(jnp.zeros_like(s) for s in model.apply(variables, x)[1])
    g_params, g_signals = jax.grad(lambda p, z: loss_of(p, z), argnums=(0, 1))(
        variables["params"], zeros)
    g_signals = [g for segment in g_signals for g in np.asarray(segment)]
    segs = topology.segments(model.config)
    for l, seg in enumerate(segs, start=1):
        block_vars = variables["params"]
        for key in seg.path:
            block_vars = block_vars[key]
        unit = seg.block().clone(residual_scale=1.0, learnable_residual_scale=False)
        branch = unit.apply({"params": {k: v for k, v in block_vars.items()
                                        if k != "residual_scale"}}, signals[l - 1], False)
        branch = np.asarray(branch) - signals[l - 1]  # Identity shortcut: F_l = block - x.
        want = np.sum(g_signals[l] * branch)
        got = np.asarray(_get(g_params, seg.path)["residual_scale"])
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=f"alpha_{l}")


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def test_scanned_and_unrolled_skipinit_agree():
    fields, shape = NETS["cifar"]
    model_s, vars_s, x = _init(fields, shape, scan=True)
    model_u, _, _ = _init(fields, shape, scan=False)
    vars_u = models.unroll_variables(vars_s)
    logits_s, sig_s = _signals(model_s, vars_s, x)
    logits_u, sig_u = _signals(model_u, vars_u, x)
    np.testing.assert_allclose(logits_s, logits_u, rtol=1e-6, atol=1e-6)
    for l, (a, b) in enumerate(zip(sig_s, sig_u, strict=True)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6, err_msg=f"x_{l}")
