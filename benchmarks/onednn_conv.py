"""Per-layer convolution time: oneDNN (`resflax.onednn`) vs XLA:CPU's canonical convolutions.

    pip install -e '.[onednn]'
    python -m benchmarks.onednn_conv     # ~3 min on 2 cores; -> benchmarks/results/onednn_conv.json

For the 3x3 convolutions of CIFAR ResNet-20 at batch 128 (32x32x16, 16x16x32, 8x8x64 stride 1;
16->32 and 32->64 stride 2), float32, it times, jitted, the forward convolution, its input
gradient dx and its kernel gradient dw:
- xla: `resflax.conv.conv_p` lowered by XLA (the forward, `jax.linear_transpose` for dx / dw:
  `_transpose_x`, the batch-chunked `_transpose_w`), i.e. what resflax ran before oneDNN;
- onednn: the three oneDNN primitives (`resflax.onednn.forward` / `backward_data` /
  `backward_weights`);
and both "all": fwd, dx and dw in one jitted program, where XLA may issue the two independent
gradients at once (the threading check: two oneDNN calls from two XLA threads must not
oversubscribe the cores). Where PyTorch is installed, also torch: `F.conv2d` and
`aten.convolution_backward` on channels-last tensors (PyTorch's own oneDNN, OpenMP threads). Variants are timed alternately (`common.interleaved_medians`); the JSON
has the load average before and after each shape, and the kernels oneDNN chose.

`--shapes=crossover` times small to large stride-1 convolutions instead (run it at several
`--batch`), for the size from which oneDNN pays (`resflax.conv.ONEDNN_MIN_MACS`).

Flags: --batch, --shapes, --torch, --window_secs, --repeats, --out.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from benchmarks import common
from experiments import reporting
from resflax import conv, onednn

# (H = W, C_in, C_out, stride) of 3x3 convolutions, per shape set.
SHAPE_SETS = {
    # ResNet-20's (at --batch, 128 by default).
    "resnet20": [(32, 16, 16, 1), (16, 32, 32, 1), (8, 64, 64, 1), (32, 16, 32, 2),
                 (16, 32, 64, 2)],
    # Tiny to large stride-1 convolutions, for the size from which oneDNN repays its fixed cost
    # per call (`resflax.conv.ONEDNN_MIN_MACS`): the tests' sizes, the digits-size CIFAR nets'
    # (8x8, 4x4, 2x2 at width 8) up to ResNet-20's first stage. Run it at several --batch values.
    "crossover": [(4, 4, 4, 1), (8, 4, 4, 1), (2, 32, 32, 1), (4, 16, 16, 1), (8, 8, 8, 1),
                  (8, 16, 16, 1), (8, 32, 32, 1), (16, 16, 16, 1), (16, 32, 32, 1),
                  (32, 16, 16, 1)],
}

flags.DEFINE_integer("batch", 128, "Batch size.")
flags.DEFINE_enum("shapes", "resnet20", list(SHAPE_SETS), "Which convolutions to time.")
flags.DEFINE_bool("torch", True, "Also time PyTorch's convolutions where it is installed.")
flags.DEFINE_float("window_secs", 1.0, "Minimum length of one timed window.")
flags.DEFINE_integer("repeats", 3, "Timed windows per variant (median).")
flags.DEFINE_string(
    "out", os.path.join(os.path.dirname(__file__), "results", "onednn_conv.json"), "Output JSON."
)
FLAGS = flags.FLAGS


def variants(size, c_in, c_out, stride):
    """name -> blocking () -> None, for xla / onednn x fwd / dx / dw / all."""
    k = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(k[0], (FLAGS.batch, size, size, c_in), jnp.float32)
    w = jax.random.normal(k[1], (3, 3, c_in, c_out), jnp.float32) * 0.1
    geo = dict(window_strides=(stride, stride), padding=((1, 1), (1, 1)), rhs_dilation=(1, 1))
    fwd = lambda x, w: conv.conv2d(x, w, geo["window_strides"], geo["padding"], impl="canonical")
    y_shape = jax.eval_shape(fwd, x, w).shape
    g = jax.random.normal(k[2], y_shape, jnp.float32)
    xla = dict(
        fwd=fwd,
        dx=lambda g, w: jax.linear_transpose(lambda x: fwd(x, w), x)(g)[0],
        dw=lambda x, g: jax.linear_transpose(lambda w: fwd(x, w), w)(g)[0],
    )
    ours = dict(
        fwd=lambda x, w: onednn.forward(x, w, y_shape, **geo),
        dx=lambda g, w: onednn.backward_data(g, w, x.shape, **geo),
        dw=lambda x, g: onednn.backward_weights(x, g, w.shape, **geo),
    )
    args = dict(fwd=(x, w), dx=(g, w), dw=(x, g))
    steps = {}
    for impl, fns in (("xla", xla), ("onednn", ours)):
        for part, fn in fns.items():
            steps[f"{impl} {part}"] = _blocking(jax.jit(fn), args[part])
        steps[f"{impl} all"] = _blocking(
            jax.jit(lambda x, w, g, fns=fns: (fns["fwd"](x, w), fns["dx"](g, w), fns["dw"](x, g))),
            (x, w, g))
    if FLAGS.torch:
        steps.update(_torch_variants(x, w, g, stride))
    impls = {part: onednn.implementation(kind, x.shape, w.shape, y_shape, **geo)
             for part, kind in (("fwd", "forward"), ("dx", "backward_data"),
                                ("dw", "backward_weights"))}
    return steps, impls


def _torch_variants(x, w, g, stride):
    try:
        import torch  # pylint: disable=import-outside-toplevel
    except ImportError:
        return {}
    cl = torch.channels_last
    tx = torch.from_numpy(np.array(x)).permute(0, 3, 1, 2).contiguous(memory_format=cl)
    tg = torch.from_numpy(np.array(g)).permute(0, 3, 1, 2).contiguous(memory_format=cl)
    tw = torch.from_numpy(np.array(w)).permute(3, 2, 0, 1).contiguous(memory_format=cl)
    conv_args = ([stride] * 2, [1, 1], [1, 1], False, [0, 0], 1)

    def backward(mask):
        return lambda: torch.ops.aten.convolution_backward(tg, tx, tw, None, *conv_args, mask)

    fwd = lambda: torch.nn.functional.conv2d(tx, tw, None, stride, 1)
    dx, dw = backward([True, False, False]), backward([False, True, False])
    return {"torch fwd": fwd, "torch dx": dx, "torch dw": dw,
            "torch all": lambda: (fwd(), backward([True, True, False])())}


def _blocking(fn, args):
    return lambda: jax.block_until_ready(fn(*args))


def main(argv):
    del argv
    if not onednn.available():
        raise app.UsageError("oneDNN is not available here (pip install -e '.[onednn]', g++)")
    machine = common.machine()
    machine["onednn_version"] = list(onednn.version())
    rows = []
    for size, c_in, c_out, stride in SHAPE_SETS[FLAGS.shapes]:
        name = f"{size}x{size}x{c_in}" + (f"->{c_out}" if c_out != c_in else "") + f" s{stride}"
        load_before = [round(v, 2) for v in os.getloadavg()]
        steps, impls = variants(size, c_in, c_out, stride)
        timed = common.interleaved_medians(steps, FLAGS.window_secs, FLAGS.repeats)
        ms = {k: 1e3 * v["median_s"] for k, v in timed.items()}
        total = {impl: sum(ms[f"{impl} {p}"] for p in ("fwd", "dx", "dw"))
                 for impl in ("xla", "onednn", "torch") if f"{impl} fwd" in ms}
        macs = FLAGS.batch * (size // stride) ** 2 * 9 * c_in * c_out
        row = dict(shape=name, batch=FLAGS.batch, macs=macs, ms=ms, total_ms=total,
                   ratio_total=total["onednn"] / total["xla"],
                   ratio_all=ms["onednn all"] / ms["xla all"],
                   onednn_impl=impls, load_average_before=load_before,
                   load_average_after=[round(v, 2) for v in os.getloadavg()], timing=timed)
        rows.append(row)
        print(f"{name:16s} B={FLAGS.batch:<4d} {macs / 1e6:8.2f} M MACs " + "  ".join(
            f"{p} {ms['xla ' + p]:6.2f}/{ms['onednn ' + p]:6.2f}" for p in ("fwd", "dx", "dw",
                                                                              "all"))
              + f"  total {total['xla']:6.2f}/{total['onednn']:6.2f} ms (xla/onednn)"
              f"  torch {total.get('torch', float('nan')):6.2f}"
              f"  ratio {row['ratio_total']:.2f}  load {row['load_average_after']}", flush=True)
    machine["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
    reporting.write_json(FLAGS.out, dict(machine=machine, rows=rows))
    print(f"-> {FLAGS.out}")


if __name__ == "__main__":
    app.run(main)
