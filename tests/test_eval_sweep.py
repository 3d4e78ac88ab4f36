"""Eval-time routing knobs and the inference-compute sweep.

Eval-time threshold / capacity change routing only in eval mode (train step, loss and gradients
untouched; prefill/decode follow them); t_eval = 1.0 with a large gamma_eval equals dense
compute; lowering t_eval never adds real experts; the sweep command runs on a smoke checkpoint.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from configs import default  # noqa: E402
from moe_jax import data, flops, routing  # noqa: E402
from moe_jax import train as training  # noqa: E402
from moe_jax.core.config import MoEConfig  # noqa: E402
from moe_jax.moe import MoE  # noqa: E402
from moe_jax.train import config as train_config  # noqa: E402
from moe_jax.train import sweep  # noqa: E402

SMOKE_STEPS = 4


def smoke(variant: str = "xmoe_dense", **moe):
    c = default.get_config(f"{variant},smoke")
    c.num_steps, c.model.n_layers = SMOKE_STEPS, 1  # one (MoE) block: cheap compiles
    c.log.progress, c.log.plots, c.log.tensorboard = False, False, False
    for k, v in moe.items():
        c.moe[k] = v
    return c


@functools.partial(jax.jit, static_argnums=(0, 5))
def _logits(graphdef, params, rest, tokens, images, deterministic):
    model = nnx.merge(graphdef, params, rest)
    return model(tokens, images, deterministic=deterministic)[0]


@functools.partial(jax.jit, static_argnums=(0,))
def _prefill_then_decode(graphdef, params, rest, tokens, images):
    """Prefill tokens[:, :-1], then decode tokens[:, -1]; returns both logits."""
    model = nnx.merge(graphdef, params, rest)
    p = model.cfg.num_patches
    cache = model.init_cache(tokens.shape[0], p + tokens.shape[1])
    pre, cache = model.prefill(tokens[:, :-1], images, cache)
    dec, _ = model.decode_step(tokens[:, -1:], cache, p + tokens.shape[1] - 1)
    return pre, dec


@functools.cache
def _load_cli():
    """experiments/eval_sweep.py as a module (once: it defines absl flags)."""
    path = os.path.join(ROOT, "experiments", "eval_sweep.py")
    spec = importlib.util.spec_from_file_location("eval_sweep", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def smoke_sweep(tmp_path_factory):
    """A smoke xmoe_dense run trained in a tmp workdir (its train / eval steps stay compiled for
    the tests below), then the sweep command on its checkpoint."""
    tmp = tmp_path_factory.mktemp("sweep")
    wd = str(tmp / "xmoe_dense")
    training.run(smoke(), wd)
    out = str(tmp / "ic")
    args = [
        f"--run=xmoe_dense,smoke@{wd}",
        f"--set=num_steps={SMOKE_STEPS}",
        "--set=model.n_layers=1",
        "--t_eval=1.0,0.5",
        "--gamma_eval=train",
        f"--out={out}",
    ]
    # In-process, so the eval step compiled by the run above is reused.
    eval_sweep = _load_cli()
    try:
        eval_sweep.flags.FLAGS(["eval_sweep", *args])
        eval_sweep.main(["eval_sweep"])
    finally:
        eval_sweep.flags.FLAGS.unparse_flags()
    with open(out + ".json") as f:
        return out, json.load(f)


def test_sweep_command_writes_table_plot_and_measured_flops(smoke_sweep):
    out, result = smoke_sweep
    rows = result["rows"]
    assert len(rows) == 2 and all(r["step"] == SMOKE_STEPS for r in rows)
    md = open(out + ".md").read()
    assert md.count("| xmoe_dense,smoke | threshold |") == 2
    assert "python experiments/eval_sweep.py" in md and os.path.getsize(out + ".png") > 1000
    full = [r for r in rows if r["t_eval"] == 1.0 and r["gamma_eval"] == 16.0]
    assert len(full) == 1 and full[0]["normalized_flops"] == pytest.approx(1.0, abs=1e-9)
    low = [r for r in rows if r["t_eval"] == 0.5]  # t_eval = 0.5 skips experts, measured
    assert len(low) == 1 and low[0]["real_per_token"] < full[0]["real_per_token"]
    assert low[0]["normalized_flops"] < 1.0


def test_xmoe_dense_variant_is_dense_compute():
    cfg = train_config.from_config_dict(default.get_config("xmoe_dense"))
    moe = cfg.moe
    assert moe.router == "threshold" and moe.threshold == 1.0
    assert moe.num_experts * moe.d_ff == cfg.model.d_ff  # the dense FFN split into N slices
    assert flops.expected_real_experts(moe) == moe.num_experts  # every expert, no drops
    ffn = flops.ffn_flops_per_token(moe.d_model, cfg.model.d_ff, moe.activation)
    assert flops.moe_flops_per_token(moe) == pytest.approx(ffn + flops.router_flops_per_token(moe))
    low = moe.replace(threshold_eval=0.5, capacity_factor_eval=2.0)
    assert flops.expected_real_experts(low, train=False) == 2.0  # capped by gamma_eval


def test_train_step_ignores_eval_knobs(smoke_sweep):
    """Eval knobs leave training bit-identical (that eval follows them: the tests below)."""
    base = train_config.from_config_dict(smoke())  # t = 1.0, gamma = N in training
    knobs = sweep.with_eval_routing(base, sweep.Point(t_eval=0.3, gamma_eval=1.0))
    batch = next(data.make_dataset(base.data, "train"))
    tx, schedule = training.make_optimizer(base.opt, base.num_steps)
    outs = []
    for cfg in (base, knobs):
        _, state = training.init_state(base)  # fresh buffers: train_step donates its state
        new, m = training.train_step(
            state,
            batch,
            np.int32(-1),
            graphdef=sweep.graphdef_for(cfg),
            tx=tx,
            schedule=schedule,
            spec=training.StepSpec(),
        )
        outs.append(jax.device_get((new["params"], m["loss"], m["aux_loss"], m["grad_norm"])))
    for a, b in zip(jax.tree.leaves(outs[0]), jax.tree.leaves(outs[1])):
        np.testing.assert_array_equal(a, b)  # loss, gradients and the update: bit-identical


def test_prefill_and_decode_use_eval_routing(smoke_sweep):
    base = train_config.from_config_dict(smoke())
    cfg = sweep.with_eval_routing(base, sweep.Point(t_eval=0.3))  # gamma = N: no drops
    _, state = training.init_state(base)
    params, rest = state["params"], state["rest"]
    batch = next(data.make_dataset(base.data, "eval"))
    tokens, images = jnp.asarray(batch["tokens"]), jnp.asarray(batch["image"])
    gd = sweep.graphdef_for(cfg)
    ev = np.asarray(_logits(gd, params, rest, tokens, images, True))
    tr = np.asarray(_logits(sweep.graphdef_for(base), params, rest, tokens, images, False))
    assert np.max(np.abs(tr - ev)) > 1e-3  # t_eval = 0.3 really changed the routing
    pre, dec = _prefill_then_decode(gd, params, rest, tokens, images)
    np.testing.assert_allclose(pre, ev[:, :-1], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dec[:, 0], ev[:, -1], rtol=1e-5, atol=1e-5)


def _dense_mixture(layer: MoE, x: jax.Array) -> jax.Array:
    """Reference: every expert on every token, weighted by its softmax probability."""
    p = jax.nn.softmax(layer.router(x), axis=-1)  # [T, N]
    h = jnp.einsum("td,ndf->tnf", x, layer.w_in[...])  # [T, N, F]
    g = jnp.einsum("td,ndf->tnf", x, layer.w_gate[...])  # [T, N, F]
    y = jnp.einsum("tnf,nfd->tnd", jax.nn.silu(g) * h, layer.w_out[...])  # [T, N, D]
    return jnp.einsum("tn,tnd->td", p, y)  # [T, D]


@nnx.jit(static_argnums=2)
def _layer(layer: MoE, x: jax.Array, deterministic: bool):
    y, aux = layer(x, deterministic=deterministic)
    return y, aux["real_per_token"], aux["drop_fraction"], _dense_mixture(layer, x)


def test_t_eval_one_with_large_gamma_equals_dense_compute(smoke_sweep):
    # Layer: a sparse-trained router (t = 0.7, gamma = 2) evaluated at t = 1.0, gamma = 1e3 is
    # the dense mixture sum_e p_e FFN_e(x).
    cfg = MoEConfig(
        d_model=16, d_ff=8, num_experts=8, router="threshold", threshold=0.7,
        capacity_factor=2.0, threshold_eval=1.0, capacity_factor_eval=1e3, router_init_std=1.0,
        backend="ragged",
    )  # fmt: skip
    layer = MoE(cfg, rngs=nnx.Rngs(1))
    x = jax.random.normal(jax.random.key(2), (64, 16))
    y, real, dropped, dense = _layer(layer, x, True)
    assert float(real) == 8.0 and float(dropped) == 0.0
    np.testing.assert_allclose(y, dense, rtol=1e-5, atol=1e-6)
    y_train, real_train, _, _ = _layer(layer, x, False)
    assert float(real_train) < 8.0 and np.max(np.abs(np.asarray(y_train - y))) > 1e-3

    # Model: the dense-to-sparse model evaluated at t = 1.0, gamma = 1e3 gives exactly the
    # logits of its dense training forward (t = 1.0, gamma = N).
    base = train_config.from_config_dict(smoke())
    wide = sweep.with_eval_routing(base, sweep.Point(t_eval=1.0, gamma_eval=1e3))
    _, state = training.init_state(base)
    batch = next(data.make_dataset(base.data, "eval"))
    args = (state["params"], state["rest"], jnp.asarray(batch["tokens"]), batch["image"])
    dense_logits = _logits(sweep.graphdef_for(base), *args, False)
    sparse_logits = _logits(sweep.graphdef_for(wide), *args, True)
    np.testing.assert_array_equal(dense_logits, sparse_logits)


@functools.partial(jax.jit, static_argnames="capacity")
def _real_per_token(logits, threshold, *, capacity):
    ids = routing.threshold_router(logits, threshold=threshold, capacity=capacity).expert_ids
    return jnp.sum(ids < logits.shape[1], axis=1)  # [T]


def test_lowering_t_never_adds_real_experts():
    t_grid = (1.0, 0.99, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.3, 0.1)
    for seed, scale in ((0, 0.5), (1, 2.0), (2, 6.0)):
        logits = scale * jax.random.normal(jax.random.key(seed), (256, 16))
        for capacity in (256, 64, 8):
            per_tok = [np.asarray(_real_per_token(logits, t, capacity=capacity)) for t in t_grid]
            totals = [p.sum() for p in per_tok]
            assert all(a >= b for a, b in zip(totals, totals[1:])), (seed, capacity, totals)
            if capacity == 256:  # no drops: monotone for every single token
                assert all(np.all(a >= b) for a, b in zip(per_tok, per_tok[1:]))
                assert np.all(per_tok[0] == 16)  # t = 1.0 keeps every expert
