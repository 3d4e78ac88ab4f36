"""Dense -> MoE upcycling: split every dense SwiGLU FFN into fine-grained experts.

Weight layout (what to map an external checkpoint onto). A dense block's FFN is
    y = (silu(x @ w_gate) * (x @ w_in)) @ w_out,  w_in, w_gate: [D, F],  w_out: [F, D]
stored at blocks/{i}/ffn/{w_in,w_gate,w_out}/kernel (nnx.Linear kernels, no bias). Because
SwiGLU acts on each hidden unit separately, the FFN is the sum of g slices of F/g hidden units:
    slice s: w_in[:, s*Fe:(s+1)*Fe], w_gate[:, same], w_out[s*Fe:(s+1)*Fe, :],  Fe = F / g.
The MoE layer stores stacked experts blocks/{i}/ffn/{w_in, w_gate} [N, D, Fe] and
blocks/{i}/ffn/w_out [N, Fe, D]. Expert e holds slice e % g (replica e // g), so N must be a
multiple of g and moe.d_ff must equal F / g. The router blocks/{i}/ffn/router/kernel [D, N+1]
(column N is the null logit for router="null"; [D, N] otherwise) is freshly initialized, as
is a shared expert if moe.shared_d_ff > 0. Every other parameter (embeddings, attention,
norms, vision encoder, head) is copied unchanged.

Re-initialization (symmetry breaking between replicas, Drop-Upcycling style): in every expert,
round(reinit_fraction * Fe) hidden units chosen at random (independently per expert) get fresh
w_in / w_gate columns and w_out rows drawn from a normal with the mean and standard deviation of
the dense matrix they replace; the paper re-initializes 30% (reinit_fraction=0.3).

Scale: a router whose combine weights sum to 1 over the selected experts averages slices
instead of adding them; output_scale multiplies w_out (output_scale=g with every expert selected
at uniform weight reproduces the dense FFN exactly).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax.core.config import MoEConfig
from moe_jax.core.validate import checker
from moe_jax.model.stack import to_layout, unstack_params
from moe_jax.model.transformer import ModelConfig, Transformer


def upcycle_ffn(
    w_in: jax.Array,
    w_gate: jax.Array,
    w_out: jax.Array,
    *,
    num_experts: int,
    granularity: int,
    reinit_fraction: float = 0.3,
    rng: jax.Array,
    output_scale: float = 1.0,
) -> dict[str, jax.Array]:
    """Dense SwiGLU kernels w_in/w_gate [D, F], w_out [F, D] -> expert stacks
    {"w_in", "w_gate": [N, D, F/g], "w_out": [N, F/g, D]} (layout in the module docstring)."""
    d, f = w_in.shape
    g, n = granularity, num_experts
    fe = f // g
    slice_of = jnp.arange(n) % g  # [N] expert e holds slice e % g
    e_in = w_in.reshape(d, g, fe).transpose(1, 0, 2)[slice_of]  # [N, D, Fe]
    e_gate = w_gate.reshape(d, g, fe).transpose(1, 0, 2)[slice_of]  # [N, D, Fe]
    e_out = w_out.reshape(g, fe, d)[slice_of]  # [N, Fe, D]
    n_re = round(reinit_fraction * fe)
    if n_re > 0:
        k_pick, k_in, k_gate, k_out = jax.random.split(rng, 4)
        scores = jax.random.uniform(k_pick, (n, fe))  # random subset of units per expert
        rank = jnp.argsort(jnp.argsort(scores, axis=1), axis=1)
        fresh = rank < n_re  # [N, Fe], exactly n_re units per expert

        def like(key, w, shape):
            return (jnp.mean(w) + jnp.std(w) * jax.random.normal(key, shape)).astype(w.dtype)

        e_in = jnp.where(fresh[:, None, :], like(k_in, w_in, e_in.shape), e_in)
        e_gate = jnp.where(fresh[:, None, :], like(k_gate, w_gate, e_gate.shape), e_gate)
        e_out = jnp.where(fresh[:, :, None], like(k_out, w_out, e_out.shape), e_out)
    return {"w_in": e_in, "w_gate": e_gate, "w_out": e_out * output_scale}


def _copy_matching(dst: dict, src: dict) -> None:
    """Copy src leaves into dst where the path exists in both with the same shape."""
    for key, value in dst.items():
        if key not in src:
            continue
        if isinstance(value, dict) and isinstance(src[key], dict):
            _copy_matching(value, src[key])
        elif not isinstance(value, dict) and not isinstance(src[key], dict):
            if value.shape == src[key].shape:
                dst[key] = jnp.asarray(src[key], value.dtype)


_check = checker("upcycle")


def upcycle(
    dense: Transformer | nnx.State | dict,
    moe_cfg: MoEConfig,
    granularity: int,
    reinit_fraction: float = 0.3,
    *,
    rng: jax.Array,
    dense_cfg: ModelConfig | None = None,
    moe_every: int = 1,
    output_scale: float = 1.0,
) -> Transformer:
    """A new MoE Transformer from a dense one (a model, or its nnx.Param state / pure dict
    with dense_cfg). Blocks i with (i+1) % moe_every == 0 become MoE blocks.

    Args:
        dense: the dense model, or its parameters (nnx.State or pure dict) with dense_cfg.
        moe_cfg: the MoE layer; d_ff = F = dense d_ff / granularity, num_experts = N a
            multiple of granularity, SwiGLU experts.
        granularity: g, experts cut from each dense FFN before replication to N.
        reinit_fraction: share of each expert's hidden units re-initialized, in [0, 1].
        rng: key for the re-initialized units and the fresh router.
        dense_cfg: the dense model's config, required when ``dense`` is a state.
        moe_every: every n-th block becomes an MoE block.
        output_scale: multiplies the experts' w_out.

    Raises:
        ValueError: a source that is not dense, g not dividing d_ff, moe_cfg.d_ff·g ≠ d_ff,
            N not a multiple of g, non-SwiGLU experts, reinit_fraction outside [0, 1].
    """
    if isinstance(dense, Transformer):
        dense_cfg = dense.cfg
        params = nnx.to_pure_dict(nnx.state(dense, nnx.Param))
    else:
        _check(dense_cfg is not None, "dense_cfg", dense_cfg, "required when passing a state")
        params = nnx.to_pure_dict(dense) if isinstance(dense, nnx.State) else dense
    params = unstack_params(dense_cfg, params)  # either layout in, blocks/{i} here
    f, g = dense_cfg.d_ff, granularity
    _check(not dense_cfg.moe_layers, "dense", "MoE model", "the source model must be dense")
    _check(isinstance(g, int) and g >= 1 and f % g == 0, "granularity", g, f"must divide d_ff={f}")
    _check(
        moe_cfg.d_ff * g == f,
        "moe_cfg.d_ff",
        moe_cfg.d_ff,
        f"must equal d_ff / granularity = {f}/{g}",
    )
    _check(
        moe_cfg.num_experts % g == 0,
        "moe_cfg.num_experts",
        moe_cfg.num_experts,
        f"must be a multiple of granularity={g}",
    )
    _check(moe_cfg.activation == "swiglu", "moe_cfg.activation", moe_cfg.activation, "'swiglu'")
    _check(0.0 <= reinit_fraction <= 1.0, "reinit_fraction", reinit_fraction, "in [0, 1]")
    cfg = dense_cfg.replace(moe=moe_cfg, moe_every=moe_every)
    k_model, k_ffn = jax.random.split(rng)
    model = Transformer(cfg, rngs=nnx.Rngs(k_model))
    state = nnx.state(model, nnx.Param)
    new = unstack_params(cfg, nnx.to_pure_dict(state))
    _copy_matching(new, params)
    for i, key in zip(cfg.moe_layers, jax.random.split(k_ffn, max(len(cfg.moe_layers), 1))):
        src = params["blocks"][i]["ffn"]
        experts = upcycle_ffn(
            src["w_in"]["kernel"],
            src["w_gate"]["kernel"],
            src["w_out"]["kernel"],
            num_experts=moe_cfg.num_experts,
            granularity=g,
            reinit_fraction=reinit_fraction,
            rng=key,
            output_scale=output_scale,
        )
        dst = new["blocks"][i]["ffn"]
        for name, value in experts.items():
            dst[name] = value.astype(dst[name].dtype)
    nnx.replace_by_pure_dict(state, to_layout(cfg, new))
    nnx.update(model, state)
    return model
