"""Correctness on the present device, natively: the Pallas kernels against their jnp
references and every expert backend's MoE layer against a dense reference (values and
gradients), at small shapes, in float32 and bfloat16. benchmarks/accelerator.py runs these
before it times anything, so no figure comes from a wrong kernel.

Each check returns {"ok", "finite", "max_err", "tol", ...}: ok needs every output finite and
each error under the tolerance. An error is max|got - want| / max|want| over one output (one
array of one case), the reference computed in float32 at HIGHEST precision from the same
(dtype-cast) inputs. Tolerances: bfloat16 rounds every output (2^-8 ~ 4e-3 relative), and an
NVIDIA GPU may run float32 matmuls in TF32 (2^-11); a broken kernel misses by O(1) or by NaN.

Kernel cases (per kernel family and dtype, one jitted program): groups with no rows and rows
past sum(group_sizes) (must come back exactly 0 from gmm, and empty groups exactly 0 from
tgmm), all rows null (every group empty), every row real. Layer cases (per backend and dtype):
a null router with experts 0 and 1 never chosen (empty groups; the null slots leave rows past
the real count), and a batch whose every slot is null.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import kernels_pallas as kp
from moe_jax import MoE, MoEConfig

TOL = {"float32": 2e-2, "bfloat16": 6e-2}  # max-abs-relative error; see the module docstring
HIGHEST = jax.lax.Precision.HIGHEST


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    if got.size == 0:
        return 0.0
    return float(np.max(np.abs(got - want)) / max(float(np.max(np.abs(want))), 1e-6))


def group_cases(rows: int, groups: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Group sizes [G] per case: empty groups + rows past the sum, all null, every row."""
    rng = np.random.default_rng(seed)
    real = rows - rows // 4 - 3  # a tail of null rows that is no multiple of a tile
    p = rng.dirichlet(np.full(groups, 2.0))
    p[[0, groups // 2]] = 0.0  # two groups without rows
    sparse = rng.multinomial(real, p / p.sum())
    full = rng.multinomial(rows, np.full(groups, 1.0 / groups))
    cases = {"empty groups, tail rows": sparse, "all null": np.zeros(groups), "every row": full}
    return {k: v.astype(np.int32) for k, v in cases.items()}


def kernel_ops(family: str, interpret: bool, block_sizes) -> dict:
    """gmm, transposed gmm and tgmm of one kernels_pallas family."""
    kw = dict(backend=family, interpret=interpret, block_sizes=block_sizes)
    return {
        "gmm": lambda x, w, g: kp.gmm(x, w, g, **kw),
        "gmm_t": lambda x, w, g: kp.gmm(x, w, g, transpose_rhs=True, **kw),
        "tgmm": lambda x, y, g: kp.tgmm(x, y, g, **kw),
    }


def ragged_ops(gmm) -> dict:
    """A ragged_dot-like grouped matmul (tokamax): gmm, and tgmm as its weight gradient."""

    def tgmm(x, y, g):
        w = jnp.zeros((g.shape[0], x.shape[1], y.shape[1]), x.dtype)  # [G, D, F]
        return jax.vjp(lambda v: gmm(x, v, g), w)[1](y)[0]

    return {"gmm": gmm, "tgmm": tgmm}


def check_kernels(ops: dict, dtype: str, shape: tuple[int, int, int, int], exact_zeros: bool):
    """Every op of `ops` on every group case against the references; one result per op+case.
    exact_zeros: rows past the sum (gmm) and empty groups (tgmm) must be exactly 0."""
    rows, d, f, groups = shape
    dt = jnp.dtype(dtype)
    keys = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(keys[0], (rows, d), jnp.float32).astype(dt)  # [R, D]
    w = (jax.random.normal(keys[1], (groups, d, f), jnp.float32) / np.sqrt(d)).astype(dt)
    y = jax.random.normal(keys[2], (rows, f), jnp.float32).astype(dt)  # [R, F]
    cases = group_cases(rows, groups)

    # The cases share one compiled body (lax.map): a third of the compiles. The operands are
    # arguments, not captured constants, which XLA would fold (seconds per reference product).
    def one_case(gs, x, w, y):
        out = {}
        if "gmm" in ops:
            out["gmm"] = (ops["gmm"](x, w, gs), kp.gmm_reference(x, w, gs))
        if "gmm_t" in ops:  # [R, F] x [G, D, F] contracted over F: gmm's input gradient
            out["gmm_t"] = (ops["gmm_t"](y, w, gs), kp.gmm_reference(y, w, gs, transpose_rhs=True))
        if "tgmm" in ops:
            out["tgmm"] = (ops["tgmm"](x, y, gs), kp.tgmm_reference(x, y, gs))
        return out

    stacked = jnp.asarray(np.stack(list(cases.values())))  # [cases, G]
    run = jax.jit(lambda s, x, w, y: jax.lax.map(lambda gs: one_case(gs, x, w, y), s))
    got = jax.device_get(run(stacked, x, w, y))
    results = {}
    for (i, case), op in ((c, op) for c in enumerate(cases) for op in got):
        out, want = got[op][0][i], got[op][1][i]
        sizes = cases[case]
        r = _compare(out, want, dtype)
        if exact_zeros and op in ("gmm", "gmm_t"):
            r["tail_zero"] = bool((np.asarray(out, np.float32)[sizes.sum() :] == 0).all())
        if exact_zeros and op == "tgmm":
            r["empty_zero"] = bool((np.asarray(out, np.float32)[sizes == 0] == 0).all())
        r["ok"] = r["ok"] and r.get("tail_zero", True) and r.get("empty_zero", True)
        results[f"{op}: {case}"] = r
    return results


def _compare(got, want, dtype: str) -> dict:
    finite = bool(np.isfinite(np.asarray(got, np.float32)).all())
    err = rel_err(got, want) if finite else float("nan")
    return dict(ok=finite and err <= TOL[dtype], finite=finite, max_err=err, tol=TOL[dtype])


def layer_params(backend: str, dtype: str, d: int, f: int, n: int):
    """(graphdef, params of the empty-groups case, params of the all-null case, rest)."""
    cfg = MoEConfig(
        d_model=d,
        d_ff=f,
        num_experts=n,
        top_k=4,
        rho=0.5,
        router="null",
        backend=backend,
        dtype=dtype,
        router_init_std=1.0,
    )
    layer = MoE(cfg, rngs=nnx.Rngs(0))  # the same weights for every backend and dtype
    kernel = layer.router.kernel[...]  # [D, N+1]; x[:, 0] == 1 makes row 0 a bias
    layer.router.kernel[...] = kernel.at[0, :2].set(-1e3)  # experts 0, 1: never chosen
    graphdef, sparse, rest = nnx.split(layer, nnx.Param, ...)
    layer = nnx.clone(layer)  # split's state holds the first layer's variables
    layer.router.kernel[...] = kernel.at[0, n].set(1e4)  # the null logit wins every slot
    _, all_null, _ = nnx.split(layer, nnx.Param, ...)
    return graphdef, sparse, all_null, rest


def layer_values_and_grads(backend: str, dtype: str, dims: tuple[int, int, int, int]):
    """{case: ((loss, y), (grads of params, grad of x))} of one backend, for the loss
    sum(y * dy) + aux_loss."""
    tokens, d, f, n = dims
    graphdef, sparse, all_null, rest = layer_params(backend, dtype, d, f, n)
    x = np.random.default_rng(1).normal(size=(tokens, d)).astype(np.float32)  # [T, D]
    x[:, 0] = 1.0
    dy = np.random.default_rng(2).normal(size=(tokens, d)).astype(np.float32)  # [T, D]

    def loss(params, x):
        y, aux = nnx.merge(graphdef, params, rest)(x)  # [T, D]
        return jnp.sum(y.astype(jnp.float32) * dy) + aux["aux_loss"], y

    grad = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
    # Both cases through one compiled body (lax.map over the stacked parameters).
    stacked = jax.tree.map(lambda a, b: jnp.stack([a, b]), sparse, all_null)
    run = jax.jit(lambda p, x: jax.lax.map(lambda q: grad(q, x), p))
    out = jax.device_get(run(stacked, jnp.asarray(x)))
    pick = lambda i: jax.tree.map(lambda a: a[i], out)  # noqa: E731
    return {"empty groups, tail rows": pick(0), "all null": pick(1)}


def layer_reference(dims) -> dict:
    """The dense backend in float32 at HIGHEST matmul precision."""
    with jax.default_matmul_precision("highest"):
        return layer_values_and_grads("dense", "float32", dims)


def check_layer(backend: str, dtype: str, dims, reference: dict) -> dict:
    """One backend's values and gradients against the reference, per case and output."""
    got = layer_values_and_grads(backend, dtype, dims)
    results = {}
    for case, ((_, y), (g_params, g_x)) in got.items():
        (_, want_y), (want_params, want_x) = reference[case]
        # The loss is a sum with cancellations: compare what it is made of instead.
        outs = {"y": (y, want_y), "grad x": (g_x, want_x)}
        flat_got = dict(jax.tree_util.tree_leaves_with_path(g_params))
        for path, want in jax.tree_util.tree_leaves_with_path(want_params):
            outs["grad " + jax.tree_util.keystr(path)] = (flat_got[path], want)
        per = {name: _compare(a, b, dtype) for name, (a, b) in outs.items()}
        worst = max(per, key=lambda k: per[k]["max_err"] if per[k]["finite"] else np.inf)
        results[case] = dict(
            ok=all(r["ok"] for r in per.values()),
            finite=all(r["finite"] for r in per.values()),
            max_err=per[worst]["max_err"],
            tol=TOL[dtype],
            worst=worst,  # the output with the largest error
        )
    return results
