"""The MoE layer with backend "pallas" (interpret mode on CPU) equals backend "dense"."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_jax import MoE, MoEConfig

D, F, N = 16, 24, 4
ROUTERS = {
    "null": dict(router="null", top_k=3, num_null_experts=4),
    "topk": dict(router="topk", top_k=2),
    "threshold": dict(router="threshold", threshold=0.8, capacity_factor=1.0),
}


def _value_and_grads(backend, router):
    cfg = MoEConfig(
        d_model=D, d_ff=F, num_experts=N, backend=backend, router_init_std=1.0, **ROUTERS[router]
    )
    graphdef, params, rest = nnx.split(MoE(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
    x = jax.random.normal(jax.random.key(1), (2, 8, D))
    w = jax.random.normal(jax.random.key(2), x.shape)

    def f(params, x):
        y, aux = nnx.merge(graphdef, params, rest)(x)
        return jnp.sum(y * w) + aux["aux_loss"]

    return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(params, x)


@pytest.mark.parametrize("router", sorted(ROUTERS))
def test_pallas_backend_matches_dense(router):
    want = _value_and_grads("dense", router)
    got = _value_and_grads("pallas", router)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-4)


def test_pallas_backend_is_the_kernel():
    from moe_jax import experts
    from moe_jax.experts import pallas as pallas_backend

    assert experts.get_backend("pallas") == (pallas_backend.pallas_gmm, False)
