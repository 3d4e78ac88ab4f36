"""Pallas grouped matmul (kernels_pallas.gmm / tgmm) against a dense matmul of equal FLOPs and
against jax.lax.ragged_dot, on the present device.

Rows are sorted by group; a null fraction z of the R rows is dropped (rows past sum(group_sizes),
as after null-expert routing), so the useful work is 2 * (1 - z) * R * D * F FLOPs. Every
TFLOP/s number divides those useful FLOPs by the measured time, so a kernel that computes the
dropped rows anyway shows up as slow. Columns:
- gmm, dense, ragged: TFLOP/s of gmm, of one dense [real rows, D] @ [D, F] matmul (the same
  FLOPs) and of jax.lax.ragged_dot on the same inputs; gmm/dense and gmm/ragged are
  throughput ratios (gmm/ragged > 1: gmm is faster).
- tgmm, dense_t, ragged_t: the weight gradient (per-group lhs^T @ grad), a dense
  [D, real rows] @ [real rows, F] matmul and the rhs-VJP of ragged_dot; tgmm/dense_t.
- t/t0: gmm time at this null fraction over gmm time at null fraction 0 (same G): time should
  follow real rows (0.5 dropped -> about 0.5).
All variants of one (G, null) point are jitted, warmed up and timed in interleaved rounds in
this one process; medians are reported.

  python benchmarks/gmm.py                       # default sweep on the present accelerator
  python benchmarks/gmm.py --json gmm.json       # also write every number as JSON
  python benchmarks/gmm.py --rows 16384 --d 4096 --f 1536 --groups 8,32,128
  python benchmarks/gmm.py --smoke               # tiny shape, interpret mode (auto on CPU)

On CPU no Pallas kernel runs natively: --smoke is implied, both kernels run in interpret mode
on a tiny shape and the numbers only show that everything runs.
"""

from __future__ import annotations

import argparse
import json
import platform

import jax
import jax.numpy as jnp
import numpy as np
from common import Bench

import kernels_pallas as kp


def group_sizes_for(rows: int, groups: int, null: float, seed: int) -> np.ndarray:
    """Real rows (1 - null) * rows spread over groups with a mild random imbalance."""
    real = int(round(rows * (1.0 - null)))
    rng = np.random.default_rng(seed)
    weights = rng.dirichlet(np.full(groups, 4.0))
    sizes = np.floor(weights * real).astype(np.int64)
    sizes[: real - sizes.sum()] += 1  # hand out the rounding remainder
    return sizes.astype(np.int32)


def time_interleaved(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds per call; round r times every variant once (fair under drift)."""
    bench = Bench()
    for name, (fn, args) in fns.items():
        bench.add(name, fn, *args)
    bench.run(repeats, max_calls=1)
    return {name: bench.seconds(name) for name in fns}


def rhs_grad(matmul):
    """(x, w, g, y) -> the weight gradient of matmul(x, w, g) for cotangent y: the tgmm peer.
    The cotangent takes the product's own dtype (ragged_dot on GPU may return float32 for
    bfloat16 operands)."""

    def grad(x, w, g, y):
        out, pull = jax.vjp(lambda v: matmul(x, v, g), w)
        return pull(y.astype(out.dtype))[0]

    return grad


def bench_point(args, groups: int, null: float, backend: str, interpret: bool, extra=None) -> dict:
    """One (G, null) point: every variant timed side by side. extra(lhs, rhs, gs, grad) may
    add peers as {name: (jitted fn, args)} (benchmarks/accelerator.py: tokamax)."""
    dtype = jnp.dtype(args.dtype)
    rows, d, f = args.rows, args.d, args.f
    sizes = group_sizes_for(rows, groups, null, seed=groups)
    real = int(sizes.sum())
    key = jax.random.split(jax.random.key(0), 4)
    lhs = jax.random.normal(key[0], (rows, d), dtype)  # [R, D]
    rhs = jax.random.normal(key[1], (groups, d, f), dtype) / np.sqrt(d)  # [G, D, F]
    grad = jax.random.normal(key[2], (rows, f), dtype)  # [R, F]
    gs = jnp.asarray(sizes)
    dense_x = lhs[: max(real, 1)]  # [real, D]
    dense_y = grad[: max(real, 1)]  # [real, F]
    opts = dict(interpret=interpret, backend=backend, block_sizes=args.block_sizes)

    gmm = jax.jit(lambda x, w, g: kp.gmm(x, w, g, **opts))
    tgmm = jax.jit(lambda x, y, g: kp.tgmm(x, y, g, **opts))
    dense = jax.jit(lambda x, w: x @ w)  # [real, D] @ [D, F]
    dense_t = jax.jit(lambda x, y: x.T @ y)  # [D, real] @ [real, F]
    ragged = jax.jit(lambda x, w, g: jax.lax.ragged_dot(x, w, g))
    ragged_t = jax.jit(rhs_grad(jax.lax.ragged_dot))
    fns = {
        "gmm": (gmm, (lhs, rhs, gs)),
        "dense": (dense, (dense_x, rhs[0])),
        "ragged": (ragged, (lhs, rhs, gs)),
        "tgmm": (tgmm, (lhs, grad, gs)),
        "dense_t": (dense_t, (dense_x, dense_y)),
        "ragged_t": (ragged_t, (lhs, rhs, gs, grad)),
    }
    if args.no_ragged:
        del fns["ragged"], fns["ragged_t"]
    if extra is not None:
        fns.update(extra(lhs, rhs, gs, grad))
    secs = time_interleaved(fns, args.repeats)
    flops = 2.0 * real * d * f
    point = {
        "groups": groups,
        "null": null,
        "real_rows": real,
        "seconds": secs,
        "tflops": {name: flops / s / 1e12 for name, s in secs.items()},
    }
    # Correctness guard: the benchmark must not time a wrong kernel.
    out = np.asarray(gmm(lhs, rhs, gs), np.float32)
    assert np.isfinite(out).all() and (out[real:] == 0).all(), "gmm: bad tail rows"
    return point


HEADER = (  # the columns of fmt_row
    "   G  null     real |      gmm    dense   ragged gmm/dn gmm/rg |"
    "     tgmm  dense_t ragged_t tg/dnT |  t/t0"
)


def fmt_row(p: dict, t0: float | None) -> str:
    tf = p["tflops"]
    ratio = lambda a, b: f"{tf[a] / tf[b]:6.2f}" if b in tf and a in tf else "     -"
    col = lambda name: f"{tf[name]:9.3f}" if name in tf else "        -"
    rel = f"{p['seconds']['gmm'] / t0:5.2f}" if t0 else "    -"
    return (
        f"{p['groups']:4d} {p['null']:5.2f} {p['real_rows']:8d} |"
        f"{col('gmm')}{col('dense')}{col('ragged')} {ratio('gmm', 'dense')} "
        f"{ratio('gmm', 'ragged')} |{col('tgmm')}{col('dense_t')}{col('ragged_t')} "
        f"{ratio('tgmm', 'dense_t')} | {rel}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=16384, help="R: rows incl. dropped ones")
    parser.add_argument("--d", type=int, default=2048, help="D: contraction width")
    parser.add_argument("--f", type=int, default=2048, help="F: output width")
    parser.add_argument("--groups", default="8,32,128", help="comma-separated group counts")
    parser.add_argument("--nulls", default="0,0.5,0.75", help="fractions of rows dropped")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument(
        "--backend", default="auto", choices=["auto", "tpu", "triton", "mosaic_gpu"]
    )
    parser.add_argument("--tiles", default=None, help="tm,tk,tn override (default: table)")
    parser.add_argument("--repeats", type=int, default=20, help="timed rounds per point")
    parser.add_argument("--no-ragged", action="store_true", help="skip jax.lax.ragged_dot")
    parser.add_argument("--smoke", action="store_true", help="tiny shape, interpret mode")
    parser.add_argument("--json", default=None, help="write all numbers to this file")
    args = parser.parse_args()

    platform_name = jax.default_backend()
    smoke = args.smoke or platform_name not in ("tpu", "gpu")
    if smoke:  # interpret mode is slow: tiny shape, both kernels, a couple of points
        args.rows, args.d, args.f, args.repeats = 64, 32, 48, 2
        args.groups, args.nulls = "4", "0,0.5"
        args.dtype = "float32"
    args.block_sizes = None
    if args.tiles:
        tm, tk, tn = (int(v) for v in args.tiles.split(","))
        args.block_sizes = kp.BlockSizes(tm=tm, tk=tk, tn=tn)
    if smoke:
        args.block_sizes = kp.BlockSizes(tm=16, tk=16, tn=16)
        backends = ["tpu", "triton"] if args.backend == "auto" else [args.backend]
    else:
        backends = [kp.resolve_backend(args.backend, interpret=False)]

    device = jax.devices()[0]
    print(
        f"device: {device.device_kind} ({platform_name}), jax {jax.__version__}, "
        f"R={args.rows} D={args.d} F={args.f} {args.dtype}, medians of {args.repeats} rounds"
        + (" [SMOKE: interpret mode, numbers meaningless]" if smoke else "")
    )
    results = []
    for backend in backends:
        print(f"\nkernel: {backend}{' (interpret)' if smoke else ''}   TFLOP/s of useful work")
        print(HEADER)
        for groups in (int(g) for g in args.groups.split(",")):
            t0 = None
            for null in (float(z) for z in args.nulls.split(",")):
                p = bench_point(args, groups, null, backend, interpret=smoke)
                p["backend"] = backend
                t0 = t0 or (p["seconds"]["gmm"] if null == 0 else None)
                print(fmt_row(p, t0))
                results.append(p)
    if args.json:
        meta = {
            "device": device.device_kind,
            "platform": platform_name,
            "jax": jax.__version__,
            "python": platform.python_version(),
            "rows": args.rows,
            "d": args.d,
            "f": args.f,
            "dtype": args.dtype,
            "repeats": args.repeats,
            "smoke": smoke,
        }
        with open(args.json, "w") as fh:
            json.dump({"meta": meta, "points": results}, fh, indent=1)
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
