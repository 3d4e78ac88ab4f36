"""Study LM: the paper's main claim (lower loss at lower rho at equal E[K]) on real text, a
byte-level LM on the running interpreter's standard library (moe_jax.data.pystdlib), with
paired seeds; then, on the trained checkpoints, where the compute goes per byte class and the
null router's eval-time compute knob next to top-k's k and XMoE's threshold.

    python -m experiments.study_lm                 # 10 arms x 2 seeds x 600 steps (~30 min, 2 cores)
    python -m experiments.study_lm --reuse         # resume: runs with a result.json are kept
    python -m experiments.study_lm --reuse-only    # write up the finished runs, train nothing
    python -m experiments.study_lm --seeds 4 --reuse   # add seeds to a finished study
    python -m experiments.study_lm --arms xmoe --seeds 1 --reuse   # add XMoE's t_eval knob
    python -m experiments.study_lm --quick         # CI size: tiny model, a few steps

Runs go seed-major like study_v2 (complete seed pairs first); after training, every run's
checkpoint is analyzed (lm_analysis: byte classes and eval-time knobs, cached in
<run>/analysis.json) and the write-up is rendered (<out>/<name>.md, figures and summary.json
in <out>/<name>/, the hand-written reading from experiments/study_lm_notes.md when present).
Arms at E[K] = 2 active experts of width F: K^2_1.0, K^4_0.5 and K^8_0.25 with the first-batch
calibration and the pi null-ratio controller, K^8_0.25 with the paper's recipe, top-2, and the
dense FFN of equal active FLOPs (d_ff = 2F), XMoE (t=0.9 over 32 experts of F/4); and the
rho frontier at k_max = 4 (K^4 at rho 1, 2/3 and 1/2, the paper's recipe).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time

import numpy as np

from experiments import aggregate, arms, figures, report, runner, study_v2

LM_ARMS_BY_NAME = arms.ARMS_BY_NAME
ARMS = (  # E[K] = 2 family first, then the rho frontier at k_max = 4, then XMoE
    *("k2_rho1", "k4_rho05_v2", "k8_rho025_v2", "k8_rho025", "topk", "dense"),
    *("k4_rho1", "k4_rho067", "k4_rho05", "xmoe"),
)
PAIRS = (  # (arm, baseline): the differences the study is about
    ("k4_rho05_v2", "k2_rho1"),
    ("k8_rho025_v2", "k2_rho1"),
    ("k8_rho025_v2", "k4_rho05_v2"),
    ("k8_rho025", "k2_rho1"),
    ("k8_rho025_v2", "k8_rho025"),
    ("k4_rho05_v2", "k4_rho05"),
    ("xmoe", "k2_rho1"),
    ("topk", "k2_rho1"),
    ("dense", "k2_rho1"),
    ("k4_rho067", "k4_rho1"),
    ("k4_rho05", "k4_rho1"),
)
NOTES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "study_lm_notes.md")
# the hand-written reading of the full study, inserted into its write-up when present


@dataclasses.dataclass(frozen=True)
class LMPreset:
    """Model, data and budget sizes shared by every arm of one study_lm run."""

    name: str
    d_model: int  # D
    n_layers: int  # decoder blocks (every block is an MoE block)
    n_heads: int  # attention heads
    n_kv_heads: int  # key/value heads
    expert_d_ff: int  # F of a full expert; dense d_ff = 2F (E[K]=2), XMoE experts F/4
    text_len: int  # bytes per row
    batch_size: int  # sequences per step
    num_steps: int  # optimizer steps per run
    warmup_steps: int  # linear lr warmup
    lr: float  # peak learning rate (cosine decay)
    seeds: int  # seeds per arm
    eval_batches: int  # held-out batches for loss, routing and the knob sweeps


PRESETS = {
    "lm": LMPreset("lm", 64, 3, 4, 2, 64, 128, 16, 600, 40, 3e-3, 2, 16),
    "lm_quick": LMPreset("lm_quick", 16, 1, 2, 1, 16, 32, 4, 8, 1, 1e-2, 1, 2),
}


def make_config(arm: arms.Arm, p: LMPreset, seed: int):
    """The ConfigDict of one run: the arm's variant of configs/default.py as a text-only LM on
    kind "pystdlib", resized to the preset, for ``seed`` (init and train order)."""
    c = arms.make_config(arm, _as_v2_preset(p), seed)
    c.model.mode = "lm"
    d = c.data
    d.kind, d.text_len, d.batch_size = "pystdlib", p.text_len, p.batch_size
    d.n_eval = p.batch_size * p.eval_batches
    return c


def _as_v2_preset(p: LMPreset) -> arms.Preset:
    """The arms.Preset that arms.make_config resizes a variant with (image fields unused)."""
    return arms.Preset(
        p.name,
        p.d_model,
        p.n_layers,
        p.n_heads,
        p.n_kv_heads,
        p.expert_d_ff,
        32,
        4,
        p.text_len,
        3,
        p.batch_size,
        p.num_steps,
        p.warmup_steps,
        p.lr,
        p.seeds,
        p.eval_batches,
    )


def resized(name: str, seeds: int | None = None, steps: int | None = None) -> LMPreset:
    """PRESETS[name] with the command line's seeds and steps (warmup at most steps / 8)."""
    p = PRESETS[name]
    over = {k: v for k, v in (("seeds", seeds), ("num_steps", steps)) if v is not None}
    if "num_steps" in over:
        over["warmup_steps"] = min(p.warmup_steps, max(over["num_steps"] // 8, 1))
    return dataclasses.replace(p, **over)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the CI-size preset (seconds)")
    p.add_argument("--arms", default=",".join(ARMS), help="comma-separated arms, in run order")
    p.add_argument("--seeds", type=int, default=None, help="seeds per arm (preset default)")
    p.add_argument("--steps", type=int, default=None, help="steps per run (preset default)")
    p.add_argument("--out", default="docs/results", help="folder of the write-up")
    p.add_argument("--name", default=None, help="write-up name (default study_lm[_quick])")
    p.add_argument("--workdir", default="runs/study", help="run folders (git-ignored)")
    p.add_argument("--reuse", action="store_true", help="skip runs that have a result.json")
    p.add_argument("--no-write", action="store_true", help="train only (no write-up)")
    p.add_argument(
        "--reuse-only", action="store_true", help="train nothing: write up the finished runs"
    )
    return p.parse_args(argv)


def _cfg(arm_name: str, preset: LMPreset, seed: int):
    """The validated TrainConfig of one run as runner.run_one trains it."""
    from moe_jax.train.config import from_config_dict

    config = make_config(LM_ARMS_BY_NAME[arm_name], preset, seed)
    return from_config_dict(runner._study_config(config))


def run_study(a) -> tuple[LMPreset, str, dict]:
    """Trains every (seed, arm) run seed-major; returns (preset, name, {arm: [result per
    seed]}), the write-up rendered after every seed round unless --no-write."""
    preset = resized("lm_quick" if a.quick else "lm", a.seeds, a.steps)
    selected = [s for s in a.arms.split(",") if s]
    unknown = sorted(set(selected) - set(LM_ARMS_BY_NAME))
    if unknown:
        raise SystemExit(f"--arms: unknown {unknown}; known {list(LM_ARMS_BY_NAME)}")
    name = a.name or ("study_lm_quick" if a.quick else "study_lm")
    workdir = os.path.join(a.workdir, name)
    runs: dict[str, list[dict]] = {n: [] for n in selected}
    t0 = time.perf_counter()
    for seed in range(preset.seeds):
        for arm_name in selected:
            wd = os.path.join(workdir, f"{arm_name}_s{seed}")
            cached = os.path.join(wd, "result.json")
            if not os.path.exists(cached) and a.reuse_only:
                continue
            if (a.reuse or a.reuse_only) and os.path.exists(cached):
                with open(cached, encoding="utf-8") as f:
                    res = json.load(f)
            else:
                cfg = make_config(LM_ARMS_BY_NAME[arm_name], preset, seed)
                res = runner.run_one(cfg, wd)
                print(
                    f"[{time.perf_counter() - t0:6.0f}s] {arm_name} seed {seed}: held-out loss "
                    f"{res['eval_loss']:.4f} ({res['run_seconds']:.0f}s, "
                    f"{1e3 * res['sec_per_step']:.0f} ms/step)",
                    flush=True,
                )
            runs[arm_name].append(res)
    return preset, name, {k: v for k, v in runs.items() if v}


def analyze_all(a, preset: LMPreset, name: str, runs: dict) -> dict:
    """lm_analysis.analyze of every run (cached in <run>/analysis.json under --reuse)."""
    from experiments import lm_analysis  # local: keeps `--no-write` training runs light

    out = {}
    for arm_name, rs in runs.items():
        out[arm_name] = []
        for seed in range(len(rs)):
            wd = os.path.join(a.workdir, name, f"{arm_name}_s{seed}")
            path = os.path.join(wd, "analysis.json")
            if (a.reuse or a.reuse_only) and os.path.exists(path):
                with open(path, encoding="utf-8") as f:
                    res = json.load(f)
            else:
                res = lm_analysis.analyze(_cfg(arm_name, preset, seed), wd)
                with open(path, "w", encoding="utf-8") as f:
                    json.dump(res, f)
            out[arm_name].append(res)
    return out


def _mean(values) -> float:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else float("nan")


def class_lines(an: dict) -> list[str]:
    """Two tables: real experts per byte by byte class (MoE arms with a variable count), and
    next-byte loss by byte class (every arm); means over seeds."""
    from experiments.lm_analysis import CLASSES

    first = next(iter(an.values()))[0]["by_class"]
    share = ["share of held-out bytes", *[f"{100 * first[c]['tokens']:.1f}%" for c in CLASSES]]
    rows, loss_rows = [share], []
    for arm_name, items in an.items():
        label = report._label(arm_name)
        real = [_mean([i["by_class"][c]["real"] for i in items]) for c in CLASSES]
        comp = [_mean([i["by_class"][c]["compute"] for i in items]) for c in CLASSES]
        if arm_name not in ("dense", "xmoe", "topk", "k2_rho1"):
            rows.append([label, *[f"{r:.2f} ({100 * s:.0f}%)" for r, s in zip(real, comp)]])
        loss = [_mean([i["by_class"][c]["loss"] for i in items]) for c in CLASSES]
        loss_rows.append([label, *[f"{v:.3f}" for v in loss]])
    head = ["real experts per byte (share of MoE compute)", *CLASSES]
    out = report._table(head, rows) + [""]
    return out + report._table(["next-byte loss at bytes of each class", *CLASSES], loss_rows)


def knob_rows(an: dict) -> list[dict]:
    """One row per (arm, knob value): seed means of loss, real experts/token and MoE FLOPs;
    the as-trained point of every arm too."""
    rows = []
    for arm_name, items in an.items():
        rows.append(
            {
                "arm": arm_name,
                "knob": "as trained",
                "value": None,
                "seeds": len(items),
                **{
                    k: _mean([i["base"][k] for i in items])
                    for k in ("loss", "real_per_token", "moe_flops")
                },
            }
        )
        for j, r in enumerate(items[0]["knob"]):
            pts = [i["knob"][j] for i in items if len(i["knob"]) > j]
            rows.append(
                {
                    "arm": arm_name,
                    "knob": r["knob"],
                    "value": r["value"],
                    "seeds": len(pts),
                    **{
                        k: _mean([p[k] for p in pts])
                        for k in ("loss", "real_per_token", "moe_flops")
                    },
                }
            )
    return rows


def knob_lines(rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        if r["knob"] == "as trained" and r["arm"] not in ("dense", "k2_rho1"):
            continue
        v = "-" if r["value"] is None else f"{r['value']:g}"
        real = "-" if not np.isfinite(r["real_per_token"]) else f"{r['real_per_token']:.2f}"
        out.append(
            [
                report._label(r["arm"]),
                r["knob"],
                v,
                str(r["seeds"]),
                f"{r['loss']:.4f}",
                real,
                f"{r['moe_flops'] / 1e6:.4f}",
            ]
        )
    head = [
        "arm",
        "eval-time knob",
        "value",
        "seeds",
        "held-out loss",
        "real experts/token",
        "MoE MFLOPs/token (realized)",
    ]
    return report._table(head, out)


def knob_figure(rows: list[dict], dense_flops: float | None, path: str) -> str:
    """Held-out loss against realized MoE FLOPs per token: one line per (arm, knob)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for arm_name in dict.fromkeys(r["arm"] for r in rows):
        pts = [r for r in rows if r["arm"] == arm_name and r["knob"] != "as trained"]
        base = next(r for r in rows if r["arm"] == arm_name and r["knob"] == "as trained")
        x0 = base["moe_flops"] if base["moe_flops"] else dense_flops
        if pts:
            pts = sorted(pts, key=lambda r: r["moe_flops"])
            (ln,) = ax.plot(
                [p["moe_flops"] / 1e6 for p in pts],
                [p["loss"] for p in pts],
                "o-",
                ms=3,
                label=f"{report._label(arm_name)}: {pts[0]['knob']}",
            )
            ax.plot([x0 / 1e6], [base["loss"]], "*", ms=10, color=ln.get_color())
        elif x0:
            ax.plot([x0 / 1e6], [base["loss"]], "s", label=report._label(arm_name))
    ax.set_xlabel("realized MoE-layer MFLOPs per token (forward, router included)")
    ax.set_ylabel("held-out next-byte loss")
    ax.set_title("eval-time knobs (star: as trained)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return figures._save(fig, path)


def null_bias_figure(runs: dict, path: str) -> str:
    """Seed 0 of the calibrated arms: the null logit's selection bias per layer over training
    (left) and the 10-step-mean null-ratio error (right)."""
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4))
    for arm_name, rs in runs.items():
        rows = [r for r in rs[0]["rows"] if "null_bias" in r]
        if not rows:
            continue
        steps = [r["step"] for r in rows]
        b = np.asarray([r["null_bias"] for r in rows])  # [steps, layers]
        err = np.asarray([r["null_ratio"] for r in rows]).mean(1) - rs[0]["target_null_ratio"]
        w = min(10, len(err))
        (ln,) = a1.plot(steps, b[:, 0], lw=0.8, label=report._label(arm_name))
        for i in range(1, b.shape[1]):
            a1.plot(steps, b[:, i], lw=0.8, color=ln.get_color())
        a2.plot(
            steps[w - 1 :],
            np.convolve(err, np.ones(w) / w, "valid"),
            lw=0.8,
            color=ln.get_color(),
            label=report._label(arm_name),
        )
    a1.set_xlabel("step")
    a1.set_ylabel("null selection bias b (one line per layer)")
    a2.set_xlabel("step")
    a2.set_ylabel("null ratio - (1 - rho), 10-step mean")
    for ax in (a1, a2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return figures._save(fig, path)


def write(a, preset: LMPreset, name: str, runs: dict, an: dict) -> str:
    """<out>/<name>.md, its figures and summary.json under <out>/<name>/."""
    from moe_jax.data import pystdlib

    summ = {n: aggregate.summarize(rs) for n, rs in runs.items()}
    fig_dir = os.path.join(a.out, name)
    os.makedirs(fig_dir, exist_ok=True)
    rows = knob_rows(an)
    dense = runner._moe_flops(_cfg("dense", preset, 0), None)  # the dense FFN
    figs = {
        "frontier.png": lambda p: figures.frontier(runs, summ, p),
        "loss_curves.png": lambda p: figures.loss_curves(runs, p),
        "null_ratio.png": lambda p: figures.null_ratio(runs, p),
        "controller.png": lambda p: figures.controller(runs, p),
        "null_bias.png": lambda p: null_bias_figure(runs, p),
        "knobs.png": lambda p: knob_figure(rows, dense, p),
    }
    for fname, fn in figs.items():
        fn(os.path.join(fig_dir, fname))
    expected = {n: runner.train_flops(_cfg(n, preset, 0), None) for n in runs}
    seconds = sum(r.get("run_seconds", 0.0) for rs in runs.values() for r in rs)
    corpus = pystdlib.describe_corpus()
    with open(os.path.join(fig_dir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(
            {
                "preset": dataclasses.asdict(preset),
                "seconds": seconds,
                "corpus": corpus,
                "arms": summ,
                "knobs": rows,
                "by_class": {n: [i["by_class"] for i in items] for n, items in an.items()},
            },
            f,
            indent=1,
        )
    notes = ""
    if not a.quick and os.path.exists(NOTES):
        with open(NOTES, encoding="utf-8") as f:
            notes = f.read().strip()
    text = markdown(a, preset, name, summ, expected, list(figs), seconds, corpus, an, rows, notes)
    path = os.path.join(a.out, f"{name}.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def markdown(a, preset, name, summ, expected, figs, seconds, corpus, an, rows, notes) -> str:
    p = preset
    tokens = p.batch_size * p.text_len
    cmd = "python -m experiments.study_lm" + (" --quick" if a.quick else "")
    seeds = sorted({s["seeds"] for s in summ.values()})
    return "\n".join(
        [
            f"# Null experts on real text: a byte-level LM on Python's standard library ({name})",
            "",
            f"Generated by `{cmd}` (resume with `--reuse`; add seeds with `--seeds N --reuse`; "
            "`--reuse-only` renders from the finished runs). The caption-task studies are "
            "study_v2.md and study.md.",
            "",
            f"Compute: {seconds / 60:.0f} min of training and held-out analysis on "
            f"{platform.machine()} with {os.cpu_count()} CPU cores shared with other jobs; "
            f"seeds per arm: {', '.join(map(str, seeds))} ({p.seeds} planned).",
            "",
            *([notes, ""] if notes else []),
            "## Setup",
            "",
            f'- Data: `DataConfig(kind="pystdlib")`, the `*.py` files of Python '
            f"{corpus['python']}'s Lib/ (tests and site-packages left out) as UTF-8 bytes, split "
            f"by file (crc32 of the path): {corpus['train_files']} train files "
            f"({corpus['train_tokens'] / 1e6:.2f}M bytes), {corpus['eval_files']} held-out files "
            f"({corpus['eval_tokens'] / 1e6:.2f}M bytes). Held-out: the same "
            f"{p.eval_batches * p.batch_size} windows of {p.text_len} bytes for every run, spread "
            "over the held-out stream.",
            f"- Model: text-only decoder, D={p.d_model}, {p.n_layers} blocks, every FFN an MoE "
            f"layer of N=8 experts of F={p.expert_d_ff}; dense d_ff={2 * p.expert_d_ff} (equal "
            f"active FLOPs to E[K]=2 experts); XMoE 32 experts of F/4, t=0.9.",
            f"- Budget: {p.num_steps} steps x {p.batch_size} windows ({tokens} bytes/step, "
            f"{tokens * p.num_steps / 1e6:.2f}M bytes per run, under one epoch); AdamW lr "
            f"{p.lr:g} cosine, warmup {p.warmup_steps}.",
            "- Seeds: seed s sets the initialization and the train order of every arm alike, so "
            "differences are paired by seed; SE = sample std of the paired differences / "
            "sqrt(seeds).",
            "- K^8_0.25 is run both ways: the paper's recipe (L_bal alone moves the null logit) "
            "and ours (first-batch calibration + pi controller, moe.null_bias_update_rate="
            f"{arms.PI_RATE:g}); K^4_0.5 both ways too. Every run here is trained with the "
            "router fix of commit ffbce74: the controller's selection bias no longer enters the "
            "router probabilities (L_bal, z-loss), the defect this study traced as the cause of "
            "calibration + PI hurting K^8_0.25 in study_v2 (see the reading above; study_v2 "
            "itself was not rerun).",
            "- The rho frontier at k_max = 4: K^4_1.0, K^4_0.67 and K^4_0.5 (paper's recipe), "
            "E[K] = 4, 2.67 and 2.",
            "",
            "## Power: seed-paired held-out loss differences",
            "",
            *study_v2._power_lines(summ, PAIRS),
            "",
            "## All arms (mean ± sample std over seeds)",
            "",
            *study_v2._arms_lines(summ, expected),
            "",
            "## Null-ratio tracking",
            "",
            *report.controller_table(summ),
            "",
            "## Where the compute goes: byte classes (held-out, seed means)",
            "",
            *class_lines(an),
            "",
            "## Eval-time compute knobs (held-out, no retraining)",
            "",
            "Null router: the null logit's selection bias shifted by `value` in every MoE layer "
            "(positive: more null slots). Top-2: evaluated with k = `value`. XMoE: threshold "
            "t_eval = `value` (one seed). FLOPs are measured from the realized experts.",
            "",
            *knob_lines(rows),
            "",
            "## Figures",
            "",
            *[f"![{f}]({name}/{f})" for f in figs],
            "",
        ]
    )


def main(argv=None) -> None:
    a = parse_args(argv)
    preset, name, runs = run_study(a)
    if a.no_write:
        return
    an = analyze_all(a, preset, name, runs)
    print(f"wrote {write(a, preset, name, runs, an)}", flush=True)


if __name__ == "__main__":
    main()
