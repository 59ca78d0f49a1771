"""Networks: stem -> stages of blocks -> head, for the `mlp`, `cifar_resnet` and `imagenet_resnet`
families, built from a flat mapping of fields by `build_model`.

Signals. Write the network as `x_0 = stem(input)`, `x_l = block_l(x_{l-1})` for `l = 1..L`,
`logits = head(x_L)`. Calling the model returns `(logits, signals)`, where `signals` is a tuple of
*segments*, each an array with a leading layer axis; concatenated along that axis they are
`x_0, x_1, ..., x_L` (so `sum(s.shape[0] for s in signals) == L + 1`):

    signals[0]  x_0[None]                              [1, B, ...]
    then per stage, in order:
                x of the stage's first block, [None]   [1, B, ...]    (only if it reshapes)
                x of the stage's repeated blocks       [n, B, ...]    (one `nn.scan`)

Repeated identical blocks are one `nn.scan` with parameters stacked on a leading axis, so the
traced program, and with it compile time, does not grow with depth. A block that changes the
shape (stride, width or a bottleneck expansion) stays outside the scan.

`perturbations`, a tuple shaped like `signals`, is added to every `x_l` right where it is
computed, so `d loss / d perturbations[k][j]` is exactly `d loss / d x_l` for all `l` in ONE
backward pass (diagnostics use it with zeros). `segments()` describes, for the same segments, the
block module and the variables path, so that any single block can be applied on its own.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from resflax import conv, layers
from resflax.blocks import BLOCK_KINDS, BOTTLENECK_EXPANSION, SHORTCUTS, Block

Array = jax.Array

FAMILIES = ("mlp", "cifar_resnet", "imagenet_resnet")

# ImageNet depth -> (blocks per stage, bottleneck). He et al. 2015, Table 1; He et al. 2016.
IMAGENET_DEPTHS = {
    18: ((2, 2, 2, 2), False),
    34: ((3, 4, 6, 3), False),
    50: ((3, 4, 6, 3), True),
    101: ((3, 4, 23, 3), True),
    152: ((3, 8, 36, 3), True),
    200: ((3, 24, 36, 3), True),
}

DTYPES = {
    "float32": jnp.float32,
    "float64": jnp.float64,
    "bfloat16": jnp.bfloat16,
    "float16": jnp.float16,
}

_COMMON_DEFAULTS = dict(
    bottleneck=False,
    layers_per_block=None,
    activation="relu",
    init="he_normal",
    weight_scale=1.0,
    bias_scale=0.0,
    zero_init_residual=False,
    residual_scale=1.0,
    dtype="float32",
    param_dtype="float32",
    remat=False,
    scan=True,
    conv_impl="auto",
    bn_running_var="biased",
)

FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "mlp": dict(
        _COMMON_DEFAULTS,
        block="plain",
        depth=10,
        width=256,
        layers_per_block=1,
        norm="none",
        shortcut="B",
        num_classes=10,
    ),
    "cifar_resnet": dict(
        _COMMON_DEFAULTS, block="v1", depth=20, width=16, norm="batch", shortcut="A", num_classes=10
    ),
    "imagenet_resnet": dict(
        _COMMON_DEFAULTS,
        block="v1",
        depth=50,
        bottleneck=None,  # Given by the depth table.
        width=64,
        norm="batch",
        shortcut="B",
        num_classes=1000,
    ),
}

FIELDS = ("family",) + tuple(FAMILY_DEFAULTS["mlp"])


def _check_choice(fields, name, allowed):
    if fields[name] not in allowed:
        raise ValueError(f"{name}={fields[name]!r} is not supported; allowed values: {list(allowed)}")


def _check_int(fields, name, minimum):
    value = fields[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an integer >= {minimum}")


def _check_float(fields, name, minimum=0.0):
    value = fields[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= minimum:
        raise ValueError(f"{name}={value!r} must be a number >= {minimum}")


def stage_sizes(fields: Mapping[str, Any]) -> tuple[tuple[int, ...], bool]:
    """(blocks per stage, bottleneck) for resolved fields, or ValueError naming `depth`."""
    family, depth = fields["family"], fields["depth"]
    if family == "mlp":
        return (depth,), False
    if family == "cifar_resnet":
        per_block = 9 if fields["bottleneck"] else 6
        if depth < per_block + 2 or (depth - 2) % per_block:
            rule = "9n+2 (bottleneck: 11, 164, 1001, ...)" if fields["bottleneck"] else (
                "6n+2 (8, 20, 32, 44, 56, 110, 1202, ...)"
            )
            raise ValueError(f"depth={depth} is not valid for family='cifar_resnet': must be {rule}")
        n = (depth - 2) // per_block
        return (n, n, n), fields["bottleneck"]
    if depth not in IMAGENET_DEPTHS:
        raise ValueError(
            f"depth={depth} is not valid for family='imagenet_resnet'; allowed values: "
            f"{sorted(IMAGENET_DEPTHS)}"
        )
    return IMAGENET_DEPTHS[depth]


def resolve_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
    """Validates model fields and fills the family's defaults; returns a plain, JSON-able dict.

    Raises ValueError naming the offending field and its allowed values.
    """
    fields = dict(fields)
    family = fields.get("family", "mlp")
    if family not in FAMILY_DEFAULTS:
        raise ValueError(f"family={family!r} is not supported; allowed values: {list(FAMILIES)}")
    unknown = sorted(set(fields) - set(FIELDS))
    if unknown:
        raise ValueError(f"unknown model field(s) {unknown}; allowed fields: {sorted(FIELDS)}")
    resolved = dict(FAMILY_DEFAULTS[family], family=family)
    resolved.update({k: v for k, v in fields.items() if v is not None})

    _check_choice(resolved, "block", BLOCK_KINDS)
    _check_choice(resolved, "shortcut", SHORTCUTS)
    layers.lookup(layers.ACTIVATIONS, resolved["activation"], "activation")
    layers.lookup(layers.INITIALIZERS, resolved["init"], "init")
    layers.lookup(layers.NORMS, resolved["norm"], "norm")
    _check_choice(resolved, "dtype", DTYPES)
    _check_choice(resolved, "param_dtype", DTYPES)
    _check_choice(resolved, "conv_impl", conv.IMPLS)
    _check_choice(resolved, "bn_running_var", layers.BN_RUNNING_VARS)
    _check_int(resolved, "depth", 1)
    _check_int(resolved, "width", 1)
    _check_int(resolved, "num_classes", 1)
    _check_float(resolved, "weight_scale")
    _check_float(resolved, "bias_scale")
    for flag in ("zero_init_residual", "remat", "scan"):
        if not isinstance(resolved[flag], bool):
            raise ValueError(f"{flag}={resolved[flag]!r} must be True or False")
    if resolved["residual_scale"] != "learnable":
        try:
            _check_float(resolved, "residual_scale", minimum=float("-inf"))
        except ValueError:
            raise ValueError(
                f"residual_scale={resolved['residual_scale']!r} must be a number or 'learnable'"
            ) from None
        resolved["residual_scale"] = float(resolved["residual_scale"])
    if resolved["block"] == "plain" and resolved["residual_scale"] != 1.0:
        raise ValueError(
            f"residual_scale={resolved['residual_scale']!r} needs a skip connection: "
            "use block='v1' or 'v2' (a plain block has residual_scale=1.0)"
        )
    for name in ("weight_scale", "bias_scale"):
        resolved[name] = float(resolved[name])

    if family == "mlp":
        if resolved["bottleneck"]:
            raise ValueError("bottleneck=True is not supported for family='mlp'; allowed: False")
        _check_choice(resolved, "layers_per_block", (1, 2))
    else:
        if resolved["layers_per_block"] is not None:
            raise ValueError(
                f"layers_per_block={resolved['layers_per_block']!r} applies to family='mlp' only; "
                f"{family} blocks have 2 (basic) or 3 (bottleneck) layers"
            )
        if family == "imagenet_resnet":
            stage_sizes(resolved)  # Validates depth first: it decides the block type.
            wanted = IMAGENET_DEPTHS[resolved["depth"]][1]
            if fields.get("bottleneck") is not None and fields["bottleneck"] != wanted:
                raise ValueError(
                    f"bottleneck={fields['bottleneck']!r} contradicts depth={resolved['depth']} "
                    f"for family='imagenet_resnet' (bottleneck blocks from depth 50 on)"
                )
            resolved["bottleneck"] = wanted
        if not isinstance(resolved["bottleneck"], bool):
            raise ValueError(f"bottleneck={resolved['bottleneck']!r} must be True or False")
    stage_sizes(resolved)  # Validates depth.
    if (resolved["dtype"] == "float64" or resolved["param_dtype"] == "float64") and not (
        jax.config.read("jax_enable_x64")
    ):
        raise ValueError(
            "dtype/param_dtype='float64' needs 64-bit JAX: "
            "jax.config.update('jax_enable_x64', True) before building the model"
        )
    return resolved


class _ScanStep(nn.Module):
    """`nn.scan` body: `(x, perturbation) -> (y, y)` with `y = block(x) + perturbation`."""

    block_fn: Callable[..., nn.Module]
    train: bool

    @nn.compact
    def __call__(self, x: Array, perturbation: Array | None) -> tuple[Array, Array]:
        y = self.block_fn(name="block")(x, self.train)
        if perturbation is not None:
            y = y + perturbation
        return y, y


class Stage(nn.Module):
    """A stage: an optional first block of its own, then `num_repeated` identical blocks.

    The first block stands apart when it changes the shape or differs otherwise (a v2 block
    whose shortcut takes the pre-activation, `first_preact`). Returns `(x_out, segments)` where
    `segments` holds the block outputs with a leading layer axis: `[x_first[None]]` (if
    `separate_first`) then `[n, B, ...]` for the repeated blocks.
    """

    block_fn: Callable[..., nn.Module]  # partial(Block, ...) without width/strides/name
    width: int
    strides: int
    separate_first: bool
    num_repeated: int
    first_preact: str = "residual"
    scan: bool = True
    remat: bool = False

    def block_specs(self) -> list[tuple[tuple[str, ...], Callable[..., nn.Module], int, bool]]:
        """(variables path within the stage, block factory, number of blocks, stacked)."""
        specs = []
        if self.separate_first:
            first = functools.partial(self.block_fn, width=self.width, strides=self.strides,
                                      preact=self.first_preact)
            specs.append((("first", "block"), first, 1, False))
        repeated = functools.partial(self.block_fn, width=self.width, strides=1)
        if self.scan and self.num_repeated:
            specs.append((("rest", "block"), repeated, self.num_repeated, True))
        else:
            specs += [((f"rest_{i}", "block"), repeated, 1, False) for i in range(self.num_repeated)]
        return specs

    @nn.compact
    def __call__(self, x: Array, train: bool, perturbations: Sequence[Array] | None = None):
        # `train` is a field of the step, not an argument, so remat needs no static arguments.
        step_cls = nn.remat(_ScanStep) if self.remat else _ScanStep
        segments = []
        for k, (path, factory, length, stacked) in enumerate(self.block_specs()):
            pert = None if perturbations is None else perturbations[k]
            step = step_cls(block_fn=factory, train=train, name=path[0])
            if stacked:
                scanned = nn.scan(
                    lambda module, carry, xs: module(carry, xs),
                    variable_axes={"params": 0, "batch_stats": 0},
                    split_rngs={"params": True},
                    length=length,
                )
                x, ys = scanned(step, x, pert)
            else:
                x, y = step(x, None if pert is None else pert[0])
                ys = y[None]
            segments.append(ys)
        return x, segments


class Network(nn.Module):
    """stem -> stages -> (final norm + activation for v2) -> global average pool -> dense head.

    Fields are the resolved model fields of `resolve_fields` (user-facing names, not callables).
    `freeze_norm_stats` makes batch-norm statistics constants under differentiation (per-example
    Jacobians; see `layers.BatchNorm`); it is not a model field, set it with `.clone(...)`.
    """

    family: str
    block: str
    bottleneck: bool
    depth: int
    width: int
    layers_per_block: int | None
    activation: str
    weight_init: str  # The `init` field (a Module's `init` is its initialization method).
    weight_scale: float
    bias_scale: float
    norm: str
    shortcut: str
    zero_init_residual: bool
    residual_scale: Any
    num_classes: int
    dtype: str
    param_dtype: str
    remat: bool
    scan: bool
    conv_impl: str
    bn_running_var: str
    freeze_norm_stats: bool = False

    # ----- pieces, derived from the fields (pure Python; usable on an unbound module) -----

    def _act(self):
        return layers.activation(self.activation)

    def _norm_fn(self):
        extra = {}
        if self.norm == "batch":
            extra["unbiased_running_var"] = self.bn_running_var == "unbiased"
        return functools.partial(
            layers.norm(self.norm), freeze_stats=self.freeze_norm_stats, **extra
        )

    def _dtypes(self):
        return dict(dtype=DTYPES[self.dtype], param_dtype=DTYPES[self.param_dtype])

    def _kernel_init(self):
        return layers.initializer(self.weight_init, self.weight_scale)

    def block_fn(self) -> Callable[..., Block]:
        """`partial(Block, ...)` with every field but `width`, `strides` and `name`."""
        return functools.partial(
            Block,
            kind=self.block,
            dense=self.family == "mlp",
            bottleneck=self.bottleneck,
            layers_per_block=self.layers_per_block or 2,
            activation=self._act(),
            kernel_init=self._kernel_init(),
            bias_init=layers.bias_initializer(self.bias_scale),
            use_bias=self.norm == "none",
            norm=self._norm_fn(),
            shortcut=self.shortcut,
            zero_init_residual=self.zero_init_residual,
            residual_scale=self.residual_scale,
            conv_impl=self.conv_impl,
            **self._dtypes(),
        )

    def _first_preact(self, stage: int) -> str:
        """Where the first v2 block of `stage` puts its pre-activation (`blocks.PREACTS`).

        Conv families follow He et al. 2016 (appendix) and the authors' code (fb.resnet.torch
        preresnet.lua): the first unit of every stage activates before splitting ('shared'),
        except ImageNet's very first one, whose input is already the stem's conv-BN-ReLU-maxpool
        ('none': no second BN-ReLU in a row). MLP blocks are resflax's own, uniform ('residual').
        """
        if self.block != "v2" or self.family == "mlp":
            return "residual"
        return "none" if (self.family == "imagenet_resnet" and stage == 0) else "shared"

    def stage_fields(self) -> list[dict[str, Any]]:
        sizes, _ = stage_sizes(self.fields())
        expansion = BOTTLENECK_EXPANSION if self.bottleneck else 1
        stem_width = self.width
        result, in_features = [], stem_width
        for s, n in enumerate(sizes):
            width = self.width if self.family == "mlp" else self.width * 2**s
            strides = 1 if (s == 0 or self.family == "mlp") else 2
            reshapes = strides != 1 or in_features != width * expansion
            first_preact = self._first_preact(s)
            separate = reshapes or first_preact != "residual"
            result.append(
                dict(
                    width=width,
                    strides=strides,
                    separate_first=separate,
                    first_preact=first_preact,
                    num_repeated=n - 1 if separate else n,
                    scan=self.scan,
                    remat=self.remat,
                )
            )
            in_features = width * expansion
        return result

    def fields(self) -> dict[str, Any]:
        """The resolved model fields (user-facing names), as `resolve_fields` returns them."""
        return {f: getattr(self, "weight_init" if f == "init" else f) for f in FIELDS}

    def segments(self) -> list[tuple[tuple[str, ...], Callable[..., Block], int, bool]]:
        """For each signal segment after `x_0`: (variables path, block factory, length, stacked).

        A block factory called with no arguments gives an unbound `Block`; apply it to
        `x_{l-1}` with the variables found at `path` (sliced along the leading axis when
        `stacked`) to get `x_l`.
        """
        result = []
        for s, stage in enumerate(self.stage_fields()):
            stage_module = Stage(block_fn=self.block_fn(), parent=None, **stage)
            for path, factory, length, stacked in stage_module.block_specs():
                result.append(((f"stages_{s}",) + path, factory, length, stacked))
        return result

    def num_blocks(self) -> int:
        return sum(length for _, _, length, _ in self.segments())

    # ----- the module -----

    def setup(self):
        dtypes = self._dtypes()
        kernel_init = self._kernel_init()
        bias_init = layers.bias_initializer(self.bias_scale)
        use_bias = self.norm == "none"
        if self.family == "mlp":
            self.stem_layer = nn.Dense(
                self.width, kernel_init=kernel_init, bias_init=bias_init, **dtypes
            )
        else:
            kernel = 3 if self.family == "cifar_resnet" else 7
            strides = 1 if self.family == "cifar_resnet" else 2
            pad = kernel // 2
            self.stem_layer = layers.Conv(
                self.width,
                (kernel, kernel),
                strides=(strides, strides),
                padding=((pad, pad), (pad, pad)),
                use_bias=use_bias,
                impl=self.conv_impl,
                kernel_init=kernel_init,
                bias_init=bias_init,
                **dtypes,
            )
            # He et al. 2016's pre-activation CIFAR nets have a bare conv stem (the first block
            # activates it before splitting, see `_first_preact`); every ImageNet stem has
            # conv-norm-act-maxpool (for v2 that is the first block's pre-activation).
            if not (self.block == "v2" and self.family == "cifar_resnet"):
                self.stem_norm = self._norm_fn()(**dtypes)
        self.stages = [
            Stage(block_fn=self.block_fn(), **stage) for stage in self.stage_fields()
        ]
        if self.block == "v2":
            self.final_norm = self._norm_fn()(**dtypes)
        self.head = nn.Dense(
            self.num_classes, kernel_init=kernel_init, bias_init=bias_init, **dtypes
        )

    def embed(self, inputs: Array, train: bool = False) -> Array:
        """x_0 = stem(inputs); inputs `[B, H, W, C]` (conv) or `[B, ...]` (MLP, flattened)."""
        if self.family == "mlp":
            return self.stem_layer(inputs.reshape(inputs.shape[0], -1))
        x = self.stem_layer(inputs)
        if hasattr(self, "stem_norm"):
            x = self._act()(self.stem_norm(x, train))
        if self.family == "imagenet_resnet":
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        return x

    def body(self, x0: Array, train: bool = False, perturbations=None):
        """`x_L, segments` from `x_0`; `perturbations` (segments after x_0) as in the module doc."""
        x, segments, k = x0, [], 0
        for stage in self.stages:
            n = len(stage.block_specs())
            pert = None if perturbations is None else perturbations[k : k + n]
            x, stage_segments = stage(x, train, pert)
            segments += stage_segments
            k += n
        return x, tuple(segments)

    def readout(self, x_last: Array, train: bool = False) -> Array:
        """logits `[B, num_classes]` from `x_L`."""
        if self.block == "v2":
            x_last = self._act()(self.final_norm(x_last, train))
        if x_last.ndim == 4:
            x_last = jnp.mean(x_last, axis=(1, 2))
        return self.head(x_last)

    def __call__(self, inputs: Array, train: bool = False, perturbations=None):
        """Returns `(logits [B, num_classes], signals)`; see the module docstring."""
        x0 = self.embed(inputs, train)
        if perturbations is not None:
            x0 = x0 + perturbations[0][0]
            perturbations = perturbations[1:]
        x_last, segments = self.body(x0, train, perturbations)
        return self.readout(x_last, train), (x0[None],) + segments


def unroll_variables(variables: Mapping[str, Any]) -> dict[str, Any]:
    """Scanned-layout variables -> the layout of the same model built with `scan=False`.

    Each stage's stacked `rest` subtree (leading layer axis) becomes `rest_0, rest_1, ...`, so
    every block's parameters can be read or compared one block at a time.
    """
    unrolled = {}
    for collection, tree in variables.items():
        tree = {name: dict(stage) for name, stage in flax.core.unfreeze(tree).items()}
        for stage in tree.values():
            if isinstance(stage, dict) and "rest" in stage:
                stacked = stage.pop("rest")
                for i in range(jax.tree.leaves(stacked)[0].shape[0]):
                    stage[f"rest_{i}"] = jax.tree.map(lambda a, i=i: a[i], stacked)
        unrolled[collection] = tree
    return unrolled


def build_model(fields: Mapping[str, Any]) -> Network:
    """A flax.linen Module from a mapping of model fields (dict or ml_collections.ConfigDict).

    Fields (defaults depend on `family`, see `FAMILY_DEFAULTS`):
      family: 'mlp' | 'cifar_resnet' | 'imagenet_resnet'.
      block: 'plain' | 'v1' | 'v2'.
      bottleneck: 1x1-3x3-1x1 blocks (CIFAR 9n+2; ImageNet from depth 50, set by the depth).
      depth: MLP: number of blocks L; CIFAR: weight layers 6n+2 (9n+2 bottleneck); ImageNet:
        18, 34, 50, 101, 152 or 200.
      width: MLP width, or channels of the first stage (doubled at each later stage).
      layers_per_block: MLP only, 1 or 2 dense layers per block.
      activation, init, norm: names from `resflax.layers` registries.
      weight_scale: sigma_w, gain on the initializer's standard deviation.
      bias_scale: sigma_b, `b ~ N(0, sigma_b^2)` (biases exist only where norm='none').
      shortcut: 'A' (zero-pad), 'B' (project when the shape changes), 'C' (always project).
      zero_init_residual: the last layer of every residual branch starts at 0.
      residual_scale: branch multiplier alpha (float), or 'learnable' (scalar, starts at 0).
      num_classes: outputs of the head.
      dtype, param_dtype: compute and parameter dtypes ('float32', 'bfloat16', 'float64', ...).
      remat: recompute block activations in the backward pass (memory bounded in depth).
      scan: repeated blocks as one `nn.scan` (default; compile time flat in depth).
      conv_impl: 'auto' (default: `resflax.conv`'s canonical convolution on CPU, XLA's own on
        GPU/TPU), 'canonical' or 'xla'; same numbers, only speed differs.
      bn_running_var: 'biased' (default; flax's convention: the running variance averages the
        variance batch norm normalizes with) or 'unbiased' (x n/(n-1), Torch7/PyTorch, the
        papers' code); see `layers.BatchNorm`.
    """
    if hasattr(fields, "to_dict"):
        fields = fields.to_dict()
    resolved = resolve_fields(fields)
    resolved["weight_init"] = resolved.pop("init")
    return Network(**resolved)
