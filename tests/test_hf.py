"""Hugging Face checkpoints in: logits equal the transformers PyTorch forward per architecture
(f32 and bf16), the sharded index is read, unsupported configs are refused by name before any
tensor is read, and loading streams (host memory beyond the model stays about one tensor)."""

from __future__ import annotations

import json
import os
import tracemalloc

import hf_models as H
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch  # the [test] extra installs it (a missing torch fails, never skips)
from flax import nnx

from moe_jax import hf
from moe_jax.hf.safetensors import CheckpointReader, save_file

BF16_ATOL = 0.08  # bf16: |ours - transformers bf16| in logits of magnitude ~3 (measured <= 0.04)


@pytest.fixture(scope="module", params=sorted(H.ARCHS))
def checkpoint(request, tmp_path_factory):
    arch = request.param
    model = H.build(arch)
    root = tmp_path_factory.mktemp(arch)
    shard = {"max_shard_size": "60KB"} if arch == "qwen2" else {}
    f32 = H.save(model, str(root / "f32"), **shard)
    ref = H.torch_logits(model, H.tokens())
    model_bf16 = model.to(torch.bfloat16)
    bf16 = H.save(model_bf16, str(root / "bf16"))
    return arch, f32, bf16, ref, H.torch_logits(model_bf16, H.tokens())


def _logits(model, tokens):
    return np.asarray(model(jnp.asarray(tokens), deterministic=True)[0])


def test_logits_equal_transformers_f32(checkpoint):
    arch, path, _, ref, _ = checkpoint
    if arch == "qwen2":  # saved in shards: the index path is the one read
        assert os.path.isfile(os.path.join(path, "model.safetensors.index.json"))
    model, cfg = hf.load_model(path, "float32")
    assert cfg.mode == "lm" and not cfg.moe_layers
    np.testing.assert_allclose(_logits(model, H.tokens()), ref, atol=2e-5, rtol=1e-5)


def test_logits_equal_transformers_bf16(checkpoint):
    """A bf16 checkpoint (BF16 tensors) loaded in bf16 against transformers in bf16."""
    _, _, path, ref_f32, ref_bf16 = checkpoint
    model, cfg = hf.load_model(path, "bfloat16")
    assert model.stack.scanned.blocks[0].attn.wq.kernel[...].dtype == jnp.bfloat16
    ours = _logits(model, H.tokens())
    np.testing.assert_allclose(ours, ref_bf16, atol=BF16_ATOL, rtol=0)
    # and it is the f32 model up to bf16 rounding (not a different function)
    assert np.abs(ours - ref_f32).max() < BF16_ATOL


def test_fidelity_fields_matter(checkpoint):
    """The config fields the mapping reads change the logits: dropping one breaks equality,
    so the equality tests above are not vacuous."""
    arch, path, _, ref, _ = checkpoint
    field = {"llama": "rope_scaling", "qwen2": "rope_theta", "mistral": "sliding_window"}[arch]
    cfg = hf.model_config(hf.read_config(path))
    wrong = {"rope_scaling": "none", "rope_theta": 10_000.0, "sliding_window": None}[field]
    cfg = cfg.replace(**{field: wrong})
    graphdef, state = hf.load.abstract_model(cfg)
    reader = CheckpointReader(path)
    nnx.replace_by_pure_dict(state, hf.load.load_params(reader, cfg, nnx.to_pure_dict(state)))
    assert np.abs(_logits(nnx.merge(graphdef, state), H.tokens()) - ref).max() > 1e-3


def _with_config(path, tmp_path, **changes):
    cfg = hf.read_config(path)
    cfg.update(changes)
    os.makedirs(tmp_path, exist_ok=True)
    with open(os.path.join(tmp_path, "config.json"), "w") as f:
        json.dump(cfg, f)
    return str(tmp_path)  # no tensors: a refusal must come before any is read


@pytest.mark.parametrize(
    "changes,named",
    [
        ({"architectures": ["GPT2LMHeadModel"]}, "architectures"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "rope_parameters.rope_type"),
        ({"quantization_config": {"quant_method": "gptq"}}, "quantization_config"),
        ({"layer_types": ["full_attention", "sliding_attention"]}, "layer_types"),
    ],
)
def test_unsupported_configs_are_named(checkpoint, tmp_path, changes, named):
    _, path, _, _, _ = checkpoint
    bad = _with_config(path, tmp_path, **changes)
    with pytest.raises(hf.UnsupportedCheckpointError, match=named.replace(".", r"\.")):
        hf.load_model(bad)


def test_shape_mismatch_names_tensor(checkpoint, tmp_path):
    _, path, _, _, _ = checkpoint
    bad = _with_config(path, tmp_path, intermediate_size=2 * H.F)
    for name in os.listdir(path):
        if name.endswith((".safetensors", ".json")) and name != "config.json":
            os.symlink(os.path.join(path, name), os.path.join(bad, name))
    with pytest.raises(ValueError, match=r"mlp\.gate_proj\.weight has shape"):
        hf.load_model(bad)


def _random_checkpoint(directory, d=256, f=1024, layers=4, vocab=1024):
    """A Llama checkpoint written with numpy (bigger than the torch ones; no torch needed)."""
    rng = np.random.default_rng(0)
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **dict(vocab_size=vocab, hidden_size=d, intermediate_size=f, num_hidden_layers=layers),
        **dict(num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64),
    }
    mcfg = hf.model_config(cfg)
    abstract = nnx.to_pure_dict(hf.load.abstract_model(mcfg.replace(scan_layers=False))[1])
    tensors = {}
    for name, path, transpose in hf.weight_map(mcfg):
        leaf = abstract
        for key in path:
            leaf = leaf[key]
        shape = leaf.shape[::-1] if transpose else leaf.shape
        tensors[name] = rng.normal(size=shape).astype(np.float32)
    os.makedirs(directory)
    save_file(os.path.join(directory, "model.safetensors"), tensors)
    with open(os.path.join(directory, "config.json"), "w") as fh:
        json.dump(cfg, fh)
    return directory, tensors


def test_loading_streams_one_tensor_at_a_time(tmp_path):
    """Host allocations during the load beyond what the loaded model keeps stay within three
    copies of the largest tensor (as read, converted / transposed, handed to the device); a
    read-everything-then-convert loader would hold the whole checkpoint (here 18x) again."""
    path, tensors = _random_checkpoint(str(tmp_path / "ckpt"))
    total = sum(t.nbytes for t in tensors.values())
    largest = max(t.nbytes for t in tensors.values())
    cfg = hf.model_config(hf.read_config(path)).replace(scan_layers=False)
    graphdef, state = hf.load.abstract_model(cfg)
    abstract = nnx.to_pure_dict(state)
    reader = CheckpointReader(path)
    tracemalloc.start()
    params = hf.load.load_params(reader, cfg, abstract)
    jax.block_until_ready(params)
    current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    transient = peak - current
    assert transient <= 3 * largest + (1 << 19), (transient, largest, total)
    assert total > 16 * largest  # the bound above is far below one copy of the model
    got = np.asarray(params["blocks"][1]["ffn"]["w_out"]["kernel"])
    np.testing.assert_array_equal(got, tensors["model.layers.1.mlp.down_proj.weight"].T)


def test_loading_onto_a_sharding(checkpoint):
    """Each tensor goes straight onto the given sharding (2 fake CPU devices when present)."""
    _, path, _, ref, _ = checkpoint
    devices = jax.devices()[:2]
    mesh = jax.make_mesh((len(devices),), ("x",), devices=devices)
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "x"))

    def place(name, shape):
        return split if name.endswith("w_in.kernel") and shape[1] % len(devices) == 0 else rep

    model, _ = hf.load_model(path, sharding=place, scan_layers=False)
    assert model.blocks[0].ffn.w_in.kernel[...].sharding == split
    np.testing.assert_allclose(_logits(model, H.tokens()), ref, atol=2e-5, rtol=1e-5)
    model, _ = hf.load_model(path, sharding=place)  # scanned: [G, D, F] split as P(None, None, x)
    w_in = model.stack.scanned.blocks[0].ffn.w_in.kernel[...]
    assert w_in.sharding.spec == jax.sharding.PartitionSpec(None, None, "x")
    np.testing.assert_allclose(_logits(model, H.tokens()), ref, atol=2e-5, rtol=1e-5)


def test_tied_config_with_a_distinct_head_is_refused(tmp_path):
    """tie_word_embeddings: true next to an lm_head.weight that is not the embedding: loading it
    tied would silently change the logits (transformers uses the stored head), so the load is
    refused naming the conflict; a head equal to the embedding is the tied copy and loads."""
    path, tensors = _random_checkpoint(str(tmp_path / "ckpt"), d=32, f=64, layers=1, vocab=64)
    cfg = hf.read_config(path)
    cfg["tie_word_embeddings"] = True
    with open(os.path.join(path, "config.json"), "w") as fh:
        json.dump(cfg, fh)
    with pytest.raises(ValueError, match=r"tie_word_embeddings.*lm_head\.weight differs"):
        hf.load_model(path)
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].copy()
    save_file(os.path.join(path, "model.safetensors"), tensors)
    model, mcfg = hf.load_model(path)
    assert mcfg.tie_embeddings
