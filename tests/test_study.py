"""experiments/study.py: the --quick mode writes its report and plots, and the null-ratio
controller tracks 1 - rho more closely than L_bal alone in a short training run."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # the experiments package lives at the repository root

from experiments import aggregate  # noqa: E402


def test_tracking_error_is_measured_per_layer_after_warmup():
    rows = [{"step": s, "null_ratio": [0.9, 0.1]} for s in range(1, 6)]
    rows += [{"step": s, "null_ratio": [0.51, 0.47]} for s in range(6, 11)]
    t = aggregate.tracking({"target_null_ratio": 0.5, "rows": rows})
    assert t["mae"] == pytest.approx(0.02)  # settled half only: (0.01 + 0.03) / 2
    assert t["within_band"] == pytest.approx(0.5)
    assert t["bias"] == pytest.approx(-0.01)
    assert t["init_error"] == pytest.approx(0.4)  # per layer: each layer is 0.4 off at step 1
    assert aggregate.mean_spread([1.0, 3.0]) == (2.0, pytest.approx(2**0.5))


@pytest.mark.slow
def test_quick_study_writes_report_and_controller_beats_lbal(tmp_path):
    name = "study_test"
    cmd = [
        sys.executable,
        "-m",
        "experiments.study",
        "--quick",
        "--arms=k4_rho05,k4_rho05_ctrl",
        "--seeds=1",
        "--steps=60",
        f"--out={tmp_path}",
        f"--workdir={tmp_path / 'runs'}",
        f"--name={name}",
    ]
    env = {**os.environ, "PYTHONPATH": REPO}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    md = (tmp_path / f"{name}.md").read_text()
    assert "python -m experiments.study --quick" in md
    for heading in ("## Paper claims", "## All arms", "## Routing", "## Null-ratio controller"):
        assert heading in md
    figs = tmp_path / name
    for png in ("frontier.png", "null_ratio.png", "controller.png", "modality.png"):
        assert (figs / png).stat().st_size > 1000, png
    summ = json.loads((figs / "summary.json").read_text())["arms"]
    ctrl, lbal = summ["k4_rho05_ctrl"], summ["k4_rho05"]
    # Seed 0, 60 steps: per step about 0.04 vs 0.07, 10-step mean about 0.03 vs 0.05.
    assert ctrl["track_mae"][0] < lbal["track_mae"][0]
    assert ctrl["track_mae_window"][0] < lbal["track_mae_window"][0]
    assert ctrl["track_mae_window"][0] < 0.05


@pytest.mark.slow
def test_quick_study_v2_reports_paired_se_resumes_and_starts_calibrated(tmp_path):
    """study_v2 --quick: the write-up has the seed-paired differences with their SE; a rerun
    with --reuse trains nothing and renders the same report; the calibrated arm starts at
    1 - rho (step 1) where the paper's recipe does not."""
    name = "v2_test"
    cmd = [
        sys.executable,
        "-m",
        "experiments.study_v2",
        "--quick",
        "--arms=k4_rho05,k4_rho05_v2",
        "--seeds=2",
        "--steps=12",
        f"--out={tmp_path}",
        f"--workdir={tmp_path / 'runs'}",
        f"--name={name}",
    ]
    env = {**os.environ, "PYTHONPATH": REPO}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    md = (tmp_path / f"{name}.md").read_text()
    assert "## Power: seed-paired held-out loss differences" in md
    assert "| K^4_0.5 + calibration + PI - K^4_0.5 | 2 |" in md
    runs = tmp_path / "runs" / name
    assert sorted(p.name for p in runs.iterdir()) == [
        "k4_rho05_s0",
        "k4_rho05_s1",
        "k4_rho05_v2_s0",
        "k4_rho05_v2_s1",
    ]
    before = {p: p.stat().st_mtime_ns for p in runs.glob("*/result.json")}
    proc = subprocess.run(
        [*cmd, "--reuse"], cwd=REPO, env=env, capture_output=True, text=True, timeout=400
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "held-out loss" not in proc.stdout  # no run was trained again
    assert {p: p.stat().st_mtime_ns for p in runs.glob("*/result.json")} == before
    assert (tmp_path / f"{name}.md").read_text() == md
    summ = json.loads((tmp_path / name / "summary.json").read_text())["arms"]
    assert summ["k4_rho05_v2"]["track_init_error"][0] < 0.02
    assert summ["k4_rho05"]["track_init_error"][0] > 0.1


def test_pystdlib_corpus_is_split_by_file_and_checked():
    """kind "pystdlib": train and held-out windows come from disjoint files of this Python's
    Lib/ (no held-out window occurs in the train stream); bad sizes and fields name the field."""
    from moe_jax.data import DataConfig, make_source, pystdlib

    files = pystdlib.list_files()
    held = [f for f in files if pystdlib.is_heldout(f)]
    assert 0.03 < len(held) / len(files) < 0.3
    assert not any(f.startswith("test/") or "site-packages" in f for f in files)
    cfg = DataConfig(kind="pystdlib", text_len=64, batch_size=2, n_eval=8)
    train, ev = make_source(cfg, "train"), make_source(cfg, "eval")
    root = pystdlib.stdlib_dir()
    for split, names in (("train", [f for f in files if f not in held]), ("eval", held)):
        size = sum(os.path.getsize(os.path.join(root, f)) for f in names)
        assert len(pystdlib.split_stream(split)) == size + 2 * len(names)  # bos file eos ...
    eval_bytes = pystdlib.split_stream("eval").astype(np.uint16).tobytes()
    starts = []
    for i in range(len(ev)):
        w = ev[i]
        assert (w["targets"][:-1] == w["tokens"][1:]).all()
        at = eval_bytes.find(w["tokens"].astype(np.uint16).tobytes())
        assert at >= 0 and at % 2 == 0, i  # every held-out window is held-out text
        starts.append(at // 2)
    assert starts == sorted(starts) and starts[-1] > len(eval_bytes) // 4  # spread over it
    assert len(train) > 100 * len(ev)
    for bad, field in (
        ({"n_eval": 10**9}, "n_eval"),
        ({"n_train": 10**9}, "n_train"),
    ):
        with pytest.raises(ValueError, match=field):
            make_source(DataConfig(kind="pystdlib", text_len=64, batch_size=2, **bad), "train")
            make_source(DataConfig(kind="pystdlib", text_len=64, batch_size=2, **bad), "eval")
    with pytest.raises(ValueError, match="tokenizer"):
        DataConfig(kind="pystdlib", tokenizer="word")
    with pytest.raises(ValueError, match="paths"):
        DataConfig(kind="pystdlib", paths=("a.txt",))


def test_byte_classes():
    from experiments.lm_analysis import CLASSES, byte_classes
    from moe_jax.data import ByteTokenizer

    text = "if x_1 == 20:\n\tpass\xe9"
    ids = ByteTokenizer().encode(text, bos=True)[None]  # [1, L]
    got = "".join("wpdkio"[c] for c in byte_classes(ids)[0])
    # bos, i f, ' ', x _ 1, ' ', = =, ' ', 2 0, :, \n \t, p a s s, two bytes of e-acute
    assert got == "o" + "kk" + "w" + "iid" + "w" + "pp" + "w" + "dd" + "p" + "ww" + "kkkk" + "oo"
    assert len(CLASSES) == 6


def test_quick_study_lm_writes_report_and_null_knob_moves_compute(tmp_path):
    """study_lm --quick, one calibrated null arm: the write-up has its sections; shifting the
    null selection bias at eval moves the realized experts per token monotonically (more
    null slots, fewer real experts) without retraining; --reuse-only trains nothing."""
    from experiments import study_lm

    name = "lm_test"
    args = [
        "--quick",
        "--arms=k4_rho05_v2",
        f"--out={tmp_path}",
        f"--workdir={tmp_path / 'runs'}",
        f"--name={name}",
    ]
    study_lm.main(args)
    md = (tmp_path / f"{name}.md").read_text()
    for heading in ("## Power", "## All arms", "## Where the compute goes", "## Eval-time"):
        assert heading in md
    summ = json.loads((tmp_path / name / "summary.json").read_text())
    knob = [r for r in summ["knobs"] if r["knob"] == "null bias shift"]
    shifts = [r["value"] for r in knob]
    assert shifts == sorted(shifts) and len(knob) >= 5
    real = [r["real_per_token"] for r in knob]
    assert all(a >= b for a, b in zip(real, real[1:])), real
    assert real[0] > real[-1]
    assert (tmp_path / name / "knobs.png").stat().st_size > 1000
    result = tmp_path / "runs" / name / "k4_rho05_v2_s0" / "result.json"
    before = result.stat().st_mtime_ns
    study_lm.main([*args, "--reuse-only"])
    assert result.stat().st_mtime_ns == before
