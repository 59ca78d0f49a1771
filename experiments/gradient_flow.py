"""Gradient flow at initialization: exact per-block diagnostics of a sweep of nets, with theory.

    python -m experiments.gradient_flow --config=configs/gradient_flow.py --workdir=runs/gradient_flow
    python -m experiments.gradient_flow --config=configs/gradient_flow.py:single \\
        --config.model.block=v2 --config.model.depth=1000 --workdir=/tmp/gf

`run(config, workdir)` measures, for every net of `config.sweep` (or `config.model` alone when
the sweep is empty) and every seed of `config.seeds` (a fresh initialization and fresh random
probes), all of `resflax.diagnostics` on one fixed batch (`config.data`), adds the mean-field
prediction of `resflax.theory.predict` anchored at the measured `fwd_sq[0]`, `act_grad_sq[L]`
and `fwd_chan_var[0]`, prints a table, and writes into `workdir`:

- `results.json`: `{"config": ..., "runs": [{"name", "model": {every model field}, "seed",
  "num_params", "loss", "blocks": {...}, "e2e": {...}, "theory": {...} | null, "nonfinite",
  "seconds": {"compile", "run"}}]}` with the names of docs/design.md (Diagnostics):
  - `blocks`: `fwd_sq`, `fwd_chan_mean_sq`, `fwd_chan_var`, `act_grad_sq` (length L+1, over
    x_0..x_L); `param_grad_norm`, `jac_fro_sq`, `jac_fro_sq_stderr`, `jac_spectral`,
    `jac_spectral_rel_change`, `jac_spectral_iterations` (length L, blocks 1..L);
    `jac_fro_method` ('exact' or 'hutchinson').
  - `e2e`: `e2e_jac_fro_sq`, `e2e_jac_fro_sq_stderr`, `e2e_jac_fro_method`,
    `e2e_jac_spectral`, `e2e_jac_spectral_rel_change`, `e2e_jac_spectral_iterations`,
    `e2e_singular_values` ([B, k] or null) of `dx_L/dx_0`; with `e2e_spectrum=True` also
    `e2e_slq_nodes`, `e2e_slq_weights` ([B, slq_steps]), `e2e_slq_sigma_max`, `_sigma_min`.
  - `theory`: `fwd_sq`, `act_grad_sq` [L+1], `jac_fro_sq` [L], `e2e_jac_fro_sq`; null where the
    theory does not apply (conv nets, v1, plain nets with a norm, ...).
  Non-finite numbers (a plain net's signal overflowing, say) are kept as they are in memory and
  in the table, and written to JSON as `null` (strict JSON has no NaN / Infinity, as in
  `experiments.reporting`); each run's `nonfinite` maps every quantity that had any to
  'nan', 'inf', '-inf' or a '+'-joined mix, so a null is never ambiguous. (An underflow to 0.0,
  e.g. a sigmoid net's gradient, is finite and written as 0.0.)
- `act_grad_sq.png`, `fwd_sq.png`: against the layer index l = 0..L (symlog x, log y), one line
  per net (mean over seeds), theory dashed in the same colour; `jac_spectral.png`: sigma_max
  of every block Jacobian (and `jac_fro_sq` with its theory). Non-finite and non-positive
  values are left out of the log-scale plots (the line breaks there).
- `e2e_spectrum.png`, with `diagnostics.e2e_spectrum=True`: the density of the end-to-end
  singular values of `dx_L/dx_0` per net (stochastic Lanczos quadrature, pooled over seeds),
  the dynamical-isometry picture of Pennington et al. 2017, theory's mean where it applies.

Everything of a net (initialization and diagnostics) is one jitted program, compiled once and run
once per seed. Bad configuration (unknown field, depth 0, negative width, a dataset that is not
prepared offline, ...) is a ValueError naming the field; the command line prints it as one line.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from experiments import common, plots as plots_lib, reporting
from resflax import ModelConfig, build_model, checks, costs, data, diagnostics, theory

RESULTS_FILE = "results.json"
PLOT_FILES = ("act_grad_sq.png", "fwd_sq.png", "jac_spectral.png")
SPECTRUM_FILE = "e2e_spectrum.png"  # Only with diagnostics.e2e_spectrum=True.
CONFIG_FIELDS = ("model", "sweep", "data", "batch_size", "seeds", "diagnostics")
DATA_FIELDS = ("name", "data_dir", "split", "input_dim", "seed")
BLOCK_KEYS = (
    "fwd_sq", "fwd_chan_mean_sq", "fwd_chan_var", "act_grad_sq",  # [L+1]
    "param_grad_norm", "jac_fro_sq", "jac_fro_sq_stderr", "jac_spectral",  # [L]
    "jac_spectral_rel_change", "jac_spectral_iterations", "jac_fro_method",
)

# ----------------------------------------------------------------------------- configuration


@dataclasses.dataclass(frozen=True)
class RunRecord:
    """One entry of `results.json`'s `runs` (one net, one seed); see the module docstring."""

    name: str
    model: dict[str, Any]  # Every ModelConfig field.
    seed: int
    num_params: int
    loss: float
    blocks: dict[str, Any]  # BLOCK_KEYS: [L+1] or [L] lists, and the Frobenius method.
    e2e: dict[str, Any]  # e2e_* of dx_L/dx_0.
    theory: dict[str, Any] | None  # theory.predict's curves, None outside the theory.
    nonfinite: dict[str, str]  # quantity -> 'nan' | 'inf' | '-inf' | a '+'-joined mix.
    seconds: dict[str, float]  # compile, run.


@dataclasses.dataclass(frozen=True)
class Net:
    name: str
    config: ModelConfig


def _nets(config: ml_collections.ConfigDict) -> list[Net]:
    """The sweep: `config.model` with each entry's dotted `model.*` overrides; ValueError naming
    the entry and field."""
    entries = list(config.sweep) or [{}]
    nets = []
    for i, entry in enumerate(entries):
        where = f"config.sweep[{i}]" if config.sweep else "config"
        if not isinstance(entry, Mapping):
            raise ValueError(f"{where}={entry!r} must be a dict of dotted overrides")
        entry = dict(entry)
        name = entry.pop("name", None)
        other = sorted(k for k in entry if not k.startswith("model."))
        if other:
            raise ValueError(f"{where}: {other} are not model fields; a sweep entry has 'name' "
                             "and 'model.<field>' keys")
        run = common.apply_overrides(config, entry, where)
        try:
            model = common.model_config(run)
        except ValueError as e:
            raise ValueError(f"{where}: {e}" if config.sweep else str(e)) from None
        nets.append(Net(name or _default_name(model), model))
    names = [n.name for n in nets]
    if len(set(names)) != len(names):
        raise ValueError(f"config.sweep: names must be unique, got {names}")
    return nets


def _default_name(m: ModelConfig) -> str:
    family = "" if m.family == "mlp" else f"{m.family} "
    norm = "" if m.norm == "none" else f" +{m.norm}"
    return f"{family}{m.block} {m.activation} {m.init}{norm} d{m.depth}"


def _options(config: ml_collections.ConfigDict) -> diagnostics.Options:
    fields = config.diagnostics.to_dict()
    allowed = [f.name for f in dataclasses.fields(diagnostics.Options)]
    unknown = sorted(set(fields) - set(allowed))
    if unknown:
        raise ValueError(f"config.diagnostics: unknown field(s) {unknown}; allowed: {allowed}")
    try:
        return diagnostics.Options(**fields)
    except ValueError as e:
        raise ValueError(f"config.diagnostics.{e}") from None


def check_config(config: ml_collections.ConfigDict) -> tuple[list[Net], diagnostics.Options]:
    """Raises ValueError naming the first bad field. Reads no data, compiles nothing."""
    unknown = sorted(set(config) - set(CONFIG_FIELDS))
    if unknown:
        raise ValueError(f"config: unknown field(s) {unknown}; allowed: {list(CONFIG_FIELDS)}")
    missing = [f for f in CONFIG_FIELDS if f not in config]
    if missing:
        raise ValueError(f"config is missing {missing} (see configs/gradient_flow.py)")
    unknown = sorted(set(config.data) - set(DATA_FIELDS))
    if unknown:
        raise ValueError(f"config.data: unknown field(s) {unknown}; allowed: {list(DATA_FIELDS)}")
    checks.integer("config.batch_size", config.batch_size, 1)
    seeds = config.seeds
    if not isinstance(seeds, (list, tuple)) or not seeds or not all(
        isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2**32 for s in seeds
    ):
        raise ValueError(f"config.seeds={seeds!r} must be a non-empty list of ints in [0, 2**32)")
    if config.data.name == "gaussian":
        dims = config.data.input_dim
        if not isinstance(dims, (list, tuple)) or not dims:
            raise ValueError(f"config.data.input_dim={dims!r} must be a non-empty tuple of ints")
        for d in dims:
            checks.integer("config.data.input_dim entries", d, 1)
    return _nets(config), _options(config)


# ----------------------------------------------------------------------------- data


def load_batch(config: ml_collections.ConfigDict) -> tuple[np.ndarray, np.ndarray, int]:
    """(inputs [B, ...] float32, labels [B] int32, num_classes) of the one fixed batch.

    'gaussian': iid N(0, 1) of shape `data.input_dim`, labels uniform over 10 classes, both from
    `data.seed`. Otherwise the first `batch_size` examples of `data.split`, normalized per
    channel with the train-split statistics (`resflax.data.make_loader`). A dataset that is
    unknown or not prepared is a ValueError naming it and the data_dir.
    """
    cfg, batch = config.data, config.batch_size
    if cfg.name == "gaussian":
        rng = np.random.default_rng(cfg.seed)
        inputs = rng.standard_normal((batch, *cfg.input_dim)).astype(np.float32)
        return inputs, rng.integers(0, 10, batch).astype(np.int32), 10
    try:
        meta = data.dataset_meta(cfg.name, data_dir=cfg.data_dir)
        loader = data.make_loader(
            cfg.name, cfg.split, batch_size=batch, train=False, data_dir=cfg.data_dir,
            drop_remainder=True, read_threads=0,
        )
        examples = next(iter(loader), None)
    except data.DatasetNotFoundError as e:
        message = " ".join(line.strip() for line in str(e).splitlines())
        raise ValueError(
            f"config.data.name={cfg.name!r} (data_dir={cfg.data_dir!r}): {message}"
        ) from None
    if examples is None:
        raise ValueError(
            f"config.batch_size={batch} is larger than the {cfg.name!r} split {cfg.split!r}"
        )
    return examples["image"], examples["label"], meta.num_classes


# ----------------------------------------------------------------------------- measuring


def _program(model, options: diagnostics.Options, inputs, labels):
    """Compiles `key -> diagnostics` (init with one half of `key`, probes with the other).

    Returns `(compiled, static, seconds)`: `static` holds the diagnostics' Python values
    (method names, a None), filled while tracing.
    """
    diag = diagnostics.make_diagnostics(model, options)
    static = {}

    def program(key, inputs, labels):
        init_key, probe_key = jax.random.split(key)
        variables = model.init(init_key, inputs)
        out = diag(variables, inputs, labels, probe_key)
        static.update({k: v for k, v in out.items() if v is None or isinstance(v, str)})
        return {k: v for k, v in out.items() if k not in static}

    start = time.perf_counter()
    compiled = jax.jit(program).lower(jax.random.key(0), inputs, labels).compile()
    return compiled, static, time.perf_counter() - start


def _nonfinite_kind(values: Any) -> str | None:
    arr = np.asarray(values, dtype=np.float64)
    kinds = [k for k, hit in (("nan", np.isnan(arr).any()), ("inf", np.isposinf(arr).any()),
                              ("-inf", np.isneginf(arr).any())) if hit]
    return "+".join(kinds) or None


def _theory(model: ModelConfig, blocks: Mapping[str, Any]) -> dict[str, Any] | None:
    """`theory.predict` anchored at the measured values; None where the theory does not apply
    or an anchor is not finite (nothing to anchor a curve to)."""
    anchors = dict(
        fwd_sq0=blocks["fwd_sq"][0],
        act_grad_sq_last=blocks["act_grad_sq"][-1],
        fwd_chan_var0=blocks["fwd_chan_var"][0],
    )
    if not all(math.isfinite(v) for v in anchors.values()):
        return None
    fwd_sq0, act_grad_sq_last = anchors.pop("fwd_sq0"), anchors.pop("act_grad_sq_last")
    return theory.predict(model, fwd_sq0, act_grad_sq_last, **anchors)


def measure(net: Net, options, inputs, labels, seeds) -> list[dict[str, Any]]:
    """One record per seed (the `runs` entries of results.json, finite or not)."""
    model = build_model(net.config)
    shapes = jax.eval_shape(model.init, jax.random.key(0), inputs)
    num_params = costs.count_params(shapes["params"])
    compiled, static, compile_s = _program(model, options, inputs, labels)
    records = []
    for seed in seeds:
        start = time.perf_counter()
        out = jax.block_until_ready(compiled(jax.random.key(seed), inputs, labels))
        run_s = time.perf_counter() - start
        result = diagnostics.to_python({**out, **static})
        blocks = {k: result[k] for k in BLOCK_KEYS if k in result}
        e2e = {k: v for k, v in result.items() if k.startswith("e2e_")}
        theory_curves = _theory(net.config, blocks)
        nonfinite = {
            f"{group}.{k}": kind
            for group, values in (("blocks", blocks), ("e2e", e2e), ("theory", theory_curves))
            for k, v in (values or {}).items()
            if not isinstance(v, str) and v is not None and (kind := _nonfinite_kind(v))
        }
        if (kind := _nonfinite_kind(result["loss"])) is not None:
            nonfinite["loss"] = kind
        record = dataclasses.asdict(RunRecord(
            name=net.name, model=net.config.to_dict(), seed=seed, num_params=num_params,
            loss=result["loss"], blocks=blocks, e2e=e2e, theory=theory_curves,
            nonfinite=nonfinite, seconds=dict(compile=compile_s, run=run_s),
        ))
        records.append(record)
    return records


# ----------------------------------------------------------------------------- reporting


def _ratio(a: float, b: float) -> float:
    with np.errstate(all="ignore"):
        return float(np.float64(a) / np.float64(b))


TABLE_HEADER = (
    f"{'net':<28}{'seed':>5}{'depth':>6}{'L':>6}{'loss':>10}{'grad0/gradL':>13}"
    f"{'fwdL/fwd0':>11}{'mean sig_l':>12}{'e2e sigma':>11}{'compile s':>10}{'run s':>7}"
)


def table_row(r: Mapping[str, Any]) -> str:
    """One line: act_grad_sq[0]/act_grad_sq[L], fwd_sq[L]/fwd_sq[0], the mean over blocks of
    jac_spectral and the end-to-end spectral norm ('-' when not computed)."""
    b, e = r["blocks"], r["e2e"]
    grad = _ratio(b["act_grad_sq"][0], b["act_grad_sq"][-1])
    fwd = _ratio(b["fwd_sq"][-1], b["fwd_sq"][0])
    sig = f"{np.mean(b['jac_spectral']):.3g}" if "jac_spectral" in b else "-"
    e2e = f"{e['e2e_jac_spectral']:.3g}" if "e2e_jac_spectral" in e else "-"
    return (
        f"{r['name'][:27]:<28}{r['seed']:>5}{r['model']['depth']:>6}"
        f"{len(b['act_grad_sq']) - 1:>6}{r['loss']:>10.3g}{grad:>13.3g}{fwd:>11.3g}"
        f"{sig:>12}{e2e:>11}{r['seconds']['compile']:>10.1f}{r['seconds']['run']:>7.2f}"
    )


# ----------------------------------------------------------------------------- the app


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Measures every net x seed; writes results.json and the plots; returns the results
    (floats as measured, NaN / inf included). ValueError for bad configuration or data."""
    start_utc = reporting.utc_now()
    nets, options = check_config(config)
    common.check_workdir(workdir)
    inputs, labels, num_classes = load_batch(config)
    for net in nets:
        if net.config.num_classes < num_classes:
            raise ValueError(
                f"model.num_classes={net.config.num_classes} ({net.name!r}) is smaller than "
                f"the {num_classes} classes of data.name={config.data.name!r}"
            )
    os.makedirs(workdir, exist_ok=True)
    print(f"{len(nets)} net(s) x {len(config.seeds)} seed(s) on {config.data.name} "
          f"(batch {config.batch_size}, inputs {tuple(inputs.shape[1:])}), "
          f"{jax.devices()[0].platform.upper()}", flush=True)
    print(TABLE_HEADER)
    print("-" * len(TABLE_HEADER), flush=True)
    runs = []
    for net in nets:
        for record in measure(net, options, jnp.asarray(inputs), jnp.asarray(labels),
                              config.seeds):
            print(table_row(record), flush=True)
            runs.append(record)
    results = {"config": config.to_dict(), "runs": runs,
               "provenance": reporting.provenance(start_utc)}
    results_path = os.path.join(workdir, RESULTS_FILE)
    reporting.write_json(results_path, results)
    plots = plots_lib.gradient_flow(workdir, runs, PLOT_FILES)
    spectrum = plots_lib.gradient_flow_spectrum(os.path.join(workdir, SPECTRUM_FILE), runs)
    plots += [spectrum] if spectrum else []
    print(f"results: {results_path}\nplots: " + ", ".join(plots), flush=True)
    return results


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    reporting.quiet_library_logs(("tensorflow_datasets", "jax"))
    start = time.perf_counter()
    common.command_line_family_switch(flags.FLAGS.config)
    # `run` checks the config and reads the batch before anything compiles: its ValueErrors are
    # the user's (a bad field, an unprepared dataset).
    common.run_main("gradient_flow", lambda: run(flags.FLAGS.config, flags.FLAGS.workdir),
                    lambda: None)
    print(f"wall time {time.perf_counter() - start:.1f} s (after imports)")


if __name__ == "__main__":
    config_flags.DEFINE_config_file(
        "config", "configs/gradient_flow.py", "Sweep configuration file.", lock_config=True
    )
    flags.DEFINE_string("workdir", None, "Directory for results.json and the plots.")
    flags.mark_flags_as_required(["workdir"])
    app.run(main, flags_parser=common.parse_flags)
