"""Differentiable grouped matmuls: gmm and tgmm with a custom VJP and input checks.

backend="auto" runs the Mosaic kernel when the program is lowered for TPU, the Mosaic GPU kernel
for NVIDIA Hopper GPUs (compute capability 9.x, jax with Mosaic GPU Pallas) and the Triton kernel
for other NVIDIA GPUs (compute capability >= 8.0), also from a CPU host compiling for
compile-only devices; on CPU it needs interpret=True. interpret="auto" runs natively where
the target has a kernel and in interpret mode elsewhere (CPU tests of code that also compiles for
accelerators). The choice is made at lowering time (dispatch.py), never from
jax.default_backend().

Contract shared by every backend (and by reference.py):
- lhs rows are sorted by group: global group i holds rows [sum(gs[:i]), sum(gs[:i+1])).
  sum(group_sizes) <= R; the rows past it (dropped null slots, padding) are never multiplied.
- Group window (expert parallelism, megablox-like): group_sizes always lists ALL groups, rhs
  holds only the G_local groups of this shard, and group_offset (a scalar, may be traced, e.g.
  axis_index * G_local) says which: local group g is global group group_offset + g. Without
  group_offset, rhs must hold every group.
- gmm: out[r] = lhs[r] @ rhs[g(r)] for rows r of a local group, and exactly 0 for every other
  row (rows of other shards' groups, rows past the sum). So a psum over shards assembles the
  full result and no NaN or garbage can reach a later reduction.
- tgmm: out[g] = lhs[rows of g].T @ grad[rows of g] for each local group; empty groups give 0.
- Inputs of different float dtypes are promoted to a common one (cast params to bf16 first for
  bf16 compute). Accumulation is f32; the output dtype is preferred_element_type (default: the
  compute dtype).
- Inside jax.shard_map, interpret-mode kernels need check_vma=False.

Gradients: for out = gmm(lhs, rhs), d_lhs = gmm(d_out, rhs, transpose_rhs=True) and
d_rhs = tgmm(lhs, d_out); for out = tgmm(lhs, grad), d_lhs = gmm(grad, d_out, transpose_rhs=True)
and d_grad = gmm(lhs, d_out). The backward passes call the differentiable functions, so
higher-order derivatives work too. group_sizes and group_offset get no gradient.

Traced group_sizes cannot be checked: negative sizes count as 0 and groups are cut at row R.
A traced group_offset whose window leaves [0, len(group_sizes)) treats the missing groups as
empty.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas import dispatch
from kernels_pallas.blocks import BACKENDS, BlockSizes
from kernels_pallas.dispatch import resolve_backend  # noqa: F401  (old home, re-exported)

_DTYPES = frozenset(np.dtype(t) for t in (jnp.float32, jnp.bfloat16, jnp.float16))


@dataclasses.dataclass(frozen=True)
class _Cfg:
    """Static arguments of one call (hashable: a nondiff argument of the custom VJP)."""

    backend: str  # "auto" | "tpu" | "triton" | "mosaic_gpu": resolved at lowering (dispatch.py)
    block_sizes: BlockSizes | None  # None: defaults for the target
    interpret: bool | str  # True, False or "auto" (interpret only where no kernel is native)
    out_dtype: np.dtype
    fallback: str | None = None  # "reference": the jnp reference where no kernel compiles


def _run_gmm(cfg: _Cfg, lhs, rhs, group_sizes, group_offset, transpose_rhs: bool):
    n_dim = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    if lhs.shape[0] == 0:
        return jnp.zeros((0, n_dim), cfg.out_dtype)
    return dispatch.gmm(
        lhs,
        rhs,
        group_sizes,
        group_offset,
        transpose_rhs=transpose_rhs,
        out_dtype=cfg.out_dtype,
        block_sizes=cfg.block_sizes,
        backend=cfg.backend,
        interpret=cfg.interpret,
        fallback=cfg.fallback,
    )


def _run_tgmm(cfg: _Cfg, lhs, grad, group_sizes, group_offset, num_groups: int):
    if lhs.shape[0] == 0:
        return jnp.zeros((num_groups, lhs.shape[1], grad.shape[1]), cfg.out_dtype)
    return dispatch.tgmm(
        lhs,
        grad,
        group_sizes,
        group_offset,
        num_groups=num_groups,
        out_dtype=cfg.out_dtype,
        block_sizes=cfg.block_sizes,
        backend=cfg.backend,
        interpret=cfg.interpret,
        fallback=cfg.fallback,
    )


def _check_interpret(interpret) -> bool | str:
    if interpret == "auto":
        return "auto"
    if not isinstance(interpret, (bool, np.bool_)):
        raise ValueError(f"interpret must be True, False or 'auto', got {interpret!r}")
    return bool(interpret)


def _check_fallback(fallback) -> str | None:
    if fallback not in (None, "reference"):
        raise ValueError(f"fallback must be None or 'reference', got {fallback!r}")
    return fallback


def _check_backend(backend: str) -> str:
    if backend not in ("auto", *BACKENDS):
        raise ValueError(
            f"backend must be 'auto', 'tpu', 'triton' or 'mosaic_gpu', got {backend!r}"
        )
    return backend


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _gmm(cfg: _Cfg, transpose_rhs: bool, lhs, rhs, group_sizes, group_offset):
    return _run_gmm(cfg, lhs, rhs, group_sizes, group_offset, transpose_rhs)


def _gmm_fwd(cfg, transpose_rhs, lhs, rhs, group_sizes, group_offset):
    out = _gmm(cfg, transpose_rhs, lhs, rhs, group_sizes, group_offset)
    return out, (lhs, rhs, group_sizes, group_offset)


def _gmm_bwd(cfg, transpose_rhs, res, d_out):
    lhs, rhs, group_sizes, group_offset = res
    d_out = d_out.astype(lhs.dtype)  # [R, F] in the compute dtype
    lhs_cfg = dataclasses.replace(cfg, out_dtype=np.dtype(lhs.dtype))
    rhs_cfg = dataclasses.replace(cfg, out_dtype=np.dtype(rhs.dtype))
    num_groups = rhs.shape[0]
    # rhs [G, D, F]: d_lhs = d_out @ rhs[g].T, d_rhs[g] = lhs_g.T @ d_out_g.
    # rhs [G, F, D] (transposed): d_lhs = d_out @ rhs[g], d_rhs[g] = d_out_g.T @ lhs_g.
    d_lhs = _gmm(lhs_cfg, not transpose_rhs, d_out, rhs, group_sizes, group_offset)  # [R, D]
    if transpose_rhs:
        d_rhs = _tgmm(rhs_cfg, num_groups, d_out, lhs, group_sizes, group_offset)  # [G, F, D]
    else:
        d_rhs = _tgmm(rhs_cfg, num_groups, lhs, d_out, group_sizes, group_offset)  # [G, D, F]
    return d_lhs, d_rhs, None, None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _tgmm(cfg: _Cfg, num_groups: int, lhs, grad, group_sizes, group_offset):
    return _run_tgmm(cfg, lhs, grad, group_sizes, group_offset, num_groups)


def _tgmm_fwd(cfg, num_groups, lhs, grad, group_sizes, group_offset):
    out = _tgmm(cfg, num_groups, lhs, grad, group_sizes, group_offset)
    return out, (lhs, grad, group_sizes, group_offset)


def _tgmm_bwd(cfg, num_groups, res, d_out):
    lhs, grad, group_sizes, group_offset = res
    d_out = d_out.astype(lhs.dtype)  # [G, D, F]
    lhs_cfg = dataclasses.replace(cfg, out_dtype=np.dtype(lhs.dtype))
    grad_cfg = dataclasses.replace(cfg, out_dtype=np.dtype(grad.dtype))
    d_lhs = _gmm(lhs_cfg, True, grad, d_out, group_sizes, group_offset)  # [R, D]
    d_grad = _gmm(grad_cfg, False, lhs, d_out, group_sizes, group_offset)  # [R, F]
    return d_lhs, d_grad, None, None


_tgmm.defvjp(_tgmm_fwd, _tgmm_bwd)


def _concrete(x) -> np.ndarray | None:
    """The value of x when it is known at trace time, else None."""
    if isinstance(x, jax.core.Tracer):
        return None
    return np.asarray(x)


def _check_groups(group_sizes, group_offset, num_groups: int, num_rows: int):
    """Validate group_sizes / group_offset; return them as int32 arrays."""
    if jnp.ndim(group_sizes) != 1 or not jnp.issubdtype(jnp.result_type(group_sizes), jnp.integer):
        raise ValueError(
            f"group_sizes must be a 1-D integer array, got shape {jnp.shape(group_sizes)} "
            f"dtype {jnp.result_type(group_sizes)}"
        )
    total_groups = jnp.shape(group_sizes)[0]
    if num_groups < 1:
        raise ValueError(f"the number of local groups must be >= 1, got {num_groups}")
    if group_offset is None:
        if num_groups != total_groups:
            raise ValueError(
                f"without group_offset the local group count ({num_groups}) must equal "
                f"len(group_sizes) ({total_groups}); pass group_offset for a group window"
            )
        group_offset = 0
    elif jnp.ndim(group_offset) != 0:
        raise ValueError(f"group_offset must be a scalar, got shape {jnp.shape(group_offset)}")
    elif num_groups > total_groups:
        raise ValueError(
            f"local group count {num_groups} exceeds len(group_sizes) = {total_groups}"
        )
    sizes = _concrete(group_sizes)
    if sizes is not None:
        if (sizes < 0).any():
            raise ValueError(f"group_sizes must be >= 0, got {sizes.tolist()}")
        if sizes.sum() > num_rows:
            raise ValueError(f"sum(group_sizes) = {sizes.sum()} exceeds the {num_rows} rows of lhs")
    offset = _concrete(group_offset)
    if offset is not None and not 0 <= int(offset) <= total_groups - num_groups:
        raise ValueError(
            f"group_offset must be in [0, {total_groups - num_groups}] "
            f"(len(group_sizes) - local groups), got {int(offset)}"
        )
    return jnp.asarray(group_sizes, jnp.int32), jnp.asarray(group_offset, jnp.int32)


def _compute_dtype(a, b, name_a: str, name_b: str):
    dtype = np.dtype(jnp.promote_types(a.dtype, b.dtype))
    if dtype not in _DTYPES:
        raise ValueError(
            f"{name_a}/{name_b} must be float32, bfloat16 or float16, got {a.dtype} and {b.dtype}"
        )
    return dtype


def gmm(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    *,
    group_offset: jax.Array | int | None = None,
    transpose_rhs: bool = False,
    preferred_element_type=None,
    block_sizes: BlockSizes | None = None,
    interpret: bool | str = False,
    backend: str = "auto",
    fallback: str | None = None,
) -> jax.Array:
    """Grouped matmul: lhs [R, D], rhs [G, D, F] ([G, F, D] if transpose_rhs) -> [R, F].

    Rows of local groups get lhs[r] @ rhs[g]; all other rows are exactly 0 (module docstring).
    fallback="reference": on a target without a native kernel (and interpret off), lower the
    jnp reference instead of raising (dispatch.py).

    Args:
        lhs: rows [R, D] sorted by group (in MoE: R = T·K slots, G = N experts).
        rhs: weights [G, D, F], or [G, F, D] with transpose_rhs; with group_offset only the
            G_local groups of this shard.
        group_sizes: rows per group [G] (all groups, also with group_offset), integer;
            sum(group_sizes) <= R.
        group_offset: first global group held by rhs (a scalar, may be traced); None: rhs
            holds every group.
        transpose_rhs: contract with rhs [G, F, D] as if it were [G, D, F].
        preferred_element_type: output dtype (default: the promoted input dtype).
        block_sizes: tile sizes (default: the table for the target).
        interpret: True / False, or "auto" (interpret mode only where no kernel is native).
        backend: "auto" (by the lowering target), "tpu", "triton" or "mosaic_gpu".
        fallback: None or "reference".

    Returns:
        [R, F] in preferred_element_type.

    Raises:
        ValueError: lhs not [R, D] or rhs not rank 3, a contraction mismatch, group_sizes not
            a 1-D integer array, negative or summing past R (when concrete), a group_offset
            window outside the groups, dtypes other than float32 / bfloat16 / float16, an
            unknown backend / interpret / fallback; and at lowering, a target without a
            kernel and no fallback.
    """
    if lhs.ndim != 2 or rhs.ndim != 3:
        raise ValueError(f"lhs must be [R, D] and rhs [G, D, F]; got {lhs.shape} and {rhs.shape}")
    k_rhs = rhs.shape[2] if transpose_rhs else rhs.shape[1]
    if lhs.shape[1] != k_rhs:
        raise ValueError(
            f"contraction mismatch: lhs {lhs.shape} vs rhs {rhs.shape} "
            f"(transpose_rhs={transpose_rhs})"
        )
    group_sizes, group_offset = _check_groups(group_sizes, group_offset, rhs.shape[0], lhs.shape[0])
    dtype = _compute_dtype(lhs, rhs, "lhs", "rhs")
    cfg = _Cfg(
        backend=_check_backend(backend),
        block_sizes=block_sizes,
        interpret=_check_interpret(interpret),
        out_dtype=np.dtype(preferred_element_type or dtype),
        fallback=_check_fallback(fallback),
    )
    return _gmm(
        cfg, bool(transpose_rhs), lhs.astype(dtype), rhs.astype(dtype), group_sizes, group_offset
    )


def tgmm(
    lhs: jax.Array,
    grad: jax.Array,
    group_sizes: jax.Array,
    *,
    group_offset: jax.Array | int | None = None,
    num_groups: int | None = None,
    preferred_element_type=None,
    block_sizes: BlockSizes | None = None,
    interpret: bool | str = False,
    backend: str = "auto",
    fallback: str | None = None,
) -> jax.Array:
    """Per-group lhs^T @ grad: lhs [R, D], grad [R, F] -> [G, D, F] (the gmm weight gradient).

    num_groups is the local group count; it defaults to len(group_sizes) and is required with
    group_offset.

    Args:
        lhs: rows [R, D] sorted by group.
        grad: rows [R, F] (the output gradient of gmm).
        group_sizes: rows per group [G] (all groups), integer; sum(group_sizes) <= R.
        group_offset: first global group of this shard's window; None: every group.
        num_groups: G_local, the groups to produce (required with group_offset).
        preferred_element_type: output dtype (default: the promoted input dtype).
        block_sizes: tile sizes (default: the table for the target).
        interpret: True / False, or "auto".
        backend: "auto", "tpu", "triton" or "mosaic_gpu".
        fallback: None or "reference".

    Returns:
        [G_local, D, F]; empty groups give exact zeros.

    Raises:
        ValueError: as gmm's, plus lhs and grad with different row counts, or group_offset
            without num_groups.
    """
    if lhs.ndim != 2 or grad.ndim != 2 or lhs.shape[0] != grad.shape[0]:
        raise ValueError(f"lhs must be [R, D] and grad [R, F]; got {lhs.shape} and {grad.shape}")
    if num_groups is None:
        if group_offset is not None:
            raise ValueError(
                "tgmm: num_groups (the local group count) is required with group_offset"
            )
        num_groups = jnp.shape(group_sizes)[0]
    group_sizes, group_offset = _check_groups(group_sizes, group_offset, num_groups, lhs.shape[0])
    dtype = _compute_dtype(lhs, grad, "lhs", "grad")
    cfg = _Cfg(
        backend=_check_backend(backend),
        block_sizes=block_sizes,
        interpret=_check_interpret(interpret),
        out_dtype=np.dtype(preferred_element_type or dtype),
        fallback=_check_fallback(fallback),
    )
    return _tgmm(
        cfg, int(num_groups), lhs.astype(dtype), grad.astype(dtype), group_sizes, group_offset
    )
