"""`ModelConfig`: the one description of a network, from configs and flags to modules and theory.

    ModelConfig(family="cifar_resnet", depth=56)          # He et al.'s ResNet-56 (v1, BN, A)
    ModelConfig(family="mlp", block="v2", depth=100, width=64, norm="batch")

A frozen, typed dataclass. Every field left at `None` takes its *family's* default
(`FAMILY_DEFAULTS`) in `__post_init__`, so choosing a family gives that family's net for every
field not set; then every field is validated (a `ValueError` naming the field and the allowed
values). The same object builds the module (`resflax.models.Network(config)`), plans its
topology (`resflax.topology.segments(config)`), feeds `resflax.theory.predict` and is what the apps
and configs carry, as a `ml_collections.ConfigDict` (`config_dict`, `from_config_dict`) or JSON
(`to_dict`, `from_dict`).

On the command line (`--config.model.<field>=...`) every field is a typed placeholder: unset
fields stay `None` and resolve by family, which is how `--config.model.family=cifar_resnet
--config.model.depth=56` is ResNet-56 in every app (`experiments.common.model_config` drops the
config file's other model fields when the family changes).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_dict as ml_config_dict

from resflax import checks, conv, layers
from resflax.blocks import BLOCK_KINDS, NORM_FREE_KINDS, SHORTCUTS

FAMILIES = ("mlp", "cifar_resnet", "imagenet_resnet")
DTYPES = {
    "float32": jnp.float32,
    "float64": jnp.float64,
    "bfloat16": jnp.bfloat16,
    "float16": jnp.float16,
}

# ImageNet depth -> (blocks per stage, bottleneck). He et al. 2015, Table 1; He et al. 2016.
IMAGENET_DEPTHS = {
    18: ((2, 2, 2, 2), False),
    34: ((3, 4, 6, 3), False),
    50: ((3, 4, 6, 3), True),
    101: ((3, 4, 23, 3), True),
    152: ((3, 8, 36, 3), True),
    200: ((3, 24, 36, 3), True),
}

_COMMON_DEFAULTS = dict(
    bottleneck=False,
    activation="relu",
    init="he_normal",
    weight_scale=1.0,
    bias_scale=0.0,
    zero_init_residual=False,
    residual_scale=1.0,
    learnable_residual_scale=False,
    activation_transform="none",
    shaping_target=None,  # The transform's own default (`_validate_transform`).
    nf_alpha=0.2,
    dtype="float32",
    param_dtype="float32",
    remat=False,
    scan=True,
    conv_impl="auto",
    bn_running_var="biased",
)

# The defaults of every field but `family`, per family. `None` where the field does not apply
# (`layers_per_block` of conv nets) or follows from another (ImageNet's `bottleneck`: the depth).
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "mlp": dict(
        _COMMON_DEFAULTS, block="plain", depth=10, width=256, layers_per_block=1, norm="none",
        shortcut="B", num_classes=10,
    ),
    "cifar_resnet": dict(
        _COMMON_DEFAULTS, block="v1", depth=20, width=16, layers_per_block=None, norm="batch",
        shortcut="A", num_classes=10,
    ),
    "imagenet_resnet": dict(
        _COMMON_DEFAULTS, block="v1", depth=50, width=64, layers_per_block=None, bottleneck=None,
        norm="batch", shortcut="B", num_classes=1000,
    ),
}

# Types of the fields, for command-line placeholders (`config_dict`).
_TYPES = dict(
    family=str, block=str, bottleneck=bool, depth=int, width=int, layers_per_block=int,
    activation=str, init=str, weight_scale=float, bias_scale=float, norm=str, shortcut=str,
    zero_init_residual=bool, residual_scale=float, learnable_residual_scale=bool,
    activation_transform=str, shaping_target=float, nf_alpha=float, num_classes=int,
    dtype=str, param_dtype=str, remat=bool, scan=bool, conv_impl=str, bn_running_var=str,
)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Every field of a network; `None` means "the family's default" (`FAMILY_DEFAULTS`).

    Attributes:
      family: 'mlp' | 'cifar_resnet' | 'imagenet_resnet'.
      block: 'plain' | 'v1' | 'v2' | 'fixup' (Zhang et al. 2019) | 'nf' (NF-ResNet, Brock et
        al. 2021); the last two need norm='none' (and 'nf' shortcut 'B' or 'C').
      bottleneck: 1x1-3x3-1x1 blocks (CIFAR: depth 9n+2; ImageNet: set by the depth, from 50 on).
      depth: MLP: number of blocks L; CIFAR: weight layers 6n+2 (9n+2 bottleneck); ImageNet:
        18, 34, 50, 101, 152 or 200.
      width: MLP width, or channels of the first stage (doubled at each later stage).
      layers_per_block: MLP only, 1 or 2 dense layers per block (None for conv families).
      activation, init, norm: names of the `resflax.layers` registries.
      weight_scale: sigma_w, a gain on every initializer's standard deviation.
      bias_scale: sigma_b, `b ~ N(0, sigma_b^2)` (biases exist only where norm='none').
      shortcut: 'A' (zero-pad), 'B' (project when the shape changes), 'C' (always project).
      zero_init_residual: the last layer of every residual branch starts at 0.
      residual_scale: alpha, the residual branch's multiplier (its initial value if learnable).
      learnable_residual_scale: alpha is a trained scalar per block, starting at
        `residual_scale` (SkipInit / ReZero: residual_scale=0).
      activation_transform: 'none', 'dks' (Deep Kernel Shaping, Martens et al. 2021: phi_hat(x)
        = gamma (phi(alpha x + beta) + delta), activation one of
        `kernel_shaping.DKS_ACTIVATIONS`) or 'tat' (Tailored Activation Transformation, Zhang
        et al. 2022: activation='leaky_relu' with a solved slope, or a smooth activation of
        `kernel_shaping.TAT_SMOOTH_ACTIVATIONS` transformed like DKS's). Every layer applies
        phi_hat, solved for L = `kernel_shaping.nonlinear_depth(self)` nonlinear layers. Needs
        a plain net without norm (block='plain', norm='none'): family='mlp' with init
        'orthogonal', 'delta_orthogonal' or 'scaled_delta_orthogonal', or family='cifar_resnet'
        (basic blocks) with init 'scaled_delta_orthogonal' (q-preserving at the widening
        convs); weight_scale=1, bias_scale=0, zero_init_residual=False.
      shaping_target: the transform's target for the whole net: DKS's xi = C_f'(1) > 1 (default
        1.5); Leaky-ReLU TAT's eta = C_f(0) in (0, 1) (default 0.9); smooth TAT's tau =
        C_f''(1) > 0 (default 0.3, the TAT reference's; C_f'(1) = 1 there). None with
        activation_transform='none'.
      nf_alpha: block='nf' only: alpha, the NF-ResNet branch multiplier (the variance grows by
        alpha^2 per block; 0.2 in the paper).
      num_classes: outputs of the head.
      dtype, param_dtype: compute and parameter dtypes ('float32', 'bfloat16', 'float64', ...).
      remat: recompute block activations in the backward pass (memory bounded in depth).
      scan: repeated blocks as one `nn.scan` (compile time flat in depth).
      conv_impl: 'auto' (`resflax.conv`'s canonical convolution on CPU, on oneDNN from
        `resflax.conv.ONEDNN_MIN_MACS` multiply-adds where the `onednn` extra is installed; XLA's
        own on GPU/TPU), 'onednn', 'canonical' or 'xla': the same numbers up to float rounding,
        only speed differs.
      bn_running_var: 'biased' (flax's convention: the running variance averages the variance
        batch norm normalizes with) or 'unbiased' (x n/(n-1): Torch7/PyTorch, the papers' code).
    """

    family: str = "mlp"
    block: str | None = None
    bottleneck: bool | None = None
    depth: int | None = None
    width: int | None = None
    layers_per_block: int | None = None
    activation: str | None = None
    init: str | None = None
    weight_scale: float | None = None
    bias_scale: float | None = None
    norm: str | None = None
    shortcut: str | None = None
    zero_init_residual: bool | None = None
    residual_scale: float | None = None
    learnable_residual_scale: bool | None = None
    activation_transform: str | None = None
    shaping_target: float | None = None
    nf_alpha: float | None = None
    num_classes: int | None = None
    dtype: str | None = None
    param_dtype: str | None = None
    remat: bool | None = None
    scan: bool | None = None
    conv_impl: str | None = None
    bn_running_var: str | None = None

    def __post_init__(self):
        checks.choice("family", self.family, FAMILIES)
        given_bottleneck = self.bottleneck
        for name, default in FAMILY_DEFAULTS[self.family].items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, default)
        self._validate(given_bottleneck)

    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)

    def _validate(self, given_bottleneck: bool | None) -> None:
        checks.choice("block", self.block, BLOCK_KINDS)
        checks.choice("shortcut", self.shortcut, SHORTCUTS)
        checks.registered("activation", self.activation, layers.ACTIVATIONS)
        checks.registered("init", self.init, layers.INITIALIZERS)
        checks.registered("norm", self.norm, layers.NORMS)
        checks.choice("dtype", self.dtype, DTYPES)
        checks.choice("param_dtype", self.param_dtype, DTYPES)
        checks.choice("conv_impl", self.conv_impl, conv.IMPLS)
        checks.choice("bn_running_var", self.bn_running_var, layers.BN_RUNNING_VARS)
        for name in ("depth", "width", "num_classes"):
            checks.integer(name, getattr(self, name), 1)
        for name in ("weight_scale", "bias_scale", "nf_alpha"):
            self._set(name, checks.number(name, getattr(self, name), 0.0, finite=True))
        if isinstance(self.residual_scale, str):
            raise ValueError(
                f"residual_scale={self.residual_scale!r} must be a number (a learnable scale: "
                "learnable_residual_scale=True, starting at residual_scale)"
            )
        self._set("residual_scale",
                  checks.number("residual_scale", self.residual_scale, finite=True))
        for name in ("zero_init_residual", "learnable_residual_scale", "remat", "scan"):
            checks.boolean(name, getattr(self, name))
        if self.bottleneck is not None:  # ImageNet's unset one follows from the depth.
            checks.boolean("bottleneck", self.bottleneck)
        if self.block == "plain" and (self.residual_scale != 1.0 or self.learnable_residual_scale):
            what = ("learnable_residual_scale=True" if self.learnable_residual_scale
                    else f"residual_scale={self.residual_scale!r}")
            raise ValueError(
                f"{what} needs a skip connection: use block='v1' or 'v2' (a plain block has "
                "residual_scale=1.0)"
            )
        self._validate_norm_free()
        if self.family == "mlp":
            if self.bottleneck:
                raise ValueError("bottleneck=True is not supported for family='mlp'; allowed: False")
            checks.choice("layers_per_block", self.layers_per_block, (1, 2))
        else:
            if self.layers_per_block is not None:
                raise ValueError(
                    f"layers_per_block={self.layers_per_block!r} applies to family='mlp' only; "
                    f"{self.family} blocks have 2 (basic) or 3 (bottleneck) layers"
                )
            if self.family == "imagenet_resnet":
                if self.depth not in IMAGENET_DEPTHS:
                    raise ValueError(
                        f"depth={self.depth} is not valid for family='imagenet_resnet'; allowed "
                        f"values: {sorted(IMAGENET_DEPTHS)}"
                    )
                wanted = IMAGENET_DEPTHS[self.depth][1]
                if given_bottleneck is not None and given_bottleneck != wanted:
                    raise ValueError(
                        f"bottleneck={given_bottleneck!r} contradicts depth={self.depth} for "
                        "family='imagenet_resnet' (bottleneck blocks from depth 50 on)"
                    )
                self._set("bottleneck", wanted)
        self.stage_sizes()  # Validates the depth.
        self._validate_transform()
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) == "float64" and not jax.config.read("jax_enable_x64"):
                raise ValueError(
                    f"{name}='float64' needs 64-bit JAX: "
                    "jax.config.update('jax_enable_x64', True) before building the model"
                )

    def _validate_transform(self) -> None:
        """`activation_transform` and `shaping_target`: where kernel shaping's theory holds,
        and that the transform exists at this depth (solving it; cached)."""
        # Imported here: kernel_shaping -> theory -> config.
        from resflax import kernel_shaping

        transform = checks.choice("activation_transform", self.activation_transform,
                                  kernel_shaping.TRANSFORMS)
        if transform == "none":
            if self.shaping_target is not None:
                raise ValueError(
                    f"shaping_target={self.shaping_target!r} applies only with "
                    "activation_transform='dks' or 'tat' (activation_transform='none')")
            return
        kind = kernel_shaping.target_kind(transform, self.activation)
        if self.shaping_target is None:
            self._set("shaping_target", kernel_shaping.DEFAULT_TARGETS[kind])
        target = checks.number("shaping_target", self.shaping_target, finite=True)
        self._set("shaping_target", target)
        if kind == "xi" and not target > 1.0:
            raise ValueError(f"shaping_target={target!r} must be a number > 1 with "
                             "activation_transform='dks' (xi, the compound C-map slope C_f'(1))")
        if kind == "eta" and not 0.0 < target < 1.0:
            raise ValueError(f"shaping_target={target!r} must be in (0, 1) with "
                             "activation_transform='tat' and activation='leaky_relu' (eta, the "
                             "compound C-map value C_f(0))")
        if kind == "tau" and not target > 0.0:
            raise ValueError(f"shaping_target={target!r} must be a number > 0 with "
                             f"activation_transform='tat' and activation={self.activation!r} "
                             "(tau, the compound C-map curvature C_f''(1))")
        why = f"with activation_transform={transform!r}"
        activations = (kernel_shaping.DKS_ACTIVATIONS if transform == "dks"
                       else kernel_shaping.TAT_ACTIVATIONS)
        conv = self.family != "mlp"
        # Convs need the widening layers rescaled (kernel_shaping docstring, Conv nets).
        inits = ("scaled_delta_orthogonal",) if conv else (
            "orthogonal", "delta_orthogonal", "scaled_delta_orthogonal")
        requirements = (
            # (field, allowed values, why): the theory's assumptions (kernel_shaping docstring).
            ("family", kernel_shaping.SHAPED_FAMILIES,
             "kernel shaping is implemented for plain MLPs and plain CIFAR nets (the ImageNet "
             "stem's max-pool has no kernel map)"),
            ("block", ("plain",), "no skip connections"),
            ("norm", ("none",), "no normalization layers"),
            ("bottleneck", (False,), "a bottleneck's 1x1 reduction 4w -> w keeps q only in "
             "expectation"),
            ("init", inits,
             "q-preserving weights at init: delta-orthogonal rescaled by sqrt(C_out / C_in) at "
             "the widening convs" if conv else "q-preserving orthogonal weights at init"),
            ("weight_scale", (1.0,), "orthogonal weights of gain 1 keep q"),
            ("bias_scale", (0.0,), "no biases at init"),
            ("zero_init_residual", (False,), "a zero last layer would cut the signal"),
            ("activation", activations,
             "DKS needs a smooth activation" if transform == "dks"
             else "TAT for Leaky ReLU or a smooth activation"),
        )
        for name, allowed, reason in requirements:
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"{name}={value!r} is not supported {why} ({reason}); "
                                 f"allowed values: {list(allowed)}")
        kernel_shaping.for_config(self)  # ValueError 'shaping_target=...' if unreachable.
    def _validate_norm_free(self) -> None:
        """Fixup and NF-ResNets replace normalization and set their own branch multiplier."""
        if self.block not in NORM_FREE_KINDS:
            return
        if self.norm != "none":
            raise ValueError(
                f"norm={self.norm!r} is not supported with block={self.block!r} (it replaces "
                "normalization); allowed values: ['none']"
            )
        if self.block == "nf" and self.shortcut not in ("B", "C"):
            raise ValueError(
                f"shortcut={self.shortcut!r} is not supported with block='nf' (a transition "
                "block must project its unit-variance input); allowed values: ['B', 'C']"
            )
        own = "the 'scale' multiplier (init 1)" if self.block == "fixup" else "nf_alpha"
        if self.learnable_residual_scale:
            raise ValueError(
                f"learnable_residual_scale=True is not supported with block={self.block!r} "
                f"(its branch multiplier is {own}); allowed values: [False]"
            )
        if self.residual_scale != 1.0:
            raise ValueError(
                f"residual_scale={self.residual_scale!r} is not supported with "
                f"block={self.block!r} (its branch multiplier is {own}); allowed values: [1.0]"
            )

    # ----- derived, pure -----

    def stage_sizes(self) -> tuple[int, ...]:
        """Blocks per stage: `(depth,)` (MLP), `(n, n, n)` (CIFAR), the ImageNet table."""
        if self.family == "mlp":
            return (self.depth,)
        if self.family == "cifar_resnet":
            per_block = 9 if self.bottleneck else 6
            if self.depth < per_block + 2 or (self.depth - 2) % per_block:
                # Each rule names the other one's `bottleneck`, so flipping it is named too.
                rule = "9n+2 (bottleneck: 11, 164, 1001, ...)" if self.bottleneck else (
                    "6n+2 (8, 20, 32, 44, 56, 110, 1202, ...; bottleneck=True: 9n+2)")
                raise ValueError(
                    f"depth={self.depth} is not valid for family='cifar_resnet': must be {rule}")
            return ((self.depth - 2) // per_block,) * 3
        return IMAGENET_DEPTHS[self.depth][0]

    @property
    def num_blocks(self) -> int:
        """L, the number of blocks (signals x_1 .. x_L)."""
        return sum(self.stage_sizes())

    # ----- conversions -----

    def to_dict(self) -> dict[str, Any]:
        """Every field, resolved: a plain JSON-able dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, fields: Mapping[str, Any]) -> "ModelConfig":
        """From a mapping (dict or ConfigDict) of fields; `None` values mean "family default".

        Raises ValueError naming unknown fields.
        """
        if isinstance(fields, ModelConfig):
            return fields
        if hasattr(fields, "to_dict"):
            fields = fields.to_dict()
        unknown = sorted(set(fields) - set(FIELDS))
        if unknown:
            raise ValueError(f"unknown model field(s) {unknown}; allowed fields: {sorted(FIELDS)}")
        return cls(**{k: v for k, v in fields.items() if v is not None})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        return cls.from_dict(json.loads(text))

    def replace(self, **changes: Any) -> "ModelConfig":
        """A copy with `changes`; a changed `family` restarts from that family's defaults for
        every field not in `changes`; a change of what `shaping_target` means (the transform,
        or TAT's activation between leaky_relu and a smooth one) takes the new target's default
        unless `shaping_target` is in `changes` too."""
        if "family" in changes and changes["family"] != self.family:
            return ModelConfig.from_dict(changes)
        from resflax import kernel_shaping  # Imported here: kernel_shaping -> config.

        kind = kernel_shaping.target_kind(
            changes.get("activation_transform", self.activation_transform),
            changes.get("activation", self.activation))
        if kind != kernel_shaping.target_kind(self.activation_transform, self.activation) and (
                "shaping_target" not in changes):
            changes = dict(changes, shaping_target=None)  # The new target's default.
        return dataclasses.replace(self, **changes)


FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig))


def config_dict(**fields: Any) -> ml_collections.ConfigDict:
    """A ConfigDict of every model field: `fields` as given, every other a typed `None`
    placeholder (the family default, overridable as `--config.model.<field>=...`).

    Checks the fields (a `ModelConfig` is built from them) and raises ValueError like it.
    """
    ModelConfig.from_dict(fields)
    cfg = ml_collections.ConfigDict()
    for name in FIELDS:
        value = fields.get(name)
        cfg[name] = ml_config_dict.placeholder(_TYPES[name]) if value is None else value
    return cfg


def from_config_dict(cfg: Mapping[str, Any], section: str = "config.model") -> ModelConfig:
    """`ModelConfig` from a (possibly partial) ConfigDict; errors name `<section>.<field>`."""
    try:
        return ModelConfig.from_dict(cfg)
    except ValueError as e:
        raise ValueError(f"{section}: {e}") from None
