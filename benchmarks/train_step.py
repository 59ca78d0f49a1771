"""Train-step throughput: resflax (scanned and unrolled) vs a PyTorch implementation of the same nets.

    pip install -e '.[bench,onednn]'     # PyTorch (CPU or GPU build); oneDNN (optional)
    python -m benchmarks.train_step      # ~4 min on 2 CPU cores; writes benchmarks/results/train_step.json

For CIFAR ResNet-20, its plain twin and ResNet-56 (He et al. 2015; width 16, batch norm, option
A), batch 128 of 32x32x3 images already on the device, it times one SGD step (momentum 0.9,
weight decay 1e-4 on every weight, lr 0.1: He et al.'s recipe, read from
configs/cifar10_he2015.py) of:
- resflax, `resflax.training.make_train_step` (what `experiments.train` runs: sharded jit, forward,
  backward, update, non-finite guard), built with `scan=True` (the default: repeated blocks are
  one `nn.scan`, compile time flat in depth) and with `scan=False` (unrolled);
- PyTorch (`benchmarks/torch_cifar_resnet.py`, the same function given the same weights; tested),
  eager, `torch.optim.SGD`, in both memory formats; the faster one is the peer.
All variants of a model are timed alternately in one run (`common.interleaved_medians`), so
load from other processes hits them alike; rows report images/s from the median window and
`ratio = resflax_img_s / pytorch_img_s`. The JSON also records each variant's first step
(compilation included) and the machine's load average before and after.

resflax runs with `conv_impl='auto'` (its default: oneDNN's convolutions by size where the
`onednn` extra is installed, `resflax.onednn`) and `'canonical'` (XLA:CPU's kernels alone);
without oneDNN the two are one variant.

Flags: --models, --scans, --conv_impls, --batch, --window_secs, --repeats, --out.
"""

from __future__ import annotations

import os
import time

import jax
import numpy as np
from absl import app, flags

from benchmarks import common
from configs import cifar10_he2015
from experiments import reporting
from resflax import build_model, conv, parallel, training

MODELS = {  # name -> build_model fields (He et al.'s CIFAR nets: width 16, BN, option A).
    "resnet20": dict(family="cifar_resnet", block="v1", depth=20),
    "plain20": dict(family="cifar_resnet", block="plain", depth=20),
    "resnet56": dict(family="cifar_resnet", block="v1", depth=56),
}

flags.DEFINE_list("models", list(MODELS), f"Models to time, of {list(MODELS)}.")
flags.DEFINE_list("scans", ["True", "False"], "resflax variants: `scan` values.")
flags.DEFINE_list("conv_impls", ["auto", "canonical"],
                  f"resflax variants: `conv_impl` values, of {conv.IMPLS}; one variant per "
                  "implementation they resolve to here.")
flags.DEFINE_integer("batch", 128, "Global batch size.")
flags.DEFINE_float("window_secs", 4.0, "Minimum length of one timed window.")
flags.DEFINE_integer("repeats", 3, "Timed windows per variant (median).")
flags.DEFINE_string(
    "out", os.path.join(os.path.dirname(__file__), "results", "train_step.json"), "Output JSON."
)
FLAGS = flags.FLAGS

OPTIM = cifar10_he2015.get_config().optim  # He et al. 2015's recipe, from its one source.


def resflax_step(fields: dict, images: np.ndarray, labels: np.ndarray):
    """A blocking `() -> None` running one resflax train step, and its first-step seconds."""
    model = build_model(fields)
    mesh = parallel.make_mesh()
    batch = parallel.global_batch(mesh, {"image": images, "label": labels})
    state = training.create_train_state(model, OPTIM, jax.random.key(0), batch["image"], mesh)
    step_fn = training.make_train_step(model, OPTIM, mesh)
    holder = [state]

    def step():
        holder[0], metrics = step_fn(holder[0], batch)
        jax.block_until_ready(metrics["loss"])

    start = time.perf_counter()
    step()
    return step, time.perf_counter() - start


def pytorch_step(fields: dict, images: np.ndarray, labels: np.ndarray, channels_last: bool):
    import torch  # pylint: disable=import-outside-toplevel

    from benchmarks import torch_cifar_resnet  # pylint: disable=import-outside-toplevel

    torch.manual_seed(0)
    model = torch_cifar_resnet.CifarResNet(fields["block"], fields["depth"], width=16)
    x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    y = torch.from_numpy(labels.astype(np.int64))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    step_fn = torch_cifar_resnet.make_train_step(
        model, lr=OPTIM.learning_rate, momentum=OPTIM.momentum, weight_decay=OPTIM.weight_decay
    )

    def step():
        step_fn(x, y).item()  # .item() waits for the step.

    start = time.perf_counter()
    step()
    return step, time.perf_counter() - start


def measure(name: str) -> tuple[list[dict], dict]:
    fields = MODELS[name]
    rs = np.random.RandomState(0)
    images = rs.randn(FLAGS.batch, 32, 32, 3).astype(np.float32)
    labels = rs.randint(0, 10, FLAGS.batch).astype(np.int32)
    steps, first = {}, {}
    impls = []  # The first of the flag's values for each implementation they resolve to here.
    for impl in FLAGS.conv_impls:
        if conv.resolve_impl(impl) not in [conv.resolve_impl(i) for i in impls]:
            impls.append(impl)
    variants = [(scan == "True", impl) for scan in FLAGS.scans for impl in impls]
    for scan, impl in variants:
        key = _key(scan, impl)
        steps[key], first[key] = resflax_step(dict(fields, scan=scan, conv_impl=impl), images,
                                              labels)
    for channels_last in (True, False):
        key = f"pytorch {'channels_last' if channels_last else 'contiguous'}"
        steps[key], first[key] = pytorch_step(fields, images, labels, channels_last)
    timed = common.interleaved_medians(steps, FLAGS.window_secs, FLAGS.repeats)
    img_s = {k: FLAGS.batch / v["median_s"] for k, v in timed.items()}
    peer = max((k for k in img_s if k.startswith("pytorch")), key=img_s.get)
    rows = [
        dict(
            model=name,
            scan=scan,
            conv_impl=impl,
            conv_impl_resolved=conv.resolve_impl(impl),
            batch=FLAGS.batch,
            resflax_img_s=img_s[_key(scan, impl)],
            pytorch_img_s=img_s[peer],
            ratio=img_s[_key(scan, impl)] / img_s[peer],
        )
        for scan, impl in variants
    ]
    detail = dict(
        model=name,
        fields=fields,
        pytorch_memory_format=peer.split()[1],
        images_per_sec=img_s,
        first_step_s=first,
        timing=timed,
    )
    return rows, detail


def _key(scan: bool, impl: str) -> str:
    return f"resflax scan={scan}" + ("" if impl == "auto" else f" conv_impl={impl}")


def check_models(names, allowed) -> None:
    """A usage error naming `--models`' unknown names and the allowed ones."""
    unknown = sorted(set(names) - set(allowed))
    if unknown:
        raise app.UsageError(f"--models: unknown {unknown}; allowed: {list(allowed)}")


def main(argv):
    del argv
    check_models(FLAGS.models, MODELS)
    machine = common.machine()
    rows, details = [], []
    for name in FLAGS.models:
        r, d = measure(name)
        rows += r
        details.append(d)
        for row in r:
            print(f"{name:9s} scan={row['scan']!s:5s} {row['conv_impl_resolved']:9s} "
                  f"resflax {row['resflax_img_s']:7.1f} img/s  "
                  f"PyTorch ({d['pytorch_memory_format']}) {row['pytorch_img_s']:7.1f} img/s  "
                  f"ratio {row['ratio']:.2f}", flush=True)
    machine["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    reporting.write_json(FLAGS.out, dict(machine=machine, rows=rows, details=details))
    print(f"-> {FLAGS.out}")


if __name__ == "__main__":
    app.run(main)
