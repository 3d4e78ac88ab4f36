"""The layer core: pure functions on arrays, no parameters, no modules.

config (MoEConfig) -> routing (routers -> Routing) -> losses -> dispatch (sort, drop nulls,
gather, combine) -> stats (routing statistics, the aux dict) and flops (analytic FLOPs).
Imports nothing else from moe_jax.
"""

from moe_jax.core import config, dispatch, flops, losses, routing, stats, validate
from moe_jax.core.config import MoEConfig
from moe_jax.core.routing import Routing

__all__ = [
    "MoEConfig",
    "Routing",
    "config",
    "dispatch",
    "flops",
    "losses",
    "routing",
    "stats",
    "validate",
]
