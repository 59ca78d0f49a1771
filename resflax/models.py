"""Networks: stem -> stages of blocks -> head, for the `mlp`, `cifar_resnet` and `imagenet_resnet`
families, built from one `resflax.config.ModelConfig`.

Signals. Write the network as `x_0 = stem(input)`, `x_l = block_l(x_{l-1})` for `l = 1..L`,
`logits = head(x_L)`. Calling the model returns `(logits, signals)`, where `signals` is a tuple of
*segments*, each an array with a leading layer axis; concatenated along that axis they are
`x_0, x_1, ..., x_L` (so `sum(s.shape[0] for s in signals) == L + 1`):

    signals[0]  x_0[None]                              [1, B, ...]
    then per stage, in order:
                x of the stage's first block, [None]   [1, B, ...]    (only if it stands apart)
                x of the stage's repeated blocks       [n, B, ...]    (one `nn.scan`)

Repeated identical blocks are one `nn.scan` with parameters stacked on a leading axis, so the
traced program, and with it compile time, does not grow with depth. A block that changes the
shape (stride, width or a bottleneck expansion), or a v2 stage's first unit (its shortcut takes
the pre-activation), stays outside the scan.

The topology is pure functions of the config: `stage_plan(config)` (one `StagePlan` per stage)
and `segments(config)` (one `Segment` per signal segment after `x_0`: which block, with which
variables), so any single block can be applied on its own without binding the network.

`perturbations`, a tuple shaped like `signals`, is added to every `x_l` right where it is
computed, so `d loss / d perturbations[k][j]` is exactly `d loss / d x_l` for all `l` in ONE
backward pass (diagnostics use it with zeros).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from resflax import layers, theory
from resflax.stems import STEMS, layer_kit
from resflax.blocks import BOTTLENECK_EXPANSION, Block
from resflax.config import ModelConfig

Array = jax.Array


# ----------------------------------------------------------------------------- topology (pure)


@dataclasses.dataclass(frozen=True)
class StagePlan:
    """One stage: an optional first block of its own, then `num_repeated` identical blocks.

    Attributes:
      width: the blocks' width (channels of a conv branch, inner width of a bottleneck).
      strides: the first block's stride (the others have 1).
      separate_first: the first block stands apart (it reshapes, or is a v2 first unit).
      first_preact: where that first block's v2 pre-activation sits (`blocks.PREACTS`).
      num_repeated: blocks after it (all of them when `separate_first` is False).
      first_reshapes: the first block changes the shape (stride, width or expansion).
    """

    width: int
    strides: int
    separate_first: bool
    first_preact: str
    num_repeated: int
    first_reshapes: bool = False


class Segment(NamedTuple):
    """A signal segment after `x_0`: `length` outputs of the block `block()` (an unbound
    `Block`), whose variables sit at `path` (stacked on a leading axis of `length` if
    `stacked`). `betas`: block kind 'nf' only, each block's `beta` (`nf_betas`), `length` of
    them, passed as `block(x, train, beta)`; None for the other kinds."""

    path: tuple[str, ...]
    block: Callable[[], Block]
    length: int
    stacked: bool
    betas: tuple[float, ...] | None = None


def _first_preact(config: ModelConfig, stage: int) -> str:
    """Where the first v2 block of `stage` puts its pre-activation (`blocks.PREACTS`).

    Conv families follow He et al. 2016 (appendix) and the authors' code (fb.resnet.torch
    preresnet.lua): the first unit of every stage activates before splitting ('shared'),
    except ImageNet's very first one, whose input is already the stem's conv-BN-ReLU-maxpool
    ('none': no second BN-ReLU in a row). MLP blocks are resflax's own, uniform ('residual').
    """
    if config.block != "v2" or config.family == "mlp":
        return "residual"
    return "none" if (config.family == "imagenet_resnet" and stage == 0) else "shared"


def stage_plan(config: ModelConfig) -> tuple[StagePlan, ...]:
    """The stages of `config`'s network, in order (widths double per conv stage, stride 2
    from the second conv stage on)."""
    expansion = BOTTLENECK_EXPANSION if config.bottleneck else 1
    plans, in_features = [], config.width  # The stem outputs `width` features.
    for s, n in enumerate(config.stage_sizes()):
        conv = config.family != "mlp"
        width = config.width * 2**s if conv else config.width
        strides = 2 if (conv and s > 0) else 1
        reshapes = strides != 1 or in_features != width * expansion
        first_preact = _first_preact(config, s)
        separate = reshapes or first_preact != "residual"
        plans.append(StagePlan(width, strides, separate, first_preact, n - 1 if separate else n,
                               reshapes))
        in_features = width * expansion
    return tuple(plans)


def nf_betas(config: ModelConfig) -> tuple[float, ...]:
    """`beta_l` of blocks `l = 1..L` of an NF-ResNet (`block='nf'`): the predicted std of each
    block's input (Brock, De & Smith 2021, section 4; the reference's `expected_std`).

    With `Var(x_0) = 1` (the weight-standardized stem on unit-variance inputs):
    `beta_l = sqrt(Var(x_{l-1}))`, `Var(x_l) = Var(x_{l-1}) + alpha^2`, except after a block
    whose shortcut projects `g(x_{l-1} / beta_l)` (unit variance): `Var(x_l) = 1 + alpha^2`.
    Pure: a function of the config alone (any block kind; only 'nf' uses it).
    """
    alpha2, var, betas = config.nf_alpha**2, 1.0, []
    for plan in stage_plan(config):
        firsts = [plan.first_reshapes] + [False] * (plan.num_repeated if plan.separate_first
                                                    else plan.num_repeated - 1)
        for reshapes in firsts:
            betas.append(var**0.5)
            projects = config.shortcut == "C" or (config.shortcut == "B" and reshapes)
            var = (1.0 if projects else var) + alpha2
    return tuple(betas)


def block_factory(config: ModelConfig, freeze_norm_stats: bool = False) -> Callable[..., Block]:
    """`partial(Block, ...)` with every field but `width`, `strides`, `preact` and `name`."""
    kit = layer_kit(config, freeze_norm_stats)
    return functools.partial(
        Block,
        kind=config.block,
        dense=config.family == "mlp",
        bottleneck=config.bottleneck,
        layers_per_block=config.layers_per_block or 2,
        activation=kit["activation"],
        kernel_init=kit["kernel_init"],
        bias_init=kit["bias_init"],
        use_bias=kit["use_bias"],
        norm=kit["norm"],
        shortcut=config.shortcut,
        zero_init_residual=config.zero_init_residual,
        residual_scale=config.residual_scale,
        learnable_residual_scale=config.learnable_residual_scale,
        conv_impl=config.conv_impl,
        num_branches=config.num_blocks,
        nf_alpha=config.nf_alpha,
        nf_gamma=theory.nf_gamma(config.activation) if config.block == "nf" else 1.0,
        **kit["dtypes"],
    )


def _stage_segments(plan: StagePlan, make_block: Callable[..., Block], scan: bool,
                    betas: Sequence[float] | None = None):
    """The `Segment`s of a stage (paths within the stage); `betas`: its blocks' (kind 'nf')."""
    def cut(start, n):
        return None if betas is None else tuple(betas[start:start + n])

    specs, k = [], 0
    if plan.separate_first:
        first = functools.partial(make_block, width=plan.width, strides=plan.strides,
                                  preact=plan.first_preact)
        specs.append(Segment(("first", "block"), first, 1, False, cut(0, 1)))
        k = 1
    repeated = functools.partial(make_block, width=plan.width, strides=1)
    if scan and plan.num_repeated:
        specs.append(Segment(("rest", "block"), repeated, plan.num_repeated, True,
                             cut(k, plan.num_repeated)))
    else:
        specs += [Segment((f"rest_{i}", "block"), repeated, 1, False, cut(k + i, 1))
                  for i in range(plan.num_repeated)]
    return specs


def _all_stage_segments(config: ModelConfig, make_block: Callable[..., Block]):
    """`[_stage_segments(...)]` of every stage, with each block's beta for kind 'nf'."""
    betas = nf_betas(config) if config.block == "nf" else None
    out, k = [], 0
    for plan in stage_plan(config):
        n = int(plan.separate_first) + plan.num_repeated
        out.append(_stage_segments(plan, make_block, config.scan,
                                   None if betas is None else betas[k:k + n]))
        k += n
    return out


def segments(config: ModelConfig, freeze_norm_stats: bool = False) -> tuple[Segment, ...]:
    """Every signal segment after `x_0`, in order, with the block and its variables' path."""
    make_block = block_factory(config, freeze_norm_stats)
    return tuple(
        seg._replace(path=(f"stages_{s}",) + seg.path)
        for s, stage in enumerate(_all_stage_segments(config, make_block))
        for seg in stage
    )


STACKED_SCOPE = "rest"  # The scope of a stage's scanned stack (`_stage_segments`).


def is_stacked_path(path: Sequence[Any]) -> bool:
    """A parameter tree path (`jax.tree_util` keys or strings) lies in a scanned stack, its
    leaves stacked on a leading layer axis: some key is `STACKED_SCOPE` (unrolled blocks are
    `rest_0`, `rest_1`, ...)."""
    return any(getattr(k, "key", getattr(k, "name", k)) == STACKED_SCOPE for k in path)


def per_block_sums(config: ModelConfig, tree: Mapping,
                   leaf_fn: Callable[[Array], Array]) -> Array:
    """`[L]`: `sum(leaf_fn(leaf))` over each block's part of a params-shaped tree, in signal
    order `x_1 .. x_L`; a scanned segment's stacked leaves are split per layer."""
    sums = []
    for seg in segments(config):
        sub = tree
        for key in seg.path:
            sub = sub.get(key, {}) if hasattr(sub, "get") else {}
        total = jnp.zeros((seg.length if seg.stacked else 1,), jnp.float32)
        for leaf in jax.tree.leaves(sub):
            values = leaf_fn(leaf)  # float32 at least (float64 stays float64).
            values = values.astype(jnp.promote_types(values.dtype, jnp.float32))
            total = total + jnp.sum(values.reshape(total.shape[0], -1), axis=1)
        sums.append(total)
    return jnp.concatenate(sums)


def per_block_norms(config: ModelConfig, tree: Mapping) -> Array:
    """`[L]`: the 2-norm of each block's part of a params-shaped tree (e.g. gradients)."""
    return jnp.sqrt(per_block_sums(
        config, tree, lambda x: jnp.square(x.astype(jnp.promote_types(x.dtype, jnp.float32)))))


def block_location(config: ModelConfig, index: int) -> str:
    """Where block `index` (1..L, the producer of x_index) lives: `stages_s/first`,
    `stages_s/rest[i]` (i-th layer of a scanned stack) or `stages_s/rest_i`."""
    first = 1
    for seg in segments(config):
        if index < first + seg.length:
            name = "/".join(seg.path[:2])
            return f"{name}[{index - first}]" if seg.stacked else name
        first += seg.length
    raise ValueError(f"block index {index} is outside 1..{config.num_blocks}")


# ----------------------------------------------------------------------------- modules


class _ScanStep(nn.Module):
    """`nn.scan` body: `(x, (perturbation, beta)) -> (y, y)` with
    `y = block(x, beta) + perturbation`; `beta` (kind 'nf', else None) is a scanned input, so
    every layer of a stack gets its own."""

    block_fn: Callable[..., nn.Module]
    train: bool

    @nn.compact
    def __call__(self, x: Array, inputs) -> tuple[Array, Array]:
        perturbation, beta = inputs
        block = self.block_fn(name="block")
        y = block(x, self.train) if beta is None else block(x, self.train, beta)
        if perturbation is not None:
            y = y + perturbation
        return y, y


class Stage(nn.Module):
    """A stage's segments (`_stage_segments`): `x -> (x_out, [outputs [n, B, ...] per segment])`."""

    segments: tuple[Segment, ...]
    remat: bool = False

    @nn.compact
    def __call__(self, x: Array, train: bool, perturbations: Sequence[Array] | None = None):
        # `train` is a field of the step, not an argument, so remat needs no static arguments.
        step_cls = nn.remat(_ScanStep) if self.remat else _ScanStep
        outputs = []
        for k, seg in enumerate(self.segments):
            pert = None if perturbations is None else perturbations[k]
            step = step_cls(block_fn=seg.block, train=train, name=seg.path[0])
            if seg.stacked:
                scanned = nn.scan(
                    lambda module, carry, xs: module(carry, xs),
                    variable_axes={"params": 0, "batch_stats": 0},
                    split_rngs={"params": True},
                    length=seg.length,
                )
                betas = None if seg.betas is None else jnp.asarray(seg.betas, jnp.float32)
                x, ys = scanned(step, x, (pert, betas))
            else:
                beta = None if seg.betas is None else seg.betas[0]
                x, y = step(x, (None if pert is None else pert[0], beta))
                ys = y[None]
            outputs.append(ys)
        return x, outputs


class Network(nn.Module):
    """stem -> stages -> (final norm + activation for v2; gamma-scaled activation for nf) ->
    global average pool -> (Fixup's scalar `head_shift`) -> dense head (zero-init for Fixup).

    Attributes:
      config: the `ModelConfig`.
      freeze_norm_stats: batch-norm statistics are constants under differentiation (per-example
        Jacobians; see `layers.BatchNorm`); not a model field, set it with `.clone(...)`.
    """

    config: ModelConfig
    freeze_norm_stats: bool = False

    def segments(self) -> tuple[Segment, ...]:
        return segments(self.config, self.freeze_norm_stats)

    def num_blocks(self) -> int:
        return self.config.num_blocks

    def setup(self):
        config, kit = self.config, layer_kit(self.config, self.freeze_norm_stats)
        self.stem = STEMS[config.family](config, self.freeze_norm_stats)
        make_block = block_factory(config, self.freeze_norm_stats)
        self.stages = [
            Stage(tuple(segs), config.remat) for segs in _all_stage_segments(config, make_block)
        ]
        if config.block == "v2":
            self.final_norm = kit["norm"](**kit["dtypes"])
        fixup = config.block == "fixup"
        if fixup:  # Fixup's scalar bias before the classifier (the reference's `bias2`).
            self.head_shift = layers.ScalarShift(**kit["dtypes"])
        # Fixup: the classification layer's weight and bias start at 0 (Algorithm 1, step 1).
        zeros = nn.initializers.zeros
        self.head = nn.Dense(config.num_classes,
                             kernel_init=zeros if fixup else kit["kernel_init"],
                             bias_init=zeros if fixup else kit["bias_init"], **kit["dtypes"])

    def embed(self, inputs: Array, train: bool = False) -> Array:
        """x_0 = stem(inputs); inputs `[B, H, W, C]` (conv) or `[B, ...]` (MLP, flattened)."""
        return self.stem(inputs, train)

    def body(self, x0: Array, train: bool = False, perturbations=None):
        """`(x_L, segments)` from `x_0`; `perturbations`: the segments after `x_0`."""
        x, outputs, k = x0, [], 0
        for stage in self.stages:
            n = len(stage.segments)
            x, out = stage(x, train, None if perturbations is None else perturbations[k:k + n])
            outputs += out
            k += n
        return x, tuple(outputs)

    def readout(self, x_last: Array, train: bool = False) -> Array:
        """logits `[B, num_classes]` from `x_L`."""
        config = self.config
        if config.block == "v2":
            x_last = layers.activation(config.activation)(self.final_norm(x_last, train))
        if config.block == "nf":  # The reference's final (gamma-scaled) activation.
            x_last = layers.activation(config.activation)(x_last) * theory.nf_gamma(
                config.activation)
        if x_last.ndim == 4:
            x_last = jnp.mean(x_last, axis=(1, 2))
        if config.block == "fixup":
            x_last = self.head_shift(x_last)
        return self.head(x_last)

    def __call__(self, inputs: Array, train: bool = False, perturbations=None):
        """Returns `(logits [B, num_classes], signals)`; see the module docstring."""
        x0 = self.embed(inputs, train)
        if perturbations is not None:
            x0 = x0 + perturbations[0][0]
            perturbations = perturbations[1:]
        x_last, outputs = self.body(x0, train, perturbations)
        return self.readout(x_last, train), (x0[None],) + outputs


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


def build_model(config: ModelConfig | Mapping[str, Any]) -> Network:
    """A `Network` from a `ModelConfig`, or from a mapping of its fields (dict or ConfigDict;
    missing fields take the family's defaults). Raises ValueError naming a bad field."""
    return Network(ModelConfig.from_dict(config))
