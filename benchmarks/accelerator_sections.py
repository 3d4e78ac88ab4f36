"""The sections of benchmarks/accelerator.py, their settings (device and smoke) and the table.

Each run_<name>(sec, s, meta) gets the Section (sec.item runs one guarded, budgeted item and
saves it), the settings and the run's metadata, and returns the section's summary. They call
the existing benchmarks as functions: correctness.py, gmm.py's bench_point, moe_layer.py's
run_shape and report, train_step.py's Variant, time_rounds and report. train_step.py is
imported inside run_train only: it needs grain and ml-collections, which the other sections
must not import (tests/test_benchmarks.py runs them with those imports blocked).
"""

from __future__ import annotations

import functools
import gc
import itertools
import types

import correctness
import gmm as gmm_bench
import jax
import moe_layer
from common import Bench

import kernels_pallas as kp
from moe_jax.core.config import backend_names
from moe_jax.experts import get_backend, resolve_backend
from moe_jax.model.summary import model_summary

TRAIN_VARIANTS = (  # (label, configs/default.py arg): equal active FLOPs; most wanted first
    ("dense", "dense"),
    ("K^4_0.5", "default"),
    ("K^8_0.25", "k8_rho025"),
    ("K^2_1.0", "k2_rho1"),
    ("fine K^16_0.5 (N=32)", "default,fine"),
)


def device_model(c) -> None:
    """configs/default.py scaled to load one accelerator: widths x16 (D=2048, expert F=2048,
    fine F=512, dense hidden 4096), 8 blocks, 16 heads of 128, bfloat16 compute, 128
    sequences of 64 image + 24 text tokens a step. 0.31B parameters dense, 0.91B with N=8
    experts (0.31B active: the same FLOPs, 20.7 TFLOP a training step)."""
    m = c.model
    m.d_model, m.d_ff, c.moe.d_ff = 16 * m.d_model, 16 * m.d_ff, 16 * c.moe.d_ff
    m.n_layers, m.n_heads, m.n_kv_heads, m.dtype = 8, 16, 8, "bfloat16"
    c.data.batch_size = 128


def settings(smoke: bool, train_steps: int = 0) -> types.SimpleNamespace:
    """Shapes, dtypes, repeats per section. Smoke (about a minute of CPU, mostly XLA
    compiles): tiny shapes, and fewer iterations of the loops whose code is the same for
    each (layer checks in float32 only, one gmm shape at two null fractions, one layer shape
    without peers, two train variants)."""
    interpret = jax.default_backend() not in ("gpu", "tpu")  # no native kernel on CPU
    tiny = kp.BlockSizes(tm=16, tk=16, tn=16)
    s = types.SimpleNamespace(interpret=interpret, train_steps=train_steps)
    s.dtypes = s.layer_dtypes = ("float32", "bfloat16")
    s.layer_with_peers = True  # peers at the first layer shape
    if smoke:
        s.check_kernels, s.check_layer, s.check_blocks = (64, 32, 48, 4), (16, 16, 24, 8), tiny
        s.layer_dtypes = ("float32",)
        s.gmm_shapes, s.nulls = {"mixtral-like": (64, 32, 48, 4)}, (0.0, 0.75)
        s.gmm_dtype, s.gmm_blocks, s.repeats, s.peak_n = "float32", tiny, 2, 128
        s.layer_d, s.layer_tokens, s.layer_shapes = 32, 64, ((8, 16),)
        s.layer_dtype, s.layer_repeats, s.layer_peers = "float32", 1, ("ragged",)
        s.layer_with_peers = False
        s.train_variants, s.train_suffix, s.train_overrides = TRAIN_VARIANTS[:2], ",smoke", None
        s.rounds, s.calls = 1, 1
        return s
    # Checks: kernels (R rows, D, F, G groups), layer (T tokens, D, F, N): compiled in seconds.
    s.check_kernels, s.check_layer, s.check_blocks = (2048, 512, 768, 8), (512, 256, 512, 8), None
    s.gmm_shapes = {  # R = T*K slot rows: 8192 tokens x top-2 (Mixtral), x 4 (fine-grained)
        "mixtral-like": (16384, 4096, 14336, 8),
        "fine-grained": (32768, 2048, 1408, 64),
    }
    s.nulls, s.gmm_dtype, s.gmm_blocks = (0.0, 0.5, 0.75), "bfloat16", None
    s.repeats, s.peak_n = 10, 8192
    # moe_layer.py's two shapes (F = 2D with N=8; F = D/4 with N=64) at D=2048, T=8192.
    s.layer_d, s.layer_tokens, s.layer_shapes = 2048, 8192, ((8, 4096), (64, 512))
    s.layer_dtype, s.layer_repeats, s.layer_peers = "bfloat16", 5, None  # None: every backend
    s.train_variants, s.train_suffix, s.train_overrides = TRAIN_VARIANTS, "", device_model
    s.rounds, s.calls = 5, 3
    return s


def available_backends() -> dict[str, str | None]:
    """Every expert backend name -> None when it loads here, else the reason it does not."""
    out = {}
    for name in backend_names():
        try:
            get_backend(name)
            out[name] = None
        except Exception as e:  # ValueError / ImportError by contract; any other: its text
            out[name] = f"{type(e).__name__}: {e}"
    return out


@functools.cache
def tokamax_gmm():
    """(where it comes from, grouped matmul (lhs, rhs, group_sizes) -> out) of tokamax: the
    expert registry's "tokamax" backend when one is registered (and is a grouped matmul),
    else tokamax.ragged_dot when tokamax imports; (why not, None) otherwise."""
    if "tokamax" in backend_names():
        try:
            backend = get_backend("tokamax")
            if not backend.fused:
                return "registry backend 'tokamax'", backend.fn
        except Exception:  # not loadable here: the import below says why
            pass
    try:
        import tokamax
    except Exception as e:  # ImportError, or a jax it does not support
        return f"absent ({type(e).__name__}: {str(e)[:200]})", None
    return "tokamax.ragged_dot (import)", lambda x, w, g: tokamax.ragged_dot(x, w, g)


def tokamax_source() -> str:
    return tokamax_gmm()[0]


def kernel_families(interpret: bool) -> list[str]:
    """The kernel family "auto" picks here, then Triton when that is Mosaic GPU (a Hopper GPU):
    both are checked and timed side by side until a device has measured which to keep."""
    fam = kp.resolve_backend("auto", interpret=interpret)
    return [fam, "triton"] if fam == "mosaic_gpu" else [fam]  # Triton: while jax ships it


def run_correctness(sec, s, meta) -> dict:
    families = kernel_families(s.interpret)
    for fam in families:
        ops = correctness.kernel_ops(fam, s.interpret, s.check_blocks)
        for dt in s.dtypes:
            sec.item(
                f"kernels {fam} {dt}",
                lambda ops=ops, dt=dt: correctness.check_kernels(ops, dt, s.check_kernels, True),
            )
    source, tok = tokamax_gmm()
    if tok is not None:
        for dt in s.dtypes:
            ops = correctness.ragged_ops(tok)
            sec.item(
                f"kernels tokamax {dt}",
                lambda ops=ops, dt=dt: correctness.check_kernels(ops, dt, s.check_kernels, False),
            )
    ref = {}

    def reference():
        ref.update(correctness.layer_reference(s.check_layer))
        return dict(backend="dense", dtype="float32", precision="highest")

    sec.item("layer reference", reference)
    backends = available_backends()
    for name, why in backends.items():
        if why is not None:
            sec.rec["items"][f"layer {name}"] = dict(available=False, reason=why)
            continue
        for dt in s.layer_dtypes:
            sec.item(
                f"layer {name} {dt}",
                lambda name=name, dt=dt: correctness.check_layer(name, dt, s.check_layer, ref),
            )
    results = [
        (f"{key}: {case}", r)
        for key, res in sec.rec["items"].items()
        for case, r in res.items()
        if isinstance(r, dict) and "ok" in r
    ]
    failed = [name for name, r in results if not r["ok"]]
    return dict(
        checks=len(results),
        failed=failed,
        all_ok=not failed and not sec.rec["errors"] and not sec.rec["skipped"],
        kernel_families=families,
        backends={name: why is None for name, why in backends.items()},
        tokamax=source,
        tolerances=correctness.TOL,
    )


def matmul_tflops(n: int, dtype: str, repeats: int) -> dict:
    """A dense [n, n] @ [n, n] matmul: the device's practical peak for comparison with MFU."""
    x = jax.random.normal(jax.random.key(0), (n, n), dtype)
    bench = Bench()
    bench.add("matmul", jax.jit(lambda a, b: a @ b), x, x)
    bench.run(repeats)
    secs = bench.seconds("matmul")
    return dict(n=n, dtype=dtype, seconds=secs, tflops=2.0 * n**3 / secs / 1e12)


def tokamax_peers(gmm):
    """gmm.py's `extra`: tokamax forward and its weight gradient (the tgmm peer)."""

    def extra(lhs, rhs, gs, grad):
        fwd = jax.jit(gmm)
        bwd = jax.jit(gmm_bench.rhs_grad(gmm))
        return {"tokamax": (fwd, (lhs, rhs, gs)), "tokamax_t": (bwd, (lhs, rhs, gs, grad))}

    return extra


def _ratios(tf: dict) -> dict:
    pairs = [("gmm", "dense"), ("gmm", "ragged"), ("gmm", "tokamax")]
    pairs += [("tgmm", "dense_t"), ("tgmm", "ragged_t"), ("tgmm", "tokamax_t")]
    return {f"{a}/{b}": tf[a] / tf[b] for a, b in pairs if a in tf and b in tf}


def _follows_rows(points: list[dict]) -> dict:
    """t(null) / t(null=0) of gmm and tgmm; time_falls: strictly falling with real rows."""
    base = next((p["seconds"] for p in points if p["null"] == 0.0), None)
    if base is None:
        return dict(time_falls=None, note="no null=0 point")
    rel = {str(p["null"]): {k: p["seconds"][k] / base[k] for k in ("gmm", "tgmm")} for p in points}
    pairs = zip(points, points[1:])
    falls = all(b["seconds"][k] < a["seconds"][k] for a, b in pairs for k in ("gmm", "tgmm"))
    return dict(t_over_t0=rel, time_falls=falls and len(points) > 1)


def run_gmm(sec, s, meta) -> dict:
    families = kernel_families(s.interpret)
    source, tok = tokamax_gmm()
    extra = tokamax_peers(tok) if tok is not None else None
    peak = sec.item("dense matmul", lambda: matmul_tflops(s.peak_n, s.gmm_dtype, s.repeats))
    shapes = {}
    for fam, (shape, (rows, d, f, groups)) in itertools.product(families, s.gmm_shapes.items()):
        ns = types.SimpleNamespace(
            rows=rows, d=d, f=f, dtype=s.gmm_dtype, repeats=s.repeats, no_ragged=False
        )
        ns.block_sizes = s.gmm_blocks
        points = []
        key = shape if fam == families[0] else f"{shape} [{fam}]"
        print(f"\n{shape}: R={rows} D={d} F={f} {s.gmm_dtype}, {fam} kernel, useful TFLOP/s")
        print(gmm_bench.HEADER, flush=True)

        def point(null, ns=ns, groups=groups, shape=shape, points=points, fam=fam):
            p = gmm_bench.bench_point(ns, groups, null, fam, s.interpret, extra=extra)
            p.update(shape=shape, rows=ns.rows, d=ns.d, f=ns.f, backend=fam, dtype=ns.dtype)
            p["ratios"] = _ratios(p["tflops"])
            t0 = next((q["seconds"]["gmm"] for q in points if q["null"] == 0.0), None)
            print(gmm_bench.fmt_row(p, t0), flush=True)
            return p

        for null in s.nulls:
            p = sec.item(f"{key} null={null}", lambda null=null, point=point: point(null))
            if p is not None:
                points.append(p)
        shapes[key] = dict(rows=rows, d=d, f=f, groups=groups, kernel=fam, **_follows_rows(points))
    return dict(
        kernel=families[0],
        families=families,
        dtype=s.gmm_dtype,
        tokamax=source,
        dense_matmul=peak,
        shapes=shapes,
    )


def run_layer(sec, s, meta) -> dict:
    backend = resolve_backend("auto")  # what the layer runs here by default
    if s.layer_peers is None:
        skip = ("auto", backend, "tiled_unfused")  # run_shape times tiled_unfused itself
        peers = tuple(n for n, why in available_backends().items() if why is None and n not in skip)
    else:
        peers = s.layer_peers
    for i, (n, f) in enumerate(s.layer_shapes):
        with_peers = s.layer_with_peers and i == 0  # first shape only: peers are slow

        def shape(n, f, with_peers):
            kw = dict(backend=backend, d_model=s.layer_d, peer_backends=peers)
            bench, realized = moe_layer.run_shape(
                n, f, s.layer_tokens, s.layer_repeats, with_peers, False, sec.log,
                dtype=s.layer_dtype, **kw,
            )  # fmt: skip
            return moe_layer.report(n, f, s.layer_tokens, bench, realized, with_peers, False, **kw)

        def run(n=n, f=f, with_peers=with_peers):
            """One Bench per shape (its ratios need one process and one set of rounds): when a
            peer fails (e.g. the dense reference out of memory), the shape runs again without
            the peers rather than losing the whole shape."""
            try:
                return shape(n, f, with_peers)
            except Exception as e:
                if not with_peers:
                    raise
                sec.rec["errors"][f"N={n} F={f} with peers"] = f"{type(e).__name__}: {e}"[:4000]
                sec.log(f"N={n} F={f} with peers: ERROR {type(e).__name__}; again without peers")
            gc.collect()  # outside the except block: the failed run's buffers are free now
            return shape(n, f, False)

        sec.item(f"N={n} F={f}", run)
    return dict(backend=backend, peers=peers, d_model=s.layer_d, tokens=s.layer_tokens)


def _describe(v) -> dict:
    summary = model_summary(v.cfg.model)
    return dict(
        config=v.arg,
        compile_s=v.compile_s,
        train_steps=v.train_steps,
        tokens_per_step=v.tokens,
        total_params=summary["total_params"],
        active_params=summary["active_params_per_token"],
    )


def run_train(sec, s, meta) -> dict:
    import train_step as ts  # grain and ml-collections (on the device: the wheelhouse)

    variants = []
    reserve = 0.2 * sec.budget_s  # left for the timed rounds when building stops
    for label, arg in s.train_variants:
        v = sec.item(
            f"build {label}",
            lambda label=label, arg=arg: ts.Variant(
                label, arg + s.train_suffix, 2, s.train_steps, overrides=s.train_overrides
            ),
            record=_describe,
            need_s=reserve,
        )
        if v is not None:
            variants.append(v)
    if not variants:
        raise RuntimeError("no train variant was built (see errors / skipped)")
    for r in range(s.rounds):
        if r > 0 and sec.left() <= 0:
            sec.rec["skipped"].append(f"rounds {r + 1}-{s.rounds}")
            sec.rec["note"] = f"time budget of {sec.budget_s:.0f} s spent: {r} timed rounds"
            break
        ts.time_rounds(variants, 1, s.calls, sec.log)
    has_dense = any(v.label == "dense" for v in variants)
    report = ts.report(variants, {}) if has_dense else None
    dense_ms = next((v.ms for v in variants if v.label == "dense"), None)
    peak = meta["peak_bf16_tflops"]
    rows = {}
    for v in variants:
        # Training FLOPs: forward + backward (twice the forward) of the analytic forward count.
        flops = 3.0 * model_summary(v.cfg.model)["flops_per_sequence"] * v.cfg.data.batch_size
        secs = v.ms / 1e3
        rows[v.label] = dict(
            median_ms=v.ms,
            best_ms=v.best_ms,
            steps_timed=len(v.times),
            tokens_per_s=v.tokens / secs,
            ratio_to_dense=v.ms / dense_ms if dense_ms else None,
            flops_per_step=flops,
            model_tflops=flops / secs / 1e12,
            mfu=flops / secs / (peak * 1e12) if peak else None,
        )
        if report is not None:
            routing = report["variants"][v.label]
            for key in ("real_per_token", "load_skew"):
                rows[v.label][key] = routing[key]
    return dict(
        variants=rows,
        targets=report["targets"] if report else None,
        mfu_basis="3 x forward FLOPs (moe_jax.model.summary) per step / peak_bf16_tflops",
        train_steps=s.train_steps,
    )


def _cols(tf: dict, names) -> str:
    return " ".join(f"{tf[k]:8.3g}" if k in tf else "       -" for k in names)


def print_summary(out: dict) -> None:
    """The closing table: section status, then each section's headline figures."""
    meta, secs = out["meta"], out["sections"]
    print(f"\n== summary: {meta['device_kind']}, jax {meta['versions'].get('jax')} ==")
    print(f"{'section':12s} status  {'s':>7s} {'budget':>7s} items errors skipped")
    for name, rec in secs.items():
        print(
            f"{name:12s} {rec['status']:7s} {rec.get('seconds', 0):7.1f} {rec['budget_s']:7.0f} "
            f"{len(rec['items']):5d} {len(rec['errors']):6d} {len(rec['skipped'])}"
        )
    summ = lambda name: (secs.get(name) or {}).get("summary") or {}  # noqa: E731
    if summ("correctness"):
        c = summ("correctness")
        print(f"\ncorrectness: {c['checks']} checks, failed: {c['failed'] or 'none'}")
    gmm_items = (secs.get("gmm") or {}).get("items", {})
    points = [p for p in gmm_items.values() if isinstance(p, dict) and "shape" in p]
    if points:
        fwd = ("gmm", "dense", "ragged", "tokamax")
        bwd = ("tgmm", "dense_t", "ragged_t", "tokamax_t")
        print(f"\ngmm, TFLOP/s of useful work ({' '.join(fwd)} | {' '.join(bwd)})")
        for p in points:
            row = f"{p['shape']:13s} {p['backend']:10s} null={p['null']:4.2f} | "
            row += _cols(p["tflops"], fwd)
            print(f"{row} | {_cols(p['tflops'], bwd)}")
        for shape, r in summ("gmm").get("shapes", {}).items():
            print(f"{shape}: time falls with real rows: {r.get('time_falls')}")
    for key, rep in (secs.get("layer") or {}).get("items", {}).items():
        print(f"\nlayer {key}:")
        for r in rep.get("ratios", []):
            mark = "" if r["ok"] is None else ("ok" if r["ok"] else "MISSED")
            print(f"  {r['name']:38s} {r['value']:7.2f} {r['target'] or '':>9s} {mark}")
    rows = summ("train").get("variants", {})
    if rows:
        print(f"\ntrain step: {'variant':22s} {'ms':>8s} {'tok/s':>9s} {'/dense':>7s} {'MFU':>6s}")
        for label, r in rows.items():
            ratio = f"{r['ratio_to_dense']:7.3f}" if r["ratio_to_dense"] else "      -"
            mfu = f"{100 * r['mfu']:5.1f}%" if r["mfu"] else "     -"
            figures = f"{r['median_ms']:8.1f} {r['tokens_per_s']:9.0f} {ratio} {mfu}"
            print(f"            {label:22s} {figures}")
