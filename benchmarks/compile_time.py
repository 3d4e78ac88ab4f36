"""Compile time against depth, scanned (model.scan_layers=True) vs unrolled blocks, on this CPU.

For each layout and depth, the default model's train step (configs/default.py, exactly what
train.py runs) is traced, lowered and compiled once in this process (after one untimed warm-up
compile; jax's caches cleared between cases, no persistent compilation cache); then the step
time of the two layouts at the default depth is measured in interleaved rounds on one batch,
the state fed back (donated).

  python benchmarks/compile_time.py                       # depths 2 and 16, step time at 4
  python benchmarks/compile_time.py --depths 2 8 16 --rounds 5 --steps 20

Prints seconds per compile, the 16-vs-2 ratio per layout (target for scanned: <= 1.3), the
median ms per step per layout and the scanned / unrolled step-time ratio (target: within 5%),
and the machine load (os.getloadavg) beside the timings: the CPU may be shared.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from moe_jax import data as data_lib
from moe_jax.train import config as config_lib
from moe_jax.train import step as step_lib


def _default_config(arg: str | None):
    path = os.path.join(os.path.dirname(__file__), "..", "configs", "default.py")
    spec = importlib.util.spec_from_file_location("moe_jax_default_config", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(arg)


def train_config(arg: str | None, n_layers: int, scan: bool):
    """The TrainConfig of configs/default.py:arg at n_layers blocks and the given layout."""
    c = _default_config(arg)
    c.model.n_layers = n_layers
    c.model.scan_layers = scan
    return config_lib.from_config_dict(c)


def _load() -> str:
    return "load {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def compile_seconds(cfg) -> float:
    """Seconds to trace + lower + compile cfg's train step (abstract state and batch)."""
    graphdef = step_lib.model_graphdef(cfg)
    state = jax.eval_shape(lambda: step_lib.init_state(cfg)[1])
    batch = {
        k: jax.ShapeDtypeStruct(shape, dtype)
        for k, (shape, dtype) in data_lib.batch_spec(cfg.data).items()
    }
    tx, schedule = step_lib.make_optimizer(cfg.opt, cfg.num_steps)
    kw = dict(graphdef=graphdef, tx=tx, schedule=schedule, spec=step_lib.StepSpec())
    jax.clear_caches()
    t0 = time.perf_counter()
    step_lib.train_step.trace(state, batch, np.int32(-1), None, **kw).lower().compile()
    return time.perf_counter() - t0


class Stepper:
    """One layout's compiled train step on a fixed batch."""

    def __init__(self, cfg):
        graphdef, self.state = step_lib.init_state(cfg)
        batch = next(data_lib.make_dataset(cfg.data, "train"))
        self.batch = jax.device_put({k: jnp.asarray(v) for k, v in batch.items()})
        self.state = step_lib.calibrate_null_state(graphdef, self.state, self.batch)
        tx, schedule = step_lib.make_optimizer(cfg.opt, cfg.num_steps)
        kw = dict(graphdef=graphdef, tx=tx, schedule=schedule, spec=step_lib.StepSpec())
        self.fail_at = np.int32(-1)
        self.compiled = step_lib.train_step.lower(
            self.state, self.batch, self.fail_at, None, **kw
        ).compile()
        for _ in range(3):
            self.step()

    def step(self):
        self.state, m = self.compiled(self.state, self.batch, self.fail_at, None)
        return m

    def time_ms(self, steps: int) -> float:
        jax.block_until_ready(self.state)
        t0 = time.perf_counter()
        for _ in range(steps):
            m = self.step()
        jax.block_until_ready(m)
        return (time.perf_counter() - t0) / steps * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=None, help="configs/default.py variant arg")
    p.add_argument("--depths", type=int, nargs="+", default=[2, 16])
    p.add_argument("--layouts", nargs="+", default=["scanned", "unrolled"])
    p.add_argument("--step-layers", type=int, default=4, help="depth of the step-time run")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=10, help="steps per round")
    p.add_argument("--no-steps", action="store_true", help="compile times only")
    a = p.parse_args()
    print(f"jax {jax.__version__}, {jax.devices()[0].platform}, {os.cpu_count()} CPUs, {_load()}")
    secs = {}
    compile_seconds(train_config(a.config, min(a.depths), True))  # warm-up: first-compile costs
    for layout in a.layouts:
        for n in a.depths:
            s = compile_seconds(train_config(a.config, n, layout == "scanned"))
            secs[layout, n] = s
            print(f"compile {layout:8s} {n:3d} layers: {s:6.1f} s  ({_load()})", flush=True)
    lo, hi = min(a.depths), max(a.depths)
    for layout in a.layouts:
        print(f"{layout}: {hi} / {lo} layers = {secs[layout, hi] / secs[layout, lo]:.2f}x")
    if a.no_steps:
        return
    steppers = {
        lay: Stepper(train_config(a.config, a.step_layers, lay == "scanned")) for lay in a.layouts
    }
    times = {lay: [] for lay in a.layouts}
    for _ in range(a.rounds):  # interleaved: both layouts see the same machine load
        for lay, s in steppers.items():
            times[lay].append(s.time_ms(a.steps))
    med = {lay: statistics.median(t) for lay, t in times.items()}
    for lay in a.layouts:
        print(f"step {lay:8s} {a.step_layers} layers: {med[lay]:.1f} ms (median of {a.rounds})")
    if len(med) == 2:
        print(f"step time scanned / unrolled = {med['scanned'] / med['unrolled']:.3f} ({_load()})")


if __name__ == "__main__":
    main()
