"""Trainability on CIFAR-10 (GPU/TPU): the methods of configs/digits_trainability.py on He et al.'s
CIFAR nets at full size.

    python -m experiments.trainability --config=configs/cifar10_trainability.py --workdir=/tmp/trn10
    # the learning-rate tuning first (writes tuning.json; then set LEARNING_RATES below):
    python -m experiments.trainability --config=configs/cifar10_trainability.py \\
        --config.tune=True --workdir=/tmp/trn10_tune

Needs CIFAR-10 prepared as array_record (once, with TensorFlow and network):
`tfds build cifar10 --file_format=array_record` (see resflax/data.py); without it the app stops
before compiling anything with a one-line error naming the dataset and the data_dir.

Nets: `family='cifar_resnet'`, width 16, option-A shortcuts, 20 / 56 / 110 weight layers (n = 3,
9, 18 blocks per stage), every method of `configs.digits_trainability.methods` (plain He, plain
+ BN, critical tanh with delta-orthogonal kernels, v1 + BN, v2 + BN, SkipInit, Fixup,
NF-ResNet, and the shaped plain nets TAT and DKS on scaled delta-orthogonal kernels). Recipe:
He et al. 2015's, shortened to 32k iterations: SGD momentum 0.9, weight decay 1e-4 on every
weight, batch 128, learning rate divided by 10 at 16k and 24k; 45k/5k train/validation split;
4-pixel pad + random crop + flip; no warm-up (every method gets the same recipe; the tuning picks each
rate). 3 seeds.

Learning rates: NOT tuned here (this project's machines have no GPU/TPU for the tuning). The
shipped rates are He et al.'s 0.1 for every method but the shaped plain nets, which take the
digits MLP's tuned 0.001 (TAT) and 0.002 (DKS) as placeholders; run the tuning preset above
(each method at 56 layers, seed 0, 30% of the steps, over `config.tuning.learning_rates`) and
copy its `chosen` rates into `LEARNING_RATES` before trusting a comparison. Time: not measured
(about 3x He et al.'s ResNet runs per method and seed: hours per net on one modern GPU for the
110-layer ones).
"""

from configs import cifar10_he2015, digits_trainability

LEARNING_RATES = {name: 0.1 for name in ("plain_he", "plain_bn", "plain_tanh_critical",
                                         "v1_bn", "v2_bn", "skipinit", "fixup", "nf")}
LEARNING_RATES.update(plain_tat=0.001, plain_dks=0.002)  # Placeholders (module docstring).


def get_config():
    config = digits_trainability.get_config("conv")
    he2015 = cifar10_he2015.get_config()
    with config.unlocked():
        config.data = he2015.data
        for name in config.model:
            config.model[name] = None
        config.model.update(dict(family="cifar_resnet", width=16, shortcut="A", num_classes=10))
        config.depths = (20, 56, 110)
        config.methods = digits_trainability.methods(LEARNING_RATES, conv=True)
        config.batch_size, config.eval_batch_size = 128, 1000
        config.num_train_steps = 32000
        config.optim.boundaries = (16000, 24000)
        config.log_every_steps = 100
        config.eval_every_steps = 2000
        config.grad_norm_every_steps = 1000
        config.checkpoint_every_steps = 4000
        config.max_checkpoints_to_keep = 2
        config.progress_every_secs = 120.0
        config.cache_batches = False  # 32k batches of CIFAR do not fit in memory.
        config.diagnostics.batch_size = 64
        config.tuning.learning_rates = (0.01, 0.03, 0.1, 0.3)
        config.tuning.depth = 56
        config.tuning.num_train_steps = 32000 * 3 // 10
    return config
