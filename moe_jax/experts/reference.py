"""Reference grouped matmuls: obviously right, cost ~ G x R (for tests and comparisons)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moe_jax.core.dispatch import group_ids


def dense_gmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """Every group on every row, then each row keeps its own group's result (0 past the sum).

    lhs [R, D], rhs [G, D, F], group_sizes [G] -> [R, F] in the promoted input dtype."""
    gid = group_ids(group_sizes, lhs.shape[0])  # [R]; G for rows past the sum
    all_out = jnp.einsum("rd,gdf->rgf", lhs, rhs, preferred_element_type=jnp.float32)  # [R, G, F]
    onehot = jax.nn.one_hot(gid, rhs.shape[0], dtype=jnp.float32)  # [R, G]; past the sum: 0
    out = jnp.einsum("rgf,rg->rf", all_out, onehot)  # [R, F]
    return out.astype(jnp.result_type(lhs.dtype, rhs.dtype))


def ragged_gmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """jax.lax.ragged_dot: correct everywhere; computes densely on CPU (cost ~ G)."""
    out = jax.lax.ragged_dot(lhs, rhs, group_sizes, preferred_element_type=jnp.float32)
    return out.astype(lhs.dtype)
