"""Pallas grouped matmul kernels (TPU Mosaic, Hopper Mosaic GPU, GPU Triton) with a custom VJP.

Standalone: this package never imports moe_jax. Entry points:
- gmm(lhs [R, D], rhs [G, D, F], group_sizes [G]) -> [R, F], rows past sum(group_sizes) = 0.
- tgmm(lhs [R, D], grad [R, F], group_sizes [G]) -> [G, D, F], the weight gradient.
Both are differentiable; see ops.py for the full contract (group windows, dtypes, backends).
The kernel (Mosaic on TPU; Mosaic GPU on H100 / H200, Triton on other NVIDIA GPUs) is chosen
when the program is lowered, for its target (dispatch.py). targets.py builds compile-only TPU / GPU devices for AOT checks. versions.py checks, before
anything else imports jax, that the installed jax is in the supported range.
"""

from kernels_pallas import versions

versions.check_installed()

from kernels_pallas.blocks import (  # noqa: E402
    DEFAULTS,
    GPU_TABLE,
    TABLE,
    BlockSizes,
    default_block_sizes,
    triton_block_sizes,
)
from kernels_pallas.dispatch import (  # noqa: E402
    mosaic_gpu_supported,
    resolve_backend,
    triton_supported,
)
from kernels_pallas.ops import gmm, tgmm  # noqa: E402
from kernels_pallas.reference import gmm_reference, tgmm_reference  # noqa: E402
from kernels_pallas.schedule import Schedule, make_schedule  # noqa: E402

__all__ = [
    "DEFAULTS",
    "GPU_TABLE",
    "TABLE",
    "BlockSizes",
    "Schedule",
    "default_block_sizes",
    "gmm",
    "gmm_reference",
    "make_schedule",
    "mosaic_gpu_supported",
    "resolve_backend",
    "tgmm",
    "tgmm_reference",
    "triton_block_sizes",
    "triton_supported",
]
