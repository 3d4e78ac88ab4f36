"""MoE layer forward+backward: does compute follow the real (non-null) assignments?

Every variant is jitted, warmed up, then timed in interleaved rounds in this one process
(round r times every variant once), and the median per variant is reported, so ratios between
variants measured side by side are what to read, not the absolute numbers.

  python benchmarks/moe_layer.py                      # default table (both expert shapes)
  python benchmarks/moe_layer.py --json out.json      # also write every number as JSON
  python benchmarks/moe_layer.py --shapes 8x1024 --repeats 5 --no-scaling

Sections (T tokens, D=512, K slots per token, rho density, E[K] = K*rho real experts/token):
1. rho sweep at K=4: t(rho) / t(rho=1).
2. iso-FLOP (E[K]=2): t(K^4_0.5) / t(K^2_1.0) and t(K^8_0.25) / t(K^2_1.0).
3. a dense SwiGLU FFN of the same active FLOPs (hidden E[K]*F): t(K^4_0.5) / t(dense FFN).
4. peers at K^4_0.5, same routing and weights: jax.lax.ragged_dot backend, the dense
   reference backend, our own unfused path (backend "tiled_unfused": gather -> per-matmul
   tiled gmm -> combine; the "tiled" rows run the fused loop of moe_jax/experts/fused_xla.py),
   and a GShard/Switch-style one-hot einsum dispatch with capacity
   C = ceil(cf * T*E[K] / N) (cf=1: the buffer holds exactly the average real load, so it
   computes as many expert rows as the dropless path; overflow is dropped).
5. T scaling (1k, 4k, 16k tokens at K^4_0.5, N=8) with the compiled program's temp memory.

Routing at random init does not realise rho (real logits beat the null logit about half the
time), so the null logit gets a bias through a constant input feature (x[:, 0] = 1) set by
bisection until the realised real experts per token equal K*rho, as after training.
"""

from __future__ import annotations

import argparse
import json
import math
import platform

import jax
import jax.numpy as jnp
import numpy as np
from common import Bench, bisect_decreasing, exec_with_huge_pages
from flax import nnx

from moe_jax import routing, stats
from moe_jax.core.config import MoEConfig
from moe_jax.moe import FFN, MoE

D_MODEL = 512


# ---------------------------------------------------------------------------------------------
# Layers under test.
# ---------------------------------------------------------------------------------------------
def make_moe(
    n: int, f: int, k: int, rho: float, backend: str, d_model: int = D_MODEL, dtype="float32"
) -> MoE:
    """Null-router MoE; the same seed gives the same weights for every (rho, backend)."""
    cfg = MoEConfig(
        d_model=d_model,
        d_ff=f,
        num_experts=n,
        top_k=k,
        rho=rho,
        router="null",
        backend=backend,
        dtype=dtype,
    )
    return MoE(cfg, rngs=nnx.Rngs(0))


def calibrate_null_bias(layer: MoE, x: jax.Array) -> float:
    """Set router.kernel[0, N] (x[:, 0] == 1 acts as a bias) so real picks/token = K*rho."""
    cfg = layer.config
    target = cfg.top_k * cfg.density
    kernel = layer.router.kernel[...]  # [D, N+1]
    if cfg.num_nulls == 0:
        return float(cfg.top_k)

    @jax.jit
    def real_per_token(bias):
        logits = x @ kernel.at[0, cfg.num_experts].set(bias)  # [T, N+1]
        r = routing.null_router(logits, top_k=cfg.top_k, num_nulls=cfg.num_nulls)
        return jnp.mean(jnp.sum(r.expert_ids < cfg.num_experts, axis=1))

    # real_per_token falls as the null bias grows
    bias = bisect_decreasing(lambda b: float(real_per_token(b)), target, -10.0, 10.0, 40)
    layer.router.kernel[...] = kernel.at[0, cfg.num_experts].set(bias)
    return float(real_per_token(bias))


def einsum_moe(layer: MoE, x: jax.Array, capacity: int):
    """GShard/Switch-style layer: one-hot dispatch/combine tensors [T, N, C] and einsums.

    Same router and weights as `layer`. Buffer positions are assigned slot-major (every first
    choice before any second choice, then token order); pairs past capacity are dropped.
    """
    cfg = layer.config
    n, c = cfg.num_experts, capacity
    logits = layer.router(x)  # [T, N+1]
    r = routing.route(logits, cfg)
    t, s = r.expert_ids.shape
    onehot = jax.nn.one_hot(r.expert_ids, n, dtype=jnp.int32)  # [T, S, N]; null id N -> 0
    slot_major = onehot.transpose(1, 0, 2).reshape(s * t, n)  # [S*T, N]
    pos = (jnp.cumsum(slot_major, axis=0) - 1).reshape(s, t, n).transpose(1, 0, 2)  # [T, S, N]
    keep = (onehot > 0) & (pos < c)  # [T, S, N]
    # A token picks an expert at most once, so one slot at most is active per (token, expert).
    pos_tn = jnp.sum(jnp.where(keep, pos, 0), axis=1)  # [T, N]
    w_tn = jnp.sum(jnp.where(keep, r.weights[:, :, None], 0.0), axis=1)  # [T, N]
    kept_tn = jnp.any(keep, axis=1)  # [T, N]
    dispatch_t = jax.nn.one_hot(jnp.where(kept_tn, pos_tn, c), c, dtype=x.dtype)  # [T, N, C]
    combine_t = dispatch_t * w_tn[:, :, None]  # [T, N, C]
    xe = jnp.einsum("tnc,td->ncd", dispatch_t, x)  # [N, C, D]
    h = jnp.einsum("ncd,ndf->ncf", xe, layer.w_in[...])  # [N, C, F]
    g = jnp.einsum("ncd,ndf->ncf", xe, layer.w_gate[...])  # [N, C, F]
    ye = jnp.einsum("ncf,nfd->ncd", jax.nn.silu(g) * h, layer.w_out[...])  # [N, C, D]
    y = jnp.einsum("tnc,ncd->td", combine_t, ye)  # [T, D]
    return y, stats.aux_loss(cfg, r.lb_loss, r.z_loss)


def fwd_bwd(module: nnx.Module, call):
    """Jitted grad of sum(y * dy) + aux w.r.t. the parameters and the input."""
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)  # rest: e.g. the null bias

    def loss(params, x, dy):
        y, aux = call(nnx.merge(graphdef, params, rest), x)
        return jnp.sum(y * dy) + aux

    return jax.jit(jax.grad(loss, argnums=(0, 1))), params


def moe_call(m, x):
    y, aux = m(x)
    return y, aux["aux_loss"]


def run_shape(
    n: int,
    f: int,
    tokens: int,
    repeats: int,
    peers: bool,
    scaling: bool,
    log,
    *,
    backend: str = "tiled",
    d_model: int = D_MODEL,
    dtype: str = "float32",
    peer_backends: tuple[str, ...] = ("ragged", "dense"),
):
    """Compiles and times every variant of one (N, F) shape. backend: the layer path under
    test (its variants are named after it); peer_backends: other backends at K^4_0.5."""
    rng = np.random.default_rng(0)

    def inputs(t):
        x = rng.normal(size=(t, d_model)).astype(np.float32)
        x[:, 0] = 1.0  # constant feature: carries the calibrated null-logit bias
        dy = rng.normal(size=(t, d_model)).astype(np.float32)
        return jnp.asarray(x), jnp.asarray(dy)

    x, dy = inputs(tokens)
    bench = Bench()
    realized = {}

    def add_moe(name, k, rho, backend, xx=x, dyy=dy):
        layer = make_moe(n, f, k, rho, backend, d_model, dtype)
        realized[name] = calibrate_null_bias(layer, xx)
        fn, params = fwd_bwd(layer, moe_call)
        bench.add(name, fn, params, xx, dyy, k=k, rho=rho, backend=backend)
        log(f"  compiled {name} (real/token {realized[name]:.3f})")
        return layer

    for rho in (1.0, 0.5, 0.25):
        add_moe(f"{backend} K4 rho={rho}", 4, rho, backend)
    add_moe(f"{backend} K2 rho=1.0", 2, 1.0, backend)
    add_moe(f"{backend} K8 rho=0.25", 8, 0.25, backend)
    ffn = FFN(d_model, 2 * f, rngs=nnx.Rngs(0), dtype=jnp.dtype(dtype))
    fn, params = fwd_bwd(ffn, lambda m, x: (m(x), 0.0))
    bench.add("dense FFN hidden=2F", fn, params, x, dy)
    log("  compiled dense FFN")
    if peers:
        for peer in peer_backends:
            if peer != backend:
                add_moe(f"{peer} K4 rho=0.5", 4, 0.5, peer)
        add_moe("unfused tiled K4 rho=0.5", 4, 0.5, "tiled_unfused")
        layer = make_moe(n, f, 4, 0.5, backend, d_model, dtype)
        calibrate_null_bias(layer, x)
        for cf in (1.0, 1.25):
            cap = math.ceil(cf * tokens * 4 * 0.5 / n)
            fn, params = fwd_bwd(layer, lambda m, x, cap=cap: einsum_moe(m, x, cap))
            bench.add(f"einsum cf={cf} K4 rho=0.5", fn, params, x, dy, capacity=cap)
            log(f"  compiled einsum cf={cf} (C={cap})")
    if scaling:
        for t in (1024, 16384):
            xt, dyt = inputs(t)
            add_moe(f"{backend} K4 rho=0.5 T={t}", 4, 0.5, backend, xt, dyt)
    bench.run(repeats)
    return bench, realized


def report(
    n,
    f,
    tokens,
    bench: Bench,
    realized,
    peers,
    scaling,
    *,
    backend: str = "tiled",
    d_model: int = D_MODEL,
    peer_backends: tuple[str, ...] = ("ragged", "dense"),
):
    """Prints the table and the ratios of one shape; returns them as a dict."""
    ms = bench.ms
    base = f"{backend} K4 rho=0.5"
    rows = []

    def row(section, name, value, target=None, ok=None):
        rows.append(dict(section=section, name=name, value=value, target=target, ok=ok))

    r1 = ms(f"{backend} K4 rho=1.0")
    for rho, tgt in ((0.5, 0.55), (0.25, 0.30)):
        v = ms(f"{backend} K4 rho={rho}") / r1
        row("1 rho sweep", f"t(rho={rho})/t(rho=1)", v, f"<= {tgt}", v <= tgt)
    k2 = ms(f"{backend} K2 rho=1.0")
    for name, tgt in ((base, 1.15), (f"{backend} K8 rho=0.25", 1.3)):
        v = ms(name) / k2
        row(
            "2 iso-FLOP",
            f"t({name.split()[1]}_{name.split('=')[1]})/t(K2_1.0)",
            v,
            f"<= {tgt}",
            v <= tgt,
        )
    v = ms(base) / ms("dense FFN hidden=2F")
    row("3 vs dense FFN", "t(K4_0.5)/t(FFN hidden 2F)", v, "<= 1.3", v <= 1.3)
    if peers:
        want = 4.0 if n <= 8 else 20.0
        names = {"ragged": "ragged_dot", "dense": "dense ref"}
        for peer in (p for p in peer_backends if p != backend):
            v = ms(f"{peer} K4 rho=0.5") / ms(base)
            label = f"t({names.get(peer, peer)})/t({backend})"
            if peer == "ragged":
                row("4 peers", label, v, f">= {want}", v >= want)
            else:
                row("4 peers", label, v)
        v = ms("unfused tiled K4 rho=0.5") / ms(base)
        row("4 peers", f"t(unfused tiled)/t({backend})", v)
        for cf in (1.0, 1.25):
            v = ms(f"einsum cf={cf} K4 rho=0.5") / ms(base)
            row("4 peers", f"t(einsum cf={cf})/t({backend})", v, "> 1", v > 1)
    if scaling:
        t4 = ms(base)
        for t in (1024, 16384):
            v = ms(f"{backend} K4 rho=0.5 T={t}") / t4
            row("5 scaling", f"t(T={t})/t(T={tokens})", v, f"~ {t / tokens:g}")
    print(f"\n== N={n} experts, F={f}, T={tokens}, D={d_model}, fwd+bwd, median of n calls ==")
    print(f"{'variant':34s} {'ms':>9s} {'n':>4s} {'temp MiB':>9s} {'real/tok':>9s}")
    for name in bench.fns:
        rt = realized.get(name)
        rts = f"{rt:9.3f}" if rt is not None else " " * 9
        count = len(bench.times[name])
        print(f"{name:34s} {ms(name):9.1f} {count:4d} {bench.mem[name] / 2**20:9.1f} {rts}")
    print(f"{'section':16s} {'ratio':38s} {'value':>7s} {'target':>9s}")
    for r in rows:
        mark = "" if r["ok"] is None else ("ok" if r["ok"] else "MISSED")
        print(
            f"{r['section']:16s} {r['name']:38s} {r['value']:7.2f} {r['target'] or '':>9s} {mark}"
        )
    return dict(
        num_experts=n,
        d_ff=f,
        tokens=tokens,
        d_model=d_model,
        backend=backend,
        variants={
            name: dict(
                median_ms=ms(name),
                times_ms=[1e3 * t for t in bench.times[name]],
                temp_bytes=bench.mem[name],
                real_per_token=realized.get(name),
                **bench.info[name],
            )
            for name in bench.fns
        },
        ratios=rows,
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--shapes", default="8x1024,64x128", help="comma list of NxF")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-peers", action="store_true", help="skip ragged/dense/einsum")
    ap.add_argument("--no-scaling", action="store_true", help="skip the T scaling runs")
    ap.add_argument("--json", default=None, help="write all numbers to this file")
    args = ap.parse_args()
    log = lambda s: print(s, flush=True)
    log(
        f"jax {jax.__version__} on {jax.devices()[0].platform} ({platform.processor() or platform.machine()})"
    )
    out = []
    for i, shape in enumerate(args.shapes.split(",")):
        n, f = (int(v) for v in shape.split("x"))
        scaling = not args.no_scaling and i == 0
        bench, realized = run_shape(
            n, f, args.tokens, args.repeats, not args.no_peers, scaling, log
        )
        out.append(report(n, f, args.tokens, bench, realized, not args.no_peers, scaling))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(
                dict(jax=jax.__version__, platform=jax.devices()[0].platform, shapes=out),
                fh,
                indent=1,
            )
        log(f"wrote {args.json}")


if __name__ == "__main__":
    exec_with_huge_pages()
    main()
