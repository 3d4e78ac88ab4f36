"""Backend "tokamax" (tokamax.ragged_dot) equals the dense reference in values and gradients,
also with empty groups and all-null batches, on one device and expert-parallel over 8 fake CPU
devices; and it compiles the native tokamax kernel for H100 (Mosaic GPU) and v5e (Mosaic TPU).

On CPU tokamax has one implementation, "xla" (jax.lax.ragged_dot_general): the CPU tests check
our adapter (the implementation choice, the VJP, the masks) around it; the compile tests check
the kernels themselves compile for the targets (nothing runs there).

Where these run: the `tokamax` extra needs Python >= 3.12 and jax >= 0.11.1. In an environment
that cannot install it (the oldest CI environment: Python 3.11, jax 0.10.2) they skip with that
reason, and test_clear_error_without_tokamax checks the error a user gets there instead. In an
environment that can install it they skip locally without it and FAIL when CI is set.
"""

import ast
import functools
import importlib.util
import os
import pathlib
import re
import sys

os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from conftest import TOKAMAX_INSTALLABLE  # noqa: E402
from flax import nnx  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from moe_jax import MoE, MoEConfig, experts, parallel  # noqa: E402
from moe_jax.experts import registry  # noqa: E402
from moe_jax.experts.reference import dense_gmm  # noqa: E402

HAS_TOKAMAX = importlib.util.find_spec("tokamax") is not None
PACKAGES = {"gpu": ("jax_cuda12_plugin", "jax_cuda13_plugin"), "tpu": ("libtpu",)}
NATIVE = {
    "gpu": 'custom_call_target="mosaic_gpu_v2"',
    "tpu": 'custom_call_target="tpu_custom_call"',
}
R, G, DIN, DOUT = 48, 5, 16, 8  # fixed shapes: group sizes vary as traced values
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


@pytest.fixture(scope="module")
def tokamax():
    """tokamax, or a skip naming why it is missing (a failure in CI). Where it cannot be
    installed at all, conftest deselects the tests that use this fixture."""
    if not HAS_TOKAMAX:
        msg = "tokamax is not installed: pip install -e '.[tokamax]'"
        if _in_ci():
            pytest.fail(f"CI is set but {msg}")
        pytest.skip(msg)
    from moe_jax.experts import tokamax as backend

    return backend


def test_clear_error_without_tokamax(monkeypatch):
    """Without tokamax (always so on Python 3.11) backend="tokamax" is refused when the layer is
    built, naming the extra and the requirement; other backends are unaffected."""
    if HAS_TOKAMAX:  # simulate its absence
        monkeypatch.setitem(sys.modules, "tokamax", None)
        monkeypatch.delitem(sys.modules, "moe_jax.experts.tokamax", raising=False)
        monkeypatch.setattr(registry, "_BACKENDS", dict(registry._BACKENDS))
        registry._BACKENDS.pop("tokamax", None)
    cfg = MoEConfig(d_model=8, d_ff=8, num_experts=2, router="topk", top_k=1, backend="tokamax")
    msg = r"backend='tokamax'.*Python >= 3\.12 and jax >= 0\.11\.1.*pip install \"moe_jax\[tokamax\]\""
    with pytest.raises(ValueError, match=msg):
        MoE(cfg, rngs=nnx.Rngs(0))
    MoE(MoEConfig(d_model=8, d_ff=8, num_experts=2, router="topk", top_k=1), rngs=nnx.Rngs(0))


def test_extra_installs_where_it_can():
    """setup.py's [tokamax] extra, and the [test] extra CI installs, bring tokamax exactly where
    it can install (Python >= 3.12): the oldest environment goes without; CI on 3.12 must have
    it."""
    from packaging.requirements import Requirement

    text = (pathlib.Path(__file__).parents[1] / "setup.py").read_text(encoding="utf-8")
    (req,) = ast.literal_eval(re.search(r'"tokamax": (\[[^\]]*\])', text)[1])
    test_extra = re.search(r'"test": \[(.*?)\],', text, flags=re.S)[1]
    assert f'"{req}"' in test_extra  # the same requirement, marker included
    req = Requirement(req)
    assert req.name == "tokamax" and req.specifier.contains("0.0.17")
    for version, wanted in [("3.11", False), ("3.12", True), ("3.13", True)]:
        assert req.marker.evaluate({"python_version": version}) is wanted, version
    if TOKAMAX_INSTALLABLE and _in_ci():
        assert HAS_TOKAMAX, "CI is set on Python >= 3.12 but the [tokamax] extra is missing"


# --- the grouped matmul against the dense reference ----------------------------------------


def _loss(fn, x, w, gs, dy):
    return jnp.sum(fn(x, w, gs).astype(jnp.float32) * dy)


@jax.jit
def _tokamax_vjp(x, w, gs, dy):
    from moe_jax.experts.tokamax import tokamax_gmm

    grads = jax.grad(lambda x, w: _loss(tokamax_gmm, x, w, gs, dy), argnums=(0, 1))(x, w)
    return tokamax_gmm(x, w, gs), grads


@jax.jit
def _ref_vjp(x, w, gs, dy):
    x, w = x.astype(jnp.float32), w.astype(jnp.float32)  # f32 from the same rounded inputs
    grads = jax.grad(lambda x, w: _loss(dense_gmm, x, w, gs, dy), argnums=(0, 1))(x, w)
    return dense_gmm(x, w, gs), grads


def _inputs(seed, dtype):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(R, DIN)), dtype)  # [R, Din]
    w = jnp.asarray(rng.normal(size=(G, DIN, DOUT)) / 4, dtype)  # [G, Din, Dout]
    dy = jnp.asarray(rng.normal(size=(R, DOUT)), jnp.float32)  # [R, Dout]
    return x, w, dy


def _close(actual, expected, dtype):
    actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
    scale = max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(actual, expected, rtol=TOL[dtype], atol=TOL[dtype] * scale)


def _check(sizes, dtype, seed=0, x_past=None, dy_past=None):
    gs = jnp.asarray(sizes, jnp.int32)
    x, w, dy = _inputs(seed, dtype)
    num_real = int(sum(sizes))
    ref, (rdx, rdw) = _ref_vjp(x, w, gs, dy)
    if x_past is not None:  # dispatch may leave anything past num_real
        x, dy = x.at[num_real:].set(x_past), dy.at[num_real:].set(dy_past)
    out, (dx, dw) = _tokamax_vjp(x, w, gs, dy)
    assert out.dtype == dtype and dx.dtype == dtype and dw.dtype == dtype
    for a in (out, dx, dw):
        assert np.all(np.isfinite(np.asarray(a, np.float32)))
    _close(out, ref, dtype)
    _close(dx, rdx, dtype)
    _close(dw, rdw, dtype)
    # Rows past the real ones are exactly zero, in the output and in the lhs gradient.
    assert np.all(np.asarray(out[num_real:]) == 0) and np.all(np.asarray(dx[num_real:]) == 0)
    # Empty groups get exactly zero weight gradient (tokamax issue 887).
    for g, size in enumerate(sizes):
        if size == 0:
            assert np.all(np.asarray(dw[g]) == 0), g


@st.composite
def _group_sizes(draw):
    """G sizes summing to at most R, with empty groups and num_real = 0 both likely."""
    num_real = draw(st.sampled_from([0, 1, R // 2, R - 3, R]) | st.integers(0, R))
    cuts = sorted(draw(st.lists(st.integers(0, num_real), min_size=G - 1, max_size=G - 1)))
    return [int(s) for s in np.diff([0, *cuts, num_real])]


@settings(max_examples=20, deadline=None)
@given(sizes=_group_sizes(), seed=st.integers(0, 3))
def test_gmm_matches_reference_f32(tokamax, sizes, seed):
    _check(sizes, jnp.float32, seed)


@settings(max_examples=8, deadline=None)
@given(sizes=_group_sizes())
def test_gmm_matches_reference_bf16(tokamax, sizes):
    _check(sizes, jnp.bfloat16)


@pytest.mark.parametrize("sizes", [[0] * G, [R, 0, 0, 0, 0], [0, 0, 0, 0, R], [0, 7, 0, 9, 0]])
def test_gmm_edge_group_sizes(tokamax, sizes):
    _check(sizes, jnp.float32)


def test_gmm_garbage_past_num_real_does_not_leak(tokamax):
    _check([5, 0, 11, 3, 0], jnp.float32, x_past=jnp.nan, dy_past=jnp.inf)


def test_registered_and_validates(tokamax):
    assert experts.get_backend("tokamax") == (tokamax.tokamax_gmm, False)
    x, w, _ = _inputs(0, jnp.float32)
    with pytest.raises(ValueError, match="group_sizes"):
        tokamax.tokamax_gmm(x, w, jnp.zeros((G + 1,), jnp.int32))
    with pytest.raises(ValueError, match="same D"):
        tokamax.tokamax_gmm(x[:, :3], w, jnp.zeros((G,), jnp.int32))


# --- the MoE layer: one device and expert-parallel (8 fake CPU devices) --------------------

D, F, N, B, L = 16, 32, 8, 8, 4  # 32 tokens: 4 per shard on 8 shards
ROUTERS = {
    # Null router; the large router std spreads logits so tokens get 0..K real experts.
    "null": dict(router="null", top_k=4, rho=0.5, router_init_std=1.0),
    "topk": dict(router="topk", top_k=2, activation="gelu", expert_bias=True),
}


def _layer(router, backend, mesh=None, **kw):
    base = dict(d_model=D, d_ff=F, num_experts=N, lb_scope="global", backend=backend)
    cfg = MoEConfig(**{**base, **ROUTERS[router], **kw})
    par = None
    if mesh is not None:  # (data, fsdp, expert)
        data, fsdp, expert = mesh
        ep_cfg = parallel.MeshConfig(data=data, fsdp=fsdp, expert=expert, buffer_factor="dropless")
        par = parallel.ExpertParallel(parallel.make_mesh(ep_cfg), ep_cfg)
    return MoE(cfg, rngs=nnx.Rngs(0), parallel=par)


def _layer_inputs(positive=False):
    kx, kc = jax.random.split(jax.random.key(1))
    x = jax.random.normal(kx, (B, L, D))  # [B, L, D]
    ct = jax.random.normal(kc, (B, L, D))  # cotangent for sum(y * ct)
    return (jnp.abs(x) + 0.1 if positive else x), ct


def _layer_loss(graphdef, state, x, ct):
    y, aux = nnx.merge(graphdef, state)(x)
    return jnp.sum(y * ct) + aux["aux_loss"], (y, aux)


_layer_vjp = jax.jit(
    jax.value_and_grad(_layer_loss, argnums=(1, 2), has_aux=True), static_argnums=0
)


def _run(layer, x, ct):
    """(y, aux, parameter gradients, input gradient) of sum(y * ct) + aux_loss."""
    graphdef, state = nnx.split(layer)
    (_, (y, aux)), (g_state, g_x) = _layer_vjp(graphdef, state, x, ct)
    return y, aux, g_state, g_x


def _assert_close(got, want, what, rtol=2e-5, atol=2e-6):
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got)):
        np.testing.assert_allclose(b, a, rtol=rtol, atol=atol, err_msg=f"{what} {path}")


# (router, mesh): one device, and expert-parallel meshes with 8 and 4 expert shards.
LAYER_CASES = [("null", None), ("null", (1, 1, 8)), ("topk", (2, 1, 4))]


@functools.cache
def _reference(router):
    return _run(_layer(router, "dense"), *_layer_inputs())


@pytest.mark.parametrize("router, mesh", LAYER_CASES)
def test_layer_matches_dense(tokamax, router, mesh):
    """The layer (expert-parallel: each shard's local experts, its own group sizes and no
    group_offset) equals the dense single-device reference in values and gradients."""
    y0, aux0, g0, gx0 = _reference(router)
    y, aux, g, gx = _run(_layer(router, "tokamax", mesh), *_layer_inputs())
    if mesh is not None:
        assert float(aux["ep_overflow_fraction"]) == 0.0
    np.testing.assert_allclose(y, y0, rtol=2e-5, atol=2e-6)
    _assert_close({k: aux[k] for k in aux0}, aux0, "aux")
    _assert_close(g, g0, "grad")
    np.testing.assert_allclose(gx, gx0, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("mesh", [None, (2, 1, 4)])
def test_all_null_batch(tokamax, mesh):
    """Every slot null (every group empty, on every shard): output exactly 0, exactly zero and
    finite expert gradients."""
    layer = _layer("null", "tokamax", mesh)
    k = np.zeros(layer.router.kernel[...].shape, np.float32)
    k[:, N] = 1.0  # the null logit wins for all-positive inputs
    layer.router.kernel[...] = jnp.asarray(k)
    y, aux, g, gx = _run(layer, *_layer_inputs(positive=True))
    assert float(aux["null_ratio"]) == 1.0
    assert float(jnp.max(jnp.abs(y))) == 0.0
    for name in ("w_in", "w_gate", "w_out"):
        assert float(jnp.max(jnp.abs(g[name][...]))) == 0.0, name
    assert all(bool(jnp.all(jnp.isfinite(v))) for v in jax.tree.leaves((g, gx)))


# --- compile for H100 (Mosaic GPU) and v5e (Mosaic TPU) from this CPU host -----------------


def _target_devices(target):
    kind = target.split(":")[0]
    if all(importlib.util.find_spec(p) is None for p in PACKAGES[kind]):
        msg = f"{target} needs one of {PACKAGES[kind]}: pip install -e '.[aot]'"
        if _in_ci():
            pytest.fail(f"CI is set but {msg}")
        pytest.skip(msg)
    from kernels_pallas import targets

    return targets.compile_only_devices(target)


def test_implementation_per_target(tokamax):
    """The kernel asked of tokamax per target: its native one where it has one."""
    impl = tokamax.implementation
    assert impl(jax.devices("cpu")[0]) == "xla"
    if all(importlib.util.find_spec(p) is None for p in PACKAGES["tpu"] + PACKAGES["gpu"]):
        return
    assert impl(_target_devices("tpu:v5e:1x1")[0]) == "mosaic_tpu"
    assert impl(_target_devices("tpu:v4:2x2x1")[0]) == "xla"  # tokamax's kernel needs v5+
    assert impl(_target_devices("gpu:h100x1")[0]) == "mosaic_gpu"
    assert impl(_target_devices("gpu:t4x1")[0]) == "xla"  # compute capability 7.5


# fwd + bwd of one grouped matmul: forward, d_lhs (transposed) and d_rhs (tgmm) kernels.
@pytest.mark.parametrize("target", ["gpu:h100x1", "tpu:v5e:1x1"])
def test_gmm_compiles_the_native_kernel(tokamax, target):
    """The choice is made for the lowering target, although this host's default device is a
    CPU (tokamax itself would pick "xla" here): 3 native kernels, no dense ragged dot."""
    sharding = jax.sharding.SingleDeviceSharding(_target_devices(target)[0])
    spec = lambda s, d=jnp.bfloat16: jax.ShapeDtypeStruct(s, d, sharding=sharding)  # noqa: E731

    def loss(x, w, gs):
        return jnp.sum(tokamax.tokamax_gmm(x, w, gs).astype(jnp.float32) ** 2)

    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    hlo = fn.lower(spec((256, 128)), spec((4, 128, 256)), spec((4,), jnp.int32)).compile()
    hlo = hlo.as_text()
    assert hlo.count(NATIVE[target[:3]]) == 3
    assert "ragged-dot" not in hlo


@pytest.mark.parametrize("target, mesh", [("gpu:h100x2", (1, 1, 2)), ("tpu:v5e:2x2", (1, 1, 4))])
def test_expert_parallel_layer_compiles_the_native_kernel(tokamax, target, mesh):
    """The expert-parallel layer (fwd + bwd, bf16) on a multi-device target: the row exchange
    is ragged_all_to_all and each shard's experts run tokamax's kernel (SwiGLU: 2 grouped
    matmuls forward, 3 kernels each with the backward)."""
    devices = _target_devices(target)
    ep_cfg = parallel.MeshConfig(data=mesh[0], fsdp=mesh[1], expert=mesh[2])
    jmesh = parallel.make_mesh(ep_cfg, devices=devices)
    cfg = MoEConfig(
        d_model=128, d_ff=128, num_experts=8, router="null", top_k=2, rho=0.5,
        dtype="bfloat16", backend="tokamax",
    )  # fmt: skip
    ep = parallel.ExpertParallel(jmesh, ep_cfg)
    graphdef, params = nnx.split(nnx.eval_shape(lambda: MoE(cfg, rngs=nnx.Rngs(0), parallel=ep)))
    params = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
        params,
        parallel.state_shardings(params, jmesh),
    )
    x = jax.ShapeDtypeStruct(
        (len(devices), 64, 128), jnp.float32, sharding=NamedSharding(jmesh, P(("data", "expert")))
    )

    def loss(params, x):
        y, aux = nnx.merge(graphdef, params)(x)
        return jnp.sum(y.astype(jnp.float32) ** 2) + aux["aux_loss"]

    hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).compile().as_text()
    assert "ragged-all-to-all" in hlo
    assert hlo.count(NATIVE[target[:3]]) == 6, hlo.count(NATIVE[target[:3]])
    assert "ragged-dot" not in hlo
