"""Dropless dispatch plan: sort (token, slot) assignments by expert, null slots last.

The sorted buffer has a static number of rows R (T*S for token choice, fewer when capacity
bounds the total); only the first `num_real` rows are real. The expert FFN
(moe_jax.experts.routed_ffn) gathers the rows, computes and combines them; rows past num_real
are masked on both sides there, so a backend that leaves them undefined can never leak NaN or
garbage into the combine.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Plan(NamedTuple):
    token_idx: jax.Array  # [R] int32, source token of each sorted row
    weights: jax.Array  # [R] combine weight of each sorted row (0 past num_real)
    group_sizes: jax.Array  # [N] int32, real rows per expert
    num_real: jax.Array  # scalar int32, rows routed to real experts
    row_valid: jax.Array  # [R] bool, row < num_real


def stable_sort_by_key(keys: jax.Array, num_keys: int) -> jax.Array:
    """jnp.argsort(keys, stable=True) for int keys in [0, num_keys).

    Sorts the single int32 array keys * n + index instead (unique, so stability is free):
    one operand instead of a key/index pair, measured 4-6x faster than the stable argsort on
    CPU for 16k-64k keys. Falls back to argsort when keys * n would overflow int32.
    """
    n = keys.shape[0]
    if num_keys * n >= 2**31:
        return jnp.argsort(keys, stable=True)
    combined = keys.astype(jnp.int32) * n + jnp.arange(n, dtype=jnp.int32)  # [n]
    return jnp.sort(combined) % n


def make_plan(
    expert_ids: jax.Array, weights: jax.Array, num_experts: int, max_rows: int | None = None
) -> Plan:
    """Sort (token, slot) pairs by expert id; the sentinel id N sorts last and is excluded.

    expert_ids, weights: [T, S]. max_rows bounds the buffer (must be >= the real assignments;
    callers pass a bound that capacity guarantees)."""
    t, s = expert_ids.shape
    r_max = t * s if max_rows is None else min(max_rows, t * s)
    flat_e = expert_ids.reshape(-1)  # [T*S]
    order = stable_sort_by_key(flat_e, num_experts + 1)[:r_max]  # [R]
    group_sizes = jnp.zeros((num_experts,), jnp.int32).at[flat_e].add(1, mode="drop")  # [N]
    num_real = jnp.sum(group_sizes)
    row_valid = jnp.arange(r_max) < num_real  # [R]
    token_idx = (order // s).astype(jnp.int32)
    w = jnp.where(row_valid, weights.reshape(-1)[order], 0.0)
    return Plan(token_idx, w, group_sizes, num_real, row_valid)


def group_ids(group_sizes: jax.Array, num_rows: int) -> jax.Array:
    """[R] group index of each sorted row (G for rows past sum(group_sizes))."""
    ends = jnp.cumsum(group_sizes)
    return jnp.searchsorted(ends, jnp.arange(num_rows), side="right").astype(jnp.int32)
