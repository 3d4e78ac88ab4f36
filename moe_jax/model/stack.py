"""The decoder's block stack: one Block, and the scanned form of many (ModelConfig.scan_layers).

Unrolled (scan_layers=False), the model holds ``blocks`` = [Block] * n_layers and the forward
is a Python loop: the compiled program, and its compile time, grow with depth. Scanned
(scan_layers=True, the default), the model holds one BlockStack:

    stack/scanned/blocks/{j}/...   group position j in [0, n), every leaf with a leading [G] axis
    stack/tail/{k}/...             the n_layers - G*n blocks after the last full group, unrolled

with n = the group size (moe_every when the model has MoE blocks and moe_every > 1, else 1) and
G = n_layers // n groups; decoder block i = g*n + j is group g's position j. A group is one
period of the MoE pattern (moe_every=2: a dense block, then an MoE block), so every group has the
same structure and one jax.lax.scan over the G groups runs them all: the program holds one
group, whatever the depth. The tail is always dense (block i is MoE iff (i+1) % n == 0).

Per-layer results stay per layer: the scan returns each MoE block's aux stacked over groups and
BlockStack unstacks them into the per-layer list of the unrolled model, in forward order; the
router state (selection biases, controller memory) is carried out of the scan per layer; the
calibration flag, the recording flag (record_routing) and remat apply per block as unrolled.

Both layouts are initialized block by block from the same keys in the same order, so a model
built with either holds the same weights; stack_params / unstack_params convert a pure dict
(nnx.to_pure_dict) of one layout into the other (used by checkpoint import/export).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax.model.layers import Attention
from moe_jax.moe import FFN, MoE


class Block(nnx.Module):
    """Pre-norm decoder block: causal attention, then a dense SwiGLU FFN or the MoE layer."""

    def __init__(self, cfg, use_moe: bool, *, rngs: nnx.Rngs):
        kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs)
        self.use_moe = use_moe
        self.attn_norm = nnx.RMSNorm(cfg.d_model, epsilon=cfg.norm_eps, **kw)
        self.attn = Attention(
            cfg.d_model,
            cfg.n_heads,
            cfg.n_kv_heads,
            rope_theta=cfg.rope,
            head_dim=cfg.head_dim,
            qkv_bias=cfg.qkv_bias,
            out_bias=cfg.attn_out_bias,
            sliding_window=cfg.sliding_window,
            **kw,
        )
        self.ffn_norm = nnx.RMSNorm(cfg.d_model, epsilon=cfg.norm_eps, **kw)
        if use_moe:
            self.ffn = MoE(cfg.layer_moe_config, rngs=rngs)
        else:
            self.ffn = FFN(cfg.d_model, cfg.d_ff, **kw)

    def __call__(self, x, modality, positions, deterministic, cache=None, cache_pos=None):
        with jax.named_scope("attention"):
            h, cache = self.attn(self.attn_norm(x), positions, cache=cache, cache_pos=cache_pos)
        x = x + h
        h = self.ffn_norm(x)
        if self.use_moe:
            h, aux = self.ffn(h, modality, deterministic=deterministic)
        else:
            h, aux = self.ffn(h), None
        return x + h.astype(x.dtype), aux, cache


def _block_fwd(block: Block, x, modality, positions, deterministic: bool):
    y, aux, _ = block(x, modality, positions, deterministic)
    return y, aux


_block_remat = nnx.remat(_block_fwd, static_argnums=(4,))


def run_block(blk: Block, x, modality, positions, deterministic, remat, cache, cache_pos):
    """One block: (x, aux or None, its new cache or None); remat only without a cache."""
    if cache is None and remat:
        x, aux = _block_remat(blk, x, modality, positions, deterministic)
        return x, aux, None
    return blk(x, modality, positions, deterministic, cache, cache_pos)


def group_size(cfg) -> int:
    """n: blocks per scanned group (one period of the MoE pattern)."""
    return cfg.moe_every if cfg.moe_layers and cfg.moe_every > 1 else 1


def num_groups(cfg) -> int:
    """G: scanned groups; the remaining n_layers - G*n blocks form the unrolled tail."""
    return cfg.n_layers // group_size(cfg)


class Group(nnx.Module):
    """n consecutive blocks (one scan step)."""

    def __init__(self, blocks: list[Block]):
        self.blocks = nnx.List(blocks)


def _stack_trees(trees):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def _stack_placed(*xs):
    """Stack concrete per-layer arrays; a NamedSharding stays, behind an unsplit layer axis."""
    if isinstance(xs[0], jax.ShapeDtypeStruct):  # an abstract tree
        return jax.ShapeDtypeStruct((len(xs), *xs[0].shape), xs[0].dtype)
    out = jnp.stack(xs)
    s = getattr(xs[0], "sharding", None)
    if isinstance(s, jax.sharding.NamedSharding):
        spec = jax.sharding.PartitionSpec(None, *s.spec)
        out = jax.device_put(out, jax.sharding.NamedSharding(s.mesh, spec))
    return out


class BlockStack(nnx.Module):
    """Decoder blocks as G stacked groups of n (one scan) plus an unrolled tail (module doc).

    Args:
        cfg: the ModelConfig.
        blocks: the n_layers Blocks in forward order (built one by one, then stacked)."""

    def __init__(self, cfg, blocks: list[Block]):
        n, g = group_size(cfg), num_groups(cfg)
        groups = [Group(blocks[i * n : (i + 1) * n]) for i in range(g)]
        graphdef, _ = nnx.split(groups[0])
        self.scanned = nnx.merge(graphdef, _stack_trees([nnx.state(m) for m in groups]))
        self.tail = nnx.List(blocks[g * n :])
        self.num_experts = cfg.moe.num_experts if cfg.moe_layers else 0

    def __call__(self, x, modality, positions, deterministic, remat, cache=None, cache_pos=None):
        """(x, [aux of each MoE block in forward order], new cache or None)."""
        graphdef, params, rest = nnx.split(self.scanned, nnx.Param, ...)
        scan_cache = None if cache is None else cache["scanned"]

        def body(carry, xs):  # modality rides in the carry: a traced id array in every layer
            h, mod = carry
            p, r, c = xs
            grp = nnx.merge(graphdef, p, r)
            auxes, caches, ids = [], [], []
            for j, blk in enumerate(grp.blocks):
                lc = None if c is None else c[j]
                h, aux, lc = run_block(blk, h, mod, positions, deterministic, remat, lc, cache_pos)
                auxes.append(aux)
                caches.append(lc)
                if blk.use_moe and hasattr(blk.ffn, "expert_ids"):  # record_routing on
                    ids.append(blk.ffn.expert_ids.get_value())
                    del blk.ffn.expert_ids
                else:
                    ids.append(None)
            new_rest = nnx.state(grp, nnx.Not(nnx.Param))
            return (h, mod), (new_rest, auxes, None if c is None else caches, ids)

        with jax.named_scope("scanned_blocks"):
            (x, _), (rest, auxes, new_scan_cache, ids) = jax.lax.scan(
                body, (x, modality), (params, rest, scan_cache)
            )
        # The router state changes only in training (controllers) or calibration, as unrolled;
        # writing it back otherwise would mutate from inside e.g. generate's decode loop.
        calibrating = any(getattr(m, "calibrating", False) for _, m in nnx.iter_graph(self.scanned))
        if not deterministic or calibrating:
            nnx.update(self.scanned, rest)
        moe_aux, records = [], []
        for g in range(jax.tree.leaves(params)[0].shape[0]):
            for j, aux in enumerate(auxes):
                if aux is not None:
                    moe_aux.append(jax.tree.map(lambda a, g=g: a[g], aux))  # noqa: B023
                if ids[j] is not None:
                    records.extend((a[g], self.num_experts) for a in ids[j])
        if records:  # one entry per recorded MoE call, layers in forward order (routing_ids)
            prev = self.expert_ids.get_value() if hasattr(self, "expert_ids") else ()
            self.expert_ids = nnx.Intermediate(prev + tuple(records))
        new_tail = []
        for k, blk in enumerate(self.tail):  # dense blocks: no aux, no routing
            lc = None if cache is None else cache["tail"][k]
            x, _, lc = run_block(blk, x, modality, positions, deterministic, remat, lc, cache_pos)
            new_tail.append(lc)
        if cache is None:
            return x, moe_aux, None
        return x, moe_aux, {"scanned": new_scan_cache, "tail": new_tail}


def init_stack_cache(cfg, shape: tuple[int, ...], dtype) -> dict:
    """The scanned layout's KV cache: {"scanned": [{"k", "v"} [G, *shape]] * n, "tail": [...]}."""
    n, g = group_size(cfg), num_groups(cfg)
    kv = lambda lead: {"k": jnp.zeros(lead + shape, dtype), "v": jnp.zeros(lead + shape, dtype)}  # noqa: E731
    return {
        "scanned": [kv((g,)) for _ in range(n)],
        "tail": [kv(()) for _ in range(cfg.n_layers - g * n)],
    }


def cache_length(cache) -> int:
    """S_max of a KV cache of either layout."""
    first = cache[0] if isinstance(cache, list) else cache["scanned"][0]
    return first["k"].shape[-3]


def stack_params(cfg, pure: dict) -> dict:
    """An unrolled pure dict ({"blocks": {i: ...}, ...}) in the scanned layout of ``cfg``;
    anything else is returned as it is. Works on any subset of the state (params only, ...)."""
    if "blocks" not in pure:
        return pure
    n, g = group_size(cfg), num_groups(cfg)
    out = {k: v for k, v in pure.items() if k != "blocks"}
    blocks = pure["blocks"]
    have = lambda i: i in blocks  # noqa: E731 - a filtered state may lack dense blocks
    stack = lambda j: jax.tree.map(_stack_placed, *[blocks[i * n + j] for i in range(g)])  # noqa: E731
    scanned = {j: stack(j) for j in range(n) if have(j)}
    tail = {k: blocks[g * n + k] for k in range(cfg.n_layers - g * n) if have(g * n + k)}
    out["stack"] = {"scanned": {"blocks": scanned}, "tail": tail}
    return out


def _layer(a, i: int):
    if isinstance(a, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(a.shape[1:], a.dtype)
    return a[i]


def unstack_params(cfg, pure: dict) -> dict:
    """Inverse of stack_params: a scanned pure dict in the unrolled layout ({"blocks": ...})."""
    if "stack" not in pure:
        return pure
    n, g = group_size(cfg), num_groups(cfg)
    out = {k: v for k, v in pure.items() if k != "stack"}
    scanned, tail = pure["stack"]["scanned"]["blocks"], pure["stack"].get("tail", {})
    blocks = {}
    for i in range(g):
        for j in sorted(scanned):
            blocks[i * n + int(j)] = jax.tree.map(lambda a, i=i: _layer(a, i), scanned[j])
    for k, v in tail.items():
        blocks[g * n + int(k)] = v
    out["blocks"] = blocks
    return out


def to_layout(cfg, pure: dict) -> dict:
    """``pure`` (either layout) in the layout cfg.scan_layers asks for."""
    return stack_params(cfg, pure) if cfg.scan_layers else unstack_params(cfg, pure)
