"""Grouped matmul kernels for GPU (Triton through Pallas): gmm and tgmm.

gmm: one program per (visit, column tile). The visit tables of schedule.py ("gmm" order) map a
program id to its (group, row tile); programs past the real visit count return at once.
1. An active visit loops over the contraction in tk steps, loading only its group's rows
   (masked loads, other=0) and the group's rhs block, accumulating in f32 registers.
2. It stores its own rows, plus zeros on the rows of the tile that belong to no local group.
   Visits that share a tile write disjoint rows (the zero rows are written with the same value
   by each), so programs never race on a value and no atomics are needed.
3. A zero visit (a row tile with no local row) only stores zeros: rows past sum(group_sizes)
   read exactly 0 without any multiply.
tgmm: one program per (group, D tile, F tile) walks its group's rows in tm steps (a loop with a
traced trip count), so work follows the group's size; an empty group stores a zero block.
Loads and stores are masked at the array edges: no padding copies.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from kernels_pallas.blocks import BlockSizes, fit_tile
from kernels_pallas.schedule import group_bounds, make_schedule, num_visits_bound


def _gmm_kernel(
    bounds_ref,
    group_ref,
    tile_ref,
    active_ref,
    num_ref,
    lhs_ref,
    rhs_ref,
    out_ref,
    *,
    tm: int,
    tk: int,
    tn: int,
    num_groups: int,
    transpose_rhs: bool,
):
    num_rows, k_dim = lhs_ref.shape
    n_dim = out_ref.shape[1]
    v, n = pl.program_id(0), pl.program_id(1)

    @pl.when(v < num_ref[0])
    def _visit():
        g = jnp.maximum(group_ref[v], 0)
        active = active_ref[v] == 1
        start, end = bounds_ref[g], bounds_ref[g + 1]
        lo, hi = bounds_ref[0], bounds_ref[num_groups]
        r0, n0 = tile_ref[v] * tm, n * tn
        rows = r0 + jnp.arange(tm)  # [tm]
        cols = n0 + jnp.arange(tn)  # [tn]
        mine = (rows >= start) & (rows < end) & active  # [tm]

        def body(i, acc):
            k0 = i * tk
            ks = k0 + jnp.arange(tk)  # [tk]
            x = plt.load(
                lhs_ref.at[pl.ds(r0, tm), pl.ds(k0, tk)],
                mask=mine[:, None] & (ks[None, :] < k_dim),
                other=0.0,
            )  # [tm, tk]
            if transpose_rhs:
                w = plt.load(
                    rhs_ref.at[g, pl.ds(n0, tn), pl.ds(k0, tk)],
                    mask=(cols[:, None] < n_dim) & (ks[None, :] < k_dim),
                    other=0.0,
                )  # [tn, tk]
                return acc + jax.lax.dot_general(
                    x, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
                )
            w = plt.load(
                rhs_ref.at[g, pl.ds(k0, tk), pl.ds(n0, tn)],
                mask=(ks[:, None] < k_dim) & (cols[None, :] < n_dim),
                other=0.0,
            )  # [tk, tn]
            return acc + jnp.dot(x, w, preferred_element_type=jnp.float32)

        # Inactive visits run the loop zero times. Both bounds are int32 values: Triton's
        # scf.for needs lower bound, upper bound and step of one type (a jnp.where of Python
        # ints lowers to a different one and fails the verifier).
        trips = active.astype(jnp.int32) * pl.cdiv(k_dim, tk)
        acc = jax.lax.fori_loop(
            jnp.int32(0), trips, body, jnp.zeros((tm, tn), jnp.float32)
        )  # [tm, tn]
        outside = (rows < lo) | (rows >= hi)  # [tm]
        write = (mine | outside) & (rows < num_rows)  # [tm]
        plt.store(
            out_ref.at[pl.ds(r0, tm), pl.ds(n0, tn)],
            jnp.where(mine[:, None], acc, 0.0).astype(out_ref.dtype),
            mask=write[:, None] & (cols[None, :] < n_dim),
        )


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
    tm = fit_tile(block_sizes.tm, num_rows, "triton")
    tk = fit_tile(block_sizes.tk, k_dim, "triton")
    tn = fit_tile(block_sizes.tn, n_dim, "triton")
    sched = make_schedule(
        group_sizes, group_offset, num_groups=num_groups, num_rows=num_rows, tm=tm, order="gmm"
    )
    num_v = num_visits_bound(num_rows, tm, num_groups)
    kernel = functools.partial(
        _gmm_kernel, tm=tm, tk=tk, tn=tn, num_groups=num_groups, transpose_rhs=transpose_rhs
    )
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((num_rows, n_dim), out_dtype),
        grid=(num_v, pl.cdiv(n_dim, tn)),
        compiler_params=plt.CompilerParams(
            num_warps=block_sizes.num_warps, num_stages=block_sizes.num_stages
        ),
        interpret=interpret,
        name="gmm_triton",
    )(sched.bounds, sched.group, sched.tile, sched.active, sched.num, lhs, rhs)  # [R, F]


def _tgmm_kernel(bounds_ref, lhs_ref, grad_ref, out_ref, *, tm: int, tk: int, tn: int):
    num_rows, d_dim = lhs_ref.shape
    f_dim = grad_ref.shape[1]
    g, d, f = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    start, end = bounds_ref[g], bounds_ref[g + 1]
    d0, f0 = d * tk, f * tn
    ds_ = d0 + jnp.arange(tk)  # [tk]
    fs = f0 + jnp.arange(tn)  # [tn]

    def body(i, acc):
        r0 = start + i * tm
        rows = r0 + jnp.arange(tm)  # [tm]
        in_group = rows < end  # [tm]
        x = plt.load(
            lhs_ref.at[pl.ds(r0, tm), pl.ds(d0, tk)],
            mask=in_group[:, None] & (ds_[None, :] < d_dim),
            other=0.0,
        )  # [tm, tk]
        y = plt.load(
            grad_ref.at[pl.ds(r0, tm), pl.ds(f0, tn)],
            mask=in_group[:, None] & (fs[None, :] < f_dim),
            other=0.0,
        )  # [tm, tn]
        return acc + jax.lax.dot_general(
            x, y, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32
        )  # [tk, tn]

    trips = pl.cdiv(end - start, tm).astype(jnp.int32)  # 0 for an empty group: stores zeros
    acc = jax.lax.fori_loop(jnp.int32(0), trips, body, jnp.zeros((tk, tn), jnp.float32))
    plt.store(
        out_ref.at[g, pl.ds(d0, tk), pl.ds(f0, tn)],
        acc.astype(out_ref.dtype),
        mask=(ds_[:, None] < d_dim) & (fs[None, :] < f_dim),
    )


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
    tm = fit_tile(block_sizes.tm, num_rows, "triton")
    tk = fit_tile(block_sizes.tk, d_dim, "triton")
    tn = fit_tile(block_sizes.tn, f_dim, "triton")
    bounds = group_bounds(group_sizes, group_offset, num_groups, num_rows)  # [G + 1]
    return pl.pallas_call(
        functools.partial(_tgmm_kernel, tm=tm, tk=tk, tn=tn),
        out_shape=jax.ShapeDtypeStruct((num_groups, d_dim, f_dim), out_dtype),
        grid=(num_groups, pl.cdiv(d_dim, tk), pl.cdiv(f_dim, tn)),
        compiler_params=plt.CompilerParams(
            num_warps=block_sizes.num_warps, num_stages=block_sizes.num_stages
        ),
        interpret=interpret,
        name="tgmm_triton",
    )(bounds, lhs, grad)  # [G, D, F]
