"""Workdir bookkeeping: one run at a time, and a resume only with the config that made it.

Files in ``<workdir>``:
  .lock        flock'ed (exclusive, non-blocking) for the whole run; holds the owner's pid.
               The OS drops the lock when the process exits, so a crashed or killed run never
               leaves it held. A second run on the same workdir fails at once (WorkdirBusyError).
  config.json  {"fingerprint": sha256 of the resume-relevant fields, "config": the resolved
               TrainConfig as JSON}, written at the first start and rewritten by every run
               once its checkpoint restored (a failed resume leaves it as it was).
  report.txt   the closing report of a finished run (printed again when it is rerun).

Resume rule. Before any checkpoint is restored, the current config is compared field by field
with the stored one. A resume is refused (ConfigMismatchError, a ValueError naming every
differing field as ``config.<path>: <stored> (stored) != <now> (now)``) unless all differing
fields are in SAFE_TO_CHANGE: fields that change logging, checkpoint cadence or fault injection
but not the trajectory of the parameters. Deliberately *not* safe: num_steps (it reshapes the
cosine / wsd learning-rate schedule, so the resumed steps would not equal an uninterrupted
run), anything under data (order and split of the batches), model / moe / opt / seed / mesh.

Override: ``run(..., allow_config_change=True)`` or the environment variable
``MOE_JAX_ALLOW_CONFIG_CHANGE=1`` accepts any difference (e.g. extending num_steps); the
differences are logged as a warning and config.json is replaced by the current config. A
changed shape still cannot restore: that fails with CheckpointMismatchError, and no checkpoint
is renamed .corrupt because of it (the failure is blamed on the config change, not the files).
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import socket
import time

from moe_jax.train.writes import writing

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
LOCK_FILE = ".lock"
REPORT_FILE = "report.txt"
PREVIOUS_DIR = "previous"  # earlier runs moved aside by a fresh start (move_previous_run)
ALLOW_ENV = "MOE_JAX_ALLOW_CONFIG_CHANGE"
# Field paths (below "config.") that may differ on resume; a trailing ".*" covers a section.
SAFE_TO_CHANGE = (
    "name",
    "dist.coordinator_address",  # where process 0 listens may change between launches
    "dist.process_id",  # differs per process; each compares itself with process 0's file
    "fail_at_step",
    "model.moe.null_calibrate",  # acts before step 1 only: nothing to change on a resume
    "ckpt.every_steps",
    "ckpt.keep",
    "ckpt.async_save",
    "ckpt.resume",
    "log.*",
)


class WorkdirBusyError(RuntimeError):
    """Another live process holds the workdir's lock."""


class WorkdirError(ValueError):
    """The workdir cannot hold a run: a path that is a file, or an unreadable config.json."""


def check_workdir(workdir: str) -> None:
    """Raises WorkdirError when `workdir` exists and is not a folder, or holds an unreadable
    config.json (before anything is built or opened in it)."""
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise WorkdirError(f"workdir {workdir} is a file, not a folder: pass another --workdir")
    read_config(workdir)


class ConfigMismatchError(ValueError):
    """A resume whose config differs from the stored one in fields that change the run."""


class WorkdirLock:
    """Exclusive flock on ``<workdir>/.lock`` while the ``with`` block runs."""

    def __init__(self, workdir: str, name: str = LOCK_FILE):
        """name: the lock file; each process of a multi-process run locks its own."""
        self.workdir = os.path.abspath(workdir)
        self.path = os.path.join(self.workdir, name)
        self._fd: int | None = None

    def __enter__(self) -> WorkdirLock:
        os.makedirs(self.workdir, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "unknown"
            os.close(fd)
            raise WorkdirBusyError(
                f"workdir {self.workdir} is in use by another run ({holder}); wait for it to "
                "finish, stop it, or pass another --workdir"
            ) from None
        try:  # who holds it, for a second run's message; a failed write is one error line
            with writing(self.path):
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        except BaseException:
            os.close(fd)  # releases the lock
            raise
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def config_json(cfg) -> dict:
    """The TrainConfig as plain JSON values (tuples -> lists, dtypes and others -> str)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def _flatten(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out or {prefix[:-1]: {}}
    return {prefix[:-1]: tree}


def is_safe(path: str) -> bool:
    return any(path == s or (s.endswith(".*") and path.startswith(s[:-1])) for s in SAFE_TO_CHANGE)


def fingerprint(config: dict) -> str:
    """sha256 over the fields outside SAFE_TO_CHANGE: equal fingerprints may resume."""
    kept = {k: v for k, v in _flatten(config).items() if not is_safe(k)}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()


# Fields added after configs were first stored, with the value that reproduces the older
# behaviour: a stored config without the field is read as having that value.
ADDED_FIELDS = {
    "init": None,
    "model.norm_eps": 1e-6,
    "model.qkv_bias": False,
    "model.attn_out_bias": False,
    "model.sliding_window": None,
    "model.rope_scaling": "none",
    "model.rope_factor": 1.0,
    "model.rope_low_freq_factor": 1.0,
    "model.rope_high_freq_factor": 4.0,
    "model.rope_original_max_len": 8192,
    "model.moe.null_kp": 0.0,
    "dist.coordinator_address": None,
    "dist.num_processes": None,
    "dist.process_id": None,
    "dist.local_devices": None,
    "mesh.fsdp": 1,
    "model.scan_layers": False,  # workdirs before scanned layers hold unrolled blocks
}


def _older_value(stored: dict, key: str, missing):
    if key == "model.head_dim" and "model.d_model" in stored:
        return stored["model.d_model"] // stored["model.n_heads"]
    if key == "model.moe.null_controller" and "model.moe.router" in stored:  # was sign only
        return "sign" if stored.get("model.moe.null_bias_update_rate", 0.0) > 0 else "pi"
    return ADDED_FIELDS.get(key, missing)


def config_diff(stored: dict, now: dict) -> list[tuple[str, object, object]]:
    """[(path, stored value, current value)] of every differing field, sorted by path."""
    a, b = _flatten(stored), _flatten(now)
    missing = object()
    out = []
    for k in sorted(set(a) | set(b)):
        x, y = a.get(k, _older_value(a, k, missing)), b.get(k, missing)
        if x != y:
            out.append((k, None if x is missing else x, None if y is missing else y))
    return out


def read_config(workdir: str) -> dict | None:
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)["config"]
    except (ValueError, KeyError, TypeError) as err:  # truncated, not JSON, another layout
        raise WorkdirError(
            f"{path} is unreadable ({type(err).__name__}: {err}); it records the config of the "
            f"checkpoints in {workdir}. Restore it, or move the workdir aside to start over."
        ) from None


def write_config(workdir: str, cfg) -> None:
    """Writes config.json atomically (temp file + rename)."""
    data = config_json(cfg)
    path = os.path.join(workdir, CONFIG_FILE)
    with writing(path):
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            json.dump(
                {"fingerprint": fingerprint(data), "config": data}, f, indent=1, sort_keys=True
            )
        os.replace(path + ".tmp", path)


def check_resume_config(
    workdir: str, cfg, *, resuming: bool, allow_change: bool = False
) -> list[str]:
    """Refuses a resume whose config differs from the stored one (see the module docstring);
    call it before any checkpoint is restored, and write_config once the restore succeeded
    (a failed resume leaves the stored config describing the checkpoints).

    Returns the differing fields outside SAFE_TO_CHANGE that the override let through.
    """
    allow_change = allow_change or os.environ.get(ALLOW_ENV, "") not in ("", "0")
    stored, unsafe = read_config(workdir), []
    if resuming and stored is None:
        log.warning(
            "workdir %s has checkpoints but no %s (written by an older version): the resume "
            "cannot be checked against the config that made them",
            workdir,
            CONFIG_FILE,
        )
    elif resuming:
        diff = config_diff(stored, config_json(cfg))
        layout = [d for d in diff if d[0] == "model.scan_layers"]
        if layout:  # the parameter tree's layout differs: no override can restore it
            raise ConfigMismatchError(
                f"refusing to resume in {workdir}: its checkpoints hold the "
                f"{'scanned' if layout[0][1] else 'unrolled'} block layout "
                f"(model.scan_layers={layout[0][1]}); resume it with "
                f"--config.model.scan_layers={layout[0][1]}, or convert the weights with "
                "moe_jax.hf.save_native / load_native(scan_layers=...) into a new run"
            )
        unsafe = [d for d in diff if not is_safe(d[0])]
        lines = [f"config.{k}: {a!r} (stored) != {b!r} (now)" for k, a, b in unsafe]
        if unsafe and not allow_change:
            raise ConfigMismatchError(
                f"refusing to resume in {workdir}: the config differs from the one stored in "
                f"{CONFIG_FILE} in fields that change the run:\n  " + "\n  ".join(lines) + "\n"
                f"Use the stored config, another workdir, or set {ALLOW_ENV}=1 (run(..., "
                f"allow_config_change=True)) to resume anyway. Safe to change: {SAFE_TO_CHANGE}"
            )
        if unsafe:
            log.warning("resuming with a changed config (allowed):\n  %s", "\n  ".join(lines))
    return [k for k, _, _ in unsafe]


def read_report(workdir: str) -> str | None:
    path = os.path.join(workdir, REPORT_FILE)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return f.read()


def write_report(workdir: str, report: str) -> None:
    path = os.path.join(workdir, REPORT_FILE)
    with writing(path), open(path, "w", encoding="utf-8") as f:
        f.write(report + "\n")


def move_previous_run(workdir: str) -> str | None:
    """A fresh start (ckpt.resume=False) in a workdir that holds a run: moves that run's files
    (checkpoints, config.json, metrics, report, plots, TensorBoard events) into
    <workdir>/previous/<UTC time>/ before anything is written, so config.json, the
    checkpoints, metrics.jsonl and report.txt always describe one run (a later resume cannot
    pick up the old run's checkpoint). Returns where they went; None when nothing was there."""
    names = sorted(
        n for n in os.listdir(workdir) if not n.startswith(LOCK_FILE) and n != PREVIOUS_DIR
    )
    if not names:
        return None
    base = os.path.join(workdir, PREVIOUS_DIR, time.strftime("%Y%m%d-%H%M%S", time.gmtime()))
    dest, i = base, 0
    while os.path.exists(dest):
        i += 1
        dest = f"{base}-{i}"
    os.makedirs(dest)
    for name in names:
        os.rename(os.path.join(workdir, name), os.path.join(dest, name))
    return dest
