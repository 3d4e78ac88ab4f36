"""Expert-parallel exchange volume vs density rho, and EP step time vs one device.

Runs on 8 fake CPU devices (XLA_FLAGS is set below, before jax is imported):

    python benchmarks/ep.py                 # table
    python benchmarks/ep.py --json          # one JSON object
    python benchmarks/ep.py --tokens 2048 --mesh 2,4 --buffer-factor 1.5

For each rho in (1, 0.5, 0.25) at fixed K the router is calibrated so that the realized null
share is 1 - rho (the state the balance loss drives training to; at init the router is not
there yet): a constant input feature feeds the null logit a bias found by bisection.
Volume is counted per forward pass, both directions (dispatch + return), from the actual
arrays: "buffer" = the fixed [EP, Cb, D] send buffers the padded CPU all_to_all moves
(Cb from MeshConfig.buffer_factor, which scales with rho), "real" = the real rows inside them,
which is what ragged_all_to_all moves on TPU/GPU. A training step moves the same again
backwards. Slots addressed to a shard's own experts are counted too.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import json  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from common import Bench, bisect_decreasing  # noqa: E402
from flax import nnx  # noqa: E402

from moe_jax import MoE, MoEConfig, parallel  # noqa: E402


def _config(args, rho):
    return MoEConfig(
        d_model=args.d_model,
        d_ff=args.d_ff,
        num_experts=args.experts,
        top_k=args.top_k,
        router="null",
        rho=rho,
        lb_scope="global",
        backend=args.backend,
    )


def _inputs(args):
    x = jax.random.normal(jax.random.key(0), (args.tokens // 16, 16, args.d_model))
    return x.at[..., 0].set(1.0)  # constant feature: carries the null-logit bias


def _set_router(layer, bias, seed=1):
    """Real logits ~ N(0, 1) from features 1..D-1; null logit = bias (feature 0)."""
    kernel = np.array(jax.random.normal(jax.random.key(seed), layer.router.kernel[...].shape))
    kernel /= np.sqrt(kernel.shape[0] - 1)
    kernel[0, :] = 0.0
    kernel[1:, -1] = 0.0
    kernel[0, -1] = bias
    layer.router.kernel[...] = jnp.asarray(kernel, jnp.float32)


def _calibrate(layer, x, rho):
    """Bisection on the null bias until null_ratio ~= 1 - rho (real share ~= rho)."""
    if rho == 1.0:
        return 0.0
    gdef = nnx.graphdef(layer)
    fwd = jax.jit(lambda s, x: nnx.merge(gdef, s)(x)[1]["null_ratio"])

    def real_share(bias):
        _set_router(layer, bias)
        return 1.0 - float(fwd(nnx.state(layer), x))

    return bisect_decreasing(real_share, rho, -6.0, 6.0, 30)


def _step_fn(gdef):
    def loss(state, x):
        y, aux = nnx.merge(gdef, state)(x)
        return jnp.mean(jnp.square(y)) + aux["aux_loss"], aux

    return jax.jit(jax.value_and_grad(loss, has_aux=True))


def _time(fn, *args, repeats):
    bench = Bench()
    bench.add("step", fn, *args)
    bench.run(repeats, max_calls=1)
    return bench.seconds("step")


def run(args) -> dict:
    data, expert = (int(v) for v in args.mesh.split(","))
    mesh_cfg = parallel.MeshConfig(data=data, expert=expert, buffer_factor=args.buffer_factor)
    ep = parallel.ExpertParallel(parallel.make_mesh(mesh_cfg), mesh_cfg)
    x = _inputs(args)
    bytes_per_row = 2 * args.d_model * 4  # float32, both directions
    rows = []
    for rho in args.rhos:
        layer = MoE(_config(args, rho), rngs=nnx.Rngs(0))
        bias = _calibrate(layer, x, rho)
        _set_router(layer, bias)
        gdef1, state = nnx.split(layer)
        single = _step_fn(gdef1)
        (_, aux1), _ = single(state, x)
        t_single = _time(single, state, x, repeats=args.repeats)
        layer.parallel = ep
        gdef, state = nnx.split(layer)
        state = parallel.shard_state(state, ep.mesh)
        xs = parallel.shard_batch(x, ep.mesh)
        step = _step_fn(gdef)
        (_, aux), _ = step(state, xs)
        t_ep = _time(step, state, xs, repeats=args.repeats)
        rows.append(
            {
                "rho": rho,
                "null_ratio": float(aux["null_ratio"]),
                "null_ratio_single": float(aux1["null_ratio"]),
                "buffer_bytes": float(aux["ep_buffer_rows"]) * bytes_per_row,
                "real_bytes": float(aux["ep_rows_sent"]) * bytes_per_row,
                "overflow_fraction": float(aux["ep_overflow_fraction"]),
                "step_ms_ep": 1e3 * t_ep,
                "step_ms_single": 1e3 * t_single,
            }
        )
    base = rows[0]
    for r in rows:
        r["buffer_ratio"] = r["buffer_bytes"] / base["buffer_bytes"]
        r["real_ratio"] = r["real_bytes"] / base["real_bytes"]
        r["ep_over_single"] = r["step_ms_ep"] / r["step_ms_single"]
    setup = {k: v for k, v in vars(args).items() if k != "json"}
    setup["devices"] = jax.device_count()
    return {"setup": setup, "rows": rows}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--d-ff", type=int, default=256)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--rhos", type=float, nargs="+", default=[1.0, 0.5, 0.25])
    p.add_argument("--mesh", default="1,8", help="data,expert")
    p.add_argument("--buffer-factor", type=float, default=2.0)
    p.add_argument("--backend", default="auto")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    res = run(args)
    if args.json:
        print(json.dumps(res, indent=1))
        return
    print(f"setup: {res['setup']}")
    hdr = (
        f"{'rho':>5} {'null':>5} {'buffer MB':>10} {'ratio':>6} {'real MB':>8} {'ratio':>6} "
        f"{'ovfl':>5} {'EP ms':>8} {'1-dev ms':>8} {'EP/1':>5}"
    )
    print(hdr)
    for r in res["rows"]:
        print(
            f"{r['rho']:>5.2f} {r['null_ratio']:>5.2f} {r['buffer_bytes'] / 1e6:>10.3f} "
            f"{r['buffer_ratio']:>6.3f} {r['real_bytes'] / 1e6:>8.3f} {r['real_ratio']:>6.3f} "
            f"{r['overflow_fraction']:>5.3f} {r['step_ms_ep']:>8.1f} {r['step_ms_single']:>8.1f} "
            f"{r['ep_over_single']:>5.2f}"
        )


if __name__ == "__main__":
    main()
