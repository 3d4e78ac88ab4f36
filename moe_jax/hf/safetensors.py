"""Reading and writing safetensors checkpoints through the `safetensors` package (no torch).

A safetensors file is an 8-byte little-endian header length n, n bytes of JSON
    {name: {"dtype": "F32" | "BF16" | ..., "shape": [...], "data_offsets": [begin, end]},
     "__metadata__": {str: str}}
and the raw little-endian tensor bytes; offsets count from the end of the header. A
checkpoint directory holds one `model.safetensors` or several shards listed by
`model.safetensors.index.json` ({"weight_map": {name: file}}).

The package validates a header when its file is opened: well-formed JSON, offsets that tile
the data from 0 to the end of the file without gap or overlap, and each byte range equal to
dtype size x shape. So a corrupt or truncated file is refused, naming it, before any tensor
is read, instead of loading weights from the wrong bytes. Files are memory-mapped, and `get`
copies one tensor out into a fresh numpy array (bfloat16 through ml_dtypes), so a loader
that drops each tensor after placing it peaks at about one tensor beyond the model.
"""

from __future__ import annotations

import contextlib
import json
import os

import ml_dtypes  # also registers np.dtype("bfloat16"), which the package asks numpy for
import numpy as np
import safetensors
import safetensors.numpy

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
_DTYPES = {  # the dtypes read and written: numpy's, and bfloat16 through ml_dtypes
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
_WRITTEN = {np.dtype(t) for t in _DTYPES.values()}


def _open(path: str):
    """The package's reader of one file; a header it refuses raises ValueError naming it."""
    try:
        return safetensors.safe_open(path, framework="numpy")
    except safetensors.SafetensorError as e:
        raise ValueError(f"{path}: not a valid safetensors file ({e})") from e


class CheckpointReader:
    """Tensors of a checkpoint directory (one file or an index of shards), one at a time."""

    def __init__(self, directory: str):
        self.directory = directory
        index = os.path.join(directory, INDEX)
        if os.path.isfile(index):
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        elif os.path.isfile(os.path.join(directory, SINGLE)):
            weight_map = None
        else:
            raise FileNotFoundError(
                f"{directory}: no {SINGLE} or {INDEX} (only safetensors checkpoints are read; "
                "convert .bin / .pth files with transformers' save_pretrained first)"
            )
        files = sorted(set(weight_map.values())) if weight_map else [SINGLE]
        self.metadata: dict[str, str] = {}
        self._entries: dict[str, tuple[str, object]] = {}  # name -> (path, open file)
        with contextlib.ExitStack() as opened:  # every shard is validated before any read
            for name in files:
                path = os.path.join(directory, name)
                handle = opened.enter_context(_open(path))
                self.metadata.update(handle.metadata() or {})
                for key in handle.keys():
                    self._entries[key] = (path, handle)
            self._files = opened.pop_all()  # kept open until close()
        if weight_map:
            missing = sorted(set(weight_map) - set(self._entries))
            if missing:
                self.close()
                raise ValueError(f"{index} lists tensors no shard holds: {missing[:5]}")

    def keys(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name][1].get_slice(name).get_shape())

    def get(self, name: str) -> np.ndarray:
        """Tensor `name`, copied from the mapped file into a new array."""
        if name not in self._entries:
            raise KeyError(f"{self.directory}: the checkpoint has no tensor {name!r}")
        path, handle = self._entries[name]
        dtype = handle.get_slice(name).get_dtype()
        if dtype not in _DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {dtype}")
        try:
            return handle.get_tensor(name)
        except safetensors.SafetensorError as e:
            raise ValueError(f"{path}: tensor {name!r}: {e}") from e

    def close(self) -> None:
        """Unmaps the files; the reader is unusable afterwards."""
        self._files.close()


def save_file(path: str, tensors: dict[str, np.ndarray], metadata: dict | None = None) -> None:
    """Writes `tensors` (numpy arrays, bfloat16 via ml_dtypes) as one safetensors file, replaced
    atomically (written beside it, then renamed) so a crash never leaves a half-written file."""
    arrays = {}
    for name, a in tensors.items():
        a = np.ascontiguousarray(a)
        if a.dtype not in _WRITTEN:
            raise ValueError(f"tensor {name!r}: dtype {a.dtype} has no safetensors name")
        arrays[name] = a
    meta = {str(k): str(v) for k, v in metadata.items()} if metadata else None
    try:
        safetensors.numpy.save_file(arrays, path + ".tmp", metadata=meta)
    except safetensors.SafetensorError as e:
        raise ValueError(f"{path}: cannot write safetensors: {e}") from e
    os.replace(path + ".tmp", path)
