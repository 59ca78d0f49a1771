"""The topology of a network as pure functions of its `ModelConfig`: stages, blocks, segments.

    stage_plan(config)  -> one `StagePlan` per stage (width, stride, a first block of its own?)
    segments(config)    -> one `Segment` per signal segment after x_0: which block (an unbound
                           `Block` factory), where its variables sit, how many (a scanned stack)
    nf_betas(config)    -> NF-ResNets' predicted std of every block input

Nothing here binds a module, so any single block can be applied on its own, and the per-block
reductions of a params-shaped tree (`per_block_sums`, `per_block_norms`) and the names of block
locations (`block_location`, `is_stacked_path`) follow the same plan as `resflax.models.Network`,
which builds stem -> stages of these segments -> head.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from resflax import theory
from resflax.blocks import BOTTLENECK_EXPANSION, Block
from resflax.config import ModelConfig
from resflax.stems import layer_kit

Array = jax.Array

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


def stage_segments(config: ModelConfig, make_block: Callable[..., Block]):
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
        for s, stage in enumerate(stage_segments(config, make_block))
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


