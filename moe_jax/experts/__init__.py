"""Expert FFNs behind one entry point (routed_ffn) over a backend registry.

Built-in backends: "dense" (reference: every expert on every row), "ragged"
(jax.lax.ragged_dot), "tiled" (fused XLA loop over the real row tiles: gather, FFN, combine;
the fast path on CPU), "tiled_unfused" (the same tiles as separate grouped matmuls; kept for
benchmarks), "pallas" (kernels_pallas, imported on first use), "tokamax" (tokamax.ragged_dot;
the optional [tokamax] extra, imported on first use). register_backend adds more.
"""

from moe_jax.experts import fused_xla, gmm_xla, reference
from moe_jax.experts.ffn import ExpertParams, grouped_ffn, routed_ffn
from moe_jax.experts.registry import (
    Backend,
    GroupedMatmul,
    get_backend,
    register_backend,
    resolve_backend,
)

register_backend("dense", reference.dense_gmm)
register_backend("ragged", reference.ragged_gmm)
register_backend("tiled", fused_xla.fused_moe_ffn, fused=True)
register_backend("tiled_unfused", gmm_xla.gmm)

__all__ = [
    "Backend",
    "ExpertParams",
    "GroupedMatmul",
    "fused_xla",
    "get_backend",
    "gmm_xla",
    "grouped_ffn",
    "reference",
    "register_backend",
    "resolve_backend",
    "routed_ffn",
]
