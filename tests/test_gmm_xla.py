"""The tiled XLA grouped matmul equals a plain jnp reference in values and gradients."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_jax.experts.gmm_xla import gmm
from moe_jax.experts.reference import dense_gmm as gmm_reference

R, G, DIN, DOUT = 48, 5, 16, 8  # fixed shapes: group sizes vary as traced values
TILES = (1, 10, 16, 64)  # 10 does not divide R (clamped last tile); 64 > R (one tile)
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def _loss(fn, x, w, dy):
    return jnp.sum(fn(x, w).astype(jnp.float32) * dy)


@functools.partial(jax.jit, static_argnames=("tm",))
def _tiled(x, w, gs, dy, tm):
    fn = lambda x, w: gmm(x, w, gs, tile_rows=tm)
    return fn(x, w), jax.grad(functools.partial(_loss, fn), argnums=(0, 1))(x, w, dy)


@jax.jit
def _ref(x, w, gs, dy):
    # The reference runs in f32 from the same (possibly rounded) inputs.
    x, w = x.astype(jnp.float32), w.astype(jnp.float32)
    fn = lambda x, w: gmm_reference(x, w, gs)
    return fn(x, w), jax.grad(functools.partial(_loss, fn), argnums=(0, 1))(x, w, dy)


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


def _check(sizes, tm, dtype, seed=0):
    gs = jnp.asarray(sizes, jnp.int32)
    x, w, dy = _inputs(seed, dtype)
    out, (dx, dw) = _tiled(x, w, gs, dy, tm)
    ref, (rdx, rdw) = _ref(x, w, gs, dy)
    assert out.dtype == dtype and dx.dtype == dtype and dw.dtype == dtype
    _close(out, ref, dtype)
    _close(dx, rdx, dtype)
    _close(dw, rdw, dtype)
    num_real = int(sum(sizes))
    # Rows past the real ones are exactly zero, in the output and in the lhs gradient.
    assert np.all(np.asarray(out[num_real:]) == 0)
    assert np.all(np.asarray(dx[num_real:]) == 0)
    # Empty groups get exactly zero weight gradient.
    for g, size in enumerate(sizes):
        if size == 0:
            assert np.all(np.asarray(dw[g]) == 0)


@st.composite
def _group_sizes(draw):
    """G sizes summing to at most R, with empty groups and num_real = 0 both likely."""
    num_real = draw(st.sampled_from([0, 1, R // 2, R - 3, R]) | st.integers(0, R))
    cuts = sorted(draw(st.lists(st.integers(0, num_real), min_size=G - 1, max_size=G - 1)))
    sizes = np.diff([0, *cuts, num_real])
    return [int(s) for s in sizes]


@settings(max_examples=25, deadline=None)
@given(sizes=_group_sizes(), tm=st.sampled_from(TILES), seed=st.integers(0, 3))
def test_matches_reference_f32(sizes, tm, seed):
    _check(sizes, tm, jnp.float32, seed)


@settings(max_examples=10, deadline=None)
@given(sizes=_group_sizes(), tm=st.sampled_from(TILES))
def test_matches_reference_bf16(sizes, tm):
    _check(sizes, tm, jnp.bfloat16)


@pytest.mark.parametrize("tm", TILES)
@pytest.mark.parametrize(
    "sizes", [[0] * G, [R, 0, 0, 0, 0], [0, 0, 0, 0, R], [0, 7, 0, 9, 0], [10] * 4 + [8]]
)
def test_edge_group_sizes(sizes, tm):
    _check(sizes, tm, jnp.float32)


@pytest.mark.parametrize("tm", (10, 16))
def test_garbage_rows_past_num_real_do_not_leak(tm):
    sizes = [5, 0, 11, 3, 0]
    num_real = sum(sizes)
    gs = jnp.asarray(sizes, jnp.int32)
    x, w, dy = _inputs(1, jnp.float32)
    x_bad = x.at[num_real:].set(jnp.nan)  # dispatch may leave anything past num_real
    dy_bad = dy.at[num_real:].set(jnp.inf)
    out, (dx, dw) = _tiled(x_bad, w, gs, dy_bad, tm)
    ref, (rdx, rdw) = _ref(x, w, gs, dy)
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(dx)) and np.all(np.isfinite(dw))
    _close(out, ref, jnp.float32)
    _close(dx, rdx, jnp.float32)
    _close(dw, rdw, jnp.float32)


def test_all_empty_is_zero_without_nan():
    x, w, dy = _inputs(2, jnp.float32)
    out, (dx, dw) = _tiled(x, w, jnp.zeros((G,), jnp.int32), dy, 16)
    for a in (out, dx, dw):
        assert np.all(np.asarray(a) == 0)


def test_no_dense_group_by_row_intermediate():
    # Distinct sizes so a [G, R, .] or [R, G, .] tensor is recognisable in the program.
    r, g, din, dout = 96, 7, 24, 40
    x = jnp.zeros((r, din))
    w = jnp.zeros((g, din, dout))
    gs = jnp.zeros((g,), jnp.int32)

    def program(fn):
        loss = lambda x, w: jnp.sum(fn(x, w, gs))
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(x, w).as_text()

    def has_dense(text):
        return re.search(rf"tensor<(({g}x{r})|({r}x{g}))x", text) is not None

    assert has_dense(program(gmm_reference))  # the check can see the reference's intermediate
    for tm in (16, 32):
        text = program(functools.partial(gmm, tile_rows=tm))
        assert not has_dense(text)
        assert "while" in text


def test_rejects_bad_inputs():
    x, w, _ = _inputs(0, jnp.float32)
    with pytest.raises(ValueError, match="group_sizes"):
        gmm(x, w, jnp.zeros((G + 1,), jnp.int32))
    with pytest.raises(ValueError, match="Din"):
        gmm(x[:, :3], w, jnp.zeros((G,), jnp.int32))
    with pytest.raises(ValueError, match="tile_rows"):
        gmm(x, w, jnp.zeros((G,), jnp.int32), tile_rows=0)
