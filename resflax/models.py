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

The topology is pure functions of the config, in `resflax.topology`: `stage_plan(config)` (one
`StagePlan` per stage) and `segments(config)` (one `Segment` per signal segment after `x_0`:
which block, with which variables), so any single block can be applied on its own without
binding the network.

`perturbations`, a tuple shaped like `signals`, is added to every `x_l` right where it is
computed, so `d loss / d perturbations[k][j]` is exactly `d loss / d x_l` for all `l` in ONE
backward pass (diagnostics use it with zeros).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from resflax import layers, theory
from resflax.config import ModelConfig
from resflax.stems import STEMS, layer_kit
from resflax.topology import Segment, block_factory, segments, stage_segments

Array = jax.Array


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
            Stage(tuple(segs), config.remat) for segs in stage_segments(config, make_block)
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
