"""Damaged own data files (truncated or garbage images, captions with no UTF-8 encoding):
refused by the up-front check (pipeline.check_splits, before anything is compiled) or when
read, in one message naming the manifest, the line and the image file."""

import io
import json
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

from moe_jax import data
from moe_jax.data import check, sources

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _image_bytes(size: int, fmt: str = "PNG", seed: int = 0) -> bytes:
    """A noise image (noise so the compressed pixel data is most of the file)."""
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, fmt)
    return buf.getvalue()


def _manifest(
    tmp_path, n: int, *, size: int = 16, fmt: str = "PNG", extra: str = ""
) -> pathlib.Path:
    """n good records img/<i>.<fmt> (line i + 1), then `extra` lines; returns the manifest."""
    (tmp_path / "img").mkdir(exist_ok=True)
    lines = []
    for i in range(n):
        name = f"img/{i}.{fmt.lower()}"
        (tmp_path / name).write_bytes(_image_bytes(size, fmt, seed=i))
        lines.append(json.dumps({"image": name, "caption": f"picture {i}"}))
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(lines) + "\n" + extra, encoding="utf-8")
    return path


def _cfg(path, **kw):
    base = dict(kind="manifest", paths=(str(path),), image_size=16, patch_size=4, text_len=16)
    return data.DataConfig(**{**base, "batch_size": 2, "n_eval": 2, **kw})


def _truncate(path: pathlib.Path) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])  # header intact, pixel data cut


@pytest.mark.parametrize(
    "damage,reason",
    [
        (_truncate, "unreadable"),
        (lambda p: p.write_bytes(np.random.default_rng(1).bytes(700)), "unreadable"),
        (lambda p: p.write_bytes(_image_bytes(12)), r"is 12x12 pixels, expected 16x16"),
    ],
    ids=["truncated", "garbage", "wrong_size"],
)
def test_bad_png_fails_the_upfront_check_naming_manifest_line_and_file(tmp_path, damage, reason):
    path = _manifest(tmp_path, 6)
    image = tmp_path / "img" / "3.png"
    damage(image)
    assert len(sources.read_manifest(str(path))) == 6  # the lines themselves are fine
    with pytest.raises(data.ManifestError) as err:
        data.check_splits(_cfg(path))
    msg = str(err.value)
    assert msg.startswith(f"manifest {path}, line 4: image file {str(image)!r}"), msg
    assert re.search(reason, msg), msg
    assert "\n" not in msg


def test_truncated_jpeg_is_caught_at_reduced_scale(tmp_path):
    """resize=True: a 256-pixel JPEG is decoded at 1/8 scale (draft), still to its end."""
    path = _manifest(tmp_path, 4, size=256, fmt="JPEG")
    data.check_splits(_cfg(path, resize=True))  # the good files pass
    _truncate(tmp_path / "img" / "2.jpeg")
    with pytest.raises(data.ManifestError, match=r"line 3: image file .*2\.jpeg'.* unreadable"):
        data.check_splits(_cfg(path, resize=True))


def test_all_bad_images_are_counted_in_one_message(tmp_path):
    path = _manifest(tmp_path, 6)
    for i in (1, 2, 4):
        _truncate(tmp_path / "img" / f"{i}.png")
    with pytest.raises(data.ManifestError) as err:
        check.check_images(sources.read_manifest(str(path)), 16, threads=2)
    msg = str(err.value)
    assert msg.startswith(f"manifest {path}, line 2: "), msg
    assert msg.endswith(f"; 2 more record(s) with a bad image: {path} line 3, {path} line 5")


def test_a_long_check_logs_its_progress(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(check, "PROGRESS_S", 0.0)
    monkeypatch.setattr(check, "CHUNK", 64)
    records = sources.read_manifest(str(_manifest(tmp_path, 80, size=4)))
    with caplog.at_level("WARNING"):
        check.check_images(records, 4)
    assert "checking manifest images: 64 of 80 decoded, 0 bad" in caplog.text
    assert "checking manifest images: 80 of 80 decoded, 0 bad" in caplog.text


def test_only_the_records_of_the_splits_are_decoded(tmp_path):
    path = _manifest(tmp_path, 6)
    _truncate(tmp_path / "img" / "5.png")  # line 6: past n_train + n_eval = 4
    data.check_splits(_cfg(path, n_train=2))
    with pytest.raises(data.ManifestError, match="line 6"):
        data.check_splits(_cfg(path, n_train=4))


@pytest.mark.parametrize(
    "caption,reason",
    [
        ('"bad \\ud800 caption"', r"'caption' holds the lone surrogate '\\ud800' at character 5"),
        ('"\\udfff"', r"lone surrogate '\\udfff' at character 1"),
        ("5", r"'caption' must be a non-empty string, got int 5"),
        ("null", r"got NoneType None"),
        ('["a"]', r"got list \['a'\]"),
    ],
)
def test_caption_the_tokenizer_cannot_take_names_manifest_and_line(tmp_path, caption, reason):
    extra = f'{{"image": "img/0.png", "caption": {caption}}}\n'
    path = _manifest(tmp_path, 4, extra=extra)  # the bad record is line 5
    with pytest.raises(data.ManifestError) as err:
        data.check_splits(_cfg(path))
    msg = str(err.value)
    assert msg.startswith(f"manifest {path}, line 5, image 'img/0.png': "), msg
    assert re.search(reason, msg), msg
    msg.encode("utf-8")  # the message itself prints


def test_a_paired_surrogate_escape_is_a_caption_like_any_other(tmp_path):
    extra = '{"image": "img/0.png", "caption": "smile \\ud83d\\ude00"}\n'
    path = _manifest(tmp_path, 4, extra=extra)
    assert sources.read_manifest(str(path))[-1][1] == "smile \U0001f600"
    data.check_splits(_cfg(path))


def test_text_jsonl_with_a_lone_surrogate_or_bad_bytes_names_file_and_line(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "no \\ud800 here"}\n', encoding="utf-8")
    cfg = data.DataConfig(kind="text", paths=(str(path),), text_len=4, n_eval=0)
    with pytest.raises(
        ValueError, match=rf"{re.escape(str(path))}, line 2: \"text\" holds the lone"
    ):
        data.check_splits(cfg)
    path.write_bytes(b'{"text": "fine"}\n\n{"text": "\xff"}\n')
    with pytest.raises(
        ValueError, match=rf"{re.escape(str(path))}, line 3: not valid UTF-8 \(byte 0xff"
    ):
        data.check_splits(cfg)


def test_image_damaged_after_the_check_fails_in_the_pipeline_naming_line_and_file(tmp_path):
    path = _manifest(tmp_path, 4)
    cfg = _cfg(path, batch_size=4, n_eval=0)
    data.check_splits(cfg)
    it = data.make_dataset(cfg, "train")
    _truncate(tmp_path / "img" / "1.png")  # changed after the check, before the first batch
    with pytest.raises(data.ManifestError, match=r"line 2: image file .*1\.png'.* unreadable"):
        next(it)


def test_train_py_prints_one_error_line_and_exits_2_before_compiling(tmp_path):
    path = _manifest(tmp_path, 20)  # smoke: image_size 16, n_eval 16
    _truncate(tmp_path / "img" / "4.png")
    cmd = [sys.executable, str(ROOT / "train.py"), "--config=configs/default.py:smoke"]
    cmd += ["--config.data.kind=manifest", f"--config.data.paths=('{path}',)"]
    cmd += [f"--workdir={tmp_path / 'wd'}"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [r.stderr.strip().splitlines()[-1]], r.stderr[-2000:]
    assert errors[0].startswith(f"error: manifest {path}, line 5: image file "), errors
    assert "4.png" in errors[0] and "unreadable" in errors[0]
    assert not (tmp_path / "wd").exists()  # failed before the workdir was touched


def test_train_py_turns_a_mid_run_data_error_into_one_line_and_status_1(tmp_path):
    """A record damaged after the check fails inside train.run; train.py prints the
    ManifestError (which names manifest, line and file) as one error line, status 1."""
    script = (
        "import runpy, sys\n"
        "from moe_jax import data, train\n"
        "def damaged(cfg, workdir):\n"
        "    raise data.ManifestError(\"manifest m.jsonl, line 3: image 'img/2.png' unreadable\")\n"
        "train.run = damaged\n"
        f"sys.argv = ['train.py', '--config=configs/default.py:smoke', '--workdir={tmp_path}']\n"
        "runpy.run_path('train.py', run_name='__main__')\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 1, r.stderr[-2000:]
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert len(err) == 1 and err[0].startswith("error: manifest m.jsonl, line 3"), r.stderr
