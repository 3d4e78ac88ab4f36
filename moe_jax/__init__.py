"""moe_jax: Mixture-of-Experts layers for JAX/Flax NNX with null experts and XMoE routing."""

from moe_jax import dispatch, experts, flops, losses, routing
from moe_jax.config import MoEConfig
from moe_jax.experts import register_backend
from moe_jax.moe import FFN, MoE
from moe_jax.routing import Routing

__all__ = [
    "FFN",
    "MoE",
    "MoEConfig",
    "Routing",
    "dispatch",
    "experts",
    "flops",
    "losses",
    "register_backend",
    "routing",
]
__version__ = "0.1.0"
