"""Built-in text corpus: the running interpreter's own standard library source, as bytes.

DataConfig(kind="pystdlib") reads every ``*.py`` file under the interpreter's Lib/ directory
(sysconfig's "stdlib" path; site-packages, __pycache__ and the test suites left out: folders
named test / tests / idle_test and files named test_*.py), with no download. Files are split
deterministically by their path relative to Lib/: a file is held out when
crc32(relative path) % 10 == 0 (about a tenth of the bytes), so no held-out byte was ever in a
training window. Each split is packed as bos file eos bos file eos ... in sorted path order and
served as next-token windows of text_len + 1 bytes (tokenizer.stream_window). Train windows are
[0, n_train) of the train stream (all of it when n_train is None); the n_eval held-out windows
are spread evenly over the whole held-out stream, so they sample every held-out file.

The corpus is the Python Software Foundation's source (PSF license). It differs between Python
versions: describe_corpus() gives the interpreter version, file and byte counts of a run.
"""

from __future__ import annotations

import functools
import os
import sys
import sysconfig
import zlib

import numpy as np

from moe_jax.data.sources import WindowSource
from moe_jax.data.tokenizer import ByteTokenizer, num_windows, pack_stream, stream_window

SKIP_DIRS = frozenset({"site-packages", "__pycache__", "test", "tests", "idle_test"})
HELDOUT_MOD = 10  # a file is held out when crc32(relative path) % HELDOUT_MOD == 0


def stdlib_dir() -> str:
    """The running interpreter's Lib/ directory."""
    return sysconfig.get_paths()["stdlib"]


def is_heldout(rel_path: str) -> bool:
    """Whether a file (path relative to Lib/, '/'-separated) is in the held-out split."""
    return zlib.crc32(rel_path.encode("utf-8")) % HELDOUT_MOD == 0


def list_files(root: str | None = None) -> list[str]:
    """Sorted '/'-separated paths, relative to ``root`` (default Lib/), of the corpus files."""
    root = root or stdlib_dir()
    out = []
    for here, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS]
        for name in files:
            if name.endswith(".py") and not name.startswith("test_"):
                out.append(os.path.relpath(os.path.join(here, name), root).replace(os.sep, "/"))
    return sorted(out)


@functools.lru_cache(maxsize=4)
def split_stream(split: str, root: str | None = None) -> np.ndarray:
    """The packed byte-token stream of one split ("train" or "eval") of the corpus."""
    if split not in ("train", "eval"):
        raise ValueError(f"split={split!r} is invalid: must be 'train' or 'eval'")
    root = root or stdlib_dir()
    files = [f for f in list_files(root) if is_heldout(f) == (split == "eval")]
    if not files:
        raise FileNotFoundError(f"DataConfig.kind='pystdlib': no .py files under {root!r}")
    tok = ByteTokenizer()
    docs = []
    for rel in files:
        with open(os.path.join(root, rel), "rb") as f:
            docs.append(tok.encode(f.read()))
    return pack_stream(docs, bos=tok.bos_id, eos=tok.eos_id)


class SpreadWindows:
    """``length`` windows spread evenly over a stream: window i starts at window
    floor(i * available / length) (so every part of the stream is sampled)."""

    def __init__(self, stream: np.ndarray, *, length: int, text_len: int):
        self.stream, self.length, self.text_len = stream, length, text_len
        self.available = num_windows(len(stream), text_len)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.length:
            raise IndexError(f"window {i} outside [0, {self.length})")
        return stream_window(self.stream, i * self.available // self.length, self.text_len)


def make_source(cfg, split: str):
    """The record source of one split for a DataConfig of kind "pystdlib"; raises ValueError
    naming n_train / n_eval when the corpus holds fewer windows."""
    stream = split_stream(split)
    n = num_windows(len(stream), cfg.text_len)
    if split == "train":
        length = n if cfg.n_train is None else cfg.n_train
        if not 1 <= length <= n:
            raise ValueError(
                f"DataConfig.n_train={cfg.n_train!r} is invalid for kind 'pystdlib': the train "
                f"split holds {n} windows of text_len + 1 = {cfg.text_len + 1} bytes"
            )
        return WindowSource(stream, start=0, length=length, text_len=cfg.text_len)
    if cfg.n_eval > n:
        raise ValueError(
            f"DataConfig.n_eval={cfg.n_eval} is invalid for kind 'pystdlib': the held-out split "
            f"holds {n} windows of text_len + 1 = {cfg.text_len + 1} bytes"
        )
    return SpreadWindows(stream, length=cfg.n_eval, text_len=cfg.text_len)


def describe_corpus() -> dict:
    """Interpreter version, Lib/ path, and files and bytes of each split (for write-ups)."""
    files = list_files()
    out = {"python": sys.version.split()[0], "lib": stdlib_dir()}
    for split in ("train", "eval"):
        out[f"{split}_files"] = sum(is_heldout(f) == (split == "eval") for f in files)
        out[f"{split}_tokens"] = int(len(split_stream(split)))
    return out
