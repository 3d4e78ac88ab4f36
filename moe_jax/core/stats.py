"""Routing statistics and the aux dict of an MoE layer (no gradient through the statistics).

Both the single-device and the expert-parallel forward build aux here, so the weighted aux
loss and every statistic have one definition:

    aux = layer_aux(cfg, lb_loss, z_loss, routing_stats(cfg, r, modality, axis_name))
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moe_jax.core.config import MoEConfig
from moe_jax.core.routing import Routing


def aux_loss(cfg: MoEConfig, lb_loss: jax.Array, z_loss: jax.Array) -> jax.Array:
    """The weighted router loss to add to the task loss: lb_coef * L_bal + z_coef * L_z."""
    return cfg.effective_lb_coef * lb_loss + cfg.z_coef * z_loss


def layer_aux(cfg: MoEConfig, lb_loss: jax.Array, z_loss: jax.Array, stats: dict) -> dict:
    """The aux dict an MoE layer returns: unweighted losses, the weighted sum, statistics."""
    return {
        "lb_loss": lb_loss,
        "z_loss": z_loss,
        "aux_loss": aux_loss(cfg, lb_loss, z_loss),
        **stats,
    }


def routing_stats(
    cfg: MoEConfig,
    r: Routing,
    modality: jax.Array | None,
    axis_name=None,
    group_sizes: jax.Array | None = None,
) -> dict:
    """Statistics of one routing decision; with axis_name the counts are summed over the mesh.

    null_ratio = null picks / (T*K) (null router: also null_error = null_ratio - (1 - rho));
    real_per_token; zero_compute_fraction (tokens with no real
    expert); expert_load [N] (shares); drop_fraction; num_real; with modality ids [T] also
    per-modality null ratio, real experts per token and share of the real rows.
    group_sizes [N]: the dispatch plan's real rows per expert, when the caller has them (the
    same counts as the expert load; not counted twice).
    """
    n = cfg.num_experts
    ids = r.expert_ids
    t, s = ids.shape
    real = (ids < n).astype(jnp.float32)  # [T, S] after drops
    real_tok = jnp.sum(real, axis=1)  # [T]
    if group_sizes is None:
        load = jnp.zeros((n,), jnp.float32).at[ids.reshape(-1)].add(1.0, mode="drop")  # [N]
    else:
        load = group_sizes.astype(jnp.float32)  # [N]
    sums = {
        "tokens": jnp.asarray(t, jnp.float32),
        "real": jnp.sum(real_tok),
        "null": jnp.sum(r.null_slots.astype(jnp.float32)),
        "dropped": jnp.sum(r.dropped.astype(jnp.float32)),
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
    if cfg.router == "null":  # per-batch tracking error of the realized null ratio
        stats["null_error"] = stats["null_ratio"] - (1.0 - cfg.density)
    if modality is not None:
        nm = cfg.num_modalities
        mod = modality.reshape(-1).astype(jnp.int32)  # [T]
        per = lambda v: jnp.zeros((nm,), jnp.float32).at[mod].add(v, mode="drop")  # noqa: E731
        m_sums = {
            "tokens": per(jnp.ones_like(real_tok)),
            "real": per(real_tok),
            "null": per(r.null_slots.astype(jnp.float32)),
        }
        if axis_name is not None:
            m_sums = jax.lax.psum(m_sums, axis_name)
        denom = jnp.maximum(m_sums["tokens"], 1.0)
        stats["modality_tokens"] = m_sums["tokens"]
        stats["null_ratio_by_modality"] = m_sums["null"] / (denom * k_slots)
        stats["real_per_token_by_modality"] = m_sums["real"] / denom
        stats["compute_share_by_modality"] = m_sums["real"] / jnp.maximum(sums["real"], 1.0)
    return jax.tree.map(jax.lax.stop_gradient, stats)
