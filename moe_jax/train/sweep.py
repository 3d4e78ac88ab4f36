"""Inference-compute sweeps: one trained checkpoint evaluated at several eval-time routing knobs.

    step, graphdef, state = restore(cfg, workdir)        # latest complete checkpoint
    rows = sweep(cfg, state, points_for(cfg.moe, t_evals, gammas))
    ref = full_compute_flops(cfg)                        # FLOPs/token with every expert active

Each point replaces only MoEConfig.threshold_eval / capacity_factor_eval, rebuilds the graphdef
(the parameters are shared, untouched) and runs the held-out eval in eval mode
(deterministic=True), the mode that training's eval and KV-cache decoding use. The FLOPs of a
point are measured, not assumed: the realized real experts per token of every MoE layer, turned
into FLOPs by flops.moe_flops_per_token and summed over MoE layers.

Dense-to-sparse (XMoE's second claim; the procedure is our reconstruction of the paper's, not
its code): train with the threshold router at t = 1.0 and gamma >= N, so every token is
computed by every small expert weighted by its router probability (dense compute), then lower
t_eval (and gamma_eval) at inference to skip low-probability experts.
"""

from __future__ import annotations

import dataclasses
import math
import os

from flax import nnx

from moe_jax import model as model_lib
from moe_jax.core import flops
from moe_jax.core.config import MoEConfig
from moe_jax.train import step as train_step_lib
from moe_jax.train.checkpoint import Checkpointer
from moe_jax.train.config import TrainConfig


@dataclasses.dataclass(frozen=True)
class Point:
    """Eval-time routing knobs of one sweep point (None = the training value)."""

    t_eval: float | None = None
    gamma_eval: float | None = None


def with_eval_routing(cfg: TrainConfig, point: Point) -> TrainConfig:
    """cfg with the MoE layer's threshold_eval / capacity_factor_eval set from ``point``;
    validated by MoEConfig (e.g. a capacity on the dropless null router raises)."""
    if cfg.model.moe is None:
        if point != Point():
            raise ValueError(f"{point} needs an MoE model (config.moe.enabled is False)")
        return cfg
    moe = cfg.model.moe
    # A knob equal to its training value stays None: same routing, same compiled eval step.
    t = None if point.t_eval == moe.threshold_for(train=True) else point.t_eval
    g = None if point.gamma_eval == moe.capacity_for(train=True) else point.gamma_eval
    moe = moe.replace(threshold_eval=t, capacity_factor_eval=g)
    return dataclasses.replace(cfg, model=cfg.model.replace(moe=moe))


def graphdef_for(cfg: TrainConfig):
    """The model's graphdef for cfg (abstract init, no parameters are materialized)."""
    abstract = nnx.eval_shape(lambda: model_lib.Transformer(cfg.model, rngs=nnx.Rngs(cfg.seed)))
    return nnx.split(abstract, nnx.Param, ...)[0]


def restore(cfg: TrainConfig, workdir: str):
    """(step, graphdef, state) of the latest complete checkpoint under ``workdir``/checkpoints.

    Raises FileNotFoundError when there is none (or none is readable)."""
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no checkpoints folder in {workdir!r}: train the run first")
    graphdef, like = train_step_lib.init_state(cfg)
    ckpt = Checkpointer(directory, every_steps=0, keep=cfg.ckpt.keep, async_save=False)
    try:
        restored = ckpt.restore_latest(like, None)
    finally:
        ckpt.close()
    if restored is None:
        raise FileNotFoundError(f"no readable checkpoint in {directory!r}")
    step, state = restored
    return step, graphdef, state


def points_for(
    moe: MoEConfig | None,
    t_evals: tuple[float, ...] = (),
    gammas: tuple[float | None, ...] = (),
) -> list[Point]:
    """The grid a router supports: t_eval x gamma_eval for threshold, gamma_eval for top-k /
    Switch (None = dropless), one point at the training values for the null router and dense."""
    if moe is None or moe.router in ("null", "expert_choice"):
        return [Point()]
    gammas = tuple(gammas) or (None,)
    if moe.router in ("topk", "switch"):
        return [Point(gamma_eval=g) for g in gammas]
    return [Point(t, g) for g in gammas for t in (tuple(t_evals) or (None,))]


def full_compute_flops(cfg: TrainConfig) -> float:
    """MoE-layer FLOPs per token with every real expert computing every token (t = 1.0 with no
    drops), summed over MoE layers: the dense compute of a dense-to-sparse model."""
    moe = cfg.moe
    if moe is None:
        return 0.0
    return len(cfg.model.moe_layers) * flops.moe_flops_per_token(moe, moe.num_experts)


def evaluate_point(cfg: TrainConfig, state, point: Point, *, name: str = "") -> dict:
    """Held-out loss and measured routing/FLOPs of ``state`` at ``point`` (eval mode)."""
    pcfg = with_eval_routing(cfg, point)
    ev = train_step_lib.evaluate(pcfg, graphdef_for(pcfg), state)
    moe = pcfg.moe
    row = {
        "model": name or cfg.name,
        "router": "dense" if moe is None else moe.router,
        "t_eval": None,
        "gamma_eval": None,
        "loss": ev["eval/loss"],
        "real_per_token": ev.get("eval/real_per_token", math.nan),
        "drop_fraction": ev.get("eval/drop_fraction", 0.0),
        "moe_flops": ev.get("eval/flops_per_token/realized", 0.0),
    }
    if moe is not None and moe.router == "threshold":
        row["t_eval"] = moe.threshold_for(train=False)
    if moe is not None:
        row["gamma_eval"] = moe.capacity_for(train=False)
    return row


def sweep(cfg: TrainConfig, state, points: list[Point], *, name: str = "") -> list[dict]:
    """evaluate_point over ``points``; each row also carries the point's requested knobs."""
    rows = []
    for p in points:
        row = evaluate_point(cfg, state, p, name=name)
        rows.append(row)
        print(
            f"{row['model']:>12} t_eval={_fmt(row['t_eval'])} gamma_eval={_fmt(row['gamma_eval'])}"
            f" loss={row['loss']:.4f} real/token={row['real_per_token']:.2f}"
            f" drop={row['drop_fraction']:.3f} MoE FLOPs/token={row['moe_flops'] / 1e6:.3f}M",
            flush=True,
        )
    return rows


def _fmt(v) -> str:
    return "-" if v is None else f"{v:g}"
