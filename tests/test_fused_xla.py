"""The fused tiled expert path equals gather + dense expert FFN + combine, in values and
gradients, ignores rows past num_real, and builds nothing of row count R but [R] vectors."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_jax import experts
from moe_jax.core.config import MoEConfig
from moe_jax.experts.fused_xla import _Tiles, fused_moe_ffn, fused_tile_rows
from moe_jax.moe import MoE

T, D, F, N, R = 16, 12, 8, 3, 40  # fixed shapes (R > T: tokens repeat); sizes are traced
# (tile_rows, min_tile_rows): 7 does not divide R (clamped last tile); 64 > R (one tile);
# min < tile: each group's remainder goes to one smaller tile, sizes stepping down by min
# (16 -> 14, ..., 2; 13 -> 9, 5, 1: the step does not divide the tile; 64 -> R=40, 36, ..., 4).
TILES = ((1, 1), (7, 7), (16, 16), (64, 64), (16, 2), (13, 4), (64, 4))
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 3e-2}
ARGNUMS = (0, 1, 2, 3, 4, 5, 6)  # x, row_weights, w_in, w_gate, w_out, b_in, b_out


def _params(seed, activation, bias, dtype):
    rng = np.random.default_rng(seed)
    arr = lambda *s, scale=0.3: jnp.asarray(rng.normal(size=s) * scale, dtype)
    return dict(
        x=arr(T, D, scale=1.0),  # [T, D]
        w_in=arr(N, D, F),  # [N, D, F]
        w_gate=arr(N, D, F) if activation == "swiglu" else None,
        w_out=arr(N, F, D),  # [N, F, D]
        b_in=arr(N, F) if bias else None,
        b_out=arr(N, D) if bias else None,
    )


def _rows(sizes, seed):
    """Sorted rows: token ids [R] and weights [R]; rows past sum(sizes) are in range and finite
    here (the reference needs that), garbage in `_poison`."""
    rng = np.random.default_rng(seed + 1)
    tok = jnp.asarray(rng.integers(0, T, size=R), jnp.int32)  # [R]
    w = jnp.asarray(rng.uniform(0.1, 1.0, size=R), jnp.float32)  # [R]
    return tok, w, jnp.asarray(sizes, jnp.int32)


def _poison(tok, w, gs):
    """Rows past num_real: out-of-range/negative token ids and NaN weights."""
    garbage = jnp.arange(R) >= jnp.sum(gs)
    tok = jnp.where(garbage, jnp.where(jnp.arange(R) % 2 == 0, 10 * T, -3), tok)
    return tok, jnp.where(garbage, jnp.nan, w)


def _loss(fn, dy, *args):
    return jnp.sum(fn(*args).astype(jnp.float32) * dy)


@functools.partial(jax.jit, static_argnames=("activation", "tm"))
def _fused(x, w, wi, wg, wo, bi, bo, tok, gs, dy, activation, tm):
    def fn(x, w, wi, wg, wo, bi, bo):
        tile_rows, min_tile_rows = tm
        return fused_moe_ffn(
            x,
            tok,
            w,
            gs,
            wi,
            wg,
            wo,
            bi,
            bo,
            activation=activation,
            tile_rows=tile_rows,
            min_tile_rows=min_tile_rows,
        )

    args = (x, w, wi, wg, wo, bi, bo)
    return fn(*args), jax.grad(functools.partial(_loss, fn, dy), argnums=ARGNUMS)(*args)


@functools.partial(jax.jit, static_argnames=("activation",))
def _reference(x, w, wi, wg, wo, bi, bo, tok, gs, dy, activation):
    """experts.routed_ffn on the dense reference backend (gather, grouped FFN, combine), f32."""
    f32 = lambda a: None if a is None else a.astype(jnp.float32)

    def fn(x, w, wi, wg, wo, bi, bo):
        params = experts.ExpertParams(wi, wg, wo, bi, bo)
        return experts.routed_ffn(x, tok, w, gs, params, activation=activation, backend="dense")

    args = tuple(f32(a) for a in (x, w, wi, wg, wo, bi, bo))
    return fn(*args), jax.grad(functools.partial(_loss, fn, dy), argnums=ARGNUMS)(*args)


def _close(actual, expected, dtype):
    if expected is None:
        assert actual is None
        return
    actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
    assert np.all(np.isfinite(actual))
    scale = max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(actual, expected, rtol=TOL[dtype], atol=TOL[dtype] * scale)


def _check(sizes, tm, activation, bias, dtype=jnp.float32, seed=0):
    p = _params(seed, activation, bias, dtype)
    tok, w, gs = _rows(sizes, seed)
    dy = jnp.asarray(np.random.default_rng(seed + 2).normal(size=(T, D)), jnp.float32)
    weights = (p["w_in"], p["w_gate"], p["w_out"], p["b_in"], p["b_out"])
    ref, ref_grads = _reference(p["x"], w, *weights, tok, gs, dy, activation)
    bad_tok, bad_w = _poison(tok, w, gs)
    out, grads = _fused(p["x"], bad_w, *weights, bad_tok, gs, dy, activation, tm)
    assert out.dtype == dtype and grads[0].dtype == dtype and grads[2].dtype == dtype
    _close(out, ref, dtype)
    garbage = np.arange(R) >= sum(sizes)
    assert np.all(np.asarray(grads[1])[garbage] == 0.0)  # no gradient to ignored rows
    ref_grads = list(ref_grads)
    ref_grads[1] = jnp.where(garbage, 0.0, ref_grads[1])
    for a, b in zip(grads, ref_grads, strict=True):
        _close(a, b, dtype)


# N group sizes, empty groups allowed, sum <= R (rows past the sum are garbage).
SIZES = st.lists(st.integers(0, R // 2), min_size=N, max_size=N).filter(lambda s: sum(s) <= R)


@settings(max_examples=12, deadline=None)
@given(sizes=SIZES, tm=st.sampled_from(TILES))
def test_swiglu_matches_reference(sizes, tm):
    _check(sizes, tm, "swiglu", bias=False)


@settings(max_examples=8, deadline=None)
@given(sizes=SIZES, tm=st.sampled_from(TILES))
def test_gelu_bias_matches_reference(sizes, tm):
    _check(sizes, tm, "gelu", bias=True)


@pytest.mark.parametrize(
    "sizes", [(0, 0, 0), (R, 0, 0), (0, 0, 7), (13, 0, 27), (5, 11, 2)], ids=str
)
@pytest.mark.parametrize("tm", [(7, 7), (16, 16), (16, 4)], ids=str)
def test_edge_sizes(sizes, tm):
    # num_real = 0, one full group, empty groups at either end, R fully used.
    _check(sizes, tm, "swiglu", bias=True)


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_bfloat16(activation):
    _check((9, 0, 14), (16, 4), activation, bias=activation == "gelu", dtype=jnp.bfloat16)


def _float_shapes(text: str) -> set[tuple[int, ...]]:
    """Shapes of every floating-point tensor type in a lowered StableHLO program."""
    found = re.findall(r"tensor<((?:\d+x)+)(?:f16|bf16|f32|f64)>", text)
    return {tuple(int(v) for v in s.rstrip("x").split("x")) for s in found}


def test_lowered_program_has_no_row_sized_buffers():
    p = _params(0, "swiglu", True, jnp.float32)
    tok, w, gs = _rows((9, 0, 14), 0)
    dy = jnp.ones((T, D), jnp.float32)
    args = (p["x"], w, p["w_in"], p["w_gate"], p["w_out"], p["b_in"], p["b_out"], tok, gs, dy)
    text = _fused.lower(*args, activation="swiglu", tm=(8, 2)).as_text()
    shapes = _float_shapes(text)
    assert (T, D) in shapes  # the parser sees the [T, D] output
    bad = [s for s in shapes if len(s) >= 2 and (R in s[:2])]  # [R, .] and [N, R, .]
    assert not bad, f"row-sized float intermediates: {bad}"


def test_moe_layer_program_has_no_row_sized_buffers():
    # The MoE layer on "tiled" goes through the fused path: R = T*K rows never get a buffer.
    t, k = 24, 3
    cfg = MoEConfig(d_model=D, d_ff=F, num_experts=N + 1, router="topk", top_k=k, backend="tiled")
    graphdef, params = nnx.split(MoE(cfg, rngs=nnx.Rngs(0)), nnx.Param)

    def loss(params, x):
        y, aux = nnx.merge(graphdef, params)(x)
        return jnp.sum(y) + aux["aux_loss"]

    x = jnp.ones((t, D), jnp.float32)
    text = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).as_text()
    bad = [s for s in _float_shapes(text) if len(s) >= 2 and t * k in s[:2]]
    assert not bad, f"row-sized float intermediates: {bad}"


@given(
    rows=st.integers(1, 1 << 20),
    groups=st.integers(1, 512),
    d_model=st.sampled_from([16, 128, 512, 4096]),
    d_ff=st.sampled_from([8, 32, 128, 1024, 14336]),
    group_share=st.floats(0.0, 1.0),
)
@settings(max_examples=300, deadline=None)
def test_tile_rule_bounds_loops_and_masked_rows(rows, groups, d_model, d_ff, group_share):
    """The automatic tiles: a full tile of at most 512 rows made of whole steps, at most 4 tile
    sizes (8 where a row's matmuls are big), so at most that many loops per group and pass
    to compile, and a group's tiles cover its rows with fewer than one step of masked rows."""
    tm, step = fused_tile_rows(rows, groups, d_model, d_ff)
    sizes = 8 if d_model * d_ff >= 2**18 else 4
    assert 8 <= step <= tm <= 512 and tm % step == 0
    assert tm // step <= sizes
    assert step <= max(8, 512 // sizes)
    size = int(group_share * rows)  # one group's rows
    tiles = _Tiles(jnp.zeros(1, jnp.int32), jnp.zeros(1), jnp.array([size]), 1, tm, step)
    pieces = tiles.pieces(jnp.int32(0), jnp.int32(size))
    assert len(pieces) == tm // step  # one loop per tile size
    covered = sum(s * int(count) for s, _, count in pieces)
    assert size <= covered < size + step
