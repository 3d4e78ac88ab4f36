"""Training system: smoke training, exact resume, crash safety, preemption, NaN stop, CLI, configs.

Module-scoped fixtures share the expensive runs: one uninterrupted smoke run, one run stopped at
step 10 and resumed, and one chain of CLI subprocesses (SIGTERM, restart + SIGKILL, corrupt the
latest checkpoint, restart to the end).
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from configs import default  # noqa: E402
from moe_jax import train as training  # noqa: E402
from moe_jax.train import config as train_config  # noqa: E402
from moe_jax.train import metrics  # noqa: E402
from moe_jax.train.preempt import Preemption  # noqa: E402

SMOKE_STEPS = 30


def smoke(**overrides):
    c = default.get_config("smoke")
    c.log.progress = False
    for path, value in overrides.items():
        node = c
        *parents, leaf = path.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def rows_of(workdir):
    return metrics.last_rows_by_step(metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl")))


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("straight"))
    result = training.run(smoke(), wd)
    return wd, result, rows_of(wd)


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("resumed"))
    first = training.run(smoke(), wd, stop_at=10)
    second = training.run(smoke(), wd)
    return wd, first, second, rows_of(wd)


@pytest.mark.slow
def test_smoke_trains_and_writes_metrics_and_plots(straight):
    wd, result, rows = straight
    assert result["status"] == "done" and result["step"] == SMOKE_STEPS
    assert [r["step"] for r in rows] == list(range(1, SMOKE_STEPS + 1))
    losses = [r["loss"] for r in rows]
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses
    want = [
        "loss",
        "lr",
        "grad_norm",
        "lb_loss",
        "z_loss",
        "null_ratio",
        "null_ratio/layer0",
        "null_ratio/layer1",
        "null_ratio/vision",
        "null_ratio/text",
        "real_per_token",
        "real_per_token/vision",
        "zero_compute_fraction",
        "expert_load/layer0",
        "drop_fraction",
        "flops_per_token/expected",
        "flops_per_token/realized",
        "tokens_per_s",
    ]
    for r in rows:
        missing = [k for k in want if k not in r]
        assert not missing, (r["step"], missing)
    assert len(rows[-1]["expert_load/layer0"]) == 4
    assert math.isclose(sum(rows[-1]["expert_load/layer0"]), 1.0, rel_tol=1e-5)
    assert all(math.isfinite(r["tokens_per_s"]) and r["tokens_per_s"] > 0 for r in rows[1:])
    assert 0.0 <= rows[-1]["null_ratio/vision"] <= 1.0
    assert "eval/loss" in result["eval"] and math.isfinite(result["eval"]["eval/loss"])
    for name in ("loss.png", "null_ratio.png", "routing_heatmap.png"):
        path = os.path.join(wd, name)
        assert os.path.getsize(path) > 1000, name
    assert os.listdir(os.path.join(wd, "tb"))
    assert "null ratio" in result["report"]


@pytest.mark.slow
def test_resume_equals_uninterrupted(straight, resumed):
    _, _, rows_a = straight
    wd, first, second, rows_b = resumed
    assert first["status"] == "preempted" and first["step"] == 10
    assert second["status"] == "done" and second["step"] == SMOKE_STEPS
    assert [r["step"] for r in rows_b] == list(range(1, SMOKE_STEPS + 1))
    # Data order: the same batches in the same order, before and after the restart.
    assert [r["data/crc32"] for r in rows_a] == [r["data/crc32"] for r in rows_b]
    # Bitwise-equal losses (JSON round-trips floats exactly).
    assert [r["loss"] for r in rows_a] == [r["loss"] for r in rows_b]
    assert rows_a[-1]["grad_norm"] == rows_b[-1]["grad_norm"]
    assert second["eval"] == straight[1]["eval"]


@pytest.mark.slow
def test_nan_loss_stops_with_step_and_last_good_checkpoint(tmp_path):
    cfg = smoke(fail_at_step=7, **{"ckpt.every_steps": 5})
    with pytest.raises(training.NonFiniteLossError) as err:
        training.run(cfg, str(tmp_path))
    msg = str(err.value)
    assert "at step 7" in msg and "nan" in msg, msg
    assert "Last good checkpoint: step 5" in msg, msg
    # No checkpoint after the poisoned step was written.
    ckpts = os.listdir(tmp_path / "checkpoints")
    assert "5" in ckpts and not any(c.isdigit() and int(c) > 5 for c in ckpts), ckpts


@pytest.mark.parametrize(
    "overrides, pattern",
    [
        ({"moe.rho": 0.3}, r"config\.moe\.rho"),
        ({"opt.schedule": "linear"}, r"config\.opt\.schedule"),
        ({"model.n_heads": 3}, r"config\.model\.n_heads"),
        ({"opt.grad_accum": 3}, r"config\.opt\.grad_accum"),
        ({"data.patch_size": 5}, r"config\.data\.image_size"),
        ({"model.mode": "lm"}, r"config\.model\.mode"),
        ({"ckpt.keep": 0}, r"config\.ckpt\.keep"),
        ({"moe.top_k": 64}, r"config\.moe\.top_k"),  # more slots than N + M
        ({"mesh.expert": 3}, r"config\.mesh\.expert"),
    ],
)
def test_invalid_value_rejected_before_compilation(tmp_path, overrides, pattern):
    wd = tmp_path / "never"
    with pytest.raises(ValueError, match=pattern):
        training.run(smoke(**overrides), str(wd))
    assert not wd.exists()  # nothing was built or written


def test_top_k_above_num_experts_follows_the_library_rule():
    """One rule for K > N: the null router takes top-K over N + M slots, so the CLI accepts
    K > N whenever K <= N + M, exactly as MoEConfig does."""
    c = smoke()
    n = c.moe.num_experts
    c.unlock()
    c.moe.top_k, c.moe.rho = n + 2, 0.25
    moe = train_config.from_config_dict(c).moe
    assert moe.top_k > moe.num_experts and moe.top_k <= moe.num_experts + moe.num_nulls


def test_unknown_config_keys_rejected():
    c = smoke()
    c.unlock()
    c.model.d_modle = 64
    with pytest.raises(ValueError, match=r"unknown config key.*config\.model\.d_modle"):
        train_config.from_config_dict(c)
    c = smoke()
    c.unlock()
    c.extra = 1
    with pytest.raises(ValueError, match=r"config\.extra"):
        train_config.from_config_dict(c)


def test_variants_convert():
    for v in default.VARIANTS:
        for arg in (v, f"{v},smoke"):
            cfg = train_config.from_config_dict(default.get_config(arg))
            assert (cfg.moe is None) == (v == "dense"), arg
    k8 = train_config.from_config_dict(default.get_config("k8_rho025")).moe
    k2 = train_config.from_config_dict(default.get_config("k2_rho1")).moe
    assert k8.top_k * k8.density == k2.top_k * k2.density == 2.0
    with pytest.raises(ValueError, match="variant"):
        default.get_config("nope")
    # fine: 4x the experts at a quarter of the width and 4x the slots, the same active FLOPs.
    for v in ("default", "k2_rho1", "k8_rho025", "topk"):
        base = train_config.from_config_dict(default.get_config(v)).moe
        fine = train_config.from_config_dict(default.get_config(f"{v},fine")).moe
        assert (fine.num_experts, fine.d_ff) == (4 * base.num_experts, base.d_ff // 4), v
        assert fine.top_k * fine.density * fine.d_ff == base.top_k * base.density * base.d_ff, v
    for v in ("xmoe", "switch", "dense"):
        assert default.get_config(f"{v},fine").moe == default.get_config(v).moe, v


# ---- train.py's process: glibc malloc on transparent huge pages -------------------------------

_PROBE = """
import ctypes, os, resource, sys
sys.path.insert(0, {root!r})
import train
train._exec_with_huge_pages()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
n = 64 << 20  # above malloc's mmap threshold, like XLA's per-step temp buffer
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
ctypes.memset(libc.malloc(n), 1, n)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(os.environ.get("GLIBC_TUNABLES", ""), faults)
"""


def _thp_mode():
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return re.search(r"\[(\w+)\]", f.read()).group(1)
    except OSError:
        return None


@pytest.mark.parametrize("opt_out", [False, True], ids=["default", "MOE_JAX_HUGE_PAGES=0"])
def test_cli_process_mallocs_on_huge_pages(opt_out):
    """train.py re-executes itself with glibc.malloc.hugetlb=1 (keeping the user's other
    tunables) where THP is madvise-only, so a fresh 64 MiB buffer faults in 2 MiB pages."""
    env = {**os.environ, "GLIBC_TUNABLES": "glibc.malloc.arena_max=4"}
    env.pop("MOE_JAX_HUGE_PAGES", None)
    if opt_out:
        env["MOE_JAX_HUGE_PAGES"] = "0"
    code = _PROBE.format(root=ROOT)
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    tunables, faults = out.stdout.split()
    pages_4k = (64 << 20) // 4096
    if _thp_mode() == "madvise" and not opt_out:
        assert tunables == "glibc.malloc.arena_max=4:glibc.malloc.hugetlb=1"
        assert int(faults) < pages_4k // 8, faults
    else:
        assert tunables == "glibc.malloc.arena_max=4"
        if _thp_mode() == "madvise":
            assert int(faults) > pages_4k // 2, faults  # the probe sees 4 KiB faults


# ---- CLI subprocesses: SIGTERM, SIGKILL, a corrupted checkpoint, restart to the end -----------

CHAIN_STEPS = 150


def _cli(workdir, cache):
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": cache}
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    cmd = [
        sys.executable,
        "train.py",
        "--config=configs/default.py:smoke",
        f"--workdir={workdir}",
        f"--config.num_steps={CHAIN_STEPS}",
        "--config.ckpt.every_steps=5",
        "--config.log.progress=False",
    ]
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _wait_for(pred, proc, timeout=240.0):
    t0 = time.time()
    while not pred():
        if proc.poll() is not None or time.time() - t0 > timeout:
            out, err = proc.communicate()
            raise AssertionError(f"condition not met; rc={proc.returncode}\n{out}\n{err[-3000:]}")
        time.sleep(0.05)


def _steps(workdir):
    d = os.path.join(workdir, "checkpoints")
    return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def _last_logged(workdir):
    path = os.path.join(workdir, "metrics.jsonl")
    rows = metrics.read_jsonl(path) if os.path.exists(path) else []
    return rows[-1]["step"] if rows else 0


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("chain") / "run")
    cache = str(tmp_path_factory.mktemp("jax_cache"))
    out = {}
    # 1. SIGTERM once a few steps are logged.
    p = _cli(wd, cache)
    _wait_for(lambda: _last_logged(wd) >= 8, p)
    p.send_signal(signal.SIGTERM)
    stdout, stderr = p.communicate(timeout=120)
    out["term"] = (p.returncode, stdout, stderr, _steps(wd))
    # 1b. Restart, then Ctrl-C (SIGINT) a few steps later: saves and exits like SIGTERM.
    before = _last_logged(wd)
    p = _cli(wd, cache)
    _wait_for(lambda: _last_logged(wd) >= before + 3, p)
    p.send_signal(signal.SIGINT)
    stdout, stderr = p.communicate(timeout=120)
    out["int"] = (p.returncode, stdout, stderr, _steps(wd))
    # 2. Restart, then SIGKILL once it has saved a checkpoint of its own.
    before = max(_steps(wd) or [0])
    p = _cli(wd, cache)
    _wait_for(lambda: max(_steps(wd) or [0]) >= before + 10, p)
    p.kill()
    stdout, stderr = p.communicate(timeout=60)
    out["kill"] = (p.returncode, stdout, stderr, _steps(wd))
    # 3. Corrupt the newest complete checkpoint: every file of its state item is garbage.
    newest = max(_steps(wd))
    for root, _, files in os.walk(os.path.join(wd, "checkpoints", str(newest), "state")):
        for f in files:
            with open(os.path.join(root, f), "wb") as fh:
                fh.write(b"\x00garbage")
    out["corrupted"] = newest
    # 4. Restart: skips the corrupted step with a warning, resumes the previous one, finishes.
    p = _cli(wd, cache)
    stdout, stderr = p.communicate(timeout=300)
    out["final"] = (p.returncode, stdout, stderr, _steps(wd))
    out["workdir"] = wd
    return out


@pytest.mark.slow
def test_ctrl_c_saves_checkpoint_at_current_step_like_sigterm(chain):
    rc, stdout, stderr, steps = chain["int"]
    assert rc == 0, stderr[-3000:]
    assert "Ctrl-C: saving a checkpoint" in stderr and "Traceback" not in stderr, stderr[-3000:]
    m = re.search(r"preempted: saved a checkpoint at step (\d+)", stdout + stderr)
    assert m, stdout
    assert steps[-1] == int(m.group(1)) > chain["term"][3][-1], (m.group(1), steps)


def test_second_ctrl_c_aborts_without_waiting_for_the_save():
    # A process started in the background (nohup, `&`, some CI runners) inherits SIGINT
    # ignored: install Python's usual handler for the test, and put back what was there.
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with Preemption() as preempt:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # the handler runs between bytecodes of the main thread
            assert preempt.requested
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)
        # The previous handlers are back: SIGINT raises KeyboardInterrupt as usual.
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, outer)


@pytest.mark.slow
def test_sigterm_saves_checkpoint_at_current_step(chain):
    rc, stdout, stderr, steps = chain["term"]
    assert rc == 0, stderr[-3000:]
    m = re.search(r"preempted: saved a checkpoint at step (\d+)", stdout + stderr)
    assert m, stdout
    step = int(m.group(1))
    assert 8 <= step < CHAIN_STEPS and steps[-1] == step, (step, steps)


@pytest.mark.slow
def test_sigkill_then_restart_resumes_and_skips_corrupted_checkpoint(chain):
    int_step = chain["int"][3][-1]  # the Ctrl-C run's checkpoint
    rc, stdout, _, _ = chain["kill"]
    assert rc == -signal.SIGKILL
    assert f"resumed from the checkpoint at step {int_step}" in stdout, stdout
    rc, stdout, stderr, steps = chain["final"]
    assert rc == 0, stderr[-3000:]
    corrupted = chain["corrupted"]
    assert re.search(rf"checkpoint at step {corrupted} .*unreadable", stderr), stderr[-3000:]
    m = re.search(r"resumed from the checkpoint at step (\d+)", stdout)
    assert m and int(m.group(1)) < corrupted, stdout
    assert f"done at step {CHAIN_STEPS}" in stdout, stdout
    assert steps[-1] == CHAIN_STEPS
    wd = chain["workdir"]
    rows = rows_of(wd)
    assert [r["step"] for r in rows] == list(range(1, CHAIN_STEPS + 1))
    for name in ("loss.png", "null_ratio.png", "routing_heatmap.png"):
        assert os.path.exists(os.path.join(wd, name)), name


@pytest.mark.slow
def test_gradient_accumulation_wsd_and_router_bias_state(tmp_path):
    """grad_accum=2 with the null-ratio controller on: the selection bias (non-parameter
    state moved by each training pass) is threaded through micro-batches and carried out."""
    cfg = smoke(
        num_steps=4,
        **{
            "opt.grad_accum": 2,
            "opt.schedule": "wsd",
            "opt.warmup_steps": 1,
            "log.plots": False,
            "moe.null_bias_update_rate": 0.05,
            "moe.null_controller": "sign",
            "moe.null_calibrate": False,
        },
    )
    result = training.run(cfg, str(tmp_path))
    rows = rows_of(str(tmp_path))
    assert result["status"] == "done" and [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) for r in rows)
    # wsd with 4 steps: warmup 1, stable 2, decay 1 (decay_fraction 0.2 rounds to 1).
    assert [r["lr"] for r in rows][:3] == pytest.approx([0.0, cfg.opt.lr, cfg.opt.lr])
    # The metric is the mean over the 2 micro-batches of the bias each one routed with; the
    # bias moves by u = 0.05 per pass, so |mean| > u/2 only if it was carried across steps.
    biases = [r["null_bias/layer0"] for r in rows]
    assert abs(biases[0]) == pytest.approx(0.025), biases
    assert any(abs(b) > 0.03 for b in biases[1:]), biases


@pytest.mark.slow
def test_expert_parallel_run_matches_single_device(straight, tmp_path):
    """mesh.expert=4 on the 8 fake CPU devices (data 2 x expert 4), dropless buffers: the first
    steps' losses equal the single-device run up to float reordering."""
    import jax

    if jax.device_count() < 8:
        pytest.skip("needs 8 (fake) devices; see tests/conftest.py")
    cfg = smoke(**{"mesh.expert": 4, "mesh.buffer_factor": 0.0, "log.plots": False})
    result = training.run(cfg, str(tmp_path), stop_at=3)
    assert result["status"] == "preempted" and result["step"] == 3
    ep_losses = [r["loss"] for r in rows_of(str(tmp_path))]
    one_device = [r["loss"] for r in straight[2][:3]]
    assert ep_losses == pytest.approx(one_device, rel=1e-4, abs=1e-5)


@pytest.mark.slow
def test_fresh_start_in_a_used_workdir_moves_the_old_run_aside(tmp_path):
    """ckpt.resume=False with a new seed in a used workdir, interrupted before its first save,
    then rerun: the rerun must not resume the old run's checkpoint. The fresh start moves the
    old run into previous/<time>/ before writing anything, so config.json, the checkpoints
    and the metrics describe one run."""
    wd = str(tmp_path / "run")
    kw = {"num_steps": 6, "ckpt.every_steps": 3, "log.plots": False}
    training.run(smoke(**kw), wd)
    old_steps = _steps(wd)
    with pytest.raises(training.NonFiniteLossError):  # dies at step 2, before its first save
        training.run(smoke(seed=1, fail_at_step=2, **{"ckpt.resume": False, **kw}), wd)
    moved = os.listdir(os.path.join(wd, "previous"))
    assert len(moved) == 1 and _steps(os.path.join(wd, "previous", moved[0])) == old_steps
    assert _steps(wd) == []
    result = training.run(smoke(seed=1, **kw), wd)  # the rerun (resume on): nothing to resume
    assert result["status"] == "done" and not result.get("already_done")
    stored = json.load(open(os.path.join(wd, "config.json")))["config"]
    assert stored["seed"] == 1
    assert [r["step"] for r in rows_of(wd)] == list(range(1, 7))
