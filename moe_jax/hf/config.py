"""Hugging Face `config.json` of the Llama family -> ModelConfig, refusing what it cannot match.

Read: LlamaForCausalLM, Qwen2ForCausalLM and MistralForCausalLM (model_type llama / qwen2 /
mistral). Mapped fields: vocab_size, hidden_size, intermediate_size, num_hidden_layers,
num_attention_heads, num_key_value_heads (GQA), head_dim, rms_norm_eps, tie_word_embeddings,
max_position_embeddings, RoPE theta and scaling (`rope_parameters`, or the older `rope_theta` +
`rope_scaling`; types default, linear and llama3), attention biases (Llama `attention_bias`:
q/k/v/o; Qwen2: q/k/v always) and Mistral's `sliding_window`.

Refused, with an error naming the field, before any tensor is read: other architectures,
hidden_act other than silu, mlp_bias, quantization_config, other RoPE types (dynamic, yarn,
longrope, ...) or a RoPE attention_factor != 1, Qwen2's use_sliding_window, and per-layer
attention types that mix sliding and full attention.
"""

from __future__ import annotations

import json
import os

from moe_jax.model import ModelConfig

ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "MistralForCausalLM": "mistral",
}
ROPE_TYPES = ("default", "linear", "llama3")
CONFIG = "config.json"


class UnsupportedCheckpointError(ValueError):
    """The checkpoint's architecture or one of its config fields cannot be read exactly."""


# config.json fields the mapping cannot do without.
REQUIRED = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
)


def _refuse(path: str, field: str, value, why: str) -> UnsupportedCheckpointError:
    return UnsupportedCheckpointError(f"{path}: config field {field}={value!r} {why}")


def read_config(directory: str) -> dict:
    """The parsed config.json of a checkpoint directory.

    Args:
        directory: the checkpoint folder.

    Raises:
        FileNotFoundError: the folder has no config.json.
    """
    path = os.path.join(directory, CONFIG)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory}: no {CONFIG} (not a Hugging Face checkpoint)")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def architecture(hf: dict, where: str = CONFIG) -> str:
    """The supported architecture name of a config, else UnsupportedCheckpointError."""
    archs = hf.get("architectures") or []
    if len(archs) != 1 or archs[0] not in ARCHITECTURES:
        raise _refuse(
            where,
            "architectures",
            archs,
            f"is not supported: expected one of {list(ARCHITECTURES)}",
        )
    want = ARCHITECTURES[archs[0]]
    if hf.get("model_type", want) != want:
        raise _refuse(where, "model_type", hf.get("model_type"), f"does not match {archs[0]}")
    return archs[0]


def _rope(hf: dict, where: str) -> dict:
    """ModelConfig RoPE fields from rope_parameters (or rope_theta + rope_scaling)."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    field = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
    theta = params.get("rope_theta", hf.get("rope_theta", 10_000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise _refuse(where, f"{field}.rope_type", kind, f"is not supported: one of {ROPE_TYPES}")
    if params.get("attention_factor") not in (None, 1, 1.0):
        raise _refuse(
            where, f"{field}.attention_factor", params["attention_factor"], "is not supported"
        )
    out = {"rope_theta": float(theta)}
    if kind == "linear":
        out.update(rope_scaling="linear", rope_factor=float(params["factor"]))
    elif kind == "llama3":
        out.update(
            rope_scaling="llama3",
            rope_factor=float(params["factor"]),
            rope_low_freq_factor=float(params["low_freq_factor"]),
            rope_high_freq_factor=float(params["high_freq_factor"]),
            rope_original_max_len=int(params["original_max_position_embeddings"]),
        )
    return out


def _sliding_window(hf: dict, arch: str, where: str) -> int | None:
    layer_types = hf.get("layer_types")
    if layer_types and len(set(layer_types)) > 1:
        raise _refuse(
            where, "layer_types", sorted(set(layer_types)), "mixes attention kinds (unsupported)"
        )
    if arch == "Qwen2ForCausalLM":
        if hf.get("use_sliding_window"):
            raise _refuse(where, "use_sliding_window", True, "is not supported for Qwen2")
        return None
    if arch == "MistralForCausalLM":
        window = hf.get("sliding_window")
        if layer_types and layer_types[0] == "full_attention":
            return None
        return None if window is None else int(window)
    return None


def model_config(
    hf: dict,
    *,
    dtype: str = "float32",
    param_dtype: str | None = None,
    where: str = CONFIG,
) -> ModelConfig:
    """The dense text ModelConfig (mode lm) equal to a Hugging Face config (module docstring).

    Args:
        hf: the parsed config.json (read_config).
        dtype: compute dtype, "float32" or "bfloat16".
        param_dtype: parameter dtype (default = dtype).
        where: the file named in error messages.

    Raises:
        UnsupportedCheckpointError: another architecture, a required field missing, or a
            field this reader cannot reproduce exactly (hidden_act other than silu, mlp_bias,
            quantization, other RoPE types, mixed sliding and full attention), named.
    """
    arch = architecture(hf, where)
    for field in REQUIRED:
        if hf.get(field) is None:
            raise _refuse(where, field, None, "is missing (every Llama / Qwen2 / Mistral has it)")
    if hf.get("hidden_act", "silu") != "silu":
        raise _refuse(where, "hidden_act", hf["hidden_act"], "is not supported: only silu")
    for field in ("mlp_bias", "quantization_config"):
        if hf.get(field):
            raise _refuse(where, field, hf[field], "is not supported")
    bias = bool(hf.get("attention_bias", False))
    qkv_bias = True if arch == "Qwen2ForCausalLM" else bias
    out_bias = False if arch == "Qwen2ForCausalLM" else bias
    heads = int(hf["num_attention_heads"])
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    return ModelConfig(
        vocab_size=int(hf["vocab_size"]),
        d_model=int(hf["hidden_size"]),
        n_layers=int(hf["num_hidden_layers"]),
        n_heads=heads,
        n_kv_heads=int(hf.get("num_key_value_heads") or heads),
        d_ff=int(hf["intermediate_size"]),
        moe=None,
        moe_every=0,
        mode="lm",
        max_len=int(hf.get("max_position_embeddings", 4096)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        dtype=dtype,
        param_dtype=param_dtype or dtype,
        head_dim=int(head_dim),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        qkv_bias=qkv_bias,
        attn_out_bias=out_bias,
        sliding_window=_sliding_window(hf, arch, where),
        **_rope(hf, where),
    )
