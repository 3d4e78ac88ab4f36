"""Inference-compute curves: trained checkpoints evaluated at eval-time thresholds and capacities.

Each --run is ``<config arg>@<workdir>`` of a run trained with
``python train.py --config=configs/default.py:<config arg> --workdir=<workdir>`` (plus the same
--set overrides as --config.<key>=<value>). The latest complete checkpoint of every run is
evaluated on the held-out split at each point its router supports (moe_jax.train.sweep.points_for):
t_eval x gamma_eval for the threshold router, capacity_eval_topk for top-k, one point for the
null router. Held-out loss goes against measured MoE-layer FLOPs per token, normalized to the
first run's full compute (every expert on every token: the t = 1.0 dense compute of a
dense-to-sparse model). Writes <out>.md (table, plot, commands), <out>.png and <out>.json.

    python experiments/eval_sweep.py \
      --run=xmoe_dense@workdir/inference_compute/xmoe_dense \
      --run=default@workdir/inference_compute/default --run=topk@workdir/inference_compute/topk \
      --t_eval=1.0,0.95,0.9,0.8,0.7,0.5 --gamma_eval=16,8,4,2 --capacity_eval_topk=train,2,1 \
      --out=docs/results/inference_compute
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import json
import os
import shlex
import sys

from absl import app, flags, logging

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_RUN = flags.DEFINE_multi_string("run", [], "<config arg>@<workdir> of a trained run; repeat.")
_SET = flags.DEFINE_multi_string("set", [], "<key.path>=<value> override for every run config.")
_CONFIG_FILE = flags.DEFINE_string(
    "config_file", os.path.join(ROOT, "configs", "default.py"), "File with get_config(arg)."
)
_T_EVAL = flags.DEFINE_string("t_eval", "1.0,0.95,0.9,0.8,0.7,0.5", "Thresholds (threshold).")
_GAMMA = flags.DEFINE_string(
    "gamma_eval", "train", "Capacity factors (threshold); 'train' = as trained."
)
_CAP_TOPK = flags.DEFINE_string(
    "capacity_eval_topk", "train", "Capacity factors for top-k runs; 'train' = as trained."
)
_EVAL_BATCHES = flags.DEFINE_integer("eval_batches", 0, "Held-out batches (0 = whole split).")
_REPORT_ONLY = flags.DEFINE_bool(
    "report_only", False, "Rewrite <out>.md/.png from <out>.json without evaluating."
)
_NOTES = flags.DEFINE_string("notes", None, "Markdown file inserted as the report's notes.")
_OUT = flags.DEFINE_string(
    "out", os.path.join("docs", "results", "inference_compute"), "Output path without suffix."
)


def _floats(text: str) -> tuple[float | None, ...]:
    out = []
    for item in (s.strip() for s in text.split(",")):
        if item:
            out.append(None if item == "train" else float(item))
    return tuple(out)


def load_config(config_file: str, arg: str, overrides: list[str]):
    """get_config(arg) from ``config_file`` with ``key.path=value`` overrides applied."""
    spec = importlib.util.spec_from_file_location("_sweep_config", config_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config(arg)
    for item in overrides:
        path, _, text = item.partition("=")
        if not _:
            raise ValueError(f"--set={item!r} must look like key.path=value")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        node = c
        *parents, leaf = path.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def _row_cells(r: dict) -> list[str]:
    f = lambda v: "-" if v is None else f"{v:g}"  # noqa: E731
    return [
        r["model"],
        r["router"],
        f(r["t_eval"]),
        f(r["gamma_eval"]),
        f"{r['loss']:.4f}",
        f"{r['real_per_token']:.2f}",
        f"{r['drop_fraction']:.3f}",
        f"{r['moe_flops'] / 1e6:.3f}",
        f"{r['normalized_flops']:.3f}",
    ]


def plot(rows: list[dict], path: str) -> str:
    """Held-out loss against normalized MoE FLOPs: one line per (model, gamma_eval)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        key = (r["model"], r["gamma_eval"] if r["router"] == "threshold" else None)
        groups.setdefault(key, []).append(r)
    top_gamma = {}  # t labels go on each threshold model's largest-gamma line only
    for model, gamma in groups:
        top_gamma[model] = max(top_gamma.get(model) or 0.0, gamma or 0.0)
    for (model, gamma), rs in groups.items():
        rs = sorted(rs, key=lambda r: r["normalized_flops"])
        label = model if gamma is None else f"{model} (gamma_eval={gamma:g})"
        ax.plot([r["normalized_flops"] for r in rs], [r["loss"] for r in rs], "o-", label=label)
        for r in rs if gamma is None or gamma == top_gamma[model] else ():
            tag = f"t={r['t_eval']:g}" if r["t_eval"] is not None else ""
            if r["router"] != "threshold" and r["gamma_eval"] is not None:
                tag = f"c={r['gamma_eval']:g}"
            if tag:
                ax.annotate(tag, (r["normalized_flops"], r["loss"]), fontsize=7, alpha=0.7)
    ax.set_xlabel("measured MoE-layer FLOPs per token / full (t=1.0) dense compute")
    ax.set_ylabel("held-out loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _commands(runs, overrides) -> list[str]:
    """The training commands of the runs and this sweep's command, rebuilt from the flags."""
    sets = "".join(f" --config.{o}" for o in overrides)
    lines = [
        f"python train.py --config=configs/default.py:{arg} --workdir={wd}{sets}"
        for arg, wd in runs
    ]
    args = [f"--run={r}" for r in _RUN.value] + [f"--set={o}" for o in overrides]
    args += [f"--t_eval={_T_EVAL.value}", f"--gamma_eval={_GAMMA.value}"]
    args += [f"--capacity_eval_topk={_CAP_TOPK.value}", f"--eval_batches={_EVAL_BATCHES.value}"]
    args += [f"--notes={_NOTES.value}"] * bool(_NOTES.value) + [f"--out={_OUT.value}"]
    lines.append(" \\\n  ".join(["python experiments/eval_sweep.py", *map(shlex.quote, args)]))
    return lines


def _reading(rows: list[dict], tol: float = 0.01) -> list[str]:
    """Per model: loss at its most expensive point, the cheapest point within ``tol`` (relative)
    of that loss, and the loss at its cheapest point."""
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        rs = [r for r in rows if r["model"] == model]
        top = max(rs, key=lambda r: r["normalized_flops"])
        ok = [r for r in rs if r["loss"] <= top["loss"] * (1 + tol)]
        cheap = min(ok, key=lambda r: r["normalized_flops"])
        low = min(rs, key=lambda r: r["normalized_flops"])
        knobs = lambda r: f"t_eval={r['t_eval']}, gamma_eval={r['gamma_eval']}"  # noqa: E731
        out.append(
            f"- `{model}`: loss {top['loss']:.4f} at {top['normalized_flops']:.3f} normalized "
            f"FLOPs ({knobs(top)}); within {tol:.0%} of it down to "
            f"{cheap['normalized_flops']:.3f} ({knobs(cheap)}, loss {cheap['loss']:.4f}); "
            f"cheapest point {low['normalized_flops']:.3f} at loss {low['loss']:.4f}."
        )
    return out


def write_markdown(
    path: str, rows, runs_info, ref: dict, commands, png: str, notes: str = ""
) -> str:
    head = "| model | router | t_eval | gamma_eval | held-out loss | real experts/token | "
    head += "drop fraction | MoE MFLOPs/token | normalized FLOPs |"
    lines = [
        "# Inference compute: held-out loss against measured MoE FLOPs",
        "",
        "Generated by `experiments/eval_sweep.py` (do not edit by hand; rerun the commands).",
        "Every point is one trained checkpoint evaluated on the whole held-out split in eval mode "
        "(deterministic=True, the routing that training's eval and KV-cache decoding use) with "
        "only the eval-time threshold `t_eval` and capacity factor `gamma_eval` changed. FLOPs "
        "are measured: realized real experts per token of each MoE layer through "
        "`flops.moe_flops_per_token`, summed over MoE layers (router included, forward only). "
        f"They are normalized by {ref['flops'] / 1e6:.3f} MFLOPs/token, the full compute of "
        f"`{ref['model']}` (all {ref['n']} experts on every token, i.e. its t = 1.0 dense "
        "compute). `gamma_eval` for top-k is its capacity factor c (per-expert capacity "
        "ceil(c*T/N)); `-` means dropless.",
        "",
        "The dense-to-sparse recipe (train the threshold router at t = 1.0 with gamma >= N, "
        "then lower t at inference) is **our reconstruction** of the XMoE paper's procedure, "
        "not its code; treat it as experimental.",
        "",
        "## Runs",
        "",
    ]
    for info in runs_info:
        lines.append(
            f"- `{info['model']}`: {info['summary']}; checkpoint step {info['step']} in "
            f"`{info['workdir']}`"
        )
    lines += ["", "## Results", "", head, "|" + "---|" * 9]
    lines += ["| " + " | ".join(_row_cells(r)) + " |" for r in rows]
    lines += ["", f"![loss vs normalized FLOPs]({os.path.basename(png)})", ""]
    lines += ["## Reading (computed from the table)", ""] + _reading(rows) + [""]
    if notes:
        lines += [notes.strip(), ""]
    lines += ["## Commands", "", "```"] + commands + ["```", ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


def _runs() -> list[tuple[str, str]]:
    runs = []
    for spec in _RUN.value:
        arg, sep, wd = spec.rpartition("@")
        if not sep or not wd:
            raise app.UsageError(f"--run={spec!r} must look like <config arg>@<workdir>")
        runs.append((arg, wd))
    return runs


def main(argv) -> None:
    logging.set_verbosity(logging.WARNING)  # keep orbax's per-restore INFO lines off the console
    from moe_jax import model as model_lib
    from moe_jax.train import sweep
    from moe_jax.train.config import from_config_dict

    if not _RUN.value:
        raise app.UsageError("give at least one --run=<config arg>@<workdir>")
    runs = _runs()
    t_evals = tuple(t for t in _floats(_T_EVAL.value) if t is not None)
    out = _OUT.value
    rows, runs_info, ref = [], [], None
    if _REPORT_ONLY.value:  # rewrite the report from the rows of an earlier sweep
        with open(out + ".json") as f:
            saved = json.load(f)
        rows, runs_info, ref = saved["rows"], saved["runs"], saved["reference"]
        runs = []
    for arg, wd in runs:
        cfg = from_config_dict(load_config(_CONFIG_FILE.value, arg, _SET.value))
        cfg = dataclasses.replace(
            cfg, log=dataclasses.replace(cfg.log, eval_batches=_EVAL_BATCHES.value)
        )
        name = arg or "default"
        if ref is None:
            n = cfg.moe.num_experts if cfg.moe is not None else 0
            ref = {"model": name, "flops": sweep.full_compute_flops(cfg), "n": n}
            if not ref["flops"]:
                raise app.UsageError("the first --run must be an MoE model (the reference)")
        step, _, state = sweep.restore(cfg, wd)
        router = "dense" if cfg.moe is None else cfg.moe.router
        gammas = _floats(_CAP_TOPK.value if router in ("topk", "switch") else _GAMMA.value)
        points = sweep.points_for(cfg.moe, t_evals, gammas)
        for r in sweep.sweep(cfg, state, points, name=name):
            rows.append({**r, "normalized_flops": r["moe_flops"] / ref["flops"], "step": step})
        summary = model_lib.format_summary(cfg.model).splitlines()[0].removeprefix("model: ")
        runs_info.append({"model": name, "summary": summary, "step": step, "workdir": wd})
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    png = plot(rows, out + ".png")
    with open(out + ".json", "w") as f:
        json.dump({"reference": ref, "runs": runs_info, "rows": rows}, f, indent=1)
    notes = ""
    if _NOTES.value:
        with open(_NOTES.value) as f:
            notes = f.read()
    md = write_markdown(
        out + ".md", rows, runs_info, ref, _commands(_runs(), _SET.value), png, notes
    )
    print(f"wrote {md}, {png}, {out}.json", flush=True)


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    app.run(main)
