"""ConfigDict -> frozen, validated dataclasses, once, before anything is built or compiled.

The ConfigDict sections map to: model -> ModelConfig (with data-derived fields filled in),
moe -> MoEConfig (or None when moe.enabled is False), data -> DataConfig, opt -> OptConfig,
ckpt -> CkptConfig, log -> LogConfig; top-level scalars -> TrainConfig. Unknown keys and
invalid values raise ValueError naming the field as ``config.<section>.<key>``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax

from moe_jax.core.config import MoEConfig
from moe_jax.core.validate import (
    NOT_FINITE,
    check_finite_floats,
    field_error,
    is_int,
    is_nonfinite_float,
)
from moe_jax.data import DataConfig, check_splits, make_tokenizer
from moe_jax.model import ModelConfig
from moe_jax.parallel import MeshConfig
from moe_jax.train import hf_init
from moe_jax.train.hf_init import InitConfig
from moe_jax.train.multihost import DistConfig, dist_config

SCHEDULES = ("cosine", "wsd", "constant")
# ModelConfig fields that come from the data section or the tokenizer, not from config.model.
_MODEL_DERIVED = ("vocab_size", "image_size", "patch_size", "channels", "max_len", "moe")
# MoEConfig fields the trainer fills in (d_model from the model; dtypes and causal=True from
# ModelConfig.layer_moe_config). moe.allow_noncausal stays the user's one causality flag.
_MOE_DERIVED = ("d_model", "dtype", "param_dtype", "causal")


def _field_error(path: str, value, allowed: str) -> ValueError:
    return field_error("config", path, value, allowed)


_is_int = is_int


@dataclasses.dataclass(frozen=True)
class OptConfig:
    """Optimizer and schedule (see configs/default.py for the meaning of each field)."""

    lr: float = 3e-3  # peak learning rate
    schedule: str = "cosine"  # cosine (warmup-cosine) | wsd (warmup-stable-decay) | constant
    warmup_steps: int = 50  # linear warmup from 0
    decay_fraction: float = 0.2  # wsd: share of num_steps spent in the final linear decay
    min_lr_ratio: float = 0.1  # final lr = min_lr_ratio * lr
    weight_decay: float = 0.05  # AdamW decoupled weight decay (not on norms / biases)
    b1: float = 0.9  # Adam beta1
    b2: float = 0.95  # Adam beta2
    eps: float = 1e-8  # Adam epsilon
    clip_norm: float = 1.0  # global gradient-norm clip (0 = off)
    grad_accum: int = 1  # micro-batches per step; divides data.batch_size

    def __post_init__(self):
        check_finite_floats("config", self, "opt.")
        c = lambda ok, f, allowed: (
            None if ok else _raise(_field_error(f"opt.{f}", getattr(self, f), allowed))
        )
        c(self.lr > 0, "lr", "must be > 0")
        c(self.schedule in SCHEDULES, "schedule", f"must be one of {SCHEDULES}")
        c(_is_int(self.warmup_steps) and self.warmup_steps >= 0, "warmup_steps", "an int >= 0")
        c(0.0 <= self.decay_fraction <= 1.0, "decay_fraction", "must lie in [0, 1]")
        c(0.0 <= self.min_lr_ratio <= 1.0, "min_lr_ratio", "must lie in [0, 1]")
        c(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        c(0.0 <= self.b1 < 1.0, "b1", "must lie in [0, 1)")
        c(0.0 <= self.b2 < 1.0, "b2", "must lie in [0, 1)")
        c(self.eps > 0, "eps", "must be > 0")
        c(self.clip_norm >= 0, "clip_norm", "must be >= 0 (0 = no clipping)")
        c(_is_int(self.grad_accum) and self.grad_accum >= 1, "grad_accum", "an int >= 1")


@dataclasses.dataclass(frozen=True)
class CkptConfig:
    """Checkpoints (orbax) in <workdir>/checkpoints."""

    every_steps: int = 100  # save every n steps and at the end (0 = end only)
    keep: int = 3  # keep the last n checkpoints
    async_save: bool = True  # write checkpoints in a background thread
    resume: bool = True  # resume from the latest complete checkpoint; False moves it aside

    def __post_init__(self):
        if not (_is_int(self.every_steps) and self.every_steps >= 0):
            raise _field_error("ckpt.every_steps", self.every_steps, "an int >= 0 (0 = end only)")
        if not (_is_int(self.keep) and self.keep >= 1):
            raise _field_error("ckpt.keep", self.keep, "an int >= 1")


@dataclasses.dataclass(frozen=True)
class LogConfig:
    """Metrics, eval, plots and the progress bar."""

    every_steps: int = 10  # metrics to metrics.jsonl / TensorBoard every n steps
    eval_every: int = 250  # held-out eval every n steps (0 = end only)
    eval_batches: int = 4  # batches per eval (0 = the whole held-out split)
    tensorboard: bool = True  # also write TensorBoard scalars to <workdir>/tb
    progress: bool = True  # tqdm progress bar with loss and tokens/s
    plots: bool = True  # PNG plots in the workdir at the end
    heatmap_images: int = 4  # held-out images in the routing heatmap

    def __post_init__(self):
        for f, lo in (
            ("every_steps", 1),
            ("eval_every", 0),
            ("eval_batches", 0),
            ("heatmap_images", 0),
        ):
            v = getattr(self, f)
            if not (_is_int(v) and v >= lo):
                raise _field_error(f"log.{f}", v, f"an int >= {lo}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a run needs, validated; built by ``from_config_dict``."""

    name: str  # run name; train.py's default workdir is ./workdir/<name>
    seed: int  # parameter init and data shuffle seed
    num_steps: int  # optimizer steps in the run
    fail_at_step: int  # debug: poison the loss with NaN at this step (-1 = never; tests)
    model: ModelConfig  # config.model, with vocab, image and max_len from data / tokenizer
    data: DataConfig  # config.data
    opt: OptConfig  # config.opt
    ckpt: CkptConfig  # config.ckpt
    log: LogConfig  # config.log
    mesh: MeshConfig | None = None  # (data, fsdp, expert) mesh; None = plain jit on one device
    init: InitConfig | None = None  # parameters from a checkpoint (init.hf); None = random
    dist: DistConfig = DistConfig()  # how the processes of a multi-host run find each other

    @property
    def moe(self) -> MoEConfig | None:
        return self.model.layer_moe_config


def _raise(err: Exception):
    raise err


def _section(cfg: Mapping, name: str) -> dict:
    if name not in cfg:
        raise ValueError(f"config.{name} is missing: the config needs a '{name}' section")
    sec = cfg[name]
    if not isinstance(sec, Mapping):
        raise _field_error(name, sec, "must be a section (ConfigDict)")
    return dict(sec)


def _check_keys(section: str, given: Mapping, allowed) -> None:
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise ValueError(
            f"unknown config key(s) {', '.join(f'config.{section}.{k}' for k in unknown)}; "
            f"known keys of config.{section}: {sorted(allowed)}"
        )


def _build(section: str, cls, kwargs: dict, prefix: str):
    """cls(**kwargs); its ValueError is re-raised with the config path of the section."""
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as err:
        msg = str(err).replace(f"{prefix}.", f"config.{section}.")
        raise ValueError(f"invalid config.{section}: {msg}") from None


def _fields(cls) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


INT32_MAX = 2**31 - 1
# The null router's settings: dropped by cli_overrides when the command line switches router.
_NULL_ONLY = ("rho", "num_null_experts")


def cli_overrides(cfg, given: Mapping[str, object]):
    """Applies the command-line rule for switching router; returns `cfg` (changed in place).

    `given` holds the command-line overrides as {"moe.router": "topk", ...}. When it sets
    moe.router to a router other than "null", the config file's null-router settings
    moe.rho / moe.num_null_experts are dropped (set to None) unless the command line gives
    them too, so ``--config.moe.router=topk --config.moe.top_k=2`` works on a null-router file.
    """
    router = given.get("moe.router")
    if router is None or router == "null" or "moe" not in cfg:
        return cfg
    for key in _NULL_ONLY:
        if key in cfg["moe"] and f"moe.{key}" not in given:
            cfg["moe"][key] = None
    return cfg


def _check_finite(cfg: Mapping) -> None:
    """NaN / inf anywhere in the config: named before any section is built."""
    for key, value in cfg.items():
        items = value.items() if isinstance(value, Mapping) else [(None, value)]
        for sub, v in items:
            if is_nonfinite_float(v):
                raise _field_error(key if sub is None else f"{key}.{sub}", v, NOT_FINITE)


def _check_mesh(mesh: MeshConfig, data: DataConfig, opt: OptConfig, moe, n: int) -> None:
    """The mesh against the n (global) devices, the experts and the batch: before any model."""
    for name in ("fsdp", "expert"):
        if n % getattr(mesh, name):
            raise _field_error(
                f"mesh.{name}",
                getattr(mesh, name),
                f"must divide the device count {n}; on CPU, get N devices with "
                f"XLA_FLAGS=--xla_force_host_platform_device_count=N (set before jax starts) or "
                f"config.dist.local_devices",
            )
    if n % (mesh.fsdp * mesh.expert):
        raise _field_error(
            "mesh.fsdp",
            mesh.fsdp,
            f"fsdp x expert = {mesh.fsdp} x {mesh.expert} must divide the device count {n}",
        )
    try:
        d, f, e = mesh.shape(n)
    except ValueError as err:
        raise _field_error("mesh.data", mesh.data, str(err)) from None
    if moe is not None and moe.num_experts % e:
        raise _field_error(
            "mesh.expert", e, f"must divide config.moe.num_experts={moe.num_experts}"
        )
    micro = data.batch_size // opt.grad_accum
    if micro % (d * f * e):
        raise _field_error(
            "data.batch_size",
            data.batch_size,
            f"each micro-batch (batch_size / opt.grad_accum = {micro}) must be divisible by "
            f"the mesh data x fsdp x expert = {d} x {f} x {e} = {d * f * e} devices",
        )
    if data.batch_size % jax.process_count():
        raise _field_error(
            "data.batch_size",
            data.batch_size,
            f"must split evenly over the {jax.process_count()} processes",
        )


def from_config_dict(cfg, *, num_devices: int | None = None) -> TrainConfig:
    """Validates a ConfigDict (or nested mapping) and converts it to a TrainConfig.

    Cheap field checks come first; then the mesh against the devices and, for the file kinds,
    the data files (records, caption lengths, split sizes), so every config error is raised
    before a model, checkpointer or data iterator exists.

    Args:
        cfg: a ConfigDict from a config file's get_config (or a nested mapping).
        num_devices: the devices the mesh is laid over (default jax.device_count(); the AOT
            tool passes its target's).

    Raises:
        ValueError: an unknown key, an invalid or NaN value, a mesh that does not fit the
            devices, or bad data files: ``config.<section>.<field>=<value> is invalid: ...``.
    """
    cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    _check_finite(cfg)
    sections = ("model", "moe", "data", "opt", "ckpt", "log", "mesh", "init", "dist")
    top = ("name", "seed", "num_steps", "fail_at_step")
    unknown = sorted(set(cfg) - set(sections) - set(top))
    if unknown:
        raise ValueError(
            f"unknown config key(s) {', '.join('config.' + k for k in unknown)}; "
            f"known: {sorted(top)} and sections {list(sections)}"
        )
    seed, num_steps = cfg.get("seed", 0), cfg.get("num_steps", 100)
    fail_at_step = cfg.get("fail_at_step", -1)
    if not (_is_int(seed) and 0 <= seed < 2**32):
        raise _field_error("seed", seed, "an int in [0, 2**32)")
    if not (_is_int(num_steps) and 1 <= num_steps <= INT32_MAX):
        raise _field_error("num_steps", num_steps, f"an int in [1, {INT32_MAX}]")
    if not (_is_int(fail_at_step) and -1 <= fail_at_step <= INT32_MAX):
        raise _field_error(
            "fail_at_step", fail_at_step, f"an int in [-1, {INT32_MAX}] (-1 = never)"
        )

    i = dict(cfg.get("init") or {})
    _check_keys("init", i, _fields(InitConfig))
    init = _build("init", InitConfig, i, "InitConfig") if i.get("hf") else None
    d = _section(cfg, "data")
    _check_keys("data", d, _fields(DataConfig))
    if "paths" in d and isinstance(d["paths"], list):
        d["paths"] = tuple(d["paths"])
    d.setdefault("seed", seed)
    data = _build("data", DataConfig, d, "DataConfig")

    e = _section(cfg, "moe")
    _check_keys("moe", e, ("enabled", *(set(_fields(MoEConfig)) - set(_MOE_DERIVED))))
    m = _section(cfg, "model")
    _check_keys("model", m, (set(_fields(ModelConfig)) - set(_MODEL_DERIVED)) | {"vocab_size"})
    enabled = e.pop("enabled", True)
    if not isinstance(enabled, bool):
        raise _field_error("moe.enabled", enabled, "must be True or False")
    if init is not None:  # the checkpoint sets the architecture, vocabulary and tokenizer
        vocab = hf_init.apply(init, m, e, d, enabled)
        data = _build("data", DataConfig, d, "DataConfig")
        if make_tokenizer(data).vocab_size > vocab:
            raise _field_error(
                "init.hf",
                init.hf,
                f"its tokenizer has {make_tokenizer(data).vocab_size} ids, the model {vocab}",
            )
    if "d_model" not in m:
        raise ValueError("config.model.d_model is missing")
    if not (_is_int(m["d_model"]) and m["d_model"] >= 1):
        raise _field_error("model.d_model", m["d_model"], "must be an integer >= 1")
    moe = _build("moe", MoEConfig, {**e, "d_model": m["d_model"]}, "MoEConfig") if enabled else None
    if init is None:
        vocab = make_tokenizer(data).vocab_size
        if m.get("vocab_size") is not None:  # a padded vocabulary (e.g. 32000 on a pod)
            if not (_is_int(m["vocab_size"]) and m["vocab_size"] >= vocab):
                raise _field_error(
                    "model.vocab_size",
                    m["vocab_size"],
                    f"None or an int >= the tokenizer's {vocab}",
                )
            vocab = m["vocab_size"]
    m.pop("vocab_size", None)
    model = _build(
        "model",
        ModelConfig,
        {
            **m,
            "vocab_size": vocab,
            "image_size": data.image_size,
            "patch_size": data.patch_size,
            "channels": 3,
            "max_len": data.text_len,
            "moe": moe,
        },
        "ModelConfig",
    )
    if (model.mode == "vlm") != data.has_image:
        raise _field_error(
            "model.mode",
            model.mode,
            f"'vlm' needs an image data kind (shapes, manifest) and 'lm' a text kind; "
            f"config.data.kind={data.kind!r}",
        )

    opt = _build("opt", OptConfig, _section(cfg, "opt"), "OptConfig")
    if data.batch_size % opt.grad_accum:
        raise _field_error(
            "opt.grad_accum",
            opt.grad_accum,
            f"must divide config.data.batch_size={data.batch_size}",
        )
    ckpt = _build("ckpt", CkptConfig, _section(cfg, "ckpt"), "CkptConfig")
    log = _build("log", LogConfig, _section(cfg, "log"), "LogConfig")
    if data.n_eval < data.batch_size and (log.eval_batches or log.eval_every or log.heatmap_images):
        raise _field_error(
            "data.n_eval",
            data.n_eval,
            f"must be >= config.data.batch_size={data.batch_size} to eval",
        )
    dist = dist_config(cfg)
    mesh = None
    x = dict(cfg.get("mesh") or {})
    _check_keys("mesh", x, ("expert", "data", "fsdp", "buffer_factor", "exchange"))
    # The mesh is on with expert parallelism, FSDP or several processes; expert 0 means 1 then.
    if x.get("expert", 0) or x.get("fsdp", 1) != 1 or jax.process_count() > 1:
        if x.get("expert", 0) and moe is None:
            raise _field_error("mesh.expert", x["expert"], "needs an MoE model (0 without one)")
        x["expert"] = x.get("expert", 0) or 1
        if x.get("buffer_factor") == 0:
            x["buffer_factor"] = None  # dropless
        mesh = _build("mesh", MeshConfig, x, "MeshConfig")
        _check_mesh(mesh, data, opt, moe, num_devices or jax.device_count())
    check_splits(data)  # file kinds: reads the files; names file, line and field
    return TrainConfig(
        init=init,
        mesh=mesh,
        dist=dist,
        name=str(cfg.get("name", "run")),
        seed=seed,
        num_steps=num_steps,
        fail_at_step=fail_at_step,
        model=model,
        data=data,
        opt=opt,
        ckpt=ckpt,
        log=log,
    )
