"""Null experts from step 1: the first-batch calibration of the null selection bias and the PI
null-ratio controller."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_jax import MoE, MoEConfig, routing
from moe_jax.moe import calibrate_null, null_calibrated_layers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 8


@pytest.mark.parametrize("top_k,num_nulls", [(4, 8), (8, 24), (4, 2), (2, 6)])
def test_calibrated_bias_hits_the_target_ratio(top_k, num_nulls):
    """The bisected null bias makes the batch's null ratio 1 - rho up to one slot's share
    (the ratio is a step function of the bias); M < K caps it at M/K (at most M null slots)."""
    t = 512
    logits = 3.0 * jax.random.normal(jax.random.key(top_k + num_nulls), (t, N + 1))
    logits = logits.at[:, N].add(-4.0)  # a null logit far below the real ones, as at init
    target = num_nulls / (N + num_nulls)
    bias = jax.jit(
        lambda x: routing.calibrate_null_bias(
            x, top_k=top_k, num_nulls=num_nulls, target_null_ratio=target
        )
    )(logits)
    np.testing.assert_array_equal(bias[:N], 0.0)  # only the null entry moves
    r = routing.null_router(logits, top_k=top_k, num_nulls=num_nulls, selection_bias=bias)
    ratio = float(jnp.mean(r.null_slots)) / top_k
    reachable = min(target, num_nulls / top_k)
    assert abs(ratio - reachable) <= 1.5 / t
    plain = routing.null_router(logits, top_k=top_k, num_nulls=num_nulls)
    assert abs(float(jnp.mean(plain.null_slots)) / top_k - target) > 0.05  # it had to move
    # The null entry is replaced, not shifted: starting from a set bias (a calibrated or
    # controller-moved layer, with per-expert biases too) gives the same null bias.
    start = bias.at[:N].set(0.0).at[N].add(5.0)
    again = routing.calibrate_null_bias(
        logits, top_k=top_k, num_nulls=num_nulls, target_null_ratio=target, selection_bias=start
    )
    np.testing.assert_allclose(again, bias, atol=1e-5)


def _layer(**kw):
    cfg = dict(d_model=16, d_ff=16, num_experts=N, top_k=4, router="null", rho=0.5)
    cfg.update(router_init_std=0.25, backend="dense", **kw)
    return MoE(MoEConfig(**cfg), rngs=nnx.Rngs(0))


def test_calibrate_null_sets_the_bias_once_and_routing_stays_causal():
    """calibrate_null runs one pass that sets the null bias (ratio 1 - rho on that batch);
    ordinary training calls then keep it, so they stay per-token causal."""
    layer = _layer()
    x = jax.random.normal(jax.random.key(1), (4, 32, 16))
    _, aux0 = layer(x)
    assert float(layer.selection_bias[...][N]) == 0.0  # training calls never calibrate
    assert abs(float(aux0["null_ratio"]) - 0.5) > 0.1
    _, aux1 = calibrate_null(layer, x)
    b1 = float(layer.selection_bias[...][N])
    assert abs(float(aux1["null_ratio"]) - 0.5) <= 1.0 / (4 * 32) and not layer.calibrating
    _, aux2 = layer(x)
    assert float(layer.selection_bias[...][N]) == b1
    assert float(aux2["null_ratio"]) == float(aux1["null_ratio"])
    off = _layer(null_calibrate=False)
    assert off.selection_bias is None and not null_calibrated_layers(off)


def _pi_ratios(steps, **kw):
    layer = _layer(null_calibrate=False, **kw)
    layer.selection_bias[...] = layer.selection_bias[...].at[N].set(2.0)  # far from the target
    graphdef, state = nnx.split(layer)

    @jax.jit
    def step(state, x):
        model = nnx.merge(graphdef, state)
        _, aux = model(x)
        return nnx.state(model), aux["null_ratio"]

    out = []
    for i in range(steps):  # a new batch every step, as in training
        state, ratio = step(state, jax.random.normal(jax.random.key(i), (4, 32, 16)))
        out.append(float(ratio))
    return np.array(out)


def test_pi_controller_update_rule():
    bias = jnp.zeros(N + 1)
    load = jnp.full((N,), 1.0 / N)
    kw = dict(expert_load=load, target_null_ratio=0.5, expert_rate=0.0, null_controller="pi")
    b = routing.update_selection_bias(
        bias, null_ratio=jnp.array(0.7), null_rate=0.5, null_kp=1.0, prev_null_error=0.1, **kw
    )
    # e = 0.2, e_prev = 0.1: b -= 0.5 * 0.2 + 1.0 * (0.2 - 0.1) = 0.2 (logit_scale 1)
    assert float(b[N]) == pytest.approx(-0.2)
    b2 = routing.update_selection_bias(
        bias, null_ratio=jnp.array(0.4), null_rate=0.5, logit_scale=2.0, **kw
    )
    assert float(b2[N]) == pytest.approx(2.0 * 0.5 * 0.1)  # too few nulls: b rises


def test_pi_controller_holds_the_ratio_on_fresh_batches():
    ratios = _pi_ratios(80, null_bias_update_rate=0.5)
    assert abs(ratios[0] - 0.5) > 0.2  # started far off
    tail = ratios[-30:]
    assert abs(np.mean(tail) - 0.5) < 0.01
    assert np.max(np.abs(tail - 0.5)) < 0.1  # per batch of 128 tokens: sampling noise


def _default_model_step1_ratio(variant: str, calibrate: bool) -> np.ndarray:
    """Per-layer null ratio of the first training forward pass of the default model
    (configs/default.py, D=128, 4 MoE blocks) on its first training batch, after
    calibrate_null on that batch when ``calibrate``."""
    sys.path.insert(0, ROOT)
    from configs import default
    from moe_jax.data import make_dataset
    from moe_jax.model import Transformer
    from moe_jax.train.config import from_config_dict

    c = default.get_config(variant)
    c.moe.null_calibrate = calibrate
    cfg = from_config_dict(c.to_dict())
    model = Transformer(cfg.model, rngs=nnx.Rngs(cfg.seed))
    batch = next(make_dataset(cfg.data, "train", seed=cfg.seed))

    @nnx.jit
    def fwd(model, tokens, image):
        return model(tokens, image, deterministic=False)[1]

    @nnx.jit
    def calibrate(model, tokens, image):
        calibrate_null(model, tokens, image, deterministic=False)

    tokens, image = jnp.asarray(batch["tokens"]), jnp.asarray(batch["image"])
    if calibrate:  # what train.py does before its first step
        calibrate(model, tokens, image)
    aux = fwd(model, tokens, image)
    return np.array([float(a["null_ratio"]) for a in aux["moe"]])


@pytest.mark.slow
@pytest.mark.parametrize("variant,target", [("k4_rho05", 0.5), ("k8_rho025", 0.75)])
def test_default_model_starts_at_its_density(variant, target):
    """K^4_0.5 and K^8_0.25 in the default model: null ratio 1 - rho (+-0.05) at step 1 in
    every MoE layer with the calibration, and more than 0.05 off without it."""
    on = _default_model_step1_ratio(variant, True)
    off = _default_model_step1_ratio(variant, False)
    assert np.all(np.abs(on - target) <= 0.05), on
    assert np.mean(np.abs(off - target)) > 0.05, off


@pytest.mark.parametrize("bad", [np.nan, np.inf, 1e30])
def test_one_bad_token_does_not_poison_calibration(bad):
    """calibrate_null on a batch with one NaN, Inf or 1e30 token: the bias comes from the
    finite tokens (a huge token moves only its own breakpoints), so routing afterwards is at
    1 - rho on clean batches instead of all null."""
    x = jax.random.normal(jax.random.key(1), (4, 32, 16))
    clean = _layer()
    calibrate_null(clean, x)
    layer = _layer()
    calibrate_null(layer, x.at[2, 5].set(bad))
    b_clean, b_bad = float(clean.selection_bias[...][N]), float(layer.selection_bias[...][N])
    assert np.isfinite(b_bad)
    assert abs(b_bad - b_clean) < 0.5, (b_bad, b_clean)
    _, aux = layer(jax.random.normal(jax.random.key(2), (4, 32, 16)))
    assert abs(float(aux["null_ratio"]) - 0.5) < 0.1, float(aux["null_ratio"])


def test_calibration_is_exact_at_the_breakpoints():
    """The real-slot count is a step function of the bias: the calibrated bias lies strictly
    inside the step that gives exactly the target count (here reachable: T K rho slots), so
    the batch's null ratio equals 1 - rho exactly and nudging the bias by a small fraction of
    the step width changes nothing."""
    t, k, m = 64, 4, 8
    logits = jax.random.normal(jax.random.key(3), (t, N + 1))
    bias = routing.calibrate_null_bias(logits, top_k=k, num_nulls=m, target_null_ratio=0.5)
    for eps in (0.0, 1e-4, -1e-4):
        r = routing.null_router(logits, top_k=k, num_nulls=m, selection_bias=bias.at[N].add(eps))
        assert float(jnp.sum(r.null_slots)) == t * k * 0.5, eps
    # All tokens non-finite: nothing to calibrate on, the bias is kept.
    start = jnp.zeros(N + 1).at[N].set(0.3)
    kept = routing.calibrate_null_bias(
        jnp.full((t, N + 1), jnp.nan),
        top_k=k,
        num_nulls=m,
        target_null_ratio=0.5,
        selection_bias=start,
    )
    np.testing.assert_array_equal(kept, start)


@pytest.mark.parametrize("bad", [np.nan, np.inf, 1e30])
def test_one_bad_token_does_not_set_the_controller_step(bad):
    """The PI controller's unit (routing.logit_scale) ignores non-finite and outlier tokens:
    one bad token changes it by well under 10% (it was NaN, Inf or ~1e29 with a plain std)."""
    logits = 2.0 * jax.random.normal(jax.random.key(4), (128, N))
    clean = float(routing.logit_scale(logits))
    assert clean == pytest.approx(float(jnp.std(logits)), rel=1e-5)  # no token left out
    poisoned = float(routing.logit_scale(logits.at[7].set(bad)))
    assert np.isfinite(poisoned) and poisoned == pytest.approx(clean, rel=0.1)
    # And through a training call: the controller moves the null bias by a normal step.
    layer = _layer(null_calibrate=False, null_bias_update_rate=0.5, null_controller="pi")
    x = jax.random.normal(jax.random.key(5), (4, 32, 16))
    layer(x.at[1, 3].set(bad))
    assert abs(float(layer.selection_bias[...][N])) < 5.0
