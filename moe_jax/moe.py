"""The MoE layer as a Flax NNX module: it owns parameters and calls the pure functions.

    y, aux = MoE(cfg, rngs=nnx.Rngs(0))(x, modality)

x [B, L, D] -> tokens [T, D] -> router logits (fp32) -> either the single-device path
(`local_forward`: route, dispatch plan, experts.routed_ffn) or the expert-parallel one
(`parallel.ep_forward`, one shard_map) -> shared expert -> aux (core.stats.layer_aux) ->
one step of the selection-bias controllers in training.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax.core import dispatch, routing, stats
from moe_jax.core.config import MoEConfig
from moe_jax.experts import ExpertParams, get_backend, routed_ffn
from moe_jax.parallel import ExpertParallel, ep_forward


class FFN(nnx.Module):
    """Dense FFN (SwiGLU or GELU); used as the shared expert and the dense baseline.

    ``y = ffn(x)`` maps [..., D] to [..., D] through a hidden width F.

    Args:
        d_model: D, the input and output width.
        d_ff: F, the hidden width.
        activation: ``"swiglu"`` (w_in, w_gate, w_out) or ``"gelu"`` (w_in, w_out).
        rngs: parameter initialization keys.
        dtype: compute dtype.
        param_dtype: parameter dtype.
        use_bias: biases on the projections.
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        *,
        activation="swiglu",
        rngs,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        use_bias=False,
    ):
        kw = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.activation = activation
        self.w_in = nnx.Linear(d_model, d_ff, **kw)
        self.w_gate = nnx.Linear(d_model, d_ff, **kw) if activation == "swiglu" else None
        self.w_out = nnx.Linear(d_ff, d_model, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        with jax.named_scope("dense_ffn"):
            h = self.w_in(x)
            h = jax.nn.silu(self.w_gate(x)) * h if self.activation == "swiglu" else jax.nn.gelu(h)
            return self.w_out(h)


class RouterBias(nnx.Variable):
    """Selection-only router bias (aux-loss-free balancing / null-ratio controller); updated in
    training forward passes, never by the optimizer."""


class MoE(nnx.Module):
    """Mixture-of-Experts FFN. ``y, aux = layer(x, modality=None)``; x [B, L, D] or [T, D].

    Parameters: router.kernel [D, N+1] (null router; column N is the null logit) or [D, N];
    w_in [N, D, F], w_gate [N, D, F] (SwiGLU), w_out [N, F, D], optional b_in/b_out and shared.
    Eval behaviour (threshold_eval / capacity_factor_eval) applies when ``deterministic`` is
    set, by argument or through ``layer.eval()``. With ``parallel`` (an ExpertParallel) the
    layer runs expert-parallel over its mesh (moe_jax.parallel.ep).

    Args:
        config: the layer's settings (D, F, N, K, router, backend, ...), validated when built.
        rngs: parameter initialization keys, e.g. ``nnx.Rngs(0)``.
        parallel: run expert-parallel over this mesh (moe_jax.parallel.ExpertParallel); None
            runs on one device. ``moe.set_parallel(model, ep)`` switches it later.

    Raises:
        ValueError: ``config.backend`` cannot run here (an unregistered name, or ``pallas``
            on a GPU below compute capability 8.0); the message names MoEConfig.backend.
    """

    def __init__(
        self, config: MoEConfig, *, rngs: nnx.Rngs, parallel: ExpertParallel | None = None
    ):
        cfg = config
        get_backend(cfg.backend)  # an unavailable backend fails here, naming MoEConfig.backend
        self.config = cfg
        self.parallel = parallel  # moe_jax.parallel.ExpertParallel or None (one device)
        self.deterministic = False
        self.record_routing = False  # record the expert ids of each call (see record_routing())
        pdt = jnp.dtype(cfg.param_dtype)
        d, f, n = cfg.d_model, cfg.d_ff, cfg.num_experts
        self.router = nnx.Linear(
            d,
            cfg.num_router_logits,
            use_bias=False,
            param_dtype=jnp.float32,
            dtype=jnp.dtype(cfg.router_dtype),
            kernel_init=nnx.initializers.normal(cfg.router_init_std),
            rngs=rngs,
        )
        init_in = nnx.initializers.variance_scaling(
            1.0, "fan_in", "truncated_normal", in_axis=1, out_axis=2
        )
        self.w_in = nnx.Param(init_in(rngs.params(), (n, d, f), pdt))
        self.w_gate = (
            nnx.Param(init_in(rngs.params(), (n, d, f), pdt))
            if cfg.activation == "swiglu"
            else None
        )
        self.w_out = nnx.Param(init_in(rngs.params(), (n, f, d), pdt))
        self.b_in = nnx.Param(jnp.zeros((n, f), pdt)) if cfg.expert_bias else None
        self.b_out = nnx.Param(jnp.zeros((n, d), pdt)) if cfg.expert_bias else None
        self.selection_bias = (
            RouterBias(jnp.zeros((cfg.num_router_logits,), jnp.float32))
            if cfg.uses_selection_bias
            else None
        )
        # The pi controller's memory: the previous step's error null_ratio - (1 - rho).
        self.null_state = (
            RouterBias(jnp.zeros((1,), jnp.float32))
            if cfg.router == "null" and cfg.null_bias_update_rate > 0
            else None
        )
        self.calibrating = False  # set by calibrate_null() for one forward pass
        self.shared = (
            FFN(
                d,
                cfg.shared_d_ff,
                activation=cfg.activation,
                rngs=rngs,
                dtype=jnp.dtype(cfg.dtype),
                param_dtype=pdt,
            )
            if cfg.shared_d_ff > 0
            else None
        )

    def __call__(
        self, x: jax.Array, modality: jax.Array | None = None, *, deterministic: bool | None = None
    ):
        """Routes each token to its experts and combines their outputs.

        Args:
            x: activations [B, L, D] or tokens [T, D] (T = B·L), floating point.
            modality: optional integer ids of x's leading shape ([B, L] or [T]) in
                [0, num_modalities), e.g. 0 vision / 1 text; they add per-modality statistics
                to ``aux`` and change nothing else.
            deterministic: eval-time routing (threshold_eval, capacity_factor_eval) and no
                controller step; None follows ``layer.eval()`` / ``layer.train()``.

        Returns:
            ``(y, aux)``: y with x's shape and dtype; aux a dict of scalars and small arrays:
            ``aux_loss`` (the weighted balance + z loss to add to the training loss),
            ``lb_loss``, ``z_loss``, ``null_ratio``, ``real_per_token``,
            ``zero_compute_fraction``, ``expert_load`` [N], ``drop_fraction``, ``num_real``
            and, with modality ids, per-modality statistics (docs/layer.md lists every key).

        Raises:
            ValueError: x is not [B, L, D] or [T, D] with D = d_model, not floating point, or
                holds no token; modality ids have another shape, a non-integer dtype, or
                (outside jit) values outside [0, num_modalities); with ``parallel``, N or the
                batch is not divisible by the mesh.
        """
        cfg = self.config
        if x.ndim not in (2, 3) or x.shape[-1] != cfg.d_model:
            raise ValueError(
                f"MoE input must be [B, L, {cfg.d_model}] or [T, {cfg.d_model}], got {x.shape}"
            )
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"MoE input x must be a floating-point array, got dtype {x.dtype}")
        if x.size == 0:  # averages over no token would be NaN (aux losses, statistics)
            raise ValueError(f"MoE input x holds no token (shape {x.shape})")
        if modality is not None:
            _check_modality(modality, x.shape[:-1], cfg.num_modalities)
        deterministic = self.deterministic if deterministic is None else deterministic
        train = not deterministic
        lead = x.shape[:-1]
        xt = x.reshape(-1, cfg.d_model)  # [T, D], batch-major (the EP token split follows it)
        mod = None if modality is None else modality.reshape(-1)  # [T]
        with jax.named_scope("router_logits"):
            logits = self.router(xt.astype(jnp.dtype(cfg.router_dtype)))  # [T, N(+1)]
        bias = None if self.selection_bias is None else self.selection_bias[...]  # [N(+1)]
        if self.calibrating:  # calibrate_null(): set the null bias from this batch
            bias = routing.calibrate_null_bias(
                logits,
                top_k=cfg.top_k,
                num_nulls=cfg.num_nulls,
                target_null_ratio=1.0 - cfg.density,
                selection_bias=bias,
            )
            self.selection_bias[...] = bias
        params = self.expert_params()
        if self.parallel is None:
            y, lb, z, st, ids = local_forward(xt, logits, mod, bias, params, cfg, train=train)
        else:
            self.parallel.check(cfg, x.shape[0])  # names the batch size, before flattening
            y, lb, z, st, ids = ep_forward(
                xt, logits, mod, bias, params, cfg, self.parallel, train=train
            )
        if self.record_routing:  # a tuple of every call's ids [T, S]; see routing_ids()
            if hasattr(self, "expert_ids"):
                self.expert_ids.set_value(self.expert_ids.get_value() + (ids,))
            else:
                self.expert_ids = nnx.Intermediate((ids,))
        if self.shared is not None:
            with jax.named_scope("shared_expert"):
                y = y + self.shared(xt).astype(y.dtype)
        aux = stats.layer_aux(cfg, lb, z, st)
        if self.selection_bias is not None and train:
            aux["null_bias"] = bias[-1] if cfg.router == "null" else jnp.zeros(())
            if (cfg.bias_update_rate > 0 or cfg.null_bias_update_rate > 0) and not self.calibrating:
                with jax.named_scope("controllers"):
                    self._step_controllers(bias, logits, aux)
        return y.reshape(*lead, cfg.d_model).astype(x.dtype), aux

    def _step_controllers(self, bias: jax.Array, logits: jax.Array, aux: dict) -> None:
        """One step of the selection-bias controllers; functional loops carry this RouterBias
        state out of the step (it is not a Param)."""
        cfg = self.config
        null = cfg.router == "null"
        target = 1.0 - cfg.density
        prev = self.null_state[...][0] if null else None
        scale = routing.logit_scale(logits[:, : cfg.num_experts])  # robust to bad tokens
        self.selection_bias[...] = routing.update_selection_bias(
            bias,
            expert_load=aux["expert_load"],
            null_ratio=aux["null_ratio"],
            target_null_ratio=target,
            expert_rate=cfg.bias_update_rate,
            null_rate=cfg.null_bias_update_rate,
            null_kp=cfg.null_kp,
            null_controller=cfg.null_controller,
            prev_null_error=prev,
            logit_scale=scale,
        )
        if null:
            self.null_state[...] = self.null_state[...].at[0].set(aux["null_ratio"] - target)

    def expert_params(self) -> ExpertParams:
        """Expert weights in the compute dtype (biases as stored)."""
        cdt = jnp.dtype(self.config.dtype)
        opt = lambda p, cast=True: None if p is None else (p[...].astype(cdt) if cast else p[...])  # noqa: E731
        return ExpertParams(
            opt(self.w_in),
            opt(self.w_gate),
            opt(self.w_out),
            opt(self.b_in, False),
            opt(self.b_out, False),
        )


def _check_modality(modality, shape: tuple[int, ...], num_modalities: int) -> None:
    """Shape and integer dtype always; values in [0, num_modalities) when concrete (outside
    jit). Under jit the values are not checked: ids outside the range drop out of the
    per-modality statistics (moe_jax.core.stats)."""
    if modality.shape != shape:
        raise ValueError(f"modality ids must have shape {shape}, got {modality.shape}")
    if not jnp.issubdtype(modality.dtype, jnp.integer):  # bool is not an integer dtype here
        raise ValueError(f"modality ids must be an integer array, got dtype {modality.dtype}")
    if isinstance(modality, jax.core.Tracer) or modality.size == 0:
        return
    lo, hi = int(jnp.min(modality)), int(jnp.max(modality))
    if lo < 0 or hi >= num_modalities:
        raise ValueError(
            f"modality ids must lie in [0, MoEConfig.num_modalities={num_modalities}), got "
            f"values in [{lo}, {hi}]"
        )


def local_forward(
    xt: jax.Array,
    logits: jax.Array,
    modality: jax.Array | None,
    selection_bias: jax.Array | None,
    params: ExpertParams,
    cfg: MoEConfig,
    *,
    train: bool,
):
    """Single-device routed experts: route -> dispatch plan -> experts.routed_ffn.

    Same arguments and results as parallel.ep_forward:
    (y [T, D], lb_loss, z_loss, stats, expert_ids [T, S])."""
    t = xt.shape[0]
    axis = cfg.lb_axis_name if cfg.lb_scope == "global" else None
    with jax.named_scope("route"):
        r = routing.route(logits, cfg, train=train, axis_name=axis, selection_bias=selection_bias)
    cap = cfg.expert_capacity(t, train=train)
    max_rows = (
        None if cfg.router in ("null", "topk", "switch") or cap is None else cfg.num_experts * cap
    )
    with jax.named_scope("dispatch"):
        plan = dispatch.make_plan(r.expert_ids, r.weights, cfg.num_experts, max_rows)
    with jax.named_scope("experts"):
        y = routed_ffn(
            xt.astype(jnp.dtype(cfg.dtype)),
            plan.token_idx,
            plan.weights,
            plan.group_sizes,
            params,
            activation=cfg.activation,
            backend=cfg.backend,
        )  # [T, D]
    with jax.named_scope("routing_stats"):
        st = stats.routing_stats(cfg, r, modality, axis, plan.group_sizes)
    return y, r.lb_loss, r.z_loss, st, r.expert_ids


def null_calibrated_layers(model: nnx.Module) -> list[MoE]:
    """The MoE layers inside `model` that calibrate_null() sets (null router, M > 0,
    null_calibrate on)."""
    return [m for _, m in nnx.iter_graph(model) if isinstance(m, MoE) and m.config.calibrates_null]


def calibrate_null(model: nnx.Module, *args, **kwargs):
    """Runs ``model(*args, **kwargs)`` once with every null-router MoE layer in calibration
    mode and returns its output: each layer, in forward order, sets the null logit's selection
    bias so that this batch's null ratio is 1 - rho (routing.calibrate_null_bias), so training
    starts at K*rho real experts per token instead of waiting for L_bal to lift the null logit.
    Call it on the first training batch before the first step (train.py does); no controller
    steps and nothing else changes. Under jax.jit, merge the model inside the jitted function.

    Args:
        model: an nnx.Module holding MoE layers (a model, or one MoE layer itself). Layers
            with another router, M = 0 or ``null_calibrate=False`` are left as they are.
        *args: the model's call arguments, e.g. a MoE layer's x [B, L, D] or a Transformer's
            tokens [B, L] and images.
        **kwargs: the model's call keyword arguments.

    Returns:
        What ``model(*args, **kwargs)`` returns, computed with the calibrated biases.
    """
    layers = null_calibrated_layers(model)
    for m in layers:
        m.calibrating = True
    try:
        return model(*args, **kwargs)
    finally:
        for m in layers:
            m.calibrating = False


def set_parallel(model: nnx.Module, ep: ExpertParallel | None) -> nnx.Module:
    """Turn expert parallelism on (or off with None) for every MoE layer inside `model`."""
    for _, module in nnx.iter_graph(model):
        if isinstance(module, MoE):
            module.parallel = ep
    return model


def record_routing(model: nnx.Module, enabled: bool = True) -> nnx.Module:
    """Opt every MoE layer inside `model` in (or out) of recording its expert ids [T, S] in an
    nnx.Intermediate on each call; read them with routing_ids(model)."""
    for _, module in nnx.iter_graph(model):
        if isinstance(module, MoE):
            module.record_routing = enabled
    return model


def routing_ids(model: nnx.Module) -> list[tuple[jax.Array, int]]:
    """[(expert ids [T, S], N)] of every recorded MoE call, layers in graph order, and clears
    them. Ids >= N are null or dropped slots. Inside jit the ids are tracers: return them."""
    out = []
    for _, module in nnx.iter_graph(model):
        if not isinstance(getattr(module, "expert_ids", None), nnx.Intermediate):
            continue
        if isinstance(module, MoE):
            out.extend((ids, module.config.num_experts) for ids in module.expert_ids.get_value())
        else:  # a scanned block stack records (ids, N) per MoE call, layers in forward order
            out.extend(module.expert_ids.get_value())
        del module.expert_ids
    return out
