"""FLOPs accounting for MoE layers (multiply-add = 2 FLOPs, forward pass only).

Expected real experts per token E[K]:
- null: K * rho (a soft target met on average through the balance loss);
- topk / switch: K;
- threshold: data-dependent; the capacity bound min(N, gamma) is reported as the upper bound.
  At t = 1.0 every expert is selected, so min(N, gamma) is the value itself: N when gamma >= N,
  i.e. dense compute (XMoE's dense-to-sparse recipe trains this way and lowers t_eval at
  inference; the recipe is our reconstruction of the paper's procedure, see moe_jax.train.sweep);
- expert_choice: the capacity factor c (N experts each take T*c/N tokens).
"""

from __future__ import annotations

from fractions import Fraction

from moe_jax.core.config import MoEConfig, null_count_from_rho


def ffn_flops_per_token(d_model: int, d_ff: int, activation: str = "swiglu") -> float:
    """One dense FFN applied to one token: 2*D*F per matrix, 3 matrices for SwiGLU, 2 for GELU."""
    return 2.0 * d_model * d_ff * (3 if activation == "swiglu" else 2)


def router_flops_per_token(cfg: MoEConfig) -> float:
    return 2.0 * cfg.d_model * cfg.num_router_logits


def expected_real_experts(cfg: MoEConfig, *, train: bool = True) -> float:
    """E[K], the expected number of real experts a token is computed by (train or eval knobs).

    Threshold router: N at t = 1.0 (dense compute), capped by the capacity bound gamma; below
    t = 1.0 the same min(N, gamma) is only an upper bound (measure it: MoE aux real_per_token).

    Args:
        cfg: the layer.
        train: use the training knobs (False: threshold_eval / capacity_factor_eval).
    """
    if cfg.router == "null":
        return cfg.top_k * cfg.density
    cf = cfg.capacity_for(train=train)
    if cfg.router in ("topk", "switch"):
        return float(cfg.top_k if cf is None else min(cfg.top_k, cf))
    return float(min(cfg.num_experts, cf))


def moe_flops_per_token(
    cfg: MoEConfig, real_per_token: float | None = None, *, train: bool = True
) -> float:
    """Router + E[K] (or a measured real_per_token) experts + shared expert, per token.

    Args:
        cfg: the layer.
        real_per_token: a measured number of real experts per token (MoE aux
            ``real_per_token``) in place of E[K].
        train: E[K] from the training knobs (False: the eval knobs).
    """
    k = expected_real_experts(cfg, train=train) if real_per_token is None else float(real_per_token)
    total = router_flops_per_token(cfg) + k * ffn_flops_per_token(
        cfg.d_model, cfg.d_ff, cfg.activation
    )
    if cfg.shared_d_ff:
        total += ffn_flops_per_token(cfg.d_model, cfg.shared_d_ff, cfg.activation)
    return total


def iso_flop_family(expected_k: float, k_max: int, num_experts: int) -> tuple[float, int]:
    """(rho, M) such that k_max * rho = expected_k: K^{k_max}_rho with M = N(1-rho)/rho.

    Example (N=64, E[K]=2): k_max=2 -> (1.0, 0); 3 -> (2/3, 32); 4 -> (0.5, 64); 8 -> (0.25, 192).

    Args:
        expected_k: E[K], the real experts per token the family keeps.
        k_max: K, the slots per token.
        num_experts: N, the real experts.

    Raises:
        ValueError: k_max < 1, expected_k outside (0, k_max], or M = N(1-ρ)/ρ not an
            integer (naming MoEConfig.rho).
    """
    if k_max < 1:
        raise ValueError(f"k_max={k_max} must be >= 1")
    if not (0 < expected_k <= k_max):
        raise ValueError(f"expected_k={expected_k} must lie in (0, k_max={k_max}]")
    rho = float(Fraction(expected_k).limit_denominator(10_000) / k_max)
    return rho, null_count_from_rho(num_experts, rho)
