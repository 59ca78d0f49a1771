"""Plain, ResNet v1 (post-activation) and v2 (pre-activation) blocks: basic, bottleneck, dense.

All three kinds share one constructor, so a *plain twin* differs from its ResNet only in the
skip connection. With `W` a conv (3x3 basic; 1x1-3x3-1x1 bottleneck with 4x expansion and the
stride on the 3x3, He et al. 2016 / torchvision) or a dense layer, `N` the norm, `phi` the
activation and `alpha` the residual-branch scale:

    plain:  x -> phi(N(W_k ... phi(N(W_1 x))))                       (He et al. 2015, plain nets)
    v1:     x -> phi(s(x) + alpha * N(W_k ... phi(N(W_1 x))))         (He et al. 2015)
    v2:     x -> s'(x) + alpha * W_k phi(N( ... W_1 phi(N(x))))       (He et al. 2016, "identity")
    fixup:  x -> phi(s(x + a_1) + c * W_k(... phi(W_1(x + a_1) + b_1) ...) + b_k)
                                                                     (Zhang et al. 2019)
    nf:     x -> s''(x) + alpha * W^_k g(... W^_1 g(x / beta))        (Brock, De & Smith 2021)

Fixup (`kind='fixup'`, no norm): scalar biases `a_i` before every weight layer ("bias{i}a") and
`b_i` after it ("bias{i}b", before the activation; after the multiplier for the last layer), a
scalar multiplier `c` ("scale", init 1), all others init 0; the last layer is zero at init and
the others take the initializer times `L^(-1/(2m-2))` (`fixup_scale`), for `L` residual branches
of `m` layers. The shortcut sees `x + a_1`, as in the reference code (hongyi-zh/fixup).

NF (`kind='nf'`, no norm): `W^` are scaled-weight-standardized (`layers.standardize_kernel`),
`g = gamma * phi` with `gamma = 1 / std(phi(z))`, z ~ N(0, 1), so every branch layer keeps unit
variance; `beta` is the predicted std of `x` (an argument of the call, not a field, so scanned
blocks each get their own); a projection `s''` (shortcut 'B' on a shape change, or 'C') takes
`g(x / beta)`, like the v2 'shared' pre-activation and the reference (deepmind nfnets).

`s` is the shortcut: the identity when the shape is kept, else option `A` (stride-subsample and
zero-pad channels, no parameters, He et al.'s CIFAR nets) or `B` (1x1 projection, followed by the
norm in v1); option `C` projects in every block. In v2 a projection branches off *after* the first
`phi(N(x))`, keeping the identity path free of any norm or activation. The first v2 block of a
stage (`preact='shared'`) applies `phi(N(x))` before splitting, so that its shortcut carries it
too: He et al. 2016, appendix ("for the first Residual Unit (that follows a stand-alone
convolutional layer, conv1), we adopt the first activation right after conv1 and before
splitting into two paths"), and the authors' code (fb.resnet.torch preresnet.lua,
'both_preact'; KaimingHe/resnet-1k-layers).

    v2, shared:  x -> s(phi(N(x))) + alpha * W_k ... W_1 phi(N(x))

A dense block with `layers_per_block=1`, `norm='none'` and `kind='plain'` is exactly
`x_l = phi(W_l x_{l-1} + b_l)`, the mean-field network of Poole et al. 2016.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from resflax import layers

Array = jax.Array

BLOCK_KINDS = ("plain", "v1", "v2", "fixup", "nf")
# Kinds that replace normalization: they need norm='none' (`config.ModelConfig`).
NORM_FREE_KINDS = ("fixup", "nf")
SHORTCUTS = ("A", "B", "C")
# Where a v2 block's pre-activation phi(N(x)) sits (fb.resnet.torch preresnet.lua's block types):
#   'residual' -- on the residual branch only; the shortcut takes the raw x (most blocks);
#   'shared'   -- before the split: the shortcut takes phi(N(x)) too ('both_preact': the first
#                 block of a stage, He et al. 2016 appendix);
#   'none'     -- no pre-activation, the input is already one ('no_preact': the first ImageNet
#                 block, after the stem's conv-BN-ReLU-maxpool).
PREACTS = ("residual", "shared", "none")
BOTTLENECK_EXPANSION = 4


def _scaled(init: layers.Initializer, factor: float) -> layers.Initializer:
    """`init` with every draw times `factor` (its standard deviation times `factor`)."""
    if factor == 1.0:
        return init

    def scaled(key, shape, dtype=jnp.float32):
        return (init(key, shape, dtype) * factor).astype(dtype)

    return scaled


def pad_shortcut(x: Array, features: int, strides: int) -> Array:
    """Option A: `x[:, ::s, ::s, :]`, zero channels appended up to `features` (no parameters)."""
    if strides != 1:
        x = x[:, ::strides, ::strides, :]
    extra = features - x.shape[-1]
    if extra < 0:
        raise ValueError(
            f"shortcut='A' cannot reduce features from {x.shape[-1]} to {features}; "
            "use shortcut='B' or 'C'"
        )
    if extra:
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, extra)])
    return x


class Block(nn.Module):
    """One plain / v1 / v2 block; `x: [B, H, W, C_in]` (conv) or `[B, C_in]` (dense).

    Output: `[B, H/strides, W/strides, out_features]` or `[B, out_features]`, where
    `out_features = width` (basic, dense) or `4 * width` (bottleneck).

    Attributes:
      kind: 'plain', 'v1' or 'v2'.
      width: channels of the branch's layers (inner width for a bottleneck).
      strides: spatial stride of the block (on the first 3x3 conv; 1 for dense blocks).
      dense: dense (MLP) layers instead of convolutions.
      bottleneck: 1x1-3x3-1x1 branch with 4x expansion instead of two 3x3 convs.
      layers_per_block: number of dense layers in the branch (dense blocks only).
      activation: elementwise nonlinearity phi.
      kernel_init, bias_init: initializers of every weight and bias.
      use_bias: biases on branch layers (True without normalization, as in mean-field nets).
      norm: normalization factory from `layers.NORMS`, called as `norm(scale_init=...)(x, train)`.
      shortcut: 'A', 'B' or 'C' (see module docstring).
      zero_init_residual: zero the last norm's scale (v1; Goyal et al. 2017) or, where the
        branch ends in a weight layer (v2, or no norm), that layer, so the branch is 0 at init.
      residual_scale: alpha, the branch multiplier (the initial value when learnable).
      learnable_residual_scale: alpha is a scalar parameter starting at `residual_scale`
        (SkipInit, De & Smith 2020, and ReZero, Bachlechner et al. 2020: starting at 0).
      conv_impl: convolution implementation, see `layers.Conv` ('auto', 'onednn', 'canonical', 'xla').
      preact: v2 only: 'residual', 'shared' or 'none', see `PREACTS`.
      num_branches: fixup only: L, the number of residual branches of the network.
      nf_alpha: nf only: alpha, the branch multiplier (a constant).
      nf_gamma: nf only: gamma, the activation's gain `1 / std(phi(z))`, z ~ N(0, 1).
    """

    kind: str
    width: int
    strides: int = 1
    dense: bool = False
    bottleneck: bool = False
    layers_per_block: int = 2
    activation: Callable[[Array], Array] = jax.nn.relu
    kernel_init: layers.Initializer = nn.initializers.he_normal()
    bias_init: layers.Initializer = nn.initializers.zeros
    use_bias: bool = False
    norm: Callable[..., nn.Module] = layers.BatchNorm
    shortcut: str = "B"
    zero_init_residual: bool = False
    residual_scale: float = 1.0
    learnable_residual_scale: bool = False
    conv_impl: str = "auto"
    preact: str = "residual"
    num_branches: int = 1
    nf_alpha: float = 0.2
    nf_gamma: float = 1.0
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @property
    def out_features(self) -> int:
        return self.width * (BOTTLENECK_EXPANSION if self.bottleneck else 1)

    def _layer_specs(self) -> list[tuple[int, int, int]]:
        """(kernel size, features, strides) of each weight layer of the branch."""
        if self.dense:
            return [(1, self.width, 1)] * self.layers_per_block
        if self.bottleneck:
            return [(1, self.width, 1), (3, self.width, self.strides), (1, self.out_features, 1)]
        return [(3, self.width, self.strides), (3, self.width, 1)]

    def _weight_layer(self, kernel: int, features: int, strides: int, zero: bool, name: str,
                      init_scale: float = 1.0):
        kernel_init = nn.initializers.zeros if zero else _scaled(self.kernel_init, init_scale)
        bias_init = nn.initializers.zeros if zero else self.bias_init
        # Fixup's scalar biases replace the layers' own; NF layers are weight-standardized.
        standardize = self.kind == "nf"
        common = dict(
            features=features,
            use_bias=self.use_bias and self.kind != "fixup",
            kernel_init=kernel_init,
            bias_init=bias_init,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )
        if self.dense:
            return layers.StandardizedDense(**common) if standardize else nn.Dense(**common)
        pad = kernel // 2
        return layers.Conv(
            kernel_size=(kernel, kernel),
            strides=(strides, strides),
            padding=((pad, pad), (pad, pad)),
            impl=self.conv_impl,
            standardize=standardize,
            **common,
        )

    def _norm(self, name: str, zero_scale: bool = False) -> nn.Module:
        scale_init = nn.initializers.zeros if zero_scale else nn.initializers.ones
        return self.norm(
            scale_init=scale_init, dtype=self.dtype, param_dtype=self.param_dtype, name=name
        )

    def _scalar(self, name: str, value: float) -> Array:
        """A learnable scalar starting at `value`, in the compute dtype, like every layer's
        parameters (promote_dtype): a float32 scalar would promote a bfloat16 block's output
        (and break nn.scan's carry)."""
        p = self.param(name, nn.initializers.constant(value), (), self.param_dtype)
        return p if self.dtype is None else p.astype(self.dtype)

    def fixup_scale(self) -> float:
        """Fixup's factor on the initializer of a branch's non-last layers: `L^(-1/(2m-2))`
        (Zhang et al. 2019, Algorithm 1 step 2); 1 for a one-layer branch (no such layers)."""
        m = len(self._layer_specs())
        return 1.0 if m < 2 else float(self.num_branches) ** (-1.0 / (2 * m - 2))

    def _alpha(self) -> Array | float:
        if self.learnable_residual_scale:
            return self._scalar("residual_scale", self.residual_scale)
        return self.residual_scale

    def _projection(self, x: Array) -> Array:
        return self._weight_layer(1, self.out_features, self.strides, False, "proj")(x)

    def _skip(self, x: Array, project: bool, reshapes: bool) -> Array:
        """The shortcut of a norm-free kind: projection, option A, or the identity."""
        if project:
            return self._projection(x)
        if reshapes:
            return pad_shortcut(x, self.out_features, self.strides)
        return x

    def _fixup(self, x: Array, specs, project: bool, reshapes: bool) -> Array:
        """Zhang et al. 2019, Figure 1 (right) / the reference's FixupBasicBlock, m layers."""
        last, scale = len(specs) - 1, self.fixup_scale()
        x = x + self._scalar("bias1a", 0.0)  # The shortcut sees the shifted input too.
        h = x
        for i, (k, f, s) in enumerate(specs):
            if i > 0:
                h = h + self._scalar(f"bias{i + 1}a", 0.0)
            h = self._weight_layer(k, f, s, i == last, f"w_{i}", init_scale=scale)(h)
            if i < last:
                h = self.activation(h + self._scalar(f"bias{i + 1}b", 0.0))
        h = h * self._scalar("scale", 1.0) + self._scalar(f"bias{last + 1}b", 0.0)
        return self.activation(self._skip(x, project, reshapes) + h)

    def _nf(self, x: Array, beta, specs, project: bool) -> Array:
        """Brock, De & Smith 2021, Figure 2 / the reference's NFResBlock (no skip gain)."""
        if beta is None:
            raise ValueError("block kind 'nf' needs beta, the predicted std of its input")
        beta = jnp.asarray(beta, x.dtype)
        act = lambda h: self.activation(h) * jnp.asarray(self.nf_gamma, h.dtype)
        preact = act(x / beta)
        h = preact
        for i, (k, f, s) in enumerate(specs):
            if i > 0:
                h = act(h)
            h = self._weight_layer(k, f, s, self.zero_init_residual and i == len(specs) - 1,
                                   f"w_{i}")(h)
        # Option A is refused by the config: h has unit variance, zero channels would not.
        skip = self._projection(preact) if project else x
        return skip + jnp.asarray(self.nf_alpha, h.dtype) * h

    @nn.compact
    def __call__(self, x: Array, train: bool, beta: Array | float | None = None) -> Array:
        """`beta`: kind 'nf' only (a scalar, the predicted std of `x`); ignored otherwise."""
        specs = self._layer_specs()
        last = len(specs) - 1
        has_norm = self.norm is not layers.NoNorm
        reshapes = self.strides != 1 or x.shape[-1] != self.out_features
        project = self.shortcut == "C" or (self.shortcut == "B" and reshapes)
        if self.kind == "fixup":
            return self._fixup(x, specs, project, reshapes)
        if self.kind == "nf":
            return self._nf(x, beta, specs, project)

        if self.kind == "v2":
            if self.preact == "none":
                preact = x
            else:
                preact = self.activation(self._norm("norm_0")(x, train))
            if self.preact != "residual":
                x = preact  # The shortcut branches off after the pre-activation.
            h = preact
            for i, (k, f, s) in enumerate(specs):
                if i > 0:
                    h = self.activation(self._norm(f"norm_{i}")(h, train))
                h = self._weight_layer(k, f, s, self.zero_init_residual and i == last, f"w_{i}")(h)
            if project:
                skip = self._projection(preact)
            elif reshapes:
                skip = pad_shortcut(x, self.out_features, self.strides)
            else:
                skip = x
            return skip + self._alpha() * h

        h = x
        for i, (k, f, s) in enumerate(specs):
            zero_last = self.zero_init_residual and i == last
            h = self._weight_layer(k, f, s, zero_last and not has_norm, f"w_{i}")(h)
            h = self._norm(f"norm_{i}", zero_scale=zero_last and has_norm)(h, train)
            if i < last:
                h = self.activation(h)
        if self.kind == "plain":
            return self.activation(h)
        if project:
            skip = self._norm("proj_norm")(self._projection(x), train)
        elif reshapes:
            skip = pad_shortcut(x, self.out_features, self.strides)
        else:
            skip = x
        return self.activation(skip + self._alpha() * h)
