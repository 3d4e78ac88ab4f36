"""Expert-parallel MoE forward: route, exchange real rows, local experts, exchange back, combine.

``ep_forward(xt, logits, modality, selection_bias, params, cfg, ep, train=...)`` is a pure
function of arrays; the MoE layer calls it instead of the single-device path and assembles
aux itself. Everything runs inside ONE ``jax.shard_map`` over the ("data", "fsdp", "expert")
mesh; tokens are split over all three axes, rows travel over "expert" only, and each expert
shard's weights enter whole (stored split over "fsdp" too, they are gathered at the boundary).
Per shard:
  1. route its own T_loc tokens (logits come in token-split; balance counts and statistics are
     psum'd over the mesh, so lb_scope="global" is the loss of the global batch);
  2. sort its (token, slot) pairs by expert id, nulls last (dispatch.make_plan). Experts are
     owned in contiguous blocks of N_loc = N / EP, so the rows for destination j are one
     contiguous run of the sorted buffer; null slots are never in it;
  3. copy at most Cb rows per destination into a [EP, Cb, D] send buffer (Cb from
     MeshConfig.buffer_factor; rows past Cb overflow: they are not sent, contribute 0 to their
     token and are counted). The per-expert counts of what was sent travel with it ([EP, N_loc]
     ints);
  4. exchange over the "expert" axis: ragged_all_to_all moves only the real rows (TPU/GPU); the
     padded all_to_all moves the whole fixed buffer (CPU, where the ragged collective is not
     implemented). Both deliver the same [EP sources, Cb, D] layout;
  5. compute the local-expert order of the received rows from the counts (an O(rows)
     permutation, no sort) and run the one expert entry point (experts.routed_ffn) over the
     N_loc local experts with it as the row -> received-row index and weight 1, so the
     results land in the received layout (the fused "tiled" loop gathers and scatters
     itself; nothing is copied into a second buffer). Every backend sees the shard's slice of
     the weights [N_loc, ...] and the group sizes of those local experts, so local groups start
     at 0 and no grouped matmul needs a group offset (tokamax has none: NotImplementedError);
  6. exchange back along the same routes and scatter-add (weight x output) into the tokens.
Capacity routers (threshold, capped top-k, expert choice) apply capacity per shard, with
T = T_loc, exactly as XMoE does with its local batch.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from moe_jax.core import dispatch, routing, stats
from moe_jax.core.config import MoEConfig
from moe_jax.experts import ExpertParams, resolve_backend, routed_ffn
from moe_jax.parallel.mesh import BATCH_AXES, ExpertParallel, buffer_rows, lb_axis_names, spec


def _exchange(buf: jax.Array, send_sizes: jax.Array, recv_sizes: jax.Array, kind: str):
    """Send block j of buf [EP, Cb, ...] to expert-shard j; return [EP, Cb, ...] with block i
    from shard i. Rows past the sizes are zero on both sides."""
    if kind == "padded":
        return jax.lax.all_to_all(buf, "expert", 0, 0, tiled=True)
    ep, cb = buf.shape[:2]
    flat = buf.reshape(ep * cb, *buf.shape[2:])  # [EP*Cb, ...]
    me = jax.lax.axis_index("expert")
    out = _ragged_all_to_all(
        flat,
        jnp.zeros_like(flat),
        (jnp.arange(ep) * cb).astype(jnp.int32),  # where block j starts in my buffer
        send_sizes.astype(jnp.int32),
        jnp.full((ep,), me * cb, jnp.int32),  # where my block lands in every receiver
        recv_sizes.astype(jnp.int32),
        axis_name="expert",
    )
    return out.reshape(buf.shape)


_ragged_all_to_all = jax.lax.ragged_all_to_all  # module-level so tests can substitute it


def _local_layout(recv_counts: jax.Array, cb: int):
    """Positions of received rows in local-expert order, and local group sizes.

    recv_counts [EP, N_loc]: rows from source i for local expert e; each source's block is
    sorted by expert. Row c of block i belongs to expert e = #{ends_i <= c}; its position is
    (rows of experts < e) + (rows of e from sources < i) + (c - start of e in block i).
    Padding rows get position EP*Cb (out of range: dropped by scatter, filled by gather)."""
    ep, n_loc = recv_counts.shape
    group_sizes = jnp.sum(recv_counts, axis=0)  # [N_loc]
    group_start = jnp.cumsum(group_sizes) - group_sizes  # [N_loc]
    src_off = jnp.cumsum(recv_counts, axis=0) - recv_counts  # [EP, N_loc]
    ends = jnp.cumsum(recv_counts, axis=1)  # [EP, N_loc]
    starts = ends - recv_counts
    c = jnp.arange(cb)
    e = jnp.sum(ends[:, None, :] <= c[None, :, None], axis=-1)  # [EP, Cb]
    e_c = jnp.minimum(e, n_loc - 1)
    pick = lambda a: jnp.take_along_axis(a, e_c, axis=1)  # [EP, N_loc] -> [EP, Cb]
    pos = group_start[e_c] + pick(src_off) + c[None, :] - pick(starts)  # [EP, Cb]
    return jnp.where(e < n_loc, pos, ep * cb), group_sizes


def _routed(xt, r: routing.Routing, params: ExpertParams, cfg: MoEConfig, cb, ep, kind, device):
    """Steps 2-6 for one shard. xt [T, D] local tokens. Returns y [T, D], rows sent, overflow."""
    t, d = xt.shape
    n = cfg.num_experts
    n_loc = n // ep
    cdt = jnp.dtype(cfg.dtype)
    if ep == 1:
        return _routed_local(xt.astype(cdt), r, params, cfg, device)
    with jax.named_scope("dispatch"):
        plan = dispatch.make_plan(r.expert_ids, r.weights, n)  # sorted rows, nulls last
        sizes = plan.group_sizes.reshape(ep, n_loc)  # [EP, N_loc] rows per destination expert
        dest_total = jnp.sum(sizes, axis=1)  # [EP]
        dest_start = jnp.cumsum(dest_total) - dest_total  # [EP]
        sent = jnp.minimum(dest_total, cb)  # [EP]
        c = jnp.arange(cb)
        valid = c[None, :] < sent[:, None]  # [EP, Cb]
        srow = jnp.where(valid, dest_start[:, None] + c[None, :], 0)  # [EP, Cb] sorted row
        tok = plan.token_idx[srow]  # [EP, Cb] source token
        xbuf = jnp.where(valid[..., None], xt.astype(cdt)[tok], jnp.zeros((), cdt))  # [EP, Cb, D]
        ends = jnp.cumsum(sizes, axis=1)  # [EP, N_loc]
        kept = jnp.clip(ends, 0, cb) - jnp.clip(ends - sizes, 0, cb)  # [EP, N_loc] sent counts
    with jax.named_scope("exchange"):
        recv_counts = jax.lax.all_to_all(kept, "expert", 0, 0, tiled=True)  # [EP, N_loc]
        recv_sizes = jnp.sum(recv_counts, axis=1)  # [EP]
        xrecv = _exchange(xbuf, sent, recv_sizes, kind)  # [EP, Cb, D]
    with jax.named_scope("experts"):
        pos, group_sizes = _local_layout(recv_counts, cb)  # [EP, Cb], [N_loc]
        rows = ep * cb
        # Sorted local row p is received row recv_row[p]; rows past sum(group_sizes) keep 0.
        recv_row = (
            jnp.zeros((rows,), jnp.int32)
            .at[pos.reshape(-1)]
            .set(jnp.arange(rows, dtype=jnp.int32), mode="drop")
        )  # [EP*Cb]
        yrecv = routed_ffn(
            xrecv.reshape(rows, d),
            recv_row,
            jnp.ones((rows,), cdt),
            group_sizes,
            params,
            activation=cfg.activation,
            backend=cfg.backend,
            device=device,
        ).reshape(ep, cb, d)  # [EP, Cb, D]; padding rows are 0
    with jax.named_scope("exchange_back"):
        yback = _exchange(yrecv, recv_sizes, sent, kind)  # [EP, Cb, D]
    with jax.named_scope("combine"):
        wt = plan.weights[srow].astype(jnp.float32)  # [EP, Cb]
        contrib = jnp.where(valid[..., None], yback.astype(jnp.float32) * wt[..., None], 0.0)
        y = jnp.zeros((t, d), jnp.float32).at[tok.reshape(-1)].add(contrib.reshape(-1, d))
    overflow = jnp.sum(dest_total - sent)
    return y.astype(cdt), jnp.sum(sent), overflow


def _routed_local(xt, r: routing.Routing, params: ExpertParams, cfg: MoEConfig, device):
    """Steps 2-6 without an "expert" axis (data / FSDP meshes): nothing is exchanged, so the
    shard runs the single-device path (routed_ffn gathers the sorted rows itself) and nothing
    overflows. The send-buffer copy xt[tok] it skips was a second gather whose transpose (a
    scatter-add into the token gradient, which XLA merges with the router's input gradient)
    aborted libtpu 0.0.42-0.0.50 on TPU v5e/v6e for some shard sizes (T_loc = 176, 352, 704 at
    D = 128: the default config on 4 chips, tests/test_aot.py)."""
    with jax.named_scope("dispatch"):
        plan = dispatch.make_plan(r.expert_ids, r.weights, cfg.num_experts)
    with jax.named_scope("experts"):
        y = routed_ffn(
            xt,
            plan.token_idx,
            plan.weights,
            plan.group_sizes,
            params,
            activation=cfg.activation,
            backend=cfg.backend,
            device=device,
        )  # [T, D]
    return y.astype(xt.dtype), plan.num_real, jnp.zeros((), jnp.int32)


def _shard_fn(xt, logits, modality, sel_bias, params, *, cfg, train, cb, ep, kind, device):
    lb_axes = lb_axis_names(cfg) if cfg.lb_scope == "global" else None
    with jax.named_scope("route"):
        r = routing.route(logits, cfg, train=train, axis_name=lb_axes, selection_bias=sel_bias)
    y, sent, overflow = _routed(xt, r, params, cfg, cb, ep, kind, device)
    st = stats.routing_stats(cfg, r, modality, BATCH_AXES)
    lb = jax.lax.pmean(r.lb_loss, BATCH_AXES)  # f is global already; this averages P over shards
    z = jax.lax.pmean(r.z_loss, BATCH_AXES)
    sent, overflow = jax.lax.psum((sent, overflow), BATCH_AXES)
    st["ep_overflow_fraction"] = overflow.astype(jnp.float32) / jnp.maximum(sent + overflow, 1)
    st["ep_rows_sent"] = sent.astype(jnp.float32)
    return y, lb, z, st, r.expert_ids


def ep_forward(
    xt: jax.Array,
    logits: jax.Array,
    modality: jax.Array | None,
    selection_bias: jax.Array | None,
    params: ExpertParams,
    cfg: MoEConfig,
    ep: ExpertParallel,
    *,
    train: bool,
):
    """Expert-parallel routed experts over ep.mesh: one shard_map around route -> dispatch ->
    row exchange -> local experts -> exchange back -> combine. The MoE layer calls it; the
    single-device counterpart is moe.local_forward, with the same arguments and results.

    Args:
        xt: tokens [T, D], batch-major (T = B·L; the mesh splits B).
        logits: router logits [T, N+1] (null router; column N is the null logit) or [T, N].
        modality: modality ids [T] or None.
        selection_bias: the selection-only router bias [N+1] / [N], or None.
        params: the full expert weights (w_in [N, D, F], ...), split over "expert" here.
        cfg: the layer.
        ep: the mesh and exchange settings.
        train: training knobs (False: threshold_eval / capacity_factor_eval).

    Returns:
        (y [T, D], lb_loss, z_loss, stats, expert_ids [T, S]): the statistics of
        stats.routing_stats over the global batch plus "ep_overflow_fraction",
        "ep_rows_sent" (global rows sent per direction) and "ep_buffer_rows" (global rows of
        send buffer per direction).

    Raises:
        ValueError: N not divisible by the expert axis, T's batch not divisible by
            data × fsdp × expert, or lb_axis_name naming an axis the mesh lacks.
    """
    ep.check(cfg, xt.shape[0])
    t_loc = xt.shape[0] // ep.num_shards
    cb = buffer_rows(cfg, ep.config, t_loc, ep.expert_size, train=train)
    tok, ew = spec("tokens"), spec("expert_weights")
    args = (xt, logits, modality, selection_bias, params)
    specs = (
        tok,
        tok,
        None if modality is None else tok,
        None if selection_bias is None else P(),
        jax.tree.map(lambda _: ew, params),
    )
    if any(a == jax.sharding.AxisType.Explicit for a in ep.mesh.axis_types):
        args = jax.tree.map(
            lambda a, s: jax.sharding.reshard(a, NamedSharding(ep.mesh, s)), args, specs
        )
    device = ep.mesh.devices.flat[0]  # "auto" picks the expert path for the mesh's target
    fn = functools.partial(
        _shard_fn,
        cfg=cfg,
        train=train,
        cb=cb,
        ep=ep.expert_size,
        kind=ep.exchange_kind(),
        device=device,
    )
    # Interpret-mode Pallas kernels and the tiled backend's while loop (its carry starts as an
    # unvarying zeros array) do not type-check under device-variance checking; without it the
    # values and gradients still equal one device (tests/test_parallel.py covers "tiled").
    # Nor does "tokamax" (a primitive chosen at lowering; its weight gradient varies with the
    # shard's group sizes; tests/test_tokamax.py covers it).
    check_vma = resolve_backend(cfg.backend, device) not in ("pallas", "tiled", "tokamax")
    y, lb, z, st, ids = jax.shard_map(
        fn, mesh=ep.mesh, in_specs=specs, out_specs=(tok, P(), P(), P(), tok), check_vma=check_vma
    )(*args)
    rows = 0 if ep.expert_size == 1 else ep.num_shards * ep.expert_size * cb  # no buffer at EP 1
    st["ep_buffer_rows"] = jnp.asarray(rows, jnp.float32)
    return y, lb, z, st, ids
