"""The training system: config conversion (config), the jitted steps (step), the loop
(loop), checkpoints, metrics, plots and the eval-time compute sweep (sweep).

    from moe_jax import train
    result = train.run(config_dict, workdir)   # what train.py runs
"""

from moe_jax.train import (
    checkpoint,
    config,
    loop,
    memory,
    metrics,
    multihost,
    plots,
    step,
    sweep,
    workdir,
    writes,
)
from moe_jax.train.checkpoint import CheckpointMismatchError, WorkdirVanishedError
from moe_jax.train.config import TrainConfig, from_config_dict
from moe_jax.train.loop import Hook, Loop, run
from moe_jax.train.step import (
    NonFiniteLossError,
    StepSpec,
    eval_step,
    evaluate,
    init_state,
    make_optimizer,
    train_step,
)
from moe_jax.train.workdir import ConfigMismatchError, WorkdirBusyError, WorkdirError
from moe_jax.train.writes import WriteFailedError

__all__ = [
    "CheckpointMismatchError",
    "ConfigMismatchError",
    "WorkdirBusyError",
    "WorkdirError",
    "WorkdirVanishedError",
    "WriteFailedError",
    "Hook",
    "Loop",
    "NonFiniteLossError",
    "StepSpec",
    "TrainConfig",
    "checkpoint",
    "config",
    "eval_step",
    "evaluate",
    "from_config_dict",
    "init_state",
    "loop",
    "make_optimizer",
    "memory",
    "metrics",
    "multihost",
    "plots",
    "run",
    "step",
    "sweep",
    "train_step",
    "workdir",
    "writes",
]
