"""Tiny random Hugging Face checkpoints built locally with transformers (no download), shared
by the hf tests. Every parameter is redrawn (norm weights too) so that a wrong mapping of any
tensor changes the logits."""

from __future__ import annotations

import os

import numpy as np

V, D, F, L = 128, 64, 128, 2

ARCHS = {
    # Llama 3 style: llama3 RoPE rescaling that changes the frequencies at this size, tied
    # embeddings, q/k/v/o biases, GQA 4/2.
    "llama": dict(
        cls="LlamaForCausalLM",
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        attention_bias=True,
        rope_parameters=dict(
            rope_type="llama3",
            rope_theta=500_000.0,
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=16,
        ),
    ),
    # Qwen2: q/k/v biases (no output bias), untied head, theta 1e6.
    "qwen2": dict(
        cls="Qwen2ForCausalLM",
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        rope_parameters=dict(rope_type="default", rope_theta=1_000_000.0),
    ),
    # Mistral: a sliding window shorter than the test sequences, head_dim 32 != D / H, one KV
    # head, linear RoPE scaling.
    "mistral": dict(
        cls="MistralForCausalLM",
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=32,
        sliding_window=4,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        rope_parameters=dict(rope_type="linear", rope_theta=10_000.0, factor=2.0),
    ),
}


def build(arch: str, seed: int = 0, **overrides):
    """A transformers model of `arch` with every parameter redrawn from `seed` (eval mode)."""
    import torch
    import transformers

    spec = {**ARCHS[arch], **overrides}
    cls = getattr(transformers, spec.pop("cls"))
    cfg_cls = getattr(transformers, cls.__name__.replace("ForCausalLM", "Config"))
    cfg = cfg_cls(
        vocab_size=V,
        hidden_size=D,
        intermediate_size=F,
        num_hidden_layers=L,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        **spec,
    )
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.08)
    return model


def save(model, directory: str, **kw) -> str:
    os.makedirs(directory, exist_ok=True)
    model.save_pretrained(directory, **kw)
    return directory


def torch_logits(model, tokens: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits
    return out.float().numpy()


def tokens(seed: int = 0, shape=(2, 12)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, V, shape).astype(np.int32)


CORPUS = [
    "the red square sits left of the blue circle",
    "a small green triangle is above the large yellow square",
    "null experts give data sparsity in expectation",
    "every token is routed on its own representation only",
    "the blue circle is below the red triangle and the green square",
]


def save_tokenizer(directory: str, vocab_size: int = 100) -> str:
    """A Llama-style (Metaspace + BPE) tokenizer.json trained on CORPUS, with bos <s> and
    eos </s> named in tokenizer_config.json; vocab_size ids at most."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"])
    tok.train_from_iterator(CORPUS, trainer)
    os.makedirs(directory, exist_ok=True)
    tok.save(os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        f.write(
            '{"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",'
            ' "tokenizer_class": "PreTrainedTokenizerFast"}'
        )
    return directory
