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
_OPTIONAL = {"pallas": ("moe_jax.experts.pallas", "pallas_gmm")}


def register_backend(name: str, fn: Callable, *, fused: bool = False) -> None:
    """Make `fn` selectable as MoEConfig.backend=name (a new name or a replacement)."""
    if name == "auto":
        raise ValueError("'auto' is not a backend name: it picks one of the registered ones")
    add_backend_name(name)
    _BACKENDS[name] = Backend(fn, fused)


MIN_TRITON_CC = (8, 0)  # XLA runs Triton kernels on Ampere and newer only


def compute_capability(device) -> tuple[int, int] | None:
    """(major, minor) of an NVIDIA device (also a compile-only one), else None."""
    cc = getattr(device, "compute_capability", None)
    if cc is None:
        return None
    major, _, minor = str(cc).partition(".")
    return int(major), int(minor or 0)


def resolve_backend(name: str, device=None) -> str:
    """Map "auto" to a concrete backend for the device the program targets (default: the
    first device of the default backend): TPU -> pallas (Mosaic); NVIDIA with compute
    capability >= 8.0 -> pallas (Triton); older NVIDIA and CPU -> tiled (the fused XLA loop).
    Never ragged on a GPU, where XLA computes ragged_dot densely. "pallas" on a pre-Ampere
    GPU raises, naming the compute capability."""
    device = jax.devices()[0] if device is None else device
    platform = device.platform
    cc = compute_capability(device) if platform in ("gpu", "cuda") else None
    if name == "pallas" and cc is not None and cc < MIN_TRITON_CC:
        raise ValueError(
            f"MoEConfig.backend='pallas' needs an NVIDIA GPU of compute capability >= 8.0 "
            f"(Triton); {getattr(device, 'device_kind', 'this GPU')} has "
            f"{cc[0]}.{cc[1]}: use backend='tiled' (or 'auto')"
        )
    if name != "auto":
        return name
    native = platform == "tpu" or (cc is not None and cc >= MIN_TRITON_CC)
    if native:
        try:
            _load("pallas")
            return "pallas"
        except ImportError:
            pass  # a build without the kernels: the XLA loop below
    return "tiled"


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
