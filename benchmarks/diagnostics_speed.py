"""What the exact diagnostics cost, measured against what they replace, on this machine.

    python -m benchmarks.diagnostics_speed     # ~10 min on 2 CPU cores; writes
                                               # benchmarks/results/diagnostics_speed.{json,md}

1. Per-layer statistics without Jacobians (`Options(jacobians=False, end_to_end=False)`:
   fwd_sq, channel statistics, act_grad_sq, param_grad_norm, loss) of a CIFAR ResNet-56 (v1,
   batch norm, scanned as built by default) vs one training step of the same model
   (`resflax.training.make_train_step`: forward,
   backward, SGD momentum + weight decay update, non-finite guard), both jitted, same batch of
   32x32x3 inputs. The two are timed alternately (so load from other processes hits both) and
   the medians compared. Target: ratio <= 1.3.
2. Spectral norms of all block Jacobians of an MLP (width 1024): Golub-Kahan-Lanczos
   (`diagnostics.block_jacobian_statistics`, jvp + vjp, `power_iterations` steps; it also draws
   one Hutchinson probe for jac_fro_sq, `num_probes=1`, a single jvp) vs the dense per-example
   Jacobian (`diagnostics.per_example_jacobian`, one jvp per input basis vector) + SVD, block by
   block (`lax.map` over the stacked blocks, like the library). Time (median), agreement
   (max relative difference of sigma_max) and memory: XLA's `memory_analysis()` of each
   compiled program (temporary buffers) and the dense Jacobians' size.
3. Compile time of the full diagnostics (`Options()`, Jacobians and end-to-end included) for
   CIFAR ResNet depth 20 vs 1202 and MLP depth 10 vs 10,000 (`jax.jit(...).lower(...)` and
   `.compile()` timed separately, abstract inputs: nothing is initialized or run; the fastest of
   two compiles of each). Repeated blocks are one `nn.scan`, so the ratios should stay near 1.
4. Everything (`Options()`: also per-block and end-to-end Jacobian Frobenius and spectral
   norms) of CIFAR ResNet-56 and -110 at batch 64 (what `experiments.gradient_flow` computes),
   as a multiple of one training step of the same net on the same batch.

XLA flags are whatever the environment says (default: XLA's default CPU optimization; the
entry points' `--xla_backend_optimization_level=0` is not applied here). Timings on a shared
machine are noisy: compare the ratios, measured in the same run.
"""

from __future__ import annotations

import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from benchmarks import common
from experiments import reporting
from resflax import build_model, costs, diagnostics, parallel, training
from configs import cifar10_he2015

flags.DEFINE_integer("cifar_batch", 128, "Part 1 batch size.")
flags.DEFINE_integer("cifar_depth", 56, "Part 1 CIFAR ResNet depth.")
flags.DEFINE_bool("cifar_scan", True, "Parts 1 and 4: repeated blocks as one nn.scan.")
flags.DEFINE_list("full_depths", ["56", "110"], "Part 4 CIFAR ResNet depths.")
flags.DEFINE_integer("full_batch", 64, "Part 4 batch size (gradient_flow's default batch).")
flags.DEFINE_integer("full_repeats", 1, "Part 4 timed runs of the full diagnostics.")
flags.DEFINE_integer("repeats", 3, "Timed runs per program (median), after one warm-up.")
flags.DEFINE_integer("mlp_width", 1024, "Part 2 MLP width.")
flags.DEFINE_integer("mlp_depth", 4, "Part 2 MLP blocks.")
flags.DEFINE_integer("mlp_batch", 4, "Part 2 batch size.")
flags.DEFINE_list("parts", ["1", "2", "3", "4"], "Which parts to run.")
flags.DEFINE_string("out", os.path.join(os.path.dirname(__file__), "results", "diagnostics_speed"),
                    "Output path without extension (.json and .md are written).")
FLAGS = flags.FLAGS

# He et al. 2015's recipe, from its one source: the CIFAR-10 config.
OPTIM = cifar10_he2015.get_config().optim


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def _arrays_only(out: dict) -> dict:
    return {k: v for k, v in out.items() if v is not None and not isinstance(v, str)}


def _compile(fn, *args):
    """(compiled, lower seconds, compile seconds)."""
    start = time.perf_counter()
    lowered = jax.jit(fn).lower(*args)
    mid = time.perf_counter()
    compiled = lowered.compile()
    return compiled, mid - start, time.perf_counter() - mid


def _temp_bytes(compiled) -> int | None:
    analysis = compiled.memory_analysis()
    return None if analysis is None else int(analysis.temp_size_in_bytes)


def _seconds(fn) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def _time(fn, repeats: int) -> list[float]:
    jax.block_until_ready(fn())  # Warm-up.
    return [_seconds(fn) for _ in range(repeats)]


# ----------------------------------------------------------------------------- parts 1 and 4


def versus_train_step(depth: int, batch: int, options: diagnostics.Options, options_text: str,
                      repeats: int, label: str) -> dict:
    """Diagnostics of CIFAR ResNet-`depth` with `options` vs one training step of the same net
    on the same batch, timed alternately (`repeats` each, after a warm-up of the step)."""
    model = build_model(
        dict(family="cifar_resnet", block="v1", depth=depth, width=16, scan=FLAGS.cifar_scan)
    )
    rs = np.random.RandomState(0)
    images = rs.randn(batch, 32, 32, 3).astype(np.float32)
    labels = rs.randint(0, 10, batch).astype(np.int32)
    _log(f"{label}: ResNet-{depth}, batch {batch}: initializing")
    mesh = parallel.make_mesh()
    data = parallel.global_batch(mesh, {"image": images, "label": labels})
    state = training.create_train_state(model, OPTIM, jax.random.key(0), data["image"], mesh)
    step = training.make_train_step(model, OPTIM, mesh)
    # A copy: the training step donates (deletes) the state it is given.
    variables = jax.tree.map(jnp.copy, {"params": state.params, "batch_stats": state.batch_stats})

    diag = diagnostics.make_diagnostics(model, options)
    key = jax.random.key(1)
    _log(f"{label}: compiling the diagnostics")
    diag_compiled, lower_s, compile_s = _compile(
        lambda v, x, y, k: _arrays_only(diag(v, x, y, k)), variables, data["image"],
        data["label"], key,
    )
    _log(f"{label}: compiled in {lower_s + compile_s:.1f} s; compiling the training step")
    start = time.perf_counter()
    state, metrics = step(state, data)  # Compiles the step; the state is donated.
    jax.block_until_ready(metrics)
    step_compile_s = time.perf_counter() - start

    holder = {"state": state}

    def train_once():
        holder["state"], m = step(holder["state"], data)
        return m

    def diag_once():
        return diag_compiled(variables, data["image"], data["label"], key)

    _log(f"{label}: step compiled in {step_compile_s:.1f} s; warming up")
    jax.block_until_ready(train_once())
    _log(f"{label}: timing")
    diag_s, train_s = [], []
    for _ in range(repeats):  # Alternate, so that both see the same background load.
        diag_s.append(_seconds(diag_once))
        train_s.append(_seconds(train_once))
    result = dict(
        model=f"cifar_resnet v1 depth {depth} (ResNet-{depth}), width 16, batch norm, "
        f"scan={FLAGS.cifar_scan}",
        num_params=costs.count_params(state.params),
        batch_size=batch,
        diagnostics_options=options_text,
        diagnostics_s=diag_s,
        train_step_s=train_s,
        diagnostics_median_s=statistics.median(diag_s),
        train_step_median_s=statistics.median(train_s),
        diagnostics_compile_s=lower_s + compile_s,
        train_step_first_call_s=step_compile_s,
    )
    result["ratio"] = result["diagnostics_median_s"] / result["train_step_median_s"]
    return result


def part1(repeats: int) -> dict:
    return versus_train_step(
        FLAGS.cifar_depth, FLAGS.cifar_batch,
        diagnostics.Options(jacobians=False, end_to_end=False),
        "Options(jacobians=False, end_to_end=False)", repeats, "part 1",
    )


def part4() -> dict:
    """All quantities (Jacobians and end-to-end included, `Options()`), ResNet-56 and -110."""
    return {
        str(depth): versus_train_step(depth, FLAGS.full_batch, diagnostics.Options(),
                                      "Options() (everything)", FLAGS.full_repeats,
                                      f"part 4 (depth {depth})")
        for depth in map(int, FLAGS.full_depths)
    }


# ----------------------------------------------------------------------------- part 2


def _stacked_block(model):
    """(factory, variables path) of the MLP's one scanned segment (all blocks, stacked)."""
    segments = model.segments()
    assert len(segments) == 1 and segments[0].stacked, segments
    path, factory = segments[0].path, segments[0].block
    return factory, path


def part2(repeats: int) -> dict:
    width, depth, batch = FLAGS.mlp_width, FLAGS.mlp_depth, FLAGS.mlp_batch
    model = build_model(dict(family="mlp", block="plain", depth=depth, width=width))
    x = jax.random.normal(jax.random.key(1), (batch, width))
    variables = jax.jit(model.init)(jax.random.key(0), x)
    _, signals = model.apply(variables, x)
    options = diagnostics.Options(fro_method="hutchinson", num_probes=1)
    key = jax.random.key(2)
    _log(f"part 2: MLP width {width}, depth {depth}, batch {batch}: compiling")

    power, power_lower, power_compile = _compile(
        lambda v, s, k: _arrays_only(
            diagnostics.block_jacobian_statistics(model, v, s, k, options)
        ),
        variables, signals, key,
    )

    factory, path = _stacked_block(model)
    params = variables["params"]
    for name in path:
        params = params[name]
    inputs = jnp.concatenate(signals, axis=0)[:-1]  # x_{l-1} for l = 1..L: [L, B, n]

    def dense(params, inputs):
        def one_block(args):
            block_params, x = args
            f = lambda z: factory().apply({"params": block_params}, z, False)
            jac = diagnostics.per_example_jacobian(f, x)  # [B, n, n]
            return jnp.linalg.svd(jac, compute_uv=False)[:, 0]  # [B]

        return jax.lax.map(one_block, (params, inputs))  # [L, B]

    dense_compiled, dense_lower, dense_compile = _compile(dense, params, inputs)
    _log("part 2: timing")
    power_s = _time(lambda: power(variables, signals, key), repeats)
    dense_s = _time(lambda: dense_compiled(params, inputs), repeats)
    sigma_power = np.asarray(power(variables, signals, key)["jac_spectral"])  # [L], batch mean
    sigma_dense = np.asarray(dense_compiled(params, inputs)).mean(axis=1)
    iterations = np.asarray(power(variables, signals, key)["jac_spectral_iterations"])
    result = dict(
        model=f"mlp plain relu he_normal, depth {depth}, width {width}",
        batch_size=batch,
        power_iterations_max=options.power_iterations,
        power_tol=options.power_tol,
        power_iterations_used=iterations.tolist(),
        power_median_s=statistics.median(power_s),
        dense_median_s=statistics.median(dense_s),
        power_s=power_s,
        dense_s=dense_s,
        speedup=statistics.median(dense_s) / statistics.median(power_s),
        power_compile_s=power_lower + power_compile,
        dense_compile_s=dense_lower + dense_compile,
        power_temp_bytes=_temp_bytes(power),
        dense_temp_bytes=_temp_bytes(dense_compiled),
        dense_jacobian_bytes_per_block=batch * width * width * 4,
        dense_jacobian_bytes_all_blocks=depth * batch * width * width * 4,
        sigma_power=sigma_power.tolist(),
        sigma_dense=sigma_dense.tolist(),
        max_rel_diff=float(np.max(np.abs(sigma_power - sigma_dense) / sigma_dense)),
    )
    return result


# ----------------------------------------------------------------------------- part 3


def _compile_time(fields: dict, input_shape: tuple[int, ...], batch: int = 8) -> dict:
    _log(f"part 3: compiling the diagnostics of {fields}")
    model = build_model(fields)
    x = jax.ShapeDtypeStruct((batch, *input_shape), jnp.float32)
    y = jax.ShapeDtypeStruct((batch,), jnp.int32)
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    diag = diagnostics.make_diagnostics(model, diagnostics.Options())
    _, lower_s, compile_s = _compile(
        lambda v, x, y, k: _arrays_only(diag(v, x, y, k)), variables, x, y, jax.random.key(0)
    )
    return dict(fields=fields, blocks=model.num_blocks(),
                num_params=costs.count_params(variables["params"]),
                lower_s=lower_s, compile_s=compile_s, total_s=lower_s + compile_s)


def part3(rounds: int = 2) -> dict:
    """Each model compiled `rounds` times, small and large alternately; the fastest counts."""
    pairs = {
        "cifar_resnet": [dict(family="cifar_resnet", block="v1", depth=d, width=16)
                         for d in (20, 1202)],
        "mlp": [dict(family="mlp", block="v2", norm="batch", depth=d, width=64)
                for d in (10, 10000)],
    }
    shapes = {"cifar_resnet": (32, 32, 3), "mlp": (64,)}
    result = {}
    for family, models in pairs.items():
        runs = [[], []]
        for _ in range(rounds):
            for i, fields in enumerate(models):
                runs[i].append(_compile_time(fields, shapes[family]))
        small, large = (min(r, key=lambda c: c["total_s"]) for r in runs)
        for best, r in zip((small, large), runs):
            best["total_s_all_rounds"] = [c["total_s"] for c in r]
        result[family] = dict(small=small, large=large,
                              total_ratio=large["total_s"] / small["total_s"],
                              compile_ratio=large["compile_s"] / small["compile_s"])
    return result


# ----------------------------------------------------------------------------- report


def markdown(results: dict) -> str:
    env = results["environment"]
    lines = [
        "# Diagnostics speed",
        "",
        f"`python -m benchmarks.diagnostics_speed` on {env['cpu_count']} CPU cores "
        f"({env['cpu']}), jax {env['jax']}, XLA_FLAGS='{env['xla_flags']}', {env['date_utc']}, "
        f"load average {env['load_average_1_5_15']} at the end, {results['wall_s']:.0f} s in "
        f"all. Medians of {results['repeats']} runs after a warm-up; the machine is shared, so "
        "compare ratios.",
        "",
    ]
    if "1" in results:
        r = results["1"]
        lines += [
            f"## 1. Per-layer statistics vs a training step ({r['model']}, batch "
            f"{r['batch_size']})",
            "",
            "| program | median s | runs (s) |",
            "| --- | ---: | --- |",
            f"| diagnostics, {r['diagnostics_options']} | {r['diagnostics_median_s']:.3f} | "
            + ", ".join(f"{s:.3f}" for s in r["diagnostics_s"]) + " |",
            f"| training step (fwd + bwd + SGD update) | {r['train_step_median_s']:.3f} | "
            + ", ".join(f"{s:.3f}" for s in r["train_step_s"]) + " |",
            "",
            f"**Ratio diagnostics / training step: {r['ratio']:.2f}x** (target <= 1.3x).",
            "",
        ]
    if "4" in results:
        lines += [
            "## 4. Every diagnostic (Jacobians and end-to-end included) vs a training step",
            "",
            "`Options()`: per-block and end-to-end Frobenius norms (Hutchinson, 4 probes) and "
            "spectral norms (Golub-Kahan-Lanczos, <= 50 steps), on top of part 1's quantities.",
            "",
            "| model | batch | diagnostics s | compile s | training step s | ratio |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in results["4"].values():
            lines.append(
                f"| {r['model']} | {r['batch_size']} | {r['diagnostics_median_s']:.1f} | "
                f"{r['diagnostics_compile_s']:.1f} | {r['train_step_median_s']:.3f} | "
                f"{r['ratio']:.0f}x |")
        lines.append("")
    if "2" in results:
        r = results["2"]
        mib = lambda b: "n/a" if b is None else f"{b / 2**20:.1f} MiB"
        lines += [
            f"## 2. Block Jacobian spectral norms: Lanczos vs dense + SVD ({r['model']}, "
            f"batch {r['batch_size']})",
            "",
            "| method | median s | compile s | XLA temp memory | Jacobian held |",
            "| --- | ---: | ---: | ---: | ---: |",
            f"| Golub-Kahan-Lanczos (jvp + vjp, <= {r['power_iterations_max']} steps, tol "
            f"{r['power_tol']:g}) | {r['power_median_s']:.3f} | {r['power_compile_s']:.1f} | "
            f"{mib(r['power_temp_bytes'])} | none |",
            f"| dense per-example Jacobian + SVD | {r['dense_median_s']:.3f} | "
            f"{r['dense_compile_s']:.1f} | {mib(r['dense_temp_bytes'])} | "
            f"{mib(r['dense_jacobian_bytes_per_block'])} per block |",
            "",
            f"**Speed-up of Lanczos: {r['speedup']:.1f}x.** Iterations used per block: "
            f"{r['power_iterations_used']}; max relative difference of the batch-mean sigma_max "
            f"from the SVD: {r['max_rel_diff']:.2e} (the estimate approaches from below).",
            "",
        ]
    if "3" in results:
        lines += [
            "## 3. Compile time of the full diagnostics vs depth",
            "",
            "`Options()` (Jacobians and end-to-end included), batch 8; fastest of 2 compiles "
            "each, small and large alternately.",
            "",
            "| model | blocks | params | lower s | compile s | total s |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for family, r in results["3"].items():
            for size in ("small", "large"):
                c = r[size]
                lines.append(
                    f"| {family} depth {c['fields']['depth']} | {c['blocks']} | "
                    f"{c['num_params']:,} | {c['lower_s']:.1f} | {c['compile_s']:.1f} | "
                    f"{c['total_s']:.1f} |"
                )
        lines.append("")
        for family, r in results["3"].items():
            lines.append(f"- {family}: large / small = {r['total_ratio']:.2f}x in all "
                         f"({r['compile_ratio']:.2f}x XLA compile only).")
        lines.append("")
    return "\n".join(lines)


def main(argv):
    del argv
    start = time.perf_counter()
    results = dict(repeats=FLAGS.repeats)
    if "1" in FLAGS.parts:
        results["1"] = part1(FLAGS.repeats)
        print(f"1. ratio {results['1']['ratio']:.2f}", flush=True)
    if "2" in FLAGS.parts:
        results["2"] = part2(FLAGS.repeats)
        print(f"2. speed-up {results['2']['speedup']:.1f}", flush=True)
    if "4" in FLAGS.parts:
        results["4"] = part4()
        print("4. " + ", ".join(f"ResNet-{k} {v['ratio']:.1f}x" for k, v in results["4"].items()),
              flush=True)
    if "3" in FLAGS.parts:
        results["3"] = part3()
        print("3. " + ", ".join(f"{k} {v['total_ratio']:.2f}" for k, v in results["3"].items()),
              flush=True)
    results["wall_s"] = time.perf_counter() - start
    results["environment"] = common.machine()
    reporting.write_json(FLAGS.out + ".json", results)
    with open(FLAGS.out + ".md", "w") as f:
        f.write(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    app.run(main)
