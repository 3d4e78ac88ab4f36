"""kernels_pallas backend="mosaic_gpu": the Hopper grouped matmuls (kernels_pallas/mosaic_gpu.py).

On CPU the kernels run in Pallas's GPU interpreter (slow: small shapes with 64-wide tiles, so
there are several row, contraction and column tiles and every dimension needs padding), and
values and gradients must match the jnp reference for ragged group sizes, empty groups and
all-null batches; rows outside the local groups and the weight gradient of an empty group are
exactly 0. From this CPU host the kernels also compile for H100 / H200 (compile-only devices),
down to ptxas's sm_90a machine code, and targets without wgmma get a clear error.

The oldest supported jax (0.10.2) has no Mosaic GPU interpreter: there these tests check that
backend="mosaic_gpu" is refused with a message naming the jax that has it, and that "auto"
keeps Triton on every GPU.
"""

import functools
import glob
import os
import subprocess
import sys

os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from test_kernels_compile import _require  # noqa: E402  (skip locally, fail in CI)

import kernels_pallas as kp  # noqa: E402
from kernels_pallas import dispatch, mosaic_gpu, targets  # noqa: E402

AVAILABLE = mosaic_gpu.unavailable_reason() is None
R, D, F, G = 128, 72, 80, 4  # padded to 128 x 128 x 128: 2 tiles of 64 on each axis
G_LOCAL = 2  # window of the group_offset test
BLOCKS = kp.BlockSizes(tm=64, tk=64, tn=64)
TOL = {jnp.bfloat16: 2e-2, jnp.float32: 5e-5}  # relative to the largest reference magnitude
SETTINGS = settings(max_examples=5, deadline=None, derandomize=True)
cuts = st.lists(st.integers(0, R), min_size=G, max_size=G)


def _sizes(cuts) -> np.ndarray:
    """Group sizes from cut points in [0, R]: repeats give empty groups, sum <= R."""
    return np.diff(np.concatenate([[0], np.sort(np.asarray(cuts))])).astype(np.int32)


def _data(dtype, shapes, seed=0):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.normal(size=s), dtype) for s in shapes]


def _assert_close(got, want, dtype, what):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    assert np.isfinite(got).all(), f"{what}: non-finite values"
    err, scale = np.abs(got - want).max(initial=0.0), 1.0 + np.abs(want).max(initial=0.0)
    assert err <= TOL[dtype] * scale, f"{what}: max error {err} > {TOL[dtype]} * {scale}"


def _assert_refused():
    """Without the Mosaic GPU interpreter the backend is refused, naming the jax that has it."""
    x, w = _data(jnp.bfloat16, [(R, D), (G, D, F)])
    with pytest.raises(ValueError, match=r"backend='mosaic_gpu'.*jax 0\.11\.2 and 0\.12"):
        kp.gmm(x, w, jnp.zeros((G,), jnp.int32), backend="mosaic_gpu", interpret=True)


@functools.cache
def _gmm_vjp(windowed: bool, reference: bool):
    """Jitted (out, d_lhs, d_rhs) of gmm; windowed: rhs holds G_LOCAL groups, transposed."""

    def run(lhs, rhs, sizes, offset, ct):
        kw = dict(group_offset=offset if windowed else None, transpose_rhs=windowed)
        if reference:
            fn = lambda x, w: kp.gmm_reference(x, w, sizes, **kw)
        else:
            fn = lambda x, w: kp.gmm(
                x, w, sizes, block_sizes=BLOCKS, backend="mosaic_gpu", interpret=True, **kw
            )
        out, vjp = jax.vjp(fn, lhs, rhs)
        return (out, *vjp(ct))

    return jax.jit(run)


def _check_gmm(dtype, sizes, offset, windowed):
    if not AVAILABLE:
        return _assert_refused()
    g = G_LOCAL if windowed else G
    lhs, rhs, ct = _data(dtype, [(R, D), (g, F, D) if windowed else (g, D, F), (R, F)])
    args = (lhs, rhs, jnp.asarray(sizes), jnp.int32(offset), ct)
    got, want = _gmm_vjp(windowed, False)(*args), _gmm_vjp(windowed, True)(*args)
    for name, a, b in zip(("out", "d_lhs", "d_rhs"), got, want):
        assert a.dtype == b.dtype, (name, a.dtype, b.dtype)
        _assert_close(a, b, dtype, f"mosaic_gpu {name}")
    ends = np.cumsum(sizes)
    lo, hi = (ends[offset - 1] if offset else 0), ends[offset + g - 1]
    outside = (np.arange(R) < lo) | (np.arange(R) >= hi)
    assert (np.asarray(got[0], np.float32)[outside] == 0).all(), "rows outside the groups"
    assert (np.asarray(got[1], np.float32)[outside] == 0).all(), "d_lhs outside the groups"
    empty = np.asarray(sizes)[offset : offset + g] == 0
    assert (np.asarray(got[2], np.float32)[empty] == 0).all(), "an empty group's gradient"


@SETTINGS
@given(cuts=cuts)
@example(cuts=[0] * G)  # an all-null batch: every row is a dropped slot, output all zeros
@example(cuts=[0, 0, R, R])  # one group holds every row, three are empty
@example(cuts=[5, 5, 70, 100])  # sum < R, an empty group, groups straddling tiles
@example(cuts=[64, 64, 64, 64])  # a group ending on a tile edge, the second tile all null
def test_gmm_and_grads_match_reference(cuts):
    _check_gmm(jnp.bfloat16, _sizes(cuts), 0, windowed=False)


@settings(max_examples=2, deadline=None, derandomize=True)
@given(cuts=cuts, offset=st.integers(0, G - G_LOCAL))
@example(cuts=[3, 60, 60, 110], offset=1)
@example(cuts=[0, 0, 0, 0], offset=2)
def test_f32_group_window_transposed(cuts, offset):
    """f32 operands (three bf16 products), rhs [G, F, D], a window of local groups."""
    _check_gmm(jnp.float32, _sizes(cuts), offset, windowed=True)


@functools.cache
def _tgmm_vjp(reference: bool):
    def run(lhs, grad, sizes, ct):
        if reference:
            fn = lambda x, y: kp.tgmm_reference(x, y, sizes)
        else:
            fn = lambda x, y: kp.tgmm(
                x, y, sizes, block_sizes=BLOCKS, backend="mosaic_gpu", interpret=True
            )
        out, vjp = jax.vjp(fn, lhs, grad)
        return (out, *vjp(ct))

    return jax.jit(run)


@settings(max_examples=3, deadline=None, derandomize=True)
@given(cuts=cuts)
@example(cuts=[0, 7, 7, 90])
def test_tgmm_and_grads_match_reference(cuts):
    if not AVAILABLE:
        return _assert_refused()
    sizes = jnp.asarray(_sizes(cuts))
    args = (*_data(jnp.bfloat16, [(R, D), (R, F), (G, D, F)], seed=1),)
    lhs, grad, ct = args
    got, want = _tgmm_vjp(False)(lhs, grad, sizes, ct), _tgmm_vjp(True)(lhs, grad, sizes, ct)
    for name, a, b in zip(("out", "d_lhs", "d_grad"), got, want):
        _assert_close(a, b, jnp.bfloat16, f"mosaic_gpu tgmm {name}")
    assert (np.asarray(got[0], np.float32)[np.asarray(sizes) == 0] == 0).all()


def test_block_sizes_are_checked_naming_the_field():
    if not AVAILABLE:
        return _assert_refused()
    x, w = _data(jnp.bfloat16, [(R, D), (G, D, F)])
    sizes = jnp.full((G,), 8, jnp.int32)
    call = functools.partial(kp.gmm, x, w, sizes, backend="mosaic_gpu", interpret=True)
    with pytest.raises(ValueError, match=r"BlockSizes\.tk must be a multiple of 64"):
        call(block_sizes=kp.BlockSizes(tm=64, tk=32, tn=64))
    with pytest.raises(ValueError, match=r"BlockSizes\.tn must be at most 256"):
        call(block_sizes=kp.BlockSizes(tm=64, tk=64, tn=512))
    with pytest.raises(ValueError, match="bytes of shared memory for Mosaic GPU gmm"):
        call(block_sizes=kp.BlockSizes(tm=256, tk=256, tn=256))
    with pytest.raises(ValueError, match="GPU interpreter, which needs interpret=True"):
        kp.gmm(x, w, sizes, backend="mosaic_gpu", interpret="auto")


def _gpu(target):
    _require(target)
    return targets.compile_only_devices(target)


@pytest.mark.parametrize("target", ["gpu:h100x1", "gpu:h200x1"])
def test_auto_picks_mosaic_gpu_on_hopper_and_triton_elsewhere(target):
    hopper = _gpu(target)
    ampere, ada = _gpu("gpu:a100x1"), _gpu("gpu:l4x1")
    want = "mosaic_gpu" if AVAILABLE else "triton"
    assert dispatch.resolve_backend("auto", False, "cuda", hopper) == want
    assert kp.mosaic_gpu_supported(hopper[0]) == AVAILABLE
    for other in (ampere, ada, []):  # no known GPU: Triton with tiles that fit any
        assert dispatch.resolve_backend("auto", False, "cuda", other) == "triton"
    assert not kp.mosaic_gpu_supported(ampere[0]) and not kp.mosaic_gpu_supported(ada[0])


def _compile_vjp(target, dtype, backend="mosaic_gpu"):
    mesh = targets.mesh(target)
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    spec = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=sharding)  # noqa: E731
    r, d, f, g = 512, 1408, 384, 256  # D = 11 x 128; the largest G we support

    def loss(x, w, s):
        return kp.gmm(x, w, s, backend=backend).astype(jnp.float32).sum()

    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    return fn.lower(spec((r, d), dtype), spec((g, d, f), dtype), spec((g,), jnp.int32)).compile()


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])
def test_h200_gradient_step_compiles_the_mosaic_gpu_kernels(dtype):
    """gmm + its two backward kernels, explicit backend, H200 (an f32 product is 3 kernels)."""
    _gpu("gpu:h200x1")
    if not AVAILABLE:
        with pytest.raises(ValueError, match="backend='mosaic_gpu'.*jax 0.11.2 and 0.12"):
            _compile_vjp("gpu:h200x1", dtype)
        return
    text = _compile_vjp("gpu:h200x1", dtype).as_text()
    assert text.count("mosaic_gpu_v2") == 3 * (3 if dtype == jnp.float32 else 1)
    assert "__gpu$xla.gpu.triton" not in text


def test_gpus_without_wgmma_get_a_clear_error_not_a_crash():
    """On sm80 LLVM aborts the process on wgmma's instructions: refuse before lowering."""
    _gpu("gpu:a100x1")
    match = r"compute capability 9\.x.*has 8\.0: use backend='triton'" if AVAILABLE else "0.12"
    with pytest.raises(ValueError, match=match):
        _compile_vjp("gpu:a100x1", jnp.bfloat16)


PTXAS_SCRIPT = """
import jax, jax.numpy as jnp, kernels_pallas as kp
from kernels_pallas import targets
s = jax.sharding.SingleDeviceSharding(targets.compile_only_devices("gpu:h100x1")[0])
spec = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=s)
fn = lambda x, w, g: kp.gmm(x, w, g, backend="mosaic_gpu")
jax.jit(fn).lower(spec((256, 1408), jnp.bfloat16), spec((8, 1408, 384), jnp.bfloat16),
                  spec((8,), jnp.int32)).compile()
"""


def test_hopper_compile_reaches_ptxas_machine_code(tmp_path):
    """The compile from this CPU host is a full one: Mosaic GPU's PTX for sm_90a with wgmma,
    assembled by ptxas (its report dumped by MOSAIC_GPU_DUMP_*) without spilling registers."""
    _gpu("gpu:h100x1")
    if not AVAILABLE:
        return _assert_refused()
    env = dict(os.environ, JAX_PLATFORMS="cpu", MOSAIC_GPU_DUMP_TO=str(tmp_path))
    env.update(MOSAIC_GPU_DUMP_PTX="1", MOSAIC_GPU_DUMP_PTXAS="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run(
        [sys.executable, "-c", PTXAS_SCRIPT], env=env, cwd=root, capture_output=True, timeout=300
    )
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    ptx = "".join(open(p).read() for p in glob.glob(str(tmp_path / "*.ptx")))
    ptxas = "".join(open(p).read() for p in glob.glob(str(tmp_path / "*.ptxas")))
    assert "wgmma.mma_async" in ptx and ".target sm_90a" in ptx
    assert "for 'sm_90a'" in ptxas and "0 bytes spill stores" in ptxas, ptxas
