"""Group metadata and the tile schedule shared by the TPU and Triton kernels.

Rows of lhs are sorted by group. With row tiles of tm rows, a "visit" is one (group, row tile)
pair. A tile that straddles a group boundary is visited once per group it holds, and each visit
touches only its own group's rows, so the number of visits is at most cdiv(R, tm) + G - 1.

Groups are a window of G local groups out of the global group_sizes: local group g is global
group group_offset + g. Global groups outside [0, len(group_sizes)) count as empty, so any
window is well defined. Rows that belong to no local group (other groups, rows past
sum(group_sizes), padding) are "outside" the window.

Two orders, both keeping revisits of an output block consecutive (a Mosaic requirement):
- "gmm" (output is row tiles): visits sorted by tile. Every tile is visited at least once;
  a tile with no local row gets one "zero visit" that only stores zeros. Empty groups get none.
- "tgmm" (output is one block per group): visits sorted by group. Every local group is visited
  at least once; an empty group gets one visit that stores a zero block. Tiles with no local
  row get none.
Visits past the real count (the grid is sized by the static bound) repeat the last entry and
the kernels skip them, so they fetch no new blocks and write nothing.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Schedule(NamedTuple):
    bounds: jax.Array  # [G + 1] int32: local group g holds rows [bounds[g], bounds[g + 1])
    group: jax.Array  # [V] int32: local group of the visit; -1 for a gmm zero visit
    tile: jax.Array  # [V] int32: row tile of the visit (the output tile for gmm)
    active: jax.Array  # [V] int32: 1 when the visit multiplies (its group holds rows there)
    load_group: jax.Array  # [V] int32: group block to fetch; inactive visits repeat the last
    load_tile: jax.Array  # [V] int32: row tile to fetch; inactive visits repeat the last
    num: jax.Array  # [1] int32: number of real visits (<= V)


def num_visits_bound(num_rows: int, tm: int, num_groups: int) -> int:
    """Static grid length: cdiv(R, tm) + G - 1 (at least 1)."""
    return max(-(-num_rows // tm) + num_groups - 1, 1)


def group_bounds(
    group_sizes: jax.Array, group_offset: jax.Array, num_groups: int, num_rows: int
) -> jax.Array:
    """Row bounds [G + 1] of the local groups; sizes < 0 count as 0, rows stop at num_rows."""
    sizes = jnp.maximum(group_sizes.astype(jnp.int32), 0)  # [G_all]
    ends = jnp.minimum(jnp.cumsum(sizes), num_rows)  # [G_all]
    offsets = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends.astype(jnp.int32)])
    idx = group_offset + jnp.arange(num_groups + 1, dtype=jnp.int32)  # [G + 1]
    return offsets[jnp.clip(idx, 0, group_sizes.shape[0])]


def make_schedule(
    group_sizes: jax.Array,
    group_offset: jax.Array,
    *,
    num_groups: int,
    num_rows: int,
    tm: int,
    order: str,
) -> Schedule:
    """Build the visit tables for `order` in {"gmm", "tgmm"} (see the module docstring)."""
    if order not in ("gmm", "tgmm"):
        raise ValueError(f"order must be 'gmm' or 'tgmm', got {order!r}")
    n_tiles = max(-(-num_rows // tm), 1)
    num_v = num_visits_bound(num_rows, tm, num_groups)
    bounds = group_bounds(group_sizes, group_offset, num_groups, num_rows)  # [G + 1]
    start, end = bounds[:-1], bounds[1:]  # [G]
    nonempty = end > start  # [G]
    first_tile = start // tm  # [G]
    last_tile = (end - 1) // tm  # [G]
    arange_g = jnp.arange(num_groups, dtype=jnp.int32)

    # 1. Segments: runs of consecutive visits, each with a visit count, the tile of its first
    #    visit and the group it serves.
    if order == "gmm":
        lo, hi = bounds[0], bounds[-1]
        has_rows = hi > lo
        before = jnp.where(has_rows, lo // tm, n_tiles)  # zero visits ahead of the window
        after = jnp.where(has_rows, n_tiles - 1 - (hi - 1) // tm, 0)  # ... and behind it
        counts = jnp.concatenate(
            [before[None], jnp.where(nonempty, last_tile - first_tile + 1, 0), after[None]]
        )  # [G + 2]
        seg_tile = jnp.concatenate(
            [jnp.zeros((1,), jnp.int32), first_tile, (n_tiles - after)[None]]
        )
        seg_group = jnp.concatenate(
            [jnp.full((1,), -1, jnp.int32), arange_g, jnp.full((1,), -1, jnp.int32)]
        )
        seg_active = jnp.concatenate([jnp.zeros((1,), bool), nonempty, jnp.zeros((1,), bool)])
    else:
        counts = jnp.where(nonempty, last_tile - first_tile + 1, 1)  # [G]
        seg_tile = jnp.where(nonempty, first_tile, jnp.minimum(first_tile, n_tiles - 1))
        seg_group = arange_g
        seg_active = nonempty
    counts = counts.astype(jnp.int32)

    # 2. Visit v lies in the segment whose cumulative end first exceeds v; visits past the
    #    total repeat the last real visit.
    seg_end = jnp.cumsum(counts)  # [S]
    total = seg_end[-1]
    v = jnp.minimum(jnp.arange(num_v, dtype=jnp.int32), total - 1)  # [V]
    seg = jnp.searchsorted(seg_end, v, side="right").astype(jnp.int32)  # [V]
    tile = seg_tile[seg] + v - (seg_end[seg] - counts[seg])  # [V]
    group = seg_group[seg]  # [V]
    active = seg_active[seg]  # [V]

    # 3. Inactive visits fetch whatever the previous active visit fetched (or the first active
    #    one when none precedes), so they cost no input traffic.
    idx = jnp.arange(num_v, dtype=jnp.int32)
    last_active = jax.lax.cummax(jnp.where(active, idx, -1))  # [V]
    first_active = jnp.argmax(active).astype(jnp.int32)
    src = jnp.where(last_active >= 0, last_active, first_active)  # [V]
    return Schedule(
        bounds=bounds.astype(jnp.int32),
        group=group.astype(jnp.int32),
        tile=tile.astype(jnp.int32),
        active=active.astype(jnp.int32),
        load_group=jnp.maximum(group[src], 0).astype(jnp.int32),
        load_tile=tile[src].astype(jnp.int32),
        num=total.reshape(1).astype(jnp.int32),
    )
