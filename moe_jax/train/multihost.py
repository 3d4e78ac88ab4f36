"""One run across processes: jax.distributed set-up from the config, the agreement check, each
process's share of a batch, and which process writes.

The same command runs on every host with the same --workdir. ``initialize(config)`` runs first,
before anything touches a jax device: it reads config.dist (coordinator_address,
num_processes, process_id, local_devices) and calls jax.distributed.initialize with them, with
the MOE_JAX_* environment variables, or with no arguments where a cluster is detected (Cloud
TPU pods, SLURM, Open MPI: jax finds the coordinator itself); with none of them the run is one
process. Then every process reads only its rows of each global batch (grain, by process) and
``to_global`` assembles the global arrays with jax.make_array_from_process_local_data.
Process 0 writes logs, TensorBoard, plots and the workdir's config and report; every process
takes part in checkpoints (orbax) and saves its own data-iterator state.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding

from moe_jax import parallel
from moe_jax.core.validate import field_error, is_int

DIST_KEYS = ("coordinator_address", "num_processes", "process_id", "local_devices")
# Environment variables that mean "this process is one of several" (jax detects the rest).
_CLUSTER_ENV = ("TPU_WORKER_HOSTNAMES", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")


@dataclasses.dataclass(frozen=True)
class DistConfig:
    """How this process joins the run (None fields: from the environment, else one process)."""

    coordinator_address: str | None = None  # "host:port" of process 0's coordinator
    num_processes: int | None = None  # processes in the run
    process_id: int | None = None  # this process, in [0, num_processes)
    local_devices: int | None = None  # CPU only: devices per process (local multi-process runs)

    def __post_init__(self):
        a = self.coordinator_address
        if a is not None and (not isinstance(a, str) or ":" not in a):
            raise field_error("config", "dist.coordinator_address", a, "'host:port' or None")
        for name, lo in (("num_processes", 1), ("process_id", 0), ("local_devices", 1)):
            v = getattr(self, name)
            if v is not None and not (is_int(v) and v >= lo):
                raise field_error("config", f"dist.{name}", v, f"an int >= {lo} or None")
        n, i = self.num_processes, self.process_id
        if n is not None and i is not None and i >= n:
            raise field_error("config", "dist.process_id", i, f"must lie in [0, {n})")


def dist_config(config) -> DistConfig:
    """The validated dist section of a ConfigDict / mapping (absent: all None)."""
    section = config.get("dist") if hasattr(config, "get") else None
    d = dict(section.to_dict() if hasattr(section, "to_dict") else section or {})
    unknown = sorted(set(d) - set(DIST_KEYS))
    if unknown:
        raise ValueError(
            f"unknown config key(s) {', '.join('config.dist.' + k for k in unknown)}; "
            f"known keys of config.dist: {list(DIST_KEYS)}"
        )
    return DistConfig(**d)


def _cluster_detected() -> bool:
    env = os.environ
    # Real host names only (libtpu may leave a warning sentence in the variable).
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h and " " not in h]
    counts = [env.get(k, "1") for k in _CLUSTER_ENV[1:]]
    return len(hosts) > 1 or any(c.isdigit() and int(c) > 1 for c in counts)


def initialize(config) -> DistConfig:
    """jax.distributed.initialize from config.dist / MOE_JAX_* / a detected cluster (see the
    module docstring); call before any jax computation. Idempotent; returns the DistConfig."""
    dist = config if isinstance(config, DistConfig) else dist_config(config)
    if jax.distributed.is_initialized():
        return dist
    explicit = (
        dist.coordinator_address,
        dist.num_processes,
        dist.process_id,
    ) != (None, None, None) or any(
        k in os.environ
        for k in ("MOE_JAX_COORDINATOR", "MOE_JAX_NUM_PROCESSES", "MOE_JAX_PROCESS_ID")
    )
    if explicit or dist.local_devices is not None:
        try:
            parallel.init_distributed(
                dist.coordinator_address,
                dist.num_processes,
                dist.process_id,
                local_device_count=dist.local_devices,
            )
        except ValueError as err:
            raise ValueError(f"invalid config.dist: {err}") from None
    elif _cluster_detected():
        jax.distributed.initialize()  # Cloud TPU, SLURM, Open MPI: jax reads the environment
    return dist


def is_main() -> bool:
    """True in the process that writes logs, plots and the workdir's bookkeeping files."""
    return jax.process_index() == 0


def sync(name: str) -> None:
    """Every process waits here until all of them arrive (a barrier named `name`)."""
    multihost_utils.sync_global_devices(f"moe_jax:{name}")


def check_same_config(config_json: dict) -> None:
    """Every process must run the same config (dist.process_id aside): ValueError otherwise,
    raised on every process, before any model is built."""
    if jax.process_count() == 1:
        return
    data = {k: v for k, v in config_json.items() if k != "dist"}
    data["dist"] = {k: v for k, v in (config_json.get("dist") or {}).items() if k != "process_id"}
    digest = hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).digest()
    mine = np.frombuffer(digest, np.uint8)
    every = np.asarray(multihost_utils.process_allgather(mine))  # [P, 32]
    bad = [i for i in range(every.shape[0]) if not np.array_equal(every[i], every[0])]
    if bad:
        raise ValueError(
            f"processes disagree on the config: process(es) {bad} run a config other than "
            "process 0's (compare their command lines and config files; only "
            "config.dist.process_id may differ)"
        )


def process_slice(global_batch: int, mesh: Mesh) -> slice:
    """The rows of each global batch this process feeds: the grain shard of this process, which
    must be the block of rows its devices own in the mesh (ValueError otherwise)."""
    count, index = jax.process_count(), jax.process_index()
    b = global_batch // count
    want = slice(index * b, (index + 1) * b)
    have = parallel.process_rows(global_batch, mesh)
    if (have.start, have.stop) != (want.start, want.stop):
        raise ValueError(
            f"process {index}'s devices own rows [{have.start}, {have.stop}) of the batch but "
            f"its data shard is [{want.start}, {want.stop}); build the mesh with make_mesh over "
            "jax.devices() so each process's devices are adjacent along the batch axes"
        )
    return want


def to_global(batch: Mapping, mesh: Mesh, global_batch: int) -> dict:
    """This process's rows of a batch (numpy) -> global arrays split over the batch axes."""
    sharding = NamedSharding(mesh, parallel.spec("tokens"))
    return {
        k: jax.make_array_from_process_local_data(
            sharding, np.asarray(v), (global_batch, *np.shape(v)[1:])
        )
        for k, v in batch.items()
    }


def stop_flags(requested: bool, mesh: Mesh) -> jax.Array:
    """A [devices] int32 global array holding each process's stop request on its devices; the
    train step reduces it with max, so every process learns that one of them was signalled
    from the same step's metrics (no extra synchronization)."""
    sharding = NamedSharding(mesh, parallel.spec("tokens"))
    local = np.full((jax.local_device_count(),), int(requested), np.int32)
    return jax.make_array_from_process_local_data(sharding, local, (jax.device_count(),))
