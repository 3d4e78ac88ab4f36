"""Dropless grouped matmul in plain XLA whose cost follows the number of real rows.

`gmm(lhs, rhs, group_sizes)` computes, for rows sorted by group (group g occupies rows
[start_g, start_g + group_sizes[g])), out[r] = lhs[r] @ rhs[g(r)], and exactly 0 for rows
past sum(group_sizes). It is the fast path for CPU and for GPUs without the Pallas kernel,
where jax.lax.ragged_dot computes every group on every row.

Design (a row-tile schedule in the spirit of megablox, run as an XLA while loop):
1. Rows are cut into tiles of `tm`. A group covers the tiles from start_g // tm to
   (end_g - 1) // tm; a tile straddling two groups is visited once per group. The visit
   list (tile id, group id) has a static bound cdiv(R, tm) + G - 1, but only the first
   `num_visits` entries, about num_real / tm + (non-empty groups), are real.
2. A while loop with that dynamic trip count does, per visit: slice the [tm, Din] row tile,
   index rhs[g] in place, one [tm, Din] x [Din, Dout] dot, and a row-masked write into the
   output. Nothing of size [G, R, .] is ever built and rhs is never gathered per row, so
   both FLOPs and memory traffic are proportional to the active tiles.
3. The last tile is clamped to start at R - tm when tm does not divide R. A row counts
   only in the visit whose nominal tile is row // tm, so clamped overlaps are never
   counted twice (this matters for the accumulating weight gradient).
4. custom_vjp: d_lhs = the same loop on (grad, rhs transposed in the dot, not in memory);
   d_rhs = "tgmm", the same visits accumulating lhs_tile^T @ grad_tile into rhs[g]. Both
   operands are masked with a select, so rows outside the group (including garbage or
   non-finite rows past num_real) contribute exactly nothing. Empty groups get zero
   weight gradient.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp


def default_tile_rows(num_rows: int, num_groups: int, din: int, dout: int) -> int:
    """Row tile chosen at trace time from static shapes.

    Cost ~ (num_real / tm + G) visits x (fixed per-visit overhead + tm row dots): small
    tiles pay the loop overhead, big tiles waste up to tm - 1 masked rows per group. The
    optimum is tm ~ sqrt(c * R / G), c = the overhead in rows of dot work (larger when a row
    is cheap, i.e. small Din * Dout); c was fitted on CPU: tm = 128 for R=16k, G=8, 512x1024
    and tm = 64 for R=16k, G=64, 512x128. Rounded to a power of two in [8, 512].
    """
    c = 8.0 if din * dout >= 2**18 else 16.0
    tm = 2 ** round(math.log2(math.sqrt(c * num_rows / max(num_groups, 1))))
    return int(min(max(tm, 8), 512))


def _schedule(group_sizes: jax.Array, num_rows: int, tm: int):
    """Visit list of (tile, group) pairs covering all real rows, and its length.

    Returns tile_ids [V], group_ids [V], group_starts [G], group_ends [G], num_visits,
    with V = cdiv(R, tm) + G - 1 static; entries at or past num_visits are padding.
    """
    num_groups = group_sizes.shape[0]
    group_sizes = group_sizes.astype(jnp.int32)
    group_ends = jnp.cumsum(group_sizes)  # [G]
    group_starts = group_ends - group_sizes  # [G]
    first_tile = group_starts // tm  # [G]
    last_tile = (group_ends - 1) // tm  # [G]
    tiles_per_group = jnp.where(group_sizes > 0, last_tile - first_tile + 1, 0)  # [G]
    visit_ends = jnp.cumsum(tiles_per_group)  # [G]
    num_visits = visit_ends[-1]
    bound = -(-num_rows // tm) + num_groups - 1
    visit = jnp.arange(bound, dtype=jnp.int32)  # [V]
    # Group of visit v: the first group whose visit range ends after v (empty groups have
    # an empty range and are skipped).
    group_ids = jnp.searchsorted(visit_ends, visit, side="right").astype(jnp.int32)  # [V]
    group_ids = jnp.minimum(group_ids, num_groups - 1)
    visit_starts = visit_ends - tiles_per_group  # [G]
    tile_ids = first_tile[group_ids] + visit - visit_starts[group_ids]  # [V]
    return tile_ids, group_ids, group_starts, group_ends, num_visits


def _tile_rows(tile: jax.Array, group: jax.Array, starts, ends, num_rows: int, tm: int):
    """Clamped start row of a tile and the [tm, 1] mask of its rows that belong to group."""
    nominal = tile * tm
    row0 = jnp.minimum(nominal, num_rows - tm)
    rows = row0 + jnp.arange(tm, dtype=jnp.int32)  # [tm]
    mask = (rows >= jnp.maximum(starts[group], nominal)) & (rows < ends[group])
    return row0, mask[:, None]


def _gmm_loop(lhs, rhs, group_sizes, tm: int, transpose_rhs: bool):
    """out[r] = lhs[r] @ rhs[g(r)] (or @ rhs[g(r)].T), zero past the real rows."""
    num_rows = lhs.shape[0]
    dout = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    out_dtype = jnp.result_type(lhs.dtype, rhs.dtype)
    tile_ids, group_ids, starts, ends, num_visits = _schedule(group_sizes, num_rows, tm)
    contract = ((1,), (1,)) if transpose_rhs else ((1,), (0,))

    def body(v, out):
        g = group_ids[v]
        row0, mask = _tile_rows(tile_ids[v], g, starts, ends, num_rows, tm)
        x = jax.lax.dynamic_slice_in_dim(lhs, row0, tm, axis=0)  # [tm, Din]
        w = jax.lax.dynamic_index_in_dim(rhs, g, axis=0, keepdims=False)  # [Din, Dout]
        y = jax.lax.dot_general(
            x, w, (contract, ((), ())), preferred_element_type=jnp.float32
        ).astype(out_dtype)  # [tm, Dout]
        old = jax.lax.dynamic_slice_in_dim(out, row0, tm, axis=0)  # [tm, Dout]
        return jax.lax.dynamic_update_slice_in_dim(out, jnp.where(mask, y, old), row0, axis=0)

    out = jnp.zeros((num_rows, dout), out_dtype)  # [R, Dout]
    return jax.lax.fori_loop(0, num_visits, body, out)


def _tgmm_loop(lhs, grad, group_sizes, num_groups: int, tm: int, out_dtype):
    """d_rhs[g] = sum over rows r of group g of outer(lhs[r], grad[r]) -> [G, Din, Dout]."""
    num_rows, din = lhs.shape
    dout = grad.shape[1]
    tile_ids, group_ids, starts, ends, num_visits = _schedule(group_sizes, num_rows, tm)

    def body(v, acc):
        g = group_ids[v]
        row0, mask = _tile_rows(tile_ids[v], g, starts, ends, num_rows, tm)
        x = jax.lax.dynamic_slice_in_dim(lhs, row0, tm, axis=0)  # [tm, Din]
        dy = jax.lax.dynamic_slice_in_dim(grad, row0, tm, axis=0)  # [tm, Dout]
        x = jnp.where(mask, x, jnp.zeros_like(x))
        dy = jnp.where(mask, dy, jnp.zeros_like(dy))
        dw = jax.lax.dot_general(
            x, dy, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32
        )  # [Din, Dout]
        cur = jax.lax.dynamic_index_in_dim(acc, g, axis=0, keepdims=True)  # [1, Din, Dout]
        return jax.lax.dynamic_update_index_in_dim(acc, cur + dw[None], g, axis=0)

    acc = jnp.zeros((num_groups, din, dout), jnp.float32)  # [G, Din, Dout]
    return jax.lax.fori_loop(0, num_visits, body, acc).astype(out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _gmm(lhs, rhs, group_sizes, tm):
    return _gmm_loop(lhs, rhs, group_sizes, tm, transpose_rhs=False)


def _gmm_fwd(lhs, rhs, group_sizes, tm):
    return _gmm(lhs, rhs, group_sizes, tm), (lhs, rhs, group_sizes)


def _gmm_bwd(tm, res, grad):
    lhs, rhs, group_sizes = res
    d_lhs = _gmm_loop(grad, rhs, group_sizes, tm, transpose_rhs=True).astype(lhs.dtype)
    d_rhs = _tgmm_loop(lhs, grad, group_sizes, rhs.shape[0], tm, rhs.dtype)
    return d_lhs, d_rhs, None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


def gmm(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    *,
    tile_rows: int | None = None,
) -> jax.Array:
    """Grouped matmul: lhs [R, Din] sorted by group, rhs [G, Din, Dout], group_sizes [G].

    Returns [R, Dout]; rows past sum(group_sizes) are exactly 0. Differentiable in lhs and
    rhs with a backward pass that also costs O(sum(group_sizes)). Requires sum <= R.
    tile_rows: rows per tile; None picks one from the shapes (default_tile_rows).
    """
    if lhs.ndim != 2 or rhs.ndim != 3:
        raise ValueError(
            f"lhs must be [R, Din] and rhs [G, Din, Dout]; got {lhs.shape}, {rhs.shape}"
        )
    if lhs.shape[1] != rhs.shape[1]:
        raise ValueError(f"lhs Din={lhs.shape[1]} does not match rhs Din={rhs.shape[1]}")
    if group_sizes.shape != (rhs.shape[0],):
        raise ValueError(f"group_sizes must have shape ({rhs.shape[0]},); got {group_sizes.shape}")
    if not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise ValueError(f"group_sizes must be integer; got {group_sizes.dtype}")
    if tile_rows is None:
        tile_rows = default_tile_rows(lhs.shape[0], rhs.shape[0], rhs.shape[1], rhs.shape[2])
    if tile_rows < 1:
        raise ValueError(f"tile_rows must be >= 1; got {tile_rows}")
    num_rows = lhs.shape[0]
    if num_rows == 0:
        return jnp.zeros((0, rhs.shape[2]), jnp.result_type(lhs.dtype, rhs.dtype))
    tm = min(tile_rows, num_rows)
    return _gmm(lhs, rhs, group_sizes.astype(jnp.int32), tm)
