"""What a scanned train step costs against the unrolled one, with and without batch norm.

    python -m benchmarks.scan_gap    # ~3 min on 2 CPU cores; -> benchmarks/results/scan_gap.json

With oneDNN's convolutions the scanned CIFAR train step was 0.87-0.93x the unrolled one
(`benchmarks/results/onednn.md`). This times resflax's plain-20 (He et al.'s, batch 128, the
train step of `benchmarks.train_step`) scanned and unrolled, with batch norm and with
`norm='none'`, on `conv_impl='auto'` (oneDNN where installed) and `'canonical'` (XLA:CPU's
kernels), all interleaved in one run; rows give images/s and scanned / unrolled.

Flags (`benchmarks.train_step`'s): --window_secs, --repeats, --out.
"""

from __future__ import annotations

import os

import numpy as np
from absl import app, flags

from benchmarks import common, train_step
from experiments import reporting
from resflax import conv

# The timing flags are `benchmarks.train_step`'s (imported above); only the output differs.
FLAGS = flags.FLAGS
FLAGS.set_default("out", os.path.join(os.path.dirname(__file__), "results", "scan_gap.json"))

NET = dict(family="cifar_resnet", block="plain", depth=20)
BATCH = 128


def main(argv):
    del argv
    machine = common.machine()
    rs = np.random.RandomState(0)
    images = rs.randn(BATCH, 32, 32, 3).astype(np.float32)
    labels = rs.randint(0, 10, BATCH).astype(np.int32)
    cases = [(norm, impl) for norm in ("batch", "none") for impl in ("auto", "canonical")]
    steps = {}
    for norm, impl in cases:
        for scan in (True, False):
            fields = dict(NET, norm=norm, conv_impl=impl, scan=scan)
            steps[f"norm={norm} {impl} scan={scan}"] = train_step.resflax_step(
                fields, images, labels)[0]
    timed = common.interleaved_medians(steps, FLAGS.window_secs, FLAGS.repeats)
    img_s = {k: BATCH / v["median_s"] for k, v in timed.items()}
    rows = []
    for norm, impl in cases:
        scanned, unrolled = (img_s[f"norm={norm} {impl} scan={s}"] for s in (True, False))
        rows.append(dict(norm=norm, conv_impl=impl, conv_impl_resolved=conv.resolve_impl(impl),
                         scanned_img_s=scanned, unrolled_img_s=unrolled,
                         scanned_over_unrolled=scanned / unrolled))
        print(f"norm={norm:5s} {conv.resolve_impl(impl):9s} scanned {scanned:6.1f} img/s  "
              f"unrolled {unrolled:6.1f} img/s  ratio {scanned / unrolled:.2f}", flush=True)
    machine["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    reporting.write_json(FLAGS.out, dict(machine=machine, net=NET, batch=BATCH, rows=rows,
                                         timing=timed))
    print(f"-> {FLAGS.out}")


if __name__ == "__main__":
    app.run(main)
