"""A write that fails (file-size limit, full disk, quota) ends the run with one error naming the
path, after saving what can still be saved; nothing blocks behind a dead writer thread.

The faults are real: RLIMIT_FSIZE (what `ulimit -f` sets) makes the kernel refuse writes past
the limit with EFBIG (Python ignores SIGXFSZ), for our own writes and orbax's alike.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import resource
import struct
import subprocess
import sys
import time

import jax.numpy as jnp
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from moe_jax.train import checkpoint as ckpt_lib  # noqa: E402
from moe_jax.train import metrics  # noqa: E402
from moe_jax.train.writes import WriteFailedError  # noqa: E402


@contextlib.contextmanager
def file_size_limit(nbytes: int):
    """RLIMIT_FSIZE for this process inside the block (the soft limit; restored after)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def _events(path: str) -> list:
    """The Event protos of a TensorBoard event file (TFRecord framing, read by hand)."""
    from tensorboardX.proto import event_pb2

    out = []
    with open(path, "rb") as f:
        data = f.read()
    i = 0
    while i < len(data):
        (n,) = struct.unpack("<Q", data[i : i + 8])
        out.append(event_pb2.Event.FromString(data[i + 12 : i + 12 + n]))
        i += 12 + n + 4
    return out


def test_tensorboard_events_are_written_synchronously_and_readable(tmp_path):
    w = metrics.MetricWriter(str(tmp_path))
    w.write(1, {"loss": 2.5, "expert_load/layer0": [0.25, 0.75], "eval/loss": float("nan")})
    w.write(2, {"loss": 1.5})
    tb = os.path.join(tmp_path, "tb")
    (name,) = os.listdir(tb)
    events = _events(os.path.join(tb, name))  # readable before close: flushed per write
    w.close()
    got = {(e.step, v.tag): v.simple_value for e in events for v in e.summary.value}
    assert got == {
        (1, "loss"): 2.5,
        (1, "expert_load/layer0/0"): 0.25,
        (1, "expert_load/layer0/1"): 0.75,
        (2, "loss"): 1.5,
    }


@pytest.mark.parametrize("tensorboard", [False, True])
def test_metric_writer_raises_naming_the_file_at_the_size_limit(tmp_path, tensorboard):
    w = metrics.MetricWriter(str(tmp_path), tensorboard=tensorboard)
    row = {f"x/layer{i}": float(i) for i in range(40)}  # ~1 KB per row in either file
    with file_size_limit(16 << 10), pytest.raises(WriteFailedError) as err:
        for step in range(1, 200):
            w.write(step, row)
    w.close()  # closing a failed writer raises nothing more
    msg = str(err.value)
    assert "File too large (EFBIG)" in msg, msg
    assert err.value.path.startswith(str(tmp_path)), msg
    assert ("tb" + os.sep in err.value.path) or err.value.path.endswith("metrics.jsonl"), msg
    assert not err.value.checkpoint


def test_workdir_lock_write_failure_is_one_error_and_releases_the_lock(tmp_path):
    """Writing the holder line into <workdir>/.lock fails (ulimit -f 0): WriteFailedError
    naming the lock file (train.py's one error line), and the lock is not left held."""
    from moe_jax.train.workdir import WorkdirLock

    with file_size_limit(0), pytest.raises(WriteFailedError) as err:
        with WorkdirLock(str(tmp_path)):
            pass
    assert ".lock" in str(err.value) and "(EFBIG)" in str(err.value), str(err.value)
    with WorkdirLock(str(tmp_path)) as lock:  # free again: no WorkdirBusyError
        assert "pid" in open(lock.path, encoding="utf-8").read()


def test_failed_async_checkpoint_is_one_error_and_no_logged_tracebacks(tmp_path, caplog):
    """Orbax's background save fails: check() (called every step) raises WriteFailedError
    naming the step and the file system's reason; orbax's own logged tracebacks are dropped."""
    ck = ckpt_lib.Checkpointer(str(tmp_path / "ck"), every_steps=1, keep=2, async_save=True)
    state = {"params": {"w": jnp.arange(128 * 1024, dtype=jnp.float32)}}  # 512 KB
    caplog.set_level(logging.INFO)
    with file_size_limit(64 << 10), pytest.raises(WriteFailedError) as err:
        ck.save(1, state, None)
        t0 = time.time()
        while time.time() - t0 < 60:
            ck.check()
            time.sleep(0.05)
        ck.wait()
    ck.mark_failed()
    ck.close()  # the same failure is not raised again on the way out
    msg = str(err.value)
    assert err.value.checkpoint and "checkpoint at step 1" in msg, msg
    assert "File too large (EFBIG)" in msg, msg
    assert not [r for r in caplog.records if r.exc_info and "orbax" in r.pathname]
    assert ck.newest_on_disk() is None  # the failed step was never finalized


def _train_py_under_ulimit(wd: str, kib: int, *extra: str) -> subprocess.CompletedProcess:
    """train.py (smoke) under `ulimit -f kib`; the timeout fails a hang instead of waiting."""
    cmd = [sys.executable, "train.py", "--config=configs/default.py:smoke", f"--workdir={wd}"]
    cmd += ["--config.num_steps=5000", "--config.log.every_steps=1", "--config.log.plots=False"]
    ulimit = ["bash", "-c", f'ulimit -f {kib} && exec "$@"', "bash"]  # bash counts KiB
    return subprocess.run(ulimit + cmd + list(extra), cwd=ROOT, capture_output=True, text=True,
                          timeout=300)  # fmt: skip


def _one_error_line(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 1, (r.stdout[-2000:], r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]  # nor orbax's nor asyncio's
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1, r.stderr[-3000:]
    return errors[0]


@pytest.mark.slow
def test_train_py_saves_and_stops_when_a_metrics_write_fails(tmp_path):
    """The metrics / TensorBoard file reaches the limit (512 KiB: above the smoke model's whole
    checkpoint) long before the run ends: the run saves a checkpoint at that step and exits
    with status 1 and one error line naming the file."""
    wd = str(tmp_path / "run")
    line = _one_error_line(_train_py_under_ulimit(wd, 512, "--config.ckpt.every_steps=0"))
    m = re.search(r"cannot write (\S+): File too large \(EFBIG\)\. Stopped; kept the "
                  r"checkpoint at step (\d+)", line)  # fmt: skip
    assert m, line
    path, step = m.group(1), int(m.group(2))
    assert path.startswith(wd) and ("/tb/" in path or path.endswith("metrics.jsonl")), path
    assert 0 < step < 5000
    step_dir = os.path.join(wd, "checkpoints", str(step))
    assert ckpt_lib.verify_manifest(step_dir)  # complete and sealed


@pytest.mark.slow
def test_train_py_stops_with_one_line_when_a_checkpoint_write_fails(tmp_path):
    """100 KiB: the first checkpoint cannot be written. One error line naming the step and
    the reason; none of orbax's logged tracebacks or tensorstore's closed-loop callbacks."""
    wd = str(tmp_path / "run")
    line = _one_error_line(_train_py_under_ulimit(wd, 100, "--config.ckpt.every_steps=10"))
    assert line.startswith(f"error: cannot write checkpoint at step 10 in {wd}/checkpoints: "
                           "File too large (EFBIG). Stopped; no checkpoint"), line  # fmt: skip
