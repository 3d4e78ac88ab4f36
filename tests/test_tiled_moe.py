"""The MoE layer on the tiled backend equals the dense reference backend, for every router."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_jax import experts
from moe_jax.core.config import MoEConfig
from moe_jax.experts import fused_xla, registry
from moe_jax.moe import MoE

T, D, F, N = 24, 16, 8, 4
ROUTERS = {
    "null": dict(router="null", top_k=3, rho=0.5),
    "topk": dict(router="topk", top_k=2),
    "switch": dict(router="switch", top_k=1, capacity_factor=1.0),
    "threshold": dict(router="threshold", threshold=0.7, capacity_factor=1.0),
    "expert_choice": dict(router="expert_choice", causal=False, capacity_factor=1.5),
}


def _grads(cfg: MoEConfig, x: jax.Array, dy: jax.Array, null_bias: float | None):
    layer = MoE(cfg, rngs=nnx.Rngs(0))  # same seed: same weights for every backend
    if null_bias is not None:  # column N is the null logit; x[:, 0] == 1 makes this a bias
        layer.router.kernel[...] = layer.router.kernel[...].at[0, N].set(null_bias)
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)  # rest: the null selection bias

    def loss(params, x):
        y, aux = nnx.merge(graphdef, params, rest)(x)
        return jnp.sum(y * dy) + aux["aux_loss"], (y, aux["num_real"])

    (_, (y, num_real)), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
        params, x
    )
    return y, num_real, grads


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(T, D)).astype(np.float32)
    x[:, 0] = 1.0
    return jnp.asarray(x), jnp.asarray(rng.normal(size=(T, D)).astype(np.float32))


def _compare(cfg, monkeypatch, tm, null_bias=None):
    if tm is not None:
        fused = functools.partial(fused_xla.fused_moe_ffn, tile_rows=tm)
        monkeypatch.setitem(registry._BACKENDS, "tiled", registry.Backend(fused, True))
    x, dy = _inputs()
    y_t, real_t, g_t = _grads(cfg.replace(backend="tiled"), x, dy, null_bias)
    y_d, real_d, g_d = _grads(cfg.replace(backend="dense"), x, dy, null_bias)
    assert float(real_t) == float(real_d)
    np.testing.assert_allclose(y_t, y_d, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(g_t), jax.tree.leaves(g_d), strict=True):
        assert np.all(np.isfinite(a))
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    return float(real_t)


@pytest.mark.parametrize(
    "router, tm", [(r, None) for r in sorted(ROUTERS)] + [("null", 3), ("threshold", 16)]
)
def test_tiled_equals_dense(router, tm, monkeypatch):
    cfg = MoEConfig(d_model=D, d_ff=F, num_experts=N, **ROUTERS[router])
    assert _compare(cfg, monkeypatch, tm) > 0


def test_tiled_equals_dense_gelu_bias(monkeypatch):
    cfg = MoEConfig(
        d_model=D,
        d_ff=F,
        num_experts=N,
        router="topk",
        top_k=2,
        activation="gelu",
        expert_bias=True,
    )
    _compare(cfg, monkeypatch, 5)


@pytest.mark.parametrize("tm", [4])
def test_tiled_all_null_batch(tm, monkeypatch):
    # A large null bias sends every slot to a null expert: num_real = 0, output 0, no NaN.
    cfg = MoEConfig(d_model=D, d_ff=F, num_experts=N, router="null", top_k=2, rho=0.5)
    assert _compare(cfg, monkeypatch, tm, null_bias=1e3) == 0


def test_auto_picks_tiled_on_cpu():
    if jax.default_backend() == "cpu":
        assert experts.resolve_backend("auto") == "tiled"
