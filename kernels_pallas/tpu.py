"""Grouped matmul kernels for TPU (Mosaic): gmm (rows times their group's matrix) and tgmm
(per-group lhs^T @ grad, the weight gradient).

Design (see schedule.py for the visit tables):
1. The group metadata and the visit tables travel in scalar prefetch (SMEM), so every index map
   and the kernel body can read them.
2. The grid is (column tiles, visits, contraction tiles) for gmm and (D tiles, F tiles, visits)
   for tgmm, with the visit axis sized by the static bound cdiv(R, tm) + G - 1. Visits past the
   real count exit at once (pl.when) and their index maps repeat the previous blocks, so they
   trigger no DMA.
3. Products accumulate in an f32 VMEM scratch.
4. gmm stores with a row mask: a visit writes the rows of its own group, zeros the rows that
   belong to no local group and leaves the other rows of the tile (written by the neighbouring
   group's visit, which is consecutive) untouched. Every output row is therefore written
   exactly by the visit that owns it, and rows past sum(group_sizes) read exactly 0.
5. Inactive gmm visits (row tiles holding no local row) skip the matmul and only store zeros;
   empty tgmm groups store a zero block. Compute follows the real rows, not R.
Ragged last blocks (R, F or D not tile multiples) are left to Pallas: the rows and columns
they read past the array only reach output entries that are dropped. The one exception is the
gmm contraction, which is zero-padded (a copy) when no 128-multiple tile divides it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas.blocks import BlockSizes, fit_tile
from kernels_pallas.schedule import make_schedule, num_visits_bound


def _pad_to(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    if x.shape == shape:
        return x
    return jnp.pad(x, [(0, t - s) for s, t in zip(x.shape, shape)])


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _gmm_kernel(
    bounds_ref,
    group_ref,
    tile_ref,
    active_ref,
    load_group_ref,
    load_tile_ref,
    num_ref,
    lhs_ref,
    rhs_ref,
    out_ref,
    acc_ref,
    *,
    tm: int,
    num_groups: int,
    k_tiles: int,
    transpose_rhs: bool,
):
    del load_group_ref, load_tile_ref  # only the index maps read them
    v, k = pl.program_id(1), pl.program_id(2)
    live = v < num_ref[0]
    active = jnp.logical_and(live, active_ref[v] == 1)

    @pl.when(jnp.logical_and(active, k == 0))
    def _zero():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(active)
    def _accumulate():
        dims = (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))
        acc_ref[...] += jax.lax.dot_general(
            lhs_ref[...], rhs_ref[...], dims, preferred_element_type=jnp.float32
        )  # [tm, tn]

    @pl.when(jnp.logical_and(live, k == k_tiles - 1))
    def _store():
        g = jnp.maximum(group_ref[v], 0)
        start, end = bounds_ref[g], bounds_ref[g + 1]
        lo, hi = bounds_ref[0], bounds_ref[num_groups]
        rows = tile_ref[v] * tm + jax.lax.broadcasted_iota(jnp.int32, out_ref.shape, 0)
        mine = jnp.logical_and(active, jnp.logical_and(rows >= start, rows < end))
        outside = jnp.logical_or(rows < lo, rows >= hi)
        kept = jnp.where(outside, jnp.zeros_like(out_ref), out_ref[...])
        out_ref[...] = jnp.where(mine, acc_ref[...].astype(out_ref.dtype), kept)


@functools.partial(
    jax.jit, static_argnames=("transpose_rhs", "out_dtype", "block_sizes", "interpret")
)
def gmm(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    group_offset: jax.Array,
    *,
    transpose_rhs: bool,
    out_dtype,
    block_sizes: BlockSizes,
    interpret: bool,
) -> jax.Array:
    """lhs [R, D] times rhs [G, D, F] (or [G, F, D] with transpose_rhs) per group -> [R, F]."""
    num_rows, k_dim = lhs.shape
    num_groups = rhs.shape[0]
    n_dim = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    tm = fit_tile(block_sizes.tm, num_rows, "tpu", interpret=interpret)
    tk = fit_tile(block_sizes.tk, k_dim, "tpu", interpret=interpret, divisor=True)
    tn = fit_tile(block_sizes.tn, n_dim, "tpu", interpret=interpret)
    # Ragged last row / column blocks are fine (their extra rows and columns are never stored),
    # but the contraction must not read past D: zero-pad it when tk does not divide D.
    k_p = _round_up(k_dim, tk)
    lhs = _pad_to(lhs, (num_rows, k_p))  # [R, Dp]
    rhs = _pad_to(rhs, (num_groups, n_dim, k_p) if transpose_rhs else (num_groups, k_p, n_dim))
    k_tiles = k_p // tk
    sched = make_schedule(
        group_sizes, group_offset, num_groups=num_groups, num_rows=num_rows, tm=tm, order="gmm"
    )
    num_v = num_visits_bound(num_rows, tm, num_groups)

    def k_index(v, k, active_ref, num_ref):
        # Inactive and padding visits keep the last contraction block: no new DMA.
        live = jnp.logical_and(v < num_ref[0], active_ref[v] == 1)
        return jnp.where(live, k, k_tiles - 1)

    def lhs_map(n, v, k, bounds, group, tile, active, lgroup, ltile, num):
        return ltile[v], k_index(v, k, active, num)

    def rhs_map(n, v, k, bounds, group, tile, active, lgroup, ltile, num):
        kk = k_index(v, k, active, num)
        return (lgroup[v], n, kk) if transpose_rhs else (lgroup[v], kk, n)

    def out_map(n, v, k, bounds, group, tile, active, lgroup, ltile, num):
        return tile[v], n

    rhs_block = (None, tn, tk) if transpose_rhs else (None, tk, tn)
    kernel = functools.partial(
        _gmm_kernel, tm=tm, num_groups=num_groups, k_tiles=k_tiles, transpose_rhs=transpose_rhs
    )
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((num_rows, n_dim), out_dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=7,
            grid=(pl.cdiv(n_dim, tn), num_v, k_tiles),
            in_specs=[pl.BlockSpec((tm, tk), lhs_map), pl.BlockSpec(rhs_block, rhs_map)],
            out_specs=pl.BlockSpec((tm, tn), out_map),
            scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32)],
        ),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "arbitrary", "arbitrary")
        ),
        interpret=interpret,
        name="gmm_tpu",
    )(*sched, lhs, rhs)
    return out  # [R, F]


def _tgmm_kernel(
    bounds_ref,
    group_ref,
    tile_ref,
    active_ref,
    load_group_ref,
    load_tile_ref,
    num_ref,
    lhs_ref,
    grad_ref,
    out_ref,
    acc_ref,
    *,
    tm: int,
    num_v: int,
):
    del load_group_ref, load_tile_ref  # only the index maps read them
    v = pl.program_id(2)
    num = num_ref[0]
    live = v < num
    g = group_ref[v]
    first = jnp.logical_or(v == 0, group_ref[jnp.maximum(v - 1, 0)] != g)
    last = jnp.logical_or(v == num - 1, group_ref[jnp.minimum(v + 1, num_v - 1)] != g)

    @pl.when(jnp.logical_and(live, first))
    def _zero():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(jnp.logical_and(live, active_ref[v] == 1))
    def _accumulate():
        # Rows of other groups share the tile: select them away in both operands (a select,
        # not a product, so a non-finite value there cannot leak in).
        start, end = bounds_ref[g], bounds_ref[g + 1]
        base = tile_ref[v] * tm
        rows_x = base + jax.lax.broadcasted_iota(jnp.int32, lhs_ref.shape, 0)
        rows_y = base + jax.lax.broadcasted_iota(jnp.int32, grad_ref.shape, 0)
        x = jnp.where((rows_x >= start) & (rows_x < end), lhs_ref[...], 0)  # [tm, tk]
        y = jnp.where((rows_y >= start) & (rows_y < end), grad_ref[...], 0)  # [tm, tn]
        acc_ref[...] += jnp.dot(x.T, y, preferred_element_type=jnp.float32)  # [tk, tn]

    @pl.when(jnp.logical_and(live, last))
    def _store():
        out_ref[...] = acc_ref[...].astype(out_ref.dtype)


@functools.partial(jax.jit, static_argnames=("num_groups", "out_dtype", "block_sizes", "interpret"))
def tgmm(
    lhs: jax.Array,
    grad: jax.Array,
    group_sizes: jax.Array,
    group_offset: jax.Array,
    *,
    num_groups: int,
    out_dtype,
    block_sizes: BlockSizes,
    interpret: bool,
) -> jax.Array:
    """Per local group g: lhs[rows of g].T @ grad[rows of g] -> [G, D, F]."""
    num_rows, d_dim = lhs.shape
    f_dim = grad.shape[1]
    tm = fit_tile(block_sizes.tm, num_rows, "tpu", interpret=interpret)
    tk = fit_tile(block_sizes.tk, d_dim, "tpu", interpret=interpret)
    tn = fit_tile(block_sizes.tn, f_dim, "tpu", interpret=interpret)
    # No padding: rows are the contraction but every row is selected by its group bounds, and
    # the ragged last D / F blocks hold output entries that are never stored.
    sched = make_schedule(
        group_sizes, group_offset, num_groups=num_groups, num_rows=num_rows, tm=tm, order="tgmm"
    )
    num_v = num_visits_bound(num_rows, tm, num_groups)

    def lhs_map(d, f, v, bounds, group, tile, active, lgroup, ltile, num):
        return ltile[v], d

    def grad_map(d, f, v, bounds, group, tile, active, lgroup, ltile, num):
        return ltile[v], f

    def out_map(d, f, v, bounds, group, tile, active, lgroup, ltile, num):
        return group[v], d, f

    out = pl.pallas_call(
        functools.partial(_tgmm_kernel, tm=tm, num_v=num_v),
        out_shape=jax.ShapeDtypeStruct((num_groups, d_dim, f_dim), out_dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=7,
            grid=(pl.cdiv(d_dim, tk), pl.cdiv(f_dim, tn), num_v),
            in_specs=[pl.BlockSpec((tm, tk), lhs_map), pl.BlockSpec((tm, tn), grad_map)],
            out_specs=pl.BlockSpec((None, tk, tn), out_map),
            scratch_shapes=[pltpu.VMEM((tk, tn), jnp.float32)],
        ),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")
        ),
        interpret=interpret,
        name="tgmm_tpu",
    )(*sched, lhs, grad)
    return out  # [G, D, F]
