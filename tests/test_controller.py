"""Selection-only router biases: the null-ratio controller and aux-loss-free balancing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_jax import MoE, MoEConfig, routing

N = 8


def test_update_rule_moves_null_bias_the_right_way():
    bias = jnp.zeros(N + 1)
    load = jnp.full((N,), 1.0 / N)
    kw = dict(expert_load=load, target_null_ratio=0.5, expert_rate=0.0, null_rate=0.01)
    up = routing.update_selection_bias(bias, null_ratio=jnp.array(0.3), **kw)  # too few nulls
    down = routing.update_selection_bias(bias, null_ratio=jnp.array(0.7), **kw)  # too many
    assert float(up[N]) == pytest.approx(0.01) and float(down[N]) == pytest.approx(-0.01)
    np.testing.assert_array_equal(up[:N], 0.0)


def test_update_rule_favours_underloaded_experts():
    load = jnp.array([0.3, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1])
    b = routing.update_selection_bias(
        jnp.zeros(N),
        expert_load=load,
        null_ratio=None,
        target_null_ratio=0.0,
        expert_rate=1e-3,
        null_rate=0.0,
    )
    assert float(b[0]) < 0 and bool(jnp.all(b[1:] > 0))


def test_bias_changes_selection_but_carries_no_gradient():
    logits = jax.random.normal(jax.random.key(0), (32, N + 1))
    bias = jnp.zeros(N + 1).at[N].set(3.0)  # make null picks much more likely
    base = routing.null_router(logits, top_k=4, num_nulls=8)
    biased = routing.null_router(logits, top_k=4, num_nulls=8, selection_bias=bias)
    assert int(jnp.sum(biased.null_slots)) > int(jnp.sum(base.null_slots))

    def f(b):
        r = routing.null_router(logits, top_k=4, num_nulls=8, selection_bias=b)
        return jnp.sum(r.weights) + r.lb_loss + r.z_loss

    assert float(jnp.max(jnp.abs(jax.grad(f)(bias)))) == 0.0
    # Probabilities use the unbiased logits: the z-loss (a function of them alone) is the same.
    assert float(biased.z_loss) == pytest.approx(float(base.z_loss), rel=1e-6)


def _controlled_null_ratio(null_rate, steps=60):
    cfg = MoEConfig(
        d_model=16,
        d_ff=16,
        num_experts=N,
        top_k=4,
        router="null",
        rho=0.5,
        router_init_std=0.25,
        null_bias_update_rate=max(null_rate, 1e-9),
        null_controller="sign",
        backend="dense",
    )
    layer = MoE(cfg, rngs=nnx.Rngs(0))
    # Start far from the target: a null bias of +2 makes most picks null.
    layer.selection_bias[...] = layer.selection_bias[...].at[N].set(2.0)
    x = jax.random.normal(jax.random.key(1), (4, 16, 16))
    graphdef, state = nnx.split(layer)

    @jax.jit
    def step(state):
        model = nnx.merge(graphdef, state)
        _, aux = model(x)
        return nnx.state(model), aux["null_ratio"]

    ratios = []
    for _ in range(steps):
        state, ratio = step(state)
        ratios.append(float(ratio))
    return np.array(ratios)


def test_controller_holds_null_ratio_at_target():
    free = _controlled_null_ratio(0.0, steps=5)
    ctrl = _controlled_null_ratio(0.05)
    target = 0.5
    assert abs(free[-1] - target) > 0.1  # the skewed router misses the target on its own
    assert np.max(np.abs(ctrl[-20:] - target)) < 0.02  # held within +-0.02 after warm-up
    assert np.mean(np.abs(ctrl[-20:] - target)) < abs(free[-1] - target) / 3
