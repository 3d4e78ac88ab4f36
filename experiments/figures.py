"""The study's PNG figures (matplotlib, Agg backend). Each function takes the per-arm runs
{arm name: [run result per seed]} and writes one file."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from experiments import aggregate  # noqa: E402
from experiments.arms import ARMS_BY_NAME, CONTROLLER_BASELINE  # noqa: E402
from moe_jax.train import plots  # noqa: E402


def _save(fig, path: str) -> str:
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def write_all(runs: dict, summ: dict, fig_dir: str, heatmap_arms: tuple[str, ...]) -> list[str]:
    """Every study figure into fig_dir (routing heatmaps for the listed arms that kept maps);
    returns the file names written, in order."""
    os.makedirs(fig_dir, exist_ok=True)
    figs = {
        "frontier.png": lambda p: frontier(runs, summ, p),
        "loss_curves.png": lambda p: loss_curves(runs, p),
        "null_ratio.png": lambda p: null_ratio(runs, p),
        "controller.png": lambda p: controller(runs, p),
        "modality.png": lambda p: modality(summ, p),
    }
    for arm_name in heatmap_arms:
        if arm_name in runs and "maps" in runs[arm_name][0]:
            k = (
                summ[arm_name]["k_slots"]
                if summ[arm_name]["target_null_ratio"] is not None
                else None
            )
            figs[f"heatmap_{arm_name}.png"] = lambda p, n=arm_name, k=k: heatmap(runs[n][0], p, k)
    for fname, fn in figs.items():
        fn(os.path.join(fig_dir, fname))
    return list(figs)


def frontier(runs: dict, summ: dict, path: str) -> str:
    """Held-out loss against training FLOPs, mean ± spread over seeds; the fixed-k_max family
    (K^4 at rho 1, 0.67, 0.5) joined by a line."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    family = [n for n in ("k4_rho1", "k4_rho067", "k4_rho05") if n in summ]
    if len(family) > 1:
        xs = [summ[n]["train_flops"][0] for n in family]
        ys = [summ[n]["eval_loss"][0] for n in family]
        ax.plot(xs, ys, "-", color="0.6", lw=1, label="K^4, rho 1 → 0.67 → 0.5")
    for name, s in summ.items():
        if ARMS_BY_NAME[name].group == "controller":
            continue
        (x, _), (y, dy) = s["train_flops"], s["eval_loss"]
        ax.errorbar(x, y, yerr=dy, fmt="o", capsize=3, label=ARMS_BY_NAME[name].label)
    ax.set_xlabel("training FLOPs (3 x forward, MoE at realized experts/token)")
    ax.set_ylabel("held-out next-token loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def null_ratio(runs: dict, path: str) -> str:
    """Realized null ratio (mean over layers and seeds) over training, targets dashed."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, rs in runs.items():
        target = rs[0].get("target_null_ratio")
        if target is None or ARMS_BY_NAME[name].group == "controller":
            continue
        steps, vals = aggregate.curves(rs, "null_ratio")
        (line,) = ax.plot(steps, vals, lw=1, label=ARMS_BY_NAME[name].label)
        ax.axhline(target, color=line.get_color(), ls="--", lw=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("realized null ratio (dashed: 1 - rho)")
    ax.set_ylim(-0.02, 1.0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def controller(runs: dict, path: str) -> str:
    """Per-layer realized null ratio with and without the controller (seed 0), target ± band."""
    pairs = [(c, b) for c, b in CONTROLLER_BASELINE.items() if c in runs and b in runs]
    fig, axes = plt.subplots(1, max(len(pairs), 1), figsize=(6 * max(len(pairs), 1), 4))
    for ax, (ctrl, base) in zip(np.atleast_1d(axes), pairs):
        target = runs[ctrl][0]["target_null_ratio"]
        for name, color in ((base, "tab:orange"), (ctrl, "tab:blue")):
            rows = runs[name][0]["rows"]
            steps = [r["step"] for r in rows]
            per_layer = np.asarray([r["null_ratio"] for r in rows])  # [steps, layers]
            for i in range(per_layer.shape[1]):
                label = ARMS_BY_NAME[name].label if i == 0 else None
                ax.plot(steps, per_layer[:, i], color=color, lw=0.7, alpha=0.8, label=label)
        band = aggregate.BAND
        ax.axhspan(target - band, target + band, color="k", alpha=0.12, label=f"1-rho ± {band}")
        ax.set_title(f"rho = {1 - target:.2f} (one line per MoE layer, seed 0)", fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("realized null ratio")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


def modality(summ: dict, path: str) -> str:
    """Real experts per vision / text token and vision's share of MoE compute per arm."""
    names = [n for n, s in summ.items() if np.isfinite(s["real_per_token_vision"][0])]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    x = np.arange(len(names))
    for off, key, label in (
        (-0.2, "real_per_token_vision", "vision"),
        (0.2, "real_per_token_text", "text"),
    ):
        a1.bar(
            x + off,
            [summ[n][key][0] for n in names],
            0.4,
            yerr=[summ[n][key][1] for n in names],
            label=label,
        )
    a1.set_ylabel("real experts per token (held-out)")
    a2.bar(
        x,
        [100 * summ[n]["vision_compute_share"][0] for n in names],
        0.6,
        label="vision share of MoE compute",
    )
    a2.plot(
        x,
        [100 * summ[n]["vision_token_share"][0] for n in names],
        "k_",
        ms=20,
        label="vision share of tokens",
    )
    a2.set_ylabel("%")
    for ax in (a1, a2):
        ax.set_xticks(
            x,
            [ARMS_BY_NAME[n].label.split(" (")[0] for n in names],
            rotation=40,
            ha="right",
            fontsize=8,
        )
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
    return _save(fig, path)


def loss_curves(runs: dict, path: str) -> str:
    """Training loss (seed mean, 10-step moving average) of every arm but the controller arms."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, rs in runs.items():
        if ARMS_BY_NAME[name].group == "controller":
            continue
        steps, vals = aggregate.curves(rs, "loss")
        w = min(10, len(vals))
        smooth = np.convolve(vals, np.ones(w) / w, mode="valid")
        ax.plot(steps[w - 1 :], smooth, lw=1, label=ARMS_BY_NAME[name].label)
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (10-step mean)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def heatmap(run: dict, path: str, k_slots: int | None) -> str:
    """Held-out images and their real-experts-per-patch maps (mean over layers)."""
    maps = np.asarray(run["maps"])  # [n, P]
    side = int(round(np.sqrt(maps.shape[1])))
    images = np.asarray(run["map_images"], np.float32)
    return plots.plot_routing_heatmap(images, maps.reshape(-1, side, side), path, vmax=k_slots)
