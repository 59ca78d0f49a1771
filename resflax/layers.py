"""Registries of activations, initializers and normalizations (user-facing name -> callable).

Every axis of variation the models expose is one dict here, so a reader finds every valid name in
one place, and an unknown name raises a `ValueError` that lists the valid ones.

Conventions:
- `weight_scale` (sigma_w) is a multiplicative gain on the standard deviation of *every*
  initializer: `normal` draws `W ~ N(0, sigma_w^2 / fan_in)` (the mean-field convention of
  Poole et al. 2016), `he_normal` draws `N(0, 2 sigma_w^2 / fan_in)`, `orthogonal` is an
  orthogonal matrix times `sigma_w`, and so on. `fan_in` of a conv kernel `[kh, kw, c_in, c_out]`
  is `kh * kw * c_in`.
- Normal initializers are untruncated Gaussians (He et al. 2015 and mean-field theory assume
  Gaussian weights; a truncated normal would change the variance).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from resflax import conv as conv_lib

Array = jax.Array
Initializer = Callable[..., Array]


def lookup(registry: Mapping[str, Any], name: str, field: str) -> Any:
    """Returns `registry[name]`, or raises a ValueError naming `field` and the allowed names.

    Args:
      registry: a mapping of user-facing names, e.g. `ACTIVATIONS`, `INITIALIZERS`, `NORMS`.
      name: the name to look up; anything that is not a key of `registry` (a non-string
        included) is an error.
      field: the model field the name came from, used in the error message (e.g. 'activation').

    Returns:
      `registry[name]`.

    Raises:
      ValueError: `name` is not in `registry`; the message names `field` and lists the sorted
        allowed names.
    """
    if not isinstance(name, str) or name not in registry:
        raise ValueError(f"{field}={name!r} is not supported; allowed values: {sorted(registry)}")
    return registry[name]


# --------------------------------------------------------------------------------------------
# Activations: elementwise, jax-differentiable (theory.py integrates them by panelled
# Gauss-Legendre quadrature).

ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "identity": lambda x: x,
    "relu": jax.nn.relu,
    "leaky_relu": functools.partial(jax.nn.leaky_relu, negative_slope=0.01),
    "elu": jax.nn.elu,
    "selu": jax.nn.selu,
    # Exact GELU x * Phi(x), not the tanh approximation, so theory and model agree exactly.
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "swish": jax.nn.swish,
    "softplus": jax.nn.softplus,
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
    "erf": jax.scipy.special.erf,
}


def activation(name: str) -> Callable[[Array], Array]:
    """The activation `phi` registered as `name` in `ACTIVATIONS`.

    Args:
      name: one of `ACTIVATIONS` ('identity', 'relu', 'leaky_relu' (slope 0.01), 'elu',
        'selu', 'gelu' (exact, `x Phi(x)`), 'swish', 'softplus', 'tanh', 'sigmoid', 'erf').

    Returns:
      An elementwise, jax-differentiable function: array of any shape -> array of that shape.

    Raises:
      ValueError: unknown name (the message lists the allowed ones).
    """
    return lookup(ACTIVATIONS, name, "activation")


# --------------------------------------------------------------------------------------------
# Initializers: `make(weight_scale) -> init(key, shape, dtype)`.


def _fans(shape) -> tuple[int, int]:
    """(fan_in, fan_out) of a dense `[in, out]` or conv `[*window, in, out]` kernel."""
    receptive = math.prod(shape[:-2])
    return shape[-2] * receptive, shape[-1] * receptive


def _variance_scaling(factor: float, mode: str, distribution: str) -> Callable[[float], Initializer]:
    def make(weight_scale: float) -> Initializer:
        return nn.initializers.variance_scaling(
            factor * weight_scale**2, mode, distribution, in_axis=-2, out_axis=-1
        )

    return make


def _orthogonal(weight_scale: float) -> Initializer:
    """Orthogonal rows or columns of `reshape(kernel, [-1, out])`, times the gain sigma_w.

    The QR runs in float32 at least and is cast to `dtype` (XLA:CPU has no bfloat16/float16 QR).
    """
    orthogonal = nn.initializers.orthogonal(scale=weight_scale, column_axis=-1)

    def init(key, shape, dtype=jnp.float32):
        return orthogonal(key, shape, jnp.promote_types(dtype, jnp.float32)).astype(dtype)

    return init


def _delta_orthogonal(weight_scale: float) -> Initializer:
    """Delta-orthogonal conv kernel (Xiao et al. 2018, Algorithm 2).

    Zero everywhere except the spatial centre tap, which is a (semi-)orthogonal `[in, out]`
    matrix times sigma_w, so the conv is an orthogonal map at init. Unlike
    `jax.nn.initializers.delta_orthogonal` it allows `in > out` (bottleneck reductions, whose
    centre matrix then has orthonormal columns). A dense kernel gets a plain orthogonal matrix.
    """
    orthogonal = _orthogonal(weight_scale)

    def init(key, shape, dtype=jnp.float32):
        if len(shape) == 2:
            return orthogonal(key, shape, dtype)
        centre = tuple(k // 2 for k in shape[:-2])
        kernel = jnp.zeros(shape, dtype)
        return kernel.at[centre].set(orthogonal(key, shape[-2:], dtype))

    return init


def _scaled_delta_orthogonal(weight_scale: float) -> Initializer:
    """DKS's SUO-Delta kernel (Martens et al. 2021, "Parameter distributions"; the reference's
    `ScaledUniformOrthogonal(delta=True)`): `_delta_orthogonal` times max(1, sqrt(out / in)).

    The correction makes a widening layer keep q: with a `[in, out]` centre tap K = g R,
    R R^T = I_in, g^2 = out / in, each pixel's `y = x K` has ||y||^2 / out = ||x||^2 / in, and
    inner products scale alike, so the per-pixel kernel (q and c) passes unchanged. A
    narrowing layer (in > out: orthonormal columns) keeps q only in expectation over the
    direction of x. A dense kernel gets the same rescaled orthogonal matrix.
    """
    delta_orthogonal = _delta_orthogonal(weight_scale)

    def init(key, shape, dtype=jnp.float32):
        correction = max(1.0, math.sqrt(shape[-1] / shape[-2]))
        kernel = delta_orthogonal(key, shape, jnp.promote_types(dtype, jnp.float32))
        return (kernel * correction).astype(dtype)

    return init


INITIALIZERS: dict[str, Callable[[float], Initializer]] = {
    "normal": _variance_scaling(1.0, "fan_in", "normal"),
    "he_normal": _variance_scaling(2.0, "fan_in", "normal"),
    "he_uniform": _variance_scaling(2.0, "fan_in", "uniform"),
    "glorot_normal": _variance_scaling(1.0, "fan_avg", "normal"),
    "glorot_uniform": _variance_scaling(1.0, "fan_avg", "uniform"),
    "lecun_normal": _variance_scaling(1.0, "fan_in", "normal"),
    "orthogonal": _orthogonal,
    "delta_orthogonal": _delta_orthogonal,
    "scaled_delta_orthogonal": _scaled_delta_orthogonal,
    "zeros": lambda weight_scale: nn.initializers.zeros,
}


def initializer(name: str, weight_scale: float = 1.0) -> Initializer:
    """The kernel initializer registered as `name` in `INITIALIZERS`, with gain sigma_w.

    `weight_scale` multiplies the standard deviation of every initializer: `normal` draws
    `W ~ N(0, sigma_w^2 / fan_in)`, `he_normal` `N(0, 2 sigma_w^2 / fan_in)`, `glorot_normal`
    `N(0, 2 sigma_w^2 / (fan_in + fan_out))`, the uniform variants have the same variances,
    `orthogonal` / `delta_orthogonal` are (semi-)orthogonal times sigma_w,
    `scaled_delta_orthogonal` is `delta_orthogonal` times max(1, sqrt(out / in)) (q-preserving
    when widening; DKS's SUO-Delta), `zeros` is 0. For a
    kernel `[*window, in, out]`, `fan_in = prod(window) * in` and `fan_out = prod(window) * out`.

    Args:
      name: one of `INITIALIZERS` (the model field `init`).
      weight_scale: sigma_w, the gain on the standard deviation.

    Returns:
      A flax initializer `init(key, shape, dtype=float32) -> array of that shape`, for a dense
      `[in, out]` or conv `[kh, kw, in, out]` kernel.

    Raises:
      ValueError: unknown name (the message lists the allowed ones).
    """
    return lookup(INITIALIZERS, name, "init")(weight_scale)


def bias_initializer(bias_scale: float) -> Initializer:
    """`b ~ N(0, sigma_b^2)`; exactly zero when sigma_b = 0.

    Args:
      bias_scale: sigma_b, the standard deviation of the bias.

    Returns:
      A flax initializer `init(key, shape, dtype) -> array`: zeros when `bias_scale == 0`, else
      independent `N(0, bias_scale^2)` entries.
    """
    if bias_scale == 0:
        return nn.initializers.zeros
    return nn.initializers.normal(stddev=bias_scale)


# --------------------------------------------------------------------------------------------
# Normalizations. Each takes `(x, train)` and normalizes over all axes but the last (features).


@functools.partial(jax.custom_jvp, nondiff_argnums=(3, 4))
def batch_norm_train(x: Array, scale: Array, bias: Array, epsilon: float, dtype: Any
                     ) -> tuple[Array, Array, Array]:
    """Training-mode batch norm over all axes but the last: `(y, mean, var)`.

    `y = (x - mean) * rsqrt(var + epsilon) * scale + bias` in `dtype`, with `mean`, `var` the
    per-channel batch mean and biased variance, in float32 at least.

    Its derivative is the closed form, not autodiff through the two-pass variance: with
    `xhat = (x - mean) r`, `r = rsqrt(var + epsilon)` and `<.>` the mean over all axes but the
    last,
        dy    = scale r (dx - <dx> - xhat <xhat dx>) + dscale xhat + dbias,
        dmean = <dx>,   dvar = 2 <xhat dx> / r.
    It is linear in the tangents, so forward mode, reverse mode (its transpose is the textbook
    backward pass, `dx = scale r (g - <g> - xhat <xhat g>)`: two reductions) and their
    compositions all work. Why: autodiff through the two-pass variance gives the same numbers
    by a longer computation, and a scanned stack of blocks paid for it on CPU: with this rule
    the scanned CIFAR train step is 6-14% faster, unrolled unchanged
    (`benchmarks.batch_norm_grad`).

    Args:
      x: `[..., C]`.
      scale, bias: `[C]`.
      epsilon: added to the variance.
      dtype: the dtype of `y`.

    Returns:
      `y` `[..., C]` (dtype), `mean` `[C]`, `var` `[C]`.
    """
    return _batch_norm_forward(x, scale, bias, epsilon, dtype)


def _batch_stats(x: Array) -> tuple[Array, Array]:
    """Per-channel mean and biased (two-pass) variance over all axes but the last, in float32
    at least, whatever the compute dtype."""
    axes = tuple(range(x.ndim - 1))
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    mean = jnp.mean(xf, axes)
    return mean, jnp.mean(jnp.square(xf - mean), axes)


def _normalize(x, mean, var, scale, bias, epsilon, dtype) -> Array:
    mul = (jax.lax.rsqrt(var + epsilon) * scale).astype(dtype)
    return (x - mean.astype(dtype)) * mul + bias.astype(dtype)


def _batch_norm_forward(x, scale, bias, epsilon, dtype):
    mean, var = _batch_stats(x)
    return _normalize(x, mean, var, scale, bias, epsilon, dtype), mean, var


@batch_norm_train.defjvp
def _batch_norm_train_jvp(epsilon, dtype, primals, tangents):
    x, scale, bias = primals
    dx, dscale, dbias = tangents
    y, mean, var = _batch_norm_forward(x, scale, bias, epsilon, dtype)
    axes = tuple(range(x.ndim - 1))
    r = jax.lax.rsqrt(var + epsilon)
    stat = r.dtype
    xhat = (x.astype(stat) - mean) * r
    dxf = dx.astype(stat)
    dmean = jnp.mean(dxf, axes)
    proj = jnp.mean(xhat * dxf, axes)
    dy = ((dxf - dmean - xhat * proj) * (r * scale) + xhat * dscale + dbias).astype(y.dtype)
    return (y, mean, var), (dy, dmean, 2 * proj / r)


class BatchNorm(nn.Module):
    """Batch normalization over all axes but the last, with running statistics for eval.

    `y = (x - mean) / sqrt(var + epsilon) * scale + bias`, where in training mode mean and var
    are taken over the batch (and space) of `x`, and in eval mode the running averages
    `batch_stats/{mean,var}` (updated as `m <- momentum m + (1 - momentum) batch_value` in
    training mode whenever `batch_stats` is mutable) are used instead.

    Under `jax.jit` with a batch sharded over a device mesh the batch statistics are those of
    the *global* batch: the mean is a reduction over a sharded axis, which XLA all-reduces.

    `freeze_stats=True` wraps the batch statistics in `stop_gradient`: the map from a batch to
    its normalized output then acts on each example separately (block-diagonal Jacobian), which
    is how per-example Jacobians with batch norm are defined (docs/design.md, Diagnostics).

    Running variance: training normalizes with the biased batch variance (divide by n, the
    number of values per channel, batch x space) in every framework. What goes into the running
    average differs: flax and this default (`unbiased_running_var=False`) feed that same biased
    variance; Torch7 -- the papers' code, fb.resnet.torch -- and PyTorch feed the unbiased one,
    `n / (n - 1)` times larger (`unbiased_running_var=True`; 0.7-2.2% apart after one step at
    small batch, negligible at CIFAR's n = 128 x 32 x 32). Only eval-mode outputs see it.
    """

    momentum: float = 0.9
    epsilon: float = 1e-5
    scale_init: Initializer = nn.initializers.ones
    freeze_stats: bool = False
    unbiased_running_var: bool = False
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        features = x.shape[-1]
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), self.param_dtype)
        ra_var = self.variable("batch_stats", "var", jnp.ones, (features,), self.param_dtype)
        scale = self.param("scale", self.scale_init, (features,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (features,), self.param_dtype)
        dtype = self.dtype or x.dtype
        if not train:
            return _normalize(x, ra_mean.value, ra_var.value, scale, bias, self.epsilon, dtype)
        if self.freeze_stats:
            mean, var = _batch_stats(x)
            y = _normalize(x, *jax.lax.stop_gradient((mean, var)), scale, bias, self.epsilon,
                           dtype)
        else:  # The closed-form derivative (`batch_norm_train`).
            y, mean, var = batch_norm_train(x, scale, bias, self.epsilon, dtype)
        if not self.is_initializing() and self.is_mutable_collection("batch_stats"):
            m = self.momentum
            ra_mean.value = m * ra_mean.value + (1 - m) * jax.lax.stop_gradient(mean)
            count = math.prod(x.shape[:-1])
            correction = count / max(count - 1, 1) if self.unbiased_running_var else 1.0
            ra_var.value = m * ra_var.value + (1 - m) * correction * jax.lax.stop_gradient(var)
        return y


class GroupNorm(nn.Module):
    """Per-example normalization over groups of channels (and all spatial positions).

    `num_groups=1` is layer norm over every feature of an example, `(C,)` or `(H, W, C)`, with a
    per-channel affine. Uses the largest divisor of the channel count not above `num_groups`
    (so 32 groups on 16 channels means 16 groups).
    """

    num_groups: int = 32
    epsilon: float = 1e-5
    scale_init: Initializer = nn.initializers.ones
    freeze_stats: bool = False  # Per-example already: nothing couples examples.
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        del train  # Same computation in both modes.
        channels = x.shape[-1]
        groups = max(g for g in range(1, min(self.num_groups, channels) + 1) if channels % g == 0)
        return nn.GroupNorm(
            num_groups=groups,
            epsilon=self.epsilon,
            scale_init=self.scale_init,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )(x)


class NoNorm(nn.Module):
    """The identity: `norm='none'`."""

    scale_init: Initializer = nn.initializers.ones
    freeze_stats: bool = False
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def __call__(self, x: Array, train: bool) -> Array:
        del train
        return x


# Running-variance conventions of batch norm (see `BatchNorm`): the model field `bn_running_var`.
BN_RUNNING_VARS = ("biased", "unbiased")

NORMS: dict[str, Callable[..., nn.Module]] = {
    "none": NoNorm,
    "batch": BatchNorm,
    "layer": functools.partial(GroupNorm, num_groups=1),
    "group": GroupNorm,
}


def norm(name: str) -> Callable[..., nn.Module]:
    """The normalization registered as `name` in `NORMS`.

    Args:
      name: 'none' (`NoNorm`, the identity), 'batch' (`BatchNorm`), 'layer' (`GroupNorm` with
        one group: every feature of an example) or 'group' (`GroupNorm`).

    Returns:
      A Module constructor; its instances are called as `(x, train) -> y`, `y` of the shape of
      `x` (`[B, features]` or `[B, H, W, features]`): batch norm per feature over the batch (and
      space), layer and group norm per example over (groups of) features and space, each with
      a per-feature affine `scale`, `bias`.

    Raises:
      ValueError: unknown name (the message lists the allowed ones).
    """
    return lookup(NORMS, name, "norm")


# --------------------------------------------------------------------------------------------
# Convolution: the one conv layer of every block and stem.


class ScalarShift(nn.Module):
    """`x + b` with one learnable scalar `bias` (init 0): Fixup's biases (Zhang et al. 2019)."""

    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        bias = self.param("bias", nn.initializers.zeros, (), self.param_dtype)
        return x + bias.astype(self.dtype or x.dtype)


def standardize_kernel(kernel: Array, gain: Array, epsilon: float = 1e-4) -> Array:
    """Scaled weight standardization (Brock, De & Smith 2021, eq. 7; deepmind nfnets' WSConv2D).

    `W_hat = gain * (W - mean(W)) / (std(W) sqrt(N))`, the mean and (biased) std taken per
    output unit over its fan-in (every axis but the last), `N = fan_in`. So each unit's row has
    zero mean and `sum W_hat^2 = gain^2`: for inputs of variance v, independent across the
    fan-in, the output variance is `gain^2 v` whatever their mean (zero-mean rows cancel it).
    `var * N` is floored at `epsilon` (the reference's), so an all-zero kernel stays 0.

    Args:
      kernel: `[in, out]` or `[kh, kw, in, out]`.
      gain: `[out]`.
    Returns:
      `W_hat`, the shape of `kernel`.
    """
    axes = tuple(range(kernel.ndim - 1))
    fan_in = math.prod(kernel.shape[:-1])
    mean = jnp.mean(kernel, axes, keepdims=True)
    var = jnp.var(kernel, axes, keepdims=True)
    return (kernel - mean) * jax.lax.rsqrt(jnp.maximum(var * fan_in, epsilon)) * gain


class StandardizedDense(nn.Module):
    """Dense layer with a scaled-weight-standardized kernel (`standardize_kernel`): `x [B, in]
    -> [B, features]`; parameters `kernel [in, features]`, `gain [features]` (init 1), `bias`."""

    features: int
    use_bias: bool = True
    kernel_init: Initializer = nn.initializers.lecun_normal()
    bias_init: Initializer = nn.initializers.zeros
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features),
                            self.param_dtype)
        gain = self.param("gain", nn.initializers.ones, (self.features,), self.param_dtype)
        bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype)
                if self.use_bias else None)
        # Standardized in the parameter dtype (float32 by default), then cast to compute.
        kernel = standardize_kernel(kernel, gain)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        y = x @ kernel
        return y if bias is None else y + bias


class Conv(nn.Module):
    """2-D convolution, NHWC input and HWIO kernel: `x [B, H, W, C_in] -> [B, H', W', features]`.

    The same parameters as `flax.linen.Conv` (`kernel [kh, kw, C_in, features]`, optional `bias
    [features]`) and the same numbers; the convolution is `resflax.conv.conv2d`, whose
    derivatives of every order stay canonical convolutions, so that XLA:CPU runs them on its fast
    kernels inside `nn.scan` and the diagnostics' loops too. `impl`: 'auto' (that convolution on
    CPU, on oneDNN by size where installed; `lax.conv_general_dilated` on GPU/TPU), 'onednn',
    'canonical' or 'xla'.

    `standardize=True`: scaled weight standardization (`standardize_kernel`) with a learnable
    per-output gain `gain [features]` (init 1), the NF-ResNets' WSConv2D.
    """

    features: int
    kernel_size: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    padding: tuple[tuple[int, int], tuple[int, int]] = ((0, 0), (0, 0))
    use_bias: bool = True
    kernel_init: Initializer = nn.initializers.lecun_normal()
    bias_init: Initializer = nn.initializers.zeros
    impl: str = "auto"
    standardize: bool = False
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        shape = (*self.kernel_size, x.shape[-1], self.features)
        kernel = self.param("kernel", self.kernel_init, shape, self.param_dtype)
        if self.standardize:
            gain = self.param("gain", nn.initializers.ones, (self.features,), self.param_dtype)
            kernel = standardize_kernel(kernel, gain)
        bias = (
            self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias
            else None
        )
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        y = conv_lib.conv2d(x, kernel, self.strides, self.padding, impl=self.impl)
        if bias is not None:
            y = y + bias
        return y
