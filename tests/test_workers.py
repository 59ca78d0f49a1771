"""experiments.workers: results by task index, errors with the worker's traceback, and SIGTERM
forwarded to the workers (each stops its task as a run checkpoints; no new task starts)."""

import os
import signal
import threading
import time

import pytest

from experiments import workers

_OFFSET = {}


def _set_offset(value):
    _OFFSET["value"] = value


def _square_plus_offset(x):
    if x == 3:
        raise ValueError("task 3 is bad")
    return x * x + _OFFSET["value"], os.getpid()


def _is_one(result):
    return result[0] == 1


def _stop_or_count(task):
    """('stop', dir) ends (a preempted run) once the other task has started; ('count', dir) is
    several runs that check `stop_requested` between them, for up to 30 s."""
    kind, marker_dir = task
    marker = os.path.join(marker_dir, "counting")
    deadline = time.monotonic() + 30
    if kind == "stop":
        while not os.path.exists(marker) and time.monotonic() < deadline:
            time.sleep(0.02)
        return "stop"
    open(marker, "w").close()
    while time.monotonic() < deadline:
        if workers.stop_requested():
            return "stopped between runs"
        time.sleep(0.05)
    return "never stopped"


def _is_stop(result):
    return result == "stop"


def _wait_for_sigterm(marker_dir):
    """Like a training run: its own SIGTERM handler; returns 'stopped' once it got one."""
    got = []
    signal.signal(signal.SIGTERM, lambda *_: got.append(1))
    open(os.path.join(marker_dir, f"started_{os.getpid()}"), "w").close()
    deadline = time.monotonic() + 60
    while not got and time.monotonic() < deadline:
        time.sleep(0.02)
    return "stopped" if got else "timed out"


def test_results_by_index_from_several_processes_after_the_initializer():
    done = workers.map_tasks(_square_plus_offset, [0, 1, 2, 4, 5], processes=2,
                             initializer=_set_offset, initargs=(10,))
    assert {i: v for i, (v, _) in done.items()} == {0: 10, 1: 11, 2: 14, 3: 26, 4: 35}
    pids = {pid for _, pid in done.values()}
    assert os.getpid() not in pids and 1 <= len(pids) <= 2


def test_a_failing_task_raises_with_the_workers_traceback():
    with pytest.raises(workers.WorkerError, match=r"(?s)ValueError: task 3 is bad"):
        workers.map_tasks(_square_plus_offset, [1, 3, 2], processes=2,
                          initializer=_set_offset, initargs=(0,))


def test_a_stop_result_stops_handing_out_tasks():
    done = workers.map_tasks(_square_plus_offset, [0, 1, 2, 4], processes=1,
                             initializer=_set_offset, initargs=(0,),
                             is_stop=_is_one)
    assert sorted(done) == [0, 1]


def test_a_stop_reaches_a_task_running_in_another_worker(tmp_path):
    tasks = [("stop", str(tmp_path)), ("count", str(tmp_path))]
    done = workers.map_tasks(_stop_or_count, tasks, processes=2, is_stop=_is_stop)
    assert done == {0: "stop", 1: "stopped between runs"}
    assert not workers.stop_requested()  # Never in the parent.


def test_sigterm_is_forwarded_and_no_new_task_starts(tmp_path):
    def send_when_both_started():
        deadline = time.monotonic() + 60
        while len(os.listdir(tmp_path)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    thread = threading.Thread(target=send_when_both_started)
    thread.start()
    done = workers.map_tasks(_wait_for_sigterm, [str(tmp_path)] * 4, processes=2)
    thread.join()
    assert sorted(done.values()) == ["stopped", "stopped"]  # Two ran; two never started.
    assert len(os.listdir(tmp_path)) == 2
    assert signal.getsignal(signal.SIGTERM) == before  # The parent's handlers restored.


def test_processes_must_be_positive():
    with pytest.raises(ValueError, match="processes=0"):
        workers.map_tasks(_square_plus_offset, [1], processes=0)
