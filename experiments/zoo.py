"""Prints the model zoo (family, block, depth, parameters, multiply-adds per example) and runs one
jit-compiled training-mode forward pass of each (batch of 8 N(0, 1) inputs) on the default device,
reporting the standard deviation of the logits at initialization.

    python -m experiments.zoo                       # the table, about a minute on 2 CPU cores
    python -m experiments.zoo --nozoo_forward       # costs only (no compile / forward pass)
"""

import time

from absl import app, flags
import jax
import jax.numpy as jnp

import resflax
from resflax import costs

flags.DEFINE_bool("zoo_forward", True, "Run one jit-compiled forward pass of each model.")
FLAGS = flags.FLAGS

# (fields, input shape per example). Plain twins sit next to their ResNets.
ZOO = [
    *[
        (dict(family="cifar_resnet", block=block, depth=depth), (32, 32, 3))
        for depth in (20, 110, 1202)
        for block in ("plain", "v1", "v2")
    ],
    (dict(family="cifar_resnet", block="v2", depth=164, bottleneck=True, shortcut="B"), (32, 32, 3)),
    (dict(family="cifar_resnet", block="v2", depth=1001, bottleneck=True, shortcut="B"), (32, 32, 3)),
    *[
        (dict(family="imagenet_resnet", block="v1", depth=depth), (224, 224, 3))
        for depth in (18, 50, 152)
    ],
    (dict(family="imagenet_resnet", block="v2", depth=50), (224, 224, 3)),
    (dict(family="mlp", block="plain", depth=100, width=256, activation="tanh", init="normal"), (64,)),
    (dict(family="mlp", block="v2", depth=1000, width=256, norm="batch"), (64,)),
]


def describe(fields, shape, forward):
    model = resflax.build_model(fields)
    x = jnp.zeros((1, *shape))
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    row = dict(
        params=costs.count_params(variables["params"]),
        macs=costs.count_macs(lambda v: model.apply(v, x), variables),
        blocks=model.num_blocks(),
        seconds=None,
        logit_std=None,
    )
    if forward:
        # Training mode: batch statistics. (In eval mode at init, batch norm's running statistics
        # are mean 0 / variance 1, so it normalizes nothing and, e.g., a v1 ResNet-1202 overflows.)
        start = time.perf_counter()
        variables = jax.jit(model.init)(jax.random.key(0), x)
        inputs = jax.random.normal(jax.random.key(1), (8, *shape))
        forward_fn = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))
        (logits, _), _ = forward_fn(variables, inputs)
        row["logit_std"] = float(jnp.std(logits))
        row["seconds"] = time.perf_counter() - start
    return row


def main(argv):
    del argv
    print(f"resflax model zoo on {jax.devices()[0].platform.upper()} ({len(jax.devices())} device(s))")
    header = f"{'family':<16}{'block':<6}{'depth':>6}{'blocks':>7}{'bottleneck':>11}" \
             f"{'params':>14}{'MACs/example':>16}{'logit std':>11}{'init+fwd s':>12}"
    print(header)
    print("-" * len(header))
    for fields, shape in ZOO:
        row = describe(fields, shape, FLAGS.zoo_forward)
        resolved = resflax.ModelConfig.from_dict(fields).to_dict()
        seconds = "-" if row["seconds"] is None else f"{row['seconds']:.1f}"
        std = "-" if row["logit_std"] is None else f"{row['logit_std']:.3g}"
        print(
            f"{resolved['family']:<16}{resolved['block']:<6}{resolved['depth']:>6}"
            f"{row['blocks']:>7}{str(resolved['bottleneck']):>11}{row['params']:>14,}"
            f"{row['macs']:>16,}{std:>11}{seconds:>12}",
            flush=True,
        )


if __name__ == "__main__":
    app.run(main)
