"""The degradation problem (He et al. 2015, Fig. 1 and 6): plain nets vs their residual twins.

    python -m experiments.degradation --config=configs/digits_degradation.py --workdir=/tmp/deg
    python -m experiments.degradation --config=configs/cifar10_he2015.py --workdir=/tmp/he2015

Trains every net of `config.nets` with every seed of `config.seeds` (each run is
`experiments.train.train_and_evaluate` in `workdir/runs/<net>_seed<seed>/`, with its own
metrics, checkpoints and summary), then writes into `workdir`:

- `results.json`: `{"config", "runs": [{"net", "model": {every model field}, "weight_layers",
  "seed", "status", "final_train_loss", "final_train_error", "final_eval_loss",
  "final_eval_error", "wall_s", "history": {"step", "train_loss", "train_error",
  "learning_rate", "eval_step", "eval_loss", "eval_error", "grad_step", "param_grad_norm"}}],
  "table": [per net: mean and std over seeds], "wall_s"}`.
  Final training loss/error: train mode, mean over the last `log_every_steps` updates (the
  quantity He et al. plot); eval: the whole eval split at the end. Std is over seeds (ddof=0);
  runs that stopped on a non-finite loss are counted in `diverged` and left out of the means.
- `degradation.png`: (a) training loss vs step, one line per net (mean over seeds);
  (b) final training loss vs number of weight layers, mean +- std over seeds, one line per block
  kind; (c) per-block gradient norm `||dL/dtheta_l||` at initialization (step 0) vs block
  index `l`, one line per net: the cause next to the symptom.

Each net is the config with the overrides of one `config.nets` entry, a dict of dotted paths
(`experiments.common`), e.g. `{"model.block": "v1", "model.depth": 110,
"optim.warmup_steps": 400}`. A restart reuses completed runs (same
config) and resumes interrupted ones from their checkpoints.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Mapping, Sequence

import ml_collections
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from experiments import common, plots as plots_lib, reporting, train_setup
from experiments import train as train_app
from resflax import ModelConfig, data, training

RESULTS_FILE = "results.json"
PLOT_FILE = "degradation.png"
SWEEP_FIELDS = ("nets", "seeds", "cache_batches")


# ----------------------------------------------------------------------------- runs


@dataclasses.dataclass(frozen=True)
class RunRecord:
    """One entry of `results.json`'s `runs` (one net, one seed); see the module docstring."""

    net: str
    model: dict[str, Any]  # Every ModelConfig field.
    weight_layers: int
    seed: int
    status: str  # experiments.train.STATUSES
    final_train_loss: float | None
    final_train_error: float | None
    final_eval_loss: float | None
    final_eval_error: float | None
    wall_s: float
    history: dict[str, list]  # `history(run_dir)`: the run's curves.


def run_config(config: ml_collections.ConfigDict, net: Mapping[str, Any], seed: int,
               sweep_fields: Sequence[str] = SWEEP_FIELDS, where: str = "config.nets entry"
               ) -> ml_collections.ConfigDict:
    """The single-run config of `net` (dotted overrides, `experiments.common`) and `seed`:
    `config` without the sweep's own fields `sweep_fields`."""
    run = common.apply_overrides(config, net, f"{where} {dict(net)!r}")
    with run.unlocked():
        for name in sweep_fields:
            if name in run:
                del run[name]
        run.seed = seed
    return run


def weight_layers(model: ModelConfig) -> int:
    """Weight layers on the longest path: MLP stem + blocks x layers + head; CIFAR/ImageNet:
    the depth (He et al. count)."""
    if model.family == "mlp":
        return model.depth * model.layers_per_block + 2
    return model.depth


def net_names(config: ml_collections.ConfigDict) -> list[str]:
    """`<block>-<weight layers>` per net (`b` suffix: bottleneck); the override string when
    that is not unique."""
    names = []
    for net in config.nets:
        model = common.model_config(run_config(config, net, 0))
        names.append(f"{model.block}-{weight_layers(model)}" + ("b" if model.bottleneck else ""))
    if len(set(names)) < len(names):
        names = ["_".join(f"{k.rsplit('.', 1)[-1]}{v}" for k, v in net.items())
                 for net in config.nets]
    return names


def check_config(config: ml_collections.ConfigDict) -> None:
    common.require_fields(config, SWEEP_FIELDS, "configs/digits_degradation.py")
    if not config.nets or not all(isinstance(n, Mapping) for n in config.nets):
        raise ValueError(f"config.nets={config.nets!r} must be a non-empty tuple of dicts of "
                         "dotted overrides like {'model.block': 'plain', 'model.depth': 9}")
    if not config.seeds or not all(isinstance(s, int) for s in config.seeds):
        raise ValueError(f"config.seeds={config.seeds!r} must be a non-empty tuple of ints")
    for net in config.nets:
        train_setup.check_config(run_config(config, net, config.seeds[0]))
    if len(set(net_names(config))) < len(config.nets):
        raise ValueError(f"config.nets={config.nets!r} has duplicates")


def history(workdir: str) -> dict[str, list]:
    """A run's curves from its `metrics.jsonl`."""
    h = {k: [] for k in ("step", "train_loss", "train_error", "learning_rate", "eval_step",
                         "eval_loss", "eval_error", "grad_step", "param_grad_norm")}
    for r in reporting.read_jsonl(os.path.join(workdir, reporting.METRICS_FILE)):
        if "train/loss" in r:
            h["step"].append(r["step"])
            h["train_loss"].append(r["train/loss"])
            h["train_error"].append(r["train/error"])
            h["learning_rate"].append(r["train/learning_rate"])
        if "eval/loss" in r:
            h["eval_step"].append(r["step"])
            h["eval_loss"].append(r["eval/loss"])
            h["eval_error"].append(r["eval/error"])
        if "param_grad_norm" in r:
            h["grad_step"].append(r["step"])
            h["param_grad_norm"].append(r["param_grad_norm"])
    return h


def _completed_summary(run_dir: str, run: ml_collections.ConfigDict) -> dict | None:
    path = os.path.join(run_dir, train_app.SUMMARY_FILE)
    if not os.path.exists(path):
        return None
    summary = reporting.read_json(path)
    same = summary.get("config") == reporting.jsonable(run.to_dict())
    return summary if summary.get("status") == "completed" and same else None


def mean_std(values: list) -> dict[str, float | None]:
    """Mean and std (ddof=0) of the values that are not None; both None when there are none."""
    v = np.asarray([x for x in values if x is not None], np.float64)
    if not len(v):
        return {"mean": None, "std": None}
    return {"mean": float(v.mean()), "std": float(v.std())}


def summarize(runs: list[dict]) -> list[dict]:
    """Per net (in order of appearance): mean and std over seeds of the final metrics."""
    table = []
    for net in dict.fromkeys(r["net"] for r in runs):
        group = [r for r in runs if r["net"] == net]
        finished = [r for r in group if r["status"] == "completed"]
        row = {"net": net, "block": group[0]["model"]["block"],
               "weight_layers": group[0]["weight_layers"], "seeds": len(group),
               "diverged": sum(r["status"] == "stopped_nonfinite" for r in group)}
        for key in ("final_train_loss", "final_train_error", "final_eval_loss",
                    "final_eval_error"):
            stats = mean_std([r[key] for r in finished])
            row[f"{key}_mean"], row[f"{key}_std"] = stats["mean"], stats["std"]
        table.append(row)
    return table


def format_table(table: list[dict]) -> str:
    """A markdown table of `summarize`'s rows."""

    def pm(row, key, fmt):
        mean, std = row[f"{key}_mean"], row[f"{key}_std"]
        return "n/a" if mean is None else f"{mean:{fmt}} ± {std:{fmt}}"

    lines = ["| net | layers | final train loss | final train error | final eval error | "
             "diverged |", "|---|---:|---:|---:|---:|---:|"]
    for row in table:
        lines.append(
            f"| {row['net']} | {row['weight_layers']} | {pm(row, 'final_train_loss', '.4f')} | "
            f"{pm(row, 'final_train_error', '.4f')} | {pm(row, 'final_eval_error', '.4f')} | "
            f"{row['diverged']}/{row['seeds']} |"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the sweep


def run_sweep(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains every (net, seed), writes `results.json` and the figure; returns the results.
    Holds the lock of `workdir` throughout (`experiments.common.WorkdirLock`)."""
    check_config(config)
    with common.WorkdirLock(workdir):
        return _run_sweep(config, workdir)


class Trainer:
    """Trains (or reuses) the runs of one sweep: one `BatchCache` (`cache_batches`) and one
    compile per architecture (`training.programs_key`), shared by every run."""

    def __init__(self, cache_batches: bool):
        self.cache = data.BatchCache() if cache_batches else None
        self._programs: dict[str, training.Programs] = {}

    def programs(self, run: ml_collections.ConfigDict) -> training.Programs:
        """The (lazily compiled) programs of `run`'s architecture and optimizer."""
        key = training.programs_key(common.model_config(run), train_setup.optim_config(run),
                                    run.num_devices)
        if key not in self._programs:
            self._programs[key] = train_setup.build_programs(run)
        return self._programs[key]

    def run(self, name: str, run: ml_collections.ConfigDict, run_dir: str) -> dict[str, Any]:
        """Trains `run` in `run_dir` (reusing a completed run of the same config, resuming an
        interrupted one); returns its `RunRecord` as a dict."""
        summary = _completed_summary(run_dir, run)
        if summary is None:
            logging.info("Training %s, seed %d, in %s", name, run.seed, run_dir)
            summary = train_app.train_and_evaluate(run, run_dir, cache=self.cache,
                                                   programs=self.programs(run))
        else:
            logging.info("Reusing the completed run in %s", run_dir)
        model = common.model_config(run)
        return dataclasses.asdict(RunRecord(
            net=name, model=model.to_dict(), weight_layers=weight_layers(model), seed=run.seed,
            status=summary["status"], final_train_loss=summary["train_loss"],
            final_train_error=summary["train_error"], final_eval_loss=summary["eval_loss"],
            final_eval_error=summary["eval_error"], wall_s=summary["wall_s"],
            history=history(run_dir),
        ))


def _run_sweep(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    start, start_utc = time.monotonic(), reporting.utc_now()
    os.makedirs(workdir, exist_ok=True)
    trainer = Trainer(config.cache_batches)
    runs = []
    names = net_names(config)
    for net, name in zip(config.nets, names):
        for seed in config.seeds:
            run = run_config(config, net, seed)
            runs.append(trainer.run(name, run, os.path.join(workdir, "runs", f"{name}_seed{seed}")))
            if runs[-1]["status"] == "preempted":
                logging.warning("Preempted: rerun the same command to resume.")
                return {"config": config.to_dict(), "runs": runs, "status": "preempted",
                        "provenance": reporting.provenance(start_utc)}
    table = summarize(runs)
    results = {"config": config.to_dict(), "runs": runs, "table": table,
               "provenance": reporting.provenance(start_utc),
               "wall_s": time.monotonic() - start}
    reporting.write_json(os.path.join(workdir, RESULTS_FILE), results)
    plots_lib.degradation(runs, table, os.path.join(workdir, PLOT_FILE))
    logging.info("Degradation results (%d seeds; %.0f s):\n%s", len(config.seeds),
                 results["wall_s"], format_table(table))
    return results


def run_sweep_app(app_name: str, check_config, first_run, run_sweep) -> None:
    """The absl program of a sweep app (this one, `experiments.trainability`): flags `--config`
    and `--workdir`; before anything compiles, `check_config(config)` and the data of
    `first_run(config)` (its run config) prepared offline, then `run_sweep(config, workdir)`.
    Bad input is one line `<app_name>: error: ...` (`common.run_main`)."""

    def main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
        reporting.quiet_library_logs()
        config = flags.FLAGS.config
        common.command_line_family_switch(config)

        def check():
            common.check_workdir(flags.FLAGS.workdir)
            check_config(config)
            train_setup.check_data(first_run(config))

        common.run_main(app_name, check, lambda: run_sweep(config, flags.FLAGS.workdir))

    config_flags.DEFINE_config_file("config", None, "Sweep configuration file.",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "Output directory (runs/, results.json, plots).")
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main, flags_parser=common.parse_flags)


if __name__ == "__main__":
    run_sweep_app("degradation", check_config,
                  lambda config: run_config(config, config.nets[0], config.seeds[0]), run_sweep)
