"""MoEConfig validation and derived quantities."""

import pytest

from moe_jax import MoEConfig, flops

BASE = dict(d_model=16, d_ff=32, num_experts=64)


@pytest.mark.parametrize("rho,m", [(0.5, 64), (0.25, 192), (2 / 3, 32), (1 / 6, 320), (1.0, 0)])
def test_null_count_from_rho(rho, m):
    cfg = MoEConfig(**BASE, router="null", rho=rho, top_k=2)
    assert cfg.num_nulls == m
    assert cfg.density == pytest.approx(rho)
    assert cfg.num_router_logits == 65


@pytest.mark.parametrize(
    "kw,field",
    [
        (dict(router="null", rho=0.3), "rho"),  # M = 149.33, not an integer
        (dict(router="null", rho=0.0), "rho"),
        (dict(router="null", rho=1.5), "rho"),
        (dict(router="null"), "rho"),  # neither rho nor M
        (dict(router="null", rho=0.5, num_null_experts=64), "rho"),  # both
        (dict(router="null", num_null_experts=-1), "num_null_experts"),
        (dict(router="null", rho=0.5, capacity_factor=2.0), "capacity_factor"),
        (dict(router="topk", rho=0.5), "rho"),
        (dict(router="topk", top_k=65), "top_k"),
        (dict(router="null", num_null_experts=1, top_k=66), "top_k"),
        (dict(top_k=0), "top_k"),
        (dict(router="switch", top_k=2), "top_k"),
        (dict(router="threshold", threshold=0.0), "threshold"),
        (dict(router="threshold", threshold=1.2), "threshold"),
        (dict(router="threshold", threshold_eval=-0.1), "threshold_eval"),
        (dict(router="threshold", capacity_factor=0.0), "capacity_factor"),
        (dict(router="threshold", capacity_factor_eval=-1.0), "capacity_factor_eval"),
        (dict(router="bogus"), "router"),
        (dict(activation="relu"), "activation"),
        (dict(backend="cuda"), "backend"),
        (dict(lb_scope="world"), "lb_scope"),
        (dict(router_dtype="int8"), "router_dtype"),
        (dict(shared_d_ff=-4), "shared_d_ff"),
        (dict(d_model=0), "d_model"),
        (dict(router="expert_choice"), "router"),  # causal by default: refused
    ],
)
def test_bad_fields_name_the_field(kw, field):
    with pytest.raises(ValueError, match=rf"MoEConfig\.{field}="):
        MoEConfig(**{**BASE, **kw})


def test_expert_choice_allowed_when_not_causal():
    assert MoEConfig(**BASE, router="expert_choice", causal=False).router == "expert_choice"
    assert MoEConfig(**BASE, router="expert_choice", allow_noncausal=True).causal


def test_xmoe_capacity():
    cfg = MoEConfig(d_model=8, d_ff=8, num_experts=64, router="threshold", capacity_factor=8.0)
    assert cfg.expert_capacity(16384) == 2048  # ceil(8 * 16384 / 64)
    assert cfg.expert_capacity(8) == 4  # min_capacity
    cfg_eval = cfg.replace(capacity_factor_eval=1.0)
    assert cfg_eval.expert_capacity(16384, train=False) == 256
    assert cfg_eval.expert_capacity(16384, train=True) == 2048


def test_iso_flop_family():
    assert flops.iso_flop_family(2, 2, 64) == (1.0, 0)
    rho, m = flops.iso_flop_family(2, 3, 64)
    assert m == 32 and rho == pytest.approx(2 / 3)
    assert flops.iso_flop_family(2, 4, 64) == (0.5, 64)
    assert flops.iso_flop_family(2, 8, 64) == (0.25, 192)
    assert flops.iso_flop_family(2, 12, 64)[1] == 320
    with pytest.raises(ValueError):
        flops.iso_flop_family(3, 2, 64)


def test_iso_flop_expected_flops_agree():
    """K^2_1.0, K^4_0.5 and K^8_0.25 spend the same expected FLOPs per token."""
    fam = [
        MoEConfig(**BASE, router="null", top_k=k, rho=rho)
        for k, rho in [(2, 1.0), (4, 0.5), (8, 0.25)]
    ]
    vals = [flops.moe_flops_per_token(c) for c in fam]
    expected = 2 * 16 * 65 + 2 * (2 * 16 * 32 * 3)  # router + E[K]=2 SwiGLU experts
    assert vals == pytest.approx([expected] * 3)
    # top-k K=2 spends the same on experts, slightly less on the router (no null column).
    topk = MoEConfig(**BASE, router="topk", top_k=2)
    assert flops.moe_flops_per_token(topk) == pytest.approx(expected - 2 * 16)
    gelu = MoEConfig(**BASE, router="topk", top_k=2, activation="gelu", shared_d_ff=8)
    assert flops.moe_flops_per_token(gelu) == pytest.approx(
        2 * 16 * 64 + 2 * (2 * 16 * 32 * 2) + 2 * 16 * 8 * 2
    )
