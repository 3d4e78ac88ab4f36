"""Checkpoints: one orbax CheckpointManager holding the train state and the grain iterator.

Layout under ``directory``: one folder per step with two items,
  state/  the train-state pytree (params, optimizer state, step, rng) via StandardSave
  data/   the grain iterator position via grain.checkpoint.CheckpointSave
Orbax writes each step into a temporary folder and renames it when complete, so a run killed
mid-save leaves no step folder to restore. A step folder that exists but cannot be read (a
corrupted or truncated file) is renamed to ``<step>.corrupt`` with a warning and the previous
step is restored instead; the rename keeps later saves at that step from colliding.

Checksums: once a step's save has finished (orbax finalizes it; the next save, wait() and
close() notice), a manifest ``<step>/sha256.json`` with the sha256 of every file of the step
is written. restore_latest verifies it first, so a same-size corruption (flipped bytes inside
an array file) is caught and that step set aside like an unreadable one. A step of a run
killed before its manifest was written restores unverified (a warning says so). A step whose
files verify but whose arrays do not fit the target state is not corrupt: the structure
changed (another config), and CheckpointMismatchError is raised without renaming anything.
A restored state whose parameters are not all finite is set aside too.

Several processes: every process calls save / restore with the same global arrays (orbax
writes each process's shards and process 0 commits the step) and its own grain iterator
(stored per process as data/process_<i>-of-<n>.json). Process 0 alone writes the manifests and
renames set-aside steps; the others wait for it at a barrier, so all of them restore the same
step.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid

import grain
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from moe_jax.train import writes
from moe_jax.train.step import all_finite

log = logging.getLogger(__name__)

MANIFEST = "sha256.json"


class WorkdirVanishedError(RuntimeError):
    """The checkpoints folder was deleted or replaced while the run was writing to it."""


RUN_MARK = ".run_id"  # in the checkpoints folder: which run's process 0 created / holds it


def _identity(path: str, mark: str | None = None) -> tuple | None:
    """(device, inode, run id) of the checkpoints folder, None when it is gone. A folder
    deleted and made again can get the same inode number back; the run id file written by
    this run (process 0; ``mark``) tells it apart."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    if mark is None:
        return st.st_dev, st.st_ino
    try:
        with open(os.path.join(path, RUN_MARK), encoding="utf-8") as f:
            return st.st_dev, st.st_ino, f.read()
    except OSError:
        return st.st_dev, st.st_ino, None


class CheckpointMismatchError(ValueError):
    """An intact checkpoint that does not fit the state being restored (another config)."""


def _file_digests(step_dir: str) -> dict[str, str]:
    """{path relative to step_dir: sha256 hex} of every file under step_dir but the manifest."""
    out = {}
    for root, _, files in os.walk(step_dir):
        for name in files:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, step_dir)
            if rel in (MANIFEST, MANIFEST + ".tmp"):
                continue
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            out[rel] = h.hexdigest()
    return out


def write_manifest(step_dir: str) -> None:
    """Writes ``<step_dir>/sha256.json`` atomically (the step must be finalized)."""
    path, digests = os.path.join(step_dir, MANIFEST), _file_digests(step_dir)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(digests, f, indent=0, sort_keys=True)
    os.replace(path + ".tmp", path)


def verify_manifest(step_dir: str) -> bool | None:
    """True if every file in the manifest is present with its checksum, None if there is no
    manifest; raises ValueError naming the first bad file otherwise."""
    path = os.path.join(step_dir, MANIFEST)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        want = json.load(f)
    have = _file_digests(step_dir)
    for rel, digest in sorted(want.items()):
        if rel not in have:
            raise ValueError(f"checksum manifest: {rel} is missing")
        if have[rel] != digest:
            raise ValueError(f"checksum mismatch in {rel}")
    return True


def _is_key(x) -> bool:
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _to_savable(tree):
    """Typed PRNG key arrays -> their uint32 data (orbax stores plain arrays only)."""
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def _abstract(tree):
    """ShapeDtypeStructs (with sharding) of the savable form of ``tree``."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, _to_savable(tree))


def _from_savable(restored, like):
    """Inverse of _to_savable, guided by the structure of ``like``."""
    return jax.tree.map(
        lambda r, x: jax.random.wrap_key_data(r, impl=jax.random.key_impl(x)) if _is_key(x) else r,
        restored,
        like,
    )


class Checkpointer:
    """Saves every ``every_steps`` steps, keeps the last ``keep``, restores the newest readable."""

    def __init__(self, directory: str, *, every_steps: int, keep: int, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        self.every_steps = every_steps
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
            cleanup_tmp_directories=True,  # drop half-written folders of a killed run
            enable_async_checkpointing=async_save,
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data")
        )
        self.async_save = async_save
        writes.quiet_orbax_tracebacks()  # a failed save raises here; orbax's logged copies go
        self._main = jax.process_index() == 0
        self._mark = None  # process 0: this run's id, written into the folder
        if self._main:
            self._mark = uuid.uuid4().hex
            with writes.writing(os.path.join(self.directory, RUN_MARK)):
                with open(os.path.join(self.directory, RUN_MARK), "w", encoding="utf-8") as f:
                    f.write(self._mark)
        self._identity = self._now()  # to notice a deleted / replaced workdir
        self._unsealed: list[int] = []  # saved steps without a checksum manifest yet
        self._failing = False  # set by the loop once a write failed: close() stays quiet

    def _now(self) -> tuple | None:
        return _identity(self.directory, self._mark)

    def should_save(self, step: int) -> bool:
        return self.every_steps > 0 and step % self.every_steps == 0

    def save(self, step: int, state, data_iter: grain.DatasetIterator | None) -> None:
        """Starts saving ``state`` and the iterator position as ``step`` (async if enabled).

        The iterator position is read now, before this call returns, so the caller may keep
        drawing batches while the arrays are written in the background.
        """
        if self._now() != self._identity:
            raise WorkdirVanishedError(
                f"{self.directory} was deleted or replaced during the run: stopping at step "
                f"{step} without saving (nothing of this run would be found there). Rerun to "
                "start over."
            )
        items = {"state": ocp.args.StandardSave(_to_savable(state))}
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iter)
        self._guard(lambda: self.manager.wait_until_finished())  # the previous save's failure
        self._seal(self._unsealed)  # earlier steps are final now
        self._unsealed = [step]
        self._guard(lambda: self.manager.save(step, args=ocp.args.Composite(**items), force=True))
        if not self.async_save:
            self._seal(self._unsealed)

    def check(self) -> None:
        """Cheap, every step: once a background save has ended, its failure (if any) raises
        WriteFailedError now rather than at the next save, and its checksum manifest is
        written."""
        if self.async_save and self._unsealed and not self.manager.is_saving_in_progress():
            self.wait()

    def mark_failed(self) -> None:
        """A write of this run failed (its error is on the way up): close() stays quiet."""
        self._failing = True

    def _guard(self, fn):
        """Runs an orbax save / wait; any failure becomes WriteFailedError naming the step."""
        try:
            return fn()
        except Exception as err:
            if self._now() != self._identity:
                raise WorkdirVanishedError(
                    f"{self.directory} was deleted or replaced during the run: stopping "
                    "without saving. Rerun to start over."
                ) from err
            step = self._unsealed[-1] if self._unsealed else None
            self._unsealed = []  # that step is not on disk: nothing to seal
            raise writes.checkpoint_failure(self.directory, step, err) from err

    def _seal(self, steps: list[int]) -> None:
        """Writes the checksum manifest of each finished step that still exists (process 0)."""
        for step in steps if self._main else ():
            step_dir = os.path.join(self.directory, str(step))
            if os.path.isdir(step_dir):
                with writes.writing(os.path.join(step_dir, MANIFEST)):
                    write_manifest(step_dir)
        steps.clear()

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def newest_on_disk(self) -> int | None:
        """The newest step whose folder orbax finalized (renamed from its temporary name)."""
        try:
            names = os.listdir(self.directory)
        except OSError:
            return None
        done = [int(n) for n in names if n.isdigit()]
        return max(done) if done else None

    def latest_step(self) -> int | None:
        s = self.steps()
        return s[-1] if s else None

    def restore_latest(self, state_like, data_iter: grain.DatasetIterator | None, *, changed=()):
        """(step, state) from the newest readable checkpoint, or None when there is none.

        ``state_like`` gives structure, dtypes and shardings (concrete or abstract arrays).
        ``data_iter`` is moved to the saved position. Unreadable steps are set aside with a
        warning and the next older one is tried. ``changed``: config fields that differ from
        the run that saved the checkpoints; when given, a failed restore raises
        CheckpointMismatchError naming them instead of setting the step aside.
        """
        target = _abstract(state_like)
        for step in reversed(self.steps()):
            try:
                verified = verify_manifest(os.path.join(self.directory, str(step)))
            except ValueError as err:
                self._skip(step, err)
                continue
            if verified is None:
                log.warning(
                    "checkpoint at step %d in %s has no checksum manifest (its run ended before "
                    "writing it); restoring it unverified",
                    step,
                    self.directory,
                )
            try:
                restored = self._restore(step, target, data_iter)
            except Exception as err:  # noqa: BLE001 - any unreadable checkpoint is skipped
                if verified or changed:  # files fine, or the config changed: not corruption
                    state = "is intact but" if verified else "(unverified)"
                    raise CheckpointMismatchError(
                        f"checkpoint at step {step} in {self.directory} {state} does not fit "
                        f"the current train state ({type(err).__name__}: {_first_line(err)}); "
                        f"config fields changed since it was saved: {list(changed) or 'none'}"
                    ) from err
                self._skip(step, err)
                continue
            if not bool(all_finite(restored["params"])):
                self._skip(step, ValueError("its parameters are not all finite"))
                continue
            return step, _from_savable(restored, state_like)
        return None

    def _restore(self, step: int, target, data_iter):
        restored = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
        )
        _check_finite_structure(restored["state"], target)
        if data_iter is not None:
            self.manager.restore(
                step,
                args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(data_iter)),
            )
        return restored["state"]

    def _skip(self, step: int, err: Exception) -> None:
        log.warning(
            "checkpoint at step %d in %s is unreadable (%s: %s); skipping it and "
            "trying the previous one",
            step,
            self.directory,
            type(err).__name__,
            _first_line(err),
        )
        self._set_aside(step)

    def _set_aside(self, step: int) -> None:
        path = os.path.join(self.directory, str(step))
        if self._main and os.path.isdir(path):
            os.replace(path, f"{path}.corrupt")
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"moe_jax checkpoint set aside {step}")
        self.manager.reload()

    def wait(self) -> None:
        """Blocks until pending async saves are on disk and writes their checksum manifests."""
        self._guard(self.manager.wait_until_finished)
        self._seal(self._unsealed)

    def close(self) -> None:
        """Waits for the pending save and closes; after mark_failed() a second failure of the
        same save is not raised over the first."""
        try:
            self.wait()
        except Exception:
            if self._now() == self._identity and not self._failing:
                raise
            # The folder is gone or a write already failed (that error is on its way): the
            # pending save could only fail, and must not hide the error that names the cause.
        finally:
            try:
                self.manager.close()
            except Exception:
                if not self._failing:
                    raise


def _first_line(err: Exception) -> str:
    return str(err).splitlines()[0][:200] if str(err) else ""


def _check_finite_structure(restored, target) -> None:
    """Raises if a restored leaf does not match the target's shape (a truncated array)."""
    for r, t in zip(jax.tree.leaves(restored), jax.tree.leaves(target)):
        if jnp.shape(r) != tuple(t.shape):
            raise ValueError(f"restored shape {jnp.shape(r)} != expected {tuple(t.shape)}")
