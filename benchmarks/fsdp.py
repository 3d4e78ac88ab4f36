"""Per-device memory and exchanged bytes of one MoE layer against the fsdp and expert sizes.

Runs on 8 fake CPU devices (XLA_FLAGS is set below, before jax is imported):

    python benchmarks/fsdp.py            # table
    python benchmarks/fsdp.py --json     # one JSON object

For every (data, fsdp, expert) mesh of 8 devices, a null-router MoE layer (K^4_0.5) is placed by
the partition rules and one jitted forward + backward is compiled and run. Printed per device:
  state    parameter + two Adam-moment bytes, counted from the arrays' shardings
  args/tmp the compiled program's argument and temporary bytes (XLA's memory analysis)
  gather   expert-weight bytes each device receives when the FSDP shards are gathered at the
           shard_map boundary (forward; the backward reduce-scatters the same amount)
  rows     real-row bytes the exchange moves (what ragged_all_to_all sends on TPU/GPU) and the
           padded buffer bytes of the CPU all_to_all, per device, dispatch + return
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import json  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from moe_jax import MoE, MoEConfig, parallel  # noqa: E402

MESHES = [(8, 1, 1), (4, 2, 1), (2, 4, 1), (1, 8, 1), (4, 1, 2), (2, 2, 2), (1, 4, 2), (2, 1, 4),
          (1, 2, 4), (1, 1, 8)]  # fmt: skip


def run(args) -> dict:
    cfg = MoEConfig(
        d_model=args.d_model, d_ff=args.d_ff, num_experts=args.experts, top_k=4, rho=0.5,
        router="null", lb_scope="global", backend="tiled", router_init_std=1.0,
    )  # fmt: skip
    x = jax.random.normal(jax.random.key(0), (args.tokens // 16, 16, args.d_model))
    rows = []
    for data, fsdp, expert in MESHES:
        mc = parallel.MeshConfig(data=data, fsdp=fsdp, expert=expert)
        mesh = parallel.make_mesh(mc)
        layer = MoE(cfg, rngs=nnx.Rngs(0), parallel=parallel.ExpertParallel(mesh, mc))
        gdef, state = nnx.split(layer)
        state = parallel.shard_state(state, mesh)
        xs = parallel.shard_batch(x, mesh)

        def loss(state, x, gdef=gdef):
            y, aux = nnx.merge(gdef, state)(x)
            return jnp.mean(jnp.square(y)) + aux["aux_loss"], aux

        step = jax.jit(jax.value_and_grad(loss, has_aux=True))
        compiled = step.lower(state, xs).compile()
        mem = compiled.memory_analysis()
        (_, aux), _ = compiled(state, xs)
        params = nnx.state(nnx.merge(gdef, state), nnx.Param)
        state_bytes = 3 * max(parallel.bytes_per_device(params).values())  # params + mu + nu
        n = cfg.num_experts
        expert_bytes = sum(
            getattr(layer, k)[...].size * 4 for k in ("w_in", "w_gate", "w_out")
        )  # whole expert weights, f32
        local = expert_bytes / expert  # one expert shard's weights, gathered over fsdp
        row = 2 * args.d_model * 4  # f32 rows, dispatch + return
        rows.append(
            {
                "mesh": [data, fsdp, expert],
                "state_bytes": state_bytes,
                "argument_bytes": mem.argument_size_in_bytes,
                "temp_bytes": mem.temp_size_in_bytes,
                "gather_bytes": local * (fsdp - 1) / fsdp,
                "real_row_bytes": float(aux["ep_rows_sent"]) * row / 8,
                "buffer_bytes": float(aux["ep_buffer_rows"]) * row / 8,
                "experts_per_device": n // expert,
            }
        )
    return {"setup": {k: v for k, v in vars(args).items() if k != "json"}, "rows": rows}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--d-ff", type=int, default=512)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    res = run(args)
    if args.json:
        print(json.dumps(res, indent=1))
        return
    print(f"setup: {res['setup']}, 8 devices; bytes per device in MiB")
    print(
        f"{'data x fsdp x expert':>20} {'state':>7} {'args':>7} {'tmp':>7} {'gather':>7} "
        f"{'real rows':>9} {'buffer':>7}"
    )
    mib = 2**20
    for r in res["rows"]:
        d, f, e = r["mesh"]
        print(
            f"{f'{d} x {f} x {e}':>20} {r['state_bytes'] / mib:>7.2f} "
            f"{r['argument_bytes'] / mib:>7.2f} {r['temp_bytes'] / mib:>7.2f} "
            f"{r['gather_bytes'] / mib:>7.2f} {r['real_row_bytes'] / mib:>9.3f} "
            f"{r['buffer_bytes'] / mib:>7.3f}"
        )


if __name__ == "__main__":
    main()
