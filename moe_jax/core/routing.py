"""Routers as pure functions: logits in, one `Routing` out.

Every router returns expert ids [T, S] (S slots per token; null, unselected and dropped slots
carry the sentinel id N, which sorts last) and combine weights [T, S] (0 on those slots), plus
the unweighted load-balance and z losses and drop counts. Dispatch and the expert backends only
ever see this structure, so routers and backends are chosen independently.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from moe_jax.core import losses


class Routing(NamedTuple):
    """What every router returns; S slots per token (K for token choice)."""

    expert_ids: jax.Array  # [T, S] int32, N = null / unselected / dropped
    weights: jax.Array  # [T, S] combine weights, 0 where expert_ids == N
    lb_loss: jax.Array  # scalar, unweighted load-balance loss
    z_loss: jax.Array  # scalar, unweighted router z-loss
    null_slots: jax.Array  # [T] int32, slots a token gave to null experts
    dropped: jax.Array  # [T] int32, real assignments a token lost to capacity


def _zeros_t(t: int) -> jax.Array:
    return jnp.zeros((t,), jnp.int32)


def update_selection_bias(
    bias: jax.Array,
    *,
    expert_load: jax.Array,
    null_ratio: jax.Array | None,
    target_null_ratio: float,
    expert_rate: float,
    null_rate: float,
    null_kp: float = 0.0,
    null_controller: str = "sign",
    prev_null_error: jax.Array | None = None,
    logit_scale: jax.Array | float = 1.0,
) -> jax.Array:
    """One step of the aux-loss-free bias updates (no gradient), applied after a training step.

    bias: [N] or [N+1] (last entry = null logit bias for the null router).
    - per-expert balancing: b_i += expert_rate * sign(mean load - load_i), so an under-loaded
      expert becomes easier to select;
    - null-ratio controller on e = null_ratio - target (too many null picks: e > 0, so the
      null logit becomes harder to select). It holds the realized null ratio at 1 - rho and
      decouples "how many experts" from "which experts":
        sign: b_null -= null_rate * sign(e)
        pi:   b_null -= logit_scale * (null_rate * e + null_kp * (e - e_prev)), the velocity
              form of a PI controller (integral gain null_rate, proportional gain null_kp) in
              units of logit_scale, the spread of the real router logits, so one setting of
              the gains works whatever the logits' scale.
    """
    n = expert_load.shape[0]
    out = bias
    if expert_rate > 0:
        step = expert_rate * jnp.sign(jnp.mean(expert_load) - expert_load)  # [N]
        out = out.at[:n].add(step.astype(out.dtype))
    if null_rate > 0 and null_ratio is not None and bias.shape[0] == n + 1:
        err = null_ratio - target_null_ratio
        if null_controller == "pi":
            prev = err if prev_null_error is None else prev_null_error
            delta = logit_scale * (null_rate * err + null_kp * (err - prev))
        else:
            delta = null_rate * jnp.sign(err)
        out = out.at[n].add(-delta.astype(out.dtype))
    return jax.lax.stop_gradient(out)


def logit_scale(real_logits: jax.Array) -> jax.Array:
    """The spread (standard deviation) of the real router logits [T, N] that sets the PI
    controller's units, over the tokens that are finite and not outliers (a token whose
    largest |logit| is over 10x the median token's is left out), so one NaN, Inf or huge token
    cannot set the controller's step. On ordinary batches no token is left out."""
    real = real_logits.astype(jnp.float32)
    mag = jnp.max(jnp.abs(real), axis=1)  # [T]; NaN / Inf for non-finite tokens
    finite = jnp.isfinite(mag)
    median = jnp.nanmedian(jnp.where(finite, mag, jnp.nan))
    keep = (finite & (mag <= 10.0 * median + 1e-6))[:, None]  # [T, 1]
    count = jnp.maximum(jnp.sum(keep) * real.shape[1], 1).astype(jnp.float32)
    mean = jnp.sum(jnp.where(keep, real, 0.0)) / count
    var = jnp.sum(jnp.where(keep, (real - mean) ** 2, 0.0)) / count
    return jax.lax.stop_gradient(jnp.sqrt(var))


def calibrate_null_bias(
    logits: jax.Array,
    *,
    top_k: int,
    num_nulls: int,
    target_null_ratio: float,
    selection_bias: jax.Array | None = None,
) -> jax.Array:
    """The null-logit selection bias b that makes this batch's null ratio 1 - rho, exactly.

    logits [T, N+1] (column N = null logit); selection_bias [N+1] is the current bias (its
    null entry is replaced). Tokens with a non-finite logit are left out. Returns the bias
    [N+1] with the null entry set to b (unchanged when no token is finite).

    With d_tj = real_tj - null_t, token t has r_t(b) = max(K - M, #{j among its top
    min(K, N) d's: d_tj > b}) real slots, so the batch's real-slot count is a step function
    of b that drops by one at each breakpoint d_t(i), i = K-M+1 .. min(K, N) (its i-th largest
    d). 1. Collect those T x (min(K, N) - max(K - M, 0)) breakpoints of the finite tokens and
    sort them. 2. The target allows c = floor(T K (1 - (1 - rho)) - T max(K - M, 0)) of them
    above b. 3. b is the midpoint between the c-th and (c+1)-th largest, the middle of the
    interval where the count is exactly c (one unit below / above all of them when c is out
    of range). No bisection over a range set by extreme logits: one huge token moves only its
    own breakpoints.
    """
    n = logits.shape[1] - 1
    sel = logits if selection_bias is None else logits + selection_bias
    sel = jax.lax.stop_gradient(sel).astype(jnp.float32)
    # Real logits with their per-expert selection bias; the null logit without its current
    # bias, since b replaces it (so a calibrated layer recalibrates to the same b).
    real = sel[:, :n]  # [T, N]
    null = jax.lax.stop_gradient(logits[:, n]).astype(jnp.float32)  # [T]
    finite = jnp.all(jnp.isfinite(real), axis=1) & jnp.isfinite(null)  # [T]
    n_ok = jnp.sum(finite)
    k_cap, floor = min(top_k, n), max(top_k - num_nulls, 0)
    base = jnp.zeros((n + 1,), logits.dtype) if selection_bias is None else selection_bias
    if k_cap <= floor:  # no breakpoint: every token has exactly min(K, N) real slots
        return jax.lax.stop_gradient(base)
    d = jnp.where(finite[:, None], real - null[:, None], -jnp.inf)  # [T, N]
    top = jax.lax.top_k(d, k_cap)[0][:, floor:]  # [T, k_cap - floor], each row descending
    points = jnp.sort(top.reshape(-1))[::-1]  # [P] descending, left-out tokens (-inf) last
    n_points = n_ok * (k_cap - floor)
    allowed = n_ok * top_k * (1.0 - target_null_ratio) - n_ok * floor
    c = jnp.clip(jnp.floor(allowed + 1e-4).astype(jnp.int32), 0, n_points)
    above = points[jnp.maximum(c - 1, 0)]  # the c-th largest: stays above b
    below = points[jnp.minimum(c, jnp.maximum(n_points - 1, 0))]  # the (c+1)-th: drops
    b = jnp.where(c == 0, above + 1.0, jnp.where(c == n_points, below - 1.0, 0.5 * (above + below)))
    b = jnp.where(n_ok > 0, b, base[n].astype(jnp.float32))
    return jax.lax.stop_gradient(base.at[n].set(b.astype(base.dtype)))


def _real_slots(sel_real: jax.Array, null_sel: jax.Array, top_k: int, num_nulls: int):
    """r_t = min(K, N, #{real selection logits > null selection logit}), at least K - M (only
    M null copies exist). sel_real [T, N], null_sel [T] -> [T] int."""
    n = sel_real.shape[1]
    n_above = jnp.sum(sel_real > null_sel[:, None], axis=1)  # [T]
    r = jnp.minimum(min(top_k, n), n_above)
    return jnp.maximum(r, top_k - num_nulls)


# ---------------------------------------------------------------------------------------------
# Null experts (arXiv 2601.15370), compact N+1 form.
# ---------------------------------------------------------------------------------------------
def null_router(
    logits: jax.Array,
    *,
    top_k: int,
    num_nulls: int,
    renormalize: bool = True,
    axis_name=None,
    selection_bias: jax.Array | None = None,
) -> Routing:
    """Token choice over N real experts plus M null copies of one learned null logit.

    logits: [T, N+1]; column N is the null logit. Steps:
      1. softmax over N+M slots == softmax over N+1 logits with log(M) added to the null logit,
         so the M copies are never materialized.
      2. top-K over N+M: a token gets r = min(K, #{real logits > null logit}) real experts (the
         top-r real logits); if M < K at least K-M slots must be real: r >= K-M.
      3. drop null slots; gates renormalized over the selected real experts. A token with r=0
         gets all-zero weights (routed output exactly 0; no 0/0).
    The gates depend on real logits only, so the task loss gives the null logit zero gradient;
    it learns through the balance and z losses.

    selection_bias [N+1] (optional, no gradient) shifts the logits for *selection only*: the
    aux-loss-free per-expert bias and the null-ratio controller's bias on the null logit. Gates,
    probabilities and losses use the unbiased logits.
    """
    t, n_plus_1 = logits.shape
    n = n_plus_1 - 1
    sel = logits if selection_bias is None else logits + jax.lax.stop_gradient(selection_bias)
    real = logits[:, :n]  # [T, N]
    null = sel[:, n]  # [T], selection value of each null copy
    log_m = math.log(num_nulls) if num_nulls > 0 else -jnp.inf
    # Probabilities and losses use the unbiased null logit: with the bias in P_null, L_bal's
    # push on the raw null logit never weakens while the controller holds f_null, and the
    # logit and the bias ramp against each other (docs/results/study_lm.md).
    null_ex = logits[:, n] + log_m  # [T], total logit of the M copies
    lse = jax.nn.logsumexp(jnp.concatenate([real, null_ex[:, None]], axis=1), axis=1)  # [T]
    p_real = jnp.exp(real - lse[:, None])  # [T, N]
    p_null = jnp.exp(null_ex - lse)  # [T], mass of all M copies together

    sel_real = sel[:, :n]  # [T, N]
    r = _real_slots(sel_real, null, top_k, num_nulls)  # [T]
    k_real = min(top_k, n)  # K may exceed N: at most N slots can be real
    _, top_idx = jax.lax.top_k(sel_real, k_real)  # [T, min(K, N)]
    if k_real < top_k:  # the remaining slots can only be null
        top_idx = jnp.pad(top_idx, ((0, 0), (0, top_k - k_real)))
    top_vals = jnp.take_along_axis(real, top_idx, axis=1)  # [T, K] unbiased logits
    keep = jnp.arange(top_k)[None, :] < r[:, None]  # [T, K]
    expert_ids = jnp.where(keep, top_idx, n).astype(jnp.int32)

    if renormalize:
        shift = jax.lax.stop_gradient(jnp.max(top_vals, axis=1, keepdims=True))
        e = jnp.where(keep, jnp.exp(top_vals - shift), 0.0)  # [T, K]
        den = jnp.sum(e, axis=1, keepdims=True)
        weights = e / jnp.where(den > 0, den, 1.0)
    else:
        weights = jnp.where(keep, jnp.take_along_axis(p_real, top_idx, axis=1), 0.0)

    null_slots = (top_k - r).astype(jnp.int32)
    lb = losses.null_balance_loss(
        expert_ids, p_real, p_null, num_nulls=num_nulls, null_slots=null_slots, axis_name=axis_name
    )
    z = losses.z_loss_from_lse(lse)
    return Routing(expert_ids, weights, lb, z, null_slots, _zeros_t(t))


def explicit_null_probs(logits: jax.Array, num_nulls: int) -> jax.Array:
    """Reference: the explicit [T, N+M] softmax with the null logit replicated M times."""
    n = logits.shape[1] - 1
    full = jnp.concatenate([logits[:, :n], jnp.repeat(logits[:, n:], num_nulls, axis=1)], axis=1)
    return jax.nn.softmax(full, axis=1)


# ---------------------------------------------------------------------------------------------
# Capacity with priority dropping (XMoE; also Switch/GShard-style capped top-k).
# ---------------------------------------------------------------------------------------------
def apply_capacity(expert_ids: jax.Array, priority: jax.Array, num_experts: int, capacity: int):
    """Keep, per expert, the `capacity` selected (token, slot) pairs of highest priority.

    expert_ids: [T, S] with N for unselected slots, an expert at most once per token (every
    router here picks distinct experts); priority: [T, S], finite.
    Returns (kept_ids [T, S], dropped [T] int32). Ties keep the earlier token.

    Per expert, a top-`capacity` over the tokens' priorities for it ([N, T], -inf where a
    token did not pick it; lax.top_k puts the lower index first among equals): measured on
    CPU 8x faster than the lexicographic sort of all T*S pairs by (expert, priority) at
    T=1408, S=N=32 (XMoE), and 2x at S=2, N=8. capacity_reference is that sort.
    """
    t, s = expert_ids.shape
    selected = expert_ids < num_experts
    if capacity >= t:  # an expert can hold every token: nothing to drop
        return expert_ids, _zeros_t(t)
    tok = jnp.arange(t)[:, None]  # [T, 1]
    prio = jnp.full((t, num_experts + 1), -jnp.inf, jnp.float32)
    prio = prio.at[tok, expert_ids].set(priority.astype(jnp.float32))[:, :num_experts]  # [T, N]
    top_p, top_tok = jax.lax.top_k(prio.T, capacity)  # [N, C]
    kept = jnp.zeros((num_experts + 1, t), bool)
    kept = kept.at[jnp.arange(num_experts)[:, None], top_tok].set(top_p > -jnp.inf)  # [N+1, T]
    keep = kept[expert_ids, tok] & selected  # [T, S]
    dropped = jnp.sum(selected & ~keep, axis=1).astype(jnp.int32)
    return jnp.where(keep, expert_ids, num_experts), dropped


def capacity_reference(expert_ids, priority, num_experts: int, capacity: int):
    """apply_capacity as a lexicographic sort of every (token, slot) pair by (expert asc,
    priority desc, index asc), then the first `capacity` of each expert (tests)."""
    t, s = expert_ids.shape
    flat_e = expert_ids.reshape(-1)  # [T*S]
    flat_p = priority.reshape(-1)
    iota = jnp.arange(t * s, dtype=jnp.int32)
    sorted_e, _, order = jax.lax.sort((flat_e, -flat_p, iota), num_keys=3)
    counts = jnp.zeros((num_experts + 1,), jnp.int32).at[flat_e].add(1)
    starts = jnp.cumsum(counts) - counts  # [N+1]
    pos = jnp.arange(t * s) - starts[sorted_e]  # rank inside its expert
    keep_sorted = (sorted_e < num_experts) & (pos < capacity)
    keep = jnp.zeros((t * s,), bool).at[order].set(keep_sorted).reshape(t, s)
    selected = expert_ids < num_experts
    dropped = jnp.sum(selected & ~keep, axis=1).astype(jnp.int32)
    return jnp.where(keep, expert_ids, num_experts), dropped


# ---------------------------------------------------------------------------------------------
# Top-k / Switch.
# ---------------------------------------------------------------------------------------------
def topk_router(
    logits: jax.Array,
    *,
    top_k: int,
    renormalize: bool = True,
    capacity: int | None = None,
    axis_name=None,
    selection_bias: jax.Array | None = None,
) -> Routing:
    """Token choice top-k (Switch when K=1). Optional capacity drops lowest-priority pairs
    (all first choices before any second choice, higher probability first). selection_bias [N]
    (aux-loss-free balancing) shifts selection only; gates use the unbiased probabilities."""
    t, n = logits.shape
    probs = jax.nn.softmax(logits, axis=1)  # [T, N]
    if selection_bias is None:
        top_p, top_idx = jax.lax.top_k(probs, top_k)  # [T, K]
    else:
        _, top_idx = jax.lax.top_k(logits + jax.lax.stop_gradient(selection_bias), top_k)
        top_p = jnp.take_along_axis(probs, top_idx, axis=1)  # [T, K]
    expert_ids = top_idx.astype(jnp.int32)
    dropped = _zeros_t(t)
    if capacity is not None:
        priority = (top_k - jnp.arange(top_k))[None, :] + top_p
        expert_ids, dropped = apply_capacity(expert_ids, priority, n, capacity)
    real = expert_ids < n
    if renormalize:
        w = top_p / jnp.sum(top_p, axis=1, keepdims=True)
    else:
        w = top_p
    weights = jnp.where(real, w, 0.0)
    lb = losses.switch_balance_loss(top_idx, probs, axis_name=axis_name)
    z = losses.z_loss(logits)
    return Routing(expert_ids, weights, lb, z, _zeros_t(t), dropped)


# ---------------------------------------------------------------------------------------------
# XMoE threshold router.
# ---------------------------------------------------------------------------------------------
def threshold_router(
    logits: jax.Array, *, threshold: float, capacity: int, axis_name=None
) -> Routing:
    """XMoE: keep experts in descending probability until the cumulative mass passes t.

    1. p = softmax(logits) in fp32; sort descending.
    2. keep rank j iff the mass ranked above it is < t (so the top expert is always kept, and
       so is the one that crosses t). t >= 1 keeps every expert: in fp32 the mass above a
       tiny last probability can round to 1.0, which the strict test would wrongly drop.
    3. capacity C per expert; priority (R - rank + 1) + p with R the most experts any token
       picked, so every first choice beats every second choice; each expert keeps its top-C.
    4. combine with the raw probabilities (no renormalization); Switch loss on top-1 choices.
    Returns S = N slots per token.
    """
    t, n = logits.shape
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=1)  # [T, N]
    sp, si = jax.lax.top_k(probs, n)  # [T, N] sorted descending
    mass_above = jnp.cumsum(sp, axis=1) - sp
    selected = (mass_above < threshold) | (threshold >= 1.0)  # [T, N]
    n_sel = jnp.sum(selected, axis=1)
    most = jnp.max(n_sel)  # R
    rank = jnp.arange(1, n + 1)[None, :]
    priority = (most - rank + 1).astype(jnp.float32) + sp
    ids = jnp.where(selected, si, n).astype(jnp.int32)
    ids, dropped = apply_capacity(ids, priority, n, capacity)
    weights = jnp.where(ids < n, sp, 0.0)
    lb = losses.switch_balance_loss(si[:, :1], probs, axis_name=axis_name)
    z = losses.z_loss(logits)
    return Routing(ids, weights, lb, z, _zeros_t(t), dropped)


# ---------------------------------------------------------------------------------------------
# Expert choice (non-causal).
# ---------------------------------------------------------------------------------------------
def expert_choice_router(logits: jax.Array, *, capacity: int) -> Routing:
    """Each expert takes its top-`capacity` tokens by probability. Balanced by construction,
    but a token's routing depends on every other token in the batch, future ones included."""
    t, n = logits.shape
    probs = jax.nn.softmax(logits, axis=1)  # [T, N]
    _, tok = jax.lax.top_k(probs.T, capacity)  # [N, C]
    chosen = jnp.zeros((n, t), bool).at[jnp.arange(n)[:, None], tok].set(True)  # [N, T]
    ids = jnp.where(chosen.T, jnp.arange(n)[None, :], n).astype(jnp.int32)  # [T, N]
    weights = jnp.where(chosen.T, probs, 0.0)
    z = losses.z_loss(logits)
    return Routing(ids, weights, jnp.zeros((), jnp.float32), z, _zeros_t(t), _zeros_t(t))


def route(
    logits: jax.Array, cfg, *, train: bool = True, axis_name=None, selection_bias=None
) -> Routing:
    """Dispatch to the router named by cfg.router (cfg: MoEConfig). logits: [T, N(+1)];
    selection_bias [N(+1)] or None (null and top-k routers)."""
    t = logits.shape[0]
    logits = logits.astype(jnp.dtype(cfg.router_dtype))
    if cfg.router == "null":
        return null_router(
            logits,
            top_k=cfg.top_k,
            num_nulls=cfg.num_nulls,
            renormalize=cfg.renormalize,
            axis_name=axis_name,
            selection_bias=selection_bias,
        )
    if cfg.router in ("topk", "switch"):
        return topk_router(
            logits,
            top_k=cfg.top_k,
            renormalize=cfg.renormalize and cfg.router == "topk",
            capacity=cfg.expert_capacity(t, train=train),
            axis_name=axis_name,
            selection_bias=selection_bias,
        )
    if cfg.router == "threshold":
        return threshold_router(
            logits,
            threshold=cfg.threshold_for(train=train),
            capacity=cfg.expert_capacity(t, train=train),
            axis_name=axis_name,
        )
    return expert_choice_router(logits, capacity=cfg.expert_capacity(t, train=train))
