"""The MoE layer, the expert-parallel layer and the full train step compile for TPU and NVIDIA
targets from this CPU host, with the expert path "auto" picks for the target.

Compile-only devices (kernels_pallas.targets) stand in for the hardware; nothing runs. Each case
asserts what the compiled program holds: the native Pallas kernel (Mosaic `tpu_custom_call`,
Triton `__gpu$xla.gpu.triton`) and not an interpret-mode loop, ragged_all_to_all for the
expert-parallel exchange. Needs the `aot` extra; without it these skip locally and FAIL when the
CI environment variable is set.
"""

import importlib.util
import os
import subprocess
import sys

os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # configs/ lives at the repository root

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from configs import default  # noqa: E402
from moe_jax import MoE, MoEConfig, experts, parallel  # noqa: E402
from moe_jax.train import aot  # noqa: E402
from moe_jax.train.config import from_config_dict  # noqa: E402

KERNEL = {"gpu": "__gpu$xla.gpu.triton", "tpu": "tpu_custom_call"}
MOSAIC_GPU = "mosaic_gpu_v2"  # the Hopper kernels (kernels_pallas/mosaic_gpu.py)
PACKAGES = {"gpu": ("jax_cuda12_plugin", "jax_cuda13_plugin"), "tpu": ("libtpu",)}
ROUTERS = {
    "null": dict(router="null", top_k=4, rho=0.5),
    "topk": dict(router="topk", top_k=2),
    "switch": dict(router="switch", top_k=1, capacity_factor=1.25),
    "threshold": dict(router="threshold", threshold=0.8),
    "expert_choice": dict(router="expert_choice", causal=False),
}
D, F, N, B, L = 128, 256, 8, 8, 32


def _devices(target):
    kind = target.split(":")[0]
    if all(importlib.util.find_spec(p) is None for p in PACKAGES[kind]):
        msg = f"{target} needs one of {PACKAGES[kind]}: pip install -e '.[aot]'"
        if os.environ.get("CI", "").lower() not in ("", "0", "false", "no"):
            pytest.fail(f"CI is set but {msg}")
        pytest.skip(msg)
    from kernels_pallas import targets

    return targets.compile_only_devices(target)


def _kernel(target):
    """The custom call of the kernel "auto" picks for the target: Mosaic on TPU, Mosaic GPU on
    Hopper where the running jax has it, Triton on the other NVIDIA GPUs."""
    if target.startswith("tpu"):
        return KERNEL["tpu"]
    import kernels_pallas

    supported = kernels_pallas.mosaic_gpu_supported(_devices(target)[0])
    return MOSAIC_GPU if supported else KERNEL["gpu"]


def _compile_layer(target, router, ep_shape=None, backend="auto"):
    """Compiled fwd+bwd of one MoE layer on `target` (expert parallel over ep_shape)."""
    devices = _devices(target)
    data, expert = ep_shape or (len(devices), 1)
    mesh_cfg = parallel.MeshConfig(data=data, expert=expert)
    mesh = parallel.make_mesh(mesh_cfg, devices=devices)
    cfg = MoEConfig(d_model=D, d_ff=F, num_experts=N, backend=backend, **ROUTERS[router])
    layer = nnx.eval_shape(
        lambda: MoE(cfg, rngs=nnx.Rngs(0), parallel=parallel.ExpertParallel(mesh, mesh_cfg))
    )
    graphdef, params = nnx.split(layer)
    params = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
        params,
        parallel.state_shardings(params, mesh),
    )
    x = jax.ShapeDtypeStruct(
        (max(B, data * expert), L, D),
        jnp.float32,
        sharding=NamedSharding(mesh, P(("data", "expert"))),
    )

    def loss(params, x):
        y, aux = nnx.merge(graphdef, params)(x)
        return jnp.sum(y**2) + aux["aux_loss"]

    return jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).compile().as_text(), devices


@pytest.mark.parametrize("target", ["gpu:h100x1", "tpu:v5e:1x1"])
@pytest.mark.parametrize("router", sorted(ROUTERS))
def test_layer_fwd_bwd_compiles_with_the_native_kernel(target, router):
    hlo, devices = _compile_layer(target, router)
    assert experts.resolve_backend("auto", devices[0]) == "pallas"
    assert _kernel(target) in hlo


@pytest.mark.parametrize("target", ["gpu:h100x1", "tpu:v5e:1x1"])
def test_explicit_pallas_compiles_the_native_kernel(target):
    """backend="pallas" (not only "auto") lowers the target's kernel, never the interpret loop,
    although this host's default backend is the CPU."""
    hlo, _ = _compile_layer(target, "null", backend="pallas")
    assert _kernel(target) in hlo


@pytest.mark.parametrize("target, mesh", [("gpu:h100x8", (1, 8)), ("tpu:v5e:4x4", (2, 8))])
def test_expert_parallel_layer_uses_ragged_all_to_all(target, mesh):
    hlo, _ = _compile_layer(target, "null", ep_shape=mesh)
    assert "ragged-all-to-all" in hlo
    assert _kernel(target) in hlo


def test_pre_ampere_gpu_gets_the_xla_path_and_a_clear_error():
    t4 = _devices("gpu:t4x1")[0]
    assert experts.resolve_backend("auto", t4) == "tiled"  # never ragged, never Triton
    with pytest.raises(ValueError, match=r"compute capability >= 8\.0.*7\.5.*tiled"):
        experts.resolve_backend("pallas", t4)
    hlo, _ = _compile_layer("gpu:t4x1", "null")
    assert KERNEL["gpu"] not in hlo and MOSAIC_GPU not in hlo


def _single_device_layer(backend="auto"):
    """A single-device MoE layer built on this CPU host (no mesh, no ExpertParallel)."""
    cfg = MoEConfig(d_model=D, d_ff=D, num_experts=4, router="topk", top_k=2, backend=backend)
    return nnx.split(MoE(cfg, rngs=nnx.Rngs(0)))


def _single_device_hlo(target, grad, **kw):
    """Compiled HLO of the layer jitted with its inputs committed to one device of `target`."""
    graphdef, params = _single_device_layer(**kw)
    sharding = jax.sharding.SingleDeviceSharding(_devices(target)[0])
    spec = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding)  # noqa: E731
    x = spec(jnp.zeros((1, L, D), jnp.float32))  # [B, L, D]

    def loss(params, x):
        return jnp.sum(nnx.merge(graphdef, params)(x)[0] ** 2)

    fn = jax.grad(loss, argnums=(0, 1)) if grad else loss
    return jax.jit(fn).lower(jax.tree.map(spec, params), x).compile().as_text()


# fwd: 2 gmm (SwiGLU's two input projections in one, then the output); fwd+bwd: 6 kernels.
# The layer is f32: Mosaic GPU runs each f32 product as three bf16 kernels.
@pytest.mark.parametrize(
    "target, grad",
    [("gpu:h100x1", False), ("gpu:a100x1", False), ("tpu:v5e:1x1", True), ("tpu:v6e:1x1", False)],
)
def test_auto_single_device_layer_compiles_the_targets_kernel(target, grad):
    """backend="auto" is chosen for the devices the program is lowered for, not this CPU host:
    a layer built here and jitted with inputs on an H100 / A100 / v5e / v6e holds the native
    kernel, and XLA has dropped the other branch (no conditional left)."""
    hlo = _single_device_hlo(target, grad)
    per_product = 3 if _kernel(target) == MOSAIC_GPU else 1
    assert hlo.count(_kernel(target)) == (6 if grad else 2) * per_product
    assert "conditional" not in hlo


def test_auto_single_device_pre_ampere_gpu_compiles_the_xla_loop():
    """On a T4 the table picks the XLA loop; the Pallas branch lowers its reference there (for
    forward and backward) and is dropped, instead of failing for want of Triton."""
    hlo = _single_device_hlo("gpu:t4x1", grad=True)
    assert KERNEL["gpu"] not in hlo and MOSAIC_GPU not in hlo and "conditional" not in hlo


def test_auto_table_entry_per_device_kind_drives_the_lowering(monkeypatch):
    """An AUTO_BACKENDS entry for one device kind overrides its platform's, at lowering time."""
    v5e, v6e = _devices("tpu:v5e:1x1")[0], _devices("tpu:v6e:1x1")[0]
    monkeypatch.setitem(experts.registry.AUTO_BACKENDS, f"tpu:{v5e.device_kind}", "tiled")
    assert experts.resolve_backend("auto", v5e) == "tiled"
    assert experts.resolve_backend("auto", v6e) == "pallas"
    assert KERNEL["tpu"] not in _single_device_hlo("tpu:v5e:1x1", grad=False)


def test_auto_inside_a_users_shard_map_compiles_the_targets_kernel():
    """routed_ffn with "auto" and no device, inside a shard_map over TPU devices: the choice
    reads the shard_map's mesh."""
    mesh = jax.sharding.Mesh(
        _devices("tpu:v5e:2x2"), ("x",), axis_types=(jax.sharding.AxisType.Auto,)
    )
    t, n = 64, 4
    params = experts.ExpertParams(*(jnp.zeros((n, D, D)) for _ in range(3)))  # [N, D, F]
    args = (jnp.zeros((t, D)), jnp.zeros((t,), jnp.int32), jnp.zeros((t,)), jnp.zeros((n,), int))

    def ffn(x, tok, w, sizes, params):
        return experts.routed_ffn(x, tok, w, sizes, params)

    fn = jax.shard_map(ffn, mesh=mesh, in_specs=P(), out_specs=P(), check_vma=False)
    replicated = NamedSharding(mesh, P())
    spec = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated)  # noqa: E731
    hlo = jax.jit(fn).lower(*map(spec, args), jax.tree.map(spec, params)).compile().as_text()
    assert KERNEL["tpu"] in hlo and "conditional" not in hlo


def test_auto_on_cpu_is_still_the_tiled_loop():
    """On this CPU host "auto" computes exactly what backend="tiled" does, jitted and eagerly
    (gradients through "auto" on CPU: test_moe.py and test_tiled_moe.py)."""
    assert experts.resolve_backend("auto") == "tiled"
    x = jax.random.normal(jax.random.key(1), (1, L, D))  # [B, L, D]
    auto, tiled = (nnx.merge(*_single_device_layer(b)) for b in ("auto", "tiled"))
    forward = nnx.jit(lambda layer, x: layer(x)[0])
    np.testing.assert_array_equal(forward(auto, x), forward(tiled, x))
    t, d, n = 6, 8, 2  # eagerly: the table is read for the inputs' device, one branch runs
    w = experts.ExpertParams(*jax.random.normal(jax.random.key(2), (3, n, d, d)))  # [N, D, F]
    args = (x[0, :t, :d], jnp.arange(t) % 3, jnp.ones((t,)), jnp.array([2, 3]), w)
    eager = [experts.routed_ffn(*args, backend=b) for b in ("auto", "tiled")]
    np.testing.assert_array_equal(*eager)


@pytest.mark.parametrize("target", ["gpu:h100x1", "tpu:v5e:1x1"])
def test_aot_default_config_compiles_and_fits(target):
    _devices(target)
    report = aot.compile_train_step(from_config_dict(default.get_config()), target)
    assert report["fits"] and report["native_kernel"], report
    assert report["expert_backend"] == "pallas"
    family = {"tpu_custom_call": "Mosaic", MOSAIC_GPU: "Mosaic GPU"}.get(_kernel(target), "Triton")
    assert report["kernel_families"] == [family]  # what the fit check names
    b = report["bytes"]
    assert 0 < b["total"] < b["device_memory"]
    # the donated state: f32 params + two Adam moments are at least 3x the parameter bytes
    assert b["arguments"] >= 3 * 4 * 1e6


def test_aot_cli_errors_name_the_problem():
    """Bad input gets a one-line error and exit status 2 before anything compiles."""

    def run(*args):
        return subprocess.run(
            [sys.executable, "-m", "moe_jax.aot", *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )

    r = run("--target=gpu:z80x1")
    assert r.returncode == 2 and "unknown compile target 'gpu:z80x1'" in r.stderr, r.stderr
    _devices("gpu:h100x8")
    r = run("--target=gpu:h100x8", "--config=configs/default.py:smoke", "--config.mesh.expert=3")
    assert r.returncode == 2 and "config.mesh" in r.stderr, r.stderr
    r = run("--target=tpu:v5e:4x4", "--config=configs/default.py:smoke", "--config.mesh.expert=4")
    assert r.returncode == 2 and "divisible" in r.stderr, r.stderr
    # 3 x 4 bytes x (4 layers x 8 experts x 3 x 1024 x 16384) ~ 19 GB of f32 params and Adam
    # moments do not fit a 16 GB T4: the report says so and the exit status is 3.
    big = ("--config.model.d_model=1024", "--config.moe.d_ff=16384")
    r = run("--target=gpu:t4x1", "--config=configs/default.py", *big)
    assert r.returncode == 3 and "does not fit" in r.stdout, (r.stdout, r.stderr)
