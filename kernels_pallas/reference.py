"""Plain jnp references for gmm and tgmm: a loop over groups with row masks.

Same contract as the kernels (see ops.py): lhs rows sorted by group, local groups
[group_offset, group_offset + G) of group_sizes, rows outside the local groups give zeros.
Accumulates in f32 at HIGHEST precision; slow and memory-hungry, for tests only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels_pallas.schedule import group_bounds


def _row_masks(group_sizes, group_offset, num_groups, num_rows):
    offset = jnp.asarray(0 if group_offset is None else group_offset, jnp.int32)
    bounds = group_bounds(jnp.asarray(group_sizes), offset, num_groups, num_rows)  # [G + 1]
    rows = jnp.arange(num_rows)  # [R]
    return (rows[None, :] >= bounds[:-1, None]) & (rows[None, :] < bounds[1:, None])  # [G, R]


def gmm_reference(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    *,
    group_offset=None,
    transpose_rhs: bool = False,
    preferred_element_type=None,
) -> jax.Array:
    """out[r] = lhs[r] @ rhs[g(r)] (rhs[g].T if transpose_rhs); 0 for rows of no local group.

    Args:
        lhs: rows [R, D] sorted by group.
        rhs: weights [G, D, F] ([G, F, D] with transpose_rhs), the local groups.
        group_sizes: rows per group, all groups.
        group_offset: first global group of rhs; None: 0.
        transpose_rhs: contract with rhs [G, F, D].
        preferred_element_type: output dtype (default lhs.dtype).
    """
    out_dtype = preferred_element_type or lhs.dtype
    masks = _row_masks(group_sizes, group_offset, rhs.shape[0], lhs.shape[0])  # [G, R]
    x = lhs.astype(jnp.float32)  # [R, D]
    out = jnp.zeros((lhs.shape[0], rhs.shape[1] if transpose_rhs else rhs.shape[2]), jnp.float32)
    for g in range(rhs.shape[0]):
        w = rhs[g].astype(jnp.float32)  # [D, F] or [F, D]
        y = jnp.dot(x, w.T if transpose_rhs else w, precision=jax.lax.Precision.HIGHEST)  # [R, F]
        out = jnp.where(masks[g][:, None], y, out)
    return out.astype(out_dtype)


def tgmm_reference(
    lhs: jax.Array,
    grad: jax.Array,
    group_sizes: jax.Array,
    *,
    group_offset=None,
    num_groups: int | None = None,
    preferred_element_type=None,
) -> jax.Array:
    """out[g] = lhs[rows of g].T @ grad[rows of g] -> [G, D, F]; empty groups give zeros.

    Args:
        lhs: rows [R, D] sorted by group.
        grad: rows [R, F].
        group_sizes: rows per group, all groups.
        group_offset: first global group of the window; None: 0.
        num_groups: G_local, the groups to produce (default len(group_sizes)).
        preferred_element_type: output dtype (default lhs.dtype).
    """
    num_groups = len(group_sizes) if num_groups is None else num_groups
    out_dtype = preferred_element_type or lhs.dtype
    masks = _row_masks(group_sizes, group_offset, num_groups, lhs.shape[0])  # [G, R]
    x = lhs.astype(jnp.float32)  # [R, D]
    y = grad.astype(jnp.float32)  # [R, F]
    outs = []
    for g in range(num_groups):
        xg = jnp.where(masks[g][:, None], x, 0.0)  # [R, D]
        yg = jnp.where(masks[g][:, None], y, 0.0)  # [R, F]
        outs.append(jnp.dot(xg.T, yg, precision=jax.lax.Precision.HIGHEST))  # [D, F]
    return jnp.stack(outs).astype(out_dtype)  # [G, D, F]
