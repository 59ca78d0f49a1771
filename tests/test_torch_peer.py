"""The PyTorch peer of the benchmarks (benchmarks/torch_cifar_resnet.py) computes resflax's CIFAR
ResNets: same weights, same logits (float64, rtol 1e-10), in eval and in training mode, and the
same parameter count. Skipped where torch is not installed (CI)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from benchmarks import torch_cifar_resnet as peer  # noqa: E402
from resflax import build_model  # noqa: E402
from resflax.models import unroll_variables  # noqa: E402

RTOL, ATOL = 1e-10, 1e-12  # ATOL only guards logits that happen to sit near 0.


def _fields(block, depth, width, dtype):
    return dict(family="cifar_resnet", block=block, depth=depth, width=width, dtype=dtype,
                param_dtype=dtype)


def _random_variables(model, seed):
    """Variables of `model`'s layout (from `jax.eval_shape`, so no initializer is compiled) with
    every entry random: He-scaled conv/dense kernels, BN scales near 1 and biases near 0 (exact
    1 and 0 would hide a swapped or misplaced tensor), running mean near 0.3 and running
    variance near 1.3 (non-trivial, so eval mode really uses them), dense-head bias near 0."""
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3), model.config.param_dtype),
                           train=False)
    )
    rs = np.random.RandomState(seed)

    def fill(path, leaf):
        name, shape, dtype = path[-1].key, leaf.shape, leaf.dtype
        if name == "kernel":
            fan_in = np.prod(shape[-4:-1]) if len(shape) >= 4 else shape[-2]
            value = rs.randn(*shape) * np.sqrt(2.0 / fan_in)
        elif name == "scale":
            value = 1.0 + 0.1 * rs.randn(*shape)
        elif name == "bias":
            value = 0.1 * rs.randn(*shape)
        elif name == "mean":
            value = 0.3 + 0.1 * rs.randn(*shape)
        else:
            assert name == "var", path
            value = 1.3 + 0.1 * rs.rand(*shape)
        return np.asarray(value, dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def _bn_inputs_counts(model):
    """Forward hooks recording, per BatchNorm2d, the number of values per channel it saw."""
    counts = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.register_forward_hook(
                lambda mod, inputs, output, name=name: counts.__setitem__(
                    name, inputs[0].numel() // inputs[0].shape[1]
                )
            )
    return counts


@pytest.mark.parametrize("block,depth", [("plain", 14), ("v1", 14), ("v1", 8), ("v2", 14)])
def test_same_logits_as_resflax_float64(block, depth):
    with jax.enable_x64(True):
        model = build_model(_fields(block, depth, 4, "float64"))
        variables = _random_variables(model, seed=depth)
        x = np.random.RandomState(0).randn(4, 8, 8, 3)  # NHWC, float64
        eval_logits, _ = model.apply(variables, jnp.asarray(x), train=False)
        (train_logits, _), updates = model.apply(
            variables, jnp.asarray(x), train=True, mutable=["batch_stats"]
        )
        eval_logits, train_logits = np.asarray(eval_logits), np.asarray(train_logits)
        old_stats = list(peer._flatten(unroll_variables(variables)["batch_stats"]))
        new_stats = dict(peer._flatten(unroll_variables(updates)["batch_stats"]))

    net = peer.CifarResNet(block, depth, width=4).double()
    peer.load_resflax_variables(net, variables)
    counts = _bn_inputs_counts(net)
    x_t = torch.from_numpy(x).permute(0, 3, 1, 2)  # NCHW
    with torch.no_grad():
        net.eval()
        np.testing.assert_allclose(net(x_t).numpy(), eval_logits, rtol=RTOL, atol=ATOL)
        net.train()
        np.testing.assert_allclose(net(x_t).numpy(), train_logits, rtol=RTOL, atol=ATOL)

    # Running averages: both m <- 0.9 m + 0.1 batch_value; torch's variance is the unbiased one.
    buffers = dict(net.named_buffers())
    assert len(counts) == len(new_stats) // 2
    for path, old in old_stats:
        name = peer._torch_name("batch_stats", path)
        old, new, got = np.asarray(old), np.asarray(new_stats[path]), buffers[name].numpy()
        if path[-1] == "mean":
            np.testing.assert_allclose(got, new, rtol=RTOL, atol=ATOL, err_msg=name)
        else:
            n = counts[name.rsplit(".", 1)[0]]
            biased = (got - 0.9 * old) * (n - 1) / n + 0.9 * old
            np.testing.assert_allclose(biased, new, rtol=RTOL, atol=ATOL, err_msg=name)


@pytest.mark.parametrize("block", ["plain", "v1", "v2"])
def test_parameter_count_matches_resflax(block):
    model = build_model(_fields(block, 20, 16, "float32"))
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
    )
    resflax_count = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes["params"]))
    torch_count = sum(p.numel() for p in peer.CifarResNet(block, 20, 16).parameters())
    assert torch_count == resflax_count
    if block == "v1":
        assert torch_count == 269_722  # He et al. 2015's ResNet-20: 0.27M.


def test_train_step_channels_last_float32():
    model = build_model(_fields("v1", 8, 4, "float32"))
    variables = _random_variables(model, seed=0)
    net = peer.CifarResNet("v1", 8, width=4)
    peer.load_resflax_variables(net, variables)
    net = net.to(memory_format=torch.channels_last)
    before = net.stem_layer.weight.detach().clone()
    rs = np.random.RandomState(1)
    images = torch.from_numpy(rs.randn(4, 3, 8, 8).astype(np.float32)).to(
        memory_format=torch.channels_last
    )
    labels = torch.from_numpy(rs.randint(0, 10, 4))
    reference = peer.CifarResNet("v1", 8, width=4)
    peer.load_resflax_variables(reference, variables)
    with torch.no_grad():  # channels_last changes the layout only, not the function.
        np.testing.assert_allclose(
            net.eval()(images).numpy(), reference.eval()(images.contiguous()).numpy(),
            rtol=1e-5, atol=1e-6,
        )
    step = peer.make_train_step(net)
    loss = step(images, labels)
    assert loss.shape == () and bool(torch.isfinite(loss))
    assert not torch.equal(net.stem_layer.weight, before)
    assert all(p.grad is None for p in net.parameters())


def test_rejects_bad_depth_and_mismatched_variables():
    with pytest.raises(ValueError, match="6n\\+2"):
        peer.CifarResNet("v1", 10)
    with pytest.raises(ValueError, match="block="):
        peer.CifarResNet("v3", 8)
    model = build_model(_fields("v1", 14, 4, "float32"))
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)), train=False)
    )
    variables = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
    with pytest.raises(ValueError, match="no torch counterpart"):
        peer.load_resflax_variables(peer.CifarResNet("v1", 8, width=4), variables)
    with pytest.raises(ValueError, match="no resflax variable"):
        peer.load_resflax_variables(peer.CifarResNet("v1", 20, width=4), variables)
    with pytest.raises(ValueError, match="shape mismatch"):
        peer.load_resflax_variables(peer.CifarResNet("v1", 14, width=8), variables)
