"""Parameter and FLOPs accounting for a ModelConfig (analytic; forward pass, multiply-add = 2).

- total_params: every parameter (embeddings, vision encoder, blocks, head).
- active_params_per_token: total minus the experts a token does not use in expectation:
  each MoE layer counts E[K] of its N experts (moe_jax.core.flops.expected_real_experts).
- flops_per_token: one decoder token (vision or text) through the blocks, with attention
  scores/values at the mean causal context (S+1)/2 of a full sequence S = P + max_len;
  text tokens add the LM head (flops_per_text_token). The vision encoder is per image.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from moe_jax.core import flops

if TYPE_CHECKING:
    from moe_jax.model.transformer import ModelConfig


def _ffn_params(d: int, f: int, activation: str = "swiglu") -> int:
    return d * f * (3 if activation == "swiglu" else 2)


def _attn_params(cfg: ModelConfig, n_heads: int, n_kv: int, decoder: bool = True) -> int:
    """Projection weights (and the decoder's optional biases) of one attention layer."""
    if not decoder:  # the vit encoder: head_dim = d_model / n_heads, no biases
        return cfg.d_model * (cfg.d_model // cfg.n_heads) * (2 * n_heads + 2 * n_kv)
    hd = cfg.head_dim
    bias = hd * (n_heads + 2 * n_kv) * cfg.qkv_bias + cfg.d_model * cfg.attn_out_bias
    return cfg.d_model * hd * (2 * n_heads + 2 * n_kv) + bias


def expert_params(cfg: ModelConfig) -> int:
    """Parameters of one routed expert."""
    m = cfg.moe
    n = _ffn_params(m.d_model, m.d_ff, m.activation)
    return n + (m.d_ff + m.d_model if m.expert_bias else 0)


def moe_layer_params(cfg: ModelConfig) -> int:
    m = cfg.moe
    shared = _ffn_params(m.d_model, m.shared_d_ff, m.activation) if m.shared_d_ff else 0
    return m.d_model * m.num_router_logits + m.num_experts * expert_params(cfg) + shared


def vision_params(cfg: ModelConfig) -> int:
    if cfg.mode != "vlm":
        return 0
    d = cfg.d_model
    n = (cfg.patch_size**2 * cfg.channels + 1) * d + cfg.num_patches * d  # proj + pos
    if cfg.vision_encoder == "mlp":
        return n + d * d + d
    per_block = (
        2 * d + _attn_params(cfg, cfg.n_heads, cfg.n_heads, False) + _ffn_params(d, cfg.d_ff)
    )
    return n + cfg.vision_layers * per_block + d


def vision_flops_per_image(cfg: ModelConfig) -> float:
    if cfg.mode != "vlm":
        return 0.0
    d, p = cfg.d_model, cfg.num_patches
    f = 2.0 * p * cfg.patch_size**2 * cfg.channels * d
    if cfg.vision_encoder == "mlp":
        return f + 2.0 * p * d * d
    per_block = (
        2.0 * p * (_attn_params(cfg, cfg.n_heads, cfg.n_heads, False) + _ffn_params(d, cfg.d_ff))
    )
    per_block += 4.0 * p * p * cfg.n_heads * cfg.head_dim  # scores + values, full context
    return f + cfg.vision_layers * per_block


def model_summary(cfg: ModelConfig) -> dict:
    """Parameter counts and expected forward FLOPs; see the module docstring."""
    d, v = cfg.d_model, cfg.vocab_size
    n_moe = len(cfg.moe_layers)
    n_dense = cfg.n_layers - n_moe
    attn = _attn_params(cfg, cfg.n_heads, cfg.n_kv_heads)
    embed = v * d
    head = 0 if cfg.tie_embeddings else d * v
    dense_ffn = _ffn_params(d, cfg.d_ff)
    blocks = cfg.n_layers * (attn + 2 * d) + n_dense * dense_ffn
    moe_total = n_moe * moe_layer_params(cfg) if n_moe else 0
    total = embed + head + vision_params(cfg) + blocks + moe_total + d  # + final norm
    inactive = 0.0
    moe_flops = 0.0
    e_k = 0.0
    if n_moe:
        moe_cfg = cfg.layer_moe_config
        e_k = flops.expected_real_experts(moe_cfg)
        inactive = n_moe * (moe_cfg.num_experts - e_k) * expert_params(cfg)
        moe_flops = flops.moe_flops_per_token(moe_cfg)
    seq = cfg.num_patches + cfg.max_len
    ctx = (seq + 1) / 2.0
    attn_flops = cfg.n_layers * (2.0 * attn + 4.0 * ctx * cfg.n_heads * cfg.head_dim)
    ffn_flops = n_dense * 2.0 * dense_ffn + n_moe * moe_flops
    per_token = attn_flops + ffn_flops
    head_flops = 2.0 * d * v
    vis = vision_flops_per_image(cfg)
    return {
        "total_params": int(total),
        "embedding_params": int(embed + head),
        "vision_params": int(vision_params(cfg)),
        "moe_layers": list(cfg.moe_layers),
        "moe_layer_params": int(moe_layer_params(cfg)) if n_moe else 0,
        "expected_real_experts": e_k,
        "active_params_per_token": float(total - inactive),
        "attention_flops_per_token": attn_flops,
        "ffn_flops_per_token": ffn_flops,
        "flops_per_token": per_token,
        "flops_per_text_token": per_token + head_flops,
        "vision_flops_per_image": vis,
        "flops_per_sequence": seq * per_token + cfg.max_len * head_flops + vis,
        "sequence_len": seq,
    }


def format_summary(cfg: ModelConfig, summary: dict | None = None) -> str:
    """Printable start-up summary."""
    s = model_summary(cfg) if summary is None else summary
    moe = cfg.moe if s["moe_layers"] else None
    route = (
        f"{moe.router} N={moe.num_experts} K={moe.top_k} M={moe.num_nulls} "
        f"E[K]={s['expected_real_experts']:.3g} in blocks {s['moe_layers']}"
        if moe
        else "dense"
    )
    return "\n".join(
        [
            f"model: {cfg.mode} D={cfg.d_model} layers={cfg.n_layers} heads={cfg.n_heads}/"
            f"{cfg.n_kv_heads} V={cfg.vocab_size} seq={s['sequence_len']} ({route})",
            f"  params: total {s['total_params']:,}  active/token "
            f"{s['active_params_per_token']:,.0f}  embeddings {s['embedding_params']:,}  "
            f"vision {s['vision_params']:,}",
            f"  FLOPs/token: {s['flops_per_token']:.4g} (attention {s['attention_flops_per_token']:.4g},"
            f" FFN/MoE {s['ffn_flops_per_token']:.4g}); text token +head "
            f"{s['flops_per_text_token']:.4g}; per sequence {s['flops_per_sequence']:.4g}",
        ]
    )
