"""Train-step throughput of CIFAR ResNet-20 (He et al. 2015), batch 128, on this machine.

    python -m benchmarks.train_throughput            # writes benchmarks/train_throughput.json

Times `resflax.train.make_train_step` (the jitted, sharded step with He et al.'s SGD recipe) on
one fixed synthetic batch already on the device: forward, backward, optimizer update and the
non-finite guard; no input pipeline. Reports images/s from the median of `--repeats` timed
windows (each at least `--window_secs`, after a warm-up step) and the first step's time with
compilation, for the default build (repeated blocks as one `nn.scan`) and the unrolled one
(`scan=False`): on XLA:CPU the backward pass of a convolution inside a loop body does not get
the fast convolution kernels, so the scanned ResNet trains far slower on a CPU. Not run by
tests; the machine's load average goes into the JSON (shared machines make timings noisy).
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import time

import jax
import numpy as np
from absl import app, flags

from experiments import reporting
from resflax import build_model, parallel, train
from configs import cifar10_he2015

flags.DEFINE_integer("batch_size", 128, "Global batch size.")
flags.DEFINE_integer("depth", 20, "CIFAR ResNet depth (6n+2).")
flags.DEFINE_float("window_secs", 5.0, "Minimum length of a timed window.")
flags.DEFINE_integer("repeats", 3, "Timed windows per variant.")
flags.DEFINE_string("out", os.path.join(os.path.dirname(__file__), "train_throughput.json"),
                    "Output JSON file.")
FLAGS = flags.FLAGS

# He et al. 2015's recipe, from its one source: the CIFAR-10 config.
OPTIM = cifar10_he2015.get_config().optim


def measure(scan: bool) -> dict:
    """Images/s of the train step of ResNet-`depth` built with `scan` (repeated blocks as one
    `nn.scan`, the default, or unrolled)."""
    model = build_model(dict(family="cifar_resnet", block="v1", depth=FLAGS.depth, width=16,
                             scan=scan))
    mesh = parallel.make_mesh()
    rs = np.random.RandomState(0)
    batch = parallel.global_batch(mesh, {
        "image": rs.randn(FLAGS.batch_size, 32, 32, 3).astype(np.float32),
        "label": rs.randint(0, 10, FLAGS.batch_size).astype(np.int32),
    })
    state = train.create_train_state(model, OPTIM, jax.random.key(0), batch["image"], mesh)
    step = train.make_train_step(model, OPTIM, mesh)

    start = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    steps = max(1, math.ceil(FLAGS.window_secs / (time.perf_counter() - start)))

    windows = []
    for _ in range(FLAGS.repeats):
        start = time.perf_counter()
        for _ in range(steps):
            state, metrics = step(state, batch)
        jax.block_until_ready((state, metrics))
        windows.append((time.perf_counter() - start) / steps)
    step_s = statistics.median(windows)
    return {
        "scan": scan,
        "images_per_sec": FLAGS.batch_size / step_s,
        "step_ms_median": 1e3 * step_s,
        "step_ms_windows": [1e3 * w for w in windows],
        "steps_per_window": steps,
        "first_step_with_compile_s": compile_s,
        "loss_finite": bool(metrics["finite"]),
    }


def main(argv):
    del argv
    variants = [measure(scan=True), measure(scan=False)]
    result = {
        "model": f"cifar_resnet v1 depth {FLAGS.depth} (ResNet-{FLAGS.depth}), width 16",
        "batch_size": FLAGS.batch_size,
        "images_per_sec": variants[0]["images_per_sec"],  # The default build (scan=True).
        "variants": variants,
        "devices": [str(d) for d in jax.devices()],
        "cpu_count": os.cpu_count(),
        "load_average_1min": os.getloadavg()[0],
        "machine": platform.processor() or platform.machine(),
        "jax": jax.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }
    reporting.write_json(FLAGS.out, result)
    for v in variants:
        print(f"ResNet-{FLAGS.depth}, batch {FLAGS.batch_size}, scan={v['scan']}: "
              f"{v['images_per_sec']:.1f} images/s ({v['step_ms_median']:.0f} ms/step; first "
              f"step with compile {v['first_step_with_compile_s']:.1f} s)")
    print(f"-> {FLAGS.out}")


if __name__ == "__main__":
    app.run(main)
