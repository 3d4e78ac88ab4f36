"""Greedy decoding with the functional KV cache of moe_jax.model.Transformer.

    new_tokens = generate(model, images, prompt_tokens, max_new_tokens, eos_id=EOS)

prefill runs the patch prefix and the prompt once; each decode_step routes its token on its own
in eval mode, so the tokens equal greedy decoding over the full forward pass.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax.model.inputs import check_text
from moe_jax.model.transformer import Transformer


@functools.partial(jax.jit, static_argnums=(0, 4, 5))
def _generate(graphdef, state, images, prompt, max_new_tokens, eos_id):
    model = nnx.merge(graphdef, state)
    b, n = prompt.shape
    start = model.cfg.num_patches + n
    cache = model.init_cache(b, start + max_new_tokens)
    logits, cache = model.prefill(prompt, images, cache)
    tok = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)  # [B]

    def body(i, carry):
        out, tok, done, cache = carry
        out = out.at[:, i].set(jnp.where(done, 0, tok))
        if eos_id is not None:
            done = done | (tok == eos_id)
        logits, cache = model.decode_step(tok[:, None], cache, start + i)
        return out, jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32), done, cache

    out = jnp.zeros((b, max_new_tokens), jnp.int32)
    done = jnp.zeros((b,), bool)
    out, *_ = jax.lax.fori_loop(0, max_new_tokens, body, (out, tok, done, cache))
    return out


def generate(
    model: Transformer,
    images: jax.Array | None,
    prompt_tokens: jax.Array,
    max_new_tokens: int,
    *,
    eos_id: int | None = None,
) -> jax.Array:
    """Greedy decoding with the KV cache. prompt_tokens [B, L0] (rows share L0; no padding).
    Returns the new tokens [B, max_new_tokens]; after eos_id a row emits 0 (pad).

    Args:
        model: the Transformer (eval-time routing is used).
        images: [B, H, W, C] for a vision-language model, else None.
        prompt_tokens: integer token ids [B, L0] in [0, V).
        max_new_tokens: tokens to generate, >= 1; L0 + max_new_tokens <= max_len.
        eos_id: stop token; None generates max_new_tokens everywhere.

    Raises:
        ValueError: max_new_tokens < 1, a prompt past max_len, or token ids outside the
            vocabulary (checked on the host, before any compute).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    check_text(prompt_tokens, model.cfg.max_len, model.cfg.vocab_size)
    if prompt_tokens.shape[1] + max_new_tokens > model.cfg.max_len:
        raise ValueError(
            f"a prompt of {prompt_tokens.shape[1]} tokens plus max_new_tokens={max_new_tokens} "
            f"runs past ModelConfig.max_len={model.cfg.max_len} (the positions it was built for)"
        )
    graphdef, state = nnx.split(model)
    return _generate(graphdef, state, images, prompt_tokens, max_new_tokens, eos_id)
