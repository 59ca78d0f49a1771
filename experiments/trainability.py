"""Trainability: deep plain nets made trainable by each method, against their ResNet twins.

    python -m experiments.trainability --config=configs/digits_trainability.py --workdir=/tmp/trn
    python -m experiments.trainability --config=configs/digits_trainability.py \\
        --config.tune=True --workdir=/tmp/trn_tune      # the learning-rate tuning

Trains every method of `config.methods` (a dict: `name` and dotted overrides of the run config,
e.g. `{"name": "plain_bn", "model.block": "plain", "model.norm": "batch",
"optim.learning_rate": 0.05}`) at every `model.depth` of `config.depths` with every seed of
`config.seeds`, one run each (`experiments.degradation.Trainer`: `experiments.train` in
`workdir/runs/<method>-<weight layers>_seed<seed>/`; a restart reuses completed runs and resumes
interrupted ones), measures each run's initialization (`init_diagnostics`, cached in the run's
directory), and writes into `workdir`. On the CPU backend `config.workers` processes train runs
at once (`experiments.workers`: each process takes all seeds of one architecture, so it
compiles each program once; the deepest first); the records are the same as in one process
(tested), in the same order. Outputs:

- `results.json`: `{"config", "runs", "table", "gaps", "provenance", "wall_s"}`. `runs`: the
  records of `experiments.degradation` (`net`, `model`, `weight_layers`, `seed`, `status`,
  `final_train_loss`, ..., `history`) plus `method`, `depth` (`model.depth`) and
  `init_diagnostics`: `{"loss", "act_grad_sq" [L+1], "param_grad_norm" [L],
  "act_grad_sq_ratio" (act_grad_sq[0] / act_grad_sq[L]: growth of the squared gradient from
  the output to the input), "sv_p10", "sv_p50", "sv_p90", "sv_zero_frac", "sv_spread",
  "sv_max", "sv_min"}` of the end-to-end Jacobian dx_L/dx_0's singular values, by SLQ
  (`resflax.diagnostics.jacobian_spectrum`), pooled over the examples with weights tau^2
  (`spectrum_summary`): quantiles, the fraction at 0 (ReLU's dead directions), the spread p90 /
  p10 of the nonzero ones; max and min: the largest and smallest Ritz values, averaged over
  examples. `table`: one row per
  method and depth, the degradation table's (mean +- std over seeds, `diverged`) plus `method`,
  `depth`, `twin_loss` (the best mean final training loss of the `config.reference` methods at
  that depth), `gap` (this row's mean minus `twin_loss`), `closes` (`gap <= config.margin`), the
  means over seeds of `act_grad_sq_ratio`, `sv_spread` and `sv_zero_frac`. `gaps`: per depth, the best
  non-reference plain method (block 'plain') and whether it closes the gap.
- `trainability.png` (`experiments.plots.trainability`): final training loss vs weight layers
  per method, and the init diagnostics that explain each curve.

With `config.tune` (the learning-rate tuning), instead: every method at `config.tuning.depth`,
`config.tuning.seeds`, `config.tuning.num_train_steps` steps (the schedule's boundaries scaled by
the same fraction), at every rate of `config.tuning.learning_rates`, written to `tuning.json`:
`{"config", "grid": [{"method", "learning_rate", "seed", "status", "final_train_loss"}],
"chosen": {method: rate}, "provenance", "wall_s"}`, the chosen rate being the one of the lowest
mean final training loss (a diverged run: +inf).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from experiments import common, degradation, gradient_flow, plots as plots_lib, reporting
from experiments import train_setup
from experiments import workers as workers_lib
from resflax import diagnostics, training

RESULTS_FILE = "results.json"
TUNING_FILE = "tuning.json"
PLOT_FILE = "trainability.png"
DIAGNOSTICS_FILE = "init_diagnostics.json"
SWEEP_FIELDS = ("methods", "depths", "seeds", "cache_batches", "reference", "margin",
                "diagnostics", "tune", "tuning", "workers")
CONFIG_FILE = "configs/digits_trainability.py"


# ----------------------------------------------------------------------------- configuration


@dataclasses.dataclass(frozen=True)
class Net:
    """One architecture of the sweep: a method at a depth (with the learning rate it uses)."""

    method: str
    depth: int
    overrides: dict[str, Any]  # Dotted overrides of the run config.


def _method_overrides(method: Mapping[str, Any], index: int) -> tuple[str, dict[str, Any]]:
    where = f"config.methods[{index}]"
    if not isinstance(method, Mapping) or not isinstance(method.get("name"), str):
        raise ValueError(f"{where}={method!r} must be a dict with a 'name' and dotted overrides "
                         "like {'name': 'plain_bn', 'model.block': 'plain', 'model.norm': "
                         "'batch', 'optim.learning_rate': 0.05}")
    overrides = {k: v for k, v in method.items() if k != "name"}
    if "model.depth" in overrides:
        raise ValueError(f"{where} ({method['name']!r}) sets model.depth: the depths are "
                         "config.depths")
    return method["name"], overrides


def method_names(config: ml_collections.ConfigDict) -> list[str]:
    return [_method_overrides(m, i)[0] for i, m in enumerate(config.methods)]


def nets(config: ml_collections.ConfigDict, depths: Sequence[int] | None = None) -> list[Net]:
    """Every method at every depth (`config.depths` unless given), methods outermost."""
    out = []
    for i, method in enumerate(config.methods):
        name, overrides = _method_overrides(method, i)
        for depth in config.depths if depths is None else depths:
            out.append(Net(name, depth, {**overrides, "model.depth": depth}))
    return out


def run_config(config: ml_collections.ConfigDict, net: Net, seed: int
               ) -> ml_collections.ConfigDict:
    """The single-run config of `net` and `seed` (`experiments.degradation.run_config`)."""
    return degradation.run_config(config, net.overrides, seed, SWEEP_FIELDS,
                                  where=f"config.methods entry {net.method!r} at depth {net.depth}, overrides")


def net_name(config: ml_collections.ConfigDict, net: Net) -> str:
    """`<method>-<weight layers>`."""
    model = common.model_config(run_config(config, net, 0))
    return f"{net.method}-{degradation.weight_layers(model)}"


def _check_ints(name: str, values: Any, minimum: int) -> None:
    if (not isinstance(values, (list, tuple)) or not values
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= minimum
                       for v in values)):
        raise ValueError(f"config.{name}={values!r} must be a non-empty tuple of ints "
                         f">= {minimum}")


def check_config(config: ml_collections.ConfigDict) -> None:
    """ValueError naming the first bad field. Reads no data, compiles nothing."""
    common.require_fields(config, SWEEP_FIELDS, CONFIG_FILE)
    if not isinstance(config.methods, (list, tuple)) or not config.methods:
        raise ValueError(f"config.methods={config.methods!r} must be a non-empty tuple of dicts")
    names = method_names(config)
    if len(set(names)) < len(names):
        raise ValueError(f"config.methods: names must be unique, got {names}")
    _check_ints("depths", config.depths, 1)
    _check_ints("seeds", config.seeds, 0)
    unknown = sorted(set(config.reference) - set(names))
    if not config.reference or unknown:
        raise ValueError(f"config.reference={config.reference!r}: unknown method(s) {unknown}; "
                         f"config.methods has {names}")
    if not isinstance(config.margin, (int, float)) or not config.margin >= 0:
        raise ValueError(f"config.margin={config.margin!r} must be a number >= 0")
    for name in ("batch_size", "slq_steps"):
        if name not in config.diagnostics:
            raise ValueError(f"config.diagnostics.{name} is missing (see {CONFIG_FILE})")
        value = config.diagnostics[name]
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"config.diagnostics.{name}={value!r} must be an int >= 1")
    if (not isinstance(config.workers, int) or isinstance(config.workers, bool)
            or config.workers < 1):
        raise ValueError(f"config.workers={config.workers!r} must be an int >= 1 (processes "
                         "training runs at once on CPU)")
    _check_tuning(config)
    depths = (config.tuning.depth,) if config.tune else None
    for net in nets(config, depths):
        run = run_config(config, net, config.seeds[0])
        try:
            train_setup.check_config(run)
        except ValueError as e:
            raise ValueError(f"config.methods entry {net.method!r} at depth {net.depth}: "
                             f"{e}") from None


def _check_tuning(config: ml_collections.ConfigDict) -> None:
    if not isinstance(config.tune, bool):
        raise ValueError(f"config.tune={config.tune!r} must be True or False")
    for name in ("learning_rates", "depth", "seeds", "num_train_steps"):
        if name not in config.tuning:
            raise ValueError(f"config.tuning.{name} is missing (see {CONFIG_FILE})")
    rates = config.tuning.learning_rates
    if (not isinstance(rates, (list, tuple)) or not rates
            or not all(isinstance(r, (int, float)) and r > 0 for r in rates)):
        raise ValueError(f"config.tuning.learning_rates={rates!r} must be a non-empty tuple of "
                         "numbers > 0")
    _check_ints("tuning.seeds", config.tuning.seeds, 0)
    _check_ints("tuning.depth", (config.tuning.depth,), 1)
    _check_ints("tuning.num_train_steps", (config.tuning.num_train_steps,), 1)


# ----------------------------------------------------------------------------- init diagnostics


def _weighted_quantiles(nodes: np.ndarray, weights: np.ndarray, qs: Sequence[float]
                        ) -> list[float]:
    """Quantiles of the pooled `nodes` with `weights` (flat arrays; NaN where there are none)."""
    keep = np.isfinite(nodes) & np.isfinite(weights) & (weights > 0)
    if not keep.any():
        return [math.nan] * len(qs)
    order = np.argsort(nodes[keep])
    s, cum = nodes[keep][order], np.cumsum(weights[keep][order])
    cum /= cum[-1]
    return [float(s[min(np.searchsorted(cum, q), len(s) - 1)]) for q in qs]


def spectrum_summary(nodes: Any, weights: Any, zero: float = 1e-6) -> dict[str, float]:
    """Of SLQ `nodes` and `weights` `[B, k]` (each example's weights normalized to sum 1,
    then pooled): `sv_p10`, `sv_p50`, `sv_p90` of the singular values; `sv_zero_frac`, the
    weight of those below `zero` times the largest (a ReLU net's dead directions); `sv_spread`,
    p90 / p10 of the others; `sv_max`, `sv_min`: the largest and smallest nodes, averaged over
    examples."""
    nodes, weights = np.asarray(nodes, np.float64), np.asarray(weights, np.float64)
    weights = weights / np.maximum(weights.sum(axis=1, keepdims=True), 1e-300)
    s, w = nodes.ravel(), weights.ravel()
    p10, p50, p90 = _weighted_quantiles(s, w, (0.1, 0.5, 0.9))
    finite = np.isfinite(s)
    top = np.max(s[finite]) if finite.any() else math.nan
    nonzero = finite & (s > zero * top)
    lo, hi = _weighted_quantiles(s[nonzero], w[nonzero], (0.1, 0.9))
    with np.errstate(all="ignore"):
        spread = hi / lo
    return dict(sv_p10=p10, sv_p50=p50, sv_p90=p90, sv_spread=float(spread),
                sv_zero_frac=float(np.sum(w[finite & ~nonzero]) / max(nodes.shape[0], 1)),
                sv_max=float(np.mean(nodes[:, 0])), sv_min=float(np.mean(nodes[:, -1])))


def _diagnostics_program(model, slq_steps: int):
    """jitted `(variables, inputs, labels, key) -> {loss, act_grad_sq, param_grad_norm, nodes,
    weights}`: one forward + backward pass, then SLQ of dx_L/dx_0 (batch statistics frozen)."""
    frozen = model.clone(freeze_norm_stats=True)

    def program(variables, inputs, labels, key):
        out = diagnostics.gradient_statistics(model, variables, inputs, labels, train=True)
        x0 = out["signals"][0][0]

        def body(z):
            (x_last, _), _ = frozen.apply(variables, z, True, method="body",
                                          mutable=["batch_stats"])
            return x_last

        spectrum = diagnostics.jacobian_spectrum(body, x0, key, slq_steps)
        return dict(loss=out["loss"], act_grad_sq=out["act_grad_sq"],
                    param_grad_norm=out["param_grad_norm"], **spectrum)

    return jax.jit(program)


class InitDiagnostics:
    """Each run's diagnostics at its own initialization, on one fixed batch of training data;
    one compiled program per architecture; cached in the run's directory (`DIAGNOSTICS_FILE`)."""

    def __init__(self, config: ml_collections.ConfigDict):
        self.options = config.diagnostics.to_dict()
        self._programs: dict[str, Any] = {}
        self._batch = None

    def _batch_of(self, run: ml_collections.ConfigDict):
        if self._batch is None:
            batch_config = ml_collections.ConfigDict(dict(
                data=dict(name=run.data.name, data_dir=run.data.data_dir,
                          split=run.data.train_split),
                batch_size=self.options["batch_size"]))
            inputs, labels, _ = gradient_flow.load_batch(batch_config)
            self._batch = jnp.asarray(inputs), jnp.asarray(labels)
        return self._batch

    def __call__(self, run: ml_collections.ConfigDict, programs, run_dir: str
                 ) -> dict[str, Any]:
        path = os.path.join(run_dir, DIAGNOSTICS_FILE)
        key = reporting.jsonable({"config": run.to_dict(), "options": self.options})
        if os.path.exists(path):
            saved = reporting.read_json(path)
            if saved.get("key") == key:
                return saved["diagnostics"]
        model = programs.model
        name = model.config.to_json()
        if name not in self._programs:
            self._programs[name] = _diagnostics_program(model, self.options["slq_steps"])
        state = programs.init(run.seed, train_setup.input_shape(run))
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        inputs, labels = self._batch_of(run)
        out = jax.device_get(self._programs[name](variables, inputs, labels,
                                                  jax.random.key(run.seed)))
        act = np.asarray(out["act_grad_sq"], np.float64)
        with np.errstate(all="ignore"):
            ratio = float(act[0] / act[-1])
        result = reporting.jsonable(dict(
            loss=float(out["loss"]), act_grad_sq=act, act_grad_sq_ratio=ratio,
            param_grad_norm=np.asarray(out["param_grad_norm"]),
            **spectrum_summary(out["nodes"], out["weights"])))
        reporting.write_json(path, {"key": key, "diagnostics": result})
        return result


# ----------------------------------------------------------------------------- the table


def _mean(values: list) -> float | None:
    v = [x for x in values if x is not None and math.isfinite(x)]
    return float(np.mean(v)) if v else None


def summarize(runs: list[dict], reference: Sequence[str], margin: float
              ) -> tuple[list[dict], list[dict]]:
    """(`table`, `gaps`) of results.json (module docstring)."""
    table = degradation.summarize(runs)
    for row in table:
        group = [r for r in runs if r["net"] == row["net"]]
        row.update(method=group[0]["method"], depth=group[0]["depth"])
        for key in ("act_grad_sq_ratio", "sv_spread", "sv_zero_frac"):
            row[f"{key}_mean"] = _mean([r["init_diagnostics"][key] for r in group])
    for row in table:
        twins = [t["final_train_loss_mean"] for t in table if t["method"] in reference
                 and t["weight_layers"] == row["weight_layers"]
                 and t["final_train_loss_mean"] is not None]
        row["twin_loss"] = min(twins) if twins else None
        mean = row["final_train_loss_mean"]
        row["gap"] = None if mean is None or row["twin_loss"] is None else mean - row["twin_loss"]
        row["closes"] = None if row["gap"] is None else bool(row["gap"] <= margin)
    gaps = []
    for layers in sorted({t["weight_layers"] for t in table}):
        plain = [t for t in table if t["weight_layers"] == layers and t["block"] == "plain"
                 and t["method"] not in reference and t["final_train_loss_mean"] is not None]
        best = min(plain, key=lambda t: t["final_train_loss_mean"]) if plain else None
        gaps.append(dict(weight_layers=layers, best_plain_method=best and best["method"],
                         best_plain_loss=best and best["final_train_loss_mean"],
                         twin_loss=best and best["twin_loss"], gap=best and best["gap"],
                         closes=best and best["closes"]))
    return table, gaps


def _fmt(value: float | None, fmt: str = ".4f") -> str:
    return "n/a" if value is None else f"{value:{fmt}}"


def format_table(table: list[dict], margin: float) -> str:
    """A markdown table of `summarize`'s rows."""
    lines = ["| method | layers | final train loss | final train error | gap to twin | "
             f"closes (gap <= {margin}) | act_grad_sq[0]/[L] at init | sv p90/p10 at init | "
             "sv at 0 at init | diverged |", "|---|---:|---:|---:|---:|:---:|---:|---:|---:|---:|"]
    for r in table:
        loss = ("n/a" if r["final_train_loss_mean"] is None else
                f"{r['final_train_loss_mean']:.4f} ± {r['final_train_loss_std']:.4f}")
        error = ("n/a" if r["final_train_error_mean"] is None else
                 f"{r['final_train_error_mean']:.4f} ± {r['final_train_error_std']:.4f}")
        closes = "n/a" if r["closes"] is None else ("yes" if r["closes"] else "no")
        lines.append(
            f"| {r['method']} | {r['weight_layers']} | {loss} | {error} | "
            f"{_fmt(r['gap'], '+.4f')} | {closes} | {_fmt(r['act_grad_sq_ratio_mean'], '.3g')} | "
            f"{_fmt(r['sv_spread_mean'], '.3g')} | {_fmt(r['sv_zero_frac_mean'], '.0%')} | "
            f"{r['diverged']}/{r['seeds']} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the sweep


# Per worker process (`experiments.workers`): its trainer and diagnostics, made once.
_WORKER: dict[str, Any] = {}


def _init_worker(cache_batches: bool, diagnostics_options: dict) -> None:
    reporting.quiet_library_logs()
    config = ml_collections.ConfigDict(dict(diagnostics=diagnostics_options))
    _WORKER.update(trainer=degradation.Trainer(cache_batches), measure=InitDiagnostics(config))


def _train_group(task) -> list[dict]:
    """A worker's task: one architecture's runs, in order, in the worker's trainer."""
    workdir, items, with_diagnostics = task
    return _train_items(_WORKER["trainer"], _WORKER["measure"] if with_diagnostics else None,
                        workdir, items)


def _ends_preempted(records: list[dict]) -> bool:
    return bool(records) and records[-1]["status"] == "preempted"


def _train_items(trainer, measure, workdir: str, items) -> list[dict]:
    """Trains (or reuses) every `(name, net, run)` of `items` in order; stops after a
    preempted one, and in a worker process when the sweep is stopping. Returns the records."""
    records = []
    for name, net, run in items:
        if workers_lib.stop_requested():
            break
        run_dir = os.path.join(workdir, "runs", f"{name}_seed{run.seed}")
        record = trainer.run(name, run, run_dir)
        record.update(method=net.method, depth=net.depth)
        if measure is not None:
            record["init_diagnostics"] = measure(run, trainer.programs(run), run_dir)
        records.append(record)
        if record["status"] == "preempted":
            break
    return records


def architecture_groups(work: Sequence[tuple[str, Net, ml_collections.ConfigDict]]
                        ) -> list[list[int]]:
    """Indices of `work` grouped by compiled program (`training.programs_key`: architecture and
    optimizer), so that a worker compiles each once; longest group first (cost: steps x batch x
    weight layers, summed), for the greedy hand-out of `experiments.workers.map_tasks`."""
    groups: dict[str, list[int]] = {}
    cost: dict[str, float] = {}
    for i, (_, _, run) in enumerate(work):
        model = common.model_config(run)
        key = training.programs_key(model, train_setup.optim_config(run), run.num_devices)
        groups.setdefault(key, []).append(i)
        cost[key] = cost.get(key, 0.0) + (run.num_train_steps * run.batch_size
                                          * degradation.weight_layers(model))
    return [groups[k] for k in sorted(groups, key=lambda k: -cost[k])]


def _train(config, workdir: str, work: Sequence[tuple[str, Net, ml_collections.ConfigDict]],
           with_diagnostics: bool) -> tuple[list[dict], bool]:
    """Trains (or reuses) every `(name, net, run)`, in `config.workers` processes on CPU
    (`experiments.workers`); returns (records in the order of `work`, preempted). Records are
    the same whatever the number of processes: each run is a pure function of its config."""
    processes = workers_lib.processes_for_backend(config.workers)
    if processes == 1:
        trainer = degradation.Trainer(config.cache_batches)
        measure = InitDiagnostics(config) if with_diagnostics else None
        runs = _train_items(trainer, measure, workdir, work)
    else:
        groups = architecture_groups(work)
        logging.info("Training %d runs (%d architectures) in %d worker processes", len(work),
                     len(groups), processes)
        tasks = [(workdir, [work[i] for i in g], with_diagnostics) for g in groups]
        done = workers_lib.map_tasks(
            _train_group, tasks, processes, initializer=_init_worker,
            initargs=(config.cache_batches, config.diagnostics.to_dict()),
            is_stop=_ends_preempted)
        by_index = {}
        for g, records in done.items():
            by_index.update(zip(groups[g], records))
        runs = [by_index[i] for i in sorted(by_index)]
    # Fewer records than runs: a stop request between two runs (parallel), or a preempted run.
    preempted = len(runs) < len(work) or any(r["status"] == "preempted" for r in runs)
    if preempted:
        logging.warning("Preempted: rerun the same command to resume.")
    return runs, preempted


def run_sweep(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """The sweep, or with `config.tune` the tuning; returns what it wrote (module docstring).
    Holds the lock of `workdir` throughout (`experiments.common.WorkdirLock`)."""
    check_config(config)
    with common.WorkdirLock(workdir):
        os.makedirs(workdir, exist_ok=True)
        return _run_tuning(config, workdir) if config.tune else _run_sweep(config, workdir)


def _run_sweep(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    start, start_utc = time.monotonic(), reporting.utc_now()
    work = [(net_name(config, net), net, run_config(config, net, seed))
            for net in nets(config) for seed in config.seeds]
    runs, preempted = _train(config, workdir, work, with_diagnostics=True)
    if preempted:
        return {"config": config.to_dict(), "runs": runs, "status": "preempted",
                "provenance": reporting.provenance(start_utc)}
    table, gaps = summarize(runs, config.reference, config.margin)
    results = {"config": config.to_dict(), "runs": runs, "table": table, "gaps": gaps,
               "provenance": reporting.provenance(start_utc),
               "wall_s": time.monotonic() - start}
    reporting.write_json(os.path.join(workdir, RESULTS_FILE), results)
    plots_lib.trainability(runs, table, os.path.join(workdir, PLOT_FILE))
    logging.info("Trainability results (%d seeds; %.0f s):\n%s\nbest plain method per depth: "
                 "%s", len(config.seeds), results["wall_s"], format_table(table, config.margin),
                 gaps)
    return results


# ----------------------------------------------------------------------------- tuning


def tuning_config(config: ml_collections.ConfigDict, net: Net, learning_rate: float, seed: int
                  ) -> ml_collections.ConfigDict:
    """`net`'s run config at `learning_rate` with `config.tuning.num_train_steps` steps (the
    boundaries scaled by the same fraction; one evaluation and one checkpoint, at the end)."""
    steps = config.tuning.num_train_steps
    fraction = steps / config.num_train_steps
    boundaries = tuple(max(1, round(b * fraction)) for b in config.optim.boundaries)
    run = run_config(config, net, seed)
    overrides = {"optim.learning_rate": float(learning_rate), "num_train_steps": steps,
                 "optim.boundaries": boundaries, "eval_every_steps": 0,
                 "grad_norm_every_steps": 0, "checkpoint_every_steps": steps}
    return common.apply_overrides(run, overrides, "config.tuning")


def choose_learning_rates(grid: list[dict]) -> dict[str, float]:
    """Per method (in order of appearance): the rate of the lowest mean final training loss
    over seeds; a run that did not complete (stopped on a non-finite step) or has no finite
    final loss counts as +inf; ties: the first."""
    chosen = {}
    for method in dict.fromkeys(g["method"] for g in grid):
        rates = list(dict.fromkeys(g["learning_rate"] for g in grid if g["method"] == method))

        def score(rate):
            runs = [g for g in grid if g["method"] == method and g["learning_rate"] == rate]
            finite = [g["final_train_loss"] if g.get("status", "completed") == "completed"
                      and g["final_train_loss"] is not None
                      and math.isfinite(g["final_train_loss"]) else math.inf for g in runs]
            return float(np.mean(finite))

        chosen[method] = min(rates, key=score)
    return chosen


def _run_tuning(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    start, start_utc = time.monotonic(), reporting.utc_now()
    work = []
    for net in nets(config, (config.tuning.depth,)):
        for rate in config.tuning.learning_rates:
            for seed in config.tuning.seeds:
                name = f"tune_{net_name(config, net)}_lr{rate:g}"
                work.append((name, net, tuning_config(config, net, rate, seed)))
    runs, preempted = _train(config, workdir, work, with_diagnostics=False)
    grid = [dict(method=r["method"], learning_rate=run.optim.learning_rate, seed=r["seed"],
                 status=r["status"], final_train_loss=r["final_train_loss"])
            for r, (_, _, run) in zip(runs, work)]
    if preempted:
        return {"config": config.to_dict(), "grid": grid, "status": "preempted",
                "provenance": reporting.provenance(start_utc)}
    results = {"config": config.to_dict(), "grid": grid, "chosen": choose_learning_rates(grid),
               "provenance": reporting.provenance(start_utc), "wall_s": time.monotonic() - start}
    reporting.write_json(os.path.join(workdir, TUNING_FILE), results)
    logging.info("Tuning (%.0f s): chosen learning rates %s\n%s", results["wall_s"],
                 results["chosen"], format_grid(grid))
    return results


def format_grid(grid: list[dict]) -> str:
    """A markdown table: final training loss per method (rows) and learning rate (columns)."""
    rates = list(dict.fromkeys(g["learning_rate"] for g in grid))
    lines = ["| method | " + " | ".join(f"lr {r:g}" for r in rates) + " |",
             "|---|" + "---:|" * len(rates)]
    for method in dict.fromkeys(g["method"] for g in grid):
        cells = []
        for rate in rates:
            losses = [g for g in grid if g["method"] == method and g["learning_rate"] == rate]
            cells.append(" / ".join(
                _fmt(g["final_train_loss"]) if g["status"] == "completed"
                and g["final_train_loss"] is not None else "diverged" for g in losses))
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    degradation.run_sweep_app(
        "trainability", check_config,
        lambda config: run_config(config, nets(config)[0], config.seeds[0]), run_sweep)
