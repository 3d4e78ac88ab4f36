"""Pre-tokenized text in ArrayRecord files (grain's native random-access format).

Format: every record is one next-token window of text_len + 1 token ids, little-endian
uint32 bytes (the windows of tokenizer.stream_window over the packed stream bos doc eos ...).
Beside each file, `<file>.json` holds {"text_len", "vocab_size", "tokenizer", "windows"}, so
a source made for another text_len or tokenizer is refused before training, naming the file.

Convert text / JSONL files (same reading rules as data kind "text"):
    python -m moe_jax.data.make_arrayrecord --out=/data/train.array_record --text_len=128 \
        --tokenizer=/path/to/checkpoint a.txt b.jsonl          # or --tokenizer=byte
Train on it: --config.data.kind=arrayrecord "--config.data.paths=('/data/train.array_record',)"
(with --config.init.hf the checkpoint's tokenizer is the data tokenizer; the converter must have
used the same one). Records are read by index, so shuffling, sharding and resume are exact.
"""

from __future__ import annotations

import json
import os

import numpy as np

from moe_jax.data.sources import read_text_stream
from moe_jax.data.tokenizer import num_windows

META_SUFFIX = ".json"


def read_meta(path: str) -> dict:
    """The sidecar metadata of an ArrayRecord file written by convert()."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"DataConfig.paths: ArrayRecord file {path!r} not found")
    meta = path + META_SUFFIX
    if not os.path.isfile(meta):
        raise FileNotFoundError(
            f"DataConfig.paths: {path!r} has no {meta!r}; write the file with "
            "python -m moe_jax.data.make_arrayrecord"
        )
    try:
        with open(meta, encoding="utf-8") as f:
            out = json.load(f)
        for key in ("text_len", "vocab_size", "tokenizer", "windows"):
            out[key]  # noqa: B018 - every key present
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(
            f"DataConfig.paths: the metadata {meta!r} of {path!r} is unreadable "
            f"({type(err).__name__}: {err}); write the file again with "
            "python -m moe_jax.data.make_arrayrecord"
        ) from None
    return out


def count_records(path: str) -> int:
    """The records an ArrayRecord file holds; a ValueError naming it when it is unreadable."""
    import grain

    try:
        return len(grain.sources.ArrayRecordDataSource([path]))
    except Exception as err:  # array_record raises RuntimeError / OSError-like errors
        raise ValueError(
            f"DataConfig.paths: ArrayRecord file {path!r} is unreadable ({type(err).__name__}: "
            f"{str(err)[:200]}); write it again with python -m moe_jax.data.make_arrayrecord"
        ) from None


def check_files(paths: tuple[str, ...], text_len: int, vocab_size: int) -> int:
    """Checks every file's metadata against the config; returns the number of windows."""
    total = 0
    for path in paths:
        meta = read_meta(path)
        if meta["text_len"] != text_len:
            raise ValueError(
                f"DataConfig.text_len={text_len} is invalid for {path}: its windows hold "
                f"text_len={meta['text_len']} (convert again or set data.text_len)"
            )
        if meta["vocab_size"] > vocab_size:
            raise ValueError(
                f"DataConfig.tokenizer: {path} was written with a tokenizer of "
                f"{meta['vocab_size']} ids ({meta['tokenizer']}), the config's has {vocab_size}"
            )
        records = count_records(path)
        if records != meta["windows"]:
            raise ValueError(
                f"DataConfig.paths: {path!r} holds {records} records but its metadata "
                f"{path + META_SUFFIX!r} says {meta['windows']}: the two files do not belong "
                "together; write them again with python -m moe_jax.data.make_arrayrecord"
            )
        total += records
    return total


class WindowRecords:
    """Random-access windows of [start, start + length) over ArrayRecord files."""

    def __init__(
        self,
        paths: tuple[str, ...],
        *,
        start: int,
        length: int,
        text_len: int,
        vocab_size: int | None = None,
    ):
        import grain

        self.records = grain.sources.ArrayRecordDataSource(list(paths))
        self.start, self.length, self.text_len = start, length, text_len
        self.paths, self.vocab_size = tuple(paths), vocab_size
        self.ends = np.cumsum([count_records(p) for p in paths])  # [files]: end of each file

    def _where(self, record: int) -> str:
        """`file`, record `k` of it: where global record `record` lives."""
        f = int(np.searchsorted(self.ends, record, side="right"))
        return f"{self.paths[f]!r}, record {record - (self.ends[f - 1] if f else 0)}"

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.length:
            raise IndexError(f"window {i} outside [0, {self.length})")
        record = self.start + i
        try:
            raw = self.records[record]
        except Exception as err:
            raise ValueError(f"{self._where(record)} is unreadable: {str(err)[:200]}") from None
        seq = np.frombuffer(raw, "<u4")
        if len(seq) != self.text_len + 1:
            raise ValueError(
                f"{self._where(record)} holds {len(seq)} ids, not text_len + 1 = "
                f"{self.text_len + 1}"
            )
        if self.vocab_size is not None and seq.size and int(seq.max()) >= self.vocab_size:
            raise ValueError(
                f"{self._where(record)} holds token id {int(seq.max())}, past the tokenizer's "
                f"{self.vocab_size} ids (written with another tokenizer?)"
            )
        seq = seq.astype(np.int32)
        return {"tokens": seq[:-1], "targets": seq[1:], "loss_mask": np.ones(self.text_len, bool)}


def convert(paths, out: str, *, text_len: int, tokenizer, tokenizer_name: str = "") -> int:
    """Tokenizes text / JSONL files into windows of text_len + 1 ids in one ArrayRecord file
    `out` (plus its metadata); returns the number of windows."""
    from array_record.python.array_record_module import ArrayRecordWriter

    stream = read_text_stream(tuple(paths), tokenizer)
    n = num_windows(len(stream), text_len)
    if n == 0:
        raise ValueError(f"{paths}: {len(stream)} tokens make no window of {text_len + 1}")
    writer = ArrayRecordWriter(out, "group_size:1")
    try:
        for i in range(n):
            window = stream[i * text_len : i * text_len + text_len + 1]  # = stream_window
            writer.write(window.astype("<u4").tobytes())
    finally:
        writer.close()
    meta = {
        "text_len": text_len,
        "vocab_size": int(tokenizer.vocab_size),
        "tokenizer": tokenizer_name or type(tokenizer).__name__,
        "windows": n,
    }
    with open(out + META_SUFFIX, "w", encoding="utf-8") as f:
        json.dump(meta, f)
    return n
