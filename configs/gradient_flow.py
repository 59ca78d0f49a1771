"""Gradient flow at initialization: plain vs ResNet v1 vs v2 MLPs and CIFAR conv nets on the digits.

    python -m experiments.gradient_flow --config=configs/gradient_flow.py --workdir=runs/gradient_flow

About 2 minutes on 2 CPU cores, imports and compiling included (135 s wall at load ~1.6,
2026-11-25, 100 s of it compiling: the 12 MLPs about 3.5 s each to compile and under 0.3 s per
seed, the 1,000-block one 2.2 s; each CIFAR-56 twin about 15 s to compile and 3-4 s per seed).
One program per net, which every seed reuses. `XLA_FLAGS=--xla_backend_optimization_level=0`
compiles these programs faster but runs them ~2.6x slower: no gain end to end, so the app leaves
the default. The diagnostics are `resflax.diagnostics.Options()` except `exact_max_dim` (below).

The default preset is the demo sweep below: MLPs of width 64 on one fixed batch of 64 real
handwritten digits, from 10 to 1,000 blocks, 2 seeds each. It shows (docs/design.md, Diagnostics and Theory), in
act_grad_sq[0] / act_grad_sq[L] over 100 blocks:
- plain nets: Glorot on ReLU halves the squared gradient per layer (chi_1 = 1/2: 2e-30 ~ 2^-100),
  He keeps it of order 1 (chi_1 = 1); tanh with Glorot vanishes slowly (1e-3), sigmoid fast (to
  0.0 in float32; the theory says ~1e-128); batch norm in a plain net makes gradients explode
  towards the input (~3e17);
- v1 (post-activation) without norm: the signal doubles per block and overflows float32 (inf);
- v2 (pre-activation): without norm the signal doubles per block too (~1e29); with batch norm
  it grows linearly (De & Smith 2020), and the gradient only by ~600 over 100 blocks and ~2e4
  over 1,000 blocks.
The mean-field theory (`resflax.theory.predict`) is drawn dashed where it applies (plain MLPs
without norm, v2 MLPs with and without batch norm). Then He et al.'s conv twins, CIFAR plain-56,
v1-56 and v2-56 (27 blocks each) on the same digits: the plain net's squared gradient grows ~1e7
towards the input, the residual twins' by ~500 (v1) and ~400-700 (v2).

The seeds' nets at full size (32x32x3, batch 64, 2 seeds, everything): ResNet-56 and plain-56 in
54-82 s each on 2 cores (`:single` with the flags below and `--config.data.name=gaussian
--config.data.input_dim='(32, 32, 3)'`).

Preset `single` (`--config=configs/gradient_flow.py:single`) runs just `config.model`, and every
field of it can be overridden, e.g.
    --config.model.block=v2 --config.model.depth=1000 --config.model.norm=batch
    --config.model.family=cifar_resnet --config.model.depth=56 --config.model.block=v1
(a family given on the command line starts from that family's defaults: this is He et al.'s
ResNet-56, width 16, batch norm, option A; the digits are 8x8x1 images, fine as they are for
`cifar_resnet`), or on random inputs:
    --config.data.name=gaussian --config.data.input_dim='(32, 32, 3)'
"""

import dataclasses

import ml_collections
from ml_collections import config_dict

import resflax.config
from resflax import diagnostics

# The demo sweep: per net, a label and dotted overrides of the config (experiments.common);
# fields not given come from `config.model` (a new family: from that family's defaults).
# Glorot ('glorot_normal') on square layers is sigma_w^2 = 1, He ('he_normal') sigma_w^2 = 2.
SWEEP = (
    {"name": "plain relu He L=10", "model.depth": 10},
    {"name": "plain relu He", "model.depth": 100},
    {"name": "plain relu Glorot", "model.depth": 100, "model.init": "glorot_normal"},
    {"name": "plain tanh Glorot", "model.depth": 100, "model.activation": "tanh",
     "model.init": "glorot_normal"},
    {"name": "plain sigmoid Glorot", "model.depth": 100, "model.activation": "sigmoid",
     "model.init": "glorot_normal"},
    {"name": "plain relu He +BN", "model.depth": 100, "model.norm": "batch"},
    {"name": "v1 relu He", "model.depth": 100, "model.block": "v1"},
    {"name": "v1 relu He +BN", "model.depth": 100, "model.block": "v1", "model.norm": "batch"},
    {"name": "v2 relu He", "model.depth": 100, "model.block": "v2"},
    {"name": "v2 tanh Glorot", "model.depth": 100, "model.block": "v2", "model.activation": "tanh",
     "model.init": "glorot_normal"},
    {"name": "v2 relu He +BN", "model.depth": 100, "model.block": "v2", "model.norm": "batch"},
    {"name": "v2 relu He +BN L=1000", "model.depth": 1000, "model.block": "v2", "model.norm": "batch"},
    # The convolutional twins of He et al. 2015 / 2016 (CIFAR family: 3x3 convs, widths 16-32-64,
    # batch norm, option-A shortcuts; 56 weight layers = 27 blocks) on the same digits (8x8x1).
    *(
        {"name": f"CIFAR {block}-56", "model.family": "cifar_resnet", "model.block": block,
         "model.depth": 56}
        for block in ("plain", "v1", "v2")
    ),
)


def get_config(preset: str | None = None) -> ml_collections.ConfigDict:
    if preset not in (None, "", "sweep", "single"):
        raise ValueError(f"preset={preset!r} is not supported; allowed values: ['single', 'sweep']")
    config = ml_collections.ConfigDict()

    # Every resflax.ModelConfig field (None: the family's default). The base of every sweep
    # entry; --config.model.family=cifar_resnet starts from that family's defaults.
    config.model = resflax.config.config_dict(
        family="mlp", block="plain", depth=10, width=64, layers_per_block=1, norm="none",
        activation="relu", init="he_normal", num_classes=10,
    )
    # One dict per net: dotted overrides ("model.depth": 100, ...) and an optional "name" (its
    # label in the table and plots). Empty: one net, `config.model` itself.
    config.sweep = () if preset == "single" else SWEEP

    config.data = ml_collections.ConfigDict(
        dict(
            # 'digits' (embedded, offline), 'gaussian' (iid N(0, 1) inputs, uniform random
            # labels), or any tfds image-classification dataset prepared in data_dir.
            name="digits",
            data_dir=config_dict.placeholder(str),  # None: the tfds default directory.
            split="train",  # The batch is the first batch_size examples of this split.
            input_dim=(64,),  # gaussian only: the shape of one input, e.g. (32, 32, 3) for convs.
            seed=0,  # gaussian only: the inputs and labels (the same for every model seed).
        )
    )
    config.batch_size = 64
    config.seeds = (0, 1)  # Each seed: a fresh initialization and fresh random probes.

    # Fields of resflax.diagnostics.Options (see its docstring).
    config.diagnostics = ml_collections.ConfigDict(
        dataclasses.asdict(diagnostics.Options())
    )
    if preset != "single":
        # The MLPs' 64 features stay exact; the conv nets' last stage on 8x8 digits (2x2x64 =
        # 256 features) gets Hutchinson (4 probes, standard error reported) instead of 256
        # exact jvps per block: 5 s per net and seed.
        config.diagnostics.exact_max_dim = 128
    return config
