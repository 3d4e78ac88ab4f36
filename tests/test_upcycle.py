"""Upcycling properties: slices of one dense FFN summed with unit weights reproduce it, the whole
upcycled model reproduces the dense model when every expert is selected uniformly, re-init
touches exactly the requested fraction, and parameter counts match the formula."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_jax import dispatch, experts
from moe_jax.core.config import MoEConfig
from moe_jax.model import ModelConfig, Transformer, model_summary
from moe_jax.model.stack import unstack_params
from moe_jax.model.upcycle import upcycle, upcycle_ffn

D, F, V = 32, 64, 64


def dense_cfg(**kw):
    base = dict(vocab_size=V, d_model=D, n_layers=2, n_heads=4, d_ff=F, moe=None, moe_every=0)
    base.update(image_size=8, patch_size=4, max_len=16)
    base.update(kw)
    return ModelConfig(**base)


def moe(g, n, **kw):
    base = dict(d_model=D, d_ff=F // g, num_experts=n, top_k=n, router="topk", backend="ragged")
    base.update(kw)
    return MoEConfig(**base)


def data(seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return jax.random.randint(k1, (2, 8), 0, V, jnp.int32), jax.random.uniform(k2, (2, 8, 8, 3))


@nnx.jit
def forward(model, tokens, images):
    return model(tokens, images, deterministic=True)[0]


@pytest.mark.parametrize("g", [1, 4])
def test_slices_with_unit_weights_equal_dense_ffn(g):
    dense = Transformer(dense_cfg(scan_layers=False), rngs=nnx.Rngs(0))
    model = upcycle(dense, moe(g, g), g, reinit_fraction=0.0, rng=jax.random.key(1))
    layer, ffn = model.blocks[0].ffn, dense.blocks[0].ffn
    x = jax.random.normal(jax.random.key(2), (12, D))
    ids = jnp.tile(jnp.arange(g, dtype=jnp.int32), (12, 1))  # [T, g] every slice
    plan = dispatch.make_plan(ids, jnp.ones((12, g)), g)
    y = experts.routed_ffn(  # the pure expert path, unit weights
        x, plan.token_idx, plan.weights, plan.group_sizes, layer.expert_params(), backend="dense"
    )
    np.testing.assert_allclose(y, ffn(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("g,n", [(4, 4), (2, 4)])
def test_upcycled_model_equals_dense_model(g, n):
    """K = N experts, router zeroed (uniform 1/N weights), w_out scaled by g: each slice
    appears n/g times at weight 1/n, so the sum is the dense FFN."""
    dense = Transformer(dense_cfg(), rngs=nnx.Rngs(0))
    model = upcycle(dense, moe(g, n), g, 0.0, rng=jax.random.key(3), output_scale=float(g))
    router = model.stack.scanned.blocks[0].ffn.router.kernel  # scanned: every layer's [G, ...]
    router[...] = jnp.zeros_like(router[...])
    tokens, images = data()
    np.testing.assert_allclose(
        forward(model, tokens, images), forward(dense, tokens, images), atol=1e-4, rtol=1e-4
    )


def test_reinit_fraction_and_layout():
    rng = np.random.default_rng(0)
    w_in, w_gate = (jnp.asarray(rng.normal(size=(D, F)), jnp.float32) for _ in range(2))
    w_out = jnp.asarray(rng.normal(size=(F, D)), jnp.float32)
    g, n, frac = 2, 6, 0.3
    fe = F // g
    e = upcycle_ffn(
        w_in,
        w_gate,
        w_out,
        num_experts=n,
        granularity=g,
        reinit_fraction=frac,
        rng=jax.random.key(0),
    )
    assert e["w_in"].shape == (n, D, fe) and e["w_out"].shape == (n, fe, D)
    for i in range(n):
        s = i % g  # expert i holds slice i % g
        same_in = np.all(np.asarray(e["w_in"][i]) == np.asarray(w_in[:, s * fe : (s + 1) * fe]), 0)
        same_out = np.all(np.asarray(e["w_out"][i]) == np.asarray(w_out[s * fe : (s + 1) * fe]), 1)
        same_gate = np.all(
            np.asarray(e["w_gate"][i]) == np.asarray(w_gate[:, s * fe : (s + 1) * fe]), 0
        )
        np.testing.assert_array_equal(same_in, same_out)  # a unit is re-drawn as a whole
        np.testing.assert_array_equal(same_in, same_gate)
        assert int(np.sum(~same_in)) == round(frac * fe)
    # replicas of the same slice differ after re-init (symmetry broken)
    assert not np.array_equal(e["w_in"][0], e["w_in"][g])


def test_param_counts_match_formula_and_state_input():
    dcfg = dense_cfg(mode="lm", scan_layers=False)
    dense = Transformer(dcfg, rngs=nnx.Rngs(0))
    g, n = 4, 8
    mcfg = moe(g, n, router="null", top_k=4, rho=0.5)
    model = upcycle(dense, mcfg, g, rng=jax.random.key(0), moe_every=2)
    count = lambda m: sum(x.size for x in jax.tree.leaves(nnx.state(m, nnx.Param)))
    n_moe = len(model.cfg.moe_layers)
    assert n_moe == 1
    expected = count(dense) - n_moe * 3 * D * F + n_moe * (D * (n + 1) + n * 3 * D * (F // g))
    assert count(model) == expected == model_summary(model.cfg)["total_params"]
    router = model.blocks[1].ffn.router.kernel
    assert router.shape == (D, n + 1)  # null logit column
    # the dense state (with its config) upcycles to the same model
    same = upcycle(
        nnx.state(dense, nnx.Param), mcfg, g, rng=jax.random.key(0), dense_cfg=dcfg, moe_every=2
    )
    for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(same))):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(
        model.blocks[0].attn.wq.kernel[...], dense.blocks[0].attn.wq.kernel[...]
    )
    # a scanned dense source upcycles to the same weights in the scanned layout (groups of 2)
    scanned = upcycle(
        Transformer(dcfg.replace(scan_layers=True), rngs=nnx.Rngs(0)),
        mcfg, g, rng=jax.random.key(0), moe_every=2,
    )  # fmt: skip
    assert scanned.stack.scanned.blocks[1].ffn.router.kernel.shape == (1, D, n + 1)
    pure = unstack_params(scanned.cfg, nnx.to_pure_dict(nnx.state(scanned)))
    for a, b in zip(jax.tree.leaves(nnx.to_pure_dict(nnx.state(model))), jax.tree.leaves(pure)):
        np.testing.assert_array_equal(a, b)


def test_bad_arguments_name_the_field():
    dense = Transformer(dense_cfg(mode="lm"), rngs=nnx.Rngs(0))
    k = jax.random.key(0)
    with pytest.raises(ValueError, match="moe_cfg.d_ff"):
        upcycle(dense, moe(4, 4, d_ff=8), 4, rng=k)
    with pytest.raises(ValueError, match="num_experts"):
        upcycle(dense, moe(4, 6, top_k=2), 4, rng=k)
    with pytest.raises(ValueError, match="reinit_fraction"):
        upcycle(dense, moe(4, 4), 4, 1.5, rng=k)
    with pytest.raises(ValueError, match="dense_cfg"):
        upcycle(nnx.state(dense, nnx.Param), moe(4, 4), 4, rng=k)
