"""PNG plots written to the workdir at the end of training.

Figures are drawn with matplotlib's object API (matplotlib.figure.Figure), never through
pyplot, so no global backend is switched and notebook users keep theirs.

loss.png            train loss (and eval loss) over steps
null_ratio.png      realized null ratio per modality over training, with the target 1 - rho
routing_heatmap.png held-out images next to a map of real experts per patch (mean over layers)
"""

from __future__ import annotations

import functools
import os

import jax
import numpy as np
from flax import nnx
from matplotlib.figure import Figure

from moe_jax.model import forward_with_routing
from moe_jax.moe import MoE
from moe_jax.train.writes import writing


def _subplots(*args, figsize, **kwargs):
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(*args, **kwargs)


def plot_losses(rows: list[dict], path: str) -> str:
    """Train loss (and eval/loss where present) against step."""
    fig, ax = _subplots(figsize=(6, 4))
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1)
    ev = [(r["step"], r["eval/loss"]) for r in rows if "eval/loss" in r]
    if ev:
        ax.plot(*zip(*ev), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("next-token loss")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_null_ratio(rows: list[dict], path: str, *, rho: float | None = None) -> str:
    """Null ratio per modality (and overall) over training; dashed line at the target 1 - rho."""
    fig, ax = _subplots(figsize=(6, 4))
    for key, label in (
        ("null_ratio/vision", "vision tokens"),
        ("null_ratio/text", "text tokens"),
        ("null_ratio", "all tokens"),
    ):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        if pts:
            ax.plot(*zip(*pts), label=label, lw=1)
    if rho is not None:
        ax.axhline(1.0 - rho, color="k", ls="--", lw=1, label=f"target 1-rho = {1 - rho:.2f}")
    ax.set_xlabel("step")
    ax.set_ylabel("share of picked slots that are null")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_routing_heatmap(
    images: np.ndarray, real_per_patch: np.ndarray, path: str, *, vmax: float | None = None
) -> str:
    """Images [n, H, W, C] in one row, their real-experts-per-patch maps [n, h, w] below."""
    n = images.shape[0]
    vmax = float(real_per_patch.max()) if vmax is None else vmax
    fig, axes = _subplots(2, n, figsize=(2.4 * n, 5), squeeze=False)
    im = None
    for i in range(n):
        axes[0, i].imshow(np.clip(images[i], 0, 1), interpolation="nearest")
        im = axes[1, i].imshow(real_per_patch[i], cmap="viridis", vmin=0, vmax=vmax)
        m = real_per_patch[i].mean()
        axes[1, i].set_title(f"mean {m:.2f}", fontsize=9)
        for ax in axes[:, i]:
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0, 0].set_ylabel("image")
    axes[1, 0].set_ylabel("real experts / patch")
    fig.colorbar(im, ax=axes[1, :].tolist(), shrink=0.8)
    return _save(fig, path)


def real_experts_per_token(graphdef, state, tokens, images) -> np.ndarray | None:
    """[B, P+L] real experts per token, averaged over MoE layers (eval-mode forward).

    ``graphdef, *state`` is the model split by nnx.split; the ids come from the model's opt-in
    routing output (model.forward_with_routing) under jax.jit."""
    ids, ns = _routing_ids(graphdef, tuple(state), tokens, images)
    if not ids:
        return None
    b = tokens.shape[0]
    per_layer = [(np.asarray(i) < n).sum(-1).reshape(b, -1) for i, n in zip(ids, ns)]
    return np.mean(np.stack(per_layer), axis=0)  # [B, P+L]


@functools.partial(jax.jit, static_argnums=0)
def _routing_ids_jit(graphdef, state, tokens, images):
    model = nnx.merge(graphdef, *state)
    _, calls = forward_with_routing(model, tokens, images, deterministic=True)
    return [ids for ids, _ in calls]


def _routing_ids(graphdef, state, tokens, images):
    """([expert ids [T, K]], [N]) per MoE layer; N read from the graph, not traced."""
    ids = _routing_ids_jit(graphdef, state, tokens, images)
    model = nnx.merge(graphdef, *state)
    ns = [m.config.num_experts for _, m in nnx.iter_graph(model) if isinstance(m, MoE)]
    return ids, ns


def _save(fig, path: str) -> str:
    with writing(path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fig.savefig(path, dpi=110, bbox_inches="tight")
    return path
