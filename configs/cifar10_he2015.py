"""He et al. 2015's CIFAR-10 experiment (Sec. 4.2, Fig. 6, Table 6), with the paper's recipe.

    python -m experiments.degradation --config=configs/cifar10_he2015.py --workdir=/tmp/he2015
    # one net per machine, e.g.:
    python -m experiments.degradation --config=configs/cifar10_he2015.py --workdir=/tmp/he2015 \\
        --config.nets='({"model.block": "plain", "model.depth": 56},)'
    # or a single run of the same recipe:
    python -m experiments.train --config=configs/cifar10_he2015.py --workdir=/tmp/r56 \\
        --config.model.depth=56

Needs CIFAR-10 prepared as array_record (once, with TensorFlow and network):
`tfds build cifar10 --file_format=array_record` (see resflax/data.py).

Nets: plain and ResNet (v1, option-A shortcuts) with 20, 32, 44, 56, 110 layers; ResNet-1202;
pre-activation (v2) bottleneck ResNet-164 and ResNet-1001 (He et al. 2016). Recipe: SGD momentum
0.9, weight decay 1e-4 on every weight (BN and biases included), batch 128, learning rate 0.1
divided by 10 at 32k and 48k iterations, stop at 64k; 45k/5k train/validation split; 4-pixel
pad + random 32x32 crop + horizontal flip. He et al. warm up ResNet-110 at lr 0.01 for about 400
iterations; here every net of depth >= 110 does (for 1202, 164 and 1001 that is our choice).
Evaluation is on the 5k validation images; for test error pass
`--config.data.eval_split=test`.

Time: not measured here (this project's machines have no GPU/TPU for these checks). The train
step of ResNet-20 runs at ~230 images/s on a 2-core CPU (benchmarks/results/train_step.json),
about 10 hours for 64k steps; on one modern GPU expect minutes per thousand steps for the small nets
and hours for ResNet-1202 / ResNet-1001 (use --config.model.remat=True if memory runs out). The
input pipeline runs in `data.worker_count` grain worker processes to keep up with a GPU.
"""

from configs import train as train_config
import resflax.config


def get_config():
    config = train_config.get_config()
    config.data.update(dict(
        name="cifar10", train_split="train[:45000]", eval_split="train[45000:]", augment="cifar",
        worker_count=8,
    ))
    config.model = resflax.config.config_dict(
        family="cifar_resnet", block="v1", depth=20, width=16, norm="batch", shortcut="A",
        activation="relu", init="he_normal", num_classes=10,
    )
    config.optim.update(dict(
        name="sgd", learning_rate=0.1, momentum=0.9, nesterov=False, weight_decay=1e-4,
        weight_decay_mask="all", schedule="piecewise", boundaries=(32000, 48000),
        decay_factor=0.1, warmup_steps=0,
    ))
    config.batch_size = 128
    config.eval_batch_size = 1000  # 5 batches of the 5k validation images; divides 8 devices.
    config.num_train_steps = 64000
    config.log_every_steps = 100
    config.eval_every_steps = 2000
    config.grad_norm_every_steps = 1000
    config.checkpoint_every_steps = 4000
    config.max_checkpoints_to_keep = 2
    config.progress_every_secs = 120.0

    warmup = {"optim.warmup_steps": 400, "optim.warmup_lr": 0.01}
    nets = [{"model.block": b, "model.depth": d} for b in ("plain", "v1") for d in (20, 32, 44, 56)]
    nets += [{"model.block": b, "model.depth": 110, **warmup} for b in ("plain", "v1")]
    nets += [{"model.block": "v1", "model.depth": 1202, **warmup}]
    # He et al. 2016 (and resflax's zoo): projection shortcuts (B) in the pre-activation nets.
    nets += [{"model.block": "v2", "model.depth": d, "model.bottleneck": True,
              "model.shortcut": "B", **warmup} for d in (164, 1001)]
    config.nets = tuple(nets)
    config.seeds = (0,)
    config.cache_batches = False  # 64k batches of CIFAR do not fit in memory.
    return config
