"""Compile the full train step for a TPU or NVIDIA target from any machine (no accelerator,
no data): does it compile, which expert backend runs, and does it fit per device?

    python -m moe_jax.aot --target=tpu:v5e:4x4 --config=configs/default.py:smoke
    python -m moe_jax.aot --target=gpu:h100x8 --config=configs/default.py --config.mesh.expert=8
    python -m moe_jax.aot --target=gpu:t4x1 --json

Targets: "tpu:<libtpu topology>" (tpu:v5e:4x4, tpu:v5p:2x2x2, tpu:v6e:2x2, single chips such as
tpu:v5e:1x1) and "gpu:<name>x<count>" (h100, h200, a100, a100-80gb, l4, t4) from the device
specs in kernels_pallas/gpu_specs. Needs the `[aot]` extra (libtpu, the CUDA PJRT plugin); the
program is compiled for compile-only devices, so nothing runs and nothing is materialized.

The config's mesh section is laid over the target's devices (without one: data parallel over
all of them, expert=1); params, optimizer state and a batch of the config's shapes are
ShapeDtypeStructs with their shardings. Printed: per-device argument / temporary / output
memory against the device's memory, "fits" or "does not fit", compile time, the expert backend
"auto" chose and whether its native kernel is in the compiled program. When XLA itself stops the
compile for want of memory (RESOURCE_EXHAUSTED, TPU), the report is still "does not fit", with
the per-device argument bytes (from the shapes) and XLA's required and available figures; any
other compiler error raises CompileError. Exit statuses of the command: moe_jax.aot.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time

import jax
import numpy as np
from jax.sharding import NamedSharding

from moe_jax import data as data_lib
from moe_jax import parallel
from moe_jax.experts import resolve_backend
from moe_jax.train.config import TrainConfig
from moe_jax.train.step import StepSpec, abstract_state, make_optimizer, train_step

# Custom-call targets of the native Pallas kernels in compiled HLO, per kernel family.
KERNEL_FAMILIES = {
    "tpu": {"Mosaic": "tpu_custom_call"},
    "gpu": {"Mosaic GPU": "mosaic_gpu_v2", "Triton": "__gpu$xla.gpu.triton"},
}


def kernel_families(hlo: str, platform: str) -> list[str]:
    """The Pallas kernel families whose custom calls are in a compiled program's HLO text."""
    return [name for name, marker in KERNEL_FAMILIES[platform].items() if marker in hlo]


# XLA's out-of-memory messages; its sizes are binary ("15.75G" is 15.75 GiB). jax 0.10-0.12:
# "... the total memory required for HLO temporaries (27.77G) exceeds available HBM (15.75G)";
# older: "Ran out of memory in memory space hbm. Used 20.50G of 15.48G hbm."
_SIZE = r"(?P<{0}>[0-9.]+)(?P<{0}_unit>[KMGT]?)(?:i?B)?"
_OOM_PATTERNS = (
    re.compile(
        rf"required for (?P<what>[^()]+?) \({_SIZE.format('req')}\) "
        rf"exceeds available (?P<memory>\w+) \({_SIZE.format('avail')}\)"
    ),
    re.compile(rf"Used {_SIZE.format('req')} of {_SIZE.format('avail')} (?P<memory>\w+)"),
)
_UNIT = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


class CompileError(RuntimeError):
    """The compiler failed for a reason other than memory (the message names the target)."""


def parse_oom(message: str) -> dict | None:
    """XLA's out-of-memory error as {"what", "required", "available", "memory", "message"}
    (sizes in bytes, None where the message has no figures), or None for any other error."""
    if "RESOURCE_EXHAUSTED" not in message or "Ran out of memory" not in message:
        return None  # e.g. a Triton kernel over the shared memory per block: not a fit question
    line = next(ln for ln in message.splitlines() if "Ran out of memory" in ln).strip()
    out = {"what": None, "required": None, "available": None, "memory": None, "message": line}
    m = next(filter(None, (p.search(message) for p in _OOM_PATTERNS)), None)
    if m is not None:
        g = m.groupdict()
        size = lambda k: round(float(g[k]) * _UNIT[g[k + "_unit"]])  # noqa: E731
        out.update(what=(g.get("what") or "the program").strip(), memory=g["memory"].upper())
        out.update(required=size("req"), available=size("avail"))
    return out


def _bytes_per_device(tree) -> int:
    """Bytes one device holds of a pytree of ShapeDtypeStructs with shardings."""
    return sum(
        math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree)
    )


def _targets():
    try:
        from kernels_pallas import targets
    except ImportError as e:  # pragma: no cover - kernels_pallas ships with moe_jax
        raise ValueError(f"compile targets need kernels_pallas: {e}") from e
    return targets


def target_devices(target: str) -> list:
    """The compile-only devices of `target` (ValueError: unknown target / topology)."""
    return _targets().compile_only_devices(target)


def compile_train_step(cfg: TrainConfig, target: str) -> dict:
    """Compile cfg's train step for `target`; returns the report as a dict (see module doc)."""
    targets = _targets()
    devices = targets.compile_only_devices(target)  # ValueError: unknown target / topology
    mesh_cfg = cfg.mesh or parallel.MeshConfig(data=-1, expert=1)
    try:
        mesh = parallel.make_mesh(mesh_cfg, devices=devices)
    except ValueError as e:
        raise ValueError(f"config.mesh does not fit target {target!r}: {e}") from None
    ep = parallel.ExpertParallel(mesh, mesh_cfg)
    if cfg.moe is not None:
        ep.check(cfg.moe, cfg.data.batch_size)
    elif cfg.data.batch_size % len(devices):
        raise ValueError(
            f"config.data.batch_size={cfg.data.batch_size} is not divisible by the {len(devices)} "
            f"devices of {target!r}"
        )
    platform = "tpu" if devices[0].platform == "tpu" else "gpu"
    backend = None if cfg.moe is None else resolve_backend(cfg.moe.backend, devices[0])

    graphdef, state = abstract_state(cfg, ep)
    tokens = NamedSharding(mesh, parallel.spec("tokens"))
    batch = {
        k: jax.ShapeDtypeStruct(shape, dtype, sharding=tokens)
        for k, (shape, dtype) in data_lib.batch_spec(cfg.data).items()
    }
    tx, schedule = make_optimizer(cfg.opt, cfg.num_steps)
    kw = dict(graphdef=graphdef, tx=tx, schedule=schedule, spec=StepSpec(cfg.opt.grad_accum))
    # Without a device XLA cannot autotune its own Triton GEMM tiles and may find none for a
    # dot (INTERNAL: Couldn't find output tile sizes); the fit check compiles XLA's dots as
    # cuBLAS calls instead. The Pallas kernels are custom calls and unaffected.
    options = {"xla_gpu_enable_triton_gemm": False} if platform == "gpu" else None
    head = {
        "target": target,
        "devices": len(devices),
        "device_kind": devices[0].device_kind,
        "mesh": dict(mesh.shape),
        "expert_backend": backend,
    }
    capacity = targets.device_memory_bytes(target)
    t0 = time.perf_counter()
    lowered = train_step.lower(state, batch, np.int32(-1), **kw)
    try:
        compiled = lowered.compile(compiler_options=options)
    except jax.errors.JaxRuntimeError as e:
        oom = parse_oom(str(e))
        if oom is None:
            raise CompileError(f"compiling the train step for {target!r} failed: {e}") from None
        arg = _bytes_per_device((state, batch))
        return {
            **head,
            "native_kernel": None,
            "kernel_families": None,
            "ragged_all_to_all": None,
            "compile_seconds": time.perf_counter() - t0,
            "bytes": {"arguments": arg, "device_memory": capacity},
            "xla_out_of_memory": oom,
            "fits": False,
        }
    seconds = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    arg, out, tmp = mem.argument_size_in_bytes, mem.output_size_in_bytes, mem.temp_size_in_bytes
    alias = getattr(mem, "alias_size_in_bytes", 0)  # donated state: outputs reuse argument bytes
    code = getattr(mem, "generated_code_size_in_bytes", 0)
    total = arg + out - alias + tmp + code
    hlo = compiled.as_text()
    return {
        **head,
        "native_kernel": bool(kernel_families(hlo, platform)),
        "kernel_families": kernel_families(hlo, platform),
        "ragged_all_to_all": "ragged-all-to-all" in hlo or "ragged_all_to_all" in hlo,
        "compile_seconds": seconds,
        "bytes": {
            "arguments": arg,
            "outputs": out,
            "aliased": alias,
            "temporaries": tmp,
            "code": code,
            "total": total,
            "device_memory": capacity,
        },
        "fits": total <= capacity,
    }


def _size(b: float) -> str:
    return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.1f} MiB"


def format_report(r: dict) -> str:
    gib = _size
    b = r["bytes"]
    mesh = " x ".join(f"{k}={v}" for k, v in r["mesh"].items())
    kernel = ""
    if r["expert_backend"] == "pallas" and r["native_kernel"] is not None:
        families = ", ".join(r.get("kernel_families") or [])
        kernel = (
            f" ({families} kernel in the program)" if r["native_kernel"] else " (NO native kernel)"
        )
    lines = [
        f"target {r['target']}: {r['devices']} x {r['device_kind']}, mesh {mesh}",
        f"expert backend: {r['expert_backend'] or 'none (dense model)'}{kernel}",
    ]
    if oom := r.get("xla_out_of_memory"):
        if oom["required"] is None:  # a message without figures: quote it
            need = f"XLA: {oom['message']}"
        else:
            need = (
                f"XLA needs {gib(oom['required'])} for {oom['what']}, "
                f"{gib(oom['available'])} of {oom['memory']} available"
            )
        return "\n".join(
            lines
            + [
                f"compile time {r['compile_seconds']:.1f} s, stopped by XLA: out of memory",
                f"per device: arguments {gib(b['arguments'])} (parameters, optimizer state, batch)",
                f"does not fit: {need} per device",
            ]
        )
    return "\n".join(
        lines
        + [
            f"compile time {r['compile_seconds']:.1f} s",
            f"per device: arguments {gib(b['arguments'])}, outputs {gib(b['outputs'])} "
            f"({gib(b['aliased'])} aliased with arguments), temporaries {gib(b['temporaries'])}, "
            f"code {gib(b['code'])}",
            f"total {gib(b['total'])} of {gib(b['device_memory'])}: "
            + ("fits" if r["fits"] else "does not fit"),
        ]
    )


def with_batch(cfg: TrainConfig, batch_size: int) -> TrainConfig:
    """cfg with another global batch size (e.g. one sequence per device of a large target)."""
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, batch_size=batch_size))
