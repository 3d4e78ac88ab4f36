"""Checkpoints: one orbax CheckpointManager holding the train state and the grain iterator.

Layout under ``directory``: one folder per step with two items,
  state/  the train-state pytree (params, optimizer state, step, rng) via StandardSave
  data/   the grain iterator position via grain.checkpoint.CheckpointSave
Orbax writes each step into a temporary folder and renames it when complete, so a run killed
mid-save leaves no step folder to restore. A step folder that exists but cannot be read (a
corrupted or truncated file) is renamed to ``<step>.corrupt`` with a warning and the previous
step is restored instead; the rename keeps later saves at that step from colliding.
"""

from __future__ import annotations

import logging
import os

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


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

    def should_save(self, step: int) -> bool:
        return self.every_steps > 0 and step % self.every_steps == 0

    def save(self, step: int, state, data_iter: grain.DatasetIterator | None) -> None:
        """Starts saving ``state`` and the iterator position as ``step`` (async if enabled).

        The iterator position is read now, before this call returns, so the caller may keep
        drawing batches while the arrays are written in the background.
        """
        items = {"state": ocp.args.StandardSave(_to_savable(state))}
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iter)
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        s = self.steps()
        return s[-1] if s else None

    def restore_latest(self, state_like, data_iter: grain.DatasetIterator | None):
        """(step, state) from the newest readable checkpoint, or None when there is none.

        ``state_like`` gives structure, dtypes and shardings (concrete or abstract arrays).
        ``data_iter`` is moved to the saved position. Unreadable steps are set aside with a
        warning and the next older one is tried.
        """
        target = _abstract(state_like)
        for step in reversed(self.steps()):
            try:
                restored = self.manager.restore(
                    step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
                )
                _check_finite_structure(restored["state"], target)
                if data_iter is not None:
                    self.manager.restore(
                        step,
                        args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(data_iter)),
                    )
            except Exception as err:  # noqa: BLE001 - any unreadable checkpoint is skipped
                log.warning(
                    "checkpoint at step %d in %s is unreadable (%s: %s); skipping it and "
                    "trying the previous one",
                    step,
                    self.directory,
                    type(err).__name__,
                    str(err).splitlines()[0][:200] if str(err) else "",
                )
                self._set_aside(step)
                continue
            return step, _from_savable(restored["state"], state_like)
        return None

    def _set_aside(self, step: int) -> None:
        path = os.path.join(self.directory, str(step))
        if os.path.isdir(path):
            os.replace(path, f"{path}.corrupt")
        self.manager.reload()

    def wait(self) -> None:
        """Blocks until pending async saves are on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _check_finite_structure(restored, target) -> None:
    """Raises if a restored leaf does not match the target's shape (a truncated array)."""
    for r, t in zip(jax.tree.leaves(restored), jax.tree.leaves(target)):
        if np.shape(r) != tuple(t.shape):
            raise ValueError(f"restored shape {np.shape(r)} != expected {tuple(t.shape)}")
