"""Kernel choice at lowering time: the TPU (Mosaic) or GPU (Triton) kernel for the platform the
program is lowered for, never for jax.default_backend().

gmm and tgmm here bind a primitive whose lowering rules are registered per platform, so the
choice follows the jitted program's target, also when a CPU host compiles for compile-only TPU
or GPU devices:
- "tpu": the Mosaic kernel; "cuda" / "rocm": the Triton kernel; any other platform (CPU): the
  TPU kernel in interpret mode when interpret=True, otherwise a clear error. An explicit
  backend that does not run natively on the target is an error unless interpret=True.
  interpret="auto" means interpret=False on TPU / GPU targets and True elsewhere.
  fallback="reference": where the target has no native kernel and interpret is off (a CPU, a
  GPU below compute capability 8.0), lower the jnp reference (reference.py: right values at
  dense cost) instead of raising; for code that lowers this path beside another and lets the
  compiler drop it there (moe_jax's backend="auto").
- On CUDA the rule reads the target devices (jit's device assignment or the shard_map mesh)
  and then (1) refuses GPUs below compute capability 8.0, where XLA has no Triton, naming the
  capability and pointing to an XLA path, and (2) picks Triton tiles that fit the device's
  shared memory (blocks.triton_block_sizes). Without a known device it falls back to any local
  GPU, then to compute capability 8.0 tiles (which fit every supported GPU).
Only the chosen kernel is traced to kernel IR and compiled. Callers that want to decide before
tracing (e.g. pick an XLA path on a T4) use triton_supported(device).
"""

from __future__ import annotations

import contextlib
import functools

import jax
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import mlir

from kernels_pallas import reference, tpu, triton
from kernels_pallas.blocks import (
    BACKENDS,
    MIN_TRITON_CC,
    BlockSizes,
    default_block_sizes,
    smem_optin_bytes,
    triton_block_sizes,
    triton_smem_bytes,
)
from kernels_pallas.gpu_target import triton_target
from kernels_pallas.lowering import register_target_lowering, target_devices

_NATIVE = {"tpu": "tpu", "cuda": "triton", "rocm": "triton", "gpu": "triton"}


def resolve_backend(backend: str, interpret: bool, platform: str | None = None) -> str:
    """Map "auto" / "tpu" / "triton" to a kernel family for `platform`.

    platform is a lowering platform ("tpu", "cuda", "rocm", "cpu"; "gpu" means a GPU); None
    means jax.default_backend() (for callers that decide eagerly, e.g. a benchmark). gmm and
    tgmm resolve at lowering time with the program's platform.
    """
    if backend not in ("auto", *BACKENDS):
        raise ValueError(f"backend must be 'auto', 'tpu' or 'triton', got {backend!r}")
    platform = jax.default_backend() if platform is None else platform
    native = _NATIVE.get(platform)
    if backend == "auto":
        if native is not None:
            return native
        if interpret:
            return "tpu"
        raise ValueError(
            f"backend='auto': no Pallas kernel runs natively on platform {platform!r}. Pass "
            "interpret=True (tests: runs the TPU kernel on CPU, slowly) or use an XLA path "
            "such as jax.lax.ragged_dot."
        )
    if not interpret and native != backend:
        raise ValueError(
            f"backend={backend!r} runs natively only on "
            f"{'TPU' if backend == 'tpu' else 'GPU'}, but the program is lowered for "
            f"{platform!r}: pass interpret=True or backend='auto'."
        )
    return backend


def _cc(device) -> tuple[int, int] | None:
    """(major, minor) compute capability of a CUDA device, None when it has none."""
    try:
        major, minor = str(device.compute_capability).split(".")
        return int(major), int(minor)
    except (AttributeError, ValueError):
        return None


def triton_supported(device) -> bool:
    """Whether the Triton kernels compile for `device` (an NVIDIA GPU of compute capability
    >= 8.0; also true for non-CUDA GPUs, where the capability is not defined)."""
    if device.platform not in ("gpu", "cuda", "rocm"):
        return False
    cc = _cc(device)
    return cc is None or cc >= MIN_TRITON_CC


def _target_devices(ctx) -> list:
    """The devices the program is lowered for, else this host's GPUs (if any)."""
    devices = target_devices(ctx)
    if devices:
        return devices
    try:
        return list(jax.local_devices(backend="gpu"))
    except RuntimeError:
        return []


def _unsupported_gpu_error(device, cc) -> ValueError:
    return ValueError(
        f"the Pallas Triton kernels need an NVIDIA GPU of compute capability >= "
        f"{MIN_TRITON_CC[0]}.{MIN_TRITON_CC[1]} (Ampere or newer), but the target "
        f"{device.device_kind!r} has compute capability {cc[0]}.{cc[1]}: XLA has no Triton "
        "there. Use an XLA grouped matmul instead (the 'tiled' backend of moe_jax, or "
        "jax.lax.ragged_dot); kernels_pallas.triton_supported(device) tells in advance."
    )


def _gpu_smem(devices: list) -> int:
    """Opt-in shared memory per block of the target GPUs; raises for a pre-Ampere target."""
    ccs = [(d, cc) for d in devices if (cc := _cc(d)) is not None]
    for device, cc in ccs:
        if cc < MIN_TRITON_CC:
            raise _unsupported_gpu_error(device, cc)
    return min((smem_optin_bytes(cc) for _, cc in ccs), default=smem_optin_bytes(MIN_TRITON_CC))


def _check_smem(op: str, bs: BlockSizes, itemsize: int, smem: int) -> None:
    need = triton_smem_bytes(op, bs, itemsize)
    if need > smem:
        raise ValueError(
            f"block_sizes {bs} need about {need} bytes of shared memory for Triton {op}, more "
            f"than the target's {smem} bytes per block: lower num_stages or the tiles, or pass "
            "block_sizes=None for tiles chosen for the target"
        )


def _native(backend: str, platform: str, devices: list) -> bool:
    """Whether `backend` has a kernel that compiles natively for the target."""
    native = _NATIVE.get(platform)
    if native is None or backend not in ("auto", native):
        return False
    ccs = [cc for d in devices if (cc := _cc(d)) is not None]
    return platform != "cuda" or all(cc >= MIN_TRITON_CC for cc in ccs)


def _reference(lhs, other, group_sizes, group_offset, *, op, out_dtype, transpose_rhs, groups):
    if op == "gmm":
        return reference.gmm_reference(
            lhs,
            other,
            group_sizes,
            group_offset=group_offset,
            transpose_rhs=transpose_rhs,
            preferred_element_type=out_dtype,
        )
    return reference.tgmm_reference(
        lhs,
        other,
        group_sizes,
        group_offset=group_offset,
        num_groups=groups,
        preferred_element_type=out_dtype,
    )


def _lowering(
    ctx,
    *args,
    platform,
    op,
    backend,
    block_sizes,
    interpret,
    fallback,
    out_dtype,
    transpose_rhs,
    groups,
):
    platform = platform or (ctx.platforms or ctx.module_context.platforms)[0]
    if interpret == "auto":
        interpret = platform not in _NATIVE
    # Read once: the fallback test, the tiles and jax's Triton lowering all use them.
    devices = _target_devices(ctx) if platform == "cuda" and not interpret else []
    if fallback == "reference" and not interpret and not _native(backend, platform, devices):
        ref = functools.partial(
            _reference, op=op, out_dtype=out_dtype, transpose_rhs=transpose_rhs, groups=groups
        )
        return mlir.lower_fun(ref, multiple_results=False)(ctx, *args)
    family = resolve_backend(backend, interpret, platform)
    lhs_aval, other_aval = ctx.avals_in[:2]
    m, k = lhs_aval.shape
    if op == "gmm":
        n = other_aval.shape[1] if transpose_rhs else other_aval.shape[2]
    else:
        n = other_aval.shape[1]
    bs = block_sizes
    target = contextlib.nullcontext()
    if family == "triton" and platform == "cuda" and not interpret:
        target = triton_target(devices)
        smem = _gpu_smem(devices)
        itemsize = np.dtype(lhs_aval.dtype).itemsize
        if bs is None:
            bs = triton_block_sizes(op, m, k, n, itemsize=itemsize, smem_bytes=smem)
        else:
            _check_smem(op, bs, itemsize, smem)
    bs = bs or default_block_sizes(family, k, n)
    kernels = tpu if family == "tpu" else triton
    if op == "gmm":
        fn = functools.partial(kernels.gmm, transpose_rhs=transpose_rhs)
    else:
        fn = functools.partial(kernels.tgmm, num_groups=groups)
    fn = functools.partial(fn, out_dtype=out_dtype, block_sizes=bs, interpret=interpret)
    with target:  # the GPU jax's Triton lowering compiles for (gpu_target.py)
        return mlir.lower_fun(fn, multiple_results=False)(ctx, *args)


def _abstract_eval(
    lhs, other, group_sizes, group_offset, *, op, out_dtype, transpose_rhs, groups, **_
):
    del group_sizes, group_offset
    if op == "gmm":
        n = other.shape[1] if transpose_rhs else other.shape[2]
        shape = (lhs.shape[0], n)  # [R, F]
    else:
        shape = (groups, lhs.shape[1], other.shape[1])  # [G, D, F]
    return jax.core.ShapedArray(shape, out_dtype)


grouped_matmul_p = Primitive("kernels_pallas_grouped_matmul")
grouped_matmul_p.def_abstract_eval(_abstract_eval)
grouped_matmul_p.def_impl(
    lambda *args, **params: jax.jit(functools.partial(grouped_matmul_p.bind, **params))(*args)
)
# The CUDA rule reads the target GPU (target_devices); without the private hook it falls back
# to the local GPUs, then to compute capability 8.0 tiles.
register_target_lowering(grouped_matmul_p, _lowering, ("tpu", "cuda", "rocm"))


def gmm(
    lhs,
    rhs,
    group_sizes,
    group_offset,
    *,
    transpose_rhs,
    out_dtype,
    block_sizes,
    backend,
    interpret,
    fallback=None,
):
    """The gmm kernel for the lowering platform: [R, D] x [G, D, F] -> [R, F] (see ops.py)."""
    return grouped_matmul_p.bind(
        lhs,
        rhs,
        group_sizes,
        group_offset,
        op="gmm",
        backend=backend,
        block_sizes=block_sizes,
        interpret=interpret,
        fallback=fallback,
        out_dtype=np.dtype(out_dtype),
        transpose_rhs=bool(transpose_rhs),
        groups=rhs.shape[0],
    )


def tgmm(
    lhs,
    grad,
    group_sizes,
    group_offset,
    *,
    num_groups,
    out_dtype,
    block_sizes,
    backend,
    interpret,
    fallback=None,
):
    """The tgmm kernel for the lowering platform: [R, D], [R, F] -> [G, D, F] (see ops.py)."""
    return grouped_matmul_p.bind(
        lhs,
        grad,
        group_sizes,
        group_offset,
        op="tgmm",
        backend=backend,
        block_sizes=block_sizes,
        interpret=interpret,
        fallback=fallback,
        out_dtype=np.dtype(out_dtype),
        transpose_rhs=False,
        groups=int(num_groups),
    )
