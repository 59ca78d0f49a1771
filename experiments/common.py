"""What every app shares: the model of a config, dotted overrides (sweeps and the command line),
and one convention for user errors.

Overrides. A sweep entry is a dict of dotted paths into the run config, the same paths as the
command line's `--config.<path>=value`: `{"model.block": "plain", "model.depth": 56,
"optim.warmup_steps": 400}`. Changing `model.family` (in an override or on the command line)
starts the model from that family's defaults: every other model field not named in the same
overrides returns to `None`, so `{"model.family": "cifar_resnet", "model.depth": 56}` is He et
al.'s ResNet-56, not an MLP preset's width and norm on a conv net.

Resume. `resume_config_changes` compares a checkpoint's config with this run's and refuses a
changed one (UserError listing the fields) unless the user allows it.

User errors. A bad config, flag, path or dataset raises `ValueError` (or `UserError`) naming
the field; `run_main` prints it as one line `<app>: error: ...` and exits with status 2 before
anything is compiled. Other exceptions keep their traceback.
"""

from __future__ import annotations

import copy
import os
import signal
import sys
import threading
from typing import Any, Callable, Iterable, Mapping

import ml_collections
from absl import flags, logging
from ml_collections import config_flags

from experiments.reporting import jsonable
from resflax.config import FIELDS, ModelConfig, from_config_dict

USAGE_ERROR_EXIT_CODE = 2


class UserError(ValueError):
    """A problem with the user's input (config, flags, paths, data): one line, exit code 2."""


def model_config(config: ml_collections.ConfigDict) -> ModelConfig:
    """`ModelConfig` of `config.model`; ValueError naming `config.model.<field>`."""
    return from_config_dict(config.model, "config.model")


def _set(config: ml_collections.ConfigDict, path: str, value: Any, where: str) -> None:
    parts = path.split(".")
    parent = config
    for part in parts[:-1]:
        parent = parent[part] if part in parent else None
        if not isinstance(parent, ml_collections.ConfigDict):
            break
    if not isinstance(parent, ml_collections.ConfigDict) or parts[-1] not in parent:
        allowed = sorted(config.model) if parts[0] == "model" and len(parts) == 2 else None
        raise ValueError(f"{where}: unknown field {path!r}"
                         + (f"; allowed model fields: {allowed}" if allowed else ""))
    try:
        parent[parts[-1]] = value
    except TypeError as e:
        raise ValueError(f"{where}: {path}={value!r}: {e}") from None


def reset_model_for_family(config: ml_collections.ConfigDict, keep: set[str]) -> None:
    """Every model field but `family` and `keep` back to None (the family's default)."""
    for name in FIELDS:
        if name != "family" and name not in keep and name in config.model:
            config.model[name] = None


def apply_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, Any],
                    where: str = "overrides") -> ml_collections.ConfigDict:
    """A copy of `config` with the dotted-path `overrides` set (see the module docstring)."""
    if not isinstance(overrides, Mapping):
        raise ValueError(f"{where}={overrides!r} must be a dict of dotted config paths")
    run = copy.deepcopy(config)
    with run.unlocked():
        family = overrides.get("model.family")
        if family is not None and family != run.model.family:
            reset_model_for_family(
                run, {k.split(".", 1)[1] for k in overrides if k.startswith("model.")})
        for path, value in overrides.items():
            _set(run, path, value, where)
    return run


def command_line_family_switch(config: ml_collections.ConfigDict, flag_name: str = "config",
                               flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Applies the family rule to `--config.model.family=...` given on the command line: when
    it differs from the config file's family, the file's other model fields that the command
    line did not set return to None (in place; `config` is the parsed flag value)."""
    flag = flag_values[flag_name]
    overrides = config_flags.get_override_values(flag)
    if "model.family" not in overrides:
        return
    file_config = flag.parser.parse(config_flags.get_config_filename(flag))
    if file_config.model.family == config.model.family:
        return
    keep = {k.split(".", 1)[1] for k in overrides if k.startswith("model.")}
    with config.unlocked():
        reset_model_for_family(config, keep)
    logging.info("model.family=%s on the command line: the other model fields are that "
                 "family's defaults except %s", config.model.family, sorted(keep - {"family"}))


def require_fields(config: ml_collections.ConfigDict, names: Iterable[str],
                   config_file: str) -> None:
    """ValueError naming the first of `names` missing from `config` and the file documenting it.

    Args:
      config: the app's config.
      names: top-level fields the app reads.
      config_file: the config file that documents them, e.g. `configs/train.py`.
    """
    for name in names:
        if name not in config:
            raise ValueError(f"config.{name} is missing (see {config_file})")


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def resume_config_changes(saved: Mapping[str, Any], current: Mapping[str, Any], step: int,
                          allow_change: bool = False, ignore: Iterable[str] = ()
                          ) -> dict[str, list[Any]]:
    """The fields in which the config a checkpoint was made with differs from this run's.

    Args:
      saved: the checkpoint's config (`ConfigDict.to_dict()` form).
      current: this run's config, in the same form.
      step: the checkpoint's step (for the message).
      allow_change: return the changes instead of refusing them.
      ignore: dotted fields that may differ freely (they change when or how a run reports).

    Returns:
      `{dotted field: [saved value, current value]}` (JSON form), sorted by field.

    Raises:
      UserError: listing the changes, when there are some and not `allow_change`.
    """
    old, new = (_flatten(jsonable(c)) for c in (saved, current))
    changes = {k: [old.get(k), new.get(k)] for k in sorted(set(old) | set(new))
               if old.get(k) != new.get(k) and k not in ignore}
    if changes and not allow_change:
        listed = ", ".join(f"config.{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items())
        raise UserError(
            f"the checkpoint at step {step} was made with another config ({listed}); resume "
            "with the same config, use another --workdir, or pass --allow_config_change to "
            "resume anyway (recorded in summary.json's config_history)")
    return changes


def check_workdir(workdir: str) -> None:
    """UserError unless `workdir` is a directory or can be made one."""
    if not workdir:
        raise UserError("--workdir is required")
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise UserError(f"--workdir={workdir!r} exists and is not a directory")


def run_main(app_name: str, check: Callable[[], Any], run: Callable[[], Any]) -> Any:
    """`check()` then `run()`. A `ValueError` from `check` (the user's config, flags, paths or
    data) becomes one line on stderr, `<app>: error: ...`, and exit status 2; errors in `run`
    keep their traceback."""
    try:
        check()
    except ValueError as e:
        print(f"{app_name}: error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
        raise SystemExit(USAGE_ERROR_EXIT_CODE) from None
    return run()


class StopRequests:
    """SIGTERM and the first SIGINT set `requested`; the loop stops between steps. A second
    SIGINT raises KeyboardInterrupt at once. Handlers are installed in the main thread only."""

    def __init__(self):
        self.requested: str | None = None
        self._previous = {}

    def _handle(self, signum, frame):
        del frame
        if signum == signal.SIGINT and self.requested is not None:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        logging.warning("%s received: stopping after this step and checkpointing", self.requested)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class WorkdirLock:
    """An exclusive lock on `workdir` for the whole run (`fcntl.flock` on `workdir/.lock`).

    A second process on the same workdir fails at once with a `UserError` naming the holder
    (pid, host, start time, command line). The kernel drops the lock when the holder exits,
    however it exits (SIGKILL included), so a crashed run never leaves a stale lock. On
    filesystems without `flock` (some network filesystems) the lock is advisory-only and a
    warning says so.
    """

    FILE = ".lock"
    _held: dict[str, int] = {}  # path -> depth: re-entrant within this process.

    def __init__(self, workdir: str):
        self.path = os.path.join(os.path.abspath(workdir), self.FILE)
        self._file = None

    def __enter__(self) -> "WorkdirLock":
        if self.path in WorkdirLock._held:
            WorkdirLock._held[self.path] += 1
            return self
        self._acquire()
        WorkdirLock._held[self.path] = 1
        return self

    def _acquire(self) -> None:
        import fcntl  # pylint: disable=g-import-not-at-top
        import json  # pylint: disable=g-import-not-at-top
        import socket  # pylint: disable=g-import-not-at-top
        import time  # pylint: disable=g-import-not-at-top

        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        f = open(self.path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            f.close()
            raise UserError(f"workdir {os.path.dirname(self.path)!r} is in use by another run "
                            f"({holder}); wait for it or use another --workdir") from None
        except OSError as e:  # No flock support here: run unlocked, say so.
            logging.warning("cannot lock %s (%s): concurrent runs are not prevented", self.path, e)
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                            "since_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                            "argv": sys.argv}))
        f.flush()
        self._file = f

    def __exit__(self, *exc) -> None:
        WorkdirLock._held[self.path] -= 1
        if WorkdirLock._held[self.path] == 0:
            del WorkdirLock._held[self.path]
            if self._file is not None:
                self._file.close()  # Releases the lock.
                self._file = None


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing (`app.parse_flags_with_usage`), every error on one line: also
    ml_collections' tracebacks for an unknown `--config.<path>` or a failing `get_config`."""
    try:
        rest = flags.FLAGS(argv)
        if "config" in flags.FLAGS:
            flags.FLAGS.config.keys()  # A config that failed to load raises here.
        return rest
    except flags.Error as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        message = f"{lines[0]} {lines[-1]}" if "Traceback" in str(e) else " ".join(lines)
    except OSError as e:  # An unloadable --config file.
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        message = f"--config: {lines[-1] if lines else e}"
    except (AttributeError, KeyError) as e:
        while isinstance(e, (AttributeError, KeyError)) and e.args:  # Unwrap to the text.
            e = e.args[0]
        overrides = " ".join(a for a in argv[1:] if a.startswith("--config."))
        message = f"unknown config field {' '.join(str(e).split())} in {overrides}"
    print(f"FATAL Flags parsing error: {message}", file=sys.stderr, flush=True)
    sys.exit(USAGE_ERROR_EXIT_CODE)
