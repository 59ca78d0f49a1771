"""The degradation problem in minutes on a CPU: plain MLPs vs their ResNet twins on digits.

    python -m experiments.degradation --config=configs/digits_degradation.py --workdir=/tmp/deg

About 2 minutes on 2 CPU cores (27 runs: plain, v1 and v2 twins x 8, 20, 56 weight layers x 3
seeds, 400 steps each, about 36 epochs of the 1437 training digits; measured 96 s wall on
2026-12-02, each of the 9 architectures compiled once and shared by its 3 seeds).
A quick look: `--config.seeds='(0,)'`.

The nets: `family='mlp'`, width 64, ReLU, He-normal init, batch norm, 2 dense layers per block
(He et al.'s basic block with dense layers), 3 / 9 / 27 blocks = 8 / 20 / 56 weight layers
(stem + 2 per block + head), the same block fields in every twin. Recipe as He et al. 2015 on
CIFAR, scaled down: SGD momentum 0.9, weight decay 1e-4 on every weight, batch 128, learning
rate 0.05 divided by 10 at 50% and 75% of training; no augmentation. The same learning rate for
every net (no per-net tuning). All runs of a seed see the same batches (`cache_batches`).
"""

import itertools

from configs import train as train_config


def get_config():
    config = train_config.get_config()
    config.model.update(dict(family="mlp", width=64, layers_per_block=2, norm="batch",
                             activation="relu", init="he_normal"))
    config.optim.learning_rate = 0.05
    config.num_train_steps = 400
    config.optim.boundaries = (200, 300)
    config.log_every_steps = 10
    config.eval_every_steps = 100
    config.grad_norm_every_steps = 100
    config.checkpoint_every_steps = 400
    config.max_checkpoints_to_keep = 1
    config.progress_every_secs = 60.0

    blocks, depths = ("plain", "v1", "v2"), (3, 9, 27)
    config.nets = tuple({"model.block": b, "model.depth": d}
                        for b, d in itertools.product(blocks, depths))
    config.seeds = (0, 1, 2)
    config.cache_batches = True  # Runs of one seed share the batches, read once (small data).
    return config
