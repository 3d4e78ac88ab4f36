"""What the benchmarks share: one interleaved timer and one bisection for calibrations.

Run the benchmarks as scripts (python benchmarks/NAME.py); they import this file as `common`.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable

import jax


def exec_with_huge_pages() -> None:
    """Re-execute this benchmark once with glibc's malloc on transparent huge pages, as
    train.py runs (see its docstring): the steps timed are the steps a training run takes.
    A no-op where the kernel's THP mode is not madvise, or with MOE_JAX_HUGE_PAGES=0."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if os.environ.get("MOE_JAX_HUGE_PAGES", "1") == "0" or "glibc.malloc.hugetlb" in tunables:
        return
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            if "[madvise]" not in f.read():
                return
    except OSError:
        return
    tunables = ":".join(filter(None, (tunables, "glibc.malloc.hugetlb=1")))
    os.execve(sys.executable, sys.orig_argv, dict(os.environ, GLIBC_TUNABLES=tunables))


class Bench:
    """Variants registered by name, compiled once, timed in interleaved rounds (round r times
    every variant), medians reported: ratios of variants measured side by side are what to
    read on a shared machine, not the absolute numbers."""

    def __init__(self):
        self.fns, self.mem, self.times, self.info, self.estimate = {}, {}, {}, {}, {}

    def add(self, name: str, fn, *args, **info) -> None:
        """fn: a jitted function (compiled here; its temp memory is recorded) or any callable."""
        if hasattr(fn, "lower"):
            fn = fn.lower(*args).compile()
            mem = fn.memory_analysis()
            self.mem[name] = getattr(mem, "temp_size_in_bytes", 0) if mem is not None else 0
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))  # warm-up, timed: sets the calls per round
        self.estimate[name] = time.perf_counter() - t0
        self.fns[name] = (fn, args)
        self.times[name] = []
        self.info[name] = info

    def run(self, repeats: int, *, max_calls: int = 10) -> None:
        """Interleaved rounds. In each, a variant under a second gets one untimed call first,
        so caches evicted by the large peers timed before it do not land on its measurement,
        then as many timed calls as fit in about half a second (up to max_calls), so the
        short variants, the noisiest on a shared machine, get more samples."""
        for _ in range(repeats):
            for name, (fn, args) in self.fns.items():
                est = self.estimate[name]
                if est < 1.0 and max_calls > 1:
                    jax.block_until_ready(fn(*args))
                for _ in range(max(1, min(max_calls, int(0.5 / max(est, 1e-3))))):
                    t0 = time.perf_counter()
                    jax.block_until_ready(fn(*args))
                    self.times[name].append(time.perf_counter() - t0)

    def seconds(self, name: str) -> float:
        return statistics.median(self.times[name])

    def ms(self, name: str) -> float:
        return 1e3 * self.seconds(name)


def bisect_decreasing(f: Callable[[float], float], target: float, lo: float, hi: float, steps: int):
    """x in [lo, hi] with f(x) ~= target for a non-increasing f (e.g. real experts per token
    against the null-logit bias)."""
    for _ in range(steps):
        mid = (lo + hi) / 2
        if f(mid) > target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2
