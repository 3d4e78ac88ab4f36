"""The MoE layer as a Flax NNX module: it owns parameters and calls the pure functions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax import dispatch, experts, fused_xla, routing
from moe_jax.config import MoEConfig


class FFN(nnx.Module):
    """Dense FFN (SwiGLU or GELU); used as the shared expert and the dense baseline."""

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        *,
        activation="swiglu",
        rngs,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        use_bias=False,
    ):
        kw = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.activation = activation
        self.w_in = nnx.Linear(d_model, d_ff, **kw)
        self.w_gate = nnx.Linear(d_model, d_ff, **kw) if activation == "swiglu" else None
        self.w_out = nnx.Linear(d_ff, d_model, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.w_in(x)
        h = jax.nn.silu(self.w_gate(x)) * h if self.activation == "swiglu" else jax.nn.gelu(h)
        return self.w_out(h)


def _stats(cfg: MoEConfig, r: routing.Routing, modality: jax.Array | None, axis_name=None):
    """Routing statistics (no gradient). null_ratio = null picks / (T*K)."""
    n = cfg.num_experts
    ids = r.expert_ids
    t, s = ids.shape
    real = (ids < n).astype(jnp.float32)  # [T, S] after drops
    real_tok = jnp.sum(real, axis=1)  # [T]
    load = jnp.zeros((n,), jnp.float32).at[ids.reshape(-1)].add(1.0, mode="drop")  # [N]
    dropped = r.dropped.astype(jnp.float32)
    null_slots = r.null_slots.astype(jnp.float32)
    sums = {
        "tokens": jnp.asarray(t, jnp.float32),
        "real": jnp.sum(real_tok),
        "null": jnp.sum(null_slots),
        "dropped": jnp.sum(dropped),
        "zero": jnp.sum((real_tok == 0).astype(jnp.float32)),
        "load": load,
    }
    if axis_name is not None:
        sums = jax.lax.psum(sums, axis_name)
    tokens = sums["tokens"]
    k_slots = cfg.top_k if cfg.router == "null" else s
    stats = {
        "null_ratio": sums["null"] / (tokens * k_slots),
        "real_per_token": sums["real"] / tokens,
        "zero_compute_fraction": sums["zero"] / tokens,
        "expert_load": sums["load"] / jnp.maximum(jnp.sum(sums["load"]), 1.0),
        "drop_fraction": sums["dropped"] / jnp.maximum(sums["real"] + sums["dropped"], 1.0),
        "num_real": sums["real"],
    }
    if modality is not None:
        nm = cfg.num_modalities
        mod = modality.reshape(-1).astype(jnp.int32)  # [T]
        per = lambda v: jnp.zeros((nm,), jnp.float32).at[mod].add(v, mode="drop")  # noqa: E731
        m_sums = {
            "tokens": per(jnp.ones_like(real_tok)),
            "real": per(real_tok),
            "null": per(null_slots),
        }
        if axis_name is not None:
            m_sums = jax.lax.psum(m_sums, axis_name)
        denom = jnp.maximum(m_sums["tokens"], 1.0)
        stats["modality_tokens"] = m_sums["tokens"]
        stats["null_ratio_by_modality"] = m_sums["null"] / (denom * k_slots)
        stats["real_per_token_by_modality"] = m_sums["real"] / denom
        stats["compute_share_by_modality"] = m_sums["real"] / jnp.maximum(sums["real"], 1.0)
    return jax.tree.map(jax.lax.stop_gradient, stats)


class RouterBias(nnx.Variable):
    """Selection-only router bias (aux-loss-free balancing / null-ratio controller); updated in
    training forward passes, never by the optimizer."""


class MoE(nnx.Module):
    """Mixture-of-Experts FFN. ``y, aux = layer(x, modality=None)``; x [B, L, D] or [T, D].

    Parameters: router.kernel [D, N+1] (null router; column N is the null logit) or [D, N];
    w_in [N, D, F], w_gate [N, D, F] (SwiGLU), w_out [N, F, D], optional b_in/b_out and shared.
    Eval behaviour (threshold_eval / capacity_factor_eval) applies when ``deterministic`` is
    set, by argument or through ``layer.eval()``. With ``parallel`` (an ExpertParallel) the
    layer runs expert-parallel over its mesh (moe_jax.ep).
    """

    def __init__(self, config: MoEConfig, *, rngs: nnx.Rngs, parallel=None):
        cfg = config
        self.config = cfg
        self.parallel = parallel  # moe_jax.parallel.ExpertParallel or None (one device)
        self.deterministic = False
        pdt = jnp.dtype(cfg.param_dtype)
        d, f, n = cfg.d_model, cfg.d_ff, cfg.num_experts
        self.router = nnx.Linear(
            d,
            cfg.num_router_logits,
            use_bias=False,
            param_dtype=jnp.float32,
            dtype=jnp.dtype(cfg.router_dtype),
            kernel_init=nnx.initializers.normal(cfg.router_init_std),
            rngs=rngs,
        )
        init_in = nnx.initializers.variance_scaling(
            1.0, "fan_in", "truncated_normal", in_axis=1, out_axis=2
        )
        self.w_in = nnx.Param(init_in(rngs.params(), (n, d, f), pdt))
        self.w_gate = (
            nnx.Param(init_in(rngs.params(), (n, d, f), pdt))
            if cfg.activation == "swiglu"
            else None
        )
        self.w_out = nnx.Param(init_in(rngs.params(), (n, f, d), pdt))
        self.b_in = nnx.Param(jnp.zeros((n, f), pdt)) if cfg.expert_bias else None
        self.b_out = nnx.Param(jnp.zeros((n, d), pdt)) if cfg.expert_bias else None
        self.selection_bias = (
            RouterBias(jnp.zeros((cfg.num_router_logits,), jnp.float32))
            if cfg.uses_selection_bias
            else None
        )
        self.shared = (
            FFN(
                d,
                cfg.shared_d_ff,
                activation=cfg.activation,
                rngs=rngs,
                dtype=jnp.dtype(cfg.dtype),
                param_dtype=pdt,
            )
            if cfg.shared_d_ff > 0
            else None
        )

    def __call__(
        self, x: jax.Array, modality: jax.Array | None = None, *, deterministic: bool | None = None
    ):
        cfg = self.config
        if x.ndim not in (2, 3) or x.shape[-1] != cfg.d_model:
            raise ValueError(
                f"MoE input must be [B, L, {cfg.d_model}] or [T, {cfg.d_model}], got {x.shape}"
            )
        if modality is not None and modality.shape != x.shape[:-1]:
            raise ValueError(f"modality ids must have shape {x.shape[:-1]}, got {modality.shape}")
        deterministic = self.deterministic if deterministic is None else deterministic
        if self.parallel is not None:
            from moe_jax import ep  # expert parallelism: one shard_map over the mesh

            return ep.ep_forward(self, x, modality, deterministic)
        lead = x.shape[:-1]
        xt = x.reshape(-1, cfg.d_model)  # [T, D]
        t = xt.shape[0]
        axis = cfg.lb_axis_name if cfg.lb_scope == "global" else None

        with jax.named_scope("route"):
            logits = self.router(xt.astype(jnp.dtype(cfg.router_dtype)))  # [T, N(+1)]
            bias = None if self.selection_bias is None else self.selection_bias[...]
            r = routing.route(
                logits, cfg, train=not deterministic, axis_name=axis, selection_bias=bias
            )
        y = self._routed(xt, r, t, train=not deterministic)
        if self.shared is not None:
            with jax.named_scope("shared_expert"):
                y = y + self.shared(xt).astype(y.dtype)
        aux = {
            "lb_loss": r.lb_loss,
            "z_loss": r.z_loss,
            "aux_loss": cfg.effective_lb_coef * r.lb_loss + cfg.z_coef * r.z_loss,
            **_stats(cfg, r, modality, axis),
        }
        self._update_selection_bias(aux, deterministic)
        return y.reshape(*lead, cfg.d_model).astype(x.dtype), aux

    def _update_selection_bias(self, aux: dict, deterministic: bool) -> None:
        """After a training forward pass, move the selection bias one step (see
        routing.update_selection_bias). Functional training loops must carry the updated
        RouterBias state out of the step (it is not a Param)."""
        cfg = self.config
        if self.selection_bias is None or deterministic:
            return
        aux["null_bias"] = self.selection_bias[...][-1] if cfg.router == "null" else jnp.zeros(())
        self.selection_bias[...] = routing.update_selection_bias(
            self.selection_bias[...],
            expert_load=aux["expert_load"],
            null_ratio=aux["null_ratio"],
            target_null_ratio=1.0 - cfg.density,
            expert_rate=cfg.bias_update_rate,
            null_rate=cfg.null_bias_update_rate,
        )

    def _routed(self, xt: jax.Array, r: routing.Routing, t: int, *, train: bool) -> jax.Array:
        cfg = self.config
        cdt = jnp.dtype(cfg.dtype)
        cap = cfg.expert_capacity(t, train=train)
        max_rows = (
            None
            if cfg.router in ("null", "topk", "switch") or cap is None
            else cfg.num_experts * cap
        )
        with jax.named_scope("dispatch"):
            plan = dispatch.make_plan(r.expert_ids, r.weights, cfg.num_experts, max_rows)
        if experts.resolve_backend(cfg.backend) == "tiled":
            with jax.named_scope("experts_fused"):
                return self._fused_experts(xt.astype(cdt), plan)
        with jax.named_scope("dispatch"):
            xs = dispatch.gather(xt.astype(cdt), plan)  # [R, D]
        with jax.named_scope("experts"):
            ys = experts.expert_ffn(
                xs,
                plan.group_sizes,
                self.w_in[...].astype(cdt),
                self.w_out[...].astype(cdt),
                w_gate=None if self.w_gate is None else self.w_gate[...].astype(cdt),
                b_in=None if self.b_in is None else self.b_in[...],
                b_out=None if self.b_out is None else self.b_out[...],
                activation=cfg.activation,
                backend=cfg.backend,
            )  # [R, D]
        with jax.named_scope("combine"):
            return dispatch.combine(ys, plan, t, out_dtype=cdt)

    def _fused_experts(self, xt: jax.Array, plan: dispatch.Plan) -> jax.Array:
        """Gather, expert FFN and combine in one loop over the real row tiles (fused_xla):
        nothing of size [T*K, .] is built. Routing weights get their gradient through
        plan.weights."""
        cdt = xt.dtype
        opt = lambda p: None if p is None else p[...]  # noqa: E731
        return fused_xla.fused_moe_ffn(
            xt,
            plan.token_idx,
            plan.weights,
            plan.group_sizes,
            self.w_in[...].astype(cdt),
            None if self.w_gate is None else self.w_gate[...].astype(cdt),
            self.w_out[...].astype(cdt),
            opt(self.b_in),
            opt(self.b_out),
            activation=self.config.activation,
        )  # [T, D]
