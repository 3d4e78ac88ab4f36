"""Models: the decoder-only Transformer (vision-language or text), its layers, parameter and
FLOPs summary, and upcycling of dense FFNs into experts."""

from moe_jax.model import decode, layers, summary, transformer, upcycle
from moe_jax.model.decode import generate
from moe_jax.model.summary import format_summary, model_summary
from moe_jax.model.transformer import (
    Block,
    ModelConfig,
    Transformer,
    cross_entropy,
    forward_with_routing,
    next_token_loss,
)

__all__ = [
    "Block",
    "ModelConfig",
    "Transformer",
    "cross_entropy",
    "decode",
    "format_summary",
    "forward_with_routing",
    "generate",
    "layers",
    "model_summary",
    "next_token_loss",
    "summary",
    "transformer",
    "upcycle",
]
