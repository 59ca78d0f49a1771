"""Stems, one per family (`STEMS`, a registry like `layers.NORMS`): `inputs -> x_0`.

Each is a module of the `ModelConfig` that builds it (and `freeze_norm_stats`); its variables sit
under `stem/` (`stem/layer` the dense or conv layer, `stem/norm` its norm where it has one).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax

from resflax import kernel_shaping, layers
from resflax.config import DTYPES, ModelConfig

Array = jax.Array


def layer_kit(config: ModelConfig, freeze_norm_stats: bool = False) -> dict:
    """The callables every layer shares: activation, norm factory, initializers, dtypes.

    The activation is the registry's phi, or its kernel-shaping transform phi_hat
    (`config.activation_transform`), so every block and stem applies the same one.
    """
    norm_extra = {"unbiased_running_var": config.bn_running_var == "unbiased"} if (
        config.norm == "batch") else {}
    return dict(
        activation=kernel_shaping.activation_for(config),
        norm=functools.partial(layers.norm(config.norm), freeze_stats=freeze_norm_stats,
                               **norm_extra),
        kernel_init=layers.initializer(config.init, config.weight_scale),
        bias_init=layers.bias_initializer(config.bias_scale),
        use_bias=config.norm == "none",
        dtypes=dict(dtype=DTYPES[config.dtype], param_dtype=DTYPES[config.param_dtype]),
    )


class DenseStem(nn.Module):
    """MLP stem: `x_0 = W x + b` on the flattened input `[B, ...] -> [B, width]` (`W`
    weight-standardized for block='nf', so unit-variance inputs give `Var(x_0) = 1`)."""

    config: ModelConfig
    freeze_norm_stats: bool = False

    @nn.compact
    def __call__(self, inputs: Array, train: bool) -> Array:
        del train
        kit = layer_kit(self.config, self.freeze_norm_stats)
        dense_cls = layers.StandardizedDense if self.config.block == "nf" else nn.Dense
        dense = dense_cls(self.config.width, kernel_init=kit["kernel_init"],
                          bias_init=kit["bias_init"], name="layer", **kit["dtypes"])
        return dense(inputs.reshape(inputs.shape[0], -1))


class ConvStem(nn.Module):
    """Conv stem `[B, H, W, C] -> [B, H', W', width]`: conv (3x3/1 CIFAR, 7x7/2 ImageNet) -
    norm - act, then max-pool 3x3/2 for ImageNet.

    He et al. 2016's pre-activation CIFAR nets have a bare conv (the first unit activates it
    before splitting, `_first_preact`); every ImageNet stem has conv-norm-act-maxpool (for v2
    that is the first unit's pre-activation). See docs/architecture.md.

    block='nf': a weight-standardized conv, no activation (the first block's `g(x / beta)` is
    it), then the ImageNet max-pool: the reference NF-ResNet's stem.
    """

    config: ModelConfig
    freeze_norm_stats: bool = False

    @nn.compact
    def __call__(self, inputs: Array, train: bool) -> Array:
        config = self.config
        kit = layer_kit(config, self.freeze_norm_stats)
        imagenet = config.family == "imagenet_resnet"
        kernel, strides = (7, 2) if imagenet else (3, 1)
        pad = kernel // 2
        x = layers.Conv(
            config.width, (kernel, kernel), strides=(strides, strides),
            padding=((pad, pad), (pad, pad)), use_bias=kit["use_bias"], impl=config.conv_impl,
            standardize=config.block == "nf",
            kernel_init=kit["kernel_init"], bias_init=kit["bias_init"], name="layer",
            **kit["dtypes"],
        )(inputs)
        if config.block != "nf" and (imagenet or config.block != "v2"):
            x = kit["activation"](kit["norm"](name="norm", **kit["dtypes"])(x, train))
        if imagenet:
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        return x


STEMS: dict[str, type[nn.Module]] = {
    "mlp": DenseStem,
    "cifar_resnet": ConvStem,
    "imagenet_resnet": ConvStem,
}
