"""Compile time and memory of the CIFAR ResNet train step against depth (20 -> 1202).

    python -m benchmarks.compile_depth     # ~3 min on 2 CPU cores; writes benchmarks/results/compile_depth.json

For He et al.'s CIFAR ResNets (v1, width 16, batch norm, option A) of depth 20, 56, 110 and
1202, batch 128 of 32x32x3, it lowers and compiles `resflax.training.make_train_step` (the step
`experiments.train` runs) on abstract inputs -- nothing is initialized or run -- and records:
- `lower_s`, `compile_s`: tracing + lowering, and XLA compilation (the faster of two tries);
- XLA's `memory_analysis()` of the compiled step: `temp_bytes` (activations kept for the
  backward pass and scratch), `argument_bytes` (state + batch) and `output_bytes`; `peak_bytes`
  is their sum with donated state buffers reused, an upper bound of what the step holds;
- `stablehlo_lines`: size of the lowered program (flat in depth when scanned).
Builds: `scan=True` (the default: repeated blocks are one `nn.scan`), `scan=True, remat=True`
(activations recomputed in the backward pass, memory bounded per block), and `scan=False`
(unrolled, the control, up to depth 110: its compile time grows with depth).

The target (scanned): compile of depth 1202 within 1.5x of depth 20.
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from benchmarks import common
from configs import cifar10_he2015
from experiments import reporting
from resflax import build_model, costs, parallel, training

flags.DEFINE_list("depths", ["20", "56", "110", "1202"], "CIFAR ResNet depths (6n+2).")
flags.DEFINE_integer("unrolled_max_depth", 110, "Deepest unrolled control.")
flags.DEFINE_integer("batch", 128, "Global batch size.")
flags.DEFINE_string(
    "out", os.path.join(os.path.dirname(__file__), "results", "compile_depth.json"), "Output JSON."
)
FLAGS = flags.FLAGS

OPTIM = cifar10_he2015.get_config().optim


def measure(depth: int, scan: bool, remat: bool) -> dict:
    model = build_model(dict(family="cifar_resnet", block="v1", depth=depth, scan=scan,
                             remat=remat))
    mesh = parallel.make_mesh()
    image = jax.ShapeDtypeStruct((FLAGS.batch, 32, 32, 3), jnp.float32)
    batch = dict(image=image, label=jax.ShapeDtypeStruct((FLAGS.batch,), jnp.int32))
    key = np.zeros(2, np.uint32)  # A raw key on the host: create_train_state reads it there.
    state = jax.eval_shape(lambda: training.create_train_state(model, OPTIM, key, image, mesh))
    step = training.make_train_step(model, OPTIM, mesh)
    lower_s, compile_s, compiled = [], [], None
    for _ in range(2):
        jax.clear_caches()  # Else the second try is a cache hit.
        start = time.perf_counter()
        lowered = step.lower(state, batch)
        lower_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        compiled = lowered.compile()
        compile_s.append(time.perf_counter() - start)
    memory = compiled.memory_analysis()
    row = dict(
        depth=depth, scan=scan, remat=remat, lower_s=min(lower_s), compile_s=min(compile_s),
        num_params=costs.count_params(state.params),
        stablehlo_lines=len(lowered.as_text().splitlines()),
    )
    if memory is not None:
        temp, args, out = (memory.temp_size_in_bytes, memory.argument_size_in_bytes,
                           memory.output_size_in_bytes)
        alias = getattr(memory, "alias_size_in_bytes", 0)
        row.update(temp_bytes=temp, argument_bytes=args, output_bytes=out,
                   peak_bytes=temp + args + out - alias)
    return row


def main(argv):
    del argv
    machine = common.machine()
    rows = []
    for depth in map(int, FLAGS.depths):
        builds = [(True, False), (True, True)]
        if depth <= FLAGS.unrolled_max_depth:
            builds.append((False, False))
        for scan, remat in builds:
            row = measure(depth, scan, remat)
            rows.append(row)
            mib = row.get("peak_bytes", float("nan")) / 2**20
            print(f"depth {depth:5d} scan={scan!s:5s} remat={remat!s:5s} lower {row['lower_s']:5.1f} s "
                  f"compile {row['compile_s']:5.1f} s  peak {mib:8.0f} MiB", flush=True)
    scanned = {r["depth"]: r for r in rows if r["scan"] and not r["remat"]}
    lo, hi = min(scanned), max(scanned)
    ratio = (scanned[hi]["lower_s"] + scanned[hi]["compile_s"]) / (
        scanned[lo]["lower_s"] + scanned[lo]["compile_s"])
    machine["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    summary = dict(deepest=hi, shallowest=lo, scanned_lower_plus_compile_ratio=ratio)
    reporting.write_json(FLAGS.out, dict(machine=machine, summary=summary, rows=rows))
    print(f"scanned: lower + compile of depth {hi} = {ratio:.2f}x depth {lo} -> {FLAGS.out}")


if __name__ == "__main__":
    app.run(main)
