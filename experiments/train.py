"""Trains and evaluates one network: the loop around `resflax.training`, with all the I/O.

    python -m experiments.train --config=configs/train.py --workdir=/tmp/train \\
        --config.model.block=plain --config.model.depth=27

configs/train.py documents every field; `experiments.train_setup.check_config` rejects a bad
one, naming it, before anything compiles. `train_and_evaluate(config, workdir)` writes into
`workdir`:

- `metrics.jsonl` + TensorBoard events (`reporting.MetricsWriter`), one record per line:
  - every `log_every_steps` steps and at the last step, `train/loss`, `train/error`,
    `train/accuracy`, `train/grad_norm` (global, before clipping): means over the steps since
    the previous record, in train mode; `train/learning_rate` of the last update;
    `perf/steps_per_sec` (wall clock);
  - every `eval_every_steps` steps and at the last step, `eval/loss`, `eval/error`,
    `eval/accuracy` over the whole `data.eval_split` (running batch-norm statistics);
  - every `grad_norm_every_steps` steps (0: never), at the parameters *before* update `step`
    and on that update's batch: `param_grad_norm` `[L]`, `||dL/dtheta_l||_2` per block
    `l = 1..L`, and `grad_norm/<module>` per top-level module (stem, stages, head).
- `checkpoints/<step>/`: Orbax, every `checkpoint_every_steps` steps and at the end: the
  `TrainState`, each process's data-iterator position, and the loop's own state (the partial
  logging window, the last records), so a restart equals an uninterrupted run bit for bit on
  CPU.
- `summary.json` at the end and on every stop (`reporting.RunSummary`): `status`, `step`,
  final `train_loss`, `train_error` (the last logging window), `eval_loss`, `eval_error` (the
  last evaluation), `wall_s` (summed over restarts), `config`; with `nonfinite` details when
  stopped for that.

Statuses:
- `completed`: `num_train_steps` updates done.
- `preempted`: SIGTERM or Ctrl-C (SIGINT): the step in flight finishes, a checkpoint is saved,
  and the process exits cleanly (a second Ctrl-C aborts at once). `stop_at_step` simulates one.
- `stopped_nonfinite`: an update whose loss, gradient or new state is not finite (the library
  does not apply it). The step and the first parameter with a non-finite gradient are logged
  and kept in the summary. No checkpoint is written: the latest one is the last good state.

Restarting with the same `--workdir` resumes from the latest checkpoint (records written after
it are dropped from `metrics.jsonl` and TensorBoard); a changed config is refused unless
`--allow_config_change`. The loop syncs with the device once per step, to stop at the exact
failing step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from typing import Any

import jax
import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from experiments import common, reporting, train_setup
from resflax import data, parallel, training

STATUSES = ("completed", "preempted", "stopped_nonfinite")
SUMMARY_FILE = "summary.json"
CHECKPOINT_DIR = "checkpoints"
CORRUPT_DIR = "checkpoints_corrupt"
# Fields that may differ on a resume without `allow_config_change`: they change when or how the
# run reports, not what it computes.
RESUME_FREE_FIELDS = ("stop_at_step", "progress_every_secs")


def check_resume(config: ml_collections.ConfigDict, workdir: str,
                 allow_config_change: bool = False) -> None:
    """Refuses (UserError naming the fields) to resume a checkpoint made with another config,
    unless `allow_config_change`. Reads only the newest readable checkpoint's loop state."""
    common.check_workdir(workdir)
    directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
    if allow_config_change or not os.path.isdir(directory):
        return
    found = training.latest_extra(training.make_checkpoint_manager(directory))
    if found is not None and "config" in found[1]:
        common.resume_config_changes(found[1]["config"], config.to_dict(), found[0],
                                     ignore=RESUME_FREE_FIELDS)


# ----------------------------------------------------------------------------- the loop


def _every(step: int, interval: int) -> bool:
    return interval > 0 and step % interval == 0


class _Run:
    """One invocation of the loop: state, data iterator, checkpoints, metrics, loop bookkeeping.

    `loop` is what the checkpoint keeps besides the TrainState and the iterator position: the
    partial logging window, the last train and eval records, and the wall time so far.
    """

    def __init__(self, config, workdir: str, cache: data.BatchCache | None,
                 programs: training.Programs | None):
        self.config, self.cache, self.start = config, cache, time.monotonic()
        self.start_utc = reporting.utc_now()
        self.workdir, self.primary = workdir, jax.process_index() == 0
        if self.primary:
            os.makedirs(workdir, exist_ok=True)
        self.programs = programs or train_setup.build_programs(config)
        self.state = self.programs.init(config.seed, train_setup.input_shape(config))
        self.data = train_setup.train_batches(config, cache)
        self.manager = training.make_checkpoint_manager(
            os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR),
            max_to_keep=config.max_checkpoints_to_keep)
        self.loop = {"window": reporting.TrainWindow(), "last_train": None, "last_eval": None,
                     "wall_s": 0.0, "config": config.to_dict(), "config_history": [],
                     "skipped": [], "warnings": [], "grad_spread_step0": None}
        self.nonfinite = None
        self.skipped_in_a_row = 0

    def restore(self, allow_config_change: bool) -> None:
        """Continues from the latest good checkpoint, if any (refusing a changed config unless
        `allow_config_change`); opens the metrics, cut back to that step."""
        config = self.config
        quarantine = os.path.join(os.path.abspath(self.workdir), CORRUPT_DIR)
        restored = training.restore_latest(self.manager, self.state, quarantine=quarantine)
        resume = None
        if restored is not None:
            self.state, iterator_state, extra = restored
            resume = int(self.state.step)
            changes = common.resume_config_changes(
                extra.get("config", {}), config.to_dict(), resume, allow_config_change,
                ignore=RESUME_FREE_FIELDS)
            self.data.set_state(iterator_state)
            self.loop.update(extra)
            self.loop["window"] = reporting.TrainWindow(**extra["window"])
            if changes:
                logging.warning("Resuming at step %d with a changed config: %s", resume, changes)
                self.loop["config_history"].append({"step": resume, "changed": changes})
            self.loop["config"] = config.to_dict()
            logging.info("Resuming from %s at step %d", self.manager.directory, resume)
        self.step = int(self.state.step)
        self.writer = reporting.MetricsWriter(
            self.workdir, resume_step=resume,
            keep=None if resume is None else reporting.records_before(resume), enabled=self.primary)
        self.window_start = time.monotonic()

    def wall_s(self) -> float:
        return self.loop["wall_s"] + time.monotonic() - self.start

    def save(self) -> None:
        # Every record up to this step reaches the disk before the checkpoint that a resume
        # starts from, so a resumed run's metrics have no holes (and `keep` drops the rest).
        self.writer.flush()
        if self.manager.latest_step() != self.step:
            loop = dict(self.loop, window=dataclasses.asdict(self.loop["window"]),
                        wall_s=self.wall_s())
            training.save_checkpoint(self.manager, self.state, self.data.get_state(), loop,
                                     force=True)

    def train_step(self) -> str:
        """One update (with the gradient record first, when due): 'applied', or for a
        non-finite one (never applied) 'skipped' or 'stopped' (`config.on_nonfinite`)."""
        config, programs, loop = self.config, self.programs, self.loop
        batch = parallel.global_batch(programs.mesh, next(self.data))
        grads_due = _every(self.step, config.grad_norm_every_steps)
        spread_due = self.step == 0 and config.grad_spread_warning > 0
        if grads_due or spread_due:
            stats = jax.device_get(programs.grad_stats(self.state, batch))
            if grads_due:
                self.writer.write(self.step, stats)
            if spread_due:
                loop["grad_spread_step0"], warning = training.gradient_spread(
                    stats["param_grad_norm"], config.grad_spread_warning)
                if warning:
                    logging.warning(warning)
                    loop["warnings"].append(warning)
        self.state, metrics = programs.train_step(self.state, batch)
        metrics = jax.device_get(metrics)
        if not metrics["finite"]:  # Not applied: `self.state` is the state before the step.
            report = dict(programs.nonfinite_report(self.state, batch),
                          loss=float(metrics["loss"]))
            message = training.nonfinite_message(report)
            if config.on_nonfinite == "skip_step" and self.skipped_in_a_row < config.max_skips:
                self.skipped_in_a_row += 1
                loop["skipped"].append(report)
                logging.warning("%s. Skipping this batch (on_nonfinite='skip_step', %d in a "
                                "row).", message, self.skipped_in_a_row)
                return "skipped"
            self.nonfinite = report
            logging.error("%s. Stopping (the update was not applied).", message)
            return "stopped"
        self.skipped_in_a_row = 0
        self.step += 1
        loop["window"].add(metrics)
        return "applied"

    def after_step(self) -> None:
        """Records, evaluation and checkpoints due at `self.step`."""
        config, step, loop = self.config, self.step, self.loop
        last = step == config.num_train_steps
        if _every(step, config.log_every_steps) or last:
            record = loop["window"].record()
            now = time.monotonic()
            record["perf/steps_per_sec"] = loop["window"].steps / max(now - self.window_start,
                                                                      1e-9)
            self.window_start = now
            self.writer.write(step, record)
            loop["last_train"], loop["window"] = record, reporting.TrainWindow()
        if _every(step, config.eval_every_steps) or last:
            loop["last_eval"] = train_setup.evaluate(self.programs, self.state, config,
                                                     self.cache)
            self.writer.write(step, loop["last_eval"])
            logging.info("step %d: %s", step, {**(loop["last_train"] or {}), **loop["last_eval"]})
        if _every(step, config.checkpoint_every_steps):
            self.save()

    def run(self) -> str:
        config = self.config
        progress = reporting.Progress(config.num_train_steps, self.step,
                                      config.progress_every_secs)
        try:
            with common.StopRequests() as stop:
                while self.step < config.num_train_steps:
                    if stop.requested or (config.stop_at_step is not None
                                          and self.step >= config.stop_at_step):
                        self.save()
                        return "preempted"
                    outcome = self.train_step()
                    if outcome == "stopped":
                        return "stopped_nonfinite"  # No checkpoint: the last one is good.
                    if outcome == "skipped":
                        continue  # The same step again, on the next batch.
                    self.after_step()
                    progress.update(self.step)
                self.save()
                return "completed"
        finally:  # Also on errors: let an async save finish, flush the metrics.
            self.manager.wait_until_finished()
            self.manager.close()
            self.writer.close()
            progress.update(self.step, force=True)

    def summary(self, status: str) -> reporting.RunSummary:
        loop = self.loop
        window = loop["window"]
        last_train = window.record() if window.steps else (loop["last_train"] or {})
        last_eval = loop["last_eval"] or {}
        return reporting.RunSummary(
            status=status, step=self.step, train_loss=last_train.get("train/loss"),
            train_error=last_train.get("train/error"), eval_loss=last_eval.get("eval/loss"),
            eval_error=last_eval.get("eval/error"), wall_s=self.wall_s(),
            config=self.config.to_dict(), model=self.programs.model.config.to_dict(),
            config_history=loop["config_history"], skipped_steps=loop["skipped"],
            grad_spread_step0=loop["grad_spread_step0"], warnings=loop["warnings"],
            provenance=reporting.provenance(self.start_utc), nonfinite=self.nonfinite)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       cache: data.BatchCache | None = None,
                       programs: training.Programs | None = None,
                       allow_config_change: bool = False) -> dict[str, Any]:
    """Trains `config` in `workdir` (resuming from its latest checkpoint); returns the summary.

    See the module docstring for the files and statuses. `cache`: serve the data through a
    `resflax.data.BatchCache` shared with other runs (same batches, read once). `programs`:
    `train_setup.build_programs(config)`'s result, to share compiled programs between runs.
    """
    train_setup.check_config(config)
    workdir = os.fspath(workdir)
    with contextlib.ExitStack() as stack:
        if jax.process_index() == 0:  # Other processes of a multi-host run share the workdir.
            stack.enter_context(common.WorkdirLock(workdir))
        run = _Run(config, workdir, cache, programs)
        run.restore(allow_config_change)
        status = run.run()
        summary = dataclasses.asdict(run.summary(status))
        if run.primary:
            reporting.write_json(os.path.join(workdir, SUMMARY_FILE), summary)
    logging.info("%s at step %d: %s", status, run.step,
                 {k: v for k, v in summary.items() if k != "config"})
    return summary


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    reporting.quiet_library_logs()
    if flags.FLAGS.distributed:
        # Before any other JAX call: one process per host, each with its local devices; the
        # ('data',) mesh then spans every device of every process.
        parallel.initialize_distributed(
            flags.FLAGS.coordinator_address, flags.FLAGS.num_processes, flags.FLAGS.process_id
        )
    config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
    allow = flags.FLAGS.allow_config_change
    common.command_line_family_switch(config)
    lock = common.WorkdirLock(workdir)

    def check():  # Before anything compiles: config, dataset, workdir, resume.
        train_setup.check_config(config)
        train_setup.check_data(config)
        check_resume(config, workdir, allow)
        if jax.process_index() == 0:
            lock.__enter__()  # Held to the end of the process (re-entered by the run).

    summary = common.run_main(
        "train", check, lambda: train_and_evaluate(config, workdir, allow_config_change=allow))
    if summary["status"] == "stopped_nonfinite":
        raise SystemExit(1)


if __name__ == "__main__":
    config_flags.DEFINE_config_file("config", None, "Training configuration file.",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and summary.json.")
    flags.DEFINE_bool("distributed", False, "Multi-process run: call jax.distributed.initialize "
                      "(auto-detects SLURM / TPU pods / ... when the flags below are unset).")
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (explicit set-up).")
    flags.DEFINE_integer("num_processes", None, "Number of processes (explicit set-up).")
    flags.DEFINE_integer("process_id", None, "This process's index (explicit set-up).")
    flags.DEFINE_bool("allow_config_change", False, "Resume a checkpoint made with another "
                      "config (the differing fields are recorded in summary.json).")
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main, flags_parser=common.parse_flags)
