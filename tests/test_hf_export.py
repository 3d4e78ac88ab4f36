"""Models out: a top-k MoE written as a Mixtral checkpoint loads in transformers with the same
logits; a null-expert model round-trips exactly through the moe_jax format; what Mixtral cannot
express is refused by name."""

from __future__ import annotations

import hf_models as H
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch  # noqa: F401  (the [test] extra; a missing torch fails, never skips)
from flax import nnx

from moe_jax import hf
from moe_jax.core.config import MoEConfig
from moe_jax.model import ModelConfig, Transformer, next_token_loss


def _model(router="topk", seed=0, **moe_kw):
    kw = dict(rho=0.5) if router == "null" else {}
    moe = MoEConfig(
        d_model=H.D,
        d_ff=32,
        num_experts=4,
        top_k=2,
        router=router,
        router_init_std=0.5,
        **{**kw, **moe_kw},
    )
    cfg = ModelConfig(
        vocab_size=H.V,
        d_model=H.D,
        n_layers=H.L,
        n_heads=4,
        n_kv_heads=2,
        d_ff=H.F,
        moe=moe,
        moe_every=1,
        mode="lm",
        max_len=64,
        tie_embeddings=False,
        rope_theta=1e6,
        norm_eps=1e-5,
    )
    model = Transformer(cfg, rngs=nnx.Rngs(seed))
    key = jax.random.key(seed + 1)
    for blk in (model.stack.scanned.blocks[0], model):  # norm scales away from 1 (all layers)
        for norm in [getattr(blk, n, None) for n in ("attn_norm", "ffn_norm", "final_norm")]:
            if norm is not None:
                key, sub = jax.random.split(key)
                norm.scale[...] = jax.random.uniform(
                    sub, norm.scale[...].shape, minval=0.5, maxval=1.5
                )
    return model


@nnx.jit
def _forward(model, tokens):
    return model(tokens, deterministic=True)[0]


@nnx.jit
def _sgd_step(model, tokens):
    def loss_fn(m):
        logits, aux = m(tokens)
        return next_token_loss(logits, tokens, jnp.ones(tokens.shape, bool))[0] + aux["aux_loss"]

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    params = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(lambda p, g: p - 0.5 * g, params, grads))
    return loss


def test_mixtral_export_gives_the_same_logits(tmp_path):
    """A top-k MoE trained a few steps here, written as Mixtral, read by transformers."""
    from transformers import MixtralForCausalLM

    model = _model("topk")
    batch = jnp.asarray(H.tokens(7, (4, 16)))
    losses = [float(_sgd_step(model, batch)) for _ in range(3)]
    assert losses[-1] < losses[0]
    path = hf.export_mixtral(model, str(tmp_path / "mixtral"))
    theirs = MixtralForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    tokens = H.tokens(5, (2, 16))
    ref = H.torch_logits(theirs, tokens)
    ours = np.asarray(_forward(model, jnp.asarray(tokens)))
    np.testing.assert_allclose(ours, ref, atol=2e-5, rtol=1e-5)
    assert np.abs(ref).max() > 0.5  # not a degenerate comparison


@pytest.mark.parametrize(
    "router,kw,field",
    [
        ("null", {}, "moe.router"),
        ("topk", {"renormalize": False}, "moe.renormalize"),
        ("topk", {"shared_d_ff": 16}, "moe.shared_d_ff"),
        ("topk", {"bias_update_rate": 1e-3}, "moe.bias_update_rate"),
    ],
)
def test_mixtral_export_refuses_what_it_cannot_express(tmp_path, router, kw, field):
    with pytest.raises(hf.UnsupportedExportError, match=field.replace(".", r"\.")):
        hf.export_mixtral(_model(router, **kw), str(tmp_path / "x"))


def test_null_expert_model_round_trips_exactly(tmp_path):
    model = _model("null", null_bias_update_rate=1e-3)
    bias = model.stack.scanned.blocks[0].ffn.selection_bias  # [G, 5], state not only params
    bias[...] = jnp.arange(5.0 * H.L).reshape(H.L, 5)
    path = hf.save_native(model, str(tmp_path / "native"))
    back, cfg = hf.load_native(path)
    assert cfg == model.cfg
    a, b = nnx.to_pure_dict(nnx.state(model)), nnx.to_pure_dict(nnx.state(back))
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)
    tokens = jnp.asarray(H.tokens(6))
    np.testing.assert_array_equal(_forward(model, tokens), _forward(back, tokens))
