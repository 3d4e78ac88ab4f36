"""moe_jax: Mixture-of-Experts layers for JAX/Flax NNX with null experts and XMoE routing.

The house (each package imports only the ones before it; tests/test_layout.py holds it):
core -> experts -> parallel -> moe -> model -> data -> train. kernels_pallas is standalone.
"""

import kernels_pallas  # noqa: F401  (first: checks the installed jax version, see versions.py)
from moe_jax.core import dispatch, flops, losses, routing, stats
from moe_jax.core.config import MoEConfig
from moe_jax.core.routing import Routing
from moe_jax.experts import register_backend
from moe_jax.moe import FFN, MoE, calibrate_null

__all__ = [
    "calibrate_null",
    "FFN",
    "MoE",
    "MoEConfig",
    "Routing",
    "dispatch",
    "flops",
    "losses",
    "register_backend",
    "routing",
    "stats",
]
__version__ = "0.1.0"
