"""Decoder-only transformer with MoE layers: vision-language ("vlm") and text-only ("lm") modes.

Layout of one sequence in vlm mode: P = (image_size / patch_size)^2 patch tokens from the
vision encoder, then the L text tokens; the decoder is causal over all P + L positions (RoPE
positions 0 .. P+L-1), and every token carries a modality id (0 = vision, 1 = text) that the
MoE layers use for per-modality routing statistics. Logits are returned for text positions only.

Blocks are pre-norm: x += Attn(RMSNorm(x)); x += FFN(RMSNorm(x)), FFN a dense SwiGLU or the
MoE layer. With moe_every = n > 0, block i (0-based) is an MoE block iff (i + 1) % n == 0
(n = 1: every block; n = 2: blocks 1, 3, 5, ...); moe_every = 0 or moe = None: a dense model.

Dtypes: parameters in param_dtype (fp32), matmuls in dtype (fp32 or bf16), attention softmax,
router and logits in fp32. The MoE layer's dtype/param_dtype are taken from this config.

Decoding (functional KV cache; see generate):
    cache = model.init_cache(B, max_total_len)            # max_total_len counts the P patches
    logits, cache = model.prefill(prompt, images, cache)  # logits [B, L0, V]
    logits, cache = model.decode_step(tok[:, None], cache, pos)  # pos = P + index of tok
At decode the MoE layers route each call's tokens on their own (per-token for token-choice
routers), in eval mode (deterministic=True), so cached logits equal the full forward pass.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax.core.config import MoEConfig
from moe_jax.core.validate import checker, is_pos_int
from moe_jax.model.inputs import check_text, static_int
from moe_jax.model.layers import Rope, VisionEncoder, small_init
from moe_jax.model.stack import Block, BlockStack, cache_length, init_stack_cache, run_block
from moe_jax.moe import record_routing, routing_ids

MODES = ("vlm", "lm")
ENCODERS = ("mlp", "vit")
DTYPES = ("float32", "bfloat16")
ROPE_SCALINGS = ("none", "linear", "llama3")


_check = checker("ModelConfig")
_pos_int = is_pos_int


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The transformer; validated on construction (errors name the field)."""

    vocab_size: int = 256  # V
    d_model: int = 128  # D
    n_layers: int = 4  # decoder blocks
    n_heads: int = 4  # H query heads
    n_kv_heads: int | None = None  # key/value heads (GQA); None = n_heads; divides n_heads
    d_ff: int = 512  # hidden width of the dense SwiGLU FFN (dense blocks, vit encoder)
    moe: MoEConfig | None = None  # MoE layer config (moe.d_model must equal d_model)
    moe_every: int = 1  # block i is MoE iff (i+1) % moe_every == 0; 0 = dense only
    mode: str = "vlm"  # vlm (patch prefix + text) | lm (text only)
    image_size: int = 32  # square images, pixels per side (vlm)
    patch_size: int = 4  # pixels per patch side; divides image_size (vlm)
    channels: int = 3  # image channels (vlm)
    max_len: int = 64  # longest text sequence L
    tie_embeddings: bool = True  # logits = x @ embedding^T
    remat: bool = False  # rematerialize each block in the backward pass
    scan_layers: bool = True  # blocks as one scanned stack (depth-free compile); False = unrolled
    dtype: str = "float32"  # compute dtype: float32 | bfloat16
    param_dtype: str = "float32"  # parameter dtype
    rope_theta: float = 10_000.0  # RoPE base
    vision_encoder: str = "mlp"  # mlp | vit
    vision_layers: int = 1  # bidirectional blocks in the vit encoder
    # Fields for imported checkpoints (moe_jax.hf); the defaults keep the original model.
    head_dim: int | None = None  # per-head width (even, for RoPE); None = d_model / n_heads
    norm_eps: float = 1e-6  # RMSNorm epsilon of the decoder norms
    qkv_bias: bool = False  # biases on the query / key / value projections
    attn_out_bias: bool = False  # bias on the attention output projection
    sliding_window: int | None = None  # attend only to the last n positions; None = all
    rope_scaling: str = "none"  # RoPE rescaling: none | linear | llama3 (layers.Rope)
    rope_factor: float = 1.0  # linear / llama3 scaling factor
    rope_low_freq_factor: float = 1.0  # llama3: low-frequency band edge
    rope_high_freq_factor: float = 4.0  # llama3: high-frequency band edge
    rope_original_max_len: int = 8192  # llama3: context length the model was trained at

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "channels"):
            _check(_pos_int(getattr(self, name)), name, getattr(self, name), "an integer >= 1")
        for name in ("image_size", "patch_size", "max_len", "vision_layers"):
            _check(_pos_int(getattr(self, name)), name, getattr(self, name), "an integer >= 1")
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        _check(
            _pos_int(self.n_kv_heads) and self.n_heads % self.n_kv_heads == 0,
            "n_kv_heads",
            self.n_kv_heads,
            f"an integer >= 1 dividing n_heads={self.n_heads}",
        )
        if self.head_dim is None:
            _check(
                self.d_model % self.n_heads == 0 and (self.d_model // self.n_heads) % 2 == 0,
                "n_heads",
                self.n_heads,
                f"must divide d_model={self.d_model} into an even head_dim (RoPE)",
            )
            object.__setattr__(self, "head_dim", self.d_model // self.n_heads)
        sw = self.sliding_window
        for ok, name, allowed in (
            (_pos_int(self.head_dim) and self.head_dim % 2 == 0, "head_dim", "an even int >= 2"),
            (self.norm_eps > 0, "norm_eps", "must be > 0"),
            (self.sliding_window is None or _pos_int(sw), "sliding_window", "an int >= 1"),
            (self.rope_scaling in ROPE_SCALINGS, "rope_scaling", f"one of {ROPE_SCALINGS}"),
            (self.rope_factor > 0, "rope_factor", "must be > 0"),
            (self.rope_low_freq_factor > 0, "rope_low_freq_factor", "must be > 0"),
            (
                self.rope_high_freq_factor > self.rope_low_freq_factor,
                "rope_high_freq_factor",
                f"must exceed rope_low_freq_factor={self.rope_low_freq_factor}",
            ),
            (_pos_int(self.rope_original_max_len), "rope_original_max_len", "an int >= 1"),
            (self.mode in MODES, "mode", f"one of {MODES}"),
            (self.dtype in DTYPES, "dtype", f"one of {DTYPES}"),
            (self.param_dtype in DTYPES, "param_dtype", f"one of {DTYPES}"),
            (self.vision_encoder in ENCODERS, "vision_encoder", str(ENCODERS)),
            (self.rope_theta > 0, "rope_theta", "must be > 0"),
            (isinstance(self.scan_layers, bool), "scan_layers", "True or False"),
        ):
            _check(ok, name, getattr(self, name), allowed)
        _check(
            self.image_size % self.patch_size == 0,
            "patch_size",
            self.patch_size,
            f"must divide image_size={self.image_size}",
        )
        _check(
            isinstance(self.moe_every, int) and self.moe_every >= 0,
            "moe_every",
            self.moe_every,
            "an integer >= 0 (0 = dense only)",
        )
        if self.moe is not None and self.moe_every > 0:
            _check(isinstance(self.moe, MoEConfig), "moe", self.moe, "a MoEConfig or None")
            _check(
                self.moe_every <= self.n_layers,
                "moe_every",
                self.moe_every,
                f"must be <= n_layers={self.n_layers} (else no block is MoE)",
            )
            _check(
                self.moe.d_model == self.d_model,
                "moe",
                f"MoEConfig(d_model={self.moe.d_model})",
                f"moe.d_model must equal d_model={self.d_model}",
            )
            # The decoder is causal: MoEConfig refuses expert choice there unless its one
            # causality flag, moe.allow_noncausal, accepts the leak.
            self.layer_moe_config  # noqa: B018

    @property
    def rope(self) -> Rope:
        names = ("theta", "scaling", "factor", "low_freq_factor", "high_freq_factor")
        return Rope(*(getattr(self, f"rope_{n}") for n in names), self.rope_original_max_len)

    @property
    def num_patches(self) -> int:
        """P: vision tokens per sequence (0 in lm mode)."""
        return (self.image_size // self.patch_size) ** 2 if self.mode == "vlm" else 0

    @property
    def moe_layers(self) -> tuple[int, ...]:
        if self.moe is None or self.moe_every == 0:
            return ()
        return tuple(i for i in range(self.n_layers) if (i + 1) % self.moe_every == 0)

    @property
    def layer_moe_config(self) -> MoEConfig | None:
        """The MoE config as the decoder uses it (dtypes from this config, causal=True)."""
        if not self.moe_layers:
            return None
        return self.moe.replace(dtype=self.dtype, param_dtype=self.param_dtype, causal=True)

    def replace(self, **kw) -> ModelConfig:
        return dataclasses.replace(self, **kw)


class Transformer(nnx.Module):
    """``logits [B, L, V], aux = model(tokens [B, L], images [B, H, W, C] | None)``; aux holds
    "aux_loss" (all MoE layers), "moe" (per-layer aux), "modality" [B, P+L] (0 vision, 1 text).

    Args:
        cfg: the model (fp32 logits at the text positions; logits[:, i] predicts tokens[:, i+1]).
        rngs: parameter initialization keys (nnx.Rngs)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        cdt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        self.embed = nnx.Embed(
            cfg.vocab_size,
            cfg.d_model,
            dtype=cdt,
            param_dtype=pdt,
            embedding_init=small_init(),
            rngs=rngs,
        )
        self.vision = (
            VisionEncoder(
                cfg.vision_encoder,
                patch_size=cfg.patch_size,
                channels=cfg.channels,
                num_patches=cfg.num_patches,
                d_model=cfg.d_model,
                n_heads=cfg.n_heads,
                d_ff=cfg.d_ff,
                layers=cfg.vision_layers,
                rope_theta=cfg.rope_theta,
                rngs=rngs,
                dtype=cdt,
                param_dtype=pdt,
            )
            if cfg.mode == "vlm"
            else None
        )
        moe_layers = set(cfg.moe_layers)
        blocks = [Block(cfg, i in moe_layers, rngs=rngs) for i in range(cfg.n_layers)]
        if cfg.scan_layers:  # same blocks, same keys: both layouts hold the same weights
            self.stack = BlockStack(cfg, blocks)
        else:
            self.blocks = nnx.List(blocks)
        self.final_norm = nnx.RMSNorm(
            cfg.d_model, epsilon=cfg.norm_eps, dtype=cdt, param_dtype=pdt, rngs=rngs
        )
        self.head = (
            nnx.Linear(
                cfg.d_model,
                cfg.vocab_size,
                use_bias=False,
                dtype=cdt,
                param_dtype=pdt,
                kernel_init=small_init(),
                rngs=rngs,
            )
            if not cfg.tie_embeddings
            else None
        )

    def _inputs(self, tokens: jax.Array, images: jax.Array | None):
        """Token (and patch) embeddings [B, P+L, D] and modality ids [B, P+L]."""
        cfg = self.cfg
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(
                f"tokens must be an int array [B, L], got {tokens.dtype}{tokens.shape}"
            )
        b, n = tokens.shape
        x = self.embed(tokens)  # [B, L, D]
        modality = jnp.ones((b, n), jnp.int32)
        if cfg.mode == "lm":
            if images is not None:
                raise ValueError("images given but ModelConfig.mode='lm' (text only)")
            return x, modality
        want = (b, cfg.image_size, cfg.image_size, cfg.channels)
        if images is None or tuple(images.shape) != want:
            got = None if images is None else tuple(images.shape)
            raise ValueError(f"mode='vlm' needs images of shape {want} (B, H, W, C), got {got}")
        v = self.vision(images.astype(x.dtype)).astype(x.dtype)  # [B, P, D]
        x = jnp.concatenate([v, x], axis=1)  # [B, P+L, D]
        modality = jnp.concatenate([jnp.zeros((b, cfg.num_patches), jnp.int32), modality], axis=1)
        return x, modality

    def _logits(self, x: jax.Array) -> jax.Array:
        x = self.final_norm(x)
        logits = self.embed.attend(x) if self.head is None else self.head(x)  # [B, L, V]
        return logits.astype(jnp.float32)

    def _run(self, x, modality, positions, deterministic, cache=None, cache_pos=None):
        remat = self.cfg.remat
        if self.cfg.scan_layers:
            return self.stack(x, modality, positions, deterministic, remat, cache, cache_pos)
        moe_aux, new_cache = [], []
        for i, blk in enumerate(self.blocks):
            lc = None if cache is None else cache[i]
            x, aux, lc = run_block(blk, x, modality, positions, deterministic, remat, lc, cache_pos)
            new_cache.append(lc)
            if aux is not None:
                moe_aux.append(aux)
        return x, moe_aux, (new_cache if cache is not None else None)

    @staticmethod
    def _aux(moe_aux, modality):
        total = sum((a["aux_loss"] for a in moe_aux), jnp.zeros((), jnp.float32))
        return {"aux_loss": total, "moe": moe_aux, "modality": modality}

    def _check_len(self, tokens):  # length in [1, max_len], concrete ids in the vocabulary
        check_text(tokens, self.cfg.max_len, self.cfg.vocab_size)

    def __call__(self, tokens: jax.Array, images: jax.Array | None = None, *, deterministic=False):
        self._check_len(tokens)
        x, modality = self._inputs(tokens, images)
        positions = jnp.arange(x.shape[1])
        x, moe_aux, _ = self._run(x, modality, positions, deterministic)
        logits = self._logits(x[:, self.cfg.num_patches :])
        return logits, self._aux(moe_aux, modality)

    def init_cache(self, batch_size: int, max_total_len: int) -> list[dict] | dict:
        """Empty KV cache of {"k", "v"} [B, S_max, Hkv, Dh] (S_max counts patches): a list with
        one per block (unrolled), or stacked per scanned group position (stack.init_stack_cache)."""
        cfg = self.cfg
        shape = (batch_size, max_total_len, cfg.n_kv_heads, cfg.head_dim)
        if cfg.scan_layers:
            return init_stack_cache(cfg, shape, jnp.dtype(cfg.dtype))
        zeros = lambda: jnp.zeros(shape, jnp.dtype(cfg.dtype))
        return [{"k": zeros(), "v": zeros()} for _ in range(cfg.n_layers)]

    def prefill(self, tokens: jax.Array, images: jax.Array | None, cache):
        """Run the prompt (patches + tokens) at positions 0.. and fill the cache.
        Returns (text logits [B, L, V], cache)."""
        self._check_len(tokens)
        x, modality = self._inputs(tokens, images)
        if x.shape[1] > cache_length(cache):
            raise ValueError(f"prompt of {x.shape[1]} positions exceeds the cache length")
        positions = jnp.arange(x.shape[1])
        x, _, cache = self._run(x, modality, positions, True, cache, 0)
        return self._logits(x[:, self.cfg.num_patches :]), cache

    def decode_step(self, tokens: jax.Array, cache, pos):
        """One text token per row at absolute position pos (P + text index; may be traced).
        tokens [B, 1] -> (logits [B, 1, V], new cache). A traced pos past the cache end is
        not checked (the write would clamp): size the cache for the whole generation."""
        if (p := static_int(pos)) is not None and p + tokens.shape[1] > cache_length(cache):
            raise ValueError(f"pos={p} is past the cache length {cache_length(cache)}")
        x = self.embed(tokens)  # [B, 1, D]
        modality = jnp.ones(tokens.shape, jnp.int32)
        positions = pos + jnp.arange(tokens.shape[1])
        x, _, cache = self._run(x, modality, positions, True, cache, pos)
        return self._logits(x), cache


def cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array):
    """Mean fp32 cross-entropy of logits [B, L, V] against targets [B, L] where mask [B, L].
    Returns (mean loss, number of counted targets)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    m = mask.astype(jnp.float32)
    count = jnp.sum(m)
    return jnp.sum(nll * m) / jnp.maximum(count, 1.0), count


def next_token_loss(logits: jax.Array, tokens: jax.Array, loss_mask: jax.Array):
    """logits[:, i] predicts tokens[:, i+1]; loss_mask[:, i+1] says whether that target counts.
    Returns (mean loss over counted targets, number of targets)."""
    return cross_entropy(logits[:, :-1], tokens[:, 1:], loss_mask[:, 1:])


def forward_with_routing(model: nnx.Module, *args, **kwargs):
    """(model(*args, **kwargs), [(expert ids [T, S], N)] per MoE call in graph order).

    The MoE layers record their ids only for this call (opt-in, see moe.record_routing). Use it
    inside jax.jit and return the ids: they are the routing of the traced forward."""
    record_routing(model, True)
    try:
        out = model(*args, **kwargs)
        return out, routing_ids(model)
    finally:
        record_routing(model, False)
