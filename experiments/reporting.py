"""Side effects shared by experiments: metrics to TensorBoard + JSONL, progress logs, JSON files.

- `MetricsWriter(workdir)`: each `write(step, metrics)` is one line of `workdir/metrics.jsonl`
  (`{"step": int, name: value, ...}`) and one TensorBoard scalar per value (a list value
  `v` becomes the scalars `name/000`, `name/001`, ...) in an events file in `workdir`.
- `TrainWindow`: the running sums behind each `train/*` record of a training loop;
  `records_before`: the records a resumed loop keeps; `RunSummary`: its `summary.json`.
- `Progress`: logs `step / total, steps/s, ETA` through absl logging every `every_secs`.
- `provenance(start_utc)`: versions, devices, git revision, host, argv, times for results.
- `write_json`: atomic (write a temporary file, then rename), so a reader never sees half a file.

Non-finite floats are written as `null` (JSON has no NaN / Infinity).
"""

from __future__ import annotations

import dataclasses
import json
import logging as std_logging
import math
import os
import threading
import time
from typing import Any, Callable, Iterable, Mapping

import numpy as np
from absl import logging

METRICS_FILE = "metrics.jsonl"


def jsonable(obj: Any) -> Any:
    """Plain Python from numpy/jax scalars and arrays, dicts, sequences; NaN/inf -> None."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):  # numpy / jax arrays
        return jsonable(np.asarray(obj).tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _temporary_name(path: str) -> str:
    directory, name = os.path.split(os.path.abspath(path))
    return os.path.join(directory, f".{name}.{os.getpid()}.{threading.get_ident()}.tmp")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Writes `obj` as indented JSON to `path` atomically (same-directory temp file + rename)."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = _temporary_name(path)
    try:
        with open(tmp, "w") as f:
            json.dump(jsonable(obj), f, indent=2, allow_nan=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_json(path: str | os.PathLike) -> Any:
    with open(path) as f:
        return json.load(f)


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a JSONL file ([] if it does not exist); a torn last line is ignored."""
    if not os.path.exists(path):
        return []
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break  # A line cut short by a crash can only be the last one.
    return records


def _write_lines(path: str, records: Iterable[Mapping[str, Any]]) -> None:
    tmp = _temporary_name(path)
    with open(tmp, "w") as f:
        for record in records:
            f.write(json.dumps(jsonable(record), allow_nan=False) + "\n")
    os.replace(tmp, path)


class MetricsWriter:
    """Scalars to `workdir/metrics.jsonl` and TensorBoard events in `workdir`.

    Resuming at step `resume_step`: `keep(record)` chooses which existing JSONL records stay
    (those written after the checkpoint are dropped, so the file equals an uninterrupted run's),
    and TensorBoard discards events with step > `resume_step` (tensorboardX `purge_step`).
    `enabled=False` (non-primary processes) makes every method a no-op.
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        resume_step: int | None = None,
        keep: Callable[[Mapping[str, Any]], bool] | None = None,
        enabled: bool = True,
    ):
        self.enabled = enabled
        self.path = os.path.join(os.fspath(workdir), METRICS_FILE)
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        if resume_step is None:
            if os.path.exists(self.path):
                os.unlink(self.path)  # A fresh run starts a fresh file.
        elif os.path.exists(self.path):
            keep = keep or (lambda r: r["step"] <= resume_step)
            _write_lines(self.path, [r for r in read_jsonl(self.path) if keep(r)])
        from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top

        purge = None if resume_step is None else resume_step + 1
        self._tb = SummaryWriter(os.fspath(workdir), purge_step=purge, flush_secs=30)
        self._jsonl = open(self.path, "a")

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        metrics = jsonable(metrics)
        self._jsonl.write(json.dumps({"step": int(step), **metrics}, allow_nan=False) + "\n")
        for name, value in metrics.items():
            if isinstance(value, list):
                for i, v in enumerate(value):
                    if v is not None:
                        self._tb.add_scalar(f"{name}/{i:03d}", v, step)
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                self._tb.add_scalar(name, value, step)

    def flush(self) -> None:
        """Everything written so far reaches the files (and the disk, for the JSONL)."""
        if self.enabled:
            self._jsonl.flush()
            os.fsync(self._jsonl.fileno())
            self._tb.flush()

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()
            self.enabled = False

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclasses.dataclass
class TrainWindow:
    """Sums of the applied train steps' metrics since the last `train/*` record. A checkpoint
    keeps it (`dataclasses.asdict`), so a resumed run's next record averages the same steps."""

    steps: int = 0
    loss: float = 0.0
    error: float = 0.0
    grad_norm: float = 0.0
    learning_rate: float | None = None

    def add(self, metrics: Mapping[str, Any]) -> None:
        """Adds one step's `loss`, `error` and `grad_norm`; keeps its `learning_rate`."""
        self.steps += 1
        self.loss += float(metrics["loss"])
        self.error += float(metrics["error"])
        self.grad_norm += float(metrics["grad_norm"])
        self.learning_rate = float(metrics["learning_rate"])

    def record(self) -> dict[str, float]:
        """`train/loss`, `train/error`, `train/accuracy`, `train/grad_norm`: means over the
        window's steps; `train/learning_rate`: the last step's."""
        n = max(self.steps, 1)
        return {"train/loss": self.loss / n, "train/error": self.error / n,
                "train/accuracy": 1.0 - self.error / n, "train/grad_norm": self.grad_norm / n,
                "train/learning_rate": self.learning_rate}


def records_before(resume_step: int) -> Callable[[Mapping[str, Any]], bool]:
    """`MetricsWriter`'s `keep` on a resume at `resume_step`: the records a training loop has
    written by the time it checkpoints at that step, i.e. everything up to it except the
    gradient record *at* it (computed in the next iteration)."""
    return lambda r: r["step"] < resume_step or (
        r["step"] == resume_step and "param_grad_norm" not in r
    )


@dataclasses.dataclass(frozen=True)
class RunSummary:
    """`summary.json` of one training run (`experiments.train`); `dataclasses.asdict` is the
    file. Final train numbers are the last logging window's, eval numbers the last evaluation's.
    """

    status: str  # experiments.train.STATUSES
    step: int
    train_loss: float | None
    train_error: float | None
    eval_loss: float | None
    eval_error: float | None
    wall_s: float  # Summed over restarts.
    config: dict[str, Any]  # The run config, as given.
    model: dict[str, Any]  # Every ModelConfig field, resolved.
    config_history: list  # [{"step", "changed"}]: resumes with a changed config.
    skipped_steps: list  # Non-finite reports of the skipped updates (on_nonfinite='skip_step').
    grad_spread_step0: float | None  # max/min per-block gradient norm at initialization.
    warnings: list
    provenance: dict[str, Any]
    nonfinite: dict[str, Any] | None = None  # The report of the update that stopped the run.


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class Progress:
    """Logs `step s/N (p%), r steps/s, ETA t` at most every `every_secs` seconds.

    The rate is measured since the previous report (so compile time shows up only in the
    first one); `rate()` returns it for logging as a metric.
    """

    def __init__(self, total_steps: int, start_step: int, every_secs: float = 60.0,
                 prefix: str = ""):
        self.total, self.every, self.prefix = total_steps, every_secs, prefix
        self._step, self._time = start_step, time.monotonic()
        self._rate: float | None = None

    def update(self, step: int, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._time < self.every:
            return
        if step > self._step and now > self._time:
            self._rate = (step - self._step) / (now - self._time)
        self._step, self._time = step, now
        eta = (self.total - step) / self._rate if self._rate else float("nan")
        logging.info(
            "%sstep %d/%d (%.1f%%), %s steps/s, ETA %s", self.prefix, step, self.total,
            100.0 * step / max(self.total, 1),
            "?" if self._rate is None else f"{self._rate:.2f}",
            "?" if not math.isfinite(eta) else format_seconds(eta),
        )

    def rate(self) -> float | None:
        return self._rate


def quiet_library_logs(prefixes: tuple[str, ...] = ("orbax", "tensorflow_datasets")) -> None:
    """Hides INFO lines that libraries (Orbax logs every checkpoint step by step) send through
    absl logging; their warnings and errors still show. For entry points only."""
    class _Filter(std_logging.Filter):
        def filter(self, record):
            return record.levelno >= std_logging.WARNING or not any(
                f"{os.sep}{p}{os.sep}" in record.pathname for p in prefixes
            )

    logging.get_absl_handler().addFilter(_Filter())


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _git_describe() -> str | None:
    """`git describe --always --dirty` of the checkout this code runs from, if it is one."""
    import subprocess  # pylint: disable=g-import-not-at-top

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--tags"], cwd=repo,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def provenance(start_utc: str) -> dict[str, Any]:
    """Where and with what a result was made: package versions, backend and devices, process
    count, git revision, Python, host, command line, start and end time (UTC)."""
    import importlib.metadata as metadata  # pylint: disable=g-import-not-at-top
    import platform  # pylint: disable=g-import-not-at-top
    import socket  # pylint: disable=g-import-not-at-top
    import sys  # pylint: disable=g-import-not-at-top

    import jax  # pylint: disable=g-import-not-at-top

    versions = {}
    for package in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain",
                    "tensorflow-datasets", "numpy", "resflax"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    devices = jax.devices()
    return {
        "versions": versions,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in devices],
        "device_kind": devices[0].device_kind if devices else None,
        "process_count": jax.process_count(),
        "process_index": jax.process_index(),
        "git": _git_describe(),
        "python": platform.python_version(),
        "host": socket.gethostname(),
        "argv": list(sys.argv),
        "start_utc": start_utc,
        "end_utc": utc_now(),
    }
