"""Helpers shared by the training tests: a finished run's records and final state."""

import os

import jax
import numpy as np

from experiments import reporting, train_setup
from experiments import train as app
from resflax import training


def records(workdir, drop_perf=True):
    """A run's `metrics.jsonl` records, without the wall-clock `perf/*` values."""
    rs = reporting.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    return [{k: v for k, v in r.items() if not (drop_perf and k.startswith("perf/"))} for r in rs]


def final_state(config, workdir):
    """`(TrainState of numpy arrays, iterator state)` of the run's latest good checkpoint."""
    programs = train_setup.build_programs(config)
    target = programs.init(config.seed, train_setup.input_shape(config))
    manager = training.make_checkpoint_manager(os.path.join(workdir, app.CHECKPOINT_DIR))
    state, iterator_state, _ = training.restore_latest(manager, target)
    manager.close()
    return jax.tree.map(np.asarray, jax.device_get(state)), iterator_state


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
