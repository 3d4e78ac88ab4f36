"""grain input pipelines: built-in scenes, users' image+caption manifests, text files, and
pre-tokenized ArrayRecord windows (kind "arrayrecord", see data.arrayrecord).

Usage:
    cfg = DataConfig(kind="shapes", batch_size=32)
    it = make_dataset(cfg, "train", seed=0, process_index=jax.process_index(),
                      process_count=jax.process_count())
    batch = next(it)               # dict of numpy arrays, this process's slice of the batch
    state = it.get_state()         # checkpoint it (grain.checkpoint.CheckpointSave(it))
    it.set_state(state)            # resumes exactly

Batch format (b = batch_size // process_count, L = text_len, P = (image_size // patch_size)**2):
    "image"     [b, H, W, 3] float32 in [0, 1]  (kinds "shapes", "manifest")
    "patch_fg"  [b, P] bool   patch touches a shape; patches row-major over (H/p, W/p), the
                              order of model.layers.patchify; all True for manifest images (unknown)
    "tokens"    [b, L] int32  text input: bos w1 w2 ... (pad = 0 after the text)
    "targets"   [b, L] int32  next token: targets[:, t] = the token after tokens[:, t]
    "loss_mask" [b, L] bool   True where the target is real text (eos included, pad excluded)
Text-only kinds give only tokens / targets / loss_mask: "text" gives windows of L + 1
tokens (bytes, or tokenizer="hf": the ids of tokenizer_path's tokenizer.json) of the packed
stream bos doc eos bos doc eos ... (every target real), "arrayrecord" the same windows stored
pre-tokenized; "shapes_text"
gives the scene captions alone, one padded caption per row. A vision-language model places
the P patch tokens before `tokens` and takes the loss on the text positions only: the logits
at text position t predict targets[:, t].

Splits are index ranges: train = records [0, n_train), eval = [n_train, n_train + n_eval).
Train is shuffled by `seed` (reshuffled every epoch) and repeats forever; eval is one pass in
order. Global batch j holds stream positions [j*B, (j+1)*B); process p takes positions
[j*B + p*b, j*B + (p+1)*b), so processes see disjoint slices that cover the global batch.
Every record is a pure function of its index, so shuffling, sharding and resumption are exact.
A row holds bos, at most L - 1 caption tokens and eos. A longer manifest caption is an error
naming the manifest, line, its length and text_len, unless DataConfig.truncate is set: then it
is cut to L - 1 tokens and eos is kept, and the number cut is logged as a warning when the
source is built (check_splits / make_source; also ManifestSource.num_truncated).
"""

from __future__ import annotations

import dataclasses

import grain
import numpy as np
from absl import flags, logging

from moe_jax.core.validate import checker, is_int
from moe_jax.data import arrayrecord, pystdlib, scenes
from moe_jax.data.check import check_images
from moe_jax.data.hf_tokenizer import load_tokenizer
from moe_jax.data.sources import (
    ManifestError,  # noqa: F401  (re-exported: the error users catch)
    ManifestSource,
    WindowSource,
    read_manifest,
    read_text_stream,
)
from moe_jax.data.tokenizer import (
    EOS,
    ByteTokenizer,
    Tokenizer,
    WordTokenizer,
    num_windows,
    pad_example,
)

KINDS = ("shapes", "shapes_text", "manifest", "text", "arrayrecord", "pystdlib")
TOKENIZERS = ("auto", "word", "byte", "hf")
SPLITS = ("train", "eval")
DEFAULT_N_TRAIN = 100_000  # scene records in the train split when n_train is None


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Validated data settings; see the module docstring for the batch they produce."""

    kind: str = "shapes"  # one of KINDS; "pystdlib": this Python's Lib/*.py (data.pystdlib)
    image_size: int = 32  # square images, pixels per side; a multiple of patch_size
    patch_size: int = 4  # pixels per patch side
    text_len: int = 24  # L: text tokens per row
    batch_size: int = 32  # global batch (all processes together)
    n_train: int | None = None  # train records; None: shapes 100_000, files all but n_eval
    n_eval: int = 256  # held-out records after the train range
    seed: int = 0  # scene content seed and default shuffle seed, in [0, 2**32)
    paths: tuple[str, ...] = ()  # manifest JSONL files ("manifest") or text files ("text")
    num_workers: int = 0  # grain worker processes; 0 reads in the main process
    read_threads: int = 2  # threads producing batches in each reading process
    prefetch: int = 4  # batches buffered ahead by each reading process
    tokenizer: str = "auto"  # auto: word for shapes kinds, byte for file kinds; hf: tokenizer_path
    tokenizer_path: str = ""  # tokenizer="hf": a tokenizer.json or its checkpoint folder
    max_shapes: int = 3  # shapes per scene, at most 1..5
    truncate: bool = False  # manifest: cut captions > text_len - 1 tokens, eos kept; False: error
    resize: bool = False  # manifest: area-resize non-square-S images (aspect lost); False: error

    def __post_init__(self):
        paths = (self.paths,) if isinstance(self.paths, str) else tuple(self.paths)
        object.__setattr__(self, "paths", paths)
        _check(self.kind in KINDS, "kind", self.kind, f"one of {KINDS}")
        for field in ("truncate", "resize"):
            _check(isinstance(getattr(self, field), bool), field, getattr(self, field), "a bool")
        _check(self.tokenizer in TOKENIZERS, "tokenizer", self.tokenizer, f"one of {TOKENIZERS}")
        limits = [  # (field, lowest, highest) for the int fields
            ("patch_size", 1, 1024),
            ("image_size", self.patch_size, 4096),
            ("text_len", 1, 1 << 20),
            ("batch_size", 1, 1 << 24),
            ("n_eval", 0, 1 << 62),
            ("seed", 0, 2**32 - 1),
            ("num_workers", 0, 1024),
            ("read_threads", 1, 256),
            ("prefetch", 1, 4096),
            ("max_shapes", 1, scenes.MAX_SHAPES),
        ] + [("n_train", 1, 1 << 62)] * (self.n_train is not None)
        for field, lo, hi in limits:
            value = getattr(self, field)
            _check(_int_in(value, lo, hi), field, value, f"an int in [{lo}, {hi}]")
        _check(
            self.image_size % self.patch_size == 0,
            "image_size",
            self.image_size,
            f"a multiple of patch_size={self.patch_size}",
        )
        file_kind = self.kind in ("manifest", "text", "arrayrecord")
        _check(
            bool(self.paths) == file_kind,
            "paths",
            self.paths,
            "non-empty for kinds 'manifest', 'text' and 'arrayrecord', empty for the built-in kinds",
        )
        _check(
            (self.tokenizer == "hf") == bool(self.tokenizer_path),
            "tokenizer_path",
            self.tokenizer_path,
            "given exactly when tokenizer='hf'",
        )
        _check(
            self.tokenizer != "hf" or self.kind in ("text", "arrayrecord"),
            "tokenizer",
            self.tokenizer,
            f"'hf' only for kinds 'text' and 'arrayrecord' (kind={self.kind!r})",
        )
        _check(
            not (self.kind in ("text", "pystdlib") and self.tokenizer == "word"),
            "tokenizer",
            self.tokenizer,
            f"'auto' or 'byte' for kind {self.kind!r}",
        )
        if self.kind in ("shapes", "shapes_text"):
            need = len(make_tokenizer(self).encode(scenes.longest_caption(self.max_shapes))) + 1
            _check(
                self.text_len >= need,
                "text_len",
                self.text_len,
                f">= {need} so the longest caption of {self.max_shapes} shapes fits with bos/eos",
            )

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def has_image(self) -> bool:
        return self.kind in ("shapes", "manifest")


def _int_in(value, lo: int, hi: int) -> bool:
    return is_int(value) and lo <= value <= hi


_checker = checker("DataConfig")


def _check(ok: bool, field: str, value, allowed: str) -> None:
    _checker(ok, field, value, f"must be {allowed}")


def make_tokenizer(cfg: DataConfig) -> Tokenizer:
    """The tokenizer a config uses; its vocab_size sizes the model's embedding."""
    name = cfg.tokenizer
    if name == "auto":
        name = "word" if cfg.kind in ("shapes", "shapes_text") else "byte"
    if name == "hf":
        return load_tokenizer(cfg.tokenizer_path)
    return WordTokenizer(scenes.vocabulary()) if name == "word" else ByteTokenizer()


def batch_spec(
    cfg: DataConfig, process_count: int = 1
) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shape and dtype of every array in one process's batch (for initializing a model)."""
    b, n, length = cfg.batch_size // process_count, cfg.image_size, cfg.text_len
    spec = {
        "tokens": ((b, length), np.dtype(np.int32)),
        "targets": ((b, length), np.dtype(np.int32)),
        "loss_mask": ((b, length), np.dtype(bool)),
    }
    if cfg.has_image:
        spec["image"] = ((b, n, n, 3), np.dtype(np.float32))
        spec["patch_fg"] = ((b, cfg.num_patches), np.dtype(bool))
    return spec


def _split_range(
    cfg: DataConfig, split: str, n_records: int | None, what: str = "the data"
) -> tuple[int, int]:
    """(start, length) of a split; n_records None means unbounded (procedural scenes)."""
    n_train = cfg.n_train
    if n_train is None:
        n_train = DEFAULT_N_TRAIN if n_records is None else n_records - cfg.n_eval
    if n_records is not None and (n_train < 1 or n_train + cfg.n_eval > n_records):
        raise ValueError(
            f"DataConfig.n_train={cfg.n_train!r}, n_eval={cfg.n_eval}: {what} holds "
            f"{n_records} records; need n_train >= 1 and n_train + n_eval <= {n_records}"
        )
    return (0, n_train) if split == "train" else (n_train, cfg.n_eval)


def _records(cfg: DataConfig) -> tuple[list, str]:
    """Manifest records of every file, and what they are (for messages)."""
    records = [r for m in cfg.paths for r in read_manifest(m)]
    return records, f"manifest(s) {', '.join(cfg.paths)}"


def _count_long_captions(cfg: DataConfig, records) -> int:
    """Captions over text_len - 1 tokens: ManifestError unless cfg.truncate; returns the count."""
    tok, fit, n_long = make_tokenizer(cfg), cfg.text_len - 1, 0
    for _, text, line_no, manifest in records:
        n = len(tok.encode(text))
        if n > fit:
            if not cfg.truncate:
                raise ManifestError(
                    f"manifest {manifest}, line {line_no}: caption is {n} tokens, but "
                    f"DataConfig.text_len={cfg.text_len} fits {fit} (a row is bos, caption, eos); "
                    "raise text_len or set DataConfig.truncate=True to cut long captions"
                )
            n_long += 1
    return n_long


def check_splits(cfg: DataConfig) -> None:
    """Reads the files of a file kind once and checks them and the split sizes, so a bad file
    or n_train / n_eval fails before training starts; the built-in kinds need no check.
    Manifests: every line, caption and, last, the image of every record the splits read."""
    if cfg.kind == "manifest":
        records, what = _records(cfg)
        _count_long_captions(cfg, records)
        n_train = _split_range(cfg, "train", len(records), what)[1]
        check_images(records[: n_train + cfg.n_eval], cfg.image_size, resize=cfg.resize)
    elif cfg.kind == "text":
        stream = read_text_stream(cfg.paths, make_tokenizer(cfg))
        n = num_windows(len(stream), cfg.text_len)
        _split_range(cfg, "train", n, _text_what(cfg, len(stream)))
    elif cfg.kind == "arrayrecord":
        n = arrayrecord.check_files(cfg.paths, cfg.text_len, make_tokenizer(cfg).vocab_size)
        _split_range(cfg, "train", n, f"ArrayRecord file(s) {', '.join(cfg.paths)}")
    elif cfg.kind == "pystdlib":
        pystdlib.make_source(cfg, "train"), pystdlib.make_source(cfg, "eval")


def _text_what(cfg: DataConfig, stream_len: int) -> str:
    return (
        f"text file(s) {', '.join(cfg.paths)} ({stream_len} tokens, windows of "
        f"text_len + 1 = {cfg.text_len + 1})"
    )


def make_source(cfg: DataConfig, split: str):
    """The random-access record source of one split."""
    if cfg.kind in ("shapes", "shapes_text"):
        start, length = _split_range(cfg, split, None)
        return scenes.ShapesSource(
            start=start,
            length=length,
            seed=cfg.seed,
            image_size=cfg.image_size,
            patch_size=cfg.patch_size,
            max_shapes=cfg.max_shapes,
        )
    if cfg.kind == "manifest":
        records, what = _records(cfg)
        start, length = _split_range(cfg, split, len(records), what)
        records = records[start : start + length]
        n_long = _count_long_captions(cfg, records)
        if n_long:
            logging.warning(
                "DataConfig.truncate=True: %d of %d %s captions are longer than text_len - 1 = "
                "%d tokens and are cut (eos kept)",
                *(n_long, len(records), split, cfg.text_len - 1),
            )
        source = ManifestSource(
            records, image_size=cfg.image_size, patch_size=cfg.patch_size, resize=cfg.resize
        )
        source.num_truncated = n_long
        return source
    if cfg.kind == "arrayrecord":
        n = arrayrecord.check_files(cfg.paths, cfg.text_len, make_tokenizer(cfg).vocab_size)
        start, length = _split_range(cfg, split, n, f"ArrayRecord file(s) {', '.join(cfg.paths)}")
        return arrayrecord.WindowRecords(
            cfg.paths,
            start=start,
            length=length,
            text_len=cfg.text_len,
            vocab_size=make_tokenizer(cfg).vocab_size,
        )
    if cfg.kind == "pystdlib":
        return pystdlib.make_source(cfg, split)
    stream = read_text_stream(cfg.paths, make_tokenizer(cfg))
    n = num_windows(len(stream), cfg.text_len)
    start, length = _split_range(cfg, split, n, _text_what(cfg, len(stream)))
    return WindowSource(stream, start=start, length=length, text_len=cfg.text_len)


class ToExample:
    """Record -> training example (a picklable callable, so grain workers can run it)."""

    def __init__(self, cfg: DataConfig):
        self.tokenizer = make_tokenizer(cfg)
        self.text_len, self.has_image = cfg.text_len, cfg.has_image

    def __call__(self, record: dict) -> dict:
        if "caption" not in record:  # already a text window
            return record
        ids = self.tokenizer.encode(record["caption"], bos=True, eos=True)
        if len(ids) > self.text_len + 1:  # DataConfig.truncate: cut the caption, keep eos
            ids = np.concatenate([ids[: self.text_len], np.asarray([EOS], np.int32)])
        example = pad_example(ids, self.text_len)
        if self.has_image:
            example["image"] = record["image"]
            example["patch_fg"] = record["patch_fg"]
        return example


def build_dataset(
    cfg: DataConfig,
    split: str = "train",
    *,
    seed: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.IterDataset:
    """The grain dataset of one process's batches: source -> shuffle -> repeat -> map -> batch.

    seed: shuffle seed in [0, 2**32), default cfg.seed. Train shuffles and repeats forever;
    eval is one ordered pass over whole global batches.
    """
    seed = cfg.seed if seed is None else seed
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is invalid: must be one of {SPLITS}")
    if not _int_in(seed, 0, 2**32 - 1):
        raise ValueError(f"seed={seed!r} is invalid: must be an int in [0, 2**32)")
    if not (_int_in(process_count, 1, 1 << 20) and _int_in(process_index, 0, process_count - 1)):
        raise ValueError(
            f"process_index={process_index!r}, process_count={process_count!r}: need "
            "process_count >= 1 and 0 <= process_index < process_count"
        )
    if cfg.batch_size % process_count:
        raise ValueError(
            f"DataConfig.batch_size={cfg.batch_size} is invalid: must be a multiple of "
            f"process_count={process_count}"
        )
    source = make_source(cfg, split)
    if split == "eval" and len(source) < cfg.batch_size:
        raise ValueError(
            f"DataConfig.n_eval={len(source)} is invalid for the eval split: must be >= "
            f"batch_size={cfg.batch_size} to make one batch"
        )
    ds = grain.MapDataset.source(source)
    if split == "train":
        ds = ds.shuffle(seed=seed).repeat()
    ds = ds.map(ToExample(cfg))
    ds = ds.batch(cfg.batch_size // process_count, drop_remainder=True)
    if split == "eval":  # whole global batches only, so every process runs the same steps
        ds = ds[: len(ds) // process_count * process_count]
    ds = ds[process_index::process_count]  # this process's slice of every global batch
    it = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=cfg.read_threads, prefetch_buffer_size=cfg.prefetch)
    )
    if cfg.num_workers > 0:
        # grain's worker start-up reads absl flags; outside an absl app (notebooks, pytest)
        # they are unparsed and reading them raises, so their defaults are taken as parsed.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.num_workers))
    return it


def make_dataset(
    cfg: DataConfig,
    split: str = "train",
    *,
    seed: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.DatasetIterator:
    """An iterator over this process's batches; get_state / set_state resume exactly."""
    ds = build_dataset(
        cfg, split, seed=seed, process_index=process_index, process_count=process_count
    )
    return iter(ds)
