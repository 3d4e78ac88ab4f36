"""Router auxiliary losses (unweighted; MoEConfig holds the coefficients).

Conventions:
- null router: L_bal over all N+M slots, f sums to 1, so a uniform router gives exactly 1.
- top-k / Switch / threshold: Switch convention N * sum_i f_i P_i with f_i the fraction of tokens
  that picked expert i among their top-k, so f sums to K and a uniform router gives K (1 for
  Switch and for the threshold router's top-1 loss).
- lb_scope="global": pass `axis_name`; the assignment counts f are summed over that mesh axis
  (and the token totals with them) while P stays the local mean, which carries the gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _global_sum(x: jax.Array, axis_name) -> jax.Array:
    return x if axis_name is None else jax.lax.psum(x, axis_name)


def null_balance_loss(
    expert_ids: jax.Array,
    p_real: jax.Array,
    p_null: jax.Array,
    *,
    num_nulls: int,
    null_slots: jax.Array,
    axis_name=None,
) -> jax.Array:
    """L_bal = (N+M) [sum_i f_i P_i + f_null P_null / M], computed from totals so it does not
    depend on which null copy wins a tie. expert_ids [T, K] (N = null), p_real [T, N],
    p_null [T] (total mass of the M copies), null_slots [T]."""
    t, k = expert_ids.shape
    n = p_real.shape[1]
    counts = jnp.zeros((n,), jnp.float32).at[expert_ids.reshape(-1)].add(1.0, mode="drop")  # [N]
    null_count = jnp.sum(null_slots).astype(jnp.float32)
    total = jnp.asarray(t * k, jnp.float32)
    counts, null_count, total = (_global_sum(v, axis_name) for v in (counts, null_count, total))
    f = jax.lax.stop_gradient(counts / total)  # [N]
    f_null = jax.lax.stop_gradient(null_count / total)
    big_p = jnp.mean(p_real, axis=0)  # [N]
    loss = jnp.sum(f * big_p)
    if num_nulls > 0:
        loss = loss + f_null * jnp.mean(p_null) / num_nulls
    return (n + num_nulls) * loss


def switch_balance_loss(choice_ids: jax.Array, probs: jax.Array, *, axis_name=None) -> jax.Array:
    """N * sum_i f_i P_i; choice_ids [T, K] are the routed choices before any capacity drop,
    probs [T, N] the softmax."""
    t, n = probs.shape
    counts = jnp.zeros((n,), jnp.float32).at[choice_ids.reshape(-1)].add(1.0, mode="drop")
    total = jnp.asarray(t, jnp.float32)
    counts, total = _global_sum(counts, axis_name), _global_sum(total, axis_name)
    f = jax.lax.stop_gradient(counts / total)
    return n * jnp.sum(f * jnp.mean(probs, axis=0))


def z_loss_from_lse(lse: jax.Array) -> jax.Array:
    """mean_t logsumexp(logits)^2 given the per-token logsumexp [T]."""
    return jnp.mean(jnp.square(lse))


def z_loss(logits: jax.Array) -> jax.Array:
    """ST-MoE router z-loss over [T, E] logits."""
    return z_loss_from_lse(jax.nn.logsumexp(logits, axis=-1))
