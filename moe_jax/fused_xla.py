"""Fused expert path in plain XLA: gather, both expert matmuls and the weighted combine, per
row tile, so that every cost beyond the routing sort follows the number of real rows.

`fused_moe_ffn(x, token_idx, row_weights, group_sizes, w_in, w_gate, w_out, ...)` returns

    y[t] = sum over real sorted rows r with token_idx[r] == t of row_weights[r] * FFN_g(r)(x[t])

where rows are sorted by expert (group g owns rows [start_g, start_g + group_sizes[g])) and
rows past sum(group_sizes) are ignored: their token index, weight and contents may be garbage.

Why: the unfused path (dispatch.gather -> two grouped matmuls -> dispatch.combine) builds
[R, D], [R, 2F], [R, F] buffers with R = T*K static. Zero-filling, gathering, activating and
scattering them costs O(T*K) even when most slots went to null experts. Here nothing of
row count R (besides the [R] integer/weight vectors) is ever materialized.

Design (a row-tile while loop in the manner of gmm_xla, one loop per pass):
1. Each group's rows are cut into tiles of tm starting at the group's first row, and the
   (first row, group) visits are listed; the loop runs only the first num_visits of them,
   about num_real / tm + (non-empty groups) / 2. Aligning tiles to groups rather than to a
   global grid (gmm_xla._schedule) halves the masked rows computed at group boundaries,
   which dominates when groups are small (N=64: about 15% less time at rho=0.5).
2. Forward visit: token ids of the tile's rows -> gather tm rows of x [T, D] directly;
   one dot with the group's [w_in | w_gate] (indexed in place, never gathered per row);
   activation; one dot with w_out[g]; multiply by the row weights, with a select zeroing
   rows outside the group (garbage weights may be NaN); scatter-add into y [T, D] (f32).
3. custom_vjp backward: the same visits recompute the tile's hidden activations (nothing
   R-sized is saved) and produce, per visit,
     u = dy[tok] @ w_out[g]^T                       [tm, F]
     d_row_weights = sum(act * u) + dy[tok] . b_out  (written into the [R] vector)
     d_w_out[g] += act^T @ (w * dy[tok]),  d_hg = act'(hg) * (w * u)
     d_w_cat[g] += x[tok]^T @ d_hg,  d_x[tok] += d_hg @ w_cat[g]^T  (scatter-add)
   dy rows and weights are masked with selects first, so masked rows add exact zeros.
4. Dots take the compute dtype (x / weights) with f32 accumulation; y, d_x and the weight
   gradients accumulate in f32 and are cast back at the end.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from moe_jax.gmm_xla import default_tile_rows

_F32 = jnp.float32


def _dot(a, b, contract):
    """2-D dot_general with f32 accumulation; contract = (lhs axis, rhs axis)."""
    dims = (((contract[0],), (contract[1],)), ((), ()))
    return jax.lax.dot_general(a, b, dims, preferred_element_type=_F32)


def _activate(hg, b_in, *, f: int, activation: str):
    """[tm, 2F] (swiglu: h | gate) or [tm, F] (gelu) pre-activations -> [tm, F] (f32)."""
    h = hg[:, :f]
    if b_in is not None:
        h = h + b_in.astype(_F32)[None, :]
    if activation == "swiglu":
        return jax.nn.silu(hg[:, f:]) * h
    return jax.nn.gelu(h)


def _index(a, g):
    return None if a is None else jax.lax.dynamic_index_in_dim(a, g, axis=0, keepdims=False)


def _accumulate(acc, g, delta):
    """acc[g] += delta (in place in the loop carry); acc None stays None."""
    if acc is None:
        return None
    cur = jax.lax.dynamic_index_in_dim(acc, g, axis=0, keepdims=True)
    return jax.lax.dynamic_update_index_in_dim(acc, cur + delta[None], g, axis=0)


def _group_schedule(group_sizes, num_rows: int, tm: int):
    """Visits of tiles aligned to each group's first row: (nominal first row, group) pairs.

    Group g gets cdiv(size_g, tm) tiles starting at start_g, so only its last tile is
    partial (about tm / 2 wasted rows per group, against about tm for gmm_xla's global tile
    grid, where a group can be cut at both ends). Static bound cdiv(R, tm) + G; entries at or
    past num_visits are padding.
    """
    num_groups = group_sizes.shape[0]
    ends = jnp.cumsum(group_sizes)  # [G]
    starts = ends - group_sizes  # [G]
    tiles_per_group = -(-group_sizes // tm)  # [G]; 0 for empty groups
    visit_ends = jnp.cumsum(tiles_per_group)  # [G]
    visit = jnp.arange(-(-num_rows // tm) + num_groups, dtype=jnp.int32)  # [V]
    groups = jnp.minimum(jnp.searchsorted(visit_ends, visit, side="right"), num_groups - 1)
    groups = groups.astype(jnp.int32)  # [V]
    first_rows = starts[groups] + (visit - (visit_ends - tiles_per_group)[groups]) * tm  # [V]
    return first_rows, groups, ends, visit_ends[-1]


class _Visit:
    """Per-visit indexing shared by the forward and backward loops."""

    def __init__(self, token_idx, row_weights, group_sizes, num_tokens: int, tm: int):
        self.num_rows = token_idx.shape[0]
        self.token_idx, self.row_weights = token_idx, row_weights
        self.num_tokens, self.tm = num_tokens, tm
        self.first, self.groups, self.ends, self.num_visits = _group_schedule(
            group_sizes, self.num_rows, tm
        )

    def __call__(self, v):
        """Group, first row, row mask [tm], clamped token ids [tm], masked f32 weights [tm]."""
        g = self.groups[v]
        # The last tile is clamped to start at R - tm; rows before its nominal start belong
        # to the group's previous tile and are masked here, so no row is counted twice.
        row0 = jnp.minimum(self.first[v], self.num_rows - self.tm)
        rows = row0 + jnp.arange(self.tm, dtype=jnp.int32)  # [tm]
        mask = (rows >= self.first[v]) & (rows < self.ends[g])  # [tm]
        tok = jax.lax.dynamic_slice_in_dim(self.token_idx, row0, self.tm)  # [tm]
        tok = jnp.clip(tok, 0, self.num_tokens - 1)  # garbage rows may hold any index
        w = jax.lax.dynamic_slice_in_dim(self.row_weights, row0, self.tm).astype(_F32)  # [tm]
        return g, row0, mask, tok, jnp.where(mask, w, 0.0)


def _forward(x, token_idx, row_weights, group_sizes, w_cat, w_out, b_in, b_out, activation, tm):
    num_tokens, d = x.shape
    act = functools.partial(_activate, f=w_out.shape[1], activation=activation)
    visit = _Visit(token_idx, row_weights, group_sizes, num_tokens, tm)

    def body(v, y):
        g, _, mask, tok, w = visit(v)
        xt = jnp.take(x, tok, axis=0)  # [tm, D]
        a = act(_dot(xt, _index(w_cat, g), (1, 0)), _index(b_in, g))  # [tm, F]
        o = _dot(a.astype(w_out.dtype), _index(w_out, g), (1, 0))  # [tm, D]
        if b_out is not None:
            o = o + _index(b_out, g).astype(_F32)[None, :]
        o = jnp.where(mask[:, None], o * w[:, None], 0.0)  # [tm, D]
        return y.at[tok].add(o)

    y = jnp.zeros((num_tokens, d), _F32)  # [T, D]
    return jax.lax.fori_loop(0, visit.num_visits, body, y)


def _backward(
    x, token_idx, row_weights, group_sizes, w_cat, w_out, b_in, b_out, activation, tm, dy
):
    num_tokens = x.shape[0]
    act = functools.partial(_activate, f=w_out.shape[1], activation=activation)
    visit = _Visit(token_idx, row_weights, group_sizes, num_tokens, tm)
    zeros = lambda a: None if a is None else jnp.zeros(a.shape, _F32)

    def body(v, carry):
        dx, drw, dwc, dwo, dbi, dbo = carry
        g, row0, mask, tok, w = visit(v)
        wc, wo, bi, bo = (_index(a, g) for a in (w_cat, w_out, b_in, b_out))
        xt = jnp.take(x, tok, axis=0)  # [tm, D]
        dyt = jnp.where(mask[:, None], jnp.take(dy, tok, axis=0).astype(_F32), 0.0)  # [tm, D]
        a, act_vjp = jax.vjp(act, _dot(xt, wc, (1, 0)), bi)  # [tm, F]
        u = _dot(dyt.astype(wo.dtype), wo, (1, 1))  # [tm, F]
        drw_t = jnp.sum(a * u, axis=1)  # [tm]
        dyw = dyt * w[:, None]  # [tm, D]
        if bo is not None:
            drw_t = drw_t + dyt @ bo.astype(_F32)
            dbo = _accumulate(dbo, g, jnp.sum(dyw, axis=0))
        old = jax.lax.dynamic_slice_in_dim(drw, row0, tm)  # [tm]
        drw = jax.lax.dynamic_update_slice_in_dim(drw, jnp.where(mask, drw_t, old), row0, 0)
        dwo = _accumulate(dwo, g, _dot(a.astype(wo.dtype), dyw.astype(wo.dtype), (0, 0)))
        dhg, dbi_t = act_vjp(u * w[:, None])  # [tm, 2F or F]
        dhg = dhg.astype(wc.dtype)
        dwc = _accumulate(dwc, g, _dot(xt, dhg, (0, 0)))  # [D, 2F or F]
        dbi = _accumulate(dbi, g, dbi_t)
        dx = dx.at[tok].add(_dot(dhg, wc, (1, 1)))  # [tm, D]
        return dx, drw, dwc, dwo, dbi, dbo

    init = (
        jnp.zeros(x.shape, _F32),  # [T, D]
        jnp.zeros(row_weights.shape, _F32),  # [R]
        *(zeros(a) for a in (w_cat, w_out, b_in, b_out)),
    )
    return jax.lax.fori_loop(0, visit.num_visits, body, init)


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9))
def _fused(x, token_idx, row_weights, group_sizes, w_cat, w_out, b_in, b_out, activation, tm):
    y = _forward(x, token_idx, row_weights, group_sizes, w_cat, w_out, b_in, b_out, activation, tm)
    return y.astype(x.dtype)


def _fused_fwd(x, token_idx, row_weights, group_sizes, w_cat, w_out, b_in, b_out, activation, tm):
    res = (x, token_idx, row_weights, group_sizes, w_cat, w_out, b_in, b_out)
    return _fused(*res, activation, tm), res


def _fused_bwd(activation, tm, res, dy):
    x, token_idx, row_weights, group_sizes, w_cat, w_out, b_in, b_out = res
    grads = _backward(*res, activation, tm, dy)
    cast = lambda gr, p: None if p is None else gr.astype(p.dtype)
    dx, drw, dwc, dwo, dbi, dbo = (
        cast(gr, p) for gr, p in zip(grads, (x, row_weights, w_cat, w_out, b_in, b_out))
    )
    return dx, None, drw, None, dwc, dwo, dbi, dbo


_fused.defvjp(_fused_fwd, _fused_bwd)


def fused_tile_rows(num_rows: int, num_groups: int, d_model: int, d_ff: int) -> int:
    """Row tile for the fused loop: gmm_xla's rule applied to the first (widest) matmul."""
    return default_tile_rows(num_rows, num_groups, d_model, d_ff)


def fused_moe_ffn(
    x: jax.Array,
    token_idx: jax.Array,
    row_weights: jax.Array,
    group_sizes: jax.Array,
    w_in: jax.Array,
    w_gate: jax.Array | None,
    w_out: jax.Array,
    b_in: jax.Array | None = None,
    b_out: jax.Array | None = None,
    *,
    activation: str = "swiglu",
    tile_rows: int | None = None,
) -> jax.Array:
    """Routed expert FFN, gathered from and combined into token order in one tiled loop.

    x [T, D]; token_idx [R] int; row_weights [R]; group_sizes [N] int (sum <= R);
    w_in, w_gate [N, D, F] (w_gate only for swiglu); w_out [N, F, D]; b_in [N, F], b_out [N, D].
    Returns y [T, D] in x.dtype (accumulated in f32). swiglu: (silu(x W_gate) * (x W_in + b_in))
    W_out + b_out; gelu: gelu(x W_in + b_in) W_out + b_out. Differentiable in x, row_weights
    and every weight and bias; rows past sum(group_sizes) get zero gradient.
    tile_rows: rows per tile; None picks one from the shapes (fused_tile_rows).
    """
    if x.ndim != 2:
        raise ValueError(f"x must be [T, D]; got {x.shape}")
    n, d, f = w_in.shape
    if d != x.shape[1] or w_out.shape != (n, f, d):
        raise ValueError(f"w_in {w_in.shape} / w_out {w_out.shape} do not match x {x.shape}")
    if activation not in ("swiglu", "gelu"):
        raise ValueError(f"activation must be 'swiglu' or 'gelu'; got {activation!r}")
    if (activation == "swiglu") != (w_gate is not None):
        raise ValueError("w_gate must be given for activation='swiglu' and only then")
    if token_idx.ndim != 1 or row_weights.shape != token_idx.shape:
        raise ValueError(
            f"token_idx and row_weights must be [R]; got {token_idx.shape}, {row_weights.shape}"
        )
    if group_sizes.shape != (n,) or not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise ValueError(
            f"group_sizes must be int [{n}]; got {group_sizes.dtype}{group_sizes.shape}"
        )
    if tile_rows is not None and tile_rows < 1:
        raise ValueError(f"tile_rows must be >= 1; got {tile_rows}")
    num_rows = token_idx.shape[0]
    if num_rows == 0 or x.shape[0] == 0:
        return jnp.zeros(x.shape, x.dtype)
    if tile_rows is None:
        tile_rows = fused_tile_rows(num_rows, n, d, f)
    tm = min(tile_rows, num_rows)
    # One dot per visit for both input projections: [w_in | w_gate] -> [N, D, 2F].
    w_cat = w_in if w_gate is None else jnp.concatenate([w_in, w_gate], axis=-1)
    return _fused(
        x,
        token_idx.astype(jnp.int32),
        row_weights,
        group_sizes.astype(jnp.int32),
        w_cat,
        w_out,
        b_in,
        b_out,
        activation,
        tm,
    )
