"""Train state and the jitted train / eval steps (the loop behind train.py is train.loop).

State is a pytree {"params": nnx.State, "rest": nnx.State, "opt": optax state, "step": int32,
"rng": PRNG key}; the model is split once into (graphdef, params, rest) and ``train_step`` is
a pure module-level function under jax.jit with the state donated. The loop dispatches step t
before it reads step t-1's metrics, so the host never waits on the device except at
checkpoints, evals and log writes of the step just dispatched.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from moe_jax import data as data_lib
from moe_jax import model as model_lib
from moe_jax import parallel
from moe_jax.hf import upcycle as hf_upcycle
from moe_jax.moe import calibrate_null, null_calibrated_layers, set_parallel
from moe_jax.train import metrics as metrics_lib
from moe_jax.train.config import OptConfig, TrainConfig

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """The loss or the gradient became NaN or Inf; the message names the step and the last
    good checkpoint."""


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """Static settings of the train step (hashable: part of the jit cache key)."""

    grad_accum: int = 1


@functools.lru_cache(maxsize=16)
def make_optimizer(opt: OptConfig, num_steps: int):
    """(tx, schedule): AdamW with decoupled weight decay on matrices, global-norm clipping.

    Cached so that runs with equal settings share one transform and hence one compiled step.
    """
    warm = min(opt.warmup_steps, num_steps)
    peak, floor = opt.lr, opt.lr * opt.min_lr_ratio
    if opt.schedule == "cosine":
        schedule = optax.warmup_cosine_decay_schedule(
            0.0, peak, warm, max(num_steps, warm + 1), floor
        )
    else:
        decay = int(round(opt.decay_fraction * num_steps)) if opt.schedule == "wsd" else 0
        stable = max(num_steps - warm - decay, 0)
        parts = [optax.linear_schedule(0.0, peak, max(warm, 1)), optax.constant_schedule(peak)]
        bounds = [warm]
        if decay:
            parts.append(optax.linear_schedule(peak, floor, decay))
            bounds.append(warm + stable)
        schedule = optax.join_schedules(parts, bounds)
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
    adamw = optax.adamw(
        schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay, mask=decay_mask
    )
    tx = optax.chain(optax.clip_by_global_norm(opt.clip_norm), adamw) if opt.clip_norm else adamw
    return tx, schedule


def model_graphdef(cfg: TrainConfig, ep=None):
    """The graphdef of cfg's model (expert parallel over ep when given); nothing is built."""
    abstract = nnx.eval_shape(lambda: model_lib.Transformer(cfg.model, rngs=nnx.Rngs(cfg.seed)))
    if ep is not None:
        set_parallel(abstract, ep)
    return nnx.split(abstract, nnx.Param, ...)[0]


def _fresh_state(cfg: TrainConfig):
    """The train-state pytree of a fresh run (trace it under jit: it builds the whole model)."""
    model = model_lib.Transformer(cfg.model, rngs=nnx.Rngs(cfg.seed))
    return _new_state(cfg, *nnx.split(model, nnx.Param, ...)[1:])


def _new_state(cfg: TrainConfig, params, rest) -> dict:
    """The train state at step 0 around given parameters: fresh AdamW moments, the seed's rng."""
    tx, _ = make_optimizer(cfg.opt, cfg.num_steps)
    return {
        "params": params,
        "rest": rest,
        "opt": tx.init(params),
        "step": jnp.zeros((), jnp.int32),
        "rng": jax.random.key(cfg.seed),
    }


def calibrate_null_state(graphdef, state: dict, batch: dict) -> dict:
    """The state with every null-router layer's null selection bias calibrated on ``batch``
    (moe.calibrate_null: K*rho real experts per token from the first step); unchanged when no
    layer calibrates. The loop calls it on the first training batch of a fresh run."""
    if not null_calibrated_layers(nnx.merge(graphdef, state["params"], state["rest"])):
        return state
    leaves, treedef = jax.tree.flatten(state["rest"])
    calibrate = _calibrator(graphdef, treedef, tuple(a.sharding for a in leaves))
    return {**state, "rest": calibrate(state["params"], state["rest"], batch)}


@functools.lru_cache(maxsize=16)
def _calibrator(graphdef, treedef, shardings: tuple):
    """The jitted calibration pass for one model and placement (compiled once per shapes)."""
    out = jax.tree.unflatten(treedef, shardings)
    return jax.jit(functools.partial(_calibrated_rest, graphdef), out_shardings=out)


def _calibrated_rest(graphdef, params, rest, batch):
    model = nnx.merge(graphdef, params, rest, copy=True)  # fresh Variables in this trace
    calibrate_null(model, batch["tokens"], batch.get("image"), deterministic=False)
    return nnx.state(model, nnx.Not(nnx.Param))


def _init_from_checkpoint(cfg: TrainConfig, ep=None):
    """(graphdef, state) with the parameters of a Hugging Face checkpoint, upcycled
    (moe_jax.train.hf_init), placed on ep's mesh by the partition rules when given."""
    graphdef = model_graphdef(cfg, ep)
    params, rest = hf_upcycle.init_params(
        cfg.init.hf,
        cfg.model,
        granularity=cfg.init.granularity,
        reinit_fraction=cfg.init.reinit_fraction,
        output_scale=cfg.init.output_scale,
        seed=cfg.seed,
    )
    state = _new_state(cfg, params, rest)
    if ep is not None:
        state = jax.device_put(state, parallel.state_shardings(state, ep.mesh))
    return graphdef, state


def init_state(cfg: TrainConfig, ep=None):
    """(graphdef, state) for a fresh run; parameters are initialized under jax.jit.

    ep: a parallel.ExpertParallel; its MoE layers then run expert-parallel (it is part of the
    graphdef), and params and optimizer state are created already sharded on its mesh by the
    partition rules (jit with out_shardings): no device or host ever holds a full copy.
    With cfg.init (a Hugging Face checkpoint) the parameters are read from it instead.

    Args:
        cfg: the validated TrainConfig.
        ep: a parallel.ExpertParallel, or None for one device.

    Returns:
        (graphdef, state) with state {"params", "rest", "opt", "step", "rng"}: the pytree
        train_step takes and returns.
    """
    if cfg.init is not None:
        return _init_from_checkpoint(cfg, ep)
    if ep is None:
        graphdef = model_graphdef(cfg)
        return graphdef, _new_state(cfg, *_init_params(cfg.model, cfg.seed))
    graphdef, abstract = abstract_state(cfg, ep)
    shardings = jax.tree.map(lambda a: a.sharding, abstract)
    return graphdef, jax.jit(functools.partial(_fresh_state, cfg), out_shardings=shardings)()


def abstract_state(cfg: TrainConfig, ep):
    """(graphdef, state) like init_state(cfg, ep), with every leaf a jax.ShapeDtypeStruct
    carrying its sharding on ep.mesh: the train step compiles against it and nothing is
    materialized (moe_jax.train.aot compiles for devices this host does not have)."""
    shapes = jax.eval_shape(functools.partial(_fresh_state, cfg))
    shardings = parallel.state_shardings(shapes, ep.mesh)
    state = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings
    )
    return model_graphdef(cfg, ep), state


@functools.partial(jax.jit, static_argnums=(0, 1))
def _init_params(model_cfg: model_lib.ModelConfig, seed: int):
    """(params, rest) of a fresh model; jitted and cached per (config, seed)."""
    model = model_lib.Transformer(model_cfg, rngs=nnx.Rngs(seed))
    return tuple(nnx.split(model, nnx.Param, ...)[1:])


def _forward(graphdef, params, rest, batch, deterministic: bool):
    """Task loss, its target count, the model's aux (MoE losses and statistics), and the
    non-parameter state after the pass (e.g. router selection biases a training pass moves)."""
    model = nnx.merge(graphdef, params, rest, copy=True)  # fresh Variables in this trace
    logits, aux = model(batch["tokens"], batch.get("image"), deterministic=deterministic)
    loss, count = model_lib.cross_entropy(logits, batch["targets"], batch["loss_mask"])
    return loss, count, aux, nnx.state(model, nnx.Not(nnx.Param))


@functools.partial(
    jax.jit, static_argnames=("graphdef", "tx", "schedule", "spec"), donate_argnames=("state",)
)
def train_step(state, batch, fail_at, stop=None, *, graphdef, tx, schedule, spec: StepSpec):
    """One optimizer step: value_and_grad of task loss + aux loss, accumulated over
    spec.grad_accum equal micro-batches (their gradients and metrics are averaged).

    fail_at: int32 scalar; the loss is poisoned with NaN when the step taken equals it (fault
    injection for tests; -1 = never). A traced argument, so it costs no recompilation.
    m["finite"] is False when the loss or the gradient norm is NaN/Inf;
    that step's update is then dropped (the returned state holds the previous values).
    stop: None, or a [devices] int32 array of each process's stop request (multi-process runs);
    m["stop"] is then its max, so every process reads the same decision with the metrics.

    Args:
        state: the train state from init_state (donated: do not reuse it after the call).
        batch: one global batch from moe_jax.data: tokens, targets, loss_mask [B, L] and, for
            vision-language models, image [B, H, W, C] and patch_fg.
        fail_at: int32 scalar, see above.
        stop: see above.
        graphdef: the model's graphdef (from init_state).
        tx: the optax transform from make_optimizer.
        schedule: the learning-rate schedule from make_optimizer.
        spec: static settings (grad_accum).

    Returns:
        (new_state, metrics): metrics hold device scalars (loss, aux_loss, grad_norm, lr,
        finite, per-layer MoE statistics); read them after dispatching the next step.
    """
    step = state["step"] + 1  # the step being taken, 1-based

    def loss_fn(params, rest, micro):
        loss, _, aux, rest = _forward(graphdef, params, rest, micro, False)
        loss = jnp.where(step == fail_at, jnp.nan, loss)  # fault injection (tests)
        m = {"loss": loss, "aux_loss": aux["aux_loss"], "moe": aux["moe"]}
        return loss + aux["aux_loss"], (m, rest)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    a = spec.grad_accum
    if a == 1:
        (_, (m, rest)), grads = grad_fn(state["params"], state["rest"], batch)
    else:
        micro = jax.tree.map(lambda x: x.reshape(a, x.shape[0] // a, *x.shape[1:]), batch)

        def body(carry, mb):
            sums, rest = carry  # non-parameter state is threaded through the micro-batches
            (_, (m, rest)), g = grad_fn(state["params"], rest, mb)
            return (jax.tree.map(jnp.add, sums, (g, m)), rest), None

        first = jax.tree.map(lambda x: x[0], micro)
        (_, (m0, _)), g0 = jax.eval_shape(grad_fn, state["params"], state["rest"], first)
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (g0, m0))
        ((grads, m), rest), _ = jax.lax.scan(body, (zeros, state["rest"]), micro)
        grads, m = jax.tree.map(lambda x: x / a, (grads, m))
    # A step is good when its loss and its gradient (so its global norm) are finite; AdamW's
    # update of finite parameters from finite gradients is finite. A bad step's update is not
    # applied: the state keeps the previous step's params, non-parameter state and optimizer
    # state, so the state in memory (and any checkpoint of it) stays finite while the loop
    # stops on m["finite"] == False. The decision is a lax.cond around the update: a
    # select(finite, new, old) per leaf made XLA split AdamW into one fusion per output, the
    # parameter's reading the old moments, and so copy every donated moment first (measured:
    # 48 copies and +50% optimizer time over 3M parameters; the cond has none).
    with jax.named_scope("optimizer"):
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(m["loss"]) & jnp.isfinite(grad_norm)

        def update(params, opt_state, new_rest, _):
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, new_rest

        def keep(params, opt_state, _, old_rest):
            return params, opt_state, old_rest

        params, opt_state, rest = jax.lax.cond(
            finite, update, keep, state["params"], state["opt"], rest, state["rest"]
        )
    m = {**m, "grad_norm": grad_norm, "lr": schedule(step - 1), "finite": finite}
    if stop is not None:
        m["stop"] = jnp.max(stop) > 0
    new_state = {**state, "params": params, "rest": rest, "opt": opt_state, "step": step}
    return new_state, m


def all_finite(tree) -> jax.Array:
    """Scalar bool: every inexact leaf of ``tree`` is free of NaN and Inf."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return functools.reduce(jnp.logical_and, [jnp.isfinite(x).all() for x in leaves], True)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def eval_step(params, rest, batch, *, graphdef):
    """Summed task loss, target count and MoE statistics of one held-out batch."""
    loss, count, aux, _ = _forward(graphdef, params, rest, batch, True)
    return {"loss_sum": loss * count, "count": count, "moe": aux["moe"]}


def evaluate(cfg: TrainConfig, graphdef, state, *, put=None) -> dict[str, float]:
    """Mean held-out loss over log.eval_batches batches (0 = the whole split) and routing stats.

    put: host batch -> device batch; with several processes each reads its own rows of every
    eval batch and `put` assembles the global arrays (multihost.to_global).

    Args:
        cfg: the validated TrainConfig.
        graphdef: the model's graphdef.
        state: the train state.
        put: see above; None passes the host batch as it is.

    Returns:
        {"eval/loss": mean held-out loss, "eval/<statistic>": routing statistics}.
    """
    count_p, index_p = jax.process_count(), jax.process_index()
    it = data_lib.make_dataset(cfg.data, "eval", process_index=index_p, process_count=count_p)
    loss_sum, count, moe_rows = 0.0, 0.0, []
    for i, batch in enumerate(it):
        if cfg.log.eval_batches and i >= cfg.log.eval_batches:
            break
        batch = batch if put is None else put(batch)
        out = metrics_lib.to_host(
            eval_step(state["params"], state["rest"], batch, graphdef=graphdef)
        )
        loss_sum, count = loss_sum + out["loss_sum"], count + out["count"]
        moe_rows.append(metrics_lib.flatten_routing(out["moe"], cfg.moe))
    row = {"eval/loss": loss_sum / max(count, 1.0)}
    for key in moe_rows[0] if moe_rows else ():
        if not isinstance(moe_rows[0][key], list):
            row[f"eval/{key}"] = float(np.mean([r[key] for r in moe_rows]))
    return row
