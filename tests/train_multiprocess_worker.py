"""One process of the multi-process training tests (run by tests/test_multihost.py).

usage: python train_multiprocess_worker.py PROCESS_ID PORT WORKDIR [KILL_AT [TERM_AT [disagree]]]
Two processes x 4 CPU devices train configs/default.py:smoke on a (data=2, fsdp=2, expert=2)
mesh through moe_jax.train.run, exactly as train.py does with the same config.dist fields.
Process 1 kills itself with SIGKILL when it reads step KILL_AT_STEP's metrics (a host lost
mid-run); it sends itself SIGTERM at TERM_AT_STEP (a preemption notice to one host). At the end process 0 writes the final parameters, gathered from every process, to
WORKDIR/final_params.npz. With "disagree", process 1 runs another learning rate.
"""

import os
import pathlib
import signal
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "configs"))

import default as default_config  # noqa: E402

OVERRIDES = {
    "mesh.data": 2,
    "mesh.fsdp": 2,
    "mesh.expert": 2,
    "ckpt.every_steps": 5,
    "log.plots": False,
    "log.tensorboard": False,
    "log.progress": False,
}


def config(**extra):
    """configs/default.py:smoke with the test's mesh (and `extra`) applied."""
    c = default_config.get_config("smoke")
    for key, value in {**OVERRIDES, **extra}.items():
        section, field = key.split(".")
        c[section][field] = value
    return c


def flat_params(state):
    """{path: numpy array} of the parameters (every process must call it: it gathers)."""
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    params = state["params"]
    if jax.process_count() > 1:
        params = multihost_utils.process_allgather(params, tiled=True)
    return {
        jax.tree_util.keystr(p): np.asarray(v)
        for p, v in jax.tree_util.tree_leaves_with_path(params)
    }


class _Hook:
    def __init__(self, workdir, kill_at=-1, term_at=-1):
        self.workdir, self.kill_at, self.term_at = workdir, kill_at, term_at

    def on_step(self, step, metrics):
        import jax

        if jax.process_index() == 1 and step in (self.kill_at, self.term_at):
            os.kill(os.getpid(), signal.SIGKILL if step == self.kill_at else signal.SIGTERM)

    def on_end(self, graphdef, state):
        import jax
        import numpy as np

        flat = flat_params(state)
        if jax.process_index() == 0:
            np.savez(os.path.join(self.workdir, "final_params.npz"), **flat)


def main(process_id: int, port: int, workdir: str, kill_at: int, term_at: int, disagree: bool):
    lr = {"opt.lr": 2e-2} if disagree and process_id == 1 else {}
    c = config(
        **lr,
        **{
            "dist.coordinator_address": f"127.0.0.1:{port}",
            "dist.num_processes": 2,
            "dist.process_id": process_id,
            "dist.local_devices": 4,
        },
    )
    from moe_jax import train

    result = train.run(c, workdir, hooks=[_Hook(workdir, kill_at, term_at)])
    print(f"worker {process_id}: {result['status']} at step {result['step']}", flush=True)


if __name__ == "__main__":
    kill = int(sys.argv[4]) if len(sys.argv) > 4 else -1
    term = int(sys.argv[5]) if len(sys.argv) > 5 else -1
    disagree = len(sys.argv) > 6 and sys.argv[6] == "disagree"
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], kill, term, disagree)
