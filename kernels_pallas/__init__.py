"""Pallas grouped matmul kernels (TPU Mosaic and GPU Triton) with a custom VJP.

Standalone: this package never imports moe_jax. Entry points:
- gmm(lhs [R, D], rhs [G, D, F], group_sizes [G]) -> [R, F], rows past sum(group_sizes) = 0.
- tgmm(lhs [R, D], grad [R, F], group_sizes [G]) -> [G, D, F], the weight gradient.
Both are differentiable; see ops.py for the full contract (group windows, dtypes, backends).
"""

from kernels_pallas.blocks import DEFAULTS, TABLE, BlockSizes, default_block_sizes
from kernels_pallas.ops import gmm, resolve_backend, tgmm
from kernels_pallas.reference import gmm_reference, tgmm_reference
from kernels_pallas.schedule import Schedule, make_schedule

__all__ = [
    "DEFAULTS",
    "TABLE",
    "BlockSizes",
    "Schedule",
    "default_block_sizes",
    "gmm",
    "gmm_reference",
    "make_schedule",
    "resolve_backend",
    "tgmm",
    "tgmm_reference",
]
