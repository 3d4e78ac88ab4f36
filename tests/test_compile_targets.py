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
import pytest  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from configs import default  # noqa: E402
from moe_jax import MoE, MoEConfig, experts, parallel  # noqa: E402
from moe_jax.train import aot  # noqa: E402
from moe_jax.train.config import from_config_dict  # noqa: E402

KERNEL = {"gpu": "__gpu$xla.gpu.triton", "tpu": "tpu_custom_call"}
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
    assert KERNEL[target[:3]] in hlo


@pytest.mark.parametrize("target", ["gpu:h100x1", "tpu:v5e:1x1"])
def test_explicit_pallas_compiles_the_native_kernel(target):
    """backend="pallas" (not only "auto") lowers the target's kernel, never the interpret loop,
    although this host's default backend is the CPU."""
    hlo, _ = _compile_layer(target, "null", backend="pallas")
    assert KERNEL[target[:3]] in hlo


@pytest.mark.parametrize("target, mesh", [("gpu:h100x8", (1, 8)), ("tpu:v5e:4x4", (2, 8))])
def test_expert_parallel_layer_uses_ragged_all_to_all(target, mesh):
    hlo, _ = _compile_layer(target, "null", ep_shape=mesh)
    assert "ragged-all-to-all" in hlo
    assert KERNEL[target[:3]] in hlo


def test_pre_ampere_gpu_gets_the_xla_path_and_a_clear_error():
    t4 = _devices("gpu:t4x1")[0]
    assert experts.resolve_backend("auto", t4) == "tiled"  # never ragged, never Triton
    with pytest.raises(ValueError, match=r"compute capability >= 8\.0.*7\.5.*tiled"):
        experts.resolve_backend("pallas", t4)
    hlo, _ = _compile_layer("gpu:t4x1", "null")
    assert KERNEL["gpu"] not in hlo


@pytest.mark.parametrize("target", ["gpu:h100x1", "tpu:v5e:1x1"])
def test_aot_default_config_compiles_and_fits(target):
    _devices(target)
    report = aot.compile_train_step(from_config_dict(default.get_config()), target)
    assert report["fits"] and report["native_kernel"], report
    assert report["expert_backend"] == "pallas"
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
    # moments do not fit a 16 GB T4: the report says so and the exit status is 1.
    big = ("--config.model.d_model=1024", "--config.moe.d_ff=16384")
    r = run("--target=gpu:t4x1", "--config=configs/default.py", *big)
    assert r.returncode == 1 and "does not fit" in r.stdout, (r.stdout, r.stderr)
