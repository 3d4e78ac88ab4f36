"""Data pipeline properties: determinism, shuffling, foreground masks, resume, sharding, files."""

import json

import numpy as np
import pytest

from moe_jax import data
from moe_jax.data import scenes
from moe_jax.data.tokenizer import BOS, EOS, PAD, ByteTokenizer, pack_documents, pad_example
from moe_jax.model.layers import patchify


def _cfg(**kw):
    base = dict(kind="shapes", batch_size=8, n_train=40, n_eval=16)
    return data.DataConfig(**{**base, **kw})


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def _source(seed=0, **kw):
    args = dict(start=0, length=1000, seed=seed, image_size=32, patch_size=4, max_shapes=3)
    return scenes.ShapesSource(**{**args, **kw})


# ----------------------------------------------------------------------------- scenes


def test_scene_is_a_function_of_index_and_seed():
    a, b = _source(), _source()
    order = [7, 3, 999, 0, 3]
    for i in order:  # any access order, any instance: same record
        ra, rb = a[i], b[i]
        np.testing.assert_array_equal(ra["image"], rb["image"])
        np.testing.assert_array_equal(ra["patch_fg"], rb["patch_fg"])
        assert ra["caption"] == rb["caption"]
    captions = {a[i]["caption"] for i in range(50)}
    assert len(captions) > 40  # indices give different scenes
    other = _source(seed=1)
    assert sum(a[i]["caption"] != other[i]["caption"] for i in range(50)) > 40
    # the eval range starts where train ends: record 0 of a source at start=5 is scene 5
    assert _source(start=5)[0]["caption"] == a[5]["caption"]


def test_foreground_mask_on_hand_made_scene():
    shape = lambda kind, cy, cx, r, colour="red": scenes.Shape(kind, colour, "small", "", cy, cx, r)
    # square: pixel centres within 4 of (8, 8) are pixels 4..11 -> patches 1..2 in each axis
    # circle: centre (24, 24), radius 2 -> pixels 22..25 -> patches 5..6
    # triangle: apex y=8, base y=12 at cx=18 -> pixel rows 9..11, cols 16..19 -> patch (2, 4)
    shapes = [
        shape("square", 8.0, 8.0, 4.0),
        shape("circle", 24.0, 24.0, 2.0, "blue"),
        shape("triangle", 10.0, 18.0, 2.0, "white"),
    ]
    image, mask = scenes.render(shapes, 32)
    fg = scenes.patch_foreground(mask, 4).reshape(8, 8)
    expected = np.zeros((8, 8), bool)
    for r, c in [(1, 1), (1, 2), (2, 1), (2, 2), (5, 5), (5, 6), (6, 5), (6, 6), (2, 4)]:
        expected[r, c] = True
    np.testing.assert_array_equal(fg, expected)
    np.testing.assert_allclose(image[4, 4], scenes.COLOURS["red"])
    np.testing.assert_allclose(image[3, 4], scenes.BACKGROUND)
    np.testing.assert_allclose(image[10, 17], scenes.COLOURS["white"])
    np.testing.assert_array_equal(mask[9:12, 16:20].sum(axis=1), [2, 2, 4])  # apex up
    assert mask[8, 12:24].sum() == 0 and mask[12, 12:24].sum() == 0 and mask[9:12].sum() == 8 + 24


@pytest.mark.parametrize("patch_size", [4, 8])
def test_background_patches_are_plain_and_foreground_patches_are_not(patch_size):
    src = _source(patch_size=patch_size)
    bg = np.asarray(scenes.BACKGROUND, np.float32)
    for i in range(40):
        rec = src[i]
        patches = np.asarray(patchify(rec["image"], patch_size)).reshape(
            len(rec["patch_fg"]), -1, 3
        )
        plain = np.all(patches == bg, axis=(1, 2))  # [P]
        np.testing.assert_array_equal(plain, ~rec["patch_fg"])
        assert 0 < rec["patch_fg"].sum() < len(rec["patch_fg"])
        assert (
            rec["image"].dtype == np.float32 and 0 <= rec["image"].min() <= rec["image"].max() <= 1
        )


# ----------------------------------------------------------------------------- tokenizers


def test_caption_tokens_decode_back_and_shift():
    cfg = _cfg()
    tok, to_example, src = data.make_tokenizer(cfg), data.ToExample(cfg), _source()
    for i in range(30):
        rec = src[i]
        ex = to_example(rec)
        assert tok.decode(ex["tokens"]) == rec["caption"]
        assert ex["tokens"][0] == BOS
        np.testing.assert_array_equal(ex["targets"][:-1], ex["tokens"][1:])
        n_words = len(rec["caption"].split())
        assert ex["loss_mask"].sum() == n_words + 1  # every word and eos
        assert ex["targets"][n_words] == EOS and np.all(ex["targets"][n_words + 1 :] == PAD)
    assert "<unk>" in tok.decode(tok.encode("a zebra"))


def test_byte_tokenizer_round_trips_any_text():
    tok = ByteTokenizer()
    text = "Grüße, 世界! \n\ttabs"
    ids = tok.encode(text, bos=True, eos=True)
    assert ids[0] == BOS and ids[-1] == EOS and ids.max() < tok.vocab_size
    assert tok.decode(ids) == text
    row = pad_example(ids, 40)
    assert tok.decode(row["tokens"]) == text and row["loss_mask"].sum() == len(ids) - 1


def test_pack_documents_rows_continue_the_stream():
    docs = [np.arange(4, 9), np.arange(10, 13)]
    packed = pack_documents(docs, text_len=4)
    stream = [BOS, 4, 5, 6, 7, 8, EOS, BOS, 10, 11, 12, EOS]
    assert packed["tokens"].shape == (3, 4)
    flat = packed["tokens"].reshape(-1)
    np.testing.assert_array_equal(flat[: len(stream)], stream)
    np.testing.assert_array_equal(packed["targets"].reshape(-1)[: len(stream) - 1], stream[1:])
    assert packed["loss_mask"].sum() == len(stream) - 1


# ----------------------------------------------------------------------------- pipeline


def test_shuffle_depends_on_seed_and_covers_each_epoch():
    cfg = _cfg(kind="shapes_text", n_train=40, batch_size=8)
    tok = data.make_tokenizer(cfg)
    epochs = {}
    for seed in (0, 1):
        rows = [r for b in _take(data.make_dataset(cfg, seed=seed), 10) for r in b["tokens"]]
        captions = [tok.decode(r) for r in rows]
        epochs[seed] = captions[:40], captions[40:]
    src = _source(length=40)
    all_captions = sorted(src[i]["caption"] for i in range(40))
    for first, second in epochs.values():  # each epoch is a permutation of the train range
        assert sorted(first) == all_captions and sorted(second) == all_captions
        assert first != second  # reshuffled every epoch
    assert epochs[0][0] != epochs[1][0]
    again = [tok.decode(r) for b in _take(data.make_dataset(cfg, seed=0), 5) for r in b["tokens"]]
    assert again == epochs[0][0]


@pytest.mark.parametrize("num_workers", [0, 1])
def test_iterator_state_resumes_exactly(num_workers):
    cfg = _cfg(num_workers=num_workers)
    it = data.make_dataset(cfg, seed=3)
    _take(it, 3)
    state = it.get_state()
    expected = _take(it, 4)  # crosses the epoch boundary (5 batches per epoch)
    resumed = data.make_dataset(cfg, seed=3)
    resumed.set_state(state)
    _assert_batches_equal(_take(resumed, 4), expected)
    assert expected[0]["image"].shape == (8, 32, 32, 3) and expected[0]["patch_fg"].shape == (8, 64)
    assert expected[0]["tokens"].dtype == np.int32 and expected[0]["loss_mask"].dtype == bool


@pytest.mark.parametrize("split,steps", [("train", 7), ("eval", 2)])
@pytest.mark.parametrize("process_count", [2, 4])
def test_process_shards_are_disjoint_and_cover_the_global_batch(split, steps, process_count):
    cfg = _cfg()
    whole = _take(data.make_dataset(cfg, split, seed=5), steps)
    its = [
        data.make_dataset(cfg, split, seed=5, process_index=p, process_count=process_count)
        for p in range(process_count)
    ]
    shards = [_take(it, steps) for it in its]
    for step, global_batch in enumerate(whole):
        for k, v in global_batch.items():
            parts = [shards[p][step][k] for p in range(process_count)]
            assert parts[0].shape[0] == 8 // process_count
            np.testing.assert_array_equal(np.concatenate(parts), v, err_msg=k)
    if split == "eval":  # every process ends after the same number of batches
        for it in its:
            with pytest.raises(StopIteration):
                next(it)


def test_eval_split_is_disjoint_from_train():
    cfg = _cfg(kind="shapes_text")
    train = {tuple(r) for b in _take(data.make_dataset(cfg, "train"), 5) for r in b["tokens"]}
    evals = _take(data.make_dataset(cfg, "eval"), 2)
    src = _source(start=40, length=16)
    tok = data.make_tokenizer(cfg)
    assert [tok.decode(r) for b in evals for r in b["tokens"]] == [
        src[i]["caption"] for i in range(16)
    ]
    assert len(train) == 40 and not train & {tuple(r) for b in evals for r in b["tokens"]}


# ----------------------------------------------------------------------------- user files


def _write_png(path, pixels):
    from PIL import Image

    Image.fromarray(pixels).save(path)


@pytest.fixture
def manifest_dir(tmp_path):
    (tmp_path / "img").mkdir()
    rng = np.random.default_rng(0)
    lines = []
    for i in range(6):
        _write_png(tmp_path / "img" / f"{i}.png", rng.integers(0, 256, (16 + i, 20, 3), np.uint8))
        lines.append(json.dumps({"image": f"img/{i}.png", "caption": f"picture number {i} ü"}))
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path


def test_manifest_records_load_resized(manifest_dir):
    cfg = data.DataConfig(
        kind="manifest", paths=str(manifest_dir / "m.jsonl"), image_size=8, patch_size=4,
        text_len=32, batch_size=2, n_eval=2, resize=True,
    )  # fmt: skip
    batches = _take(data.make_dataset(cfg, "eval"), 1)
    b = batches[0]
    assert b["image"].shape == (2, 8, 8, 3) and b["image"].dtype == np.float32
    assert 0 <= b["image"].min() and b["image"].max() <= 1 and b["patch_fg"].all()
    tok = data.make_tokenizer(cfg)
    assert [tok.decode(t) for t in b["tokens"]] == ["picture number 4 ü", "picture number 5 ü"]
    resumed = data.make_dataset(cfg, "train", seed=1)
    assert (
        len({tok.decode(t) for t in np.concatenate([x["tokens"] for x in _take(resumed, 2)])}) == 4
    )


@pytest.mark.parametrize(
    "bad_line,needle",
    [
        ('{"image": "img/missing.png", "caption": "x"}', "not found"),
        ('{"image": "img/0.png", "caption": "  "}', "caption"),
        ('{"image": "img/0.png", "caption": ', "not valid JSON"),
        ('{"caption": "no image"}', "'image'"),
    ],
)
def test_bad_manifest_entry_names_the_record(manifest_dir, bad_line, needle):
    path = manifest_dir / "m.jsonl"
    lines = path.read_text().splitlines()
    lines.insert(2, bad_line)  # becomes line 3
    path.write_text("\n".join(lines) + "\n")
    cfg = data.DataConfig(kind="manifest", paths=(str(path),), text_len=32, batch_size=2, n_eval=2)
    with pytest.raises(data.ManifestError, match=needle) as err:
        data.make_dataset(cfg, "train")
    assert f"{path}, line 3" in str(err.value)


def test_unreadable_image_names_the_record(manifest_dir):
    (manifest_dir / "img" / "3.png").write_bytes(b"not an image at all")
    cfg = data.DataConfig(
        kind="manifest", paths=(str(manifest_dir / "m.jsonl"),), text_len=32, batch_size=6, n_eval=0,
        resize=True,
    )  # fmt: skip
    with pytest.raises(data.ManifestError, match="unreadable") as err:
        next(data.make_dataset(cfg, "train"))
    assert "line 4" in str(err.value) and "3.png" in str(err.value)


def test_text_files_give_overlapping_windows(tmp_path):
    texts = ["hello world, this is the first file.", "second file: ünïcode"]
    paths = []
    for i, t in enumerate(texts):
        (tmp_path / f"{i}.txt").write_text(t, encoding="utf-8")
        paths.append(str(tmp_path / f"{i}.txt"))
    tok = ByteTokenizer()
    stream = np.concatenate([tok.encode(t, bos=True, eos=True) for t in texts])
    n_windows = (len(stream) - 1) // 8
    cfg = data.DataConfig(kind="text", paths=paths, text_len=8, batch_size=2, n_eval=2)
    src = data.make_source(cfg, "train")
    assert len(src) == n_windows - 2
    rows = [src[i] for i in range(len(src))] + [data.make_source(cfg, "eval")[i] for i in range(2)]
    for i, row in enumerate(rows):  # window i is stream[8i : 8i + 9], shifted by one
        np.testing.assert_array_equal(row["tokens"], stream[8 * i : 8 * i + 8])
        np.testing.assert_array_equal(row["targets"], stream[8 * i + 1 : 8 * i + 9])
        assert row["loss_mask"].all()
    b = next(data.make_dataset(cfg, "train", seed=0))
    assert set(b) == {"tokens", "targets", "loss_mask"} and b["tokens"].shape == (2, 8)
    with pytest.raises(ValueError, match="n_train"):
        data.make_source(data.DataConfig(kind="text", paths=paths, text_len=8, n_eval=100), "eval")


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "kw,field",
    [
        (dict(kind="video"), "kind"),
        (dict(image_size=30), "image_size"),
        (dict(text_len=10), "text_len"),
        (dict(tokenizer="byte", text_len=24), "text_len"),
        (dict(paths=("x.jsonl",)), "paths"),
        (dict(kind="manifest"), "paths"),
        (dict(kind="text", paths=("a.txt",), tokenizer="word"), "tokenizer"),
        (dict(max_shapes=6), "max_shapes"),
        (dict(seed=-1), "seed"),
        (dict(batch_size=0), "batch_size"),
    ],
)
def test_config_errors_name_the_field(kw, field):
    with pytest.raises(ValueError, match=rf"DataConfig\.{field}="):
        data.DataConfig(**kw)


def test_pipeline_argument_errors():
    cfg = _cfg(batch_size=6)
    with pytest.raises(ValueError, match="batch_size"):
        data.make_dataset(cfg, process_count=4)
    with pytest.raises(ValueError, match="split"):
        data.make_dataset(cfg, "test")
    with pytest.raises(ValueError, match="n_eval"):
        data.make_dataset(_cfg(n_eval=4), "eval")
    spec = data.batch_spec(cfg, process_count=2)
    batch = next(data.make_dataset(cfg, process_count=2))
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == spec
