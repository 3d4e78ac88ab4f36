"""Expert FFNs over a grouped-matmul backend chosen by name.

A backend is a function ``gmm(lhs [R, Din], rhs [G, Din, Dout], group_sizes [G]) -> [R, Dout]``
for rows sorted by group (group g owns a contiguous run of group_sizes[g] rows, sum <= R). Rows
past sum(group_sizes) must come back as zeros or be ignored: dispatch masks them anyway.
Backends are registered by name; "auto" picks the fastest one registered for the platform.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from moe_jax import dispatch, gmm_xla

GroupedMatmul = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
_BACKENDS: dict[str, GroupedMatmul] = {}
# Names accepted by MoEConfig.backend; optional backends register themselves on import.
KNOWN_BACKENDS = ("auto", "dense", "ragged", "tiled", "pallas")


def register_backend(name: str, fn: GroupedMatmul) -> None:
    _BACKENDS[name] = fn


def backend_names() -> tuple[str, ...]:
    return KNOWN_BACKENDS


def dense_gmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """Reference: every group on every row, then each row keeps its own group's result."""
    gid = dispatch.group_ids(group_sizes, lhs.shape[0])  # [R]
    all_out = jnp.einsum("rd,gdf->rgf", lhs, rhs, preferred_element_type=jnp.float32)  # [R, G, F]
    onehot = jax.nn.one_hot(gid, rhs.shape[0], dtype=jnp.float32)  # [R, G]; row past sum -> 0
    return jnp.einsum("rgf,rg->rf", all_out, onehot).astype(lhs.dtype)


def ragged_gmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """jax.lax.ragged_dot: correct everywhere; computes densely on CPU (cost ~ G)."""
    out = jax.lax.ragged_dot(lhs, rhs, group_sizes, preferred_element_type=jnp.float32)
    return out.astype(lhs.dtype)


register_backend("dense", dense_gmm)
register_backend("ragged", ragged_gmm)
# Tiled XLA loop over active row tiles: cost follows sum(group_sizes) on any platform.
register_backend("tiled", gmm_xla.gmm)


def _load_optional(name: str) -> None:
    """Import the module that registers an optional backend."""
    if name in _BACKENDS:
        return
    if name == "pallas":
        from moe_jax import pallas_backend  # noqa: F401  (registers "pallas")


def resolve_backend(name: str) -> str:
    """Map "auto" to a concrete backend for the default platform."""
    if name != "auto":
        return name
    platform = jax.default_backend()
    # Without the Pallas kernel (CPU, or a GPU/TPU build lacking it) the tiled XLA loop is the
    # fast path; ragged_dot computes densely there.
    candidates = ("pallas", "tiled") if platform in ("tpu", "gpu") else ("tiled",)
    for cand in candidates:
        try:
            _load_optional(cand)
        except ImportError:
            continue
        if cand in _BACKENDS:
            return cand
    return "ragged"


def get_backend(name: str) -> GroupedMatmul:
    name = resolve_backend(name)
    try:
        _load_optional(name)
    except ImportError as e:
        raise ValueError(f"MoEConfig.backend={name!r} is not available here: {e}") from e
    if name not in _BACKENDS:
        raise ValueError(
            f"MoEConfig.backend={name!r} is not registered; available: {sorted(_BACKENDS)}"
        )
    return _BACKENDS[name]


def expert_ffn(
    xs: jax.Array,
    group_sizes: jax.Array,
    w_in: jax.Array,
    w_out: jax.Array,
    *,
    w_gate: jax.Array | None = None,
    b_in: jax.Array | None = None,
    b_out: jax.Array | None = None,
    activation: str = "swiglu",
    backend: str = "auto",
) -> jax.Array:
    """Per-expert FFN on rows sorted by expert. xs [R, D]; w_in/w_gate [N, D, F]; w_out [N, F, D].

    swiglu: (silu(xs W_gate) * xs W_in) W_out; gelu: gelu(xs W_in + b_in) W_out + b_out.
    """
    gmm = get_backend(backend)
    gid = None
    if b_in is not None or b_out is not None:
        gid = jnp.minimum(dispatch.group_ids(group_sizes, xs.shape[0]), w_in.shape[0] - 1)  # [R]
    f = w_in.shape[-1]
    if activation == "swiglu":
        # One grouped matmul for both input projections: half the passes over the row tiles.
        w_cat = jnp.concatenate([w_in, w_gate], axis=-1)  # [N, D, 2F]
        hg = gmm(xs, w_cat, group_sizes)  # [R, 2F]
        h, g = hg[:, :f], hg[:, f:]
        if b_in is not None:
            h = h + b_in[gid].astype(h.dtype)
        h = jax.nn.silu(g) * h
    else:
        h = gmm(xs, w_in, group_sizes)  # [R, F]
        if b_in is not None:
            h = h + b_in[gid].astype(h.dtype)
        h = jax.nn.gelu(h)
    y = gmm(h, w_out, group_sizes)  # [R, D]
    if b_out is not None:
        y = y + b_out[gid].astype(y.dtype)
    return y
