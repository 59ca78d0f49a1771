"""Trainability of deep plain nets, method by method, against their ResNet twins, on the digits.

    python -m experiments.trainability --config=configs/digits_trainability.py --workdir=/tmp/trn
    # the learning-rate tuning that chose the shipped rates (writes tuning.json):
    python -m experiments.trainability --config=configs/digits_trainability.py \
        --config.tune=True --workdir=/tmp/trn_tune

Presets: `mlp` (the default) and `conv`. Every method of `methods()` is trained at every depth
of `config.depths` with every seed (3) with one recipe; only the learning rate is per method
(and preset).

- `mlp`: `family='mlp'`, width 64, 2 dense layers per block, 3 / 27 / 54 blocks = 8 / 56 / 110
  weight layers (stem + 2 per block + head). Batch 128, 1000 steps (89 epochs of the 1437
  training digits). Rates tuned at the deepest depth, 110 weight layers: the question is
  whether a method trains the deep net at all.
- `conv`: He et al.'s CIFAR family at digits size (8x8x1 inputs: stages at 8x8, 4x4 and 2x2),
  n = 1 / 9 / 18 blocks per stage = 8 / 56 / 110 weight layers, option-A shortcuts, width 8
  (He et al.: 16; halved to cut its time on 2 CPU cores), batch 32, 400 steps. Kernel
  shaping (TAT, DKS) on the plain CIFAR net: delta-orthogonal weights rescaled at the widening
  convs (`init='scaled_delta_orthogonal'`, DKS's SUO-Delta), L = weight layers - 1 shaped
  layers (`resflax.kernel_shaping.nonlinear_depth`). Two runs train at once in separate
  processes on CPU (`config.workers = 2`, `experiments.workers`): 1.6x faster on 2 cores, same
  records.

Methods (`methods()`; adding one is one more entry):
- `plain_he`: plain ReLU net, He-normal init, no normalization.
- `plain_bn`: plain ReLU net, He-normal, batch norm (He et al. 2015's plain baseline).
- `plain_tanh_critical`: plain tanh net, no normalization, orthogonal (MLP) or delta-orthogonal
  (conv; Xiao et al. 2018) weights at the edge of chaos: sigma_b^2 = 0.01 and sigma_w^2 from
  `resflax.theory.critical_sigma_w2('tanh', 0.01)` (computed here, = 1.4242).
- `plain_tat`: plain Leaky-ReLU net with Tailored Activation Transformation (Zhang et al.
  2022): orthogonal (MLP) or scaled delta-orthogonal (conv) weights, no bias, the slope solved
  so that the net's C-map has C_f(0) = `TAT_ETA` (0.7).
- `plain_dks`: plain tanh net with Deep Kernel Shaping (Martens et al. 2021): orthogonal (MLP)
  or scaled delta-orthogonal (conv) weights, no bias, phi_hat = gamma (tanh(alpha x + beta) +
  delta) solved for C_f'(1) = `DKS_XI` (1.5).
- `v1_bn`, `v2_bn`: the ResNet twins, post- (He et al. 2015) and pre-activation (He et al. 2016),
  He-normal, batch norm: the reference (`config.reference`) the gap is measured against.
- `skipinit`: v2 residual net without normalization, the residual branch times a learnable
  scalar that starts at 0 (De & Smith 2020).
- `fixup`: Fixup (Zhang et al. 2019): residual, no normalization, branches rescaled by
  L^(-1/(2m-2)), last layers and head at 0, scalar biases and multipliers.
- `nf`: NF-ResNet (Brock et al. 2021): residual, no normalization, scaled weight
  standardization, x + alpha f(x / beta) with analytic betas, alpha 0.2.

Recipe (He et al. 2015 scaled down, the digits_degradation recipe): SGD momentum 0.9, weight
decay 1e-4 on every weight, learning rate divided by 10 at 50% and 75% of training, no
augmentation, no warm-up, no clipping. All runs of a seed see the same batches
(`cache_batches`).

Learning rates: tuned once per method and preset, then fixed for every depth and seed. The
tuning run (`--config.tune=True`, `config.tuning`) trains each method at `config.tuning.depth`
(the deepest depth, 110 weight layers) with seed 0 for 30% of the steps
(`config.tuning.num_train_steps`, boundaries scaled alike) at every rate of
`config.tuning.learning_rates`, and picks the rate of the lowest final training loss (a run
stopped on a non-finite step counts as +inf); `tuning.json` holds the grid and the choice. The
shipped rates (`LEARNING_RATES`) are those choices, measured 2026-12-02 16:34-16:42 UTC on the
project's 2-core CPU VM (load 1.5-2.1; 480 s for the 90 runs). Final training loss after 300
steps at 110 weight layers:

| method | lr 0.0005 | lr 0.001 | lr 0.002 | lr 0.005 | lr 0.01 | lr 0.02 | lr 0.05 | lr 0.1 | lr 0.2 |
|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|
| plain_he | 2.0717 | **1.8769** | 1.9791 | 2.3031 | 2.2983 | 2.3029 | 2.3050 | 2.3028 | diverged |
| plain_bn | 2.4682 | 2.3796 | 2.3323 | 2.2734 | 2.2987 | 2.2974 | 2.2831 | **2.2726** | 2.2983 |
| plain_tanh_critical | 0.2625 | 0.1217 | 0.0600 | **0.0552** | 2.3028 | 2.3029 | 2.3029 | 2.3029 | 2.3032 |
| v1_bn | 0.3533 | 0.1507 | 0.0665 | 0.0267 | 0.0172 | **0.0128** | 0.0465 | 0.4990 | 1.9719 |
| v2_bn | 1.5980 | 1.1149 | 0.5938 | 0.1772 | 0.0589 | 0.0179 | 0.0065 | 0.0050 | **0.0047** |
| skipinit | 0.9331 | 0.4582 | 0.1892 | 0.0253 | 0.0039 | 0.0008 | **0.0004** | 0.0014 | diverged |
| fixup | 1.6347 | 1.0384 | 0.4716 | 0.1755 | 0.0863 | 0.0313 | **0.0039** | 2.3029 | 2.3027 |
| nf | 0.2526 | 0.1293 | 0.0598 | 0.0161 | 0.0042 | 0.0016 | **0.0006** | 0.0025 | 2.3028 |
| plain_tat | 0.0056 | **0.0044** | 0.0083 | diverged | diverged | diverged | diverged | diverged | diverged |
| plain_dks | 0.0052 | 0.0014 | **0.0006** | 2.3121 | 2.3303 | 2.5564 | 2.9373 | 144.5062 | 75.5273 |

The plain ReLU nets are at chance (ln 10 = 2.303) or near it at every rate, so their choice is
noise; v2_bn's is at the top of the grid (its loss still falls with the rate). The plain nets
whose every layer gets the gradient at init (orthogonal, shaped, no norm) need rates 10-100x
smaller than the residual ones: their function moves by about lr x depth per step. `conv`: tuned at 56 weight layers
(`config.tuning.depth`; 110 would have doubled the time), seed 0, 120 steps, on the grid
0.001-0.3, measured 2026-12-03 13:36-14:17 UTC on the same VM shared with other jobs (load
2.6-7; one restart after the machine ran out of memory, reusing the completed runs). Final
training loss:

| method | lr 0.001 | lr 0.003 | lr 0.01 | lr 0.03 | lr 0.1 | lr 0.3 |
|---|---:|---:|---:|---:|---:|---:|
| plain_he | 2.3023 | 2.3019 | 2.3002 | 2.2973 | **2.2942** | 2.3021 |
| plain_bn | 2.2391 | 2.0111 | 1.9578 | **1.8211** | 2.0554 | 2.2878 |
| plain_tanh_critical | 1.4936 | 0.8491 | **0.2489** | 1.3454 | 2.3321 | 2.3227 |
| v1_bn | 0.6573 | 0.2101 | **0.0877** | 0.1865 | 1.3649 | 2.1670 |
| v2_bn | 2.0013 | 1.2960 | 0.5667 | **0.2589** | 0.3258 | 0.4089 |
| skipinit | 2.2955 | 2.2508 | 2.0331 | 0.1999 | **0.1951** | diverged |
| fixup | 2.2937 | 2.2757 | 2.1933 | 0.8158 | **0.2992** | 2.3044 |
| nf | 2.0600 | 1.3062 | 0.1990 | **0.0731** | 0.0953 | 1.4017 |
| plain_tat | 0.2434 | **0.1823** | diverged | diverged | diverged | diverged |
| plain_dks | **0.0920** | 0.1320 | 2.3182 | 25.7045 | 95.3286 | 909.2992 |

As for the MLPs, plain_he is at chance at every rate (its choice is noise) and the shaped plain
nets need the smallest rates; plain_dks's is at the bottom of the grid.

The gap: for each method and depth, `gap` = its mean final training loss minus the best mean of
the `config.reference` twins at that depth; the method closes the degradation gap there when
`gap <= config.margin` (0.05 nats, absolute: final losses are near 0 for the twins).
"""

import math

import ml_collections

from configs import digits_degradation
from resflax import theory

PRESETS = ("mlp", "conv")
SIGMA_B2 = 0.01  # The critical tanh net's bias variance.
# TAT's C_f(0) target: the paper's 0.9 is out of reach at the shallowest net (L = 6 nonlinear
# layers: at most about 0.75), 0.7 is reachable at every depth here. DKS's C_f'(1): the paper's.
TAT_ETA = 0.7
DKS_XI = 1.5

# Per preset and method: the learning rate chosen by the tuning run (module docstring).
LEARNING_RATES = {
    "mlp": {"plain_he": 0.001, "plain_bn": 0.1, "plain_tanh_critical": 0.005, "v1_bn": 0.02,
            "v2_bn": 0.2, "skipinit": 0.05, "fixup": 0.05, "nf": 0.05, "plain_tat": 0.001,
            "plain_dks": 0.002},
    # Tuned at 56 weight layers (module docstring).
    "conv": {"plain_he": 0.1, "plain_bn": 0.03, "plain_tanh_critical": 0.01, "v1_bn": 0.01,
             "v2_bn": 0.03, "skipinit": 0.1, "fixup": 0.1, "nf": 0.03, "plain_tat": 0.003,
             "plain_dks": 0.001},
}


def methods(learning_rates: dict[str, float], conv: bool) -> tuple[dict, ...]:
    """One dict per method: its `name` and dotted overrides of the run config (the model's
    fields and the learning rate `learning_rates[name]`), `experiments.common`'s convention;
    `conv`: delta-orthogonal instead of orthogonal weights for the critical tanh net, and its
    q-preserving rescaling at the widening convs for the shaped ones."""
    lr = learning_rates
    critical_init = "delta_orthogonal" if conv else "orthogonal"
    relu_he = {"model.activation": "relu", "model.init": "he_normal"}
    entries = (
        {"name": "plain_he", "model.block": "plain", "model.norm": "none", **relu_he},
        {"name": "plain_bn", "model.block": "plain", "model.norm": "batch", **relu_he},
        {"name": "plain_tanh_critical", "model.block": "plain", "model.norm": "none",
         "model.activation": "tanh", "model.init": critical_init,
         "model.weight_scale": math.sqrt(theory.critical_sigma_w2("tanh", SIGMA_B2)),
         "model.bias_scale": math.sqrt(SIGMA_B2)},
        {"name": "v1_bn", "model.block": "v1", "model.norm": "batch", **relu_he},
        {"name": "v2_bn", "model.block": "v2", "model.norm": "batch", **relu_he},
        {"name": "skipinit", "model.block": "v2", "model.norm": "none", **relu_he,
         "model.learnable_residual_scale": True, "model.residual_scale": 0.0},
        {"name": "fixup", "model.block": "fixup", "model.norm": "none", **relu_he},
        {"name": "nf", "model.block": "nf", "model.norm": "none", "model.shortcut": "B",
         **relu_he},
    )
    # Kernel shaping's q-preserving weights (resflax.kernel_shaping).
    shaped = {"model.block": "plain", "model.norm": "none",
              "model.init": "scaled_delta_orthogonal" if conv else "orthogonal",
              "model.weight_scale": 1.0, "model.bias_scale": 0.0}
    entries += (
        {"name": "plain_tat", **shaped, "model.activation": "leaky_relu",
         "model.activation_transform": "tat", "model.shaping_target": TAT_ETA},
        {"name": "plain_dks", **shaped, "model.activation": "tanh",
         "model.activation_transform": "dks", "model.shaping_target": DKS_XI},
    )
    return tuple({**m, "optim.learning_rate": lr[m["name"]]} for m in entries)


def _model(config: ml_collections.ConfigDict, preset: str) -> None:
    if preset == "mlp":
        config.model.update(dict(family="mlp", width=64, layers_per_block=2))
        config.depths = (3, 27, 54)  # Blocks: 8 / 56 / 110 weight layers.
        config.batch_size, config.num_train_steps = 128, 1000
    else:
        for name in config.model:
            config.model[name] = None  # The CIFAR family's defaults, then:
        config.model.update(dict(family="cifar_resnet", width=8, shortcut="A", num_classes=10))
        config.depths = (8, 56, 110)  # Weight layers 6n + 2, n = 1 / 9 / 18.
        config.batch_size, config.num_train_steps = 32, 400


def get_config(preset: str | None = None) -> ml_collections.ConfigDict:
    preset = preset or "mlp"
    if preset not in PRESETS:
        raise ValueError(f"preset={preset!r} is not supported; allowed values: {list(PRESETS)}")
    config = digits_degradation.get_config()
    with config.unlocked():
        del config.nets
        _model(config, preset)
        steps = config.num_train_steps
        config.optim.boundaries = (steps // 2, 3 * steps // 4)
        config.log_every_steps = 10
        config.eval_every_steps = steps // 4
        config.grad_norm_every_steps = steps // 4
        config.checkpoint_every_steps = steps
        config.methods = methods(LEARNING_RATES[preset], conv=preset == "conv")
        config.seeds = (0, 1, 2)
        config.cache_batches = True
        # Processes training runs at once on the CPU backend (`experiments.workers`; one
        # process on GPU/TPU). The records do not depend on it. conv: two runs of these small
        # nets at once train 1.5x faster on 2 cores than one after another.
        config.workers = 2 if preset == "conv" else 1
        config.reference = ("v1_bn", "v2_bn")  # The ResNet twins the gap is measured against.
        config.margin = 0.05  # Closes the gap: mean final train loss <= best twin's + margin.

        # Init diagnostics of every run, on the first `batch_size` training digits, at the
        # run's own initialization (train-mode batch norm): act_grad_sq per block and the SLQ
        # singular-value spectrum of dx_L/dx_0 with `slq_steps` Lanczos steps.
        config.diagnostics = ml_collections.ConfigDict(dict(batch_size=32, slq_steps=24))

        # The learning-rate tuning (--config.tune=True): the methods at `depth` with `seeds`,
        # `num_train_steps` steps (the schedule's boundaries scaled by the same fraction), at
        # every rate of `learning_rates`.
        config.tune = False
        # conv: a coarser grid (each rate is one more compile per method), down to 1e-3 for the
        # critical and shaped plain nets.
        # The MLP grid reaches down to 5e-4: a deep plain net whose every layer gets the
        # gradient (orthogonal / shaped, no norm) moves its function by ~lr x depth per step.
        rates = ((0.001, 0.003, 0.01, 0.03, 0.1, 0.3) if preset == "conv"
                 else (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2))
        config.tuning = ml_collections.ConfigDict(dict(
            learning_rates=rates,
            depth=config.depths[-1 if preset == "mlp" else 1],
            seeds=(0,),
            num_train_steps=steps * 3 // 10,
        ))
    return config
