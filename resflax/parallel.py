"""Device mesh, shardings and multi-process start-up: one code path for 1 CPU and N devices.

Data parallelism is a 1-D mesh with axis `'data'` over every (global) device. Batches are
sharded along their leading axis over `'data'`; the train state is replicated. Every step is a
`jax.jit` with these `NamedSharding`s (no `pmap`): reductions over the batch (the mean loss,
batch-norm statistics) are over the *global* batch, and XLA inserts the all-reduces.

Multi-host: call `initialize_distributed()` before any other JAX call; each process then feeds
its own shard of the batch to `global_batch`, which assembles the global `jax.Array`.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(num_devices: int | None = None) -> Mesh:
    """A `('data',)` mesh over the first `num_devices` global devices (all when None)."""
    devices = jax.devices()
    if num_devices is not None:
        if not 1 <= num_devices <= len(devices):
            raise ValueError(f"num_devices={num_devices} not in [1, {len(devices)}]")
        devices = devices[:num_devices]
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def data_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over `'data'`, other axes whole."""
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """A full copy on every device of the mesh."""
    return NamedSharding(mesh, P())


def global_batch(mesh: Mesh, local_batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
    """Global arrays sharded over `'data'` from this process's part of the batch.

    Each process passes its own `[B / num_processes, ...]` slice (with one process: the whole
    batch); the result has the global shape `[B, ...]`. The per-process batch must split evenly
    over the process's devices in the mesh.
    """
    sharding = data_sharding(mesh)
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
        for k, v in local_batch.items()
    }


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: Sequence[int] | None = None,
) -> None:
    """`jax.distributed.initialize`: auto-detected (SLURM, TPU pods, ...) when all args are None.

    Explicitly, e.g. two local CPU processes:
    `initialize_distributed('127.0.0.1:12345', num_processes=2, process_id=i)`.
    Must run before any other JAX computation in the process.
    """
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=local_device_ids,
    )
