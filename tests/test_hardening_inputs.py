"""Inputs that used to be accepted or fail obscurely: each now fails early, naming the field,
file or line (own data files, non-finite floats, MoE inputs, mesh, command line)."""

import json
import pathlib
import re
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import configs.default as default_config
from moe_jax import data
from moe_jax.core.config import MoEConfig
from moe_jax.data.tokenizer import EOS
from moe_jax.moe import MoE
from moe_jax.train.config import OptConfig, cli_overrides, from_config_dict

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _png(path, pixels):
    from PIL import Image

    Image.fromarray(pixels).save(path)


def _manifest(tmp_path, rows, name="m.jsonl", size=8):
    """rows: [(caption, pixels or None)]; writes images and the manifest, returns its path."""
    (tmp_path / "img").mkdir(exist_ok=True)
    lines = []
    for i, (caption, pixels) in enumerate(rows):
        if pixels is None:
            pixels = np.full((size, size, 3), 100, np.uint8)
        _png(tmp_path / "img" / f"{name}{i}.png", pixels)
        lines.append(json.dumps({"image": f"img/{name}{i}.png", "caption": caption}))
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _mcfg(path, **kw):
    base = dict(kind="manifest", paths=(str(path),), image_size=8, patch_size=4, text_len=8)
    return data.DataConfig(**{**base, "batch_size": 2, "n_eval": 0, **kw})


def _first(cfg):
    return next(data.make_dataset(cfg, "train", seed=0))


# ----------------------------------------------------------------------------- own data files


def test_long_caption_is_an_error_naming_file_line_and_lengths(tmp_path):
    path = _manifest(tmp_path, [("ok", None), ("much too long caption", None)])
    with pytest.raises(data.ManifestError) as err:
        data.make_source(_mcfg(path), "train")
    msg = str(err.value)
    assert f"{path}, line 2" in msg and "21 tokens" in msg and "text_len=8" in msg
    with pytest.raises(data.ManifestError, match="line 2"):
        data.check_splits(_mcfg(path))


def test_truncate_keeps_eos_and_counts(tmp_path):
    path = _manifest(tmp_path, [("much too long caption", None), ("much too long again", None)])
    cfg = _mcfg(path, truncate=True)
    assert data.make_source(cfg, "train").num_truncated == 2
    b = _first(cfg)
    assert (b["targets"][:, -1] == EOS).all() and b["loss_mask"].all()
    assert data.make_tokenizer(cfg).decode(b["tokens"][0][1:]) == "much to"


def test_non_utf8_manifest_names_file_and_line(tmp_path):
    path = _manifest(tmp_path, [("ok", None), ("ok", None)])
    path.write_bytes(path.read_bytes() + b'{"image": "img/m.jsonl0.png", "caption": "\xff"}\n')
    with pytest.raises(data.ManifestError, match="UTF-8") as err:
        data.make_source(_mcfg(path), "train")
    assert f"{path}, line 3" in str(err.value)


def test_empty_files_are_named(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(data.ManifestError, match="empty.jsonl holds no records"):
        data.make_source(_mcfg(tmp_path / "empty.jsonl"), "train")
    (tmp_path / "a.txt").write_text("some text here")
    (tmp_path / "b.txt").write_text("")
    cfg = data.DataConfig(kind="text", paths=(str(tmp_path / "b.txt"),), text_len=8, n_eval=0)
    with pytest.raises(ValueError, match="b.txt.*empty"):
        data.make_source(cfg, "train")
    cfg = data.DataConfig(kind="text", paths=(str(tmp_path / "a.txt"),), text_len=64, n_eval=0)
    with pytest.raises(ValueError, match=r"a\.txt.* holds 0 records"):
        data.check_splits(cfg)


def test_16_bit_png_is_scaled_by_its_bit_depth(tmp_path):
    grey = np.full((8, 8), 30000, np.uint16)
    path = _manifest(tmp_path, [("x", grey), ("x", grey)])
    np.testing.assert_allclose(_first(_mcfg(path))["image"], 30000 / 65535, rtol=1e-6)


def test_rgba_is_composited_onto_white(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0], rgba[:4, :, 3] = 255, 255  # red; top half opaque, bottom half transparent
    img = _first(_mcfg(_manifest(tmp_path, [("x", rgba), ("x", rgba)])))["image"][0]
    np.testing.assert_allclose(img[:4], np.broadcast_to([1.0, 0.0, 0.0], (4, 8, 3)))
    np.testing.assert_allclose(img[4:], 1.0)


def test_wrong_size_is_an_error_unless_resize(tmp_path):
    odd = np.full((10, 12, 3), 50, np.uint8)
    path = _manifest(tmp_path, [("x", odd), ("x", odd)])
    with pytest.raises(
        data.ManifestError, match=r"line 1: .*0\.png' is 12x10 pixels, expected 8x8"
    ):
        _first(_mcfg(path))
    assert _first(_mcfg(path, resize=True))["image"].shape == (2, 8, 8, 3)


def test_image_broken_after_the_source_is_built_names_file_and_line(tmp_path):
    path = _manifest(tmp_path, [("x", None), ("y", None)])
    src = data.make_source(_mcfg(path), "train")
    (tmp_path / "img" / "m.jsonl1.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(data.ManifestError, match="line 2.*m.jsonl1.png.*unreadable"):
        src[1]


def _train_dict(**over):
    c = default_config.get_config("smoke")
    for key, value in over.items():
        section, _, field = key.rpartition(".")
        (c[section] if section else c)[field] = value
    return c


def test_n_eval_larger_than_the_files_fails_in_config_conversion(tmp_path):
    path = _manifest(tmp_path, [(f"p {i}", np.zeros((16, 16, 3), np.uint8)) for i in range(6)])
    c = _train_dict(**{"data.kind": "manifest", "data.paths": (str(path),), "data.n_eval": 8})
    with pytest.raises(ValueError, match=r"n_eval=8: manifest\(s\) .*m\.jsonl holds 6 records"):
        from_config_dict(c)


# ----------------------------------------------------------------------------- non-finite


@pytest.mark.parametrize(
    "key,value",
    [
        ("moe.bias_update_rate", float("nan")),
        ("moe.z_coef", float("nan")),
        ("moe.threshold", float("inf")),
        ("opt.eps", float("inf")),
        ("opt.lr", float("nan")),
        ("opt.clip_norm", float("inf")),
        ("model.rope_theta", float("inf")),
        ("mesh.buffer_factor", float("inf")),
    ],
)
def test_non_finite_floats_are_rejected_naming_the_field(key, value):
    with pytest.raises(ValueError, match=rf"config\.{key}=(nan|inf) is invalid: .*finite"):
        from_config_dict(_train_dict(**{key: value}))


def test_non_finite_floats_in_the_dataclasses():
    with pytest.raises(ValueError, match=r"MoEConfig\.bias_update_rate=nan"):
        MoEConfig(d_model=8, d_ff=8, bias_update_rate=float("nan"))
    with pytest.raises(ValueError, match=r"MoEConfig\.capacity_factor=inf"):
        MoEConfig(d_model=8, d_ff=8, router="threshold", top_k=1, capacity_factor=float("inf"))
    with pytest.raises(ValueError, match=r"config\.opt\.eps=inf"):
        OptConfig(eps=float("inf"))


@pytest.mark.parametrize("key,value", [("fail_at_step", 10**10), ("num_steps", 2**31)])
def test_step_counts_outside_int32_are_rejected(key, value):
    with pytest.raises(ValueError, match=rf"config\.{key}={value} is invalid"):
        from_config_dict(_train_dict(**{key: value}))


# ----------------------------------------------------------------------------- MoE inputs


@pytest.fixture(scope="module")
def layer():
    return MoE(MoEConfig(d_model=8, d_ff=8, num_experts=4, top_k=2), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_])
def test_moe_refuses_non_float_input(layer, dtype):
    with pytest.raises(ValueError, match=f"dtype {jnp.dtype(dtype).name}"):
        layer(jnp.ones((2, 3, 8), dtype))


@pytest.mark.parametrize("ids", [[0, 1, 2], [-1, 0, 1]])
def test_moe_refuses_modality_ids_out_of_range(layer, ids):
    x = jnp.ones((1, 3, 8))
    with pytest.raises(ValueError, match=r"num_modalities=2"):
        layer(x, jnp.asarray([ids], jnp.int32))
    with pytest.raises(ValueError, match="integer array, got dtype float32"):
        layer(x, jnp.zeros((1, 3), jnp.float32))
    y, _ = layer(x, jnp.asarray([[0, 1, 1]], jnp.int32))  # in range: runs
    assert y.shape == x.shape


# ----------------------------------------------------------------------------- mesh


def test_mesh_larger_than_the_devices_says_how_to_get_cpu_devices():
    with pytest.raises(ValueError, match=r"config\.mesh\.expert=16 .*xla_force_host_platform"):
        from_config_dict(_train_dict(**{"mesh.expert": 16, "moe.num_experts": 16}))


def test_batch_not_divisible_by_the_mesh_names_batch_size():
    # conftest gives 8 CPU devices: data x expert = 2 x 4; batch 4 does not split over 8.
    c = _train_dict(**{"mesh.expert": 4, "data.batch_size": 4, "data.n_eval": 16})
    with pytest.raises(ValueError, match=r"config\.data\.batch_size=4 .*2 x 1 x 4 = 8"):
        from_config_dict(c)


# ----------------------------------------------------------------------------- command line


def test_switching_router_drops_the_files_null_settings():
    c = cli_overrides(_train_dict(), {"moe.router": "topk", "moe.top_k": 2})
    c.moe.router, c.moe.top_k = "topk", 2
    assert c.moe.rho is None and from_config_dict(c).moe.router == "topk"
    c = cli_overrides(_train_dict(), {"moe.router": "topk", "moe.rho": 0.5})
    assert c.moe.rho == 0.5  # given explicitly: kept, and MoEConfig then says it conflicts
    assert cli_overrides(_train_dict(), {"moe.top_k": 2}).moe.rho == 0.5


def test_cli_config_error_is_one_line_and_exit_2(tmp_path):
    cmd = [sys.executable, str(ROOT / "train.py"), "--config=configs/default.py:smoke"]
    cmd += ["--config.opt.eps=inf", f"--workdir={tmp_path}"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        "error: config.opt.eps=inf is invalid: must be a finite number (not NaN or inf)"
    )


def test_tensorboard_extra_and_own_files_section():
    setup = (ROOT / "setup.py").read_text()
    assert '"tensorboard": ["tensorboard' in setup
    readme = (ROOT / "README.md").read_text()
    assert 'pip install -e ".[tensorboard]" && tensorboard --logdir' in readme
    training = (ROOT / "docs" / "training.md").read_text()  # the guide README links to
    assert "## Training on your own files" in training and "(docs/training.md)" in readme


def _train_py(tmp_path, *args):
    cmd = [sys.executable, str(ROOT / "train.py"), "--config=configs/default.py:smoke", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_cli_faults_are_one_line_naming_the_field_or_file(tmp_path):
    """An unknown config field, a workdir that is a file and a truncated config.json in the
    workdir: one line `error: ...` naming it, status 2, no traceback, nothing trained."""
    as_file = tmp_path / "a_file"
    as_file.write_text("")
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    (truncated / "config.json").write_text('{"fingerprint": "ab')
    cases = [
        (
            [f"--workdir={tmp_path / 'x'}", "--config.data.nope=1"],
            r"--config\.data\.nope: .*'nope'",
        ),
        ([f"--workdir={as_file}"], rf"workdir {as_file} is a file"),
        ([f"--workdir={truncated}"], rf"{truncated / 'config.json'} is unreadable"),
    ]
    for args, pattern in cases:
        r = _train_py(tmp_path, *args)
        assert r.returncode == 2, (args, r.stderr[-2000:])
        assert "Traceback" not in r.stderr, r.stderr[-2000:]
        last = r.stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and re.search(pattern, last), (args, last)


def test_config_faults_name_their_field():
    with pytest.raises(ValueError, match=r"config\.model\.d_model=0 is invalid"):
        from_config_dict(_train_dict(**{"model.d_model": 0}))
    c = _train_dict()
    c.data.n_train = 200  # documented, and settable (also as --config.data.n_train)
    assert from_config_dict(c).data.n_train == 200


def test_hf_checkpoint_faults_name_the_key_or_file(tmp_path):
    from moe_jax import hf
    from moe_jax.data.hf_tokenizer import HFTokenizer

    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 32}
    cfg |= dict(num_hidden_layers=1, num_attention_heads=4, intermediate_size=64)
    with pytest.raises(hf.UnsupportedCheckpointError, match=r"x/config\.json.*vocab_size"):
        hf.model_config(cfg, where="x/config.json")
    with pytest.raises(ValueError, match=r"no tokenizer file .*tokenizer\.json"):
        HFTokenizer(str(tmp_path))


def test_make_arrayrecord_refuses_text_len_0(tmp_path, capsys):
    from moe_jax.data import make_arrayrecord

    (tmp_path / "t.txt").write_text("hello world")
    with pytest.raises(SystemExit) as exit_info:
        make_arrayrecord.main([f"--out={tmp_path / 'x'}", "--text_len=0", str(tmp_path / "t.txt")])
    assert exit_info.value.code == 2
    assert "--text_len must be >= 1" in capsys.readouterr().err


def test_arrayrecord_faults_name_the_file_and_record(tmp_path):
    """A corrupt ArrayRecord file, a sidecar that belongs to another file, and a record whose
    ids are past the tokenizer's: errors that name the file (and the record)."""
    from moe_jax.data import arrayrecord
    from moe_jax.data.tokenizer import ByteTokenizer

    (tmp_path / "a.txt").write_text("hello world, " * 40)
    (tmp_path / "b.txt").write_text("more text here " * 10)
    a, b = str(tmp_path / "a.ar"), str(tmp_path / "b.ar")
    n_a = arrayrecord.convert([str(tmp_path / "a.txt")], a, text_len=8, tokenizer=ByteTokenizer())
    arrayrecord.convert([str(tmp_path / "b.txt")], b, text_len=8, tokenizer=ByteTokenizer())
    vocab = ByteTokenizer().vocab_size
    records = arrayrecord.WindowRecords((a,), start=0, length=n_a, text_len=8, vocab_size=vocab)
    assert len(records[n_a - 1]["tokens"]) == 8
    small = arrayrecord.WindowRecords((a,), start=0, length=n_a, text_len=8, vocab_size=50)
    with pytest.raises(ValueError, match=rf"{re.escape(repr(a))}, record 0 holds token id"):
        small[0]
    # b's sidecar next to a: the counts disagree.
    (tmp_path / "a.ar.json").write_text((tmp_path / "b.ar.json").read_text())
    with pytest.raises(ValueError, match=r"a\.ar' holds \d+ records but its metadata"):
        arrayrecord.check_files((a,), 8, vocab)
    (tmp_path / "b.ar").write_bytes(b"\x00garbage" * 20)
    with pytest.raises(ValueError, match=r"b\.ar' is unreadable"):
        arrayrecord.check_files((b,), 8, vocab)
