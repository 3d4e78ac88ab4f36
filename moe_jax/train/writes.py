"""Write failures end a run at once, with one error naming the path.

A full disk, a quota, a file-size limit (``ulimit -f``) or a workdir that turns read-only makes
a write raise ``OSError`` (Python ignores SIGXFSZ, so a size limit is EFBIG, not a kill). Every
file a run writes goes through ``writing(path)`` (metrics, TensorBoard events, config, report,
plots, checksum manifests) or, for checkpoints, through ``checkpoint_failure``; both raise
WriteFailedError, which the loop turns into "save what can still be saved, then stop"
(train.py: one ``error:`` line, exit status 1). Nothing writes through a background queue that
could fill up and block the training thread.

Orbax reports a failed asynchronous write twice: the exception (which reaches the loop) and a
logged traceback per background thread, pages of them. ``quiet_orbax_tracebacks`` drops the
logged copies; the exception keeps the message.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import sys
import traceback

_HINT = "free space or raise the limit, then rerun the same command to resume"


class WriteFailedError(RuntimeError):
    """A file of the run could not be written (full disk, quota, size limit, read-only)."""

    def __init__(self, path: str, reason: str, *, checkpoint: bool = False):
        """The message reads ``cannot write <path>: <reason>``.

        Args:
            path: the file that could not be written.
            reason: why, e.g. "File too large (EFBIG)" (describe() of the OSError).
            checkpoint: the failed write was a checkpoint save (retrying one cannot help).
        """
        super().__init__(f"cannot write {path}: {reason}")
        self.path, self.reason, self.checkpoint = path, reason, checkpoint


def describe(err: BaseException, limit: int = 300) -> str:
    """'File too large (EFBIG)' for an OSError; the first line of anything else."""
    if isinstance(err, OSError) and err.errno is not None:
        return _with_name(err.strerror or os.strerror(err.errno), err.errno)
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:limit]


def _with_name(text: str, code: int) -> str:
    return f"{text} ({errno.errorcode.get(code, str(code))})"


@contextlib.contextmanager
def writing(path: str):
    """Turns an OSError raised inside the block into WriteFailedError naming ``path``."""
    try:
        yield
    except OSError as err:
        raise WriteFailedError(path, describe(err)) from err


def checkpoint_failure(directory: str, step: int | None, err: BaseException) -> WriteFailedError:
    """The error for a checkpoint save that failed (orbax raises ValueError / OSError wrapping
    the file system's message, e.g. "Failed to write ...: File too large [os_error_code='27']")."""
    where = f"checkpoint at step {step} in {directory}" if step is not None else directory
    return WriteFailedError(where, _orbax_reason(err), checkpoint=True)


def _orbax_reason(err: BaseException) -> str:
    """The file system's words out of orbax's / tensorstore's long message."""
    text = describe(err, limit=100_000)
    code = re.search(r"os_error_code='(\d+)'", text)
    for marker in ("Failed to write", "Failed writing", "Error writing"):
        if marker in text:
            tail = text[text.rindex(marker) :]
            if ": " in tail:  # '...: File too large [os_error_code='27']'
                words = tail.rsplit(": ", 1)[1].split(" [")[0]
                return _with_name(words, int(code.group(1))) if code else words
    return text[:300]


def hint() -> str:
    return _HINT


class _DropOrbaxTracebacks(logging.Filter):
    """Drops error records with a traceback that orbax logs itself, or that asyncio logs for
    one of orbax's tasks ("Task exception was never retrieved" after a failed write)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not (record.exc_info and record.levelno >= logging.ERROR):
            return True
        if "orbax" in (record.pathname or ""):
            return False
        tb = record.exc_info[2] if len(record.exc_info) > 2 else None
        return not any("orbax" in f.filename for f in traceback.extract_tb(tb))


_FILTER = _DropOrbaxTracebacks()


def quiet_orbax_tracebacks() -> None:
    """Installs the filter on absl's logger (orbax logs through absl) and the excepthook
    below; idempotent."""
    for name in ("absl", "orbax", "asyncio"):
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
    if not getattr(sys.unraisablehook, "_moe_jax", False):
        sys.unraisablehook = _drop_closed_loop_callbacks(sys.unraisablehook)


def _drop_closed_loop_callbacks(hook):
    """After a failed save, orbax closes its event loop while tensorstore still has write
    callbacks queued; each then raises "Event loop is closed" inside asyncio, which reaches
    sys.unraisablehook (printed as a bare traceback of asyncio frames). Those are dropped;
    everything else goes to the previous hook."""

    def unraisablehook(info):
        frames = traceback.extract_tb(info.exc_traceback)
        foreign = frames and all(os.sep + "asyncio" + os.sep in f.filename for f in frames)
        closed = info.exc_type is RuntimeError and str(info.exc_value) == "Event loop is closed"
        if not (closed and foreign):
            hook(info)

    unraisablehook._moe_jax = True
    return unraisablehook
