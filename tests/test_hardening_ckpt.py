"""Hardening of the training system: non-finite updates never reach a checkpoint, a resume must
use the stored config, checksummed checkpoints, an exclusive workdir lock, clean metrics.

Runs are smoke runs of a few steps (tensorboard off); each test makes its own workdir.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from test_training import smoke  # noqa: E402  (the smoke config with dotted overrides)

from moe_jax import data as data_lib  # noqa: E402
from moe_jax import train as training  # noqa: E402
from moe_jax.train import checkpoint as ckpt_lib  # noqa: E402
from moe_jax.train import metrics, plots  # noqa: E402
from moe_jax.train import workdir as workdir_lib  # noqa: E402


def small(**overrides):
    base = {"log.tensorboard": False, "num_steps": 9, "ckpt.every_steps": 3}
    return smoke(**{**base, "ckpt.async_save": True, **overrides})


def raw_rows(wd):
    return metrics.read_jsonl(os.path.join(wd, "metrics.jsonl"))


def ckpt_names(wd):
    return sorted(os.listdir(os.path.join(wd, "checkpoints")))


def all_finite(tree) -> bool:
    return all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(tree))


# ---- 1. a non-finite gradient or update is never applied, saved or named ---------------------


def test_nonfinite_update_is_dropped_inside_the_step():
    cfg = training.from_config_dict(small())
    graphdef, state = training.init_state(cfg)
    before = jax.tree.map(np.asarray, state["params"])
    tx, schedule = training.make_optimizer(cfg.opt, cfg.num_steps)
    batch = next(data_lib.make_dataset(cfg.data, "train"))
    kw = dict(graphdef=graphdef, tx=tx, schedule=schedule, spec=training.StepSpec())
    new, m = training.train_step(state, batch, np.int32(1), **kw)  # NaN loss at step 1
    assert not bool(m["finite"])
    after = jax.tree.map(np.asarray, new["params"])
    assert jax.tree.all(jax.tree.map(np.array_equal, before, after))


@pytest.mark.slow
def test_diverging_run_names_a_finite_checkpoint(tmp_path, capsys):
    """lr=1e3: the loss stays finite while the gradient of step 6 is NaN. The stop names the
    last checkpoint whose parameters are finite, and that checkpoint restores finite."""
    wd = str(tmp_path)
    c = small(**{"opt.lr": 1e3, "num_steps": 30})
    with pytest.raises(training.NonFiniteLossError) as err:
        training.run(c, wd)
    msg = str(err.value)
    m = re.search(r"at step (\d+).*Last good checkpoint: step (\d+)", msg)
    assert m, msg
    bad, good = int(m.group(1)), int(m.group(2))
    assert good < bad, msg
    assert not any(n.isdigit() and int(n) >= bad for n in ckpt_names(wd)), ckpt_names(wd)
    cfg = training.from_config_dict(c)
    _, like = training.init_state(cfg)
    ck = ckpt_lib.Checkpointer(os.path.join(wd, "checkpoints"), every_steps=3, keep=2)
    try:
        step, state = ck.restore_latest(like, None)
    finally:
        ck.close()
    assert step == good and all_finite(state["params"])


# ---- 2. a resume must use the stored config ----------------------------------------------------


@pytest.mark.slow
def test_resume_with_another_config_is_refused_without_touching_checkpoints(tmp_path, monkeypatch):
    wd = str(tmp_path)
    first = training.run(small(), wd, stop_at=3)
    assert first["status"] == "preempted"
    names = ckpt_names(wd)
    with pytest.raises(workdir_lib.ConfigMismatchError) as err:
        training.run(small(**{"opt.lr": 0.5}), wd)
    assert "config.opt.lr: 0.01 (stored) != 0.5 (now)" in str(err.value), str(err.value)
    assert os.path.exists(os.path.join(wd, workdir_lib.CONFIG_FILE))
    # A shape change with the override: the checkpoint verifies, so it is a mismatch, not
    # corruption: an error, and no checkpoint is renamed .corrupt.
    with pytest.raises(ckpt_lib.CheckpointMismatchError):
        training.run(small(**{"model.d_model": 48}), wd, allow_config_change=True)
    monkeypatch.setenv(workdir_lib.ALLOW_ENV, "1")
    with pytest.raises(ckpt_lib.CheckpointMismatchError):
        training.run(small(**{"model.d_model": 48}), wd)
    monkeypatch.delenv(workdir_lib.ALLOW_ENV)
    # Unverified (no manifest: a run killed before writing it) + an allowed config change: the
    # failed restore is blamed on the change, not the files.
    os.remove(os.path.join(wd, "checkpoints", "3", ckpt_lib.MANIFEST))
    with pytest.raises(ckpt_lib.CheckpointMismatchError, match="model.d_model"):
        training.run(small(**{"model.d_model": 48}), wd, allow_config_change=True)
    assert ckpt_names(wd) == names
    # The failed resumes left the stored config alone; fields in SAFE_TO_CHANGE may differ.
    done = training.run(small(**{"log.every_steps": 2, "ckpt.keep": 3}), wd)
    assert done["status"] == "done" and done["step"] == 9


# ---- 3. checksums: a same-size corruption of the latest checkpoint is caught -------------------


@pytest.mark.slow
def test_same_size_corruption_is_detected_and_previous_checkpoint_used(tmp_path, caplog, capsys):
    wd = str(tmp_path)
    training.run(small(), wd, stop_at=6)
    state_dir = os.path.join(wd, "checkpoints", "6", "state")
    files = [os.path.join(r, f) for r, _, fs in os.walk(state_dir) for f in fs]
    biggest = max(files, key=os.path.getsize)
    size = os.path.getsize(biggest)
    with open(biggest, "r+b") as f:  # flip 64 bytes in the middle, size unchanged
        f.seek(size // 2)
        chunk = f.read(64)
        f.seek(size // 2)
        f.write(bytes(b ^ 0xFF for b in chunk))
    assert os.path.getsize(biggest) == size
    capsys.readouterr()
    with caplog.at_level(logging.WARNING):
        result = training.run(small(), wd)
    out = capsys.readouterr().out
    assert re.search(r"checkpoint at step 6 .*unreadable.*checksum", caplog.text), caplog.text
    assert "resumed from the checkpoint at step 3" in out, out
    assert result["status"] == "done" and np.isfinite(result["final_loss"])
    assert "6.corrupt" in ckpt_names(wd)
    assert os.path.exists(os.path.join(wd, "checkpoints", "9", ckpt_lib.MANIFEST))


# ---- 4. one run per workdir ---------------------------------------------------------------------

_HOLD = (
    "import sys, time; from moe_jax.train.workdir import WorkdirLock\n"
    "with WorkdirLock(sys.argv[1]):\n"
    "    print('locked', flush=True); time.sleep(600)\n"
)


def test_second_run_fails_at_once_and_a_killed_holder_releases_the_lock(tmp_path):
    wd = str(tmp_path / "run")
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD, wd], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        t0 = time.perf_counter()
        with pytest.raises(workdir_lib.WorkdirBusyError, match=re.escape(wd)) as err:
            training.run(small(), wd)
        assert time.perf_counter() - t0 < 5.0
        assert f"pid {holder.pid}" in str(err.value)
        assert not os.path.exists(os.path.join(wd, "metrics.jsonl"))
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    with workdir_lib.WorkdirLock(wd):  # the OS dropped the killed holder's lock
        with pytest.raises(workdir_lib.WorkdirBusyError):
            with workdir_lib.WorkdirLock(wd):  # a second holder, even in this process
                pass


# ---- 6. metrics and reports ---------------------------------------------------------------------


@pytest.mark.slow
def test_metrics_hold_each_step_once_and_a_finished_run_is_not_rerun(tmp_path, monkeypatch, capsys):
    wd = str(tmp_path)
    cfg = small(**{"log.eval_every": 3})
    training.run(cfg, wd, stop_at=6)
    # A crash after step 6 was logged but before its checkpoint: steps 4..6 are replayed.
    os.rename(os.path.join(wd, "checkpoints", "6"), os.path.join(tmp_path, "gone"))
    drawn = []
    real_plot = plots.plot_losses
    monkeypatch.setattr(
        plots, "plot_losses", lambda rows, path: drawn.append(rows) or real_plot(rows, path)
    )
    result = training.run(cfg, wd)
    assert result["status"] == "done"
    rows = raw_rows(wd)
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 10))
    assert [r["step"] for r in rows if "eval/loss" in r] == [3, 6, 9]
    # loss.png draws every eval row, not only the final one.
    assert [r["step"] for r in drawn[-1] if "eval/loss" in r] == [3, 6, 9]
    # The closing report's FLOPs are the final eval's, labelled as such.
    ev = result["eval"]
    flops = f"eval MoE FLOPs/token realized {ev['eval/flops_per_token/realized'] / 1e6:.2f}M"
    assert flops in result["report"], result["report"]
    # Rerunning the finished run: says so, prints the stored report, appends nothing.
    with open(os.path.join(wd, "metrics.jsonl"), "rb") as f:
        before = f.read()
    capsys.readouterr()
    again = training.run(cfg, wd)
    out = capsys.readouterr().out
    assert again.get("already_done") and again["step"] == 9, again
    assert "already finished at step 9" in out and result["report"] in out, out
    assert "nan" not in out
    with open(os.path.join(wd, "metrics.jsonl"), "rb") as f:
        assert f.read() == before
    assert again["eval"] == pytest.approx(ev)


def test_checkpoints_folder_made_again_is_noticed(tmp_path):
    """The checkpoints folder deleted and made again (a file system may hand the same inode
    number back): the next save refuses with WorkdirVanishedError, it does not write into it."""
    import shutil

    d = str(tmp_path / "checkpoints")
    ck = ckpt_lib.Checkpointer(d, every_steps=1, keep=2, async_save=False)
    state = {"params": {"w": np.arange(8, dtype=np.float32)}}
    ck.save(1, state, None)
    shutil.rmtree(d)
    os.makedirs(d)
    with pytest.raises(ckpt_lib.WorkdirVanishedError, match="deleted or replaced"):
        ck.save(2, state, None)
    ck.mark_failed()
    ck.close()
    assert os.listdir(d) == []


@pytest.mark.slow
def test_deleting_the_workdir_mid_run_stops_with_an_error(tmp_path):
    """The workdir removed while train.py runs: the next save notices (the checkpoints folder
    is gone or another one) and the run stops with one error line, status 1, instead of
    finishing 'done' into a fresh folder that a rerun would take for the finished run."""
    import shutil

    wd = str(tmp_path / "run")
    cmd = [sys.executable, "train.py", "--config=configs/default.py:smoke", f"--workdir={wd}"]
    cmd += ["--config.num_steps=400", "--config.ckpt.every_steps=5", "--config.log.progress=False"]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while not os.path.isdir(os.path.join(wd, "checkpoints", "5")):
        assert p.poll() is None and time.time() - t0 < 240, p.communicate()
        time.sleep(0.05)
    os.rename(wd, wd + ".gone")  # rm -rf as one step (the run keeps writing meanwhile)
    shutil.rmtree(wd + ".gone", ignore_errors=True)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 1, (stdout[-2000:], stderr[-3000:])
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "was deleted or replaced during the run" in last, last
    assert "done at step" not in stdout
