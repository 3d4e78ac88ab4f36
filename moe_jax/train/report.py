"""The closing report of a finished run: final eval figures, plots and the routing heatmap."""

from __future__ import annotations

import os

from moe_jax import data as data_lib
from moe_jax.train import metrics as metrics_lib
from moe_jax.train import plots
from moe_jax.train import workdir as workdir_lib


def finish(loop, graphdef, state, result: dict) -> None:
    """Plots and the closing report (printed and stored in result["report"]); process 0.
    The routing heatmap needs a forward pass of every process: one-process runs only."""
    if not loop.main:
        return
    cfg, lines = loop.cfg, []
    all_rows = metrics_lib.read_jsonl(loop.writer.path)
    rows, eval_rows = metrics_lib.last_rows_by_step(all_rows), metrics_lib.eval_rows(all_rows)
    ev = result["eval"]
    lines.append(f"train loss {loop.final_loss:.4f}, eval loss {ev['eval/loss']:.4f}")
    if "eval/null_ratio" in ev:  # every number below is from the final eval
        per_mod = ", ".join(
            f"{mod} {ev[f'eval/null_ratio/{mod}']:.2f}"
            for mod in metrics_lib.MODALITIES
            if f"eval/null_ratio/{mod}" in ev
        )
        target = f" (target {1 - cfg.moe.density:.2f})" if cfg.moe.router == "null" else ""
        lines.append(f"eval null ratio{target}: all {ev['eval/null_ratio']:.2f}; {per_mod}")
        lines.append(
            "eval real experts/token: "
            + ", ".join(
                f"{mod} {ev[f'eval/real_per_token/{mod}']:.2f}"
                for mod in metrics_lib.MODALITIES
                if f"eval/real_per_token/{mod}" in ev
            )
            + f"; eval MoE FLOPs/token realized "
            f"{ev['eval/flops_per_token/realized'] / 1e6:.2f}M "
            f"vs expected {ev['eval/flops_per_token/expected'] / 1e6:.2f}M"
        )
    if cfg.log.plots:
        written = [plots.plot_losses(rows + eval_rows, loop._path("loss.png"))]
        if "null_ratio" in (rows[-1] if rows else {}):
            rho = cfg.moe.density if cfg.moe.router == "null" else None
            written.append(plots.plot_null_ratio(rows, loop._path("null_ratio.png"), rho=rho))
        vlm = cfg.moe is not None and cfg.model.mode == "vlm"
        if vlm and cfg.log.heatmap_images and not loop.multi:
            written.append(_heatmap(loop, graphdef, state, lines))
        lines.append("plots: " + ", ".join(os.path.basename(p) for p in written))
    result["report"] = "\n".join(lines)
    workdir_lib.write_report(loop.workdir, result["report"])
    loop._print(result["report"])


def _heatmap(loop, graphdef, state, lines: list[str]) -> str:
    """Real experts per patch on held-out images; also reports shape vs background patches."""
    cfg = loop.cfg
    batch = next(iter(data_lib.make_dataset(cfg.data, "eval")))
    per_tok = plots.real_experts_per_token(
        loop.plain_graphdef, (state["params"], state["rest"]), batch["tokens"], batch["image"]
    )  # [B, P+L]
    p = cfg.model.num_patches
    side = cfg.data.image_size // cfg.data.patch_size
    patches = per_tok[:, :p]  # [B, P]
    fg = batch["patch_fg"]
    if fg.any() and (~fg).any():
        lines.append(
            f"real experts per patch: shapes {patches[fg].mean():.2f}, background "
            f"{patches[~fg].mean():.2f}; text tokens {per_tok[:, p:][batch['loss_mask']].mean():.2f}"
        )
    n = min(cfg.log.heatmap_images, patches.shape[0])
    return plots.plot_routing_heatmap(
        batch["image"][:n],
        patches[:n].reshape(n, side, side),
        loop._path("routing_heatmap.png"),
        vmax=float(cfg.moe.top_k) if cfg.moe.router in ("null", "topk") else None,
    )
