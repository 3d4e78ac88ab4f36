"""Start training from a Hugging Face dense checkpoint: load it, then upcycle its FFNs.

    model = upcycle_checkpoint(path, moe_cfg, granularity=4, rng=jax.random.key(0))

Every dense SwiGLU FFN of hidden F0 in an MoE block becomes N experts of hidden F0 / g
(expert e holds slice e % g of the dense units; N / g copies of the whole FFN), a fraction of
each expert's units is re-initialized, and a fresh router (with the null logit column for
router="null") is drawn; see moe_jax.model.upcycle for the layout and the re-initialization.

What the upcycled model keeps (tests/test_hf_train.py): with reinit_fraction=0 and
output_scale=g, a router that selects every real expert with equal gates 1/N reproduces the
dense checkpoint's logits exactly: each slice appears N / g times at weight 1/N, so the
routed sum is (1/g) * FFN and output_scale restores it. That is top_k = N with a zeroed router
for router="topk"; for router="null" the same with the null logit below every real logit (the
null slots then lose every comparison, r = min(K, N) = N). A fresh random router instead
mixes the slices with unequal gates, so the step-0 output differs from the dense model by an
amount that grows with the router's init scale; training starts from there.
"""

from __future__ import annotations

import jax
from flax import nnx

from moe_jax.core.config import MoEConfig
from moe_jax.hf.config import model_config, read_config
from moe_jax.hf.load import read_model
from moe_jax.hf.safetensors import CheckpointReader
from moe_jax.model import ModelConfig, Transformer
from moe_jax.model.upcycle import upcycle


def checkpoint_model_config(path: str, **overrides) -> ModelConfig:
    """The dense ModelConfig of a checkpoint, with fields replaced (dtype, max_len, ...)."""
    return model_config(read_config(path), where=path).replace(**overrides)


def load_dense(path: str, cfg: ModelConfig) -> Transformer:
    """The checkpoint's weights in a dense Transformer of config `cfg` (as from
    checkpoint_model_config; dtypes and max_len may differ from the checkpoint's)."""
    reader = CheckpointReader(path)
    try:
        return read_model(reader, cfg)
    finally:
        reader.close()


def upcycle_checkpoint(
    path: str,
    moe_cfg: MoEConfig,
    granularity: int,
    reinit_fraction: float = 0.3,
    *,
    rng: jax.Array,
    moe_every: int = 1,
    output_scale: float = 1.0,
    dense_cfg: ModelConfig | None = None,
) -> Transformer:
    """An MoE Transformer upcycled from the dense checkpoint at `path` (module docstring).
    moe_cfg.d_ff must be intermediate_size / granularity; dense_cfg defaults to the
    checkpoint's own config (pass one to change dtypes or max_len).

    Args:
        path: a dense Llama / Qwen2 / Mistral checkpoint folder (see load_model).
        moe_cfg: the MoE layer: N = num_experts (a multiple of granularity), F = d_ff =
            intermediate_size / granularity, router, K, rho.
        granularity: g, each dense FFN [D, g·F] is cut into g experts of hidden F, then
            replicated to N.
        reinit_fraction: share of each expert's hidden units re-initialized.
        rng: key for the re-initialized units and the fresh router.
        moe_every: every n-th block gets the MoE layer; the others keep the dense FFN.
        output_scale: multiplies the experts' w_out (g: uniform gates give the dense FFN).
        dense_cfg: the dense model config to load into (default: the checkpoint's own).

    Raises:
        UnsupportedCheckpointError: as load_model.
        ValueError: moe_cfg's sizes do not fit the checkpoint (d_model, d_ff × granularity,
            N not a multiple of granularity), naming the field.
    """
    dense_cfg = dense_cfg or checkpoint_model_config(path)
    dense = load_dense(path, dense_cfg)
    return upcycle(
        dense,
        moe_cfg,
        granularity,
        reinit_fraction,
        rng=rng,
        moe_every=moe_every,
        output_scale=output_scale,
    )


def init_params(
    path: str,
    cfg: ModelConfig,
    *,
    granularity: int,
    reinit_fraction: float,
    output_scale: float,
    seed: int,
):
    """(params, rest) nnx.States of `cfg` (a model config built from the checkpoint) with the
    checkpoint's weights, upcycled when cfg has MoE layers: what the trainer starts from."""
    dense_cfg = cfg.replace(moe=None, moe_every=0)
    if cfg.moe_layers:
        model = upcycle_checkpoint(
            path,
            cfg.moe,
            granularity,
            reinit_fraction,
            rng=jax.random.key(seed),
            moe_every=cfg.moe_every,
            output_scale=output_scale,
            dense_cfg=dense_cfg,
        )
    else:
        model = load_dense(path, dense_cfg)
    _, params, rest = nnx.split(model, nnx.Param, ...)
    return params, rest
