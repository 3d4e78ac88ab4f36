"""Compile-only devices for TPU and NVIDIA GPU targets, so a CPU-only machine can check that a
program (and its Pallas kernels) compiles for them and how much memory it needs per device.

Target strings:
- "tpu:<libtpu topology>", e.g. "tpu:v5e:4x4", "tpu:v5p:2x2x2", "tpu:v6e:2x2", "tpu:v5e:1x1".
  Needs `libtpu` next to jax. A topology smaller than one host (a single chip) is built with
  chips_per_host_bounds equal to the topology itself.
- "gpu:<name>x<count>", e.g. "gpu:h100x8", "gpu:a100x1" (count = number of GPUs). Needs
  `jax[cuda12]` or `jax[cuda13]` (the `aot` extra brings the first); run with JAX_PLATFORMS=cpu and JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 on a machine
  without a GPU. Each name has a text GpuTargetConfigProto in gpu_specs/ (vendor data sheets).

Usage:
    devices = compile_only_devices("gpu:h100x8")
    mesh = jax.sharding.Mesh(np.array(devices), ("data",))
    x = jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, P("data")))
    compiled = jax.jit(f).lower(x).compile()  # compiled.memory_analysis(), .as_text()
"""

from __future__ import annotations

import functools
import math
import pathlib
import re

import jax

SPECS_DIR = pathlib.Path(__file__).parent / "gpu_specs"
# GPU name in the target string -> spec file in gpu_specs/.
GPU_SPECS: dict[str, str] = {
    "h100": "h100.txtpb",
    "h200": "h200.txtpb",
    "a100": "a100.txtpb",
    "a100-80gb": "a100_80gb.txtpb",
    "l4": "l4.txtpb",
    "t4": "t4.txtpb",
}
# HBM per chip in bytes (vendor data sheets, decimal GB), keyed by libtpu's device_kind.
TPU_MEMORY: dict[str, int] = {
    "TPU v4": 32 * 2**30,
    "TPU v5 lite": 16 * 10**9,
    "TPU v5": 95 * 10**9,
    "TPU v6 lite": 32 * 10**9,
}
TPU_EXAMPLES = ("tpu:v5e:4x4", "tpu:v5p:2x2x2", "tpu:v6e:2x2", "tpu:v5e:1x1", "tpu:v4:2x2x1")
_GPU_RE = re.compile(r"^gpu:(?P<name>[a-z0-9-]+?)x(?P<count>[1-9][0-9]*)$")
_TPU_RE = re.compile(r"^tpu:(?P<topology>v[0-9][a-z]*:[0-9]+(x[0-9]+){1,2})$")


def known_targets() -> str:
    """A one-line description of the accepted target strings (for error messages)."""
    gpus = ", ".join(f"gpu:{name}x<N>" for name in GPU_SPECS)
    return f"{gpus}; tpu:<libtpu topology> such as {', '.join(TPU_EXAMPLES)}"


def _parse(target: str) -> tuple[str, str, int | None]:
    """("gpu", name, count) or ("tpu", topology, None); ValueError for anything else."""
    if isinstance(target, str):
        if m := _GPU_RE.match(target):
            if m["name"] in GPU_SPECS:
                return "gpu", m["name"], int(m["count"])
        elif m := _TPU_RE.match(target):
            return "tpu", m["topology"], None
    raise ValueError(f"unknown compile target {target!r}; known targets: {known_targets()}")


def gpu_spec_text(name: str) -> str:
    """The GpuTargetConfigProto text of GPU `name` (a key of GPU_SPECS)."""
    if name not in GPU_SPECS:
        raise ValueError(f"unknown GPU {name!r}; known: {sorted(GPU_SPECS)}")
    return (SPECS_DIR / GPU_SPECS[name]).read_text()


def _spec_field(text: str, field: str) -> int:
    m = re.search(rf"^\s*{field}:\s*([0-9]+)", text, re.MULTILINE)
    if m is None:
        raise ValueError(f"GPU spec has no field {field!r}")
    return int(m[1])


def _tpu_devices(topology: str) -> list:
    from jax.experimental import topologies

    dims = [int(d) for d in topology.split(":")[1].split("x")]
    kwargs = {}
    if math.prod(dims) == 1:
        # libtpu's default host is 2x2x1 chips; a lone chip is its own host.
        kwargs["chips_per_host_bounds"] = (1, 1, 1)
    try:
        return list(topologies.get_topology_desc(topology, "tpu", **kwargs).devices)
    except Exception as e:  # JaxRuntimeError (bad name or shape), RuntimeError (no libtpu)
        raise ValueError(
            f"libtpu rejected TPU topology {topology!r}: {e}. Examples that work: "
            f"{', '.join(TPU_EXAMPLES)} (needs `pip install libtpu`)"
        ) from e


@functools.cache
def _cuda_c_api():
    from jax._src import xla_bridge as xb

    xb._discover_and_register_pjrt_plugins()
    factory = xb._backend_factories.get("cuda")
    if factory is None or getattr(factory, "c_api", None) is None:
        raise ValueError(
            "compile-only GPU devices need a CUDA PJRT plugin: pip install 'jax[cuda12]' (or "
            "'jax[cuda13]') at the installed jax's version, and run with JAX_PLATFORMS=cpu "
            "JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 without a GPU"
        )
    return factory.c_api


def _gpu_devices(name: str, count: int) -> list:
    # jax 0.10's get_topology_desc(platform="cuda") is not wired to the plugin: build the
    # topology from the plugin's C API directly.
    from jaxlib import xla_client

    topo = xla_client.make_c_api_device_topology(
        _cuda_c_api(), "", target_config=gpu_spec_text(name), topology=f"1x1x{count}"
    )
    return list(topo._make_compile_only_devices())


@functools.cache
def _devices(target: str) -> tuple:
    kind, what, count = _parse(target)
    return tuple(_tpu_devices(what) if kind == "tpu" else _gpu_devices(what, count))


def compile_only_devices(target: str) -> list:
    """Compile-only jax devices for `target` (see the module docstring for the strings)."""
    return list(_devices(target))


def device_memory_bytes(target: str) -> int:
    """Memory of one device of `target` in bytes (HBM per TPU chip, device memory per GPU)."""
    kind, what, _ = _parse(target)
    if kind == "gpu":
        return _spec_field(gpu_spec_text(what), "device_memory_size")
    device_kind = _devices(target)[0].device_kind
    if device_kind not in TPU_MEMORY:
        raise ValueError(f"no memory size known for {device_kind!r}; known: {sorted(TPU_MEMORY)}")
    return TPU_MEMORY[device_kind]


def compute_capability(target: str) -> tuple[int, int]:
    """(major, minor) CUDA compute capability of a GPU target."""
    kind, what, _ = _parse(target)
    if kind != "gpu":
        raise ValueError(f"compute capability is defined for GPU targets only, got {target!r}")
    text = gpu_spec_text(what)
    block = text[text.index("cuda_compute_capability") :]
    return _spec_field(block, "major"), _spec_field(block, "minor")


def shared_memory_optin_bytes(target: str) -> int:
    """Opt-in shared memory per block (the most one Triton program may use) of a GPU target."""
    kind, what, _ = _parse(target)
    if kind != "gpu":
        raise ValueError(f"shared memory is defined for GPU targets only, got {target!r}")
    return _spec_field(gpu_spec_text(what), "shared_memory_per_block_optin")


def mesh(target: str, axis_names: tuple[str, ...] = ("data",)) -> jax.sharding.Mesh:
    """A 1-D (or given-name) mesh over all devices of `target`, Auto axes."""
    import numpy as np

    devices = np.array(compile_only_devices(target))
    shape = (devices.size,) + (1,) * (len(axis_names) - 1)
    types = (jax.sharding.AxisType.Auto,) * len(axis_names)
    return jax.sharding.Mesh(devices.reshape(shape), axis_names, axis_types=types)
