"""Backend "tokamax": tokamax.ragged_dot (DeepMind's Pallas kernels) as a grouped matmul.

Optional: ``pip install "moe_jax[tokamax]"`` (tokamax needs Python >= 3.12 and jax >= 0.11.1).
The registry imports this module the first time "tokamax" is asked for; without tokamax that
fails with an ImportError naming the extra, and MoEConfig.backend="tokamax" is refused when the
layer is built.

What tokamax 0.0.17 offers (read from its source):
- ``tokamax.ragged_dot_general(lhs, rhs, group_sizes, dimension_numbers, ...,
  implementation=...)`` mirrors jax.lax.ragged_dot_general. Implementations: "mosaic_tpu"
  (Pallas Mosaic TPU gmm / tgmm; TPU v5 and newer; every non-group dimension >= 128),
  "mosaic_gpu" (Pallas Mosaic GPU, bf16 / f16 only; sm90 has forward, input- and weight-gradient
  kernels, sm80 and sm100 only the forward form), "triton" (only where jax_triton is installed:
  the extra does not bring it), "xla" (jax.lax.ragged_dot_general: runs everywhere, computes
  densely on CPU and GPU). A kernel that cannot take a call raises NotImplementedError; given a
  sequence, tokamax runs the first implementation that does not.
- By default it picks from the default device *while tracing* and reads the TPU generation or
  the GPU compute capability from it too, so a program traced on a CPU host for a TPU or GPU
  would get "xla".
- group_offset raises NotImplementedError in every implementation above; rows past
  sum(group_sizes) are left unwritten by the kernels; its VJP is the transposed product for
  d_lhs and the ragged-contracting product (tgmm) for d_rhs.

What this module does on our side:
1. The implementation is chosen when the program is lowered, for the devices it is lowered for
   (the primitive below; its lowering rule reads jit's device assignment or the shard_map mesh,
   as auto.py does): TPU v5+ -> mosaic_tpu, NVIDIA with compute capability >= 8.0 -> mosaic_gpu,
   anything else -> xla. tokamax is traced there under jax.default_device(target device), so
   it reads the target's generation / compute capability, not this host's. A product the
   kernel refuses (a dimension < 128 on TPU, f32 on GPU, the weight gradient on sm80 / sm100)
   runs tokamax's "xla" implementation (dense on a GPU: use bf16 there).
2. Our own custom_vjp with the same three products as tokamax's, each through (1).
3. Empty groups: the weight gradient is where(group_sizes > 0, d_rhs, 0), exactly zero and
   finite whatever the kernel (tokamax issue 887 / PR 1016: its Triton d_rhs gave nonzero or
   non-finite values there; null routing makes empty groups common).
4. Rows past sum(group_sizes) are set to 0 in the output and in the lhs gradient, and the
   incoming gradient is zeroed there before the weight gradient (the kernels leave those
   rows unwritten; nothing there may reach a real group).
5. No group_offset: the expert-parallel forward (parallel/ep.py) hands every backend its shard's
   slice of the expert weights [N_loc, ...] and the group sizes of those local experts, so the
   local groups start at 0 and tokamax never needs an offset.
"""

from __future__ import annotations

import contextlib
import functools
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import mlir

from kernels_pallas.lowering import register_target_lowering, target_devices
from moe_jax.experts.registry import compute_capability, lowering_platform

INSTALL = 'pip install "moe_jax[tokamax]"'
REQUIRES = "Python >= 3.12 and jax >= 0.11.1"

try:
    import tokamax
except ImportError as e:  # the oldest environment (Python 3.11, jax 0.10) cannot install it
    raise ImportError(
        f"the tokamax package is not installed (it needs {REQUIRES}; this is Python "
        f"{sys.version.split()[0]}, jax {jax.__version__}): {INSTALL}"
    ) from e

KERNELS = {"tpu": "mosaic_tpu", "cuda": "mosaic_gpu"}  # per lowering platform; else "xla"
MIN_TPU_GENERATION = 5  # tokamax's Mosaic TPU kernel runs on v5e / v5p and newer
MIN_GPU_CC = (8, 0)  # tokamax's Mosaic GPU kernels: Ampere and newer


def _dims(contract, ragged=(0,), group=(0,)) -> jax.lax.RaggedDotDimensionNumbers:
    return jax.lax.RaggedDotDimensionNumbers((contract, ((), ())), list(ragged), list(group))


# The three products of a grouped matmul and its VJP, as ragged_dot_general dimensions.
DIMS = {
    "gmm": _dims(((1,), (1,))),  # lhs [M, K] x rhs [G, K, N] -> [M, N]
    "gmm_t": _dims(((1,), (2,))),  # grad [M, N] x rhs [G, K, N] -> [M, K]
    "tgmm": _dims(((0,), (0,)), group=()),  # lhs [M, K] x grad [M, N] -> [G, K, N]
}


def implementation(device=None, platform: str | None = None) -> str:
    """The tokamax implementation this backend asks for on a target (its lowering platform,
    by default read from `device`): "mosaic_tpu", "mosaic_gpu" or "xla"."""
    platform = platform or lowering_platform(device)
    if platform == "tpu" and device is not None:
        generation = re.search(r"(\d+)", device.device_kind)
        if generation and int(generation[1]) >= MIN_TPU_GENERATION:
            return KERNELS["tpu"]
    if platform == "cuda" and device is not None:
        cc = compute_capability(device)
        if cc is not None and cc >= MIN_GPU_CC:
            return KERNELS["cuda"]
    return "xla"


def _product(a, b, group_sizes, *, kind, out_dtype, impl):
    """One tokamax call: the kernel `impl`, then its "xla" implementation if it refuses."""
    return tokamax.ragged_dot_general(
        a,
        b,
        group_sizes,
        DIMS[kind],
        preferred_element_type=out_dtype,
        implementation=(impl, "xla") if impl != "xla" else "xla",
        bypass_device_check=True,  # chosen for the target above, not this host's device
    )


def _abstract_eval(a, b, group_sizes, *, kind, out_dtype, num_groups):
    del group_sizes
    if kind == "gmm":
        shape = (a.shape[0], b.shape[2])  # [M, N]
    elif kind == "gmm_t":
        shape = (a.shape[0], b.shape[1])  # [M, K]
    else:
        shape = (num_groups, a.shape[1], b.shape[1])  # [G, K, N]
    return jax.core.ShapedArray(shape, out_dtype)


def _lowering(ctx, a, b, group_sizes, *, platform, kind, out_dtype, num_groups):
    del num_groups
    platform = platform or (ctx.platforms or ctx.module_context.platforms)[0]
    devices = [d for d in target_devices(ctx) if lowering_platform(d) == platform]
    device = devices[0] if devices else None
    fn = functools.partial(
        _product, kind=kind, out_dtype=out_dtype, impl=implementation(device, platform)
    )
    # tokamax reads the TPU generation / GPU compute capability from the default device.
    target = jax.default_device(device) if device is not None else contextlib.nullcontext()
    with target:
        return mlir.lower_fun(fn, multiple_results=False)(ctx, a, b, group_sizes)


ragged_dot_p = Primitive("moe_jax_tokamax_ragged_dot")
ragged_dot_p.def_abstract_eval(_abstract_eval)
ragged_dot_p.def_impl(
    lambda *args, **params: jax.jit(functools.partial(ragged_dot_p.bind, **params))(*args)
)
register_target_lowering(ragged_dot_p, _lowering, ("cpu", "tpu", "cuda", "rocm"))


def _bind(kind, a, b, group_sizes, out_dtype, num_groups):
    return ragged_dot_p.bind(
        a, b, group_sizes, kind=kind, out_dtype=np.dtype(out_dtype), num_groups=num_groups
    )


def _rows_real(group_sizes, num_rows: int):
    """[R, 1] bool: the row belongs to a group (rows past sum(group_sizes) do not)."""
    return (jnp.arange(num_rows) < jnp.sum(group_sizes))[:, None]


@jax.custom_vjp
def _gmm(lhs, rhs, group_sizes):
    out = _bind("gmm", lhs, rhs, group_sizes, jnp.result_type(lhs, rhs), rhs.shape[0])  # [M, N]
    return jnp.where(_rows_real(group_sizes, lhs.shape[0]), out, jnp.zeros((), out.dtype))


def _gmm_fwd(lhs, rhs, group_sizes):
    return _gmm(lhs, rhs, group_sizes), (lhs, rhs, group_sizes)


def _gmm_bwd(res, grad):
    lhs, rhs, group_sizes = res
    g = rhs.shape[0]
    real = _rows_real(group_sizes, lhs.shape[0])  # [M, 1]
    grad = jnp.where(real, grad, jnp.zeros((), grad.dtype))  # whatever came in past the sum
    d_lhs = _bind("gmm_t", grad, rhs, group_sizes, lhs.dtype, g)  # [M, K]
    d_lhs = jnp.where(real, d_lhs, jnp.zeros((), lhs.dtype))
    d_rhs = _bind("tgmm", lhs, grad, group_sizes, rhs.dtype, g)  # [G, K, N]
    # Empty groups: exactly zero, whatever the kernel wrote (tokamax issue 887).
    d_rhs = jnp.where((group_sizes > 0)[:, None, None], d_rhs, jnp.zeros((), rhs.dtype))
    return d_lhs, d_rhs, None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


def tokamax_gmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """lhs [R, D], rhs [G, D, F], group_sizes [G] -> [R, F] through tokamax.ragged_dot.

    The implementation is chosen when the program is lowered, for its target (see the module
    docstring). Rows past sum(group_sizes) are 0; empty groups get exactly zero weight
    gradient. Differentiable in lhs and rhs."""
    if lhs.ndim != 2 or rhs.ndim != 3 or lhs.shape[1] != rhs.shape[1]:
        raise ValueError(
            f"lhs must be [R, D] and rhs [G, D, F] with the same D; got {lhs.shape}, {rhs.shape}"
        )
    if group_sizes.shape != (rhs.shape[0],) or not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise ValueError(
            f"group_sizes must be integer of shape ({rhs.shape[0]},); got "
            f"{group_sizes.dtype}{list(group_sizes.shape)}"
        )
    return _gmm(lhs, rhs, group_sizes.astype(jnp.int32))
