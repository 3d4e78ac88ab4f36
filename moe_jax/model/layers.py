"""Transformer building blocks for moe_jax.model: RoPE, grouped-query attention with an
optional KV cache, and the vision patch encoders ("mlp" and a small "vit").

Attention shapes: q [B, L, H, Dh], k/v [B, S, Hkv, Dh] with H = Hkv * G (G query heads share
one key/value head). A KV cache is a dict {"k", "v"} of [B, S_max, Hkv, Dh] arrays; new keys are
written at positions [pos, pos + L) and every query attends to the cached keys at positions
<= its own, so a cached step computes exactly what the full causal pass computes.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax.moe import FFN

_NEG = -1e30  # finite mask value: exp underflows to exactly 0, no inf - inf NaN


def small_init(std: float = 0.02):
    return nnx.initializers.normal(std)


@dataclasses.dataclass(frozen=True)
class Rope:
    """RoPE frequencies: base theta and an optional context-extension rescaling.

    scaling "none": inv_freq_i = theta^(-i / (Dh/2)); "linear": inv_freq / factor (positions
    divided by factor); "llama3": wavelengths longer than original_max_len / low_freq_factor
    are divided by factor, shorter than original_max_len / high_freq_factor are kept, and the
    band between is interpolated smoothly (the Llama 3.1 rule).
    """

    theta: float = 10_000.0
    scaling: str = "none"  # none | linear | llama3
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_len: int = 8192

    def inv_freq(self, head_dim: int) -> jax.Array:
        half = head_dim // 2
        freq = self.theta ** (-jnp.arange(half, dtype=jnp.float32) / half)  # [Dh/2]
        if self.scaling == "linear":
            return freq / self.factor
        if self.scaling == "llama3":
            wavelen = 2 * math.pi / freq
            low_wl = self.original_max_len / self.low_freq_factor  # longer: divided by factor
            high_wl = self.original_max_len / self.high_freq_factor  # shorter: kept
            scaled = jnp.where(wavelen > low_wl, freq / self.factor, freq)
            smooth = (self.original_max_len / wavelen - self.low_freq_factor) / (
                self.high_freq_factor - self.low_freq_factor
            )
            mid = (1 - smooth) * scaled / self.factor + smooth * scaled
            between = (wavelen >= high_wl) & (wavelen <= low_wl)
            return jnp.where(between, mid, scaled)
        return freq


def rope(x: jax.Array, positions: jax.Array, theta: float | Rope) -> jax.Array:
    """Rotary position embedding (rotate-half form). x [B, L, H, Dh], positions [L]."""
    half = x.shape[-1] // 2
    spec = theta if isinstance(theta, Rope) else Rope(theta)
    freq = spec.inv_freq(x.shape[-1])  # [Dh/2]
    ang = positions.astype(jnp.float32)[:, None] * freq[None, :]  # [L, Dh/2]
    sin = jnp.sin(ang)[None, :, None, :]  # [1, L, 1, Dh/2]
    cos = jnp.cos(ang)[None, :, None, :]
    xf = x.astype(jnp.float32)
    x1, x2 = xf[..., :half], xf[..., half:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
    """[..., H, W, C] -> [..., P, p*p*C], patches row-major over (H/p, W/p): the order of the
    data pipeline's per-patch foreground mask (moe_jax.data.scenes.patch_foreground)."""
    *lead, h, w, c = images.shape
    p = patch_size
    x = jnp.reshape(images, (*lead, h // p, p, w // p, p, c))
    x = jnp.moveaxis(x, -4, -3)  # [..., H/p, W/p, p, p, C]
    return x.reshape(*lead, (h // p) * (w // p), p * p * c)


class Attention(nnx.Module):
    """Multi-head attention with grouped-query heads, RoPE and an optional KV cache."""

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: int,
        *,
        rope_theta: float | Rope,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        head_dim: int | None = None,
        qkv_bias: bool = False,
        out_bias: bool = False,
        sliding_window: int | None = None,
    ):
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.head_dim = d_model // n_heads if head_dim is None else head_dim
        self.rope_theta = rope_theta
        self.sliding_window = sliding_window  # attend to the last `sliding_window` positions
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        hd = self.head_dim
        self.wq = nnx.Linear(d_model, n_heads * hd, use_bias=qkv_bias, **kw)
        self.wk = nnx.Linear(d_model, n_kv_heads * hd, use_bias=qkv_bias, **kw)
        self.wv = nnx.Linear(d_model, n_kv_heads * hd, use_bias=qkv_bias, **kw)
        self.wo = nnx.Linear(n_heads * hd, d_model, use_bias=out_bias, **kw)

    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        *,
        causal: bool = True,
        cache: dict | None = None,
        cache_pos: jax.Array | int | None = None,
    ) -> tuple[jax.Array, dict | None]:
        """x [B, L, D]; positions [L] (absolute). With a cache, writes k/v at cache_pos."""
        b, n, _ = x.shape
        h, hkv, hd = self.n_heads, self.n_kv_heads, self.head_dim
        q = rope(self.wq(x).reshape(b, n, h, hd), positions, self.rope_theta)  # [B, L, H, Dh]
        k = rope(self.wk(x).reshape(b, n, hkv, hd), positions, self.rope_theta)  # [B, L, Hkv, Dh]
        v = self.wv(x).reshape(b, n, hkv, hd)  # [B, L, Hkv, Dh]
        new_cache = None
        k_pos = positions
        if cache is not None:
            start = (0, cache_pos, 0, 0)
            k = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), start)
            v = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), start)
            new_cache = {"k": k, "v": v}  # [B, S_max, Hkv, Dh]
            k_pos = jnp.arange(k.shape[1])  # [S_max]
        qg = q.reshape(b, n, hkv, h // hkv, hd)  # [B, L, Hkv, G, Dh]
        s = jnp.einsum("blkgd,bskd->bkgls", qg, k, preferred_element_type=jnp.float32)
        s = s / math.sqrt(hd)  # [B, Hkv, G, L, S]
        if causal:
            mask = k_pos[None, :] <= positions[:, None]  # [L, S]
            if self.sliding_window is not None:
                mask &= k_pos[None, :] > positions[:, None] - self.sliding_window
            s = jnp.where(mask, s, _NEG)
        p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
        o = jnp.einsum("bkgls,bskd->blkgd", p, v).reshape(b, n, h * hd)  # [B, L, H*Dh]
        return self.wo(o.astype(x.dtype)), new_cache


class EncoderBlock(nnx.Module):
    """Pre-norm bidirectional transformer block (the "vit" vision encoder)."""

    def __init__(self, d_model, n_heads, d_ff, *, rope_theta, rngs, dtype, param_dtype):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = nnx.RMSNorm(d_model, **kw)
        self.attn = Attention(d_model, n_heads, n_heads, rope_theta=rope_theta, **kw)
        self.norm2 = nnx.RMSNorm(d_model, **kw)
        self.ffn = FFN(d_model, d_ff, **kw)

    def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        x = x + self.attn(self.norm1(x), positions, causal=False)[0]
        return x + self.ffn(self.norm2(x))


class VisionEncoder(nnx.Module):
    """Images [B, H, W, C] -> patch tokens [B, P, D].

    "mlp": patch -> Linear -> +pos -> GELU -> Linear.
    "vit": patch -> Linear -> +pos -> `layers` bidirectional blocks -> RMSNorm.
    Both add a learned position embedding [P, D] (the decoder adds RoPE on top).
    """

    def __init__(
        self,
        kind: str,
        *,
        patch_size: int,
        channels: int,
        num_patches: int,
        d_model: int,
        n_heads: int,
        d_ff: int,
        layers: int,
        rope_theta: float,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
    ):
        self.kind, self.patch_size = kind, patch_size
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.proj = nnx.Linear(patch_size * patch_size * channels, d_model, **kw)
        self.pos = nnx.Param(small_init()(rngs.params(), (num_patches, d_model), param_dtype))
        if kind == "mlp":
            self.out = nnx.Linear(d_model, d_model, **kw)
            self.blocks = nnx.List([])
            self.norm = None
        else:
            self.out = None
            self.blocks = nnx.List(
                [
                    EncoderBlock(d_model, n_heads, d_ff, rope_theta=rope_theta, **kw)
                    for _ in range(layers)
                ]
            )
            self.norm = nnx.RMSNorm(d_model, **kw)

    def __call__(self, images: jax.Array) -> jax.Array:
        x = patchify(images, self.patch_size)  # [B, P, p*p*C]
        x = self.proj(x) + self.pos[...].astype(self.proj.dtype)  # [B, P, D]
        if self.kind == "mlp":
            return self.out(jax.nn.gelu(x))
        positions = jnp.arange(x.shape[1])
        for blk in self.blocks:
            x = blk(x, positions)
        return self.norm(x)
