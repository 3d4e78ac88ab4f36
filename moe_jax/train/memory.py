"""Refuse a run that cannot fit, before anything is allocated.

estimate(cfg, devices) is a lower bound on the bytes one device holds during a train step,
from the config alone (no arrays are made):

  parameters   total_params x itemsize(param_dtype), sharded over mesh.fsdp x mesh.expert
  optimizer    AdamW's two moments, each the size of the parameters (same sharding)
  gradients    one parameter-sized tree (two with gradient accumulation: the running sum)
  logits       each device's micro-batch tokens x vocab x 4 bytes (fp32 logits) x 2 (their
               gradient), the largest single activation of a language model
  activations  the block inputs remat keeps: micro-batch tokens x d_model x layers x itemsize

Left out on purpose, so the figure stays a lower bound: attention scores, the MoE dispatch
buffers, XLA's temporaries and fragmentation. A run this refuses cannot fit; one it passes may
still run out (XLA then reports it). check() compares the estimate with the memory a device
reports (bytes_limit of memory_stats on GPU/TPU) or, on CPU, the host memory that is free
(MemAvailable, capped by a cgroup limit), and raises MemoryEstimateError naming both figures.
MOE_JAX_SKIP_MEMORY_CHECK=1 skips it.
"""

from __future__ import annotations

import os

import jax
import numpy as np

from moe_jax.model import model_summary

GIB = 1 << 30
SKIP_ENV = "MOE_JAX_SKIP_MEMORY_CHECK"


class MemoryEstimateError(ValueError):
    """The config needs more memory per device than the device (or host) has."""


def estimate(cfg, n_devices: int = 1) -> dict[str, float]:
    """Lower-bound bytes per device by part (see the module docstring) and their "total".

    Args:
        cfg: the validated TrainConfig.
        n_devices: devices the mesh spans (with a mesh, the data axis is n_devices / (fsdp ×
            expert)).

    Returns:
        {"parameters", "optimizer", "gradients", "logits", "activations", "total"} in bytes.
    """
    m, d, o = cfg.model, cfg.data, cfg.opt
    p_bytes = np.dtype(m.param_dtype).itemsize
    c_bytes = np.dtype(m.dtype).itemsize
    params = float(model_summary(m)["total_params"])
    shards = (cfg.mesh.fsdp * cfg.mesh.expert) if cfg.mesh is not None else 1
    data_par = max(1, n_devices // shards) if cfg.mesh is not None else 1
    rows = max(1, d.batch_size // o.grad_accum // data_par)  # one device's micro-batch
    tokens = rows * (m.num_patches + d.text_len)
    out = {
        "parameters": params * p_bytes / shards,
        "optimizer": 2 * params * p_bytes / shards,
        "gradients": (2 if o.grad_accum > 1 else 1) * params * p_bytes / shards,
        "logits": 2.0 * rows * d.text_len * m.vocab_size * 4,
        "activations": float(tokens * m.d_model * m.n_layers * c_bytes),
    }
    out["total"] = sum(out.values())
    return out


def available(device) -> tuple[float | None, str]:
    """(bytes one device can hold, what that figure is), or (None, why) when unknown."""
    if device.platform != "cpu":
        stats = device.memory_stats() or {}
        if "bytes_limit" in stats:
            return float(stats["bytes_limit"]), f"{device.device_kind} memory"
        return None, f"{device.device_kind} reports no memory limit"
    free = _meminfo_available()
    limit = _cgroup_free()
    figures = [x for x in (free, limit) if x is not None]
    if not figures:
        return None, "host memory unknown"
    return float(min(figures)), "free host memory" + (
        " (cgroup limit)" if limit == min(figures) else ""
    )


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _cgroup_free() -> int | None:
    """memory.max - memory.current of this process's cgroup (v2), when it sets a limit."""
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            raw = f.read().strip()
        if raw == "max":
            return None
        with open("/sys/fs/cgroup/memory.current") as f:
            return int(raw) - int(f.read().strip())
    except (OSError, ValueError):
        return None


def check(cfg, devices=None) -> dict[str, float]:
    """Raises MemoryEstimateError when estimate(cfg) exceeds what one device has; returns the
    estimate. On CPU all devices share the host: their estimates add up.

    Args:
        cfg: the validated TrainConfig.
        devices: the devices the run uses (default jax.local_devices()).

    Returns:
        estimate()'s bytes by part; {} when MOE_JAX_SKIP_MEMORY_CHECK=1.

    Raises:
        MemoryEstimateError: the lower bound exceeds the device's memory (or the free host
            memory on CPU); the message gives both figures and the fields to change.
    """
    if os.environ.get(SKIP_ENV) == "1":
        return {}
    devices = jax.local_devices() if devices is None else devices
    n = len(devices)
    est = estimate(cfg, n if cfg.mesh is not None else 1)
    have, what = available(devices[0])
    if have is None:
        return est
    on_host = devices[0].platform == "cpu"
    need = est["total"] * (n if on_host and cfg.mesh is not None else 1)
    if need > have:
        parts = ", ".join(f"{k} {v / GIB:.2f}" for k, v in est.items() if k != "total")
        per = "on this host" if on_host else "per device"
        raise MemoryEstimateError(
            f"the config needs at least {need / GIB:.2f} GiB {per} ({parts} GiB"
            f"{f' x {n} devices' if on_host and cfg.mesh is not None else ''}) but "
            f"{what} is {have / GIB:.2f} GiB: make the model or batch smaller "
            f"(model.d_model, moe.num_experts, model.vocab_size, data.batch_size), shard it "
            f"(mesh.fsdp, mesh.expert), or set {SKIP_ENV}=1 to try anyway"
        )
    return est
