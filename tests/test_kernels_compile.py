"""kernels_pallas compiles natively for TPUs (Mosaic) and NVIDIA GPUs (Mosaic GPU on Hopper,
Triton elsewhere) from a CPU host.

Compile-only devices (kernels_pallas.targets) stand in for the hardware: each case lowers and
compiles a jitted call on abstract inputs placed on them and checks that the optimized HLO holds
the native kernel (`mosaic_gpu_v2` / `__gpu$xla.gpu.triton` / `tpu_custom_call`), i.e. the
kernel was chosen for the target at lowering time and not the interpret-mode loop of a CPU run.
tests/test_kernels_mosaic_gpu.py has the Mosaic GPU kernels' own compile and ptxas checks. Nothing runs. The
shapes about shared-memory limits (D=4096/F=1024, D=2048/F=768) only compile.

Needs the `aot` extra (`jax[cuda12]` or `jax[cuda13]`, and `libtpu`). Without it the tests skip locally and FAIL when
the CI environment variable is set, so CI cannot pass by silently skipping them.
"""

import importlib.util
import os
import re

os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import kernels_pallas as kp  # noqa: E402
from kernels_pallas import gpu_target, targets, versions  # noqa: E402
from kernels_pallas.blocks import triton_smem_bytes  # noqa: E402

KERNEL_CALL = {"gpu": "__gpu$xla.gpu.triton", "tpu": "tpu_custom_call"}
MOSAIC_GPU_CALL = "mosaic_gpu_v2"
PACKAGES = {"gpu": ("jax_cuda12_plugin", "jax_cuda13_plugin"), "tpu": ("libtpu",)}
DTYPES = {"bf16": jnp.bfloat16, "f32": jnp.float32}
R, D, F, G = 512, 1408, 384, 256  # small; D is not a power of two, G is the largest we support


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _require(target: str) -> None:
    """Skip (locally) or fail (CI) when the packages for `target`'s platform are missing."""
    kind = target.split(":")[0]
    if all(importlib.util.find_spec(p) is None for p in PACKAGES[kind]):
        msg = f"{target} needs one of {PACKAGES[kind]}: pip install -e '.[aot]'"
        if _in_ci():
            pytest.fail(f"CI is set but {msg}")
        pytest.skip(msg)


def _mesh(target: str) -> jax.sharding.Mesh:
    _require(target)
    return targets.mesh(target)


REPLICATED = P()


def _spec(mesh, shape, dtype, spec=REPLICATED):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))


def _loss(x, w, s, **kw):
    return kp.gmm(x, w, s, **kw).astype(jnp.float32).sum()


# op -> (function of (a, b, group_sizes), shape of a, shape of b, native kernels in the HLO)
def _ops(r, d, f, g, backend="auto"):
    kw = dict(backend=backend)
    return {
        "gmm": (lambda x, w, s: kp.gmm(x, w, s, **kw), (r, d), (g, d, f), 1),
        "gmm_t": (lambda x, w, s: kp.gmm(x, w, s, transpose_rhs=True, **kw), (r, f), (g, d, f), 1),
        "tgmm": (lambda x, y, s: kp.tgmm(x, y, s, **kw), (r, d), (r, f), 1),
        # forward gmm + d_lhs (transposed gmm) + d_rhs (tgmm)
        "vjp": (
            jax.value_and_grad(lambda x, w, s: _loss(x, w, s, **kw), argnums=(0, 1)),
            (r, d),
            (g, d, f),
            3,
        ),
    }


def _compile(mesh, op, dtype, r, d, f, g, backend="auto"):
    fn, a_shape, b_shape, n_kernels = _ops(r, d, f, g, backend)[op]
    args = (_spec(mesh, a_shape, dtype), _spec(mesh, b_shape, dtype), _spec(mesh, (g,), jnp.int32))
    return jax.jit(fn).lower(*args).compile(), n_kernels


def _gpu_call(target: str, backend: str = "auto") -> str:
    """The custom call of the GPU kernel family `backend` resolves to on target."""
    device = targets.compile_only_devices(target)[0]
    mosaic = backend == "mosaic_gpu" or (backend == "auto" and kp.mosaic_gpu_supported(device))
    return MOSAIC_GPU_CALL if mosaic else KERNEL_CALL["gpu"]


def _assert_native(compiled, target, n_kernels, backend="auto", dtype=jnp.bfloat16) -> None:
    """n_kernels native calls of the family for target (Mosaic GPU runs an f32 product as
    three bf16 kernels) and none of any other family."""
    text = compiled.as_text()
    kind = target.split(":")[0]
    want = KERNEL_CALL["tpu"] if kind == "tpu" else _gpu_call(target, backend)
    if want == MOSAIC_GPU_CALL and jnp.dtype(dtype) == jnp.float32:
        n_kernels *= 3
    assert text.count(want) == n_kernels, f"{target}: native kernels missing"
    for other in {*KERNEL_CALL.values(), MOSAIC_GPU_CALL} - {want}:
        assert other not in text, f"{target}: another kernel family was compiled too"


@pytest.mark.parametrize("dtype", ["bf16", "f32"])
@pytest.mark.parametrize("op", ["gmm", "gmm_t", "tgmm", "vjp"])
@pytest.mark.parametrize("target", ["gpu:h100x1", "gpu:a100x1", "tpu:v5e:1x1", "tpu:v6e:1x1"])
def test_kernel_compiles_natively(target, op, dtype):
    mesh = _mesh(target)
    compiled, n_kernels = _compile(mesh, op, DTYPES[dtype], R, D, F, G)
    _assert_native(compiled, target, n_kernels, dtype=DTYPES[dtype])


@pytest.mark.parametrize("dtype", ["bf16", "f32"])
@pytest.mark.parametrize("d, f", [(4096, 1024), (2048, 768)])
@pytest.mark.parametrize("target", ["gpu:h100x1", "gpu:a100x1", "gpu:l4x1"])
def test_triton_tiles_fit_shared_memory(target, d, f, dtype):
    """Default tiles for the target stay under its opt-in shared memory and really compile
    (these shapes overflowed H100's 227 KiB with the old fixed tiles)."""
    mesh = _mesh(target)
    smem = targets.shared_memory_optin_bytes(target)
    itemsize = jnp.dtype(DTYPES[dtype]).itemsize
    for op, m, k, n in [("gmm", 8192, d, f), ("gmm", 8192, f, d), ("tgmm", 8192, d, f)]:
        bs = kp.triton_block_sizes(op, m, k, n, itemsize=itemsize, smem_bytes=smem)
        assert triton_smem_bytes(op, bs, itemsize) <= smem, (op, bs)
    compiled, n_kernels = _compile(mesh, "vjp", DTYPES[dtype], 8192, d, f, 64, "triton")
    _assert_native(compiled, target, n_kernels, "triton", DTYPES[dtype])


@pytest.mark.parametrize("target", ["gpu:h100x8", "tpu:v5e:2x2"])
def test_shard_map_step_compiles_on_multi_device_targets(target):
    """Row-sharded gradient step inside shard_map: the kernel sees the mesh's devices."""
    mesh = _mesh(target)
    n, dtype = mesh.size, jnp.bfloat16

    def step(x, w, sizes):
        def local(x, w, sizes):
            d_x, d_w = jax.grad(_loss, argnums=(0, 1))(x, w, sizes[0])
            return d_x, jax.lax.psum(d_w, "data")

        specs = dict(in_specs=(P("data"), P(), P("data")), out_specs=(P("data"), P()))
        return jax.shard_map(local, mesh=mesh, check_vma=False, **specs)(x, w, sizes)

    args = (
        _spec(mesh, (256 * n, D), dtype, P("data")),
        _spec(mesh, (16, D, F), dtype),
        _spec(mesh, (n, 16), jnp.int32, P("data")),
    )
    _assert_native(jax.jit(step).lower(*args).compile(), target, 2)


def test_pre_ampere_gpu_raises_clear_error():
    mesh = _mesh("gpu:t4x1")
    with pytest.raises(ValueError, match=r"compute capability 7\.5.*'tiled'"):
        _compile(mesh, "gmm", jnp.bfloat16, R, D, F, 8)
    assert not kp.triton_supported(targets.compile_only_devices("gpu:t4x1")[0])
    assert kp.triton_supported(targets.compile_only_devices("gpu:h100x1")[0])
    assert not kp.triton_supported(jax.devices("cpu")[0])


def test_oversized_user_blocks_raise_before_compiling():
    mesh = _mesh("gpu:l4x1")
    bs = kp.BlockSizes(tm=128, tk=64, tn=128, num_warps=4, num_stages=4)  # 128 KiB > 99 KiB
    x, w = _spec(mesh, (R, D), jnp.bfloat16), _spec(mesh, (8, D, F), jnp.bfloat16)
    with pytest.raises(ValueError, match="shared memory"):
        jax.jit(lambda x, w, s: kp.gmm(x, w, s, block_sizes=bs)).lower(
            x, w, _spec(mesh, (8,), jnp.int32)
        )


def test_target_strings_and_specs():
    with pytest.raises(ValueError, match=r"known targets: .*gpu:h100x<N>.*tpu:v5e:4x4"):
        targets.compile_only_devices("gpu:v100x1")
    assert targets.compute_capability("gpu:l4x1") == (8, 9)
    assert targets.shared_memory_optin_bytes("gpu:h100x8") == 232448
    assert targets.device_memory_bytes("gpu:h200x8") == 141 * 10**9
    _require("gpu:h100x8")
    devices = targets.compile_only_devices("gpu:h100x8")
    assert len(devices) == 8 and devices[0].compute_capability == "9.0"
    _require("tpu:v5e:1x1")
    with pytest.raises(ValueError, match="v5e:3x3"):
        targets.compile_only_devices("tpu:v5e:3x3")
    assert len(targets.compile_only_devices("tpu:v5e:1x1")) == 1
    assert targets.device_memory_bytes("tpu:v6e:2x2") == 32 * 10**9
    assert np.array(targets.mesh("tpu:v5p:2x2x2").devices).size == 8


def test_interpret_auto_is_native_on_targets_and_interpreted_on_cpu():
    """One function, interpret="auto": Triton / Mosaic when compiled for a GPU / TPU target,
    the interpret-mode kernel (matching the reference) when run on CPU."""

    def fn(x, w, s):
        return kp.gmm(x, w, s, interpret="auto")

    for target in ("gpu:h100x1", "tpu:v5e:1x1"):
        mesh = _mesh(target)
        args = (_spec(mesh, (R, D), jnp.bfloat16), _spec(mesh, (8, D, F), jnp.bfloat16))
        compiled = jax.jit(fn).lower(*args, _spec(mesh, (8,), jnp.int32)).compile()
        _assert_native(compiled, target, 1)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(40, 24)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 24, 16)), jnp.float32)
    sizes = jnp.array([10, 0, 20], jnp.int32)
    np.testing.assert_allclose(
        jax.jit(fn)(x, w, sizes), kp.gmm_reference(x, w, sizes), rtol=1e-5, atol=1e-4
    )


@pytest.mark.parametrize(
    "target, cc", [("gpu:h100x1", 90), ("gpu:a100x1", 80), ("gpu:l4x1", 89), (None, 80)]
)
def test_triton_lowering_sees_the_target_gpu(target, cc):
    """Inside gpu_target.triton_target, jax's Triton lowering reads the target GPU's compute
    capability (jax >= 0.11 reads it from the default device or an abstract device; without
    either it finds no GPU on a CPU host). No target device: the reference GPU, 8.0."""
    _require("gpu:h100x1")
    devices = [] if target is None else targets.compile_only_devices(target)
    gpu_info = gpu_target._triton_gpu_info()
    if gpu_info is None:  # jax 0.10: the lowering reads local GPUs itself; nothing to set
        assert tuple(int(p) for p in jax.__version__.split(".")[:2]) < (0, 11)
        with gpu_target.triton_target(devices):
            pass
        return
    with pytest.raises(ValueError):
        gpu_info.get_gpu_info()  # a CPU host: no GPU to compile for
    with gpu_target.triton_target(devices):
        assert gpu_info.get_gpu_info().compute_capability == cc


def test_jax_that_cannot_name_the_gpu_gets_a_clear_error(monkeypatch):
    """jax 0.11.0 / 0.11.1 know GPUs by a fixed list of names: a GPU off the list gets an error
    naming the jax that can lower for it, not jax's 'No supported GPU devices found'."""
    _require("gpu:h100x1")
    device = targets.compile_only_devices("gpu:h100x1")[0]
    gpu_info = gpu_target._triton_gpu_info()
    if gpu_info is None:  # jax 0.10 reads the capability of any local GPU
        assert tuple(int(p) for p in jax.__version__.split(".")[:2]) < (0, 11)
        return

    def unknown():
        raise ValueError(f"Unsupported GPU device kind: {device.device_kind}")

    monkeypatch.setattr(gpu_info, "get_gpu_info", unknown)
    pattern = r"for the GPU 'NVIDIA H100[^']*' \(compute capability 9\.0\).*'jax>=0\.11\.2'"
    with pytest.raises(ValueError, match=pattern):
        with gpu_target.triton_target([device]):
            pass


@pytest.mark.parametrize("version", ["0.10.1", "0.9.0", "0.13.0", "1.0", "0.13.0.dev20261201"])
def test_unsupported_jax_fails_at_import_naming_both_versions(version, monkeypatch):
    with pytest.raises(ImportError, match=rf"jax>=0\.10\.2,<0\.13, but jax {re.escape(version)}"):
        versions.check(version, "0.12.0.1")
    monkeypatch.setattr(versions.metadata, "version", lambda name: version)
    with pytest.raises(ImportError, match="MOE_JAX_SKIP_VERSION_CHECK"):
        versions.check_installed()
    monkeypatch.setenv("MOE_JAX_SKIP_VERSION_CHECK", "1")
    versions.check_installed()


@pytest.mark.parametrize("version", ["0.10.2", "0.11.2", "0.12.0.1", "0.12.9"])
def test_supported_jax_passes_the_import_check(version):
    versions.check(version, version)
    versions.check_installed()  # the jax this suite runs on


def test_ampere_gpu_off_jax_name_lists_compiles():
    """A GPU that jax 0.11.0 / 0.11.1 do not know by name (A100's spec renamed to an RTX A6000 at
    compute capability 8.6) compiles the native kernel on the jax under test (0.10.2 reads local
    GPUs, >= 0.11.2 the device's capability); 0.11.1 gives the clear error tested above."""
    _require("gpu:a100x1")
    from jaxlib import xla_client

    text = targets.gpu_spec_text("a100")
    text = re.sub(
        r'device_description_str: "[^"]*"', 'device_description_str: "NVIDIA RTX A6000"', text
    )
    text = re.sub(r"(cuda_compute_capability \{\s*major: 8\s*minor: )0", r"\g<1>6", text)
    topo = xla_client.make_c_api_device_topology(
        targets._cuda_c_api(), "", target_config=text, topology="1x1x1"
    )
    devices = list(topo._make_compile_only_devices())
    assert devices[0].device_kind == "NVIDIA RTX A6000" and devices[0].compute_capability == "8.6"
    mesh = jax.sharding.Mesh(np.array(devices), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    compiled, n_kernels = _compile(mesh, "vjp", jnp.bfloat16, R, D, F, 8)
    _assert_native(compiled, "gpu:a100x1", n_kernels)  # Triton, as on every sm8x GPU
