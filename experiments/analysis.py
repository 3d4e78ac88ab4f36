"""Held-out loss and per-token routing from one jitted forward pass.

``heldout(cfg, graphdef, params, rest)`` runs the eval split once: the next-token loss and, for
every MoE layer, the expert ids each token picked (the model's opt-in routing output,
moe_jax.model.forward_with_routing, returned from the jitted forward). From the ids it derives the per-token
numbers the study reports: real experts per vision / text token, each modality's share of
MoE compute, tokens with zero real experts, and shape (foreground) vs background patches.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
from flax import nnx

from moe_jax import data as data_lib
from moe_jax import model as model_lib
from moe_jax.train.config import TrainConfig

PAD = 0  # text pad id (moe_jax.data): pad positions are left out of every routing statistic


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, params, rest, batch):
    """(loss sum, target count, [expert ids [T, S] per MoE layer]) of one held-out batch."""
    model = nnx.merge(graphdef, params, rest)
    (logits, _), calls = model_lib.forward_with_routing(
        model, batch["tokens"], batch.get("image"), deterministic=True
    )
    loss, count = model_lib.cross_entropy(logits, batch["targets"], batch["loss_mask"])
    return loss * count, count, [ids for ids, _ in calls]


def real_counts(ids_per_layer: list, num_experts: int, batch_size: int) -> np.ndarray:
    """[layers, B, P+L] number of real experts each token used in each MoE layer."""
    return np.stack(
        [(np.asarray(ids) < num_experts).sum(-1).reshape(batch_size, -1) for ids in ids_per_layer]
    )


def heldout(cfg: TrainConfig, graphdef, params, rest, *, keep_maps: int = 0) -> dict:
    """Held-out loss and routing statistics over cfg.log.eval_batches eval batches.

    keep_maps: return the real-experts-per-patch maps (mean over layers) and images of this
    many held-out scenes for the routing heatmap.
    """
    moe, p = cfg.moe, cfg.model.num_patches
    loss_sum = count = 0.0
    counts, vision, text, fg, images = [], [], [], [], []
    for i, batch in enumerate(data_lib.make_dataset(cfg.data, "eval")):
        if i >= cfg.log.eval_batches:
            break
        ls, c, ids = _forward(graphdef, params, rest, batch)
        loss_sum, count = loss_sum + float(ls), count + float(c)
        if moe is None:
            continue
        b = batch["tokens"].shape[0]
        counts.append(real_counts(ids, moe.num_experts, b))  # [layers, B, P+L]
        is_vis = np.zeros((b, p + batch["tokens"].shape[1]), bool)
        is_vis[:, :p] = True
        is_txt = np.concatenate([np.zeros((b, p), bool), batch["tokens"] != PAD], axis=1)
        vision.append(is_vis)
        text.append(is_txt)
        if p:
            fg.append(batch["patch_fg"])
            images.append(batch["image"])
    out = {"eval_loss": loss_sum / max(count, 1.0)}
    if moe is None or not counts:
        return out
    cnt = np.concatenate(counts, axis=1)  # [layers, B_all, P+L]
    vis, txt = np.concatenate(vision), np.concatenate(text)  # [B_all, P+L]
    out.update(routing_stats(cnt, vis, txt, moe.top_k if moe.router == "null" else None))
    if p:
        out.update(patch_stats(cnt[:, :, :p], np.concatenate(fg), moe))
        if keep_maps:
            out["maps"] = cnt[:, :keep_maps, :p].mean(0).tolist()
            out["map_images"] = np.concatenate(images)[:keep_maps].tolist()
    return out


def routing_stats(cnt: np.ndarray, vis: np.ndarray, txt: np.ndarray, k: int | None) -> dict:
    """cnt [layers, B, S] real experts per token; vis / txt [B, S] masks (pads in neither).

    real_per_token_{vision,text}: mean over layers and tokens of the modality;
    vision_compute_share: vision's share of all real (token, expert) assignments, next to
    vision_token_share, the share it would have if every token got the same number;
    zero_real_{all,vision,text}: share of (layer, token) pairs with no real expert;
    null_ratio_{all,vision,text}: 1 - real/K for the null router (K slots per token).
    """
    used = vis | txt
    real_vis, real_txt = cnt[:, vis].sum(), cnt[:, txt].sum()
    out = {
        "real_per_token": float(cnt[:, used].mean()),
        "real_per_token_vision": float(cnt[:, vis].mean()) if vis.any() else float("nan"),
        "real_per_token_text": float(cnt[:, txt].mean()),
        "vision_compute_share": float(real_vis / max(real_vis + real_txt, 1)),
        "vision_token_share": float(vis.sum() / used.sum()),
        "zero_real_all": float((cnt[:, used] == 0).mean()),
        "zero_real_vision": float((cnt[:, vis] == 0).mean()) if vis.any() else float("nan"),
        "zero_real_text": float((cnt[:, txt] == 0).mean()),
    }
    if k is not None:
        for key in ("all", "vision", "text"):
            src = "real_per_token" if key == "all" else f"real_per_token_{key}"
            out[f"null_ratio_{key}"] = 1.0 - out[src] / k
    return out


def patch_stats(cnt_patches: np.ndarray, fg: np.ndarray, moe) -> dict:
    """Real experts (and null rate for the null router) on shape vs background patches.

    cnt_patches [layers, B, P]; fg [B, P] True where a patch touches a shape.
    """
    out = {
        "real_per_patch_fg": float(cnt_patches[:, fg].mean()) if fg.any() else float("nan"),
        "real_per_patch_bg": float(cnt_patches[:, ~fg].mean()) if (~fg).any() else float("nan"),
        "fg_patch_share": float(fg.mean()),
    }
    if moe.router == "null":
        out["null_rate_fg"] = 1.0 - out["real_per_patch_fg"] / moe.top_k
        out["null_rate_bg"] = 1.0 - out["real_per_patch_bg"] / moe.top_k
    return out
