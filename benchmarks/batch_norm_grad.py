"""Batch norm's closed-form derivative against autodiff of its formula, in the CIFAR train step.

    python -m benchmarks.batch_norm_grad   # ~8 min on 2 CPU cores; -> results/batch_norm_grad.json

`resflax.layers.batch_norm_train` gives batch norm the textbook derivative (two reductions
for the backward pass) instead of autodiff through the two-pass variance. This times the train
step of `benchmarks.train_step` (batch 128 of 32x32x3, He et al.'s recipe, `conv_impl='auto'`)
for each model of --models, scanned and unrolled, with the closed form and with the autodiff
one (the same forward formula, `layers._batch_norm_forward`, traced in its place), all
variants of a model interleaved in one run. Rows: images/s, scanned / unrolled per derivative,
and closed / autodiff per layout. The two derivatives are equal
(`tests/test_batch_norm.py`, float64).

Flags: --grads (closed, autodiff: both by default; one alone times scanned vs unrolled), and
`benchmarks.train_step`'s --models (also `resnet110`), --window_secs, --repeats, --out.
"""

from __future__ import annotations

import contextlib
import os

import numpy as np
from absl import app, flags

from benchmarks import common, train_step
from experiments import reporting
from resflax import conv, layers

FLAGS = flags.FLAGS
FLAGS.set_default("out", os.path.join(os.path.dirname(__file__), "results",
                                      "batch_norm_grad.json"))
FLAGS.set_default("models", ["plain20", "resnet20", "resnet56", "resnet110"])
flags.DEFINE_list("grads", ["closed", "autodiff"],
                  "Batch norm derivatives to time, of closed (resflax's) and autodiff.")
MODELS = {**train_step.MODELS, "resnet110": dict(family="cifar_resnet", block="v1", depth=110)}


@contextlib.contextmanager
def autodiff_batch_norm():
    """Traces `layers.BatchNorm` with autodiff through its forward formula (the "before")."""
    closed = layers.batch_norm_train
    layers.batch_norm_train = layers._batch_norm_forward  # pylint: disable=protected-access
    try:
        yield
    finally:
        layers.batch_norm_train = closed


def main(argv):
    del argv
    train_step.check_models(FLAGS.models, MODELS)
    if not FLAGS.grads or set(FLAGS.grads) - {"closed", "autodiff"}:
        raise app.UsageError(f"--grads={FLAGS.grads}: allowed values closed, autodiff")
    machine = common.machine()
    rs = np.random.RandomState(0)
    images = rs.randn(FLAGS.batch, 32, 32, 3).astype(np.float32)
    labels = rs.randint(0, 10, FLAGS.batch).astype(np.int32)
    rows, details = [], []
    for name in FLAGS.models:
        steps, first = {}, {}
        for grad in FLAGS.grads:
            for scan in (True, False):
                key = f"{grad} scan={scan}"
                fields = dict(MODELS[name], scan=scan, conv_impl="auto")
                with autodiff_batch_norm() if grad == "autodiff" else contextlib.nullcontext():
                    steps[key], first[key] = train_step.resflax_step(fields, images, labels)
        timed = common.interleaved_medians(steps, FLAGS.window_secs, FLAGS.repeats)
        img_s = {k: FLAGS.batch / v["median_s"] for k, v in timed.items()}
        for grad in FLAGS.grads:
            scanned, unrolled = img_s[f"{grad} scan=True"], img_s[f"{grad} scan=False"]
            rows.append(dict(model=name, batch_norm_grad=grad, batch=FLAGS.batch,
                             conv_impl_resolved=conv.resolve_impl("auto"),
                             scanned_img_s=scanned, unrolled_img_s=unrolled,
                             scanned_over_unrolled=scanned / unrolled))
        for scan in (True, False) if len(FLAGS.grads) == 2 else ():
            ratio = img_s[f"closed scan={scan}"] / img_s[f"autodiff scan={scan}"]
            print(f"{name:9s} scan={scan!s:5s} closed {img_s[f'closed scan={scan}']:6.1f} "
                  f"autodiff {img_s[f'autodiff scan={scan}']:6.1f} img/s  closed/autodiff "
                  f"{ratio:.2f}", flush=True)
        for row in rows[-len(FLAGS.grads):]:
            print(f"{name:9s} {row['batch_norm_grad']:8s} scanned/unrolled "
                  f"{row['scanned_over_unrolled']:.2f}", flush=True)
        details.append(dict(model=name, images_per_sec=img_s, first_step_s=first,
                            timing=timed))
    machine["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    reporting.write_json(FLAGS.out, dict(machine=machine, rows=rows, details=details))
    print(f"-> {FLAGS.out}")


if __name__ == "__main__":
    app.run(main)
