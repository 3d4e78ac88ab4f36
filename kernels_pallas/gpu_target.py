"""Which GPU jax's Pallas Triton lowering compiles a kernel for, on every supported jax.

How jax finds the GPU when a Triton kernel is lowered:
- jax 0.10: the first local GPU; without one, compute capability 9.0.
- jax >= 0.11: the default device, or the abstract mesh's `abstract_device`; with neither a GPU
  (a CPU host compiling for compile-only GPU devices) it raises "No supported GPU devices found".
  0.11.0 and 0.11.1 map a GPU to its capability through a fixed list of product names; 0.11.2
  and later fall back to the device's own compute capability for any other NVIDIA name.

triton_target(devices) is the context the CUDA lowering rule (dispatch.py) lowers a kernel in:
1. The program's target devices are known (jit's device assignment or the shard_map mesh): the
   first GPU among them is made the default device for the duration of the lowering, so jax reads
   its name and compute capability, compile-only devices included.
2. No target device is known (lowering for "cuda" from a host without GPUs or device
   assignment): an abstract device of the reference GPU of the lowest supported capability
   (NVIDIA A100, 8.0), the same capability the rule then picks tiles for.
3. A jax that cannot tell the capability of the device (0.11.0 / 0.11.1 on a product name off
   their list) gets a clear error naming the jax version that can, before any kernel is traced.
"""

from __future__ import annotations

import contextlib

import jax

# The GPU assumed when no target device is known: compute capability 8.0, the lowest that XLA
# compiles Triton kernels for (blocks.MIN_TRITON_CC).
REFERENCE_GPU_KIND = "NVIDIA A100-SXM4-80GB"


def _triton_gpu_info():
    """jax's Triton GPU lookup (jax >= 0.11), or None on a jax that reads local GPUs itself."""
    try:
        from jax._src.pallas.triton import gpu_info
    except ImportError:  # jax 0.10: no lookup, the lowering reads jax.local_devices("gpu")
        return None
    return gpu_info


def _abstract_gpu(kind: str):
    from jax.sharding import AbstractDevice, AbstractMesh

    device = AbstractDevice(device_kind=kind, num_cores=None, platform="cuda")
    return jax.sharding.use_abstract_mesh(
        AbstractMesh((1,), ("_triton_target",), abstract_device=device)
    )


def _check_known(gpu_info, device) -> None:
    try:
        gpu_info.get_gpu_info()
    except ValueError as e:
        kind = getattr(device, "device_kind", "?")
        cc = getattr(device, "compute_capability", "?")
        raise ValueError(
            f"jax {jax.__version__} cannot lower Pallas Triton kernels for the GPU {kind!r} "
            f"(compute capability {cc}): its Triton lowering knows GPUs only by a fixed list of "
            "names. jax >= 0.11.2 reads any NVIDIA GPU's compute capability: pip install "
            f"'jax>=0.11.2' with its CUDA plugin, or use an XLA expert backend ('tiled'). ({e})"
        ) from e


@contextlib.contextmanager
def triton_target(devices):
    """Lower the Triton kernels inside this context for the first GPU in `devices` (see the
    module docstring); `devices` may be empty."""
    gpu_info = _triton_gpu_info()
    if gpu_info is None:
        yield
        return
    gpus = [d for d in devices if getattr(d, "platform", None) in ("gpu", "cuda")]
    if gpus:
        with jax.default_device(gpus[0]):
            _check_known(gpu_info, gpus[0])
            yield
    else:
        with _abstract_gpu(REFERENCE_GPU_KIND):
            yield
