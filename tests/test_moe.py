"""The NNX MoE layer: gradients, all-null tokens, causality, backends agree."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_jax import MoE, MoEConfig, routing

D, F, N = 16, 24, 4
ROUTERS = {
    "null": dict(router="null", top_k=3, num_null_experts=4),
    "topk": dict(router="topk", top_k=2),
    "switch": dict(router="switch", top_k=1),
    "threshold": dict(router="threshold", threshold=0.8, capacity_factor=1.0),
    "expert_choice": dict(router="expert_choice", causal=False, capacity_factor=1.5),
}


def make(router="null", seed=0, **kw):
    kw.setdefault("backend", "dense")  # small and quick to compile; backends compared below
    cfg = MoEConfig(d_model=D, d_ff=F, num_experts=N, **{**ROUTERS[router], **kw})
    return MoE(cfg, rngs=nnx.Rngs(seed))


def x_batch(seed=1, b=2, length=12, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(seed), (b, length, D), dtype)


def loss_and_grads(layer, x, which="task"):
    """Gradient of a task loss (or an aux loss) w.r.t. all params and the input."""
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
    w = jax.random.normal(jax.random.key(7), x.shape, jnp.float32)

    def f(params, x):
        y, aux = nnx.merge(graphdef, params, rest)(x)
        if which == "task":
            return jnp.sum(y.astype(jnp.float32) * w)
        return aux[which]

    return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(params, x)


def test_null_logit_gets_zero_task_gradient_but_learns_from_aux():
    layer = make("null", router_init_std=1.0)
    x = x_batch()
    w = jax.random.normal(jax.random.key(7), x.shape)

    @nnx.jit
    def kernel_grads(m):
        def grad_of(which):
            def f(m):
                y, aux = m(x)
                return jnp.sum(y * w) if which == "task" else aux[which]

            return nnx.grad(f)(m)["router"]["kernel"][...]  # [D, N+1]

        return {k: grad_of(k) for k in ("task", "lb_loss", "z_loss")}

    g = kernel_grads(layer)
    assert float(jnp.max(jnp.abs(g["task"][:, N]))) == 0.0
    assert float(jnp.max(jnp.abs(g["task"][:, :N]))) > 0.0
    for which in ("lb_loss", "z_loss"):
        assert float(jnp.max(jnp.abs(g[which][:, N]))) > 0.0, which


def test_all_null_tokens_output_zero_and_shared_expert_remains():
    layer = make("null", shared_d_ff=8)
    # All logits equal -> no real logit is strictly above the null logit -> every slot null.
    layer.router.kernel[...] = jnp.zeros_like(layer.router.kernel[...])
    x = x_batch()
    y, aux = layer(x)
    np.testing.assert_allclose(y, layer.shared(x), rtol=1e-6, atol=1e-6)
    assert float(aux["null_ratio"]) == 1.0
    assert float(aux["zero_compute_fraction"]) == 1.0
    assert float(aux["num_real"]) == 0.0
    layer.shared = None
    y, _ = layer(x)
    assert float(jnp.max(jnp.abs(y))) == 0.0


def test_null_router_reduces_to_renormalized_top_r():
    """If the null logit sits above all but the top-r real logits, the null router is a plain
    renormalized top-r router."""
    t, r_real, k = 40, 2, 4
    real = 2.0 * jax.random.normal(jax.random.key(3), (t, N))
    srt = jnp.sort(real, axis=1)[:, ::-1]
    null = 0.5 * (srt[:, r_real - 1] + srt[:, r_real])  # between the r-th and (r+1)-th logits
    logits = jnp.concatenate([real, null[:, None]], axis=1)
    a = routing.null_router(logits, top_k=k, num_nulls=8)
    b = routing.topk_router(real, top_k=r_real, renormalize=True)
    np.testing.assert_array_equal(a.expert_ids[:, :r_real], b.expert_ids)
    np.testing.assert_array_equal(a.expert_ids[:, r_real:], N)
    np.testing.assert_allclose(a.weights[:, :r_real], b.weights, rtol=1e-5)


def test_real_per_token_matches_null_ratio():
    layer = make("null", router_init_std=1.0)
    _, aux = layer(x_batch(), modality=jnp.tile(jnp.arange(12) % 2, (2, 1)))
    k = layer.config.top_k
    assert float(aux["real_per_token"]) == pytest.approx(
        k * (1 - float(aux["null_ratio"])), rel=1e-6
    )
    by_mod = aux["real_per_token_by_modality"]
    assert float(jnp.mean(by_mod)) == pytest.approx(float(aux["real_per_token"]), rel=1e-6)
    assert float(jnp.sum(aux["compute_share_by_modality"])) == pytest.approx(1.0)
    assert 0.0 < float(aux["null_ratio"]) < 1.0


@pytest.mark.parametrize("router", ["null", "topk", "switch"])
def test_token_choice_is_causal(router):
    """Changing token j never changes outputs at positions < j (perturbation and jacobian)."""
    layer = make(router, router_init_std=1.0)
    x = x_batch(b=1, length=10)
    j = 6
    fwd = nnx.jit(lambda m, xs: m(xs)[0])
    y0, y1 = fwd(layer, x), fwd(layer, x.at[0, j].add(3.0))
    np.testing.assert_array_equal(y0[0, :j], y1[0, :j])
    assert float(jnp.max(jnp.abs(y0[0, j] - y1[0, j]))) > 0
    w = jax.random.normal(jax.random.key(2), (j, D))
    prefix = lambda m, xs: jnp.sum(m(xs)[0][0, :j] * w)
    g = nnx.jit(jax.grad(prefix, argnums=1))(layer, x)  # d(prefix)/d(input)
    assert float(jnp.max(jnp.abs(g[0, j:]))) == 0.0
    assert float(jnp.max(jnp.abs(g[0, :j]))) > 0.0


def test_expert_choice_leaks_future_tokens():
    layer = make("expert_choice", router_init_std=1.0, causal=True, allow_noncausal=True)
    x = x_batch(b=1, length=10)
    fwd = nnx.jit(lambda m, xs: m(xs)[0])
    y0 = fwd(layer, x)
    leaked = False
    for scale in (5.0, 20.0, -20.0):
        y1 = fwd(layer, x.at[0, 9].multiply(scale))
        leaked |= float(jnp.max(jnp.abs(y0[0, :9] - y1[0, :9]))) > 1e-6
    assert leaked, "a later token should change earlier outputs under expert choice"


@pytest.mark.parametrize("router", sorted(ROUTERS))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_backends_agree(router, dtype):
    """dense and ragged backends: same values and gradients (params and input)."""
    results = {}
    for backend in ("dense", "ragged"):
        layer = make(router, backend=backend, dtype=dtype, router_init_std=1.0)
        results[backend] = loss_and_grads(layer, x_batch())
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == "bfloat16" else dict(rtol=1e-5, atol=1e-5)
    flat = [jax.tree.leaves(results[b]) for b in ("dense", "ragged")]
    assert len(flat[0]) == len(flat[1])
    for a, b in zip(*flat):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), **tol)


@pytest.mark.parametrize("backend", ["dense", "ragged"])
def test_all_null_batch_has_finite_gradients(backend):
    layer = make("null", backend=backend)
    layer.router.kernel[...] = jnp.zeros_like(layer.router.kernel[...])
    (val, (g, gx)) = loss_and_grads(layer, x_batch())
    assert float(val) == 0.0
    for leaf in jax.tree.leaves(g) + [gx]:
        assert bool(jnp.all(jnp.isfinite(leaf)))


def test_eval_threshold_changes_routing_only_at_eval():
    layer = make("threshold", threshold=1.0, threshold_eval=0.5, capacity_factor=8.0)
    x = x_batch()
    _, aux_train = layer(x)
    _, aux_eval = layer(x, deterministic=True)
    assert float(aux_train["real_per_token"]) == N  # t = 1: every expert
    assert float(aux_eval["real_per_token"]) < N
    layer.eval()
    _, aux_eval2 = layer(x)
    assert float(aux_eval2["real_per_token"]) == float(aux_eval["real_per_token"])


def test_bad_input_shape_is_rejected():
    layer = make("topk")
    with pytest.raises(ValueError, match="MoE input"):
        layer(jnp.zeros((2, 3, D + 1)))
    with pytest.raises(ValueError, match="modality"):
        layer(jnp.zeros((2, 3, D)), modality=jnp.zeros((2, 4), jnp.int32))
