"""What every benchmark shares: the machine's description and an interleaved, windowed timer.

Timings here are never assertions: each script measures its variants alternately in one run
(load from other processes hits them all alike) and reports medians and ratios, with the load
average next to them.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import time
from typing import Callable, Mapping

import jax


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    """The machine, the software and the moment: what a figure needs beside it."""
    info = dict(
        date_utc=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        cpu=_cpu_model(),
        cpu_count=os.cpu_count(),
        load_average_1_5_15=[round(x, 2) for x in os.getloadavg()],
        backend=jax.default_backend(),
        devices=[str(d) for d in jax.devices()],
        python=platform.python_version(),
        jax=jax.__version__,
        xla_flags=os.environ.get("XLA_FLAGS", ""),
    )
    try:
        import torch  # Optional: the PyTorch peer.

        info.update(torch=torch.__version__, torch_threads=torch.get_num_threads())
    except ImportError:
        pass
    return info


def interleaved_medians(
    steps: Mapping[str, Callable[[], None]], window_secs: float, repeats: int
) -> dict[str, dict]:
    """Seconds per call of each blocking callable, timed in alternation.

    Each callable is called once to warm up and once to size its window (`window_secs` worth of
    calls), then `repeats` rounds time one window of every variant in turn. Returns, per name,
    `{"median_s", "windows_s", "calls_per_window"}`.
    """
    calls = {}
    for name, step in steps.items():
        step()
        start = time.perf_counter()
        step()
        calls[name] = max(1, round(window_secs / (time.perf_counter() - start)))
    windows: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            for _ in range(calls[name]):
                step()
            windows[name].append((time.perf_counter() - start) / calls[name])
    return {
        name: dict(median_s=statistics.median(w), windows_s=w, calls_per_window=calls[name])
        for name, w in windows.items()
    }
