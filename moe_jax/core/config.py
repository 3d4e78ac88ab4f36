"""MoEConfig: the frozen, validated description of one MoE layer.

Every field is checked in ``__post_init__``; a bad value raises ``ValueError`` naming the field
and the allowed range before any array is built.
"""

from __future__ import annotations

import dataclasses
import math

from moe_jax.core.validate import check_finite_floats, field_error, is_pos_int

ROUTERS = ("null", "topk", "switch", "threshold", "expert_choice")
ACTIVATIONS = ("swiglu", "gelu")
LB_SCOPES = ("local", "global")
NULL_CONTROLLERS = ("pi", "sign")
DTYPES = ("float32", "bfloat16", "float16")
# Grouped-matmul backend names MoEConfig.backend accepts: the built-in ones (moe_jax.experts)
# and every name moe_jax.experts.register_backend has added. Whether a backend can run here
# (e.g. the Pallas kernels import) is checked when the layer is built.
_BACKEND_NAMES = ["auto", "dense", "ragged", "tiled", "pallas", "tokamax"]


def backend_names() -> tuple[str, ...]:
    return tuple(_BACKEND_NAMES)


def add_backend_name(name: str) -> None:
    """Called by moe_jax.experts.register_backend."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"backend name must be a non-empty string, got {name!r}")
    if name not in _BACKEND_NAMES:
        _BACKEND_NAMES.append(name)


# Router-specific defaults for the load-balance coefficient (ALGORITHMS.md).
DEFAULT_LB_COEF = {
    "null": 2e-2,
    "topk": 1e-2,
    "switch": 1e-2,
    "threshold": 1e-2,
    "expert_choice": 0.0,
}
# Default capacity factor: gamma for threshold (XMoE LM setting), c for expert choice.
DEFAULT_CAPACITY = {"threshold": 8.0, "expert_choice": 2.0}


def _err(field: str, allowed: str, value) -> ValueError:
    return field_error("MoEConfig", field, value, allowed)


def null_count_from_rho(num_experts: int, rho: float) -> int:
    """M = N(1 - rho)/rho; raises if it is not an integer (within 1e-6)."""
    if not (0.0 < rho <= 1.0):
        raise _err("rho", "must lie in (0, 1]", rho)
    m = num_experts * (1.0 - rho) / rho
    m_int = round(m)
    if abs(m - m_int) > 1e-6 * max(1.0, m):
        raise _err(
            "rho",
            f"num_null_experts = N(1-rho)/rho = {num_experts}*(1-{rho})/{rho} = {m:.4f} must be an "
            "integer; pick rho so that N/(N+M) is exact (e.g. rho=N/(N+M))",
            rho,
        )
    return int(m_int)


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """One MoE layer: sizes (D, F, N, K), router, losses, backend and dtypes.

    Each field's trailing comment says what it is (listed below); docs/layer.md has the table
    with the details. For the null router give exactly one of ``rho`` and
    ``num_null_experts``: M = N(1-ρ)/ρ null copies, E[K] = K·ρ real experts per token.

    Raises:
        ValueError: a field outside its range, a NaN or inf, an unknown name (router,
            activation, dtype, backend), or fields that conflict (rho with another router,
            both rho and num_null_experts, expert choice in a causal model without
            allow_noncausal): ``MoEConfig.<field>=<value> is invalid: <allowed range>``,
            raised when the config is built, before any compute.
    """

    d_model: int  # D: model width
    d_ff: int  # F: hidden width of each expert
    num_experts: int = 8  # N: real experts
    top_k: int = 2  # K (k_max): slots picked per token (token-choice routers)
    rho: float | None = None  # null router density N/(N+M); give rho OR num_null_experts
    num_null_experts: int | None = None  # M: null copies of the learned null logit
    router: str = "topk"  # null | topk | switch | threshold | expert_choice
    threshold: float = 0.9  # t for the threshold router (train)
    threshold_eval: float | None = None  # t at eval; None = same as threshold
    capacity_factor: float | None = (
        None  # gamma (threshold) / c (expert choice); None = router default
    )
    capacity_factor_eval: float | None = None  # capacity factor at eval; None = same as train
    min_capacity: int = 4  # lower bound on per-expert capacity C
    renormalize: bool = True  # renormalize gates over the selected real experts (null/topk)
    activation: str = "swiglu"  # swiglu | gelu
    expert_bias: bool = False  # biases in the expert FFNs
    shared_d_ff: int = 0  # hidden width of an always-on shared expert; 0 = none
    lb_coef: float | None = None  # load-balance coefficient; None = router default
    z_coef: float = 1e-3  # router z-loss coefficient
    lb_scope: str = "local"  # local | global (counts summed over lb_axis_name)
    lb_axis_name: str | tuple[str, ...] | None = None  # mesh axes summed for lb_scope=global
    backend: str = "auto"  # expert backend: auto | dense | ragged | tiled | pallas | tokamax
    router_dtype: str = "float32"  # router logits/softmax dtype
    dtype: str = "float32"  # compute dtype of the expert matmuls
    param_dtype: str = "float32"  # parameter dtype
    causal: bool = True  # the layer sits in a causal decoder
    allow_noncausal: bool = False  # explicitly allow expert_choice in a causal model (tests only)
    num_modalities: int = 2  # size of the modality-id alphabet for per-modality statistics
    router_init_std: float = 0.02  # std of the router kernel init
    bias_update_rate: float = 0.0  # u of aux-loss-free per-expert balancing bias (0 = off)
    null_bias_update_rate: float = 0.0  # u of the null-ratio controller on the null logit (0 = off)
    null_controller: str = "pi"  # pi | sign: the null-ratio controller's update rule
    null_kp: float = 0.0  # proportional gain of the pi controller (null_bias_update_rate: integral)
    null_calibrate: bool = True  # calibrate_null (train.py: 1st batch) sets E[real] = K*rho

    def __post_init__(self):
        check_finite_floats("MoEConfig", self)  # NaN/inf first: they slip past range checks
        for name in ("d_model", "d_ff", "num_experts", "top_k", "min_capacity", "num_modalities"):
            if not is_pos_int(getattr(self, name)):
                raise _err(name, "must be an integer >= 1", getattr(self, name))
        if self.router not in ROUTERS:
            raise _err("router", f"must be one of {ROUTERS}", self.router)
        if self.activation not in ACTIVATIONS:
            raise _err("activation", f"must be one of {ACTIVATIONS}", self.activation)
        if self.lb_scope not in LB_SCOPES:
            raise _err("lb_scope", f"must be one of {LB_SCOPES}", self.lb_scope)
        for name in ("router_dtype", "dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise _err(name, f"must be one of {DTYPES}", getattr(self, name))
        if not isinstance(self.shared_d_ff, int) or self.shared_d_ff < 0:
            raise _err(
                "shared_d_ff", "must be an integer >= 0 (0 = no shared expert)", self.shared_d_ff
            )
        for name in ("threshold", "threshold_eval"):
            v = getattr(self, name)
            if v is not None and not (0.0 < v <= 1.0):
                raise _err(name, "must lie in (0, 1]", v)
        for name in ("capacity_factor", "capacity_factor_eval"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise _err(name, "must be > 0 (or None for the router default)", v)
        if self.lb_coef is not None and self.lb_coef < 0:
            raise _err("lb_coef", "must be >= 0", self.lb_coef)
        if self.z_coef < 0:
            raise _err("z_coef", "must be >= 0", self.z_coef)
        for name in ("bias_update_rate", "null_bias_update_rate"):
            if getattr(self, name) < 0:
                raise _err(name, "must be >= 0 (0 = off)", getattr(self, name))
        if self.bias_update_rate > 0 and self.router not in ("null", "topk", "switch"):
            raise _err(
                "bias_update_rate",
                "applies to the null, topk and switch routers",
                self.bias_update_rate,
            )
        if self.null_bias_update_rate > 0 and self.router != "null":
            raise _err(
                "null_bias_update_rate", "applies to router='null' only", self.null_bias_update_rate
            )
        if self.null_controller not in NULL_CONTROLLERS:
            raise _err(
                "null_controller", f"must be one of {NULL_CONTROLLERS}", self.null_controller
            )
        if self.null_kp < 0:
            raise _err("null_kp", "must be >= 0 (0 = integral only)", self.null_kp)
        if self.null_kp > 0 and self.null_controller != "pi":
            raise _err("null_kp", "applies to null_controller='pi' only", self.null_kp)
        if not isinstance(self.null_calibrate, bool):
            raise _err("null_calibrate", "must be True or False", self.null_calibrate)
        if self.router_init_std <= 0:
            raise _err("router_init_std", "must be > 0", self.router_init_std)
        if self.backend not in _BACKEND_NAMES:
            raise _err(
                "backend",
                f"must be one of {backend_names()} (or a name added by register_backend)",
                self.backend,
            )

        # Null experts: exactly one of rho / num_null_experts.
        if self.router == "null":
            if (self.rho is None) == (self.num_null_experts is None):
                raise _err(
                    "rho",
                    "router='null' needs exactly one of rho or num_null_experts "
                    f"(got rho={self.rho}, num_null_experts={self.num_null_experts})",
                    self.rho,
                )
            if self.rho is not None:
                null_count_from_rho(self.num_experts, self.rho)
            elif not isinstance(self.num_null_experts, int) or self.num_null_experts < 0:
                raise _err("num_null_experts", "must be an integer >= 0", self.num_null_experts)
            if self.capacity_factor is not None or self.capacity_factor_eval is not None:
                raise _err(
                    "capacity_factor",
                    "the null router is dropless: leave capacity_factor None",
                    self.capacity_factor,
                )
        else:
            if self.rho not in (None, 1.0) or self.num_null_experts not in (None, 0):
                raise _err(
                    "rho",
                    f"rho/num_null_experts apply to router='null' only (router={self.router!r})",
                    self.rho,
                )
        n_slots = self.num_experts + self.num_nulls
        if self.router in ("null", "topk") and self.top_k > n_slots:
            raise _err("top_k", f"must be <= N+M = {n_slots}", self.top_k)
        if self.router == "switch" and self.top_k != 1:
            raise _err("top_k", "must be 1 for router='switch'", self.top_k)
        if self.router == "expert_choice" and self.causal and not self.allow_noncausal:
            raise _err(
                "router",
                "expert_choice lets each expert pick tokens from the whole sequence, so outputs "
                "depend on future tokens (non-causal). Use it in encoders / vision-only layers "
                "(causal=False), or set allow_noncausal=True to accept the leak",
                self.router,
            )

    # ---- derived quantities -------------------------------------------------------------
    @property
    def num_nulls(self) -> int:
        """M, the number of null copies (0 for routers without null experts)."""
        if self.router != "null":
            return 0
        if self.num_null_experts is not None:
            return self.num_null_experts
        return null_count_from_rho(self.num_experts, self.rho)

    @property
    def density(self) -> float:
        """rho = N/(N+M)."""
        return self.num_experts / (self.num_experts + self.num_nulls)

    @property
    def num_router_logits(self) -> int:
        """N+1 for the null router (one learned null logit), N otherwise."""
        return self.num_experts + (1 if self.router == "null" else 0)

    @property
    def uses_selection_bias(self) -> bool:
        return self.bias_update_rate > 0 or self.null_bias_update_rate > 0 or self.calibrates_null

    @property
    def calibrates_null(self) -> bool:
        """The first training call sets the null selection bias (null router with M > 0)."""
        return self.router == "null" and self.null_calibrate and self.num_nulls > 0

    @property
    def effective_lb_coef(self) -> float:
        return DEFAULT_LB_COEF[self.router] if self.lb_coef is None else self.lb_coef

    def capacity_for(self, *, train: bool) -> float | None:
        """Capacity factor in effect (None = no capacity)."""
        cf = self.capacity_factor
        if not train and self.capacity_factor_eval is not None:
            cf = self.capacity_factor_eval
        if cf is None:
            cf = DEFAULT_CAPACITY.get(self.router)
        return cf

    def threshold_for(self, *, train: bool) -> float:
        if not train and self.threshold_eval is not None:
            return self.threshold_eval
        return self.threshold

    def expert_capacity(self, num_tokens: int, *, train: bool = True) -> int | None:
        """C = max(ceil(gamma*T/N), min_capacity) for threshold / capped token choice;
        k' = ceil(T*c/N) tokens per expert for expert choice (at most T)."""
        cf = self.capacity_for(train=train)
        if cf is None:
            return None
        c = math.ceil(cf * num_tokens / self.num_experts - 1e-9)
        if self.router == "expert_choice":
            return max(1, min(num_tokens, c))
        return max(c, self.min_capacity)

    def replace(self, **kw) -> MoEConfig:
        return dataclasses.replace(self, **kw)
