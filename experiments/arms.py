"""The study's arms and size presets: one ConfigDict per (arm, preset, seed).

Every arm starts from a variant of configs/default.py and then gets the preset's sizes, so all
arms share the data, token budget, optimizer and seeds; only the FFN/MoE block differs.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os

import ml_collections

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class Preset:
    """Model, data and budget sizes shared by every arm of one study run."""

    name: str
    d_model: int  # D
    n_layers: int  # decoder blocks (every block is an MoE block)
    n_heads: int  # attention heads
    n_kv_heads: int  # key/value heads
    expert_d_ff: int  # F of a full expert; dense d_ff = 2F (E[K]=2), XMoE experts F/4
    image_size: int  # pixels per side
    patch_size: int  # pixels per patch side
    text_len: int  # text tokens per row
    max_shapes: int  # shapes per scene
    batch_size: int  # sequences per step
    num_steps: int  # optimizer steps per run
    warmup_steps: int  # linear lr warmup
    lr: float  # peak learning rate (cosine decay)
    seeds: int  # seeds per arm
    eval_batches: int  # held-out batches for loss and routing analysis


PRESETS = {
    "default": Preset("default", 64, 3, 4, 2, 64, 24, 4, 24, 3, 16, 300, 30, 3e-3, 3, 8),
    "quick": Preset("quick", 32, 2, 2, 1, 32, 16, 4, 16, 1, 8, 80, 10, 1e-2, 3, 4),
    # Study v2: the default model of configs/default.py (D=128, 4 blocks, 64 patches + 24 text
    # tokens) for 1500 steps (2.1M tokens per run).
    "v2": Preset("v2", 128, 4, 4, 2, 128, 32, 4, 24, 3, 16, 1500, 50, 3e-3, 2, 8),
    "v2_quick": Preset("v2_quick", 32, 2, 2, 1, 32, 16, 4, 16, 1, 8, 60, 10, 1e-2, 2, 2),
}


def resized(name: str, seeds: int | None = None, steps: int | None = None) -> Preset:
    """PRESETS[name] with the seeds and steps a command line gave (None: the preset's); a
    shorter run gets a warmup of at most an eighth of its steps."""
    p = PRESETS[name]
    over = {k: v for k, v in (("seeds", seeds), ("num_steps", steps)) if v is not None}
    if "num_steps" in over:
        over["warmup_steps"] = min(p.warmup_steps, max(over["num_steps"] // 8, 1))
    return dataclasses.replace(p, **over)


@dataclasses.dataclass(frozen=True)
class Arm:
    """One configuration of the FFN/MoE block."""

    name: str  # short id (file names, --arms)
    label: str  # how the write-up names it
    group: str  # iso (E[K]=2 family) | frontier (fixed k_max=4) | controller
    variant: str  # configs/default.py variant it starts from
    moe: tuple = ()  # (field, value) overrides of config.moe


CONTROLLER_RATE = 1e-2  # u of the sign null-ratio controller in the study-v1 controller arms
PI_RATE = 0.5  # integral gain of the pi controller in the v2 arm (a 300-step sweep's best)
# The paper's recipe: no first-batch calibration, L_bal alone moves the null logit.
PAPER = (("null_calibrate", False),)
SIGN = (("null_controller", "sign"), ("null_calibrate", False))

ARMS = (
    Arm("k2_rho1", "K^2_1.0 (no nulls)", "iso", "k2_rho1"),
    Arm("k4_rho05", "K^4_0.5", "iso", "k4_rho05", PAPER),
    Arm("k8_rho025", "K^8_0.25", "iso", "k8_rho025", PAPER),
    Arm("xmoe", "XMoE t=0.9 (32 experts of F/4)", "iso", "xmoe"),
    Arm("dense", "dense FFN (d_ff=2F)", "iso", "dense"),
    Arm("k4_rho1", "K^4_1.0", "frontier", "k4_rho05", (("rho", 1.0),)),
    Arm("k4_rho067", "K^4_0.67", "frontier", "k4_rho05", (("rho", 2.0 / 3.0), *PAPER)),
    Arm(
        "k4_rho05_ctrl",
        "K^4_0.5 + controller",
        "controller",
        "k4_rho05",
        (("null_bias_update_rate", CONTROLLER_RATE), *SIGN),
    ),
    Arm(
        "k8_rho025_ctrl",
        "K^8_0.25 + controller",
        "controller",
        "k8_rho025",
        (("null_bias_update_rate", CONTROLLER_RATE), *SIGN),
    ),
)
# Study v2 adds the first-batch calibration and the pi controller (library defaults on).
V2_ARMS = (
    Arm(
        "k4_rho05_v2",
        "K^4_0.5 + calibration + PI",
        "v2",
        "k4_rho05",
        (("null_bias_update_rate", PI_RATE),),
    ),
    Arm(
        "k8_rho025_v2",
        "K^8_0.25 + calibration + PI",
        "v2",
        "k8_rho025",
        (("null_bias_update_rate", PI_RATE),),
    ),
)
# Study LM adds top-2 token choice at the same E[K] = 2 experts of width F.
LM_ARMS = (Arm("topk", "top-2 (token choice)", "iso", "topk"),)
ARMS_BY_NAME = {a.name: a for a in ARMS + V2_ARMS + LM_ARMS}
# Plain-L_bal twin of each controller arm.
CONTROLLER_BASELINE = {
    "k4_rho05_ctrl": "k4_rho05",
    "k8_rho025_ctrl": "k8_rho025",
    "k4_rho05_v2": "k4_rho05",
    "k8_rho025_v2": "k8_rho025",
}


def _load_default_config():
    path = os.path.join(REPO, "configs", "default.py")
    spec = importlib.util.spec_from_file_location("moe_jax_default_config", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def make_config(arm: Arm, preset: Preset, seed: int) -> ml_collections.ConfigDict:
    """The ConfigDict of one run: the arm's variant, resized to the preset, for ``seed``."""
    c = _load_default_config().get_config(arm.variant)
    p = preset
    c.name = f"{arm.name}_s{seed}"
    c.seed = seed
    c.num_steps = p.num_steps
    m, e, d, o = c.model, c.moe, c.data, c.opt
    m.d_model, m.n_layers, m.n_heads, m.n_kv_heads = p.d_model, p.n_layers, p.n_heads, p.n_kv_heads
    m.d_ff = 2 * p.expert_d_ff
    m.moe_every = 1
    e.d_ff = p.expert_d_ff // 4 if e.router == "threshold" else p.expert_d_ff
    for field, value in arm.moe:
        setattr(e, field, value)
    d.image_size, d.patch_size, d.text_len = p.image_size, p.patch_size, p.text_len
    d.max_shapes, d.batch_size = p.max_shapes, p.batch_size
    d.seed = 0  # scene content and held-out set fixed; the run seed shuffles the train order
    d.n_eval = max(d.n_eval, p.batch_size * p.eval_batches)
    o.lr, o.warmup_steps, o.schedule = p.lr, p.warmup_steps, "cosine"
    c.log.eval_batches = p.eval_batches
    c.log.tensorboard = c.log.progress = c.log.plots = False
    return c
