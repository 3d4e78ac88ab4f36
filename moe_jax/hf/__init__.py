"""Hugging Face checkpoints in and out: read Llama / Qwen2 / Mistral checkpoints into the
moe_jax Transformer (load), write trained top-k MoE models as Mixtral checkpoints and any
moe_jax model in its own safetensors format (export). Files go through the safetensors package
(no torch). Imports model and data only."""

from moe_jax.hf import config, export, load, safetensors, upcycle
from moe_jax.hf.config import UnsupportedCheckpointError, model_config, read_config
from moe_jax.hf.export import (
    UnsupportedExportError,
    export_mixtral,
    load_native,
    save_native,
)
from moe_jax.hf.load import load_model, weight_map
from moe_jax.hf.upcycle import upcycle_checkpoint

__all__ = [
    "UnsupportedCheckpointError",
    "UnsupportedExportError",
    "config",
    "export",
    "export_mixtral",
    "load",
    "load_model",
    "load_native",
    "model_config",
    "read_config",
    "safetensors",
    "save_native",
    "upcycle",
    "upcycle_checkpoint",
    "weight_map",
]
