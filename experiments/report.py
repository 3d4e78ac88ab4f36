"""docs/results/<study>.md: tables of every arm (mean ± spread over seeds) and each paper claim
next to the number measured here, with a verdict from a stated rule."""

from __future__ import annotations

import math

from experiments import aggregate, arms
from experiments.arms import ARMS_BY_NAME, CONTROLLER_BASELINE


def _f(ms, digits: int = 3, pct: bool = False) -> str:
    """'mean ± spread' (or '-' when missing)."""
    m, s = ms
    if m is None or not math.isfinite(m):
        return "-"
    if pct:
        return f"{100 * m:.1f} ± {100 * s:.1f}%"
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def _sep(a, b) -> bool:
    """True when two (mean, spread) pairs differ by more than their combined seed spread."""
    return abs(a[0] - b[0]) > math.hypot(a[1], b[1])


def _label(name: str) -> str:
    return ARMS_BY_NAME[name].label


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return out + ["| " + " | ".join(r) + " |" for r in rows]


def arms_table(summ: dict) -> list[str]:
    rows = []
    base = summ.get("k2_rho1")
    for name, s in summ.items():
        delta = "-"
        if base is not None and name != "k2_rho1":
            d, sd, sig = aggregate.paired(s, base, "eval_loss")
            delta = f"{d:+.4f} ± {sd:.4f}{' *' if sig else ''}"
        rows.append(
            [
                _label(name),
                _f(s["eval_loss"], 4),
                delta,
                _f(s["final_train_loss"], 4),
                _f(s["real_per_token"], 2),
                f"{s['moe_flops_per_token'][0] / 1e3:.1f}k",
                f"{s['train_flops'][0] / 1e12:.3f}",
                f"{1e3 * s['sec_per_step'][0]:.0f} ± {1e3 * s['sec_per_step'][1]:.0f}",
            ]
        )
    return _table(
        [
            "arm",
            "held-out loss",
            "Δ held-out vs K^2_1.0 (seed-paired; * = beyond 2 SE)",
            "train loss (last 10 steps)",
            "real experts/token (held-out, per layer)",
            "FFN/MoE fwd FLOPs/token (all blocks)",
            "training TFLOPs",
            "ms/step",
        ],
        rows,
    )


def routing_table(summ: dict) -> list[str]:
    rows = []
    for name, s in summ.items():
        if s["k_slots"] is None:
            continue
        t = s["target_null_ratio"]
        rows.append(
            [
                _label(name),
                "-" if t is None else f"{t:.2f}",
                _f(s["null_ratio_all"], 3),
                _f(s["real_per_token_vision"], 2),
                _f(s["real_per_token_text"], 2),
                _f(s["vision_compute_share"], pct=True),
                _f(s["vision_token_share"], pct=True),
                _f(s["zero_real_all"], pct=True),
                _f(s["real_per_patch_fg"], 2),
                _f(s["real_per_patch_bg"], 2),
            ]
        )
    return _table(
        [
            "arm",
            "target null ratio",
            "held-out null ratio",
            "real experts / vision token",
            "real experts / text token",
            "vision share of MoE compute",
            "vision share of tokens",
            "tokens with 0 real experts",
            "real experts / shape patch",
            "real experts / background patch",
        ],
        rows,
    )


def controller_table(summ: dict) -> list[str]:
    rows, seen = [], set()
    for ctrl, base in CONTROLLER_BASELINE.items():
        for name in (base, ctrl):
            if name not in summ or "track_mae" not in summ[name] or name in seen:
                continue
            seen.add(name)
            s = summ[name]
            rows.append(
                [
                    _label(name),
                    f"{s['target_null_ratio']:.2f}",
                    _f(s["track_init_error"], 3),
                    _f(s["track_mae"], 4),
                    _f(s["track_within_band"], pct=True),
                    _f(s["track_mae_window"], 4),
                    _f(s["track_within_band_window"], pct=True),
                    _f(s["track_bias"], 4),
                    _f(s["eval_loss"], 4),
                ]
            )
    return _table(
        [
            "arm",
            "target 1-rho",
            "|error| at step 1",
            "MAE per step (one batch)",
            f"per-step points within ±{aggregate.BAND}",
            f"MAE of {aggregate.WINDOW}-step mean",
            f"{aggregate.WINDOW}-step-mean points within ±{aggregate.BAND}",
            "mean signed error",
            "held-out loss",
        ],
        rows,
    )


def claims(summ: dict) -> list[str]:
    """One bullet per paper claim: the paper's number, ours, and the verdict."""
    g = summ.get
    out = []
    rule = "(rule: a loss difference counts when its seed-paired mean exceeds 2 standard errors)"
    iso = [n for n in ("k2_rho1", "k4_rho05", "k8_rho025") if n in summ]
    if len(iso) == 3:
        for key, what in (("final_train_loss", "training loss"), ("eval_loss", "held-out loss")):
            vals = [summ[n][key][0] for n in iso]
            mono = vals[0] > vals[1] > vals[2]
            d, sd, sig = aggregate.paired(summ[iso[2]], summ[iso[0]], key)
            verdict = (
                "reproduces"
                if mono and sig
                else "direction matches, but within seed noise"
                if mono
                else "does not reproduce"
                + (" (opposite order, beyond seed noise)" if sig else " (within seed noise)")
            )
            nums = " → ".join(f"{_label(n).split(' ')[0]} {v:.4f}" for n, v in zip(iso, vals))
            out.append(
                f"- **{what.capitalize()} falls monotonically as rho decreases at E[K]=2** "
                f"(paper: yes). Here (seed means): {nums}; K^8_0.25 - K^2_1.0 paired by seed "
                f"{d:+.4f} ± {sd:.4f}. **{verdict}** {rule}."
            )
    if g("k2_rho1") and g("k4_rho05"):
        a, b = summ["k2_rho1"], summ["k4_rho05"]
        d, sd, sig = aggregate.paired(b, a, "eval_loss")
        verdict = (
            "reproduces"
            if d < 0 and sig
            else "direction matches, within seed noise"
            if d < 0
            else "does not reproduce"
        )
        out.append(
            "- **Data-sparse runs sit on a better loss-vs-FLOPs frontier** (paper: yes). At equal "
            f"expected FLOPs K^4_0.5 reaches {_f(b['eval_loss'], 4)} vs {_f(a['eval_loss'], 4)} for "
            f"K^2_1.0 (paired difference {d:+.4f} ± {sd:.4f}; realized training FLOPs "
            f"{b['train_flops'][0] / 1e12:.3f} vs {a['train_flops'][0] / 1e12:.3f} TFLOPs). "
            f"**{verdict}**. See frontier.png and the table for the fixed-k_max family."
        )
    nulls = [n for n in ("k4_rho05", "k8_rho025") if n in summ]
    if g("k2_rho1") and nulls:
        base = summ["k2_rho1"]["vision_compute_share"]
        parts = ", ".join(
            f"{_label(n)} {_f(summ[n]['vision_compute_share'], pct=True)}" for n in nulls
        )
        fell = all(
            _sep(summ[n]["vision_compute_share"], base)
            and summ[n]["vision_compute_share"][0] < base[0]
            for n in nulls
        )
        ratios = ", ".join(f"{summ[n]['vision_compute_share'][0] / base[0]:.2f}" for n in nulls)
        seeds = "; ".join(
            f"{_label(n)} per seed "
            + ", ".join(f"{100 * v:.0f}%" for v in summ[n]["per_seed"]["vision_compute_share"])
            for n in nulls
        )
        verdict = "direction reproduces" if fell else "does not reproduce beyond seed spread"
        out.append(
            "- **Vision tokens route to nulls more than text; vision share of MoE compute falls "
            f"74% → 36%** (paper; ratio 0.49). Here: K^2_1.0 {_f(base, pct=True)} (= its token "
            f"share) → {parts} (ratio {ratios}; {seeds}). **{verdict}**."
        )
        diffs = {
            n: aggregate.paired(summ[n], summ[n], "real_per_patch_fg", "real_per_patch_bg")
            for n in nulls
        }
        fg = ", ".join(
            f"{_label(n)}: shape {summ[n]['real_per_patch_fg'][0]:.2f} vs background "
            f"{summ[n]['real_per_patch_bg'][0]:.2f} (paired shape - background "
            f"{diffs[n][0]:+.2f} ± {diffs[n][1]:.2f})"
            for n in nulls
        )
        less = all(d[0] > 0 for d in diffs.values())
        sig = all(d[0] > 0 and d[2] for d in diffs.values())
        verdict = (
            "reproduces"
            if sig
            else "direction matches, within seed noise"
            if less
            else "does not reproduce"
        )
        out.append(
            "- **Background patches get less compute than salient ones** (paper: qualitative). "
            f"Real experts per patch, {fg}. **{verdict}**."
        )
    if g("k8_rho025"):
        z = summ["k8_rho025"]
        out.append(
            "- **Tokens with zero real experts: over 60% at K^12_0.17** (paper). We ran K^8_0.25 "
            f"(no K^12 arm): {_f(z['zero_real_all'], pct=True)} of (layer, token) pairs "
            f"(vision {_f(z['zero_real_vision'], pct=True)}, text {_f(z['zero_real_text'], pct=True)}). "
            "Not the same configuration; a direct check needs rho=1/6."
        )
    lbal = [n for n in ("k4_rho05", "k8_rho025") if n in summ and "track_mae" in summ[n]]
    if lbal:
        parts = "; ".join(
            f"{_label(n)}: {summ[n]['track_init_error'][0]:.3f} → "
            f"{summ[n]['track_mae_window'][0]:.3f} (final null ratio "
            f"{summ[n]['track_final_ratio'][0]:.3f} vs target {summ[n]['target_null_ratio']:.2f})"
            for n in lbal
        )
        conv = all(summ[n]["track_mae_window"][0] < summ[n]["track_init_error"][0] for n in lbal)
        out.append(
            "- **Realized null ratio converges toward 1-rho under L_bal; at init it does not** "
            f"(paper). Mean per-layer |error| at step 1 → settled ({aggregate.WINDOW}-step mean): "
            f"{parts}. **{'reproduces' if conv else 'does not reproduce'}** (met only on average, "
            "with a persistent offset: see the controller table)."
        )
    if g("xmoe") and g("k2_rho1"):
        x, t = summ["xmoe"], summ["k2_rho1"]
        red = 1 - x["moe_flops_per_token"][0] / t["moe_flops_per_token"][0]
        d, _, sig = aggregate.paired(x, t, "eval_loss")
        worse = d > 0 and sig
        ok = red > 0.5 and not worse
        out.append(
            "- **XMoE: over 50% fewer MoE-layer FLOPs than top-k without quality loss** (paper). "
            f"Threshold router selects {_f(x['sel_selected'], 1)} of 32 experts per token before "
            f"the capacity cut, keeps {_f(x['sel_kept'], 2)} (drop rate {_f(x['sel_drop'], pct=True)}); "
            f"MoE FLOPs/token {x['moe_flops_per_token'][0] / 1e3:.1f}k vs "
            f"{t['moe_flops_per_token'][0] / 1e3:.1f}k for top-2 (K^2_1.0): {100 * red:.0f}% "
            f"reduction; held-out loss {_f(x['eval_loss'], 4)} vs {_f(t['eval_loss'], 4)}. "
            f"**{'reproduces' if ok else 'does not reproduce'}**. The router stays close to "
            "uniform at this scale, so t=0.9 keeps most experts and the capacity cap, not the "
            "threshold, sets the compute (the saving comes from that cap and GELU vs SwiGLU)."
        )
    if g("dense"):
        moe_arms = [n for n in summ if n != "dense" and ARMS_BY_NAME[n].group != "controller"]
        best = min(moe_arms, key=lambda n: summ[n]["eval_loss"][0]) if moe_arms else None
        if best:
            d, sd, sig = aggregate.paired(summ[best], summ["dense"], "eval_loss")
            out.append(
                f"- **MoE vs a dense FFN of equal active FLOPs** (context, not a paper claim): the "
                f"best MoE arm, {_label(best)}, is {d:+.4f} ± {sd:.4f} from the dense FFN "
                f"({_f(summ['dense']['eval_loss'], 4)}), {'beyond' if sig else 'within'} seed "
                "noise. At this size and token budget the MoE arms have no measurable advantage."
            )
    for ctrl, base in CONTROLLER_BASELINE.items():
        if ctrl in summ and base in summ and "track_mae" in summ[ctrl]:
            c, b = summ[ctrl], summ[base]
            band = aggregate.BAND
            ok_w = (
                c["track_mae_window"][0] <= band
                and c["track_mae_window"][0] < b["track_mae_window"][0]
            )
            ok_s = c["track_mae"][0] <= band
            verdict = (
                "met per step"
                if ok_s
                else f"met on the {aggregate.WINDOW}-step mean, not per batch"
                if ok_w
                else "not met"
            )
            better = (
                "reduces"
                if c["track_mae_window"][0] < b["track_mae_window"][0]
                else "does not reduce"
            )
            out.append(
                f"- **Controller (beyond the paper), rho={1 - c['target_null_ratio']:.2f}: realized "
                f"null ratio within ±{band} of 1-rho after warm-up.** MAE of the "
                f"{aggregate.WINDOW}-step mean {_f(c['track_mae_window'], 4)} vs "
                f"{_f(b['track_mae_window'], 4)} with L_bal alone "
                f"({_f(c['track_within_band_window'], pct=True)} vs "
                f"{_f(b['track_within_band_window'], pct=True)} of points in the band); per step "
                f"(one batch) {_f(c['track_mae'], 4)} vs {_f(b['track_mae'], 4)}; mean signed error "
                f"{c['track_bias'][0]:+.4f} vs {b['track_bias'][0]:+.4f}; held-out loss "
                f"{_f(c['eval_loss'], 4)} vs {_f(b['eval_loss'], 4)}. The controller {better} the "
                f"tracking error; target **{verdict}**. A per-batch ratio also carries sampling "
                "noise of the batch's content that a bias set before the batch cannot cancel. "
                f"Null-logit bias at the end {c['track_final_null_bias'][0]:+.2f} (mean over "
                "layers): with L_bal kept, the balance loss answers the extra null picks the bias "
                "causes by lowering the learned null logit, so the two pull against each other and "
                f"u={arms.CONTROLLER_RATE:g} per step can fall behind the optimizer's moves."
            )
    if g("dense") and g("k8_rho025"):
        out.append(
            "- **FLOPs savings as time savings.** ms/step: "
            + ", ".join(
                f"{_label(n).split(' (')[0]} {1e3 * s['sec_per_step'][0]:.0f}"
                for n, s in summ.items()
            )
            + ". On this CPU at these sizes the router (top-k over N+M slots, sorting, "
            "gather/scatter) costs more than the expert matmuls it saves, so fewer FLOPs do not "
            "show up as less time; the expected FLOPs are matched by construction instead."
        )
    out.append(
        "- **Downstream evals peak near rho ≈ 0.5 and fall below the baseline at 0.25** (paper): "
        "not tested; this study has no downstream evaluation, only held-out next-token loss."
    )
    return out
