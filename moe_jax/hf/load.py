"""Load a Hugging Face Llama / Qwen2 / Mistral checkpoint into the moe_jax Transformer.

    model, cfg = load_model("/path/to/checkpoint", dtype="bfloat16")
    logits, aux = model(tokens)        # tokens int [B, L]; logits [B, L, V] fp32

Name mapping (HF weight [out, in] -> nnx kernel [in, out], i.e. transposed):
    model.embed_tokens.weight                  -> embed/embedding            (as is)
    model.layers.{i}.input_layernorm.weight    -> blocks/{i}/attn_norm/scale
    model.layers.{i}.self_attn.{q,k,v,o}_proj  -> blocks/{i}/attn/{wq,wk,wv,wo} (kernel, bias)
    model.layers.{i}.post_attention_layernorm  -> blocks/{i}/ffn_norm/scale
    model.layers.{i}.mlp.{gate,up,down}_proj   -> blocks/{i}/ffn/{w_gate,w_in,w_out}/kernel
    model.norm.weight                          -> final_norm/scale
    lm_head.weight                             -> head/kernel (untied only)
With ModelConfig.scan_layers (the default) the tensors are read into these unrolled paths, then
stacked into the scanned layout (moe_jax.model.stack.stack_params); a callable sharding sees
the unrolled names. Both use the half-split ("rotate_half") RoPE layout and the same head order, so q / k need no
permutation. The model is first built abstractly (nnx.eval_shape, nothing allocated); then each
tensor is read from its file, converted to param_dtype (and transposed), placed on its device
or sharding and dropped, so host memory peaks at about three copies of one tensor (as read,
as converted, as handed to the device) beyond the model (tests/test_hf.py measures it).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np
from flax import nnx

from moe_jax.hf.config import model_config, read_config
from moe_jax.hf.safetensors import CheckpointReader
from moe_jax.model import ModelConfig, Transformer
from moe_jax.model.stack import stack_params, to_layout, unstack_params

# Checkpoint tensors that hold no parameter (recomputed buffers).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

Sharding = jax.sharding.Sharding | Callable[[str, tuple[int, ...]], jax.sharding.Sharding] | None


def weight_map(cfg: ModelConfig) -> list[tuple[str, tuple, bool]]:
    """[(HF tensor name, moe_jax parameter path, transposed)] for a dense text model.

    Args:
        cfg: the dense text model (mode "lm"), e.g. from model_config.
    """
    out = [("model.embed_tokens.weight", ("embed", "embedding"), False)]
    for i in range(cfg.n_layers):
        pre, blk = f"model.layers.{i}.", ("blocks", i)
        out.append((pre + "input_layernorm.weight", (*blk, "attn_norm", "scale"), False))
        for proj, name in (("q", "wq"), ("k", "wk"), ("v", "wv"), ("o", "wo")):
            hf = f"{pre}self_attn.{proj}_proj."
            out.append((hf + "weight", (*blk, "attn", name, "kernel"), True))
            if (cfg.qkv_bias and proj != "o") or (cfg.attn_out_bias and proj == "o"):
                out.append((hf + "bias", (*blk, "attn", name, "bias"), False))
        out.append((pre + "post_attention_layernorm.weight", (*blk, "ffn_norm", "scale"), False))
        for proj, name in (("gate", "w_gate"), ("up", "w_in"), ("down", "w_out")):
            out.append((f"{pre}mlp.{proj}_proj.weight", (*blk, "ffn", name, "kernel"), True))
    out.append(("model.norm.weight", ("final_norm", "scale"), False))
    if not cfg.tie_embeddings:
        out.append(("lm_head.weight", ("head", "kernel"), True))
    return out


def _place(src: np.ndarray, transpose: bool, dtype, sharding) -> jax.Array:
    """One tensor onto its device: a sharded target reads only its local slices."""
    view = src.T if transpose else src
    if sharding is None:
        host = np.ascontiguousarray(view, dtype=dtype)  # the one host copy of this tensor
        out = jax.device_put(host)
    else:
        out = jax.make_array_from_callback(
            view.shape, sharding, lambda idx: np.ascontiguousarray(view[idx], dtype=dtype)
        )
    return out.block_until_ready()  # the transfer is done: the host buffers can go now


def _set(tree: dict, path: tuple, value) -> None:
    for key in path[:-1]:
        tree = tree[key]
    tree[path[-1]] = value


def _get(tree: dict, path: tuple):
    for key in path:
        tree = tree[key]
    return tree


def load_params(
    reader: CheckpointReader, cfg: ModelConfig, abstract: dict, sharding: Sharding = None
) -> dict:
    """Fills the pure-dict `abstract` (ShapeDtypeStruct leaves of the dense model, either
    layout) from the checkpoint, tensor by tensor; checks every shape and that every tensor is
    used. Returns it in its layout."""
    if "stack" in abstract:  # scanned: fill the unrolled paths, then stack
        flat = load_params(reader, cfg, unstack_params(cfg, abstract), sharding)
        return stack_params(cfg.replace(scan_layers=True), flat)
    used = set()
    for name, path, transpose in weight_map(cfg):
        if name not in reader:
            raise ValueError(f"{reader.directory}: the checkpoint has no tensor {name!r}")
        want = _get(abstract, path)
        shape = reader.shape(name)[::-1] if transpose else reader.shape(name)
        if tuple(shape) != tuple(want.shape):
            raise ValueError(
                f"{reader.directory}: tensor {name} has shape {reader.shape(name)}, the config "
                f"implies {tuple(want.shape)} for {'/'.join(map(str, path))}"
                + (" (transposed)" if transpose else "")
            )
        target = (
            sharding(".".join(map(str, path)), tuple(want.shape))
            if callable(sharding)
            else sharding
        )
        _set(abstract, path, _place(reader.get(name), transpose, np.dtype(want.dtype), target))
        used.add(name)
    if cfg.tie_embeddings and "lm_head.weight" in reader:
        # Some tied checkpoints store the head's copy too; a head that differs is a conflict
        # (transformers would use it, a tied model cannot): refuse rather than drop it.
        head, embed = reader.get("lm_head.weight"), reader.get("model.embed_tokens.weight")
        if head.shape != embed.shape or not np.array_equal(head, embed):
            raise ValueError(
                f"{reader.directory}: config.json sets tie_word_embeddings: true, but "
                "lm_head.weight differs from model.embed_tokens.weight, so the checkpoint's "
                "head is not the tied one. Set tie_word_embeddings to false in config.json to "
                "load its separate head (what transformers computes with), or drop "
                "lm_head.weight to load it tied."
            )
        used.add("lm_head.weight")
    extra = [k for k in reader.keys() if k not in used and not k.endswith(IGNORED_SUFFIXES)]
    if extra:
        raise ValueError(
            f"{reader.directory}: tensors the architecture does not use: {extra[:5]}"
            f"{' ...' if len(extra) > 5 else ''} (an unsupported variant of the architecture?)"
        )
    return abstract


def abstract_model(cfg: ModelConfig):
    """(graphdef, state) of cfg's Transformer with ShapeDtypeStruct leaves (nothing allocated)."""
    return nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))


def read_model(
    reader: CheckpointReader, cfg: ModelConfig, sharding: Sharding = None
) -> Transformer:
    """cfg's Transformer with the checkpoint's weights, in the layout cfg.scan_layers asks."""
    _, state = abstract_model(cfg.replace(scan_layers=False))
    pure = to_layout(cfg, load_params(reader, cfg, nnx.to_pure_dict(state), sharding))
    graphdef, state = abstract_model(cfg)
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)


def load_model(
    path: str,
    dtype: str = "float32",
    *,
    param_dtype: str | None = None,
    sharding: Sharding = None,
    scan_layers: bool = True,
) -> tuple[Transformer, ModelConfig]:
    """(model, model_config) of a checkpoint directory (config.json + safetensors).

    Tensors are read one at a time and placed straight onto their devices; ``model(tokens
    [B, L])[0]`` are the logits [B, L, V].

    Args:
        path: a Llama / Qwen2 / Mistral checkpoint folder: config.json and model.safetensors
            (or shards with model.safetensors.index.json).
        dtype: compute dtype, "float32" or "bfloat16".
        param_dtype: parameter dtype (default = dtype).
        sharding: None (default device), one jax.sharding.Sharding for every parameter, or
            a callable (parameter path "blocks.0.attn.wq.kernel", shape) -> Sharding; with
            scan_layers the stacked arrays keep it behind an unsplit layer axis.
        scan_layers: build the scanned layout (ModelConfig.scan_layers) or the unrolled one.

    Raises:
        UnsupportedCheckpointError: another architecture or a config field that cannot be
            read exactly (named), before any tensor is read.
        FileNotFoundError: no config.json or no safetensors file.
        ValueError: a tensor missing, of another shape than the config implies, unused, or
            a file that is not valid safetensors (naming the file and tensor).
    """
    cfg = model_config(read_config(path), dtype=dtype, param_dtype=param_dtype, where=path)
    cfg = cfg.replace(scan_layers=scan_layers)
    reader = CheckpointReader(path)
    try:
        return read_model(reader, cfg, sharding), cfg
    finally:
        reader.close()
