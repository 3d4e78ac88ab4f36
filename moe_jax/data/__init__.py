"""Input pipelines (grain): the built-in shapes scenes, users' image+caption manifests and
text files, tokenizers. Imports only moe_jax.core (for field checks)."""

from moe_jax.data import check, pipeline, scenes, sources, tokenizer
from moe_jax.data.pipeline import (
    KINDS,
    SPLITS,
    TOKENIZERS,
    DataConfig,
    ToExample,
    batch_spec,
    build_dataset,
    check_splits,
    make_dataset,
    make_source,
    make_tokenizer,
)
from moe_jax.data.sources import ManifestError
from moe_jax.data.tokenizer import ByteTokenizer, Tokenizer, WordTokenizer

__all__ = [
    "KINDS",
    "SPLITS",
    "TOKENIZERS",
    "ByteTokenizer",
    "DataConfig",
    "ManifestError",
    "ToExample",
    "Tokenizer",
    "WordTokenizer",
    "batch_spec",
    "build_dataset",
    "check",
    "check_splits",
    "make_dataset",
    "make_source",
    "make_tokenizer",
    "pipeline",
    "scenes",
    "sources",
    "tokenizer",
]
