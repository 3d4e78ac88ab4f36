"""Every accelerator figure of the project in one process, on whatever device jax sees.

In about 8 minutes on one H200 or one TPU chip:
1. correctness: the Pallas kernels natively (on H100 / H200 both the Mosaic GPU and the Triton
   family; gmm, transposed gmm, tgmm; bfloat16, float32;
   empty groups, all-null batches, rows past the real count) and every expert backend's MoE
   layer (values and gradients) against dense references; any non-finite value fails
   (correctness.py).
2. gmm: gmm and tgmm TFLOP/s against a dense matmul of equal FLOPs, jax.lax.ragged_dot and
   tokamax (when present), for each kernel family (Mosaic GPU and Triton on Hopper), at a
   Mixtral-like shape (D=4096, F=14336, N=8) and a fine-grained one (D=2048, F=1408, N=64),
   with 0, 50 and 75% null rows: time must fall with real rows (gmm.py's bench_point).
3. layer: the MoE layer's forward+backward rho sweep, iso-FLOP family and peers, with the
   backend "auto" picks here (moe_layer.py's run_shape and ratios).
4. train: the train step of a 0.31B (dense) to 0.91B (MoE) parameter model for dense, K^2_1.0,
   K^4_0.5, K^8_0.25 and fine-grained K^16_0.5: tokens/s, MFU and ratios to dense
   (train_step.py's Variant). It needs grain and ml-collections (wheelhouse.py); sections 1-3
   import only jax, flax, optax, numpy and the project.

Each section is guarded (an exception is recorded in the JSON and the next section runs) and
has a time budget, its share of the time left (--budget: 480 s from the start; its remaining
items are skipped, with a note, once it is spent). Progress lines carry timestamps,
and the JSON is rewritten after every item, so a run stopped at its time limit still returns
what it measured. The process takes 90% of a GPU's memory (XLA_PYTHON_CLIENT_MEM_FRACTION,
unless set). --smoke runs the same code at tiny shapes, with fewer repetitions of loops whose
code is the same for each (accelerator_sections.settings): on CPU, in Pallas interpret mode, in
about a minute of CPU time (tests/test_benchmarks.py); there its numbers mean nothing.

  python benchmarks/accelerator.py --json out.json
  python benchmarks/accelerator.py --smoke --json smoke.json
  python benchmarks/accelerator.py --sections correctness,gmm --budget 300
  python benchmarks/accelerator.py --wheelhouse .whl [--with-tokamax]   # here, once; then
  echo /.whl/ >> .git/info/exclude                                      # never committed

The device command (the tool `run`, carry [".whl"], timeout_s 600: two minutes past the
budget for the start and the imports), as one line:
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade
  --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit;
  PYTHONUNBUFFERED=1 python3 benchmarks/accelerator.py --json $OUT/accelerator.json 2>&1
  | tee $OUT/accelerator.log
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import math
import os
import pathlib
import platform
import sys
import time
import traceback

sys.path.insert(1, str(pathlib.Path(__file__).resolve().parents[1]))  # the project, uninstalled

import accelerator_sections as sections  # noqa: E402

SECTIONS = ("correctness", "gmm", "layer", "train")
# Each section's share of the time left when it starts (so an early section's overrun shrinks
# the later ones and its savings grow them): 72, 144, 96 and 168 s of 480 when on time.
SHARES = {"correctness": 0.15, "gmm": 0.3, "layer": 0.2, "train": 0.35}
SMOKE_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
# Dense bfloat16 peak TFLOP/s per chip, for MFU: (device_kind substring, TFLOP/s, source).
# First match wins; a kind matching none gets no MFU.
PEAK_BF16 = (
    ("NVL", None, "H100 NVL / H200 NVL: lower clocks than the SXM parts; not tabled"),
    ("H200", 989.0, "NVIDIA H200 datasheet: 1,979 TFLOPS bf16 with 2:4 sparsity, half dense"),
    ("H100 PCIe", 756.0, "NVIDIA H100 datasheet, PCIe: 1,513 TFLOPS bf16 with sparsity"),
    ("H100", 989.0, "NVIDIA H100 datasheet, SXM: 1,979 TFLOPS bf16 with sparsity"),
    ("A100", 312.0, "NVIDIA A100 datasheet: 312 TFLOPS bf16 dense (624 with sparsity)"),
    ("TPU v5 lite", 197.0, "Cloud TPU docs, v5e: 197 TFLOP/s bf16 per chip"),
    ("TPU v5e", 197.0, "Cloud TPU docs, v5e: 197 TFLOP/s bf16 per chip"),
    ("TPU v6", 918.0, "Cloud TPU docs, v6e (Trillium): 918 TFLOP/s bf16 per chip"),
    ("TPU v5", 459.0, "Cloud TPU docs, v5p: 459 TFLOP/s bf16 per chip"),
)


def peak_tflops(device_kind: str) -> tuple[float | None, str]:
    """(dense bf16 peak TFLOP/s, its source) for a jax device_kind; None when not tabled."""
    for pattern, tflops, source in PEAK_BF16:
        if pattern in device_kind:
            return tflops, source
    return None, f"{device_kind!r} is not in PEAK_BF16: MFU omitted"


def environment(smoke: bool) -> dict:
    """The device, the versions and the settings a reader needs to place the figures."""
    import jax

    dev = jax.devices()[0]
    peak, source = peak_tflops(dev.device_kind)
    versions = {}
    for dist in (
        "jax",
        "jaxlib",
        "jax-cuda13-plugin",
        "jax-cuda12-plugin",
        "libtpu",
        "flax",
        "optax",
        "orbax-checkpoint",
        "numpy",
        "triton",
        "tokamax",
        "grain",
        "ml-collections",
    ):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    try:
        memory = (dev.memory_stats() or {}).get("bytes_limit")
    except Exception:  # CPU and some plugins have no memory statistics
        memory = None
    return dict(
        device_kind=dev.device_kind,
        platform=dev.platform,
        device_count=jax.device_count(),
        compute_capability=getattr(dev, "compute_capability", None),
        memory_bytes=memory,
        python=platform.python_version(),
        versions=versions,
        peak_bf16_tflops=peak,
        peak_source=source,
        smoke=smoke,
        argv=sys.argv,
        started=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    )


def _clean(obj):
    """JSON-safe: numpy scalars to Python, non-finite floats to None, tuples to lists."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    if hasattr(obj, "item") and getattr(obj, "ndim", 1) == 0:
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj if isinstance(obj, str | int | float | bool | type(None)) else repr(obj)


class Section:
    """One section's record and clock: items run guarded, each saved as it finishes."""

    def __init__(self, runner: Runner, name: str, budget_s: float):
        self.runner, self.name, self.budget_s = runner, name, budget_s
        self.deadline = time.perf_counter() + budget_s
        self.rec = dict(status="running", budget_s=budget_s, items={}, errors={}, skipped=[])

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def log(self, msg: str) -> None:
        self.runner.log(f"  [{self.name}] {msg}")

    def item(self, key: str, fn, *, record=None, need_s: float = 0.0):
        """fn()'s result (stored under items[key], through `record` if given), or None when
        it raised (errors[key]) or the budget has less than need_s left (skipped)."""
        if self.left() <= need_s:
            self.rec["skipped"].append(key)
            self.rec["note"] = f"time budget of {self.budget_s:.0f} s spent: items skipped"
            self.log(f"skipped {key}: budget spent")
            return None
        t0 = time.perf_counter()
        try:
            value = fn()
        except Exception as e:
            self.rec["errors"][key] = f"{type(e).__name__}: {e}"[:4000]
            self.log(f"{key}: ERROR {type(e).__name__}: {str(e)[:400]}")
            self.runner.write()
            return None
        self.rec["items"][key] = record(value) if record else value
        self.log(f"{key}: {time.perf_counter() - t0:.1f} s")
        self.runner.write()
        return value


class Runner:
    """Runs sections in turn; writes the JSON after every item and section."""

    def __init__(self, json_path: str | None, meta: dict):
        self.json_path, self.t0 = json_path, time.perf_counter()
        self.out = dict(meta=meta, sections={}, finished=False)

    def log(self, msg: str) -> None:
        stamp = f"{time.strftime('%H:%M:%S')} +{time.perf_counter() - self.t0:6.1f}s"
        print(f"[{stamp}] {msg}", flush=True)

    def write(self) -> None:
        self.out["elapsed_s"] = time.perf_counter() - self.t0
        if self.json_path:
            tmp = f"{self.json_path}.tmp"
            with open(tmp, "w") as fh:
                json.dump(_clean(self.out), fh, indent=1)
            os.replace(tmp, self.json_path)  # a reader never sees half a file

    def section(self, name: str, fn, budget_s: float) -> dict:
        """fn(section) -> summary; an exception marks the section 'error' and returns."""
        sec = Section(self, name, budget_s)
        self.out["sections"][name] = rec = sec.rec
        self.log(f"== {name} (budget {budget_s:.0f} s)")
        t0 = time.perf_counter()
        try:
            rec["summary"] = fn(sec)
            rec["status"] = "ok"
        except Exception as e:
            rec["status"] = "error"
            rec["error"] = f"{type(e).__name__}: {e}"[:4000]
            rec["traceback"] = traceback.format_exc()[-8000:]
            self.log(f"== {name}: ERROR {type(e).__name__}: {str(e)[:400]}")
        rec["seconds"] = time.perf_counter() - t0
        gc.collect()  # the section's device buffers go before the next one allocates
        self.write()
        return rec


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--json", default=None, help="write every figure here (after each item)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (CPU: interpret mode)")
    ap.add_argument("--sections", default=",".join(SECTIONS), help="comma list, in this order")
    ap.add_argument("--budget", type=float, default=None, help="seconds, all sections (480)")
    ap.add_argument("--train-steps", type=int, default=0, help="train steps before timing")
    ap.add_argument("--wheelhouse", default=None, help="download the train wheels here, exit")
    ap.add_argument("--with-tokamax", action="store_true", help="--wheelhouse: add tokamax")
    args = ap.parse_args(argv)
    if args.wheelhouse:
        import wheelhouse

        wheelhouse.download(args.wheelhouse, args.with_tokamax)
        return {}
    chosen = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(chosen) - set(SECTIONS))
    if unknown:
        ap.error(f"--sections: unknown {unknown}; known: {','.join(SECTIONS)}")
    # Read when jax starts its backend, i.e. below. Smoke: XLA compiles tiny programs faster.
    if args.smoke:
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {SMOKE_FLAGS}".strip()
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")  # 5 train states of 0.9B
    import jax

    smoke = args.smoke or jax.default_backend() not in ("gpu", "tpu")
    runner = Runner(args.json, environment(smoke))
    meta = runner.out["meta"]
    settings = sections.settings(smoke, train_steps=args.train_steps)
    meta["tokamax"] = sections.tokamax_source()
    budget = args.budget or (1800.0 if smoke else 480.0)
    meta["budget_s"] = budget
    runner.log(
        f"{meta['device_kind']} ({meta['platform']}), jax {meta['versions'].get('jax')}, "
        f"peak {meta['peak_bf16_tflops']} TFLOP/s bf16, tokamax: {meta['tokamax']}"
        + (", SMOKE: tiny shapes, numbers meaningless" if smoke else "")
    )
    runner.write()
    todo = [s for s in SECTIONS if s in chosen]
    for i, name in enumerate(todo):
        left = budget - (time.perf_counter() - runner.t0)
        share = SHARES[name] / sum(SHARES[n] for n in todo[i:])
        fn = getattr(sections, f"run_{name}")
        runner.section(name, lambda sec, fn=fn: fn(sec, settings, meta), max(0.0, share * left))
    runner.out["finished"] = True
    runner.write()
    try:
        sections.print_summary(runner.out)
    except Exception as e:  # the JSON holds every figure already
        runner.log(f"summary table failed: {type(e).__name__}: {e}")
    if args.json:
        runner.log(f"wrote {args.json}")
    return runner.out


if __name__ == "__main__":
    main()
