"""Write moe_jax models out: as a Mixtral checkpoint (top-k MoE) or in moe_jax's own format.

Mixtral (`export_mixtral(model, dir)`; transformers' MixtralForCausalLM loads it and gives the
same logits). Only a model Mixtral can express is written; anything else is refused naming
the field: text mode, an MoE layer in every block, router="topk" with renormalized gates
(Mixtral: softmax over N, top-K, gates renormalized over the K), no capacity, no
selection bias, SwiGLU experts without biases, no shared expert, no attention biases.
Tensors (HF [out, in] = transposed nnx kernels), per layer i and expert e:
    block_sparse_moe.gate.weight         <- ffn/router/kernel^T        [N, D]
    block_sparse_moe.experts.{e}.w1      <- ffn/w_gate[e]^T (gate)     [F, D]
    block_sparse_moe.experts.{e}.w3      <- ffn/w_in[e]^T   (up)       [F, D]
    block_sparse_moe.experts.{e}.w2      <- ffn/w_out[e]^T  (down)     [D, F]
and attention, norms, embeddings and head as in moe_jax.hf.load.

moe_jax format (`save_native(model, dir)` / `load_native(dir)`): any Transformer, e.g. a
null-expert model that no Hugging Face architecture can express. The folder holds
    moe_jax_config.json   {"format": "moe_jax", "version": 1, "model": ModelConfig fields,
                           with "moe": MoEConfig fields or null}
    model.safetensors     every array variable of the model (parameters, and state such as
                          the router's selection bias) under its nnx path joined by "." (e.g.
                          "blocks.0.ffn.router.kernel": [D, N+1], column N the null logit),
                          in the moe_jax unrolled layout ("blocks.{i}...", whatever the
                          model's scan_layers) and stored dtype, nothing transposed
load_native rebuilds the model exactly (every array bit-identical), streaming like load_model.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np
from flax import nnx

from moe_jax.core.config import MoEConfig
from moe_jax.hf.load import Sharding, abstract_model, weight_map
from moe_jax.hf.safetensors import SINGLE, CheckpointReader, save_file
from moe_jax.model import ModelConfig, Transformer
from moe_jax.model.stack import to_layout, unstack_params

NATIVE_CONFIG = "moe_jax_config.json"
FORMAT_VERSION = 1


class UnsupportedExportError(ValueError):
    """The model has a feature the target format cannot express; the message names it."""


def _refuse(field: str, value, allowed: str) -> UnsupportedExportError:
    return UnsupportedExportError(f"Mixtral export: {field}={value!r} is unsupported: {allowed}")


def check_mixtral(cfg: ModelConfig) -> None:
    """Raises UnsupportedExportError naming the first field Mixtral cannot express."""
    m = cfg.moe
    checks = [
        (cfg.mode == "lm", "mode", cfg.mode, "'lm'"),
        (m is not None and cfg.moe_every == 1, "moe_every", cfg.moe_every, "1 (every block MoE)"),
        (not cfg.qkv_bias, "qkv_bias", cfg.qkv_bias, "False"),
        (not cfg.attn_out_bias, "attn_out_bias", cfg.attn_out_bias, "False"),
    ]
    if m is not None:
        checks += [
            (m.router == "topk", "moe.router", m.router, "'topk'"),
            (m.renormalize, "moe.renormalize", m.renormalize, "True"),
            (m.capacity_factor is None, "moe.capacity_factor", m.capacity_factor, "None"),
            (m.activation == "swiglu", "moe.activation", m.activation, "'swiglu'"),
            (not m.expert_bias, "moe.expert_bias", m.expert_bias, "False"),
            (m.shared_d_ff == 0, "moe.shared_d_ff", m.shared_d_ff, "0"),
            (not m.uses_selection_bias, "moe.bias_update_rate", m.bias_update_rate, "0"),
        ]
    for ok, field, value, allowed in checks:
        if not ok:
            raise _refuse(field, value, allowed)


def mixtral_config(cfg: ModelConfig, dtype: str) -> dict:
    """The config.json of the Mixtral equivalent of `cfg` (check_mixtral first)."""
    rope = {"rope_type": "default" if cfg.rope_scaling == "none" else cfg.rope_scaling}
    rope["rope_theta"] = cfg.rope_theta
    if cfg.rope_scaling != "none":
        rope["factor"] = cfg.rope_factor
    if cfg.rope_scaling == "llama3":
        rope.update(
            low_freq_factor=cfg.rope_low_freq_factor,
            high_freq_factor=cfg.rope_high_freq_factor,
            original_max_position_embeddings=cfg.rope_original_max_len,
        )
    return {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.moe.d_ff,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_parameters": rope,
        "rope_theta": cfg.rope_theta,
        "sliding_window": cfg.sliding_window,
        "tie_word_embeddings": cfg.tie_embeddings,
        "num_local_experts": cfg.moe.num_experts,
        "num_experts_per_tok": cfg.moe.top_k,
        "router_jitter_noise": 0.0,
        "output_router_logits": False,
        "attention_dropout": 0.0,
        "dtype": dtype,
    }


def _host(x, dtype) -> np.ndarray:
    return np.asarray(jax.device_get(x)).astype(dtype)


def export_mixtral(model: Transformer, directory: str, dtype: str | None = None) -> str:
    """Writes `model` as a Mixtral checkpoint (config.json + model.safetensors) in `directory`,
    which ``MixtralForCausalLM.from_pretrained(directory)`` loads.

    Args:
        model: a text Transformer (mode "lm") whose every block is a top-k MoE layer.
        directory: the folder to write (created if missing).
        dtype: "float32" / "bfloat16" for the tensors; default the model's param_dtype.

    Returns:
        ``directory``.

    Raises:
        UnsupportedExportError: a feature Mixtral cannot express (null / threshold / expert
            choice routers, shared experts, selection biases, biases, dense blocks, ...),
            naming the first such field; use save_native for those models.
    """
    cfg = model.cfg
    check_mixtral(cfg)
    dtype = dtype or cfg.param_dtype
    np_dtype = np.dtype(jax.numpy.dtype(dtype))
    params = unstack_params(cfg, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    tensors = {}
    dense = cfg.replace(moe=None, moe_every=0)
    for name, path, transpose in weight_map(dense):
        if "mlp." in name:
            continue
        leaf = params
        for key in path:
            leaf = leaf[key]
        a = _host(leaf, np_dtype)
        tensors[name] = np.ascontiguousarray(a.T if transpose else a)
    for i in range(cfg.n_layers):
        ffn, pre = params["blocks"][i]["ffn"], f"model.layers.{i}.block_sparse_moe."
        tensors[pre + "gate.weight"] = np.ascontiguousarray(
            _host(ffn["router"]["kernel"], np_dtype).T
        )
        for hf_name, ours in (("w1", "w_gate"), ("w3", "w_in"), ("w2", "w_out")):
            stack = _host(ffn[ours], np_dtype)  # [N, D, F] or [N, F, D]
            for e in range(cfg.moe.num_experts):
                tensors[f"{pre}experts.{e}.{hf_name}.weight"] = np.ascontiguousarray(stack[e].T)
    os.makedirs(directory, exist_ok=True)
    save_file(os.path.join(directory, SINGLE), tensors, {"format": "pt"})
    with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
        json.dump(mixtral_config(cfg, dtype), f, indent=1)
    return directory


def _path_name(path) -> str:
    return ".".join(str(getattr(k, "key", k)) for k in path)


def save_native(model: Transformer, directory: str) -> str:
    """Writes any moe_jax Transformer in the moe_jax format (module docstring): every array,
    null experts and selection biases included, as it is.

    Args:
        model: the Transformer.
        directory: the folder to write (created if missing): moe_jax_config.json and
            model.safetensors under nnx paths.

    Returns:
        ``directory``.

    Raises:
        ValueError: the safetensors file cannot be written (naming the reason).
    """
    state = nnx.state(model, nnx.Not(nnx.Intermediate))
    tensors = {
        _path_name(path): np.asarray(jax.device_get(leaf))
        for path, leaf in jax.tree_util.tree_leaves_with_path(
            unstack_params(model.cfg, nnx.to_pure_dict(state))
        )
    }
    cfg = dataclasses.asdict(model.cfg)
    os.makedirs(directory, exist_ok=True)
    save_file(os.path.join(directory, SINGLE), tensors, {"format": "moe_jax"})
    with open(os.path.join(directory, NATIVE_CONFIG), "w", encoding="utf-8") as f:
        json.dump({"format": "moe_jax", "version": FORMAT_VERSION, "model": cfg}, f, indent=1)
    return directory


def native_config(directory: str) -> ModelConfig:
    path = os.path.join(directory, NATIVE_CONFIG)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory}: no {NATIVE_CONFIG} (not a moe_jax export)")
    with open(path, encoding="utf-8") as f:
        meta = json.load(f)
    if meta.get("format") != "moe_jax" or meta.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format {meta.get('format')} v{meta.get('version')} unknown")
    fields = dict(meta["model"])
    moe = fields.pop("moe")
    if moe is not None:
        if isinstance(moe.get("lb_axis_name"), list):
            moe["lb_axis_name"] = tuple(moe["lb_axis_name"])
        moe = MoEConfig(**moe)
    return ModelConfig(**fields, moe=moe)


def load_native(
    directory: str, *, sharding: Sharding = None, scan_layers: bool | None = None
) -> tuple[Transformer, ModelConfig]:
    """(model, model_config) from a save_native folder; every array as it was saved.

    Args:
        directory: a folder written by save_native.
        sharding: as load_model's: None, one Sharding, or a callable (path, shape) -> Sharding
            (called with the unrolled names of the file).
        scan_layers: the layout to build (ModelConfig.scan_layers); None = as saved. The file
            does not depend on it.

    Raises:
        FileNotFoundError: no moe_jax_config.json in the folder.
        ValueError: an unknown format version, or saved arrays that do not match the config's
            model (names, shapes, dtypes).
    """
    cfg = native_config(directory)
    if scan_layers is not None:
        cfg = cfg.replace(scan_layers=scan_layers)
    _, state = abstract_model(cfg.replace(scan_layers=False))
    pure = nnx.to_pure_dict(state)
    reader = CheckpointReader(directory)
    leaves = jax.tree_util.tree_leaves_with_path(pure)
    names = {_path_name(p) for p, _ in leaves}
    if names != set(reader.keys()):
        diff = sorted(names ^ set(reader.keys()))[:5]
        raise ValueError(f"{directory}: saved arrays do not match the config's model: {diff}")

    def fill(path, leaf):
        name = _path_name(path)
        src = reader.get(name)
        if tuple(src.shape) != tuple(leaf.shape) or src.dtype != leaf.dtype:
            raise ValueError(f"{directory}: {name} is {src.dtype}{src.shape}, want {leaf}")
        target = sharding(name, tuple(leaf.shape)) if callable(sharding) else sharding
        if target is None:
            return jax.device_put(np.array(src))
        return jax.make_array_from_callback(src.shape, target, lambda idx: np.array(src[idx]))

    try:
        pure = to_layout(cfg, jax.tree_util.tree_map_with_path(fill, pure))
    finally:
        reader.close()
    graphdef, state = abstract_model(cfg)
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state), cfg
