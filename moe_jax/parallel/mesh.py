"""Meshes, partition rules by logical axis, placement of parameters and batches, EP buffers.

Mesh axes are fixed: ``data`` (batch only), ``fsdp`` (batch and parameter shards) and
``expert`` (experts; tokens are split over it too). Tokens (the leading batch axis of every
activation) are split over all three. Parameters are placed by one table: each parameter name
has logical axes (PARAM_AXES) and each logical axis maps to at most one mesh axis (RULES), so
non-expert weights shard over "fsdp", expert weights [N, D, F] over "expert" (N) and "fsdp"
(D), and the optimizer state follows the parameters (its leaves carry the parameter names).
A dimension the mesh axis does not divide stays whole. The expert-parallel forward
(moe_jax.parallel.ep) runs inside one ``jax.shard_map`` whose in_specs hold each expert shard's
weights whole over "fsdp": the FSDP gather happens at its boundary (and its transpose, a
reduce-scatter of the gradients, on the way back). A layer opts in with
``MoE(cfg, rngs=..., parallel=ExpertParallel(mesh))`` or ``moe_jax.moe.set_parallel(model, ep)``.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ("data", "fsdp", "expert")
BATCH_AXES = AXES  # tokens (leading batch axis) are split over every mesh axis
EXCHANGES = ("auto", "ragged", "padded")

# Partition specs of activations and of the expert-parallel shard_map, looked up by name.
SPECS: dict[str, P] = {
    "tokens": P(BATCH_AXES),  # [B, ...] or [T, ...]: split over every mesh axis
    "expert_weights": P("expert"),  # [N, ...] inside the EP shard_map: N / expert experts, whole
    "replicated": P(),  # scalars, norms, biases
}
# Logical axes of each parameter, by the parameter's own name (the last key of its path).
# Parameters not listed (norm scales, biases, router selection biases) are replicated.
PARAM_AXES: dict[str, tuple[str, ...]] = {
    "w_in": ("experts", "embed", "expert_mlp"),  # MoE [N, D, F]
    "w_gate": ("experts", "embed", "expert_mlp"),  # MoE [N, D, F]
    "w_out": ("experts", "expert_mlp", "embed"),  # MoE [N, F, D]
    "b_in": ("experts", "expert_mlp"),  # MoE [N, F]
    "b_out": ("experts", "embed"),  # MoE [N, D]
    "kernel": ("fan_in", "fan_out"),  # every nnx.Linear [in, out]: attention, FFN, router, head
    "embedding": ("vocab", "table_embed"),  # nnx.Embed [V, D]
}
# The one table of partition rules: logical axis -> mesh axis (None: not split).
RULES: dict[str, str | None] = {
    "experts": "expert",
    "embed": "fsdp",
    "fan_in": "fsdp",
    "expert_mlp": None,
    "fan_out": None,
    "vocab": "fsdp",  # the embedding table is split by rows (the lookup stays batch-split)
    "table_embed": None,
}


def spec(name: str) -> P:
    """Partition spec by name ("tokens", "expert_weights", "replicated")."""
    if name not in SPECS:
        raise ValueError(f"unknown partition spec {name!r}; known: {sorted(SPECS)}")
    return SPECS[name]


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh shape and expert-parallel exchange settings.

    buffer_factor sizes the fixed per-destination buffer of the padded exchange (and the receive
    window of the ragged one): rows = ceil(factor * E_rows / expert) per (source, destination)
    pair, with E_rows the expected real rows a shard routes (T_local * K * rho for the null
    router, T_local * K for top-k, the capacity bound N * C for capacity routers), capped at the
    worst case. None or "dropless" sizes it for the worst case, so nothing can overflow. Rows
    that do not fit are not sent: they contribute 0 to their token and are counted in
    aux["ep_overflow_fraction"].

    Raises:
        ValueError: a size that is not a positive integer (data may be -1), a buffer_factor
            that is not > 0, None or "dropless", an unknown exchange; the message names the
            field (``MeshConfig.<field>=<value> is invalid: ...``).
    """

    data: int | None = -1  # data-parallel size; -1 / None = devices / (fsdp * expert)
    expert: int = 1  # expert-parallel size; must divide N and the device count
    buffer_factor: float | str | None = 2.0  # EP buffer over expected real rows; None = dropless
    exchange: str = "auto"  # auto (ragged on TPU/GPU, padded on CPU) | ragged | padded
    fsdp: int = 1  # parameter-shard size: non-expert weights split over it, expert weights too

    def __post_init__(self):
        if self.data is not None and (
            not isinstance(self.data, int) or (self.data < 1 and self.data != -1)
        ):
            raise ValueError(f"MeshConfig.data={self.data!r} is invalid: an integer >= 1, or -1")
        for name in ("expert", "fsdp"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"MeshConfig.{name}={v!r} is invalid: an integer >= 1")
        bf = self.buffer_factor
        if bf is not None and bf != "dropless" and (isinstance(bf, str) or not bf > 0):
            raise ValueError(
                f"MeshConfig.buffer_factor={bf!r} is invalid: a number > 0, None or 'dropless'"
            )
        if self.exchange not in EXCHANGES:
            raise ValueError(
                f"MeshConfig.exchange={self.exchange!r} is invalid: one of {EXCHANGES}"
            )

    @property
    def dropless(self) -> bool:
        return self.buffer_factor in (None, "dropless")

    def shape(self, num_devices: int) -> tuple[int, int, int]:
        """(data, fsdp, expert) for `num_devices` devices; raises if they do not match."""
        inner = self.fsdp * self.expert
        if num_devices % inner:
            raise ValueError(
                f"MeshConfig.fsdp x expert = {self.fsdp} x {self.expert} = {inner} does not "
                f"divide the device count {num_devices}; on CPU, get N devices with "
                "XLA_FLAGS=--xla_force_host_platform_device_count=N (set before jax starts)"
            )
        data = num_devices // inner if self.data in (None, -1) else self.data
        if data * inner != num_devices:
            raise ValueError(
                f"mesh data x fsdp x expert = {data} x {self.fsdp} x {self.expert} = "
                f"{data * inner} does not match the device count {num_devices}"
            )
        return data, self.fsdp, self.expert


def make_mesh(
    config: MeshConfig | None = None,
    *,
    devices=None,
    axis_types: tuple[AxisType, ...] = (AxisType.Auto,) * len(AXES),
) -> Mesh:
    """A ("data", "fsdp", "expert") mesh over `devices` (default: all global devices).

    Axis types are always passed explicitly; the default Auto lets jit reshard unplaced inputs.
    With Explicit axes, the layer reshards its inputs itself before the shard_map.

    Args:
        config: the axis sizes (default MeshConfig(): every device on ``data``).
        devices: the devices to lay the mesh over, e.g. compile-only devices of another
            target (kernels_pallas.targets); default jax.devices().
        axis_types: one jax.sharding.AxisType per axis of ("data", "fsdp", "expert").

    Returns:
        A jax.sharding.Mesh of shape (data, fsdp, expert).

    Raises:
        ValueError: fsdp × expert does not divide the device count, data × fsdp × expert
            does not equal it, or axis_types has the wrong length.
    """
    config = config or MeshConfig()
    devices = list(jax.devices() if devices is None else devices)
    shape = config.shape(len(devices))
    if len(axis_types) != len(AXES):
        raise ValueError(f"axis_types needs one entry per mesh axis {AXES}, got {axis_types}")
    if devices == list(jax.devices()):
        return jax.make_mesh(shape, AXES, axis_types=axis_types, devices=devices)
    # A subset, or compile-only devices of another target (moe_jax.train.aot).
    return Mesh(np.asarray(devices).reshape(shape), AXES, axis_types=axis_types)


@dataclasses.dataclass(frozen=True)
class ExpertParallel:
    """What an MoE layer needs to run expert-parallel: the mesh and the exchange settings.

    Hashable (it is static structure of the layer, not a parameter). Pass it as
    ``MoE(cfg, rngs=..., parallel=ExpertParallel(mesh))``.

    Args:
        mesh: a mesh with axes ("data", "fsdp", "expert"), from make_mesh.
        config: the exchange settings (buffer_factor, exchange); its sizes are the mesh's.

    Raises:
        ValueError: the mesh's axes are not ("data", "fsdp", "expert").
    """

    mesh: Mesh
    config: MeshConfig = MeshConfig()

    def __post_init__(self):
        if tuple(self.mesh.axis_names) != AXES:
            raise ValueError(
                f"expert parallelism needs mesh axes {AXES}; got {tuple(self.mesh.axis_names)} "
                "(build it with moe_jax.parallel.make_mesh)"
            )

    @property
    def data_size(self) -> int:
        return self.mesh.shape["data"]

    @property
    def expert_size(self) -> int:
        return self.mesh.shape["expert"]

    @property
    def fsdp_size(self) -> int:
        return self.mesh.shape["fsdp"]

    @property
    def num_shards(self) -> int:
        return self.data_size * self.fsdp_size * self.expert_size

    def check(self, moe_config, num_batch: int) -> None:
        """Clear errors before any compute: N vs expert axis, batch vs the mesh, axes."""
        n, ep = moe_config.num_experts, self.expert_size
        if n % ep:
            raise ValueError(
                f"MoEConfig.num_experts={n} is not divisible by the mesh 'expert' axis ({ep})"
            )
        if num_batch % self.num_shards:
            raise ValueError(
                f"batch size {num_batch} is not divisible by data x fsdp x expert = "
                f"{self.data_size} x {self.fsdp_size} x {ep} = {self.num_shards}"
            )
        lb_axes = lb_axis_names(moe_config)
        unknown = [a for a in lb_axes if a not in AXES]
        if unknown:
            raise ValueError(
                f"MoEConfig.lb_axis_name={moe_config.lb_axis_name!r} names axes {unknown} that "
                f"are not mesh axes {AXES}"
            )

    def exchange_kind(self) -> str:
        if self.config.exchange != "auto":
            return self.config.exchange
        platform = self.mesh.devices.flat[0].platform
        return "ragged" if platform in ("tpu", "gpu", "cuda", "rocm") else "padded"


def lb_axis_names(moe_config) -> tuple[str, ...]:
    """Mesh axes the balance counts are summed over: lb_axis_name if set, else the whole mesh."""
    names = moe_config.lb_axis_name
    if names is None:
        return BATCH_AXES
    return (names,) if isinstance(names, str) else tuple(names)


# ---------------------------------------------------------------------------------------------
# Placing parameters and batches.
# ---------------------------------------------------------------------------------------------
def _param_name(path: tuple) -> str | None:
    keys = [getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path]
    names = [k for k in keys if isinstance(k, str) and k != "value"]
    return names[-1] if names else None


def _is_stacked(path: tuple) -> bool:  # a leaf of model.stack.scanned (layers stacked)
    keys = [getattr(k, "key", getattr(k, "name", k)) for k in path]
    return any(a == "stack" and b == "scanned" for a, b in zip(keys, keys[1:]))


def param_spec(path: tuple, value, mesh: Mesh | None = None) -> P:
    """Spec of one parameter (or optimizer-state leaf) from its path: its name's logical axes
    (PARAM_AXES) through RULES. With `mesh`, a dimension its mesh axis does not divide is not
    split; scalars and unlisted names are replicated.

    Args:
        path: the leaf's pytree path (jax.tree_util key path); its last name is looked up.
        value: the leaf (an array or anything with ``.shape``).
        mesh: the mesh the spec is for; None splits without checking divisibility.

    Returns:
        A PartitionSpec, e.g. P("expert", "fsdp") for expert weights w_in [N, D, F], and
        P(None, "expert", "fsdp") for the same weights of scanned blocks [G, N, D, F].
    """
    shape = tuple(getattr(value, "shape", ()))
    axes = PARAM_AXES.get(_param_name(path))
    out = []
    if axes is not None and _is_stacked(path) and len(shape) == len(axes) + 1:
        shape, out = shape[1:], [None]  # scanned blocks: a leading [G] layer axis, not split
    if not shape or axes is None or len(axes) != len(shape):
        return P()
    for dim, logical in zip(shape, axes):
        axis = RULES[logical]
        if axis is not None and mesh is not None and dim % mesh.shape[axis]:
            axis = None
        out.append(axis)
    while out and out[-1] is None:
        out.pop()
    return P(*out)


def state_shardings(state, mesh: Mesh):
    """NamedSharding for every leaf of an nnx State (or any pytree of arrays).

    Args:
        state: parameters or optimizer state (arrays or ShapeDtypeStructs).
        mesh: the ("data", "fsdp", "expert") mesh.
    """
    return jax.tree_util.tree_map_with_path(
        lambda p, v: NamedSharding(mesh, param_spec(p, v, mesh)), state
    )


def shard_state(state, mesh: Mesh):
    """Place an nnx State (or pytree) on the mesh by the partition rules (one process).

    Args:
        state: parameters or optimizer state, every leaf held by this process.
        mesh: the ("data", "fsdp", "expert") mesh.
    """
    return jax.device_put(state, state_shardings(state, mesh))


def shard_batch(x, mesh: Mesh):
    """Place a global batch (every process holds all of it) split over the batch axes.

    Args:
        x: an array [B, ...]; B divisible by data × fsdp × expert.
        mesh: the ("data", "fsdp", "expert") mesh.
    """
    return jax.device_put(x, NamedSharding(mesh, spec("tokens")))


def bytes_per_device(tree) -> dict:
    """{device: bytes} of every array in `tree` (arrays or ShapeDtypeStructs with shardings),
    counted from each leaf's sharding: the shard shape times the item size.

    Args:
        tree: a pytree; leaves without a ``sharding`` are not counted.
    """
    out: dict = {}
    for x in jax.tree.leaves(tree):
        sharding = getattr(x, "sharding", None)
        if sharding is None:
            continue
        itemsize = np.dtype(x.dtype).itemsize if not _is_key(x) else 8
        nbytes = math.prod(sharding.shard_shape(tuple(x.shape))) * itemsize
        for d in sharding.device_set:
            out[d] = out.get(d, 0) + nbytes
    return out


def _is_key(x) -> bool:
    return jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def expected_rows_per_token(moe_config, num_tokens: int, *, train: bool = True) -> float:
    """E[real rows per token] that sizes the EP buffer (see MeshConfig)."""
    cfg = moe_config
    if cfg.router == "null":
        return cfg.top_k * cfg.density
    cap = cfg.expert_capacity(num_tokens, train=train)
    if cfg.router in ("topk", "switch"):
        k = cfg.top_k
        return k if cap is None else min(k, cfg.num_experts * cap / num_tokens)
    slots = cfg.num_experts  # threshold / expert choice: bounded by capacity only
    return min(slots, cfg.num_experts * cap / num_tokens) if cap else slots


def buffer_rows(moe_config, ep_config: MeshConfig, num_tokens: int, ep: int, *, train: bool):
    """Static rows per (source, destination) pair of the exchange; see MeshConfig."""
    cfg = moe_config
    n_loc = cfg.num_experts // ep
    cap = cfg.expert_capacity(num_tokens, train=train)
    per_token = cfg.top_k if cfg.router in ("null", "topk", "switch") else cfg.num_experts
    worst = num_tokens * min(per_token, n_loc)
    if cap is not None:
        worst = min(worst, n_loc * cap)
    if ep_config.dropless:
        return max(worst, 1)
    expected = num_tokens * expected_rows_per_token(cfg, num_tokens, train=train) / ep
    return max(1, min(worst, math.ceil(ep_config.buffer_factor * expected - 1e-9)))
