"""A checkpoint's own tokenizer (Hugging Face `tokenizer.json`, read by the `tokenizers`
library) behind the interface of the built-in tokenizers: encode(text, bos=, eos=) -> int32
ids, decode(ids), vocab_size, bos_id / eos_id / pad_id.

    tok = HFTokenizer("/path/to/checkpoint")      # a folder with tokenizer.json, or the file

bos / eos come from the folder's tokenizer_config.json (bos_token / eos_token) or else from
config.json (bos_token_id / eos_token_id); a tokenizer without a bos token (Qwen2) adds none.
encode never lets the tokenizer add its own special tokens: bos / eos are added here, once.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Sequence

import numpy as np

TOKENIZER_FILE = "tokenizer.json"


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _token_text(value) -> str | None:
    """tokenizer_config.json writes a special token as a string or as {"content": str}."""
    return value.get("content") if isinstance(value, dict) else value


class HFTokenizer:
    """tokenizer.json through the `tokenizers` library (module docstring)."""

    def __init__(self, path: str):
        try:
            from tokenizers import Tokenizer
        except ImportError as err:  # pragma: no cover - the [hf] extra installs it
            raise ImportError(
                "reading a tokenizer.json needs the tokenizers package: pip install -e '.[hf]'"
            ) from err
        folder = path if os.path.isdir(path) else os.path.dirname(path)
        file = os.path.join(path, TOKENIZER_FILE) if os.path.isdir(path) else path
        if not os.path.isfile(file):  # a ValueError: train.py prints it as one line
            raise ValueError(
                f"DataConfig.tokenizer_path: no tokenizer file {file!r}. Put the model's "
                f"{TOKENIZER_FILE} there, or set data.tokenizer_path to one"
            )
        self.path = file
        self.tok = Tokenizer.from_file(file)
        tcfg, mcfg = (
            _read_json(os.path.join(folder, n)) for n in ("tokenizer_config.json", "config.json")
        )
        self.bos_id = self._special(tcfg.get("bos_token"), mcfg.get("bos_token_id"))
        self.eos_id = self._special(tcfg.get("eos_token"), mcfg.get("eos_token_id"))
        pad = self._special(tcfg.get("pad_token"), mcfg.get("pad_token_id"))
        self.pad_id = pad if pad is not None else self.eos_id
        self.unk_id = self._special(tcfg.get("unk_token"), None)

    def _special(self, text, fallback_id) -> int | None:
        text = _token_text(text)
        if text is not None:
            i = self.tok.token_to_id(text)
            if i is None:
                raise ValueError(f"{self.path}: special token {text!r} is not in the vocabulary")
            return int(i)
        return None if fallback_id is None else int(fallback_id)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str | bytes, *, bos: bool = False, eos: bool = False) -> np.ndarray:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        ids = self.tok.encode(text, add_special_tokens=False).ids
        head = [self.bos_id] if bos and self.bos_id is not None else []
        tail = [self.eos_id] if eos and self.eos_id is not None else []
        return np.asarray(head + ids + tail, np.int32)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Decodes up to the first eos, skipping special tokens."""
        ids = [int(i) for i in np.asarray(ids).tolist()]
        if self.eos_id is not None and self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        return self.tok.decode(ids, skip_special_tokens=True)


@functools.lru_cache(maxsize=8)
def load_tokenizer(path: str) -> HFTokenizer:
    """One HFTokenizer per path (configs ask for the tokenizer more than once)."""
    return HFTokenizer(path)
