"""Backend "pallas": kernels_pallas.gmm (Mosaic on TPU, Mosaic GPU on H100/H200, Triton on other
GPUs) as a grouped matmul.

Imported by the registry the first time "pallas" is asked for (an ImportError there makes the
backend unavailable, not the library). On CPU the kernels run in Pallas interpret mode (slow;
for tests). They return exact zeros for rows past sum(group_sizes), and the routed FFN masks
those rows again before the combine.
"""

from __future__ import annotations

import jax

import kernels_pallas


def pallas_gmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """lhs [R, D], rhs [G, D, F], group_sizes [G] -> [R, F] through the Pallas kernels.

    The kernel family is chosen when the program is lowered, for its target (Mosaic for TPU,
    Triton for NVIDIA), also when this host compiles for devices it does not have; a CPU
    target runs the kernel in interpret mode."""
    return kernels_pallas.gmm(lhs, rhs, group_sizes, interpret="auto")


def pallas_gmm_or_reference(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """The branch of backend="auto" (auto.py): the native kernel where one compiles, else the
    kernels' jnp reference (dense; never an interpret-mode kernel). It is lowered for every
    target beside the XLA loop, and XLA drops whichever branch the target does not pick."""
    return kernels_pallas.gmm(lhs, rhs, group_sizes, interpret=False, fallback="reference")
