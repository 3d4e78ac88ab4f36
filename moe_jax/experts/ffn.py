"""The one expert entry point: routed_ffn, used by the single-device and the expert-parallel
forward alike, over whichever backend MoEConfig.backend names.

    y[t] = sum over real sorted rows r with token_idx[r] == t of row_weights[r] * FFN_g(r)(x[token_idx[r]])

Rows are sorted by expert (expert g owns rows [start_g, start_g + group_sizes[g])); rows past
sum(group_sizes) are ignored, whatever their token index, weight or contents. A fused backend
("tiled") does all of it in one tiled loop; a grouped-matmul backend runs gather -> grouped FFN
-> weighted combine with the rows past the sum masked on both sides.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from moe_jax.core.dispatch import group_ids
from moe_jax.experts import auto
from moe_jax.experts.registry import Backend, GroupedMatmul, get_backend, switch_backend


class ExpertParams(NamedTuple):
    """Expert weights in the compute dtype: w_in, w_gate [N, D, F] (w_gate only for swiglu),
    w_out [N, F, D]; optional biases b_in [N, F], b_out [N, D]."""

    w_in: jax.Array
    w_gate: jax.Array | None
    w_out: jax.Array
    b_in: jax.Array | None = None
    b_out: jax.Array | None = None


def routed_ffn(
    x: jax.Array,
    token_idx: jax.Array,
    row_weights: jax.Array,
    group_sizes: jax.Array,
    params: ExpertParams,
    *,
    activation: str = "swiglu",
    backend: str = "auto",
    device=None,
) -> jax.Array:
    """x [T, D]; token_idx [R] int; row_weights [R]; group_sizes [N] (sum <= R) -> y [T, D].

    device: what "auto" resolves for, a device of the program's target (the expert-parallel
    mesh's). Without one, "auto" is chosen when the program is lowered, for the devices it is
    lowered for (auto.py). Differentiable in x, row_weights and the parameters (routing
    weights get their gradient through row_weights)."""
    args = (x, token_idx, row_weights, group_sizes, params)
    if backend == "auto" and device is None:
        branch = lambda name: functools.partial(  # noqa: E731
            _routed, switch_backend(name), activation=activation
        )
        return auto.by_target(branch, *args)
    return _routed(get_backend(backend, device), *args, activation=activation)


def _routed(impl: Backend, x, token_idx, row_weights, group_sizes, params, *, activation):
    """routed_ffn over one backend."""
    if impl.fused:
        return impl.fn(x, token_idx, row_weights, group_sizes, *params, activation=activation)
    num_rows = token_idx.shape[0]
    row_valid = jnp.arange(num_rows) < jnp.sum(group_sizes)  # [R]
    with jax.named_scope("gather"):
        xs = jnp.take(x, token_idx, axis=0, mode="clip")  # [R, D]
        xs = jnp.where(row_valid[:, None], xs, jnp.zeros((), x.dtype))
    with jax.named_scope("grouped_ffn"):
        ys = grouped_ffn(xs, group_sizes, params, impl.fn, activation=activation)  # [R, D]
    with jax.named_scope("combine"):
        w = jnp.where(row_valid, row_weights.astype(jnp.float32), 0.0)  # [R]
        contrib = jnp.where(row_valid[:, None], ys.astype(jnp.float32) * w[:, None], 0.0)
        y = jnp.zeros(x.shape, jnp.float32).at[token_idx].add(contrib, mode="drop")  # [T, D]
    return y.astype(x.dtype)


def grouped_ffn(
    xs: jax.Array,
    group_sizes: jax.Array,
    params: ExpertParams,
    gmm: GroupedMatmul,
    *,
    activation: str = "swiglu",
) -> jax.Array:
    """Per-expert FFN on rows sorted by expert through a grouped matmul: xs [R, D] -> [R, D].

    swiglu: (silu(xs W_gate) * (xs W_in + b_in)) W_out + b_out; gelu: gelu(xs W_in + b_in)
    W_out + b_out."""
    w_in, w_gate, w_out, b_in, b_out = params
    gid = None
    if b_in is not None or b_out is not None:
        gid = jnp.minimum(group_ids(group_sizes, xs.shape[0]), w_in.shape[0] - 1)  # [R]
    f = w_in.shape[-1]
    if activation == "swiglu":
        # One grouped matmul for both input projections: half the passes over the row tiles.
        hg = gmm(xs, jnp.concatenate([w_in, w_gate], axis=-1), group_sizes)  # [R, 2F]
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
