"""Grouped matmul kernels for NVIDIA Hopper GPUs (Mosaic GPU through Pallas): gmm and tgmm.

Mosaic GPU is the Pallas GPU backend that stays (the Triton one is deprecated from jax 0.11.2).
These kernels use TMA copies into shared memory, a software pipeline over the contraction
(plgpu.emit_pipeline) and warpgroup MMA (wgmma) with an f32 accumulator, so they compile for
compute capability 9.x (sm_90a: H100, H200). wgmma does not exist before Hopper and Blackwell
replaces it (tcgen05), so other GPUs use the Triton kernels (dispatch.py).

gmm: one program per (output row tile, column tile), and the program owns its tile.
1. The tile's local groups are a range [lo, hi) of group ids (tables from the group bounds,
   computed in XLA). For each non-empty group in it, the program pipelines the tile's lhs rows
   and the group's rhs block over the contraction and accumulates lhs @ rhs[g] into the one
   accumulator. In a tile the group only partly covers, the rows of other groups are zeroed in
   shared memory first, so each row collects exactly its own group's product.
2. A tile with no local row (rows past sum(group_sizes), other shards' groups) runs no MMA and
   stores zeros: dropped null slots cost no multiply and read exactly 0.
3. The tile goes to global memory with one TMA store. Programs never share an output tile, so
   no masked stores or atomics are needed.
tgmm: one program per (group, D tile, F tile) pipelines the group's row tiles (a grid of
traced length, so work follows the group's size), zeroing the rows of neighbouring groups in
the first and last tile; an empty group runs no MMA and stores a zero block.

Shapes: the wrapper pads rows, D and F up to tile multiples with zeros where they are not
already (a copy, only for such shapes) and slices the result. Operands are bf16 or f16; f32
operands run as three bf16 products (hi*hi + hi*lo + lo*hi with x = hi + lo), about 1e-5
relative error for 3x the MMA work. Interpret mode (CPU tests) runs the same kernels through
Pallas's GPU interpreter.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels_pallas.blocks import MOSAIC_GPU_STEPS
from kernels_pallas.schedule import group_bounds

try:  # jax versions without Mosaic GPU Pallas (or without its GPU interpreter)
    from jax.experimental.pallas import mosaic_gpu as plgpu

    _MISSING = next(
        (
            name
            for name in ("kernel", "emit_pipeline", "wgmma", "InterpretGPUParams", "layout_cast")
            if not hasattr(plgpu, name)
        ),
        None,
    )
except ImportError as e:  # pragma: no cover - depends on the installed jax
    plgpu, _MISSING = None, str(e)

MIN_CC = (9, 0)  # wgmma: Hopper
MAX_CC = (9, 9)  # Blackwell (10.x) has no wgmma


def unavailable_reason() -> str | None:
    """Why the running jax cannot build these kernels, or None when it can."""
    if _MISSING is None:
        return None
    return (
        f"the Mosaic GPU kernels need jax.experimental.pallas.mosaic_gpu with {_MISSING!r} "
        f"(jax 0.11.2 and 0.12 have it; installed: jax {jax.__version__})"
    )


def supports_cc(cc: tuple[int, int]) -> bool:
    """Whether the kernels compile for an NVIDIA GPU of compute capability cc."""
    return MIN_CC <= tuple(cc) <= MAX_CC


def _params(interpret: bool):
    return plgpu.InterpretGPUParams() if interpret else None


def _compiler_params():
    return plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup)


def _pad_to(x: jax.Array, axis: int, multiple: int) -> jax.Array:
    extra = -x.shape[axis] % multiple
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths)


def _zero_other_rows(x_smem, r0, start, end, tm: int, tk: int) -> None:
    """Zero the rows of a [tm, tk] shared-memory tile (rows r0..r0+tm) outside [start, end)."""
    rows = r0 + plgpu.layout_cast(
        lax.broadcasted_iota(jnp.int32, (tm, tk), 0), plgpu.Layout.WGMMA
    )  # [tm, tk]
    keep = ((rows >= start) & (rows < end)).astype(x_smem.dtype)
    x_smem[...] = x_smem[...] * keep
    plgpu.commit_smem()  # the masked tile is what wgmma reads


def _store_tile(acc, out_ref, r0, c0, shape, out_dtype) -> None:
    """Registers -> shared memory -> one TMA store of the [rows, cols] tile at (r0, c0)."""

    @functools.partial(pl.run_scoped, o_smem=plgpu.SMEM(shape, out_dtype))
    def _(o_smem):
        o_smem[...] = acc.astype(out_dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem, out_ref.at[pl.ds(r0, shape[0]), pl.ds(c0, shape[1])])
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def _gmm_body(bounds_ref, lo_ref, hi_ref, lhs_ref, rhs_ref, out_ref, *, tm, tk, tn, transpose):
    ni, mi = lax.axis_index("n"), lax.axis_index("m")
    r0 = mi * tm
    k_steps = lhs_ref.shape[1] // tk

    def acc_scope(acc_ref):
        def group(g, carry):
            start, end = bounds_ref[g], bounds_ref[g + 1]
            partial = (start > r0) | (end < r0 + tm)

            def step(_, x_smem, w_smem):
                pl.when(partial)(lambda: _zero_other_rows(x_smem, r0, start, end, tm, tk))
                plgpu.wgmma(acc_ref, x_smem, w_smem.transpose((1, 0)) if transpose else w_smem)

            w_spec = (
                plgpu.BlockSpec((tn, tk), lambda k: (ni, k), delay_release=1)
                if transpose
                else plgpu.BlockSpec((tk, tn), lambda k: (k, ni), delay_release=1)
            )
            pipeline = plgpu.emit_pipeline(
                step,
                grid=(k_steps,),
                in_specs=[plgpu.BlockSpec((tm, tk), lambda k: (mi, k), delay_release=1), w_spec],
                max_concurrent_steps=MOSAIC_GPU_STEPS,
            )
            pl.when(end > start)(lambda: pipeline(lhs_ref, rhs_ref.at[g]))
            return carry

        lax.fori_loop(lo_ref[mi], hi_ref[mi], group, 0)  # no trip for a tile without rows
        return acc_ref[...]

    acc = pl.run_scoped(acc_scope, plgpu.ACC((tm, tn)))  # [tm, tn] f32, zero-initialised
    _store_tile(acc, out_ref, r0, ni * tn, (tm, tn), out_ref.dtype)


def _tile_groups(bounds: jax.Array, num_tiles: int, tm: int):
    """Per row tile t: the local groups [lo[t], hi[t]) whose rows meet rows [t*tm, (t+1)*tm)."""
    starts, ends = bounds[:-1], bounds[1:]  # [G], non-decreasing and contiguous
    r0 = jnp.arange(num_tiles, dtype=jnp.int32) * tm  # [T]
    lo = jnp.searchsorted(ends, r0, side="right").astype(jnp.int32)  # groups ending before
    hi = jnp.searchsorted(starts, r0 + tm, side="left").astype(jnp.int32)  # groups starting in
    return lo, jnp.maximum(hi, lo)


def _split_f32(x: jax.Array):
    hi = x.astype(jnp.bfloat16)
    return hi, (x - hi.astype(jnp.float32)).astype(jnp.bfloat16)


def _three_bf16(fn, a, b, out_dtype):
    """f32 a @ b as three bf16 products (module docstring)."""
    a_hi, a_lo = _split_f32(a)
    b_hi, b_lo = _split_f32(b)
    f32 = functools.partial(fn, out_dtype=jnp.float32)
    return (f32(a_hi, b_hi) + f32(a_hi, b_lo) + f32(a_lo, b_hi)).astype(out_dtype)


@functools.partial(jax.jit, static_argnames=("transpose", "out_dtype", "block_sizes", "interpret"))
def _gmm_padded(bounds, x, w, *, transpose, out_dtype, block_sizes, interpret):
    """The kernel on inputs padded to tile multiples -> [Rp, Fp]. A jitted function of its own,
    so the three bf16 products of an f32 gmm lower one kernel and call it three times."""
    tm, tk, tn = block_sizes.tm, block_sizes.tk, block_sizes.tn
    x = _pad_to(_pad_to(x, 0, tm), 1, tk)  # [Rp, Dp]
    w = _pad_to(_pad_to(w, 2 if transpose else 1, tk), 1 if transpose else 2, tn)
    rows_p, cols_p = x.shape[0], (w.shape[1] if transpose else w.shape[2])
    lo, hi = _tile_groups(bounds, rows_p // tm, tm)  # [Rp / tm] each
    return plgpu.kernel(
        functools.partial(_gmm_body, tm=tm, tk=tk, tn=tn, transpose=transpose),
        out_type=jax.ShapeDtypeStruct((rows_p, cols_p), out_dtype),
        grid=(cols_p // tn, rows_p // tm),
        grid_names=("n", "m"),
        compiler_params=_compiler_params(),
        interpret=_params(interpret),
    )(bounds, lo, hi, x, w)  # [Rp, Fp]


@functools.partial(
    jax.jit, static_argnames=("transpose_rhs", "out_dtype", "block_sizes", "interpret")
)
def gmm(lhs, rhs, group_sizes, group_offset, *, transpose_rhs, out_dtype, block_sizes, interpret):
    """lhs [R, D] times rhs [G, D, F] (or [G, F, D] with transpose_rhs) per group -> [R, F]."""
    num_rows, k_dim = lhs.shape
    num_groups = rhs.shape[0]
    n_dim = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    bounds = group_bounds(group_sizes, group_offset, num_groups, num_rows)  # [G + 1]
    kw = dict(transpose=transpose_rhs, block_sizes=block_sizes, interpret=interpret)

    def run(x, w, out_dtype):
        return _gmm_padded(bounds, x, w, out_dtype=out_dtype, **kw)[:num_rows, :n_dim]

    if lhs.dtype == jnp.float32:
        return _three_bf16(run, lhs, rhs, out_dtype)
    return run(lhs, rhs, out_dtype)  # [R, F]


def _tgmm_body(bounds_ref, lhs_ref, grad_ref, out_ref, *, tm, tk, tn):
    g, di, fi = lax.axis_index("g"), lax.axis_index("d"), lax.axis_index("f")
    start, end = bounds_ref[g], bounds_ref[g + 1]
    first = start // tm  # the group's first row tile
    num_tiles = jnp.where(end > start, pl.cdiv(end, tm) - first, 0)

    def acc_scope(acc_ref):
        def step(idx, x_smem, y_smem):
            r0 = (first + idx[0]) * tm
            partial = (r0 < start) | (r0 + tm > end)

            @pl.when(partial)
            def _():
                _zero_other_rows(x_smem, r0, start, end, tm, tk)

            plgpu.wgmma(acc_ref, x_smem.transpose((1, 0)), y_smem)  # [tk, tm] @ [tm, tn]

        pipeline = plgpu.emit_pipeline(
            step,
            grid=(num_tiles,),
            in_specs=[
                plgpu.BlockSpec((tm, tk), lambda i: (first + i, di), delay_release=1),
                plgpu.BlockSpec((tm, tn), lambda i: (first + i, fi), delay_release=1),
            ],
            max_concurrent_steps=MOSAIC_GPU_STEPS,
        )
        pl.when(end > start)(lambda: pipeline(lhs_ref, grad_ref))
        return acc_ref[...]

    acc = pl.run_scoped(acc_scope, plgpu.ACC((tk, tn)))  # [tk, tn] f32; zeros when empty
    _store_tile(acc, out_ref.at[g], di * tk, fi * tn, (tk, tn), out_ref.dtype)


@functools.partial(jax.jit, static_argnames=("num_groups", "out_dtype", "block_sizes", "interpret"))
def _tgmm_padded(bounds, x, y, *, num_groups, out_dtype, block_sizes, interpret):
    """The kernel on inputs padded to tile multiples -> [G, Dp, Fp] (jitted: see _gmm_padded)."""
    tm, tk, tn = block_sizes.tm, block_sizes.tk, block_sizes.tn
    x = _pad_to(_pad_to(x, 0, tm), 1, tk)  # [Rp, Dp]
    y = _pad_to(_pad_to(y, 0, tm), 1, tn)  # [Rp, Fp]
    return plgpu.kernel(
        functools.partial(_tgmm_body, tm=tm, tk=tk, tn=tn),
        out_type=jax.ShapeDtypeStruct((num_groups, x.shape[1], y.shape[1]), out_dtype),
        grid=(num_groups, x.shape[1] // tk, y.shape[1] // tn),
        grid_names=("g", "d", "f"),
        compiler_params=_compiler_params(),
        interpret=_params(interpret),
    )(bounds, x, y)  # [G, Dp, Fp]


@functools.partial(jax.jit, static_argnames=("num_groups", "out_dtype", "block_sizes", "interpret"))
def tgmm(lhs, grad, group_sizes, group_offset, *, num_groups, out_dtype, block_sizes, interpret):
    """Per local group g: lhs[rows of g].T @ grad[rows of g] -> [G, D, F]."""
    num_rows, d_dim = lhs.shape
    f_dim = grad.shape[1]
    bounds = group_bounds(group_sizes, group_offset, num_groups, num_rows)  # [G + 1]
    kw = dict(num_groups=num_groups, block_sizes=block_sizes, interpret=interpret)

    def run(x, y, out_dtype):
        return _tgmm_padded(bounds, x, y, out_dtype=out_dtype, **kw)[:, :d_dim, :f_dim]

    if lhs.dtype == jnp.float32:
        return _three_bf16(run, lhs, grad, out_dtype)
    return run(lhs, grad, out_dtype)  # [G, D, F]
