"""kernels_pallas: gmm / tgmm and their gradients agree with the jnp reference, for both the TPU
(Mosaic) and the Triton kernel; rows outside the local groups read exactly 0.

On CPU both kernels run in interpret mode (slow: small shapes, small tiles so several row,
contraction and column tiles are exercised, one compiled function per case shared by all
hypothesis examples). Where a TPU or GPU is present its kernel runs natively.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import kernels_pallas as kp
from kernels_pallas.schedule import make_schedule, num_visits_bound

R, D, F, G = 40, 20, 28, 6  # R, D, F are not multiples of the 16-wide tiles (nor D of 8)
G_LOCAL = 3  # window size for the group_offset tests
BLOCKS = kp.BlockSizes(tm=16, tk=16, tn=16, num_warps=4, num_stages=2)
BACKENDS = ("tpu", "triton")
TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}  # relative to the largest reference magnitude
# Natively an f32 matmul may run in reduced-precision passes (TPU MXU, GPU TF32).
NATIVE_F32_TOL = 5e-3
SETTINGS = settings(max_examples=10, deadline=None, derandomize=True)


def _interpret(backend: str) -> bool:
    native = {"tpu": "tpu", "gpu": "triton"}.get(jax.default_backend())
    return native != backend


def _sizes(cuts) -> np.ndarray:
    """Group sizes from sorted cut points in [0, R]: repeats give empty groups, sum <= R."""
    edges = np.concatenate([[0], np.sort(np.asarray(cuts))])
    return np.diff(edges).astype(np.int32)


cuts = st.lists(st.integers(0, R), min_size=G, max_size=G)


def _data(dtype, shapes, seed=0):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.normal(size=s), dtype) for s in shapes]


def _assert_close(got, want, dtype, what, native=False):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert np.isfinite(got).all(), f"{what}: non-finite values"
    tol = max(TOL[dtype], NATIVE_F32_TOL) if native else TOL[dtype]
    err = np.abs(got - want).max(initial=0.0)
    scale = 1.0 + np.abs(want).max(initial=0.0)
    assert err <= tol * scale, f"{what}: max error {err} > {tol} * {scale}"


def _outside_rows(sizes, offset, num_groups):
    ends = np.cumsum(sizes)
    lo = 0 if offset == 0 else ends[offset - 1]
    hi = ends[offset + num_groups - 1]
    rows = np.arange(R)
    return (rows < lo) | (rows >= hi)


@functools.cache
def _gmm_vjp_fn(backend, dtype, windowed):
    """Jitted (out, d_lhs, d_rhs) of gmm; windowed: rhs holds G_LOCAL groups, transposed."""

    def run(lhs, rhs, sizes, offset, ct):
        fn = lambda x, w: kp.gmm(
            x,
            w,
            sizes,
            group_offset=offset if windowed else None,
            transpose_rhs=windowed,
            block_sizes=BLOCKS,
            interpret=_interpret(backend),
            backend=backend,
        )
        out, vjp = jax.vjp(fn, lhs, rhs)
        return (out, *vjp(ct))

    return jax.jit(run)


@functools.partial(jax.jit, static_argnames="windowed")
def _gmm_vjp_reference(lhs, rhs, sizes, offset, ct, windowed):
    fn = lambda x, w: kp.gmm_reference(
        x, w, sizes, group_offset=offset if windowed else None, transpose_rhs=windowed
    )
    out, vjp = jax.vjp(fn, lhs, rhs)
    return (out, *vjp(ct))


def _check_gmm(backend, dtype, sizes, offset, windowed):
    g_local = G_LOCAL if windowed else G
    w_shape = (g_local, F, D) if windowed else (g_local, D, F)
    lhs, rhs, ct = _data(dtype, [(R, D), w_shape, (R, F)])
    args = (lhs, rhs, jnp.asarray(sizes), jnp.int32(offset), ct)
    got = _gmm_vjp_fn(backend, dtype, windowed)(*args)
    want = _gmm_vjp_reference(*args, windowed=windowed)
    for name, a, b in zip(("out", "d_lhs", "d_rhs"), got, want):
        assert a.shape == b.shape and a.dtype == b.dtype, (name, a.shape, b.shape, a.dtype)
        _assert_close(a, b, dtype, f"{backend} {name}", native=not _interpret(backend))
    # Rows outside the local groups (other groups, rows past the sum) are exactly zero, in the
    # output and in the lhs gradient.
    outside = _outside_rows(sizes, offset, g_local)
    assert (np.asarray(got[0], np.float32)[outside] == 0).all()
    assert (np.asarray(got[1], np.float32)[outside] == 0).all()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(cuts=cuts)
@example(cuts=[0] * G)  # all groups empty: output all zeros
@example(cuts=[0, 0, R, R, R, R])  # a single non-empty group
@example(cuts=[5, 5, 17, 18, 30, 33])  # sum < R: tail rows must read 0, one empty group
@example(cuts=[R] * G)  # everything in the first group
def test_gmm_and_grads_match_reference(backend, dtype, cuts):
    _check_gmm(backend, dtype, _sizes(cuts), 0, windowed=False)


@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(cuts=cuts, offset=st.integers(0, G - G_LOCAL))
@example(cuts=[3, 9, 9, 20, 31, 36], offset=2)
@example(cuts=[0, 0, 0, 0, 0, 0], offset=1)
def test_group_window_transposed(backend, cuts, offset):
    _check_gmm(backend, jnp.float32, _sizes(cuts), offset, windowed=True)


@functools.cache
def _tgmm_vjp_fn(backend):
    def run(lhs, grad, sizes, ct):
        fn = lambda x, y: kp.tgmm(
            x, y, sizes, block_sizes=BLOCKS, interpret=_interpret(backend), backend=backend
        )
        out, vjp = jax.vjp(fn, lhs, grad)
        return (out, *vjp(ct))

    return jax.jit(run)


@jax.jit
def _tgmm_vjp_reference(lhs, grad, sizes, ct):
    out, vjp = jax.vjp(lambda x, y: kp.tgmm_reference(x, y, sizes), lhs, grad)
    return (out, *vjp(ct))


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=5, deadline=None, derandomize=True)
@given(cuts=cuts)
@example(cuts=[0, 7, 7, 7, 25, 33])
def test_tgmm_and_grads_match_reference(backend, cuts):
    sizes = jnp.asarray(_sizes(cuts))
    lhs, grad, ct = _data(jnp.float32, [(R, D), (R, F), (G, D, F)], seed=1)
    got = _tgmm_vjp_fn(backend)(lhs, grad, sizes, ct)
    want = _tgmm_vjp_reference(lhs, grad, sizes, ct)
    for name, a, b in zip(("out", "d_lhs", "d_grad"), got, want):
        _assert_close(a, b, jnp.float32, f"{backend} tgmm {name}", native=not _interpret(backend))
    empty = np.asarray(sizes) == 0
    assert (np.asarray(got[0])[empty] == 0).all()


def test_default_call_rows_past_sum_are_zero():
    """The call the MoE layer makes: default blocks and backend, interpret on CPU."""
    lhs, rhs = _data(jnp.float32, [(R, D), (G, D, F)], seed=2)
    sizes = jnp.array([4, 0, 9, 3, 0, 6], jnp.int32)  # sum 22 < R
    interpret = jax.default_backend() not in ("tpu", "gpu")
    out = kp.gmm(lhs, rhs, sizes, interpret=interpret)
    want = kp.gmm_reference(lhs, rhs, sizes)
    _assert_close(out, want, jnp.float32, "default gmm", native=not interpret)
    assert (np.asarray(out)[22:] == 0).all()


@pytest.mark.parametrize("order", ["gmm", "tgmm"])
def test_schedule_covers_rows_within_bound(order):
    rng = np.random.default_rng(3)
    tm = 8
    schedule = jax.jit(
        functools.partial(make_schedule, num_groups=G_LOCAL, num_rows=R, tm=tm, order=order)
    )
    for _ in range(20):
        sizes = _sizes(rng.integers(0, R + 1, size=G))
        offset = int(rng.integers(0, G - G_LOCAL + 1))
        s = schedule(jnp.asarray(sizes), jnp.int32(offset))
        num = int(s.num[0])
        assert num <= num_visits_bound(R, tm, G_LOCAL) == len(s.group)
        group, tile, active = (np.asarray(a)[:num] for a in (s.group, s.tile, s.active))
        bounds = np.asarray(s.bounds)
        # Active visits cover every local row exactly once; revisits stay consecutive.
        covered = np.zeros(R, int)
        for g, t in zip(group[active == 1], tile[active == 1]):
            rows = np.arange(t * tm, (t + 1) * tm)
            covered[rows[(rows >= bounds[g]) & (rows < bounds[g + 1])]] += 1
        local = ~_outside_rows(sizes, offset, G_LOCAL)
        assert (covered[local] == 1).all() and (covered[~local] == 0).all()
        key = tile if order == "gmm" else group
        assert (np.diff(key) >= 0).all()
        if order == "gmm":
            assert set(tile) == set(range(-(-R // tm)))  # every output tile is written
        else:
            assert set(group) == set(range(G_LOCAL))  # every group block is written


def test_bad_inputs_raise_clear_errors():
    lhs, rhs = _data(jnp.float32, [(R, D), (G, D, F)])
    sizes = jnp.ones((G,), jnp.int32)
    if jax.default_backend() == "cpu":
        with pytest.raises(ValueError, match="interpret=True"):
            kp.gmm(lhs, rhs, sizes)
        with pytest.raises(ValueError, match="runs natively only on GPU"):
            kp.gmm(lhs, rhs, sizes, backend="triton")
    with pytest.raises(ValueError, match="backend must be"):
        kp.gmm(lhs, rhs, sizes, backend="cuda", interpret=True)
    with pytest.raises(ValueError, match="exceeds the 40 rows"):
        kp.gmm(lhs, rhs, jnp.full((G,), 10, jnp.int32), interpret=True)
    with pytest.raises(ValueError, match="group_sizes must be >= 0"):
        kp.gmm(lhs, rhs, sizes.at[0].set(-1), interpret=True)
    with pytest.raises(ValueError, match="must equal len"):
        kp.gmm(lhs, rhs[:3], sizes, interpret=True)
    with pytest.raises(ValueError, match="group_offset must be in"):
        kp.gmm(lhs, rhs[:3], sizes, group_offset=4, interpret=True)
    with pytest.raises(ValueError, match="contraction mismatch"):
        kp.gmm(lhs, rhs, sizes, transpose_rhs=True, interpret=True)
    with pytest.raises(ValueError, match="num_groups"):
        kp.tgmm(lhs, lhs, sizes, group_offset=1, interpret=True)
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        kp.gmm(lhs.astype(jnp.int32), rhs.astype(jnp.int32), sizes, interpret=True)


@pytest.mark.parametrize("backend, platform", [("tpu", "tpu"), ("triton", "cuda")])
def test_kernels_lower_natively(backend, platform):
    """Without the hardware or any device, still run the Mosaic / Triton lowering (jaxpr ->
    kernel IR) of the public gmm / tgmm with the default tiles on ragged shapes: catches ops or
    layouts the native compiler rejects early, on every supported jax (from 0.11 the Triton
    lowering needs a GPU to compile for: kernels_pallas.gpu_target supplies the reference one).
    (The final Mosaic / ptxas compile needs a target device: test_kernels_compile.py.)"""
    bs = kp.DEFAULTS[backend]
    r, d, f, g, dt = 1000, 1000, 1408, 8, jnp.bfloat16
    spec = jax.ShapeDtypeStruct
    gs, off = spec((g,), jnp.int32), spec((), jnp.int32)
    common = dict(block_sizes=bs, backend=backend, interpret=False)
    calls = [
        (lambda a, b, s, o: kp.gmm(a, b, s, group_offset=o, **common), (r, d), (g, d, f)),
        (
            lambda a, b, s, o: kp.gmm(a, b, s, group_offset=o, transpose_rhs=True, **common),
            (r, f),
            (g, d, f),
        ),
        (
            lambda a, b, s, o: kp.tgmm(a, b, s, group_offset=o, num_groups=g, **common),
            (r, d),
            (r, f),
        ),
    ]
    native = {"tpu": "tpu_custom_call", "cuda": "triton"}
    for fn, a_shape, b_shape in calls:
        lowered = jax.jit(fn).trace(spec(a_shape, dt), spec(b_shape, dt), gs, off)
        text = lowered.lower(lowering_platforms=(platform,)).as_text()
        assert native[platform] in text
        assert native["tpu" if platform == "cuda" else "cuda"] not in text


def test_reference_fallback_where_no_kernel_compiles():
    """fallback="reference" (moe_jax's "auto" branch): on a target without a native kernel and
    interpret off, gmm and its gradients (tgmm) lower the jnp reference instead of raising."""
    if jax.default_backend() != "cpu":
        pytest.skip("the CPU is the target without a kernel here")
    lhs, rhs, ct = _data(jnp.float32, [(R, D), (G, D, F), (R, F)], seed=4)
    sizes = jnp.array([4, 0, 9, 3, 0, 6], jnp.int32)

    def vjp(gmm):
        out, pull = jax.vjp(lambda a, b: gmm(a, b, sizes), lhs, rhs)
        return (out, *pull(ct))

    got = jax.jit(lambda: vjp(functools.partial(kp.gmm, fallback="reference")))()
    want = vjp(kp.gmm_reference)
    for name, a, b in zip(("out", "d_lhs", "d_rhs"), got, want):
        _assert_close(a, b, jnp.float32, f"fallback {name}", native=False)
    with pytest.raises(ValueError, match="fallback must be None or 'reference'"):
        kp.gmm(lhs, rhs, sizes, fallback="xla")
