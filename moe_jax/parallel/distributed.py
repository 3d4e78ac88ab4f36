"""Multi-host helpers: jax.distributed set-up and each process's share of a global batch.

Call ``init_distributed()`` once per process before anything else touches jax (coordinator
address, process count and id from arguments or MOE_JAX_* env variables), build the same mesh
everywhere, and feed each process its own rows (``process_rows``, ``global_batch``).
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from moe_jax.parallel.mesh import spec


def init_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_device_count: int | None = None,
    timeout_s: int = 60,
) -> bool:
    """jax.distributed.initialize from arguments, else MOE_JAX_COORDINATOR /
    MOE_JAX_NUM_PROCESSES / MOE_JAX_PROCESS_ID. Returns False (and does nothing) for a single
    process. local_device_count sets the number of CPU devices per process (CPU only).

    Args:
        coordinator_address: "host:port" of process 0.
        num_processes: processes in the run.
        process_id: this process, in [0, num_processes).
        local_device_count: CPU devices per process (local multi-process runs and tests).
        timeout_s: seconds to wait for every process to join.

    Returns:
        True when jax.distributed was initialized, False for a single process.

    Raises:
        ValueError: several processes but the address, count or id missing, or an id
            outside [0, num_processes).
    """
    env = os.environ
    coordinator_address = coordinator_address or env.get("MOE_JAX_COORDINATOR")
    if num_processes is None and "MOE_JAX_NUM_PROCESSES" in env:
        num_processes = int(env["MOE_JAX_NUM_PROCESSES"])
    if process_id is None and "MOE_JAX_PROCESS_ID" in env:
        process_id = int(env["MOE_JAX_PROCESS_ID"])
    if local_device_count is not None:
        jax.config.update("jax_num_cpu_devices", local_device_count)
    if num_processes in (None, 1) and coordinator_address is None:
        return False
    if coordinator_address is None or num_processes is None or process_id is None:
        raise ValueError(
            "multi-process run needs coordinator_address, num_processes and process_id "
            f"(got {coordinator_address!r}, {num_processes!r}, {process_id!r}); pass them or set "
            "MOE_JAX_COORDINATOR, MOE_JAX_NUM_PROCESSES, MOE_JAX_PROCESS_ID"
        )
    if not 0 <= process_id < num_processes:
        raise ValueError(f"process_id={process_id} must lie in [0, num_processes={num_processes})")
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=timeout_s,
    )
    return True


def process_rows(global_batch: int, mesh: Mesh) -> slice:
    """The rows of a [global_batch, ...] token-split batch that this process's devices own.

    Args:
        global_batch: B, the rows of the global batch.
        mesh: the ("data", "fsdp", "expert") mesh over every process's devices.

    Raises:
        ValueError: this process's devices do not own one contiguous block of rows (a mesh
            not built by make_mesh).
    """
    sharding = NamedSharding(mesh, spec("tokens"))
    idx = sharding.addressable_devices_indices_map((global_batch,))
    bounds = sorted({s[0].indices(global_batch)[:2] for s in idx.values()})
    start, stop = bounds[0][0], bounds[-1][1]
    if any(a != prev_b for (_, prev_b), (a, _) in zip(bounds, bounds[1:])):
        raise ValueError(
            "this process's devices do not own a contiguous block of the batch; build the mesh "
            "with make_mesh so that each process's devices are adjacent"
        )
    return slice(start, stop)


def global_batch(local, mesh: Mesh, global_size: int):
    """Assemble a global token-split array from each process's rows (see process_rows).

    Args:
        local: this process's rows [B_local, ...] (B_local = the length of process_rows).
        mesh: the ("data", "fsdp", "expert") mesh.
        global_size: B, the rows of the global batch.

    Returns:
        A jax.Array [B, ...] split over the batch axes.
    """
    sharding = NamedSharding(mesh, spec("tokens"))
    shape = (global_size, *np.shape(local)[1:])
    return jax.make_array_from_process_local_data(sharding, local, shape)
