"""Study LM analyses of one trained run: where the compute goes per byte class, and eval-time
compute knobs (no retraining).

- by_class: held-out real experts per byte (mean over MoE layers) and next-byte loss for each
  byte class of the input byte: whitespace, punctuation (printable ASCII symbols), digits,
  letters of Python keywords, letters of other identifiers (letters and '_'), other (non-ASCII
  bytes and bos/eos).
- null_knob: the null router's selection bias on the null logit shifted by ``shift`` in every
  MoE layer (a positive shift makes null slots easier to pick: fewer real experts per token).
- topk_knob: top-k evaluated with another k; threshold_knob: XMoE's eval-time threshold.
Every knob point is the library's held-out eval (moe_jax.train.step.evaluate, eval mode), its
FLOPs the measured realized experts per token (eval/flops_per_token/realized, MoE layers,
forward, router included).
"""

from __future__ import annotations

import dataclasses
import functools
import keyword
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moe_jax import data as data_lib
from moe_jax import model as model_lib
from moe_jax.train import step as step_lib
from moe_jax.train import sweep

CLASSES = ("whitespace", "punctuation", "digits", "keyword letters", "identifier letters", "other")
NULL_SHIFTS = (-2.0, -1.0, -0.5, -0.25, -0.1, 0.0, 0.1, 0.25, 0.5, 1.0, 2.0)
TOPK_KS = (1, 2, 3, 4)
T_EVALS = (0.5, 0.7, 0.8, 0.9, 0.95, 0.99)
_WORD = re.compile(rb"[A-Za-z_][A-Za-z0-9_]*")
_OFFSET = data_lib.ByteTokenizer.offset


def byte_classes(tokens: np.ndarray) -> np.ndarray:
    """[B, L] byte-tokenizer ids -> [B, L] index into CLASSES (words cut at the row's edges)."""
    b = tokens.astype(np.int64) - _OFFSET  # byte value; < 0 for the specials
    out = np.full(b.shape, CLASSES.index("other"), np.int64)
    out[(b >= 33) & (b <= 126)] = CLASSES.index("punctuation")
    out[np.isin(b, (9, 10, 11, 12, 13, 32))] = CLASSES.index("whitespace")
    out[(b >= 48) & (b <= 57)] = CLASSES.index("digits")
    letter = ((b >= 65) & (b <= 90)) | ((b >= 97) & (b <= 122)) | (b == 95)
    out[letter] = CLASSES.index("identifier letters")
    kw = CLASSES.index("keyword letters")
    for i, row in enumerate(b):
        text = bytes(np.where((row >= 0) & (row < 256), row, 0).astype(np.uint8))
        for m in _WORD.finditer(text):
            if keyword.iskeyword(m.group().decode("ascii")):
                span = slice(m.start(), m.end())
                out[i, span] = np.where(letter[i, span], kw, out[i, span])
    return out


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, params, rest, tokens, targets):
    """(per-token next-byte loss [B, L], [expert ids [T, S] per MoE layer]) of one batch."""
    model = nnx.merge(graphdef, params, rest)
    (logits, _), calls = model_lib.forward_with_routing(model, tokens, None, deterministic=True)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]  # [B, L]
    return nll, [ids for ids, _ in calls]


def by_class(cfg, graphdef, state) -> dict:
    """{class: {"tokens": share of held-out bytes, "real": real experts per byte (mean over
    layers; None for dense), "compute": share of real (byte, expert) assignments, "loss":
    next-byte loss at bytes of the class}} over cfg.log.eval_batches held-out batches."""
    moe = cfg.moe
    cls, nll, real = [], [], []
    for i, batch in enumerate(data_lib.make_dataset(cfg.data, "eval")):
        if i >= cfg.log.eval_batches:
            break
        loss, ids = _forward(
            graphdef, state["params"], state["rest"], batch["tokens"], batch["targets"]
        )
        cls.append(byte_classes(batch["tokens"]))
        nll.append(np.asarray(loss))
        if moe is not None and moe.router != "threshold":
            b = batch["tokens"].shape[0]
            # ids [T, S] per MoE call, or [layers, T, S] from a scanned block stack
            layers = [y for x in ids for y in np.asarray(x).reshape(-1, *np.shape(x)[-2:])]
            counts = [(y < moe.num_experts).sum(-1).reshape(b, -1) for y in layers]
            real.append(np.mean(counts, axis=0))  # [B, L] mean over layers
    c, loss = np.concatenate(cls), np.concatenate(nll)
    r = np.concatenate(real) if real else None
    out = {}
    for k, name in enumerate(CLASSES):
        sel = c == k
        out[name] = {
            "tokens": float(sel.mean()),
            "real": float(r[sel].mean()) if r is not None and sel.any() else None,
            "compute": float(r[sel].sum() / r.sum()) if r is not None else None,
            "loss": float(loss[sel].mean()) if sel.any() else None,
        }
    return out


def shift_null_bias(graphdef, state, shift: float) -> dict:
    """state with `shift` added to the null logit's selection bias of every null-router MoE
    layer (the parameters untouched). Raises ValueError when no layer has one."""
    model = nnx.merge(graphdef, state["params"], state["rest"], copy=True)  # state untouched
    found = 0
    for _, node in nnx.iter_graph(model):
        bias = getattr(node, "selection_bias", None)
        if bias is not None and getattr(node, "config", None) is not None:
            if node.config.router == "null":
                bias[...] = bias[...].at[..., -1].add(shift)  # [(layers,) N+1]
                found += 1
    if not found:
        raise ValueError(
            "no null-router layer with a selection bias (moe.null_calibrate and "
            "moe.null_bias_update_rate both off): nothing to shift"
        )
    _, params, rest = nnx.split(model, nnx.Param, ...)
    return {**state, "params": params, "rest": rest}


def _row(knob: str, value, ev: dict) -> dict:
    return {
        "knob": knob,
        "value": value,
        "loss": ev["eval/loss"],
        "real_per_token": ev.get("eval/real_per_token"),
        "moe_flops": ev.get("eval/flops_per_token/realized", 0.0),
    }


def null_knob(cfg, graphdef, state, shifts=NULL_SHIFTS) -> list[dict]:
    """Held-out loss and realized FLOPs at each shift of the null selection bias."""
    return [
        _row(
            "null bias shift",
            s,
            step_lib.evaluate(cfg, graphdef, shift_null_bias(graphdef, state, s)),
        )
        for s in shifts
    ]


def topk_knob(cfg, state, ks=TOPK_KS) -> list[dict]:
    """Held-out loss and realized FLOPs of a top-k run evaluated with k experts per token."""
    rows = []
    for k in ks:
        moe = cfg.model.moe.replace(top_k=k)
        pcfg = dataclasses.replace(cfg, model=cfg.model.replace(moe=moe))
        rows.append(_row("top-k k", k, step_lib.evaluate(pcfg, sweep.graphdef_for(pcfg), state)))
    return rows


def threshold_knob(cfg, state, t_evals=T_EVALS) -> list[dict]:
    """Held-out loss and realized FLOPs of an XMoE run at each eval-time threshold."""
    rows = []
    for t in t_evals:
        r = sweep.evaluate_point(cfg, state, sweep.Point(t_eval=t))
        rows.append(
            {
                "knob": "XMoE t_eval",
                "value": t,
                "loss": r["loss"],
                "real_per_token": r["real_per_token"],
                "moe_flops": r["moe_flops"],
            }
        )
    return rows


def analyze(cfg, workdir: str) -> dict:
    """by_class and the knob rows the run's router supports, from its final checkpoint."""
    step, graphdef, state = sweep.restore(cfg, workdir)
    out = {"step": step, "by_class": by_class(cfg, graphdef, state), "knob": []}
    moe = cfg.moe
    base = step_lib.evaluate(cfg, graphdef, state)
    out["base"] = _row("as trained", None, base)
    if moe is None:
        return out
    if moe.router == "null" and moe.uses_selection_bias:
        out["knob"] = null_knob(cfg, graphdef, state)
    elif moe.router == "topk":
        out["knob"] = topk_knob(cfg, state)
    elif moe.router == "threshold":
        out["knob"] = threshold_knob(cfg, state)
    return out
