"""Parallelism: meshes and partition specs by name (mesh), the expert-parallel forward as a
pure function of arrays inside one shard_map (ep), and multi-host helpers (distributed)."""

from moe_jax.parallel import distributed, ep, mesh
from moe_jax.parallel.distributed import global_batch, init_distributed, process_rows
from moe_jax.parallel.ep import ep_forward
from moe_jax.parallel.mesh import (
    AXES,
    BATCH_AXES,
    EXCHANGES,
    PARAM_AXES,
    RULES,
    SPECS,
    ExpertParallel,
    MeshConfig,
    buffer_rows,
    bytes_per_device,
    expected_rows_per_token,
    lb_axis_names,
    make_mesh,
    param_spec,
    shard_batch,
    shard_state,
    spec,
    state_shardings,
)

__all__ = [
    "AXES",
    "BATCH_AXES",
    "EXCHANGES",
    "PARAM_AXES",
    "RULES",
    "SPECS",
    "ExpertParallel",
    "MeshConfig",
    "buffer_rows",
    "bytes_per_device",
    "distributed",
    "ep",
    "ep_forward",
    "expected_rows_per_token",
    "global_batch",
    "init_distributed",
    "lb_axis_names",
    "make_mesh",
    "mesh",
    "param_spec",
    "process_rows",
    "shard_batch",
    "shard_state",
    "spec",
    "state_shardings",
]
