"""One process of the two-process expert-parallel test (run by tests/test_parallel.py).

usage: python ep_multiprocess_worker.py PROCESS_ID NUM_PROCESSES PORT OUT_JSON
Each process has 2 CPU devices; together they form a (data=2, expert=2) mesh. Process 0 writes
the training losses to OUT_JSON. `train_losses(mesh=None)` is the single-device reference.
"""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from moe_jax import MoE, MoEConfig, parallel

B, L, D, STEPS = 8, 4, 16, 3
CFG = MoEConfig(
    d_model=D, d_ff=32, num_experts=4, top_k=2, router="null", rho=0.5, lb_scope="global",
    backend="ragged", router_init_std=0.5,
)  # fmt: skip


def _data():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((B, L, D)).astype(np.float32)
    target = np.tanh(x[..., ::-1]).astype(np.float32)
    return x, target


def train_losses(mesh=None, ep_cfg=None):
    """Adam on one MoE layer fitting a fixed target; returns the per-step losses."""
    par = None if mesh is None else parallel.ExpertParallel(mesh, ep_cfg)
    gdef, state = nnx.split(MoE(CFG, rngs=nnx.Rngs(0), parallel=par))
    x, target = _data()
    if mesh is not None:
        state = parallel.shard_state(state, mesh)
        rows = parallel.process_rows(B, mesh)
        x, target = (parallel.global_batch(a[rows], mesh, B) for a in (x, target))
    tx = optax.adam(1e-2)
    opt_state = tx.init(state)

    @jax.jit
    def step(state, opt_state, x, target):
        def loss_fn(state):
            y, aux = nnx.merge(gdef, state)(x)
            return jnp.mean(jnp.square(y - target)) + aux["aux_loss"]

        loss, grads = jax.value_and_grad(loss_fn)(state)
        updates, opt_state = tx.update(grads, opt_state, state)
        return optax.apply_updates(state, updates), opt_state, loss

    losses = []
    for _ in range(STEPS):
        state, opt_state, loss = step(state, opt_state, x, target)
        losses.append(float(loss))
    return losses


def main(process_id: int, num_processes: int, port: int, out: str):
    parallel.init_distributed(f"127.0.0.1:{port}", num_processes, process_id, local_device_count=2)
    ep_cfg = parallel.MeshConfig(data=2, expert=2, buffer_factor="dropless")
    mesh = parallel.make_mesh(ep_cfg)
    losses = train_losses(mesh, ep_cfg)
    if process_id == 0:
        with open(out, "w") as f:
            json.dump(
                {
                    "losses": losses,
                    "num_devices": jax.device_count(),
                    "num_processes": jax.process_count(),
                },
                f,
            )
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
