"""safetensors files: every dtype the loaders use round-trips exactly (bf16 included), a sharded
index reads as one checkpoint, and a corrupt file (shifted or overlapping data_offsets, a byte
range that disagrees with dtype x shape, bad header JSON, truncated data) is refused naming the
file before any tensor is read, never loaded from the wrong bytes."""

from __future__ import annotations

import json
import os
import re
import struct
import tracemalloc

import ml_dtypes
import numpy as np
import pytest

from moe_jax.hf.safetensors import INDEX, SINGLE, CheckpointReader, save_file


def _tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "a.weight": rng.normal(size=(4, 6)).astype(np.float32),
        "b.weight": rng.normal(size=(3, 5)).astype(ml_dtypes.bfloat16),
        "c.bias": rng.normal(size=(7,)).astype(np.float16),
        "d.step": np.arange(5, dtype=np.int32),
        "e.mask": np.array([True, False, True]),
    }


def _write(directory, tensors=None) -> str:
    os.makedirs(directory, exist_ok=True)
    save_file(os.path.join(directory, SINGLE), tensors or _tensors(), {"format": "pt"})
    return str(directory)


def _rewrite(path, change=lambda header: None, cut: int = 0) -> None:
    """Rewrites a file with `change` applied to its header (the 8-byte length prefix kept equal
    to the new JSON, so only the edited fields are wrong) and its last `cut` bytes dropped."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = f.read()
    change(header)
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob + data[: len(data) - cut])


def _first_two(header) -> tuple[str, str]:
    """Names of the first two tensors in the data section (by begin offset)."""
    names = sorted(
        (k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"]
    )
    return names[0], names[1]


def test_round_trip_is_exact(tmp_path):
    tensors = _tensors()
    reader = CheckpointReader(_write(tmp_path))
    assert reader.keys() == sorted(tensors) and reader.metadata == {"format": "pt"}
    for name, want in tensors.items():
        got = reader.get(name)
        assert got.dtype == want.dtype and reader.shape(name) == want.shape, name
        np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))  # bit-exact
    reader.close()
    assert not os.path.exists(os.path.join(tmp_path, SINGLE + ".tmp"))


def test_rewrite_without_change_still_loads(tmp_path):
    """The corruption helper alone produces a valid file: the refusals below come from the
    edited field, not from how the file was rewritten."""
    path = os.path.join(_write(tmp_path), SINGLE)
    _rewrite(path)
    np.testing.assert_array_equal(
        CheckpointReader(str(tmp_path)).get("a.weight"), _tensors()["a.weight"]
    )


def _shift(header):
    first, _ = _first_two(header)
    header[first]["data_offsets"] = [o + 4 for o in header[first]["data_offsets"]]


def _overlap(header):
    first, second = _first_two(header)
    header[second]["data_offsets"][0] = header[first]["data_offsets"][0]


def _shape(header):
    header["a.weight"]["shape"] = [6, 5]


def _refused(path) -> str:
    return re.escape(f"{path}: not a valid safetensors file (")


@pytest.mark.parametrize(
    "change,why",
    [
        (_shift, "invalid offset"),  # unchecked, it reads 4 bytes late into the next tensor
        (_overlap, "invalid offset"),
        (_shape, "invalid shape, data type, or offset"),  # 30 elements over the bytes of 24
    ],
)
def test_corrupt_header_is_refused_naming_the_file(tmp_path, change, why):
    path = os.path.join(_write(tmp_path), SINGLE)
    _rewrite(path, change)
    with pytest.raises(ValueError, match=_refused(path) + f".*{why}"):
        CheckpointReader(str(tmp_path))


def test_shifted_offsets_name_the_tensor(tmp_path):
    path = os.path.join(_write(tmp_path), SINGLE)
    shifted = []
    _rewrite(path, lambda header: (_shift(header), shifted.append(_first_two(header)[0])))
    with pytest.raises(ValueError, match=_refused(path) + f".*invalid offset.*{shifted[0]}"):
        CheckpointReader(str(tmp_path))


def test_truncated_file_is_refused(tmp_path):
    path = os.path.join(_write(tmp_path), SINGLE)
    _rewrite(path, cut=4)
    with pytest.raises(ValueError, match=_refused(path) + ".*incomplete"):
        CheckpointReader(str(tmp_path))


def test_bad_header_json_is_refused(tmp_path):
    path = os.path.join(_write(tmp_path), SINGLE)
    with open(path, "r+b") as f:
        f.seek(8)
        f.write(b"[")  # the header's opening brace
    with pytest.raises(ValueError, match=_refused(path) + ".*JSON"):
        CheckpointReader(str(tmp_path))


def test_sharded_index_round_trip(tmp_path):
    tensors = _tensors()
    names = sorted(tensors)
    shards = {
        "model-00001-of-00002.safetensors": names[:2],
        "model-00002-of-00002.safetensors": names[2:],
    }
    for shard, keys in shards.items():
        save_file(os.path.join(tmp_path, shard), {k: tensors[k] for k in keys})
    weight_map = {k: shard for shard, keys in shards.items() for k in keys}
    with open(os.path.join(tmp_path, INDEX), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    reader = CheckpointReader(str(tmp_path))
    assert reader.keys() == names
    for name in names:
        np.testing.assert_array_equal(reader.get(name).view(np.uint8), tensors[name].view(np.uint8))
    reader.close()

    weight_map["z.missing"] = shard
    with open(os.path.join(tmp_path, INDEX), "w") as f:
        json.dump({"weight_map": weight_map}, f)
    with pytest.raises(ValueError, match=r"lists tensors no shard holds: \['z\.missing'\]"):
        CheckpointReader(str(tmp_path))

    _rewrite(os.path.join(tmp_path, shard), _shift)
    weight_map.pop("z.missing")
    with open(os.path.join(tmp_path, INDEX), "w") as f:
        json.dump({"weight_map": weight_map}, f)
    with pytest.raises(ValueError, match=_refused(os.path.join(tmp_path, shard))):
        CheckpointReader(str(tmp_path))


def test_unsupported_dtype_is_refused_on_write(tmp_path):
    with pytest.raises(ValueError, match=r"tensor 'z': dtype complex128"):
        save_file(os.path.join(tmp_path, SINGLE), {"z": np.zeros(2, np.complex128)})
    assert not os.listdir(tmp_path)


def test_missing_tensor_is_a_key_error(tmp_path):
    reader = CheckpointReader(_write(tmp_path))
    with pytest.raises(KeyError, match="no tensor 'nope'"):
        reader.get("nope")


def test_writing_copies_no_tensor(tmp_path):
    """save_file hands the arrays' memory to the writer: host allocations while writing stay
    below one tensor (safetensors < 0.8 copied every tensor to bytes first: the whole model)."""
    tensors = {f"t{i}": np.full((256, 1024), i, np.float32) for i in range(8)}  # 1 MiB each
    tracemalloc.start()
    save_file(os.path.join(tmp_path, SINGLE), tensors)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < tensors["t0"].nbytes, peak
    np.testing.assert_array_equal(CheckpointReader(str(tmp_path)).get("t7"), tensors["t7"])
