"""The jitted train step of the default model, MoE variants against the dense FFN model.

Every variant is first trained for --train-steps steps (100) on the training stream, so that
the timed steps see a trained router's routing, not the initial one (at initialization one or
two experts take most rows of this data). Its train_step (forward, backward, AdamW update:
exactly what train.py runs) is then compiled, warmed up and timed in interleaved rounds in
this one process, on one fixed training batch, the state fed back as train.py does (donated).
Null routers are calibrated on that batch before every round (as train.py does before step
1), and the learning rate is held near 0 (a long warmup), so every timed step runs at the
density K*rho.

  python benchmarks/train_step.py                 # default model + fine-grained variants
  python benchmarks/train_step.py --json out.json --rounds 7
  python benchmarks/train_step.py --only default  # the six default-model variants
  python benchmarks/train_step.py --only layout   # K^4_0.5 scanned vs unrolled blocks

Prints, per variant: median ms per step, tokens/s, the ratio to the dense step, the real
experts per token, the load skew (largest expert's share of the rows times N), and where
the time goes (XLA profiler, by named scope): router (logits, routing, statistics), dispatch
(the assignment sort), experts (gather + expert FFN; the dense model's FFN), combine
(weighted scatter back to tokens), rest (attention, embeddings, dense layers, optimizer).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from common import exec_with_huge_pages
from profile_scopes import scope_shares

from moe_jax import data as data_lib
from moe_jax.train import config as config_lib
from moe_jax.train import step as step_lib


def _load_configs():
    """configs/default.py as a module (the configs folder is not a package)."""
    path = os.path.join(os.path.dirname(__file__), "..", "configs", "default.py")
    spec = importlib.util.spec_from_file_location("moe_jax_default_config", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# (label, config arg): the default model; every MoE variant has the dense model's active FLOPs.
DEFAULT = (
    ("dense", "dense"),
    ("K^2_1.0", "k2_rho1"),
    ("K^4_0.5", "default"),
    ("K^8_0.25", "k8_rho025"),
    ("top-2", "topk"),
    ("XMoE t=0.9 (N=32, F/4)", "xmoe"),
)
# Fine-grained: N=32 experts of width F/4, 4x the slots (configs/default.py modifier "fine").
FINE = (
    ("fine K^8_1.0 (N=32)", "k2_rho1,fine"),
    ("fine K^16_0.5 (N=32)", "default,fine"),
)
# Scanned blocks (model.scan_layers, the default) against the unrolled loop, side by side.
LAYOUT = (("dense", "dense"), ("K^4_0.5", "default"), ("K^4_0.5 unrolled", "default"))
UNROLLED = {"K^4_0.5 unrolled"}
CATEGORIES = (
    ("combine", ("combine",)),
    ("dispatch", ("dispatch",)),
    ("experts", ("experts", "dense_ffn")),
    ("router", ("router_logits", "route", "routing_stats", "controllers")),
)
TARGETS = (  # (ratio name, numerator, denominator, bound, kind)
    ("t(K^4_0.5)/t(dense)", "K^4_0.5", "dense", 1.03, "<="),
    ("speed(K^8_0.25)/speed(K^4_0.5)", "K^4_0.5", "K^8_0.25", 0.98, ">="),
    ("t(fine K^8_1.0)/t(dense)", "fine K^8_1.0 (N=32)", "dense", 1.2, "<="),
    ("t(fine K^16_0.5)/t(dense)", "fine K^16_0.5 (N=32)", "dense", 1.2, "<="),
    ("t(scanned)/t(unrolled) K^4_0.5", "K^4_0.5", "K^4_0.5 unrolled", 1.05, "<="),
)


class Variant:
    """One config's compiled train step and its (donated, fed back) state."""

    def __init__(
        self, label: str, arg: str, steps_before: int, train_steps: int = 0, overrides=None
    ):
        """overrides(config_dict): edits the config before it is converted (e.g. a model
        sized for an accelerator, benchmarks/accelerator.py)."""
        c = _load_configs().get_config(arg)
        c.log.eval_every, c.log.tensorboard, c.log.progress, c.log.plots = 0, False, False, False
        if overrides is not None:
            overrides(c)
        run_warmup = c.opt.warmup_steps  # the config's own warmup, for the pre-training run
        # A warmup of 10^6 steps keeps the learning rate near 0: the step computes exactly
        # what it does in training, but the weights, and so the routing, stay where the
        # calibration put them (training on one repeated batch would move them within steps).
        c.num_steps, c.opt.warmup_steps = 10**6, 10**6
        self.label, self.arg = label, arg
        self.cfg = cfg = config_lib.from_config_dict(c)
        graphdef, state = step_lib.init_state(cfg)
        self.graphdef = graphdef
        batch = next(data_lib.make_dataset(cfg.data, "train"))
        self.batch = jax.device_put({k: jnp.asarray(v) for k, v in batch.items()})
        self.tokens = int(np.prod(self.batch["tokens"].shape)) + _image_tokens(cfg, self.batch)
        self.fail_at = np.int32(-1)
        t0 = time.perf_counter()
        state = self._pretrain(state, train_steps, run_warmup)
        self.train_s, self.train_steps = time.perf_counter() - t0, train_steps
        state = step_lib.calibrate_null_state(graphdef, state, self.batch)
        tx, schedule = step_lib.make_optimizer(cfg.opt, cfg.num_steps)
        self.kw = dict(graphdef=graphdef, tx=tx, schedule=schedule, spec=step_lib.StepSpec())
        t0 = time.perf_counter()
        self.compiled = step_lib.train_step.lower(
            state, self.batch, self.fail_at, None, **self.kw
        ).compile()
        self.compile_s = time.perf_counter() - t0
        self.state = state
        for _ in range(steps_before):  # warm; also lets routing move off its first batch
            self.call()
        self.times: list[float] = []

    def _pretrain(self, state: dict, steps: int, warmup: int) -> dict:
        """The fresh state trained for `steps` steps on the training stream, as train.py would
        (null calibration first, the config's schedule over `steps` steps, its warmup capped
        at a quarter of them): timing then sees
        a trained router's routing. At initialization the routing is far from it: one or two
        experts take most rows of this data and several get none (for K^4_0.5, a largest
        group of 1200-1400 rows and 2-4 empty experts per layer; after 200 steps, 390-540
        rows and none empty), and fewer, larger tiles run faster on CPU than balanced ones."""
        if steps <= 0:
            return state
        opt = dataclasses.replace(self.cfg.opt, warmup_steps=min(warmup, steps // 4))
        tx, schedule = step_lib.make_optimizer(opt, steps)
        kw = dict(graphdef=self.graphdef, tx=tx, schedule=schedule, spec=step_lib.StepSpec())
        stream = data_lib.make_dataset(self.cfg.data, "train")
        for i in range(steps):
            batch = jax.device_put({k: jnp.asarray(v) for k, v in next(stream).items()})
            if i == 0:
                state = step_lib.calibrate_null_state(self.graphdef, state, batch)
            state, m = step_lib.train_step(state, batch, self.fail_at, None, **kw)
        jax.block_until_ready((state, m))
        return state

    def recalibrate(self) -> None:
        """Null routers back at their density on this batch (training on one batch drifts)."""
        self.state = step_lib.calibrate_null_state(self.graphdef, self.state, self.batch)

    def call(self):
        self.state, m = self.compiled(self.state, self.batch, self.fail_at, None)
        jax.block_until_ready((self.state, m))
        return m

    def timed(self, n: int) -> None:
        for _ in range(n):
            t0 = time.perf_counter()
            self.call()
            self.times.append(time.perf_counter() - t0)

    def routing_stats(self) -> tuple[float | None, float | None]:
        """(real experts per token, load skew) of one step, averaged over the MoE layers; the
        skew is the largest expert's share of the real rows times N (1 = balanced, N = one
        expert takes every row). (None, None) for the dense model."""
        if self.cfg.moe is None:
            return None, None
        layers = self.call()["moe"]
        real = np.mean([np.asarray(layer["real_per_token"]) for layer in layers])
        loads = [np.asarray(layer["expert_load"]) for layer in layers]
        return float(real), float(np.mean([load.max() * load.shape[0] for load in loads]))

    @property
    def ms(self) -> float:
        return 1e3 * statistics.median(self.times)

    @property
    def best_ms(self) -> float:
        """The fastest timed step: other tenants of a shared machine only add time, so on a
        noisy host this tracks the program's own cost more steadily than the median."""
        return 1e3 * min(self.times)


def _image_tokens(cfg, batch) -> int:
    """Vision tokens per step (image patches the decoder sees) in vlm mode."""
    img = batch.get("image")
    if img is None:
        return 0
    p = cfg.data.patch_size
    return int(img.shape[0] * (img.shape[1] // p) * (img.shape[2] // p))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rounds", type=int, default=10, help="interleaved timing rounds")
    ap.add_argument("--calls", type=int, default=3, help="timed steps per variant per round")
    ap.add_argument("--only", choices=("default", "fine", "layout", "all"), default="all")
    ap.add_argument(
        "--train-steps",
        type=int,
        default=100,
        help="train each variant this many steps before timing (0: time the initial routing)",
    )
    ap.add_argument("--no-breakdown", action="store_true", help="skip the profiler breakdown")
    ap.add_argument("--json", default=None, help="write every number to this file")
    args = ap.parse_args()
    log = lambda s: print(s, flush=True)  # noqa: E731
    log(f"jax {jax.__version__} on {jax.devices()[0].platform} ({platform.machine()})")
    chosen = {"default": DEFAULT, "fine": (DEFAULT[0], *FINE), "all": DEFAULT + FINE}
    chosen = {**chosen, "layout": LAYOUT}[args.only]
    variants = []
    for label, arg in chosen:
        over = _unrolled if label in UNROLLED else None
        v = Variant(label, arg, steps_before=3, train_steps=args.train_steps, overrides=over)
        variants.append(v)
        log(
            f"  {label} ({arg}): trained {args.train_steps} steps in {v.train_s:.0f} s, "
            f"compiled the timed step in {v.compile_s:.0f} s"
        )
    time_rounds(variants, args.rounds, args.calls, log)
    shares = {}
    if not args.no_breakdown:
        for v in variants:
            v.recalibrate()
            shares[v.label] = scope_shares(v.compiled, v.call, CATEGORIES)
    report(variants, shares, args.json)


def _unrolled(c) -> None:
    c.model.scan_layers = False


def time_rounds(variants, rounds: int, calls: int, log) -> None:
    """Interleaved rounds: each round recalibrates, warms and times every variant in turn."""
    for r in range(rounds):
        for v in variants:
            v.recalibrate()
            v.call()  # untimed: caches the peers evicted do not land on a measurement
            v.timed(calls)
        log(f"  round {r + 1}/{rounds}: " + ", ".join(f"{v.ms:.0f}" for v in variants))


def report(variants, shares, json_path=None) -> dict:
    """Prints the table and the targets; returns (and with json_path writes) every number."""
    by = {v.label: v for v in variants}
    dense, dense_best = by["dense"].ms, by["dense"].best_ms
    cats = [c for c, _ in CATEGORIES] + ["rest"]
    order = ("router", "dispatch", "experts", "combine", "rest")
    tokens = variants[0].tokens
    print(
        f"\n== train step, default model ({tokens} tokens/step), median and best of "
        "interleaved calls =="
    )
    head = f"{'variant':24s} {'ms':>7s} {'tok/s':>7s} {'/dense':>7s} {'best':>7s} {'/dense':>7s}"
    head += f" {'real/tok':>8s} {'skew':>5s}"
    if shares:
        head += "  " + " ".join(f"{c:>8s}" for c in order) + "  (ms)"
    print(head)
    rows = {}
    for v in variants:
        v.recalibrate()
        rt, skew = v.routing_stats()
        line = f"{v.label:24s} {v.ms:7.1f} {v.tokens / v.ms * 1e3:7.0f} {v.ms / dense:7.3f}"
        line += f" {v.best_ms:7.1f} {v.best_ms / dense_best:7.3f}"
        line += f" {rt:8.2f} {skew:5.2f}" if rt is not None else " " * 15
        if shares:
            line += "  " + " ".join(f"{shares[v.label][c] * v.ms:8.1f}" for c in order)
        print(line)
        rows[v.label] = dict(
            config=v.arg,
            median_ms=v.ms,
            tokens_per_s=v.tokens / v.ms * 1e3,
            ratio_to_dense=v.ms / dense,
            best_ms=v.best_ms,
            best_ratio_to_dense=v.best_ms / dense_best,
            real_per_token=rt,
            load_skew=skew,
            times_ms=[1e3 * t for t in v.times],
            compile_s=v.compile_s,
            breakdown_ms={c: shares[v.label][c] * v.ms for c in cats} if shares else None,
        )
    targets = []
    print(f"\n{'target (on medians; best steps after)':38s} {'value':>7s} {'bound':>8s}")
    for name, num, den, bound, kind in TARGETS:
        if num not in by or den not in by:
            continue
        value = by[num].ms / by[den].ms
        best = by[num].best_ms / by[den].best_ms
        ok = value <= bound if kind == "<=" else value >= bound
        targets.append(dict(name=name, value=value, best=best, bound=f"{kind} {bound}", ok=ok))
        verdict = "ok" if ok else "MISSED"
        print(f"{name:38s} {value:7.3f} {kind + ' ' + str(bound):>8s} {verdict:6s} best {best:.3f}")
    out = dict(jax=jax.__version__, platform=jax.devices()[0].platform, tokens=tokens)
    out = dict(out, train_steps=variants[0].train_steps, variants=rows, targets=targets)
    if json_path:
        with open(json_path, "w") as fh:
            json.dump(out, fh, indent=1)
        print(f"wrote {json_path}")
    return out


if __name__ == "__main__":
    exec_with_huge_pages()
    main()
