"""config.init: start a run from a Hugging Face dense checkpoint instead of a random init.

    python train.py --config=configs/default.py:lm --config.init.hf=/path/to/checkpoint \
        --config.init.granularity=4 --config.data.kind=text "--config.data.paths=('a.jsonl',)"

With init.hf set, the checkpoint decides the architecture: config.model's sizes (d_model,
n_layers, heads, d_ff, ...) and the RoPE / norm / bias fields are replaced by the checkpoint's
(model.moe_every, remat, dtype and param_dtype stay the config's; model.mode must be "lm"),
moe.d_ff becomes intermediate_size / init.granularity, the vocabulary is the checkpoint's and
the data tokenizer is the checkpoint's tokenizer.json (data.tokenizer must be left "auto").
The MoE blocks are upcycled (moe_jax.hf.upcycle); with moe.enabled=False the dense model
is fine-tuned as it is.
"""

from __future__ import annotations

import dataclasses

from moe_jax.core.validate import check_finite_floats, field_error, is_int
from moe_jax.hf.config import model_config, read_config

# ModelConfig fields the checkpoint sets (the architecture), not config.model.
ARCH_FIELDS = (
    "d_model",
    "n_layers",
    "n_heads",
    "n_kv_heads",
    "d_ff",
    "tie_embeddings",
    "rope_theta",
    "head_dim",
    "norm_eps",
    "qkv_bias",
    "attn_out_bias",
    "sliding_window",
    "rope_scaling",
    "rope_factor",
    "rope_low_freq_factor",
    "rope_high_freq_factor",
    "rope_original_max_len",
)


@dataclasses.dataclass(frozen=True)
class InitConfig:
    """Where the parameters come from (see configs/default.py for each field)."""

    hf: str = ""  # Hugging Face checkpoint folder to upcycle (lm mode); "" = random init
    granularity: int = 1  # g: each dense FFN becomes experts of hidden F/g (sets moe.d_ff)
    reinit_fraction: float = 0.3  # share of each expert's hidden units re-initialized
    output_scale: float = 1.0  # multiplies the experts' w_out (g: uniform gates = dense FFN)

    def __post_init__(self):
        check_finite_floats("config", self, "init.")
        if not (is_int(self.granularity) and self.granularity >= 1):
            raise field_error("config", "init.granularity", self.granularity, "an int >= 1")
        if not 0.0 <= self.reinit_fraction <= 1.0:
            raise field_error("config", "init.reinit_fraction", self.reinit_fraction, "in [0, 1]")
        if not self.output_scale > 0:
            raise field_error("config", "init.output_scale", self.output_scale, "must be > 0")


def apply(init: InitConfig, model: dict, moe: dict, data: dict, moe_enabled: bool) -> int:
    """Rewrites the model / moe / data sections (plain dicts) for a run from init.hf, before
    they are validated; returns the checkpoint's vocab_size. Errors name config.init.*."""
    try:
        hf = model_config(read_config(init.hf), where=init.hf)
    except FileNotFoundError as err:
        raise field_error("config", "init.hf", init.hf, str(err)) from None
    if model.get("mode", "vlm") != "lm":
        raise field_error("config", "model.mode", model.get("mode"), "'lm' with init.hf")
    if data.get("text_len", 0) > hf.max_len:
        raise field_error(
            "config", "data.text_len", data["text_len"], f"<= max_position_embeddings={hf.max_len}"
        )
    model.update({f: getattr(hf, f) for f in ARCH_FIELDS})
    if moe_enabled:
        g = init.granularity
        if hf.d_ff % g:
            raise field_error(
                "config", "init.granularity", g, f"must divide intermediate_size={hf.d_ff}"
            )
        if moe.get("num_experts", g) % g:
            raise field_error(
                "config",
                "moe.num_experts",
                moe["num_experts"],
                f"a multiple of init.granularity={g}",
            )
        moe["d_ff"] = hf.d_ff // g
    if data.get("tokenizer", "auto") != "auto":
        raise field_error(
            "config", "data.tokenizer", data["tokenizer"], "'auto' with init.hf (the checkpoint's)"
        )
    data["tokenizer"], data["tokenizer_path"] = "hf", init.hf
    return hf.vocab_size
