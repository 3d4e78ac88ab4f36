"""Transformer properties: causality end to end, KV-cache decode == full forward, the expert
choice guard and its leak, analytic parameter counts, loss semantics, and a VLM that overfits."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from moe_jax.core.config import MoEConfig
from moe_jax.model import (
    ModelConfig,
    Transformer,
    cross_entropy,
    format_summary,
    generate,
    model_summary,
    next_token_loss,
)

B, L, V = 2, 10, 64


def moe_cfg(router: str, **kw) -> MoEConfig:
    base = dict(d_model=32, d_ff=16, num_experts=4, top_k=2, router=router, backend="ragged")
    if router == "null":
        base["rho"] = 0.5
    if router == "threshold":  # gamma = N: capacity C >= T, nothing drops
        base.update(capacity_factor=4.0, capacity_factor_eval=4.0)
    base.update(kw)
    return MoEConfig(**base)


def model_cfg(moe=None, **kw) -> ModelConfig:
    base = dict(vocab_size=V, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, moe=moe)
    base.update(image_size=8, patch_size=4, max_len=16, moe_every=1)
    base.update(kw)
    return ModelConfig(**base)


def inputs(seed=0, length=L):
    k1, k2 = jax.random.split(jax.random.key(seed))
    tokens = jax.random.randint(k1, (B, length), 0, V, jnp.int32)
    images = jax.random.uniform(k2, (B, 8, 8, 3))
    return tokens, images


@nnx.jit
def forward(model, tokens, images):
    return model(tokens, images, deterministic=True)[0]


@nnx.jit
def decode_step(model, tok, cache, pos):
    return model.decode_step(tok, cache, pos)


ROUTERS = ["null", "topk", "threshold"]


@pytest.mark.parametrize("router", ROUTERS)
def test_causal_end_to_end(router):
    model = Transformer(model_cfg(moe_cfg(router)), rngs=nnx.Rngs(0))
    tokens, images = inputs()
    base = forward(model, tokens, images)
    j = 5
    pert = tokens.at[:, j].set((tokens[:, j] + 7) % V)
    out = forward(model, pert, images)
    np.testing.assert_allclose(out[:, :j], base[:, :j], atol=1e-5)  # the past is untouched
    assert float(jnp.max(jnp.abs(out[:, j:] - base[:, j:]))) > 1e-3  # the future sees it


@pytest.mark.parametrize("router", ROUTERS)
def test_kv_cache_decode_equals_full_forward(router):
    extra = {
        "topk": dict(tie_embeddings=False, n_kv_heads=1),
        "threshold": dict(vision_encoder="vit"),
    }.get(router, {})
    cfg = model_cfg(moe_cfg(router), **extra)
    model = Transformer(cfg, rngs=nnx.Rngs(1))
    tokens, images = inputs(1)
    full = forward(model, tokens, images)  # [B, L, V]
    p, l0 = cfg.num_patches, 3
    cache = model.init_cache(B, p + L)
    logits, cache = nnx.jit(lambda m, t, i, c: m.prefill(t, i, c))(
        model, tokens[:, :l0], images, cache
    )
    np.testing.assert_allclose(logits, full[:, :l0], atol=1e-5)
    for i in range(l0, L):
        step, cache = decode_step(model, tokens[:, i : i + 1], cache, jnp.int32(p + i))
        np.testing.assert_allclose(step[:, 0], full[:, i], atol=1e-5, err_msg=f"position {i}")


def test_generate_is_greedy_over_full_forward():
    model = Transformer(model_cfg(moe_cfg("null")), rngs=nnx.Rngs(2))
    tokens, images = inputs(2)
    out = generate(model, images, tokens[:, :3], L - 3)
    # Greedy by repeated full forward passes over a fixed-length buffer (one compile): the
    # zeros after position i cannot affect its logits (causality, tested above).
    seq = tokens.at[:, 3:].set(0)
    for i in range(3, L):
        nxt = jnp.argmax(forward(model, seq, images)[:, i - 1], axis=-1).astype(jnp.int32)
        seq = seq.at[:, i].set(nxt)
    np.testing.assert_array_equal(out, seq[:, 3:])


def test_lm_mode_and_aux():
    cfg = model_cfg(moe_cfg("null"), mode="lm", moe_every=2)
    model = Transformer(cfg, rngs=nnx.Rngs(3))
    tokens, _ = inputs(3)
    logits, aux = nnx.jit(lambda m, t: m(t))(model, tokens)
    assert logits.shape == (B, L, V) and logits.dtype == jnp.float32
    assert len(aux["moe"]) == 1 and cfg.moe_layers == (1,)
    np.testing.assert_array_equal(aux["modality"], np.ones((B, L)))
    np.testing.assert_allclose(aux["aux_loss"], aux["moe"][0]["aux_loss"])
    with pytest.raises(ValueError, match="lm"):
        model(tokens, jnp.zeros((B, 8, 8, 3)))


def test_vlm_modality_reaches_moe_stats():
    cfg = model_cfg(moe_cfg("null"))
    _, aux = nnx.jit(lambda m, t, i: m(t, i))(Transformer(cfg, rngs=nnx.Rngs(4)), *inputs(4))
    p = cfg.num_patches
    np.testing.assert_array_equal(aux["modality"][:, :p], 0)
    np.testing.assert_array_equal(aux["modality"][:, p:], 1)
    np.testing.assert_allclose(aux["moe"][0]["modality_tokens"], [B * p, B * L])
    total = sum(float(a["aux_loss"]) for a in aux["moe"])
    np.testing.assert_allclose(aux["aux_loss"], total, rtol=1e-6)


def test_expert_choice_refused_then_leaks_when_allowed():
    ec = moe_cfg("expert_choice", capacity_factor=1.0, causal=False)
    with pytest.raises(ValueError, match="allow_noncausal"):
        model_cfg(ec)  # the decoder is causal: MoEConfig's one flag must accept the leak
    model = Transformer(model_cfg(ec.replace(allow_noncausal=True)), rngs=nnx.Rngs(5))
    tokens, images = inputs(5)
    base = forward(model, tokens, images)
    j = 4
    pert = tokens.at[:, j:].set((tokens[:, j:] + 11) % V)  # change every token from j on
    out = forward(model, pert, images)
    assert float(jnp.max(jnp.abs(out[:, :j] - base[:, :j]))) > 1e-4  # the past saw the future


@pytest.mark.parametrize(
    "kw",
    [
        dict(moe=None),
        dict(moe=moe_cfg("null", shared_d_ff=8), moe_every=2, tie_embeddings=False),
        dict(moe=moe_cfg("topk", activation="gelu", expert_bias=True), vision_encoder="vit"),
        dict(moe=moe_cfg("null"), mode="lm", n_kv_heads=4),
    ],
)
def test_param_count_matches_formula(kw):
    cfg = model_cfg(**kw)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    n = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    s = model_summary(cfg)
    assert s["total_params"] == n
    assert s["active_params_per_token"] <= n
    assert "params" in format_summary(cfg)


def test_summary_active_params_and_flops_follow_rho():
    dense_k = model_summary(model_cfg(moe_cfg("null", rho=1.0, top_k=2)))
    sparse_k = model_summary(model_cfg(moe_cfg("null", rho=0.5, top_k=4)))  # same E[K] = 2
    assert dense_k["expected_real_experts"] == sparse_k["expected_real_experts"] == 2.0
    np.testing.assert_allclose(
        dense_k["active_params_per_token"], sparse_k["active_params_per_token"]
    )
    # a rho=0.5 K=2 model does half the expert work of K=2 rho=1.
    half = model_summary(model_cfg(moe_cfg("null", rho=0.5, top_k=2)))
    assert half["ffn_flops_per_token"] < dense_k["ffn_flops_per_token"]


def test_next_token_loss_semantics():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(2, 5, 7)), jnp.float32)
    tokens = jnp.asarray(rng.integers(0, 7, size=(2, 5)), jnp.int32)
    mask = jnp.asarray([[1, 1, 1, 0, 0], [1, 0, 1, 1, 1]], bool)
    loss, count = next_token_loss(logits, tokens, mask)
    lp = jax.nn.log_softmax(logits, axis=-1)
    terms = [-lp[b, i, tokens[b, i + 1]] for b in range(2) for i in range(4) if mask[b, i + 1]]
    assert int(count) == len(terms) == 5
    np.testing.assert_allclose(loss, np.mean(terms), rtol=1e-6)


def test_config_errors_name_the_field():
    for kw, field in [
        (dict(n_kv_heads=3), "n_kv_heads"),
        (dict(patch_size=3), "patch_size"),
        (dict(mode="enc"), "mode"),
        (dict(moe=moe_cfg("null"), moe_every=3), "moe_every"),
        (dict(moe=moe_cfg("null", d_model=16)), "moe"),
        (dict(dtype="float16"), "dtype"),
    ]:
        with pytest.raises(ValueError, match=f"ModelConfig.{field}="):
            model_cfg(**kw)


def test_bf16_compute_and_remat_keep_fp32_params_and_grads():
    cfg = model_cfg(moe_cfg("null"), dtype="bfloat16", remat=True)
    model = Transformer(cfg, rngs=nnx.Rngs(6))
    tokens, images = inputs(6)
    loss_fn = lambda m: next_token_loss(m(tokens, images)[0], tokens, jnp.ones_like(tokens))[0]
    loss, grads = nnx.jit(nnx.value_and_grad(loss_fn))(model)
    for g in jax.tree.leaves(grads):
        assert g.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(g)))
    ref = Transformer(cfg.replace(dtype="float32", remat=False), rngs=nnx.Rngs(6))
    np.testing.assert_allclose(loss, nnx.jit(loss_fn)(ref), rtol=2e-2)


def test_vlm_with_null_experts_overfits_a_few_scenes():
    from moe_jax import data

    dcfg = data.DataConfig(kind="shapes", image_size=16, patch_size=4, text_len=12, max_shapes=1)
    src, to_example = data.make_source(dcfg, "train"), data.ToExample(dcfg)
    examples = [to_example(src[i]) for i in range(6)]
    batch = {k: jnp.asarray(np.stack([e[k] for e in examples])) for k in examples[0]}
    vocab = data.make_tokenizer(dcfg).vocab_size
    cfg = model_cfg(
        moe_cfg("null", top_k=4), vocab_size=vocab, image_size=16, patch_size=4, max_len=12
    )
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.adamw(1e-2, weight_decay=0.0), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, batch):
        def loss_fn(model):
            logits, aux = model(batch["tokens"], batch["image"])
            loss, _ = cross_entropy(logits, batch["targets"], batch["loss_mask"])
            return loss + aux["aux_loss"], loss

        (_, loss), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        opt.update(model, grads)
        return loss

    losses = [float(step(model, opt, batch)) for _ in range(30)]
    assert np.isfinite(losses).all()
    assert losses[-1] < 0.2 * losses[0], losses


def test_bad_text_inputs_are_refused_on_the_host():
    """Ids past the vocabulary (NaN logits) or negative (they wrap), an empty sequence (NaN
    aux), generate running past max_len and a numpy-integer cache position past the cache:
    each a ValueError before anything is computed."""
    model = Transformer(model_cfg(moe_cfg("null")), rngs=nnx.Rngs(4))
    tokens, images = inputs(4)
    for bad in (V, -1):
        with pytest.raises(ValueError, match=rf"token ids must lie in \[0, {V}\)"):
            model(tokens.at[1, 2].set(bad), images)
        with pytest.raises(ValueError, match=r"token ids must lie in"):
            generate(model, images, tokens[:, :3].at[0, 0].set(bad), 2)
    with pytest.raises(ValueError, match="text length 0"):
        model(tokens[:, :0], images)
    with pytest.raises(ValueError, match=r"runs past ModelConfig\.max_len=16"):
        generate(model, images, tokens[:, :10], 7)
    cache = model.init_cache(B, 8)
    with pytest.raises(ValueError, match="pos=8 is past the cache length 8"):
        model.decode_step(tokens[:, :1], cache, np.int64(8))
    with pytest.raises(ValueError, match="holds no token"):
        model.stack.scanned.blocks[0].ffn(jnp.zeros((B, 0, 32)))  # checked before compute
