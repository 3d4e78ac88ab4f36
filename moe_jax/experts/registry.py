"""Expert backends by name: a registry that MoEConfig.backend selects from.

A backend is one of two kinds of function:
- a grouped matmul ``gmm(lhs [R, Din], rhs [G, Din, Dout], group_sizes [G]) -> [R, Dout]`` for
  rows sorted by group (group g owns a contiguous run of group_sizes[g] rows, sum <= R; rows
  past the sum may come back as anything: they are masked before the combine). The routed
  FFN runs it as gather -> two grouped matmuls -> weighted combine (moe_jax.experts.ffn);
- a fused routed FFN (``fused=True``) with the signature of moe_jax.experts.ffn.routed_ffn's
  fused call: ``fn(x, token_idx, row_weights, group_sizes, w_in, w_gate, w_out, b_in, b_out,
  *, activation) -> [T, D]``, which gathers and combines itself ("tiled").

Optional backends (the Pallas kernels) are imported the first time they are asked for; a
backend that cannot load here fails when the layer is built, naming MoEConfig.backend.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import NamedTuple

import jax

from moe_jax.core.config import add_backend_name, backend_names

GroupedMatmul = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


class Backend(NamedTuple):
    fn: Callable
    fused: bool  # fn is a routed FFN (gather + FFN + combine), not a grouped matmul


_BACKENDS: dict[str, Backend] = {}
# Backends whose module is imported on first use: name -> (module, attribute).
_OPTIONAL = {
    "pallas": ("moe_jax.experts.pallas", "pallas_gmm"),
    # The optional extra [tokamax] (Python >= 3.12); lowers for every target as it is.
    "tokamax": ("moe_jax.experts.tokamax", "tokamax_gmm"),
}
# Their variants for a branch of auto's switch, which is lowered for every target (auto.py):
# name -> attribute of the same module.
_ANYWHERE = {"pallas": "pallas_gmm_or_reference"}


def register_backend(name: str, fn: Callable, *, fused: bool = False) -> None:
    """Make `fn` selectable as MoEConfig.backend=name (a new name or a replacement).

    Args:
        name: the backend's name, as MoEConfig.backend will give it.
        fn: a grouped matmul ``fn(lhs [R, D], rhs [G, D, F], group_sizes [G]) -> [R, F]``
            (rows sorted by group, rows past sum(group_sizes) ignored; R = T·K slots, G = N),
            or with ``fused`` the whole routed FFN, with routed_ffn's arguments.
        fused: fn computes gather -> expert FFN -> weighted combine itself.

    Raises:
        ValueError: name is ``"auto"`` (it picks among the registered backends) or empty.
    """
    if name == "auto":
        raise ValueError("'auto' is not a backend name: it picks one of the registered ones")
    add_backend_name(name)
    _BACKENDS[name] = Backend(fn, fused)


MIN_TRITON_CC = (8, 0)  # XLA runs Triton kernels on Ampere and newer only
PRE_AMPERE = "cuda:cc<8.0"  # the AUTO_BACKENDS key of NVIDIA GPUs below MIN_TRITON_CC

# What MoEConfig.backend="auto" runs, per target: the one table (docs/hardware.md).
# Keys, most specific first: "<platform>:<device_kind>" (jax's device_kind, e.g. "TPU v5 lite",
# "NVIDIA H100 80GB HBM3"), PRE_AMPERE, then "<platform>" (a lowering platform: cpu, tpu, cuda,
# rocm); any other platform gets AUTO_DEFAULT. It is read when the program is lowered, for the
# devices it is lowered for (auto.py). Only the CPU entry is measured (docs/performance.md:
# tiled against ragged_dot, the dense reference and the per-matmul path). The accelerator
# entries are UNMEASURED: they follow the design (the native kernel where one compiles; never
# ragged_dot on a GPU, which XLA computes densely) until benchmarks/accelerator.py (to come) has
# timed the backends side by side on each device and written its choice here, per device kind.
AUTO_BACKENDS: dict[str, str] = {
    "cpu": "tiled",  # measured: the fused XLA loop over the real row tiles
    "tpu": "pallas",  # unmeasured: the Mosaic kernels (v4, v5e, v5p, v6e compiled)
    "cuda": "pallas",  # unmeasured: Mosaic GPU kernels on 9.x, Triton on the other >= 8.0
    PRE_AMPERE: "tiled",  # unmeasured; no Triton in XLA below compute capability 8.0
    "rocm": "tiled",  # unmeasured: the Triton kernels are not compiled for ROCm here
}
AUTO_DEFAULT = "tiled"  # platforms without an entry


def compute_capability(device) -> tuple[int, int] | None:
    """(major, minor) of an NVIDIA device (also a compile-only one), else None."""
    major, _, minor = str(getattr(device, "compute_capability", "")).partition(".")
    try:
        return int(major), int(minor or 0)
    except ValueError:  # no attribute, or a ROCm "gfx90a"
        return None


def lowering_platform(device) -> str:
    """The lowering platform of a device: a GPU is "cuda" when it has an NVIDIA compute
    capability, else "rocm"."""
    if device.platform in ("gpu", "cuda", "rocm"):
        return "cuda" if compute_capability(device) is not None else "rocm"
    return device.platform


def _available(name: str) -> str:
    """name, or the XLA loop where its optional module does not import (no Pallas here)."""
    try:
        _load(name)
        return name
    except ImportError:
        return "tiled"


def auto_backend(device=None, platform: str | None = None) -> str:
    """The AUTO_BACKENDS entry for `device` (platform: its lowering platform, by default read
    from the device; without a device, the platform's own entry)."""
    platform = platform or lowering_platform(device)
    keys = [platform]
    if device is not None:
        cc = compute_capability(device) if platform == "cuda" else None
        keys[:0] = [f"{platform}:{device.device_kind}"] + (
            [PRE_AMPERE] if cc is not None and cc < MIN_TRITON_CC else []
        )
    name = next((AUTO_BACKENDS[k] for k in keys if k in AUTO_BACKENDS), AUTO_DEFAULT)
    return _available(name)


def auto_candidates() -> tuple[str, ...]:
    """Every backend "auto" may pick for some target, available here, in table order."""
    names = [_available(n) for n in (*AUTO_BACKENDS.values(), AUTO_DEFAULT)]
    return tuple(dict.fromkeys(names))


def resolve_backend(name: str, device=None) -> str:
    """Map "auto" to a concrete backend for `device` (default: the first device of the default
    backend) through AUTO_BACKENDS. "pallas" on a pre-Ampere GPU raises, naming the compute
    capability. routed_ffn without a device does not call this: it picks at lowering time."""
    device = jax.devices()[0] if device is None else device
    cc = compute_capability(device) if lowering_platform(device) == "cuda" else None
    if name == "pallas" and cc is not None and cc < MIN_TRITON_CC:
        raise ValueError(
            f"MoEConfig.backend='pallas' needs an NVIDIA GPU of compute capability >= 8.0 "
            f"(Triton); {getattr(device, 'device_kind', 'this GPU')} has "
            f"{cc[0]}.{cc[1]}: use backend='tiled' (or 'auto')"
        )
    return auto_backend(device) if name == "auto" else name


def _load(name: str) -> Backend:
    if name not in _BACKENDS and name in _OPTIONAL:
        module, attr = _OPTIONAL[name]
        register_backend(name, getattr(importlib.import_module(module), attr))
    if name not in _BACKENDS:
        raise ValueError(
            f"MoEConfig.backend={name!r} is not registered; registered: {sorted(_BACKENDS)}, "
            f"known names: {backend_names()}"
        )
    return _BACKENDS[name]


def get_backend(name: str, device=None) -> Backend:
    """The backend for a MoEConfig.backend value ("auto" resolved for `device`, see
    resolve_backend); a clear ValueError if it cannot run there."""
    name = resolve_backend(name, device)
    try:
        return _load(name)
    except ImportError as e:
        raise ValueError(f"MoEConfig.backend={name!r} is not available here: {e}") from e


def switch_backend(name: str) -> Backend:
    """The backend `name` as a branch of auto's switch: one that lowers for every target, also
    where it would not run (the compiler drops it there)."""
    backend = get_backend(name)
    if name in _ANYWHERE:
        module = importlib.import_module(_OPTIONAL[name][0])
        if backend.fn is getattr(module, _OPTIONAL[name][1]):  # not a user's replacement
            return Backend(getattr(module, _ANYWHERE[name]), backend.fused)
    return backend
