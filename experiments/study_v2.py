"""Study v2: the paper's main claim (lower loss at lower rho at equal E[K]) at the default model
size, with paired seeds and every difference reported with its standard error.

    python -m experiments.study_v2                  # 6 arms x 2 seeds x 1500 steps (hours)
    python -m experiments.study_v2 --reuse          # resume: runs with a result.json are kept
    python -m experiments.study_v2 --seeds 3 --reuse   # add a seed to a finished study
    python -m experiments.study_v2 --quick          # CI size: tiny model, 60 steps

Runs go seed-major (seed 0 of every arm, then seed 1, ...), so an interrupted study still has
complete seed pairs, and the write-up (<out>/<name>.md, figures in <out>/<name>/) is rendered
after every seed round. Arms: dense FFN of equal active FLOPs, K^2_1.0, K^4_0.5 and K^8_0.25 with the
paper's recipe (L_bal alone moves the null logit), and K^4_0.5 and K^8_0.25 with the first-batch
null calibration and the pi null-ratio controller (moe.null_calibrate, moe.null_controller).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import time

import numpy as np

from experiments import aggregate, arms, figures, report, runner
from moe_jax.train.config import from_config_dict

ARMS = ("dense", "k2_rho1", "k4_rho05", "k8_rho025", "k4_rho05_v2", "k8_rho025_v2")
PAIRS = (  # (arm, baseline): the differences the study is about
    ("k4_rho05", "k2_rho1"),
    ("k8_rho025", "k2_rho1"),
    ("k8_rho025", "k4_rho05"),
    ("k4_rho05_v2", "k4_rho05"),
    ("k4_rho05_v2", "k2_rho1"),
    ("k8_rho025_v2", "k8_rho025"),
    ("dense", "k2_rho1"),
)
RESOLUTION = 0.01  # the study aims for 2 SE below this in held-out loss


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the CI-size preset (a few minutes)")
    p.add_argument("--arms", default=",".join(ARMS), help="comma-separated arms, in run order")
    p.add_argument("--seeds", type=int, default=None, help="seeds per arm (preset default)")
    p.add_argument("--steps", type=int, default=None, help="steps per run (preset default)")
    p.add_argument("--out", default="docs/results", help="folder of the write-up")
    p.add_argument("--name", default=None, help="write-up name (default study_v2[_quick])")
    p.add_argument("--workdir", default="runs/study", help="run folders (git-ignored)")
    p.add_argument("--reuse", action="store_true", help="skip runs that have a result.json")
    return p.parse_args(argv)


def paired_se(a: dict, b: dict, key: str = "eval_loss") -> tuple[float, float, int]:
    """Seed-paired difference a - b over the seeds both arms have: (mean, standard error, n)."""
    n = min(len(a["per_seed"][key]), len(b["per_seed"][key]))
    d = np.asarray(a["per_seed"][key][:n], np.float64) - np.asarray(b["per_seed"][key][:n])
    se = float(d.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
    return float(d.mean()), se, n


def _expected_flops(arm: arms.Arm, preset: arms.Preset) -> float:
    cfg = from_config_dict(arms.make_config(arm, preset, 0).to_dict())
    return runner.train_flops(cfg, None)


def run_study(a) -> str:
    preset = arms.resized("v2_quick" if a.quick else "v2", a.seeds, a.steps)
    selected = [s for s in a.arms.split(",") if s]
    unknown = sorted(set(selected) - set(arms.ARMS_BY_NAME))
    if unknown:
        raise SystemExit(f"--arms: unknown {unknown}; known {list(arms.ARMS_BY_NAME)}")
    name = a.name or ("study_v2_quick" if a.quick else "study_v2")
    workdir = os.path.join(a.workdir, name)
    runs: dict[str, list[dict]] = {n: [] for n in selected}
    t0 = time.perf_counter()
    md = ""
    for seed in range(preset.seeds):
        for arm_name in selected:
            wd = os.path.join(workdir, f"{arm_name}_s{seed}")
            cached = os.path.join(wd, "result.json")
            if a.reuse and os.path.exists(cached):
                with open(cached, encoding="utf-8") as f:
                    res = json.load(f)
            else:
                cfg = arms.make_config(arms.ARMS_BY_NAME[arm_name], preset, seed)
                res = runner.run_one(cfg, wd, keep_maps=4 * (seed == 0))
                print(
                    f"[{time.perf_counter() - t0:6.0f}s] {arm_name} seed {seed}: held-out loss "
                    f"{res['eval_loss']:.4f} ({res['run_seconds']:.0f}s, "
                    f"{1e3 * res['sec_per_step']:.0f} ms/step)",
                    flush=True,
                )
            runs[arm_name].append(res)
        md = write(a, preset, name, {k: v for k, v in runs.items() if v})
    return md


def write(a, preset: arms.Preset, name: str, runs: dict) -> str:
    summ = {n: aggregate.summarize(rs) for n, rs in runs.items()}
    fig_dir = os.path.join(a.out, name)
    figs = figures.write_all(runs, summ, fig_dir, ("k4_rho05", "k4_rho05_v2", "k8_rho025"))
    expected = {n: _expected_flops(arms.ARMS_BY_NAME[n], preset) for n in runs}
    seconds = sum(r.get("run_seconds", 0.0) for rs in runs.values() for r in rs)
    with open(os.path.join(fig_dir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(
            {"preset": dataclasses.asdict(preset), "seconds": seconds, "arms": summ}, f, indent=1
        )
    text = markdown(a, preset, name, summ, expected, figs, seconds)
    path = os.path.join(a.out, f"{name}.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def _power_lines(summ: dict, pairs: tuple = PAIRS) -> list[str]:
    """The power table: each (arm, baseline) pair's seed-paired held-out loss difference."""
    rows, reached = [], []
    for arm, base in pairs:
        if arm not in summ or base not in summ:
            continue
        d, se, n = paired_se(summ[arm], summ[base])
        ok = n > 1 and 2 * se < RESOLUTION
        sig = n > 1 and abs(d) > 2 * se
        reached.append(ok)
        need = math.ceil((2 * se * math.sqrt(n) / RESOLUTION) ** 2) if n > 1 else None
        rows.append(
            [
                f"{report._label(arm)} - {report._label(base)}",
                str(n),
                f"{d:+.4f}",
                f"{se:.4f}" if n > 1 else "-",
                "yes" if ok else "no",
                ("beyond 2 SE" if sig else "within 2 SE") if n > 1 else "one seed",
                "-" if need is None else str(max(need, 2)),
            ]
        )
    head = [
        "held-out loss difference (seed-paired)",
        "seeds",
        "mean",
        "SE",
        f"2 SE < {RESOLUTION}",
        "verdict",
        f"seeds for 2 SE < {RESOLUTION} at this paired spread",
    ]
    return report._table(head, rows)


def _arms_lines(summ: dict, expected: dict) -> list[str]:
    rows = []
    for n, s in summ.items():
        rows.append(
            [
                report._label(n),
                str(s["seeds"]),
                report._f(s["eval_loss"], 4),
                report._f(s["final_train_loss"], 4),
                report._f(s["train_real_per_token"], 2),
                report._f(s["real_per_token"], 2),
                f"{s['train_flops'][0] / 1e12:.3f}",
                f"{expected[n] / 1e12:.3f}",
                f"{1e3 * s['sec_per_step'][0]:.0f}",
            ]
        )
    head = [
        "arm",
        "seeds",
        "held-out loss",
        "train loss (last 10)",
        "real experts/token (training, whole run)",
        "real experts/token (held-out)",
        "training TFLOPs, realized",
        "training TFLOPs, expected (E[K])",
        "ms/step",
    ]
    return report._table(head, rows)


def markdown(a, preset, name, summ, expected, figs, seconds) -> str:
    p = preset
    tokens = p.batch_size * ((p.image_size // p.patch_size) ** 2 + p.text_len)
    cmd = "python -m experiments.study_v2" + (" --quick" if a.quick else "")
    seeds_done = min(s["seeds"] for s in summ.values())
    return "\n".join(
        [
            f"# Null experts at the default model size, with power ({name})",
            "",
            f"Reproduce with `{cmd}` (resume an interrupted study with `--reuse`; add seeds with "
            "`--seeds N --reuse`). The earlier small-scale study is kept in study.md.",
            "",
            f"Compute: {seconds / 60:.0f} min of training and held-out analysis on "
            f"{platform.machine()} with {os.cpu_count()} CPU cores shared with other jobs; "
            f"{seeds_done} complete seed pair(s) of {p.seeds} planned.",
            "",
            "## Setup",
            "",
            f"- Model: the default decoder, D={p.d_model}, {p.n_layers} blocks, every FFN an MoE "
            f"layer of N=8 experts of F={p.expert_d_ff}; dense d_ff={2 * p.expert_d_ff} (equal "
            "active FLOPs to E[K]=2 experts).",
            f"- Data: shapes scenes {p.image_size}x{p.image_size} in {p.patch_size}x{p.patch_size} "
            f"patches + {p.text_len} caption tokens; {p.num_steps} steps x {p.batch_size} "
            f"sequences ({tokens} tokens/step, {tokens * p.num_steps / 1e6:.2f}M tokens per run); "
            f"AdamW lr {p.lr:g} cosine, warmup {p.warmup_steps}.",
            "- Seeds: seed s sets the initialization and the train order of every arm alike, so "
            "differences are paired by seed; SE = sample std of the paired differences / "
            "sqrt(seeds). Held-out: the same "
            f"{p.eval_batches * p.batch_size} scenes for every run.",
            "- The K^4_0.5 and K^8_0.25 arms use the paper's recipe (moe.null_calibrate=False, "
            "no controller); the +calibration+PI arms use the library defaults plus "
            f"moe.null_bias_update_rate={arms.PI_RATE:g} (pi controller, integral gain in units of "
            "the real router logits' spread, L_bal kept over all N+M slots).",
            "",
            "## Power: seed-paired held-out loss differences",
            "",
            *_power_lines(summ),
            "",
            "## All arms (mean ± sample std over seeds)",
            "",
            *_arms_lines(summ, expected),
            "",
            "## Routing (held-out)",
            "",
            *report.routing_table(summ),
            "",
            "## Null-ratio tracking",
            "",
            *report.controller_table(summ),
            "",
            "## Figures",
            "",
            *[f"![{f}]({name}/{f})" for f in figs],
            "",
        ]
    )


def main(argv=None) -> None:
    a = parse_args(argv)
    print(f"wrote {run_study(a)}", flush=True)


if __name__ == "__main__":
    main()
