"""One training run: a 20-layer residual MLP (ResNet v1, batch norm) on the embedded digits.

    python -m experiments.train --config=configs/train.py --workdir=/tmp/train

About 30 s on 2 CPU cores (600 steps, about 10 s of it compiling). Any field can be overridden, e.g. the plain twin:
`--config.model.block=plain`. For CIFAR-10 use configs/cifar10_he2015.py (the same fields,
He et al.'s recipe). Every field is documented inline.
"""

import ml_collections
from ml_collections import config_dict

import resflax.config


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0  # Initialization and data order.

    config.data = ml_collections.ConfigDict(
        dict(
            name="digits",  # Any tfds image-classification dataset prepared as array_record.
            data_dir=config_dict.placeholder(str),  # None: tfds' default, ~/tensorflow_datasets.
            train_split="train",
            eval_split="test",
            augment="none",  # 'none' | 'cifar' (pad 4 + random crop + flip).
            image_size=config_dict.placeholder(int),  # Resize + center crop (variable-size data).
            worker_count=0,  # grain worker processes.
            read_threads=0,  # grain reader threads (0: read in the loop; fastest on small data).
        )
    )

    # Every resflax.ModelConfig field; those not given here are None, the family's default.
    # depth counts blocks for the MLP: 9 blocks x 2 layers + stem + head = 20 weight layers.
    # --config.model.family=cifar_resnet starts from that family's defaults (He et al.'s nets).
    config.model = resflax.config.config_dict(
        family="mlp", block="v1", depth=9, width=64, layers_per_block=2, norm="batch",
        activation="relu", init="he_normal", num_classes=10,
    )

    config.optim = ml_collections.ConfigDict(
        dict(
            name="sgd",  # 'sgd' | 'adam' | 'adamw'
            learning_rate=0.05,
            momentum=0.9,
            nesterov=False,
            weight_decay=1e-4,
            weight_decay_mask="all",  # 'all' (He et al. 2015) | 'kernels'
            clip_global_norm=config_dict.placeholder(float),
            adaptive_clip=config_dict.placeholder(float),
            schedule="piecewise",  # 'constant' | 'piecewise' | 'cosine'
            boundaries=(300, 450),  # piecewise: lr x decay_factor at each boundary (steps).
            decay_factor=0.1,
            warmup_steps=0,  # Constant warm-up at warmup_lr (He et al.'s ResNet-110).
            warmup_lr=config_dict.placeholder(float),
            total_steps=config_dict.placeholder(int),  # cosine; None: num_train_steps.
        )
    )

    config.batch_size = 128  # Global, over all processes and devices.
    config.eval_batch_size = 256
    config.num_train_steps = 600
    config.log_every_steps = 20
    config.eval_every_steps = 100  # 0: only at the end.
    config.grad_norm_every_steps = 100  # Per-block gradient norms; 0: never.
    config.checkpoint_every_steps = 200
    config.max_checkpoints_to_keep = 2
    config.progress_every_secs = 30.0
    config.num_devices = config_dict.placeholder(int)  # None: all devices.
    config.stop_at_step = config_dict.placeholder(int)  # Simulated preemption at this step.
    # A step whose loss, activations, gradients or new state is not finite is never applied;
    # 'stop' ends the run (status stopped_nonfinite), 'skip_step' drops that batch and goes on
    # (at most max_skips in a row). Either way the log names where the values went non-finite.
    config.on_nonfinite = "stop"  # 'stop' | 'skip_step'
    config.max_skips = 10
    # Warn (log and summary.json) when the step-0 per-block gradient norms span more than this
    # factor; 0 disables the check.
    config.grad_spread_warning = 1e6
    return config
