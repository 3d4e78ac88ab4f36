"""Tokenizers and sequence helpers for the data pipeline.

Two tokenizers share one interface and one set of special ids (pad=0, bos=1, eos=2, unk=3):

- `WordTokenizer`: whitespace words over a fixed vocabulary (the built-in scene captions by
  default); unknown words map to unk.
- `ByteTokenizer`: UTF-8 bytes, id = byte + 4, so any text round-trips; vocab_size = 260.

Helpers turn token ids into fixed-length next-token training rows:

- `pad_example(ids, text_len)`: one [bos, ids..., eos] sequence -> tokens / targets / loss_mask
  of length text_len, padded with pad; the loss mask covers real target tokens (eos included).
- `pack_stream(docs, text_len)` + `stream_windows`: documents joined as bos doc eos bos doc eos
  ... into one stream, cut into windows of text_len + 1 tokens that overlap by one, so every
  window is a full next-token row (the text-LM mode).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

PAD, BOS, EOS, UNK = 0, 1, 2, 3
SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")


class WordTokenizer:
    """Whitespace word tokenizer over a fixed vocabulary; ids 0..3 are the specials."""

    pad_id, bos_id, eos_id, unk_id = PAD, BOS, EOS, UNK

    def __init__(self, words: Iterable[str]):
        words = sorted(set(words) - set(SPECIALS))
        self.vocab: tuple[str, ...] = SPECIALS + tuple(words)
        self._ids = {w: i for i, w in enumerate(self.vocab)}

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> np.ndarray:
        """Returns int32 ids of the lower-cased whitespace words of `text`."""
        ids = [self._ids.get(w, UNK) for w in text.lower().split()]
        return np.asarray([BOS] * bos + ids + [EOS] * eos, np.int32)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Joins the words of `ids`, skipping pad and bos and stopping at the first eos."""
        out = []
        for i in np.asarray(ids).tolist():
            if i == EOS:
                break
            if i in (PAD, BOS):
                continue
            out.append(self.vocab[i] if 0 <= i < len(self.vocab) else SPECIALS[UNK])
        return " ".join(out)


class ByteTokenizer:
    """UTF-8 byte tokenizer: id = byte + 4; ids 0..3 are the specials."""

    pad_id, bos_id, eos_id, unk_id = PAD, BOS, EOS, UNK
    offset = len(SPECIALS)
    vocab_size = 256 + len(SPECIALS)

    def encode(self, text: str | bytes, *, bos: bool = False, eos: bool = False) -> np.ndarray:
        """Returns int32 ids of the UTF-8 bytes of `text`."""
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        ids = np.frombuffer(data, np.uint8).astype(np.int32) + self.offset
        return np.concatenate(
            [np.full(int(bos), BOS, np.int32), ids, np.full(int(eos), EOS, np.int32)]
        )

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Decodes byte ids (invalid UTF-8 replaced), skipping specials, stopping at eos."""
        ids = np.asarray(ids, np.int64)
        stop = np.flatnonzero(ids == EOS)
        ids = ids[: stop[0]] if stop.size else ids
        ids = ids[(ids >= self.offset) & (ids < self.vocab_size)]
        return (ids - self.offset).astype(np.uint8).tobytes().decode("utf-8", errors="replace")


Tokenizer = WordTokenizer | ByteTokenizer


def pad_example(ids: np.ndarray, text_len: int) -> dict[str, np.ndarray]:
    """Makes one next-token row from a sequence that already holds bos ... eos.

    The sequence is cut or padded to text_len + 1 tokens, then shifted:
    tokens = seq[:-1], targets = seq[1:], loss_mask = targets != pad. A sequence longer than
    text_len + 1 is cut here (its eos is then lost): callers check lengths first
    (pipeline: the shapes kinds size text_len, manifests raise or, with DataConfig.truncate,
    cut the caption and keep eos before calling this).
    """
    seq = np.full(text_len + 1, PAD, np.int32)
    n = min(len(ids), text_len + 1)
    seq[:n] = ids[:n]
    targets = seq[1:]
    return {"tokens": seq[:-1], "targets": targets, "loss_mask": targets != PAD}


def pack_stream(docs: Iterable[np.ndarray], *, bos: int | None = BOS, eos: int | None = EOS):
    """Concatenates token documents as bos doc eos bos doc eos ... into one stream (uint16, or
    uint32 when an id exceeds 65535); a None bos / eos is left out."""
    head = [] if bos is None else [np.asarray([bos])]
    tail = [] if eos is None else [np.asarray([eos])]
    parts = []
    for doc in docs:
        parts += [*head, np.asarray(doc), *tail]
    if not parts:
        return np.zeros(0, np.uint16)
    stream = np.concatenate(parts)
    return stream.astype(np.uint16 if stream.max(initial=0) < 1 << 16 else np.uint32)


def num_windows(stream_len: int, text_len: int) -> int:
    """How many full windows of text_len + 1 tokens (overlap one) a stream holds."""
    return max(0, (stream_len - 1) // text_len)


def stream_window(stream: np.ndarray, index: int, text_len: int) -> dict[str, np.ndarray]:
    """Window `index` of a packed stream as a next-token row; every target is real text."""
    seq = stream[index * text_len : index * text_len + text_len + 1].astype(np.int32)
    if len(seq) != text_len + 1:
        raise IndexError(f"window {index} is past the end of a stream of {len(stream)} tokens")
    return {"tokens": seq[:-1], "targets": seq[1:], "loss_mask": np.ones(text_len, bool)}


def pack_documents(docs: Iterable[np.ndarray], text_len: int) -> dict[str, np.ndarray]:
    """Packs documents into rows: tokens / targets [W, text_len] int32, loss_mask [W, text_len].

    The stream tail that does not fill a row is padded and masked out of the loss.
    """
    stream = pack_stream(docs).astype(np.int32)
    rows = max(1, -(-(len(stream) - 1) // text_len))
    padded = np.full(rows * text_len + 1, PAD, np.int32)
    padded[: len(stream)] = stream
    idx = np.arange(rows)[:, None] * text_len + np.arange(text_len)[None, :]  # [W, L]
    targets = padded[idx + 1]
    return {"tokens": padded[idx], "targets": targets, "loss_mask": targets != PAD}
