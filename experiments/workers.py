"""A sweep's independent runs trained in a few processes at once, on one machine.

Why processes: on a 2-core CPU a small net (the trainability sweep's width-8 conv nets on 2x2 to
8x8 maps) keeps XLA's thread pool only partly busy, and two runs in one process would share
that one pool. Two processes, each with its own XLA client, train two runs at once: measured
1.54x the throughput of one (two 110-layer conv runs of the trainability sweep).

Why not on GPU/TPU: one process owns an accelerator (JAX preallocates most of its memory), so
`map_tasks` is for the CPU backend; callers fall back to one process elsewhere
(`processes_for_backend`).

Contract of `map_tasks(function, tasks, processes, initializer, initargs)`:
- `function(task)` runs in a worker process (start method `spawn`: never fork a process that
  has JAX threads), after `initializer(*initargs)` ran once in that process; each must be a
  module-level function (pickled by name), and each task and result picklable.
- Tasks are handed out one at a time to whichever worker is free, in the order given: give the
  longest first.
- Results come back as `{index: result}` for every task that finished; fewer than the tasks
  when the sweep was stopped early.
- A result for which `is_stop(result)` holds (a preempted run) makes the workers take no new
  task (`is_stop` runs in the worker: a module-level function too). A task that is several
  runs checks `stop_requested()` between them.
- SIGTERM / SIGINT received by the parent are forwarded to the workers (a run checkpoints and
  returns `preempted`, as it does in one process) and no new task is handed out.
- A task that raises re-raises in the parent (`WorkerError`, with the worker's traceback) after
  the other workers finished their current tasks; a worker that dies (killed, out of memory)
  is a `WorkerError` naming its exit code.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import signal
import threading
import traceback
from typing import Any, Callable, Sequence

from absl import logging

_POLL_S = 0.5


class WorkerError(RuntimeError):
    """A task failed in a worker process, or a worker died."""


def processes_for_backend(processes: int) -> int:
    """`processes` on the CPU backend; 1 on GPU/TPU (one process owns the accelerator)."""
    import jax  # pylint: disable=g-import-not-at-top

    if processes > 1 and jax.default_backend() != "cpu":
        logging.info("workers=%d applies to the CPU backend only; running the sweep in this "
                     "process on %s", processes, jax.default_backend())
        return 1
    return processes


_STOP = None  # In a worker process: the sweep's stop event, shared by all workers.


def stop_requested() -> bool:
    """In a worker process, whether the sweep is stopping (a signal, a preempted run or an
    error anywhere): a task made of several runs checks it between them. False elsewhere."""
    return _STOP is not None and _STOP.is_set()


def _never(result) -> bool:
    del result
    return False


def _worker(function, initializer, initargs, is_stop, verbosity, tasks, results, stop
            ) -> None:
    """A worker process: `initializer(*initargs)`, then tasks until the sentinel or `stop`."""
    global _STOP
    _STOP = stop
    logging.set_verbosity(verbosity)
    # The parent forwards SIGTERM and SIGINT (`_forward_signals`); a terminal's Ctrl-C also
    # reaches the worker directly. Outside a run's own handler (experiments.train), either
    # means: finish the current task, take no other.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        if initializer is not None:
            initializer(*initargs)
    except BaseException:  # pylint: disable=broad-except
        results.put((None, "error", traceback.format_exc()))
        return
    while not stop.is_set():
        item = tasks.get()
        if item is None:
            return
        index, task = item
        try:
            result = function(task)
        except BaseException:  # pylint: disable=broad-except
            results.put((index, "error", traceback.format_exc()))
            return
        if is_stop(result):
            stop.set()  # Before the next `tasks.get`: no task starts after this one.
        results.put((index, "ok", result))


def map_tasks(function: Callable[[Any], Any], tasks: Sequence[Any], processes: int,
              initializer: Callable[..., None] | None = None, initargs: tuple = (),
              is_stop: Callable[[Any], bool] = _never) -> dict[int, Any]:
    """Runs `function(task)` for each task in `processes` worker processes (module docstring);
    returns `{index in tasks: result}` for the tasks that finished."""
    if processes < 1:
        raise ValueError(f"processes={processes} must be >= 1")
    context = multiprocessing.get_context("spawn")
    todo, results, stop = context.Queue(), context.Queue(), context.Event()
    for item in enumerate(tasks):
        todo.put(item)
    args = (function, initializer, initargs, is_stop, logging.get_verbosity(), todo, results,
            stop)
    workers = [context.Process(target=_worker, name=f"resflax-worker-{i}", daemon=True,
                               args=args) for i in range(min(processes, len(tasks)))]
    for _ in workers:
        todo.put(None)
    done: dict[int, Any] = {}
    errors: list[str] = []
    restore = _forward_signals(workers, stop)
    try:
        for w in workers:
            w.start()
        # Read until every worker has exited: a process that put results on a queue exits
        # only once they are read (joining it first could deadlock).
        while True:
            try:
                index, kind, value = results.get(timeout=_POLL_S)
            except queue.Empty:
                if any(w.is_alive() for w in workers):
                    continue
                try:  # Exited: what it wrote is all in the pipe now.
                    index, kind, value = results.get(timeout=_POLL_S)
                except queue.Empty:
                    break
            if kind == "error":
                errors.append(value)
                stop.set()  # The others finish their current tasks (runs checkpoint).
            else:
                done[index] = value
    finally:
        restore()
        for w in workers:
            if w.is_alive():
                w.terminate()
            w.join()
    if errors:
        raise WorkerError("a task failed in a worker process:\n" + errors[0])
    died = [w for w in workers if w.exitcode != 0]
    if died and len(done) < len(tasks) and not stop.is_set():
        raise WorkerError(
            f"worker process {died[0].name} exited with code {died[0].exitcode} before its "
            f"tasks were done ({len(done)} of {len(tasks)} done). Its stderr is above. Workers "
            "start by importing the main module (multiprocessing's 'spawn'): a script that "
            "starts a sweep must do so under `if __name__ == '__main__':`")
    return done


def _forward_signals(workers, stop) -> Callable[[], None]:
    """Installs the parent's handlers: SIGTERM or a first SIGINT stops handing out tasks and
    sends SIGTERM to the workers (each run checkpoints and returns `preempted`; SIGTERM, not
    SIGINT, because a terminal's Ctrl-C already reached them and a second SIGINT aborts a run);
    a second SIGINT raises KeyboardInterrupt here, which terminates the workers. Returns the
    function that restores the previous handlers."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    received = []

    def handle(signum, frame):
        del frame
        if signum == signal.SIGINT and received:
            raise KeyboardInterrupt
        received.append(signum)
        stop.set()
        logging.warning("%s received: the worker processes stop after their current runs "
                        "(checkpointed)", signal.Signals(signum).name)
        for w in workers:
            if w.is_alive() and w.pid is not None:
                try:
                    os.kill(w.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGTERM, signal.SIGINT)}

    def restore():
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    return restore
