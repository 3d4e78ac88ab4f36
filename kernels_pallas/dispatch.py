"""Kernel choice at lowering time: the TPU (Mosaic), Hopper GPU (Mosaic GPU) or GPU (Triton)
kernel for the platform and devices the program is lowered for, never for
jax.default_backend().

gmm and tgmm here bind a primitive whose lowering rules are registered per platform, so the
choice follows the jitted program's target, also when a CPU host compiles for compile-only TPU
or GPU devices:
- "tpu": the Mosaic kernel; "cuda": the Mosaic GPU kernel (mosaic_gpu.py) when every target
  GPU has compute capability 9.x and the running jax has Mosaic GPU Pallas, else the Triton
  kernel; "rocm": the Triton kernel; any other platform (CPU): the TPU kernel in interpret
  mode when interpret=True, otherwise a clear error. An explicit backend that does not run
  natively on the target is an error unless interpret=True (backend="mosaic_gpu" with
  interpret=True runs Pallas's GPU interpreter).
  interpret="auto" means interpret=False on TPU / GPU targets and True elsewhere.
  fallback="reference": where the target has no native kernel and interpret is off (a CPU, a
  GPU below compute capability 8.0), lower the jnp reference (reference.py: right values at
  dense cost) instead of raising; for code that lowers this path beside another and lets the
  compiler drop it there (moe_jax's backend="auto").
- On CUDA the rule reads the target devices (jit's device assignment or the shard_map mesh)
  and then (1) refuses GPUs below compute capability 8.0, where XLA has no Triton, naming the
  capability and pointing to an XLA path, (2) refuses backend="mosaic_gpu" on a GPU other than
  9.x (wgmma is Hopper-only; LLVM aborts the process on an sm80 target instead of raising),
  and (3) picks tiles that fit the device's shared memory (blocks.triton_block_sizes,
  blocks.mosaic_gpu_block_sizes). Without a known device it falls back to any local GPU, then
  to the Triton kernel with compute capability 8.0 tiles (which fit every supported GPU).
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

from kernels_pallas import mosaic_gpu, reference, tpu, triton
from kernels_pallas.blocks import (
    BACKENDS,
    MIN_TRITON_CC,
    BlockSizes,
    check_mosaic_gpu_block_sizes,
    default_block_sizes,
    mosaic_gpu_block_sizes,
    smem_optin_bytes,
    triton_block_sizes,
    triton_smem_bytes,
)
from kernels_pallas.gpu_target import triton_target
from kernels_pallas.lowering import register_target_lowering, target_devices

_NATIVE = {"tpu": ("tpu",), "cuda": ("mosaic_gpu", "triton"), "rocm": ("triton",)}
_NATIVE["gpu"] = _NATIVE["cuda"]


def _gpu_family(devices: list) -> str:
    """The CUDA kernel for the target GPUs: Mosaic GPU when every one is compute capability
    9.x and the running jax has Mosaic GPU Pallas, else Triton (also when no GPU is known)."""
    ccs = [cc for d in devices if (cc := _cc(d)) is not None]
    if ccs and mosaic_gpu.unavailable_reason() is None and all(map(mosaic_gpu.supports_cc, ccs)):
        return "mosaic_gpu"
    return "triton"


def resolve_backend(
    backend: str, interpret: bool, platform: str | None = None, devices: list | None = None
) -> str:
    """Map "auto" / "tpu" / "triton" / "mosaic_gpu" to a kernel family for `platform`.

    platform is a lowering platform ("tpu", "cuda", "rocm", "cpu"; "gpu" means a GPU) and
    devices the GPUs the program is compiled for (they pick Mosaic GPU or Triton on "cuda");
    None means jax.default_backend() and its devices (for callers that decide eagerly, e.g. a
    benchmark). gmm and tgmm resolve at lowering time with the program's platform and devices.
    """
    if backend not in ("auto", *BACKENDS):
        raise ValueError(
            f"backend must be 'auto', 'tpu', 'triton' or 'mosaic_gpu', got {backend!r}"
        )
    if platform is None:
        platform = jax.default_backend()
        devices = jax.devices() if devices is None else devices
    devices = list(devices or [])
    natives = _NATIVE.get(platform, ())
    if backend == "auto":
        if platform in ("cuda", "gpu"):
            return _gpu_family(devices)
        if natives:
            return natives[0]
        if interpret:
            return "tpu"
        raise ValueError(
            f"backend='auto': no Pallas kernel runs natively on platform {platform!r}. Pass "
            "interpret=True (tests: runs the TPU kernel on CPU, slowly) or use an XLA path "
            "such as jax.lax.ragged_dot."
        )
    if interpret:
        if backend == "mosaic_gpu" and (reason := mosaic_gpu.unavailable_reason()):
            raise ValueError(f"backend='mosaic_gpu': {reason}")
        return backend
    if backend not in natives:
        where = {"tpu": "TPU", "triton": "GPU", "mosaic_gpu": "NVIDIA Hopper GPUs"}[backend]
        raise ValueError(
            f"backend={backend!r} runs natively only on {where}, but the program is lowered "
            f"for {platform!r}: pass interpret=True or backend='auto'."
        )
    if backend == "mosaic_gpu":
        _check_mosaic_gpu(devices)
    return backend


def _check_mosaic_gpu(devices: list) -> None:
    """Raise unless the Mosaic GPU kernels compile for every target GPU."""
    if reason := mosaic_gpu.unavailable_reason():
        raise ValueError(f"backend='mosaic_gpu': {reason}; use backend='triton' or 'auto'")
    for device in devices:
        cc = _cc(device)
        if cc is not None and not mosaic_gpu.supports_cc(cc):
            raise ValueError(
                f"backend='mosaic_gpu' compiles for NVIDIA GPUs of compute capability 9.x "
                f"(Hopper: H100, H200; wgmma), but the target {device.device_kind!r} has "
                f"{cc[0]}.{cc[1]}: use backend='triton' or 'auto' (which picks Triton there)"
            )


def mosaic_gpu_supported(device) -> bool:
    """Whether the Mosaic GPU kernels compile for `device` with the running jax.

    Args:
        device: a jax device (also a compile-only one); True only for an NVIDIA GPU of compute
            capability 9.x (H100, H200) under a jax with Mosaic GPU Pallas and its interpreter.
    """
    cc = _cc(device) if device.platform in ("gpu", "cuda") else None
    return cc is not None and mosaic_gpu.unavailable_reason() is None and mosaic_gpu.supports_cc(cc)


def _cc(device) -> tuple[int, int] | None:
    """(major, minor) compute capability of a CUDA device, None when it has none."""
    try:
        major, minor = str(device.compute_capability).split(".")
        return int(major), int(minor)
    except (AttributeError, ValueError):
        return None


def triton_supported(device) -> bool:
    """Whether the Triton kernels compile for `device`.

    Args:
        device: a jax device (also a compile-only one); True for an NVIDIA GPU of compute
            capability >= 8.0 and for non-CUDA GPUs, where the capability is not defined.
    """
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
    natives = _NATIVE.get(platform, ())
    if not natives or backend not in ("auto", *natives):
        return False
    if backend == "mosaic_gpu":
        return bool(devices) and all(map(mosaic_gpu_supported, devices))
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
    # Read once: the fallback test, the family, the tiles and jax's Triton lowering use them.
    devices = _target_devices(ctx) if platform == "cuda" and not interpret else []
    if fallback == "reference" and not interpret and not _native(backend, platform, devices):
        ref = functools.partial(
            _reference, op=op, out_dtype=out_dtype, transpose_rhs=transpose_rhs, groups=groups
        )
        return mlir.lower_fun(ref, multiple_results=False)(ctx, *args)
    family = resolve_backend(backend, interpret, platform, devices)
    if family == "mosaic_gpu" and interpret:
        raise ValueError(
            f"backend='mosaic_gpu' on a {platform!r} target runs only in Pallas's GPU "
            "interpreter, which needs interpret=True when gmm / tgmm is called (interpret='auto' "
            "decides at lowering, too late for it)"
        )
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
    if family == "mosaic_gpu":
        # f32 operands run as bf16 products with an f32 output tile (mosaic_gpu.py).
        out_size = 4 if lhs_aval.dtype == np.float32 else np.dtype(out_dtype).itemsize
        smem = _gpu_smem(devices) if devices and not interpret else 227 * 1024
        if bs is None:
            bs = mosaic_gpu_block_sizes(op, out_size, smem)
        else:
            check_mosaic_gpu_block_sizes(op, bs, out_size, smem)
    bs = bs or default_block_sizes(family, k, n)
    kernels = {"tpu": tpu, "triton": triton, "mosaic_gpu": mosaic_gpu}[family]
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


def _mosaic_gpu_interpret(op, lhs, other, group_sizes, group_offset, block_sizes, **kw):
    """The Mosaic GPU kernel in Pallas's GPU interpreter, called directly: the interpreter's
    callbacks carry an ordered effect that a primitive's lowering rule cannot thread."""
    resolve_backend("mosaic_gpu", True)  # a clear error where the running jax lacks it
    out_size = 4 if lhs.dtype == np.float32 else np.dtype(kw["out_dtype"]).itemsize
    if block_sizes is None:
        block_sizes = mosaic_gpu_block_sizes(op, out_size)
    check_mosaic_gpu_block_sizes(op, block_sizes, out_size)
    fn = mosaic_gpu.gmm if op == "gmm" else mosaic_gpu.tgmm
    return fn(lhs, other, group_sizes, group_offset, block_sizes=block_sizes, interpret=True, **kw)


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
    if backend == "mosaic_gpu" and interpret is True:
        return _mosaic_gpu_interpret(
            "gmm",
            lhs,
            rhs,
            group_sizes,
            group_offset,
            block_sizes,
            out_dtype=out_dtype,
            transpose_rhs=bool(transpose_rhs),
        )
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
    if backend == "mosaic_gpu" and interpret is True:
        return _mosaic_gpu_interpret(
            "tgmm",
            lhs,
            grad,
            group_sizes,
            group_offset,
            block_sizes,
            out_dtype=out_dtype,
            num_groups=int(num_groups),
        )
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
