"""Record sources over users' files: image+caption JSONL manifests and text files.

A manifest is JSONL, one {"image": path, "caption": str} object per line, image paths relative
to the manifest's folder. Manifests are checked line by line when read (JSON, fields, empty
captions, missing files); image bytes are decoded when a record is read. Every problem raises
ManifestError naming the manifest, the line number and the image path.

Text files are byte-tokenized, one document per file, packed into one stream and served as
overlapping next-token windows (see tokenizer.pack_stream / stream_window).
"""

from __future__ import annotations

import json
import os

import numpy as np

from moe_jax.data.tokenizer import ByteTokenizer, pack_stream, stream_window


class ManifestError(ValueError):
    """A manifest record that cannot be used; the message names the file, line and image."""


def read_manifest(path: str) -> list[tuple[str, str, int, str]]:
    """Parses a JSONL manifest into (image path, caption, line number, manifest) records.

    Image paths are relative to the manifest's folder. Raises ManifestError naming the line
    for a bad JSON line, a missing or non-string field, an empty caption or a missing file.
    """
    if not os.path.isfile(path):
        raise ManifestError(f"manifest {path!r} does not exist")
    root = os.path.dirname(os.path.abspath(path))
    records = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"manifest {path}, line {line_no}"
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as e:
                raise ManifestError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(entry, dict):
                raise ManifestError(f"{where}: expected an object with 'image' and 'caption'")
            image, text = entry.get("image"), entry.get("caption")
            if not isinstance(image, str) or not image:
                raise ManifestError(f"{where}: 'image' must be a non-empty path string")
            if not isinstance(text, str) or not text.strip():
                raise ManifestError(f"{where}, image {image!r}: 'caption' is empty or not a string")
            full = os.path.join(root, image)
            if not os.path.isfile(full):
                raise ManifestError(f"{where}: image file {full!r} not found")
            records.append((full, text, line_no, path))
    return records


def load_image(path: str, image_size: int, where: str = "") -> np.ndarray:
    """Decodes an image file to [S, S, 3] float32 in [0, 1], area-resized (aspect not kept)."""
    from PIL import Image  # pillow ships with matplotlib

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if im.size != (image_size, image_size):
                im = im.resize((image_size, image_size), Image.Resampling.BOX)
            return np.asarray(im, np.float32) / 255.0
    except (OSError, ValueError, SyntaxError) as e:
        raise ManifestError(f"{where or path}: image file {path!r} unreadable ({e})") from None


class ManifestSource:
    """Random-access image+caption records: (image path, caption, line number, manifest)."""

    def __init__(
        self, records: list[tuple[str, str, int, str]], *, image_size: int, patch_size: int
    ):
        self.records, self.image_size = records, image_size
        self.num_patches = (image_size // patch_size) ** 2

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        path, text, line_no, manifest = self.records[i]
        image = load_image(path, self.image_size, f"manifest {manifest}, line {line_no}")
        return {"image": image, "caption": text, "patch_fg": np.ones(self.num_patches, bool)}


class WindowSource:
    """Random-access next-token windows of text_len + 1 tokens over a packed token stream."""

    def __init__(self, stream: np.ndarray, *, start: int, length: int, text_len: int):
        self.stream, self.start, self.length, self.text_len = stream, start, length, text_len

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.length:
            raise IndexError(f"window {i} outside [0, {self.length})")
        return stream_window(self.stream, self.start + i, self.text_len)


def read_text_stream(paths: tuple[str, ...]) -> np.ndarray:
    """Each file is one document of bytes; returns the packed byte-token stream."""
    tok = ByteTokenizer()
    docs = []
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"DataConfig.paths: text file {path!r} not found")
        with open(path, "rb") as f:
            docs.append(tok.encode(f.read()))
    return pack_stream(docs)
