"""Per-arm aggregation over seeds (mean and spread) and the controller's tracking error."""

from __future__ import annotations

import math

import numpy as np

SETTLED_FROM = 0.5  # tracking error is measured over the steps after this share of training
BAND = 0.02  # the controller's target band: |realized null ratio - (1 - rho)| <= BAND
WINDOW = 10  # steps in the moving window of the smoothed tracking error


def mean_spread(values) -> tuple[float, float]:
    """(mean, sample std over seeds; 0 for one seed); NaN when no finite value is given."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], np.float64)
    if v.size == 0:
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def tracking(run: dict) -> dict | None:
    """Tracking error of the realized null ratio against 1 - rho for one run (null router).

    Per MoE layer (each layer has its own controller) over the settled steps: mae = mean
    |error| of the per-step (one batch) ratio; within_band = share of (step, layer) points with
    |error| <= BAND; mae_window / within_band_window: the same for the ratio averaged over a
    WINDOW-step moving window (batch sampling noise averaged out); bias = mean signed error;
    init_error = mean |error| over layers at step 1.
    """
    target = run.get("target_null_ratio")
    rows = [r for r in run["rows"] if "null_ratio" in r]
    if target is None or not rows:
        return None
    ratio = np.asarray([r["null_ratio"] for r in rows], np.float64)  # [steps, layers]
    start = int(len(rows) * SETTLED_FROM)
    err = ratio[start:] - target
    kernel = np.ones(WINDOW) / WINDOW
    smooth = np.stack(
        [np.convolve(ratio[:, i], kernel, mode="valid") for i in range(ratio.shape[1])], axis=1
    )  # [steps - WINDOW + 1, layers]; row j averages steps j .. j + WINDOW - 1
    err_w = smooth[max(start - WINDOW + 1, 0) :] - target
    return {
        "mae": float(np.abs(err).mean()),
        "within_band": float((np.abs(err) <= BAND).mean()),
        "mae_window": float(np.abs(err_w).mean()),
        "within_band_window": float((np.abs(err_w) <= BAND).mean()),
        "bias": float(err.mean()),
        "init_error": float(np.abs(ratio[0] - target).mean()),
        "final_ratio": float(ratio[-10:].mean()),
        "final_null_bias": float(np.mean(rows[-1]["null_bias"]))
        if "null_bias" in rows[-1]
        else 0.0,
    }


def xmoe_selection(run: dict) -> dict:
    """Experts a token selected before the capacity cut and the share dropped (training, last
    10% of steps, mean over layers)."""
    rows = [r for r in run["rows"] if "drop_fraction" in r]
    tail = rows[-max(1, len(rows) // 10) :]
    real = np.mean([np.mean(r["real_per_token"]) for r in tail])
    drop = np.mean([np.mean(r["drop_fraction"]) for r in tail])
    return {"kept": float(real), "drop": float(drop), "selected": float(real / max(1 - drop, 1e-9))}


SCALARS = (
    "eval_loss",
    "final_train_loss",
    "sec_per_step",
    "train_flops",
    "moe_flops_per_token",
    "train_real_per_token",
    "real_per_token",
    "real_per_token_vision",
    "real_per_token_text",
    "vision_compute_share",
    "vision_token_share",
    "zero_real_all",
    "zero_real_vision",
    "zero_real_text",
    "null_ratio_all",
    "null_ratio_vision",
    "null_ratio_text",
    "real_per_patch_fg",
    "real_per_patch_bg",
    "null_rate_fg",
    "null_rate_bg",
)


PAIRED = (  # kept per seed
    "eval_loss",
    "final_train_loss",
    "vision_compute_share",
    "real_per_patch_fg",
    "real_per_patch_bg",
)


def paired(a: dict, b: dict, key: str, key_b: str | None = None) -> tuple[float, float, bool]:
    """Seed-paired difference a - b of a per-seed metric of two summaries: (mean, sample std,
    counts). Seed s gives both arms the same train order, so pairing removes that shared part of
    the seed spread. It counts when |mean| > 2 standard errors (and at least 2 seeds)."""
    kb = key if key_b is None else key_b
    d = np.asarray(a["per_seed"][key], np.float64) - np.asarray(b["per_seed"][kb], np.float64)
    if d.size < 2:
        return float(d.mean()), 0.0, False
    sd = float(d.std(ddof=1))
    return float(d.mean()), sd, bool(abs(d.mean()) > 2 * sd / np.sqrt(d.size))


def summarize(runs: list[dict]) -> dict:
    """{metric: (mean, spread)} over the seeds of one arm, plus tracking and XMoE numbers."""
    out = {k: mean_spread([r.get(k) for r in runs]) for k in SCALARS}
    out["seeds"] = len(runs)
    out["per_seed"] = {k: [r.get(k) for r in runs] for k in PAIRED}
    out["target_null_ratio"] = runs[0].get("target_null_ratio")
    out["k_slots"] = runs[0].get("k_slots")
    tr = [t for t in (tracking(r) for r in runs) if t is not None]
    if tr:
        for k in tr[0]:
            out[f"track_{k}"] = mean_spread([t[k] for t in tr])
    if any("drop_fraction" in r for run in runs for r in run["rows"][-1:]):
        sel = [xmoe_selection(r) for r in runs]
        for k in sel[0]:
            out[f"sel_{k}"] = mean_spread([s[k] for s in sel])
    return out


def curves(runs: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, seed-mean of the layer-mean of ``key``) over training."""
    steps = np.asarray([r["step"] for r in runs[0]["rows"] if key in r])
    vals = np.asarray([[np.mean(r[key]) for r in run["rows"] if key in r] for run in runs])
    return steps, vals.mean(0)
