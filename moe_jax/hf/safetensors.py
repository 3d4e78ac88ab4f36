"""Reading and writing the safetensors format with numpy alone (no torch).

A safetensors file is an 8-byte little-endian header length n, n bytes of JSON
    {name: {"dtype": "F32" | "BF16" | ..., "shape": [...], "data_offsets": [begin, end]},
     "__metadata__": {str: str}}
and the raw little-endian tensor bytes; offsets count from the end of the header. A
checkpoint directory holds one `model.safetensors` or several shards listed by
`model.safetensors.index.json` ({"weight_map": {name: file}}).

The reader hands out one tensor at a time, read from its byte range into a fresh numpy array
(bfloat16 through ml_dtypes); nothing else of the file is held in memory or mapped, so a
loader that drops each tensor after placing it peaks at about one tensor beyond the model.
"""

from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


def read_header(path: str) -> tuple[int, dict]:
    """(byte offset of the data, header dict) of one safetensors file."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > 100 << 20:
            raise ValueError(f"{path}: not a safetensors file (header of {n} bytes)")
        header = json.loads(f.read(n))
    return 8 + n, header


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
        self._entries: dict[str, tuple[str, int, dict]] = {}
        for name in files:
            path = os.path.join(directory, name)
            start, header = read_header(path)
            self.metadata.update(header.pop("__metadata__", None) or {})
            for key, entry in header.items():
                self._entries[key] = (path, start, entry)
        if weight_map:
            missing = sorted(set(weight_map) - set(self._entries))
            if missing:
                raise ValueError(f"{index} lists tensors no shard holds: {missing[:5]}")

    def keys(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name][2]["shape"])

    def get(self, name: str) -> np.ndarray:
        """Tensor `name`, read from the file into a new array."""
        if name not in self._entries:
            raise KeyError(f"{self.directory}: the checkpoint has no tensor {name!r}")
        path, start, entry = self._entries[name]
        if entry["dtype"] not in _DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {entry['dtype']}")
        dtype = _DTYPES[entry["dtype"]]
        begin, end = entry["data_offsets"]
        count = (end - begin) // dtype.itemsize
        if count * dtype.itemsize != end - begin or count != int(np.prod(entry["shape"])):
            raise ValueError(f"{path}: tensor {name!r}: byte range does not match its shape")
        with open(path, "rb") as f:
            a = np.fromfile(f, dtype=dtype, count=count, offset=start + begin)
        if a.size != count:
            raise ValueError(f"{path}: truncated file (tensor {name!r})")
        return a.reshape(entry["shape"])

    def close(self) -> None:
        """Nothing stays open between reads; kept for symmetry with other readers."""


def save_file(path: str, tensors: dict[str, np.ndarray], metadata: dict | None = None) -> None:
    """Writes `tensors` (numpy arrays, bfloat16 via ml_dtypes) as one safetensors file."""
    header, offset, arrays = {}, 0, []
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        if a.dtype not in _NAMES:
            raise ValueError(f"tensor {name!r}: dtype {a.dtype} has no safetensors name")
        header[name] = {
            "dtype": _NAMES[a.dtype],
            "shape": list(a.shape),
            "data_offsets": [offset, offset + a.nbytes],
        }
        offset += a.nbytes
        arrays.append(a)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned
    with open(path + ".tmp", "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for a in arrays:
            f.write(a.tobytes())
    os.replace(path + ".tmp", path)
