"""One study run: moe_jax's training loop (moe_jax.train.Loop) with a recording hook, then the
held-out analysis.

The hook records the routing statistics of every step (per MoE layer, so the controller's
tracking error is measured where it acts) and times the steady-state steps; the loop itself
is the one train.py runs, so every config option (grad_accum, schedules, the mesh) behaves the
same in the study.
"""

from __future__ import annotations

import json
import math
import os
import time

import numpy as np

from moe_jax import flops, train
from moe_jax.model import summary
from moe_jax.train import metrics as metrics_lib
from moe_jax.train.config import TrainConfig, from_config_dict

TIMING_SKIP = 10  # steps (compile and warm-up) left out of the wall-clock per step


def _step_row(step: int, m) -> dict:
    """Host copy of the metrics of one step: loss and the routing statistics per MoE layer."""
    host = metrics_lib.to_host(m)
    row = {"step": step, "loss": host["loss"]}
    layers = host["moe"]
    if layers:
        for key in ("null_ratio", "real_per_token", "zero_compute_fraction", "drop_fraction"):
            row[key] = [a[key] for a in layers]
        if "null_bias" in layers[0]:
            row["null_bias"] = [a["null_bias"] for a in layers]
        if "null_ratio_by_modality" in layers[0]:
            row["null_ratio_vision"] = float(
                np.mean([a["null_ratio_by_modality"][0] for a in layers])
            )
            row["null_ratio_text"] = float(
                np.mean([a["null_ratio_by_modality"][1] for a in layers])
            )
            row["real_vision"] = float(
                np.mean([a["real_per_token_by_modality"][0] for a in layers])
            )
            row["real_text"] = float(np.mean([a["real_per_token_by_modality"][1] for a in layers]))
    return row


def train_flops(cfg: TrainConfig, real_per_token: float | None) -> float:
    """Training FLOPs of the run: 3x the forward FLOPs (forward + backward) of every sequence,
    with the MoE layers counted at the measured real experts per token (None: at E[K])."""
    s = summary.model_summary(cfg.model)
    per_seq = s["flops_per_sequence"]
    moe = cfg.moe
    if moe is not None and real_per_token is not None:
        delta = flops.moe_flops_per_token(moe, real_per_token) - flops.moe_flops_per_token(moe)
        per_seq += s["sequence_len"] * len(cfg.model.moe_layers) * delta
    return 3.0 * per_seq * cfg.data.batch_size * cfg.num_steps


class _Recorder:
    """Loop hook: a host row of every step's metrics, the steady-state clock, the final state."""

    def __init__(self):
        self.rows, self.t_ref, self.t_end, self.final = [], None, None, None

    def on_step(self, step: int, m) -> None:
        self.rows.append(_step_row(step, m))
        now = time.perf_counter()
        if step == TIMING_SKIP:
            self.t_ref = now
        self.t_end = now

    def on_end(self, graphdef, state) -> None:
        self.final = (graphdef, state)


def _study_config(config):
    """The run's ConfigDict as the study trains it: moe_jax's loop with a checkpoint at the end
    only, a fresh start every time (--reuse works per run, on result.json), no TensorBoard,
    plots, progress bar or periodic evals (the held-out analysis runs afterwards)."""
    c = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    c["ckpt"] = {**c.get("ckpt", {}), "every_steps": 0, "keep": 1, "resume": False}
    c["log"] = {
        **c.get("log", {}),
        "tensorboard": False,
        "progress": False,
        "plots": False,
        "eval_every": 0,
    }
    return c


def run_one(config, workdir: str, *, keep_maps: int = 0) -> dict:
    """Trains one ConfigDict with moe_jax's training loop (every option of the config, e.g.
    grad_accum, applies) and returns its metrics (also written to <workdir>/result.json)."""
    from experiments import analysis  # local: keeps `python -m experiments.arms` light

    cfg = from_config_dict(_study_config(config))
    os.makedirs(workdir, exist_ok=True)
    rec = _Recorder()
    t0 = time.perf_counter()
    train.run(cfg, workdir, hooks=[rec])
    timed = cfg.num_steps - TIMING_SKIP
    sec_per_step = (
        (rec.t_end - rec.t_ref) / timed if rec.t_ref is not None and timed > 0 else math.nan
    )
    rows = rec.rows
    graphdef, state = rec.final
    train_seconds = time.perf_counter() - t0

    ev = analysis.heldout(cfg, graphdef, state["params"], state["rest"], keep_maps=keep_maps)
    real = [float(np.mean(r["real_per_token"])) for r in rows if "real_per_token" in r]
    result = {
        "name": cfg.name,
        "seed": cfg.seed,
        "steps": cfg.num_steps,
        "tokens_per_step": cfg.data.batch_size * (cfg.model.num_patches + cfg.data.text_len),
        "sec_per_step": sec_per_step,
        "train_seconds": train_seconds,
        "final_train_loss": float(np.mean([r["loss"] for r in rows[-10:]])),
        "train_real_per_token": float(np.mean(real)) if real else None,
        "train_flops": train_flops(cfg, float(np.mean(real)) if real else None),
        "moe_flops_per_token": _moe_flops(cfg, ev.get("real_per_token")),
        "target_null_ratio": 1.0 - cfg.moe.density if _is_null(cfg) else None,
        "k_slots": cfg.moe.top_k if cfg.moe is not None else None,
        "rows": rows,
        **ev,
    }
    result["run_seconds"] = time.perf_counter() - t0  # compile, training and held-out analysis
    with open(os.path.join(workdir, "result.json"), "w", encoding="utf-8") as f:
        json.dump(result, f)
    return result


def _is_null(cfg: TrainConfig) -> bool:
    return cfg.moe is not None and cfg.moe.router == "null"


def _moe_flops(cfg: TrainConfig, real_per_token: float | None) -> float:
    """Forward FFN/MoE FLOPs per token summed over blocks (router + realized experts; dense:
    the dense FFN)."""
    m = cfg.model
    if cfg.moe is None:
        return m.n_layers * flops.ffn_flops_per_token(m.d_model, m.d_ff)
    return len(m.moe_layers) * flops.moe_flops_per_token(cfg.moe, real_per_token)
