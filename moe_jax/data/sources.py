"""Record sources over users' files: image+caption JSONL manifests and text files.

A manifest is UTF-8 JSONL, one {"image": path, "caption": str} object per line, image paths
relative to the manifest's folder. Manifests are checked line by line when read (UTF-8, JSON,
fields, captions that are not strings, empty or not encodable as UTF-8 (a lone surrogate such
as the JSON escape "\\ud800"), missing files, at least one record). Image bytes are decoded
before training by data.check (check_images: the whole file, pixel mode and size) and again
when a record is read. Every problem raises ManifestError naming the manifest, the line number
and the image path.

Images (load_image) are decoded explicitly, never silently: 8-bit and 16-bit grey / RGB / palette
images are scaled by their bit depth to [0, 1]; images with an alpha channel (RGBA, LA, palette
with transparency) are composited onto a white background; 32-bit integer and float images
are refused. An image whose size is not image_size x image_size is refused unless
DataConfig.resize is set, which area-resizes it (aspect ratio not kept).

Text files are tokenized (bytes, or a checkpoint's tokenizer with DataConfig.tokenizer="hf"),
one document per file, except JSONL files (*.jsonl): one document per line, {"text": str}.
The documents are packed into one stream and served as overlapping next-token windows (see
tokenizer.pack_stream / stream_window). An empty text file is refused, naming it.
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
    for a line that is not UTF-8 or not JSON, a missing or non-string field, an empty caption
    or a missing file, and naming the manifest when it holds no records.
    """
    if not os.path.isfile(path):
        raise ManifestError(f"manifest {path!r} does not exist")
    root = os.path.dirname(os.path.abspath(path))
    records = []
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            where = f"manifest {path}, line {line_no}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ManifestError(
                    f"{where}: not valid UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1}); "
                    "save the manifest as UTF-8"
                ) from None
            if not line.strip():
                continue
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
                got = f"{type(text).__name__} {text!r}"[:80]
                raise ManifestError(
                    f"{where}, image {image!r}: 'caption' must be a non-empty string, got {got}"
                )
            bad = not_utf8(text)
            if bad:
                raise ManifestError(f"{where}, image {image!r}: 'caption' {bad}")
            full = os.path.join(root, image)
            if not os.path.isfile(full):
                raise ManifestError(f"{where}: image file {full!r} not found")
            records.append((full, text, line_no, path))
    if not records:
        raise ManifestError(
            f"manifest {path} holds no records: expected one JSON object per line, "
            '{"image": "relative/path.png", "caption": "text"}'
        )
    return records


def not_utf8(text: str) -> str:
    """Why `text` has no UTF-8 encoding (a lone surrogate: JSON accepts an unpaired escape such
    as "\\ud800", UTF-8 cannot encode it), or "" when it has one."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return (
            f"holds the lone surrogate {text[e.start]!r} at character {e.start + 1}, which has "
            "no UTF-8 encoding (a \\ud800-\\udfff escape must be half of a surrogate pair)"
        )
    return ""


_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


def _accept(im, path: str, where: str, image_size: int, resize: bool) -> None:
    """The rules an image header must pass: a pixel mode with a fixed [0, 1] scale, and the
    configured size unless `resize`."""
    if im.mode in ("I", "F") and not (im.mode == "I" and im.format == "PNG"):
        raise ManifestError(
            f"{where}: image file {path!r} has 32-bit pixel mode {im.mode!r}, which has no "
            "fixed [0, 1] scale; save it as an 8- or 16-bit PNG or a JPEG"
        )
    if im.size != (image_size, image_size) and not resize:
        w, h = im.size
        raise ManifestError(
            f"{where}: image file {path!r} is {w}x{h} pixels, expected "
            f"{image_size}x{image_size} (DataConfig.image_size); resize the files, or set "
            "DataConfig.resize=True to area-resize them (aspect ratio not kept)"
        )


def _decode(im, path: str, where: str, image_size: int, resize: bool) -> np.ndarray:
    """An open PIL image -> [S, S, 3] float32 in [0, 1] (the rules in the module docstring)."""
    from PIL import Image

    _accept(im, path, where, image_size, resize)
    mode = im.mode
    if mode in _SIXTEEN_BIT or mode == "I":  # 16-bit grey (Pillow reads 16-bit PNG as I;16 / I)
        im, scale = im.convert("I"), 65535.0
    elif mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        im, scale = im.convert("RGBA"), 255.0
    else:
        im, scale = im.convert("RGB"), 255.0
    if im.size != (image_size, image_size):
        im = im.resize((image_size, image_size), Image.Resampling.BOX)
    x = np.asarray(im, np.float32) / scale  # [S, S], [S, S, 3] or [S, S, 4]
    if x.ndim == 2:
        x = np.repeat(x[..., None], 3, axis=-1)  # grey -> [S, S, 3]
    if x.shape[-1] == 4:  # alpha onto white: rgb * a + 1 * (1 - a)
        x = x[..., :3] * x[..., 3:] + (1.0 - x[..., 3:])
    return np.clip(x, 0.0, 1.0)


def _read(path: str, where: str, use):
    """use(open PIL image); any failure but a ManifestError becomes one naming `where` and
    the file."""
    from PIL import Image  # pillow ships with matplotlib

    try:
        with Image.open(path) as im:
            return use(im)
    except ManifestError:
        raise
    except Exception as e:  # noqa: BLE001  (any decoder failure: OSError, DecompressionBomb...)
        raise ManifestError(
            f"{where}: image file {path!r} unreadable ({type(e).__name__}: {e})"
        ) from None


def load_image(path: str, image_size: int, where: str = "", *, resize: bool = False) -> np.ndarray:
    """Decodes an image file to [S, S, 3] float32 in [0, 1]; raises ManifestError naming
    `where` (manifest and line) and the file for any file it cannot decode or accept."""

    def use(im):
        im.load()
        return _decode(im, path, where, image_size, resize)

    return _read(path, where or f"image {path}", use)


def verify_image(path: str, image_size: int, where: str = "", *, resize: bool = False) -> None:
    """Raises the ManifestError load_image would, for less: the header rules, then every byte
    of pixel data decoded (a file cut short, bytes that are no image, a corrupt compressed
    stream raise). A JPEG decodes at the smallest DCT scale that keeps image_size
    (Image.draft): its entropy-coded data is still read to the end, the inverse DCT is cheaper."""
    where = where or f"image {path}"

    def use(im):
        _accept(im, path, where, image_size, resize)
        if im.format == "JPEG":
            im.draft(None, (image_size, image_size))
        im.load()

    _read(path, where, use)


class ManifestSource:
    """Random-access image+caption records: (image path, caption, line number, manifest)."""

    def __init__(
        self,
        records: list[tuple[str, str, int, str]],
        *,
        image_size: int,
        patch_size: int,
        resize: bool = False,
    ):
        self.records, self.image_size, self.resize = records, image_size, resize
        self.num_truncated = 0  # captions cut to text_len - 1 tokens (set by make_source)
        self.num_patches = (image_size // patch_size) ** 2

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        path, text, line_no, manifest = self.records[i]
        where = f"manifest {manifest}, line {line_no}"
        image = load_image(path, self.image_size, where, resize=self.resize)
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


def read_jsonl_texts(path: str) -> list[str]:
    """The "text" field of every non-empty line of a JSONL file (errors name file and line)."""
    texts = []
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            where = f"DataConfig.paths: {path}, line {line_no}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(
                    f"{where}: not valid UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1})"
                ) from None
            if not line.strip():
                continue
            try:
                text = json.loads(line).get("text")
            except (json.JSONDecodeError, AttributeError):
                text = None
            if not isinstance(text, str):
                raise ValueError(f'{where}: expected an object with a string field "text"')
            if not_utf8(text):
                raise ValueError(f'{where}: "text" {not_utf8(text)}')
            texts.append(text)
    return texts


def read_text_stream(paths: tuple[str, ...], tokenizer=None) -> np.ndarray:
    """Each text file is one document (each line of a .jsonl file one {"text"} document);
    returns the packed token stream (bytes unless `tokenizer` is given)."""
    tok = ByteTokenizer() if tokenizer is None else tokenizer
    docs = []
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"DataConfig.paths: text file {path!r} not found")
        if path.endswith(".jsonl"):
            contents = read_jsonl_texts(path)
        else:
            with open(path, "rb") as f:
                contents = [f.read()]
        if not any(contents):
            raise ValueError(f"DataConfig.paths: text file {path!r} is empty")
        docs += [tok.encode(c) for c in contents]
    return pack_stream(docs, bos=tok.bos_id, eos=tok.eos_id)
