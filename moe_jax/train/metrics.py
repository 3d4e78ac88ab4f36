"""Training metrics: flattening of routing statistics, JSONL + TensorBoard writers, progress bar.

Metric names (JSONL keys; TensorBoard tags are the same with lists expanded per index):
  loss, aux_loss, lr, grad_norm, tokens_per_s, eval/loss
  lb_loss, z_loss, null_ratio, real_per_token, zero_compute_fraction, drop_fraction
      means over MoE layers; the same per layer as "<name>/layer<i>"
  null_ratio/<modality>, real_per_token/<modality>, compute_share/<modality>
      per modality (vision, text), means over layers; per layer as ".../layer<i>"
  null_bias                 the null-ratio controller's selection bias (when enabled)
  null_error                null router: this batch's null_ratio - (1 - rho), per layer too
  expert_load/layer<i>      [N] share of real assignments per expert
  flops_per_token/expected  MoE-layer forward FLOPs per token at the router's E[K], summed over
                            MoE layers; flops_per_token/realized uses the measured experts/token
"""

from __future__ import annotations

import json
import math
import os
import time
import zlib
from collections.abc import Mapping, Sequence

import numpy as np

from moe_jax.core import flops
from moe_jax.core.config import MoEConfig
from moe_jax.train.writes import WriteFailedError, writing

MODALITIES = ("vision", "text")
_LAYER_SCALARS = (
    "lb_loss",
    "z_loss",
    "null_ratio",
    "real_per_token",
    "zero_compute_fraction",
    "drop_fraction",
    "null_bias",  # selection bias on the null logit (null-ratio controller), when enabled
    "null_error",  # null router: this batch's null_ratio - (1 - rho)
)
_MODALITY_STATS = {
    "null_ratio_by_modality": "null_ratio",
    "real_per_token_by_modality": "real_per_token",
    "compute_share_by_modality": "compute_share",
}


def flatten_routing(
    moe_aux: Sequence[Mapping[str, np.ndarray]], moe_cfg: MoEConfig | None
) -> dict[str, float | list[float]]:
    """Per-layer MoE aux dicts (host numpy) -> flat metric dict (see the module docstring).

    Per-modality means skip layers where a modality has no tokens (text-only runs).
    """
    out: dict[str, float | list[float]] = {}
    if not moe_aux:
        return out
    for name in _LAYER_SCALARS:
        vals = [float(a[name]) for a in moe_aux if name in a]
        if not vals:
            continue
        out[name] = float(np.mean(vals))
        for i, v in enumerate(vals):
            out[f"{name}/layer{i}"] = v
    for i, a in enumerate(moe_aux):
        if "expert_load" in a:
            out[f"expert_load/layer{i}"] = [float(x) for x in np.asarray(a["expert_load"])]
    if "modality_tokens" in moe_aux[0]:
        present = np.asarray(moe_aux[0]["modality_tokens"]) > 0
        for key, short in _MODALITY_STATS.items():
            per_layer = np.stack([np.asarray(a[key], np.float64) for a in moe_aux])  # [layers, 2]
            for m, mod in enumerate(MODALITIES[: per_layer.shape[1]]):
                if not present[m]:
                    continue
                out[f"{short}/{mod}"] = float(per_layer[:, m].mean())
                for i in range(per_layer.shape[0]):
                    out[f"{short}/{mod}/layer{i}"] = float(per_layer[i, m])
    if moe_cfg is not None:
        realized = [float(a["real_per_token"]) for a in moe_aux]
        out["flops_per_token/expected"] = len(moe_aux) * flops.moe_flops_per_token(moe_cfg)
        out["flops_per_token/realized"] = sum(
            flops.moe_flops_per_token(moe_cfg, r) for r in realized
        )
    return out


def to_host(tree):
    """Device arrays -> Python floats / lists (one transfer per leaf)."""
    import jax

    def conv(x):
        x = np.asarray(x)
        return float(x) if x.ndim == 0 else x.astype(np.float64).tolist()

    return jax.tree.map(conv, jax.device_get(tree))


class MetricWriter:
    """Appends one JSON object per call to ``<workdir>/metrics.jsonl``; mirrors to TensorBoard.

    Both files are written in the calling thread and flushed per call: a failing write (full
    disk, ``ulimit -f``) raises WriteFailedError naming the file at once, instead of
    stalling training behind a background queue whose writer died.
    """

    def __init__(
        self,
        workdir: str,
        *,
        tensorboard: bool = True,
        filename: str = "metrics.jsonl",
        enabled: bool = True,
    ):
        """enabled=False (processes other than 0 of a multi-process run) writes nothing."""
        self.path = os.path.join(workdir, filename)
        self.enabled = enabled
        self._file = self._tb = None
        if not enabled:
            return
        with writing(self.path):
            os.makedirs(workdir, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115
        if tensorboard:
            self._tb = TensorBoardFile(os.path.join(workdir, "tb"))

    def write(self, step: int, metrics: Mapping[str, float | list[float]]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: _json_value(v) for k, v in metrics.items()}}
        with writing(self.path):
            self._file.write(json.dumps(row, allow_nan=False) + "\n")
            self._file.flush()
        if self._tb is not None:
            scalars = {}
            for tag, v in metrics.items():
                if isinstance(v, list | tuple):
                    scalars.update({f"{tag}/{j}": x for j, x in enumerate(v)})
                elif isinstance(v, int | float) and math.isfinite(v):
                    scalars[tag] = v
            self._tb.write(step, scalars)

    def flush(self) -> None:
        if self._file is not None:
            with writing(self.path):
                self._file.flush()

    def close(self) -> None:
        """Closes both files; a failure here (the run is ending anyway) is not raised twice."""
        for f in (self._file, self._tb):
            if f is not None:
                try:
                    f.close()
                except (OSError, WriteFailedError):
                    pass
        self._file = self._tb = None


class TensorBoardFile:
    """A TensorBoard event file (tensorboardX's format), written synchronously: one event per
    write() holding all of a step's scalars, flushed at once."""

    def __init__(self, logdir: str):
        from tensorboardX.event_file_writer import EventsWriter

        with writing(logdir):
            os.makedirs(logdir, exist_ok=True)
            self._writer = EventsWriter(os.path.join(logdir, "events"))
        self.path = self._writer._file_name

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        from tensorboardX.proto import event_pb2, summary_pb2

        values = [
            summary_pb2.Summary.Value(tag=t, simple_value=float(v)) for t, v in scalars.items()
        ]
        event = event_pb2.Event(
            wall_time=time.time(), step=int(step), summary=summary_pb2.Summary(value=values)
        )
        with writing(self.path):
            self._writer.write_event(event)
            self._writer.flush()

    def close(self) -> None:
        with writing(self.path):
            self._writer.close()


def _json_value(v):
    """NaN / Inf -> None (JSON null): strict JSON that any reader parses."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def read_jsonl(path: str) -> list[dict]:
    """All rows of a metrics file ([] if there is none); a torn last line is ignored."""
    rows = []
    if not os.path.exists(path):
        return rows
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def last_rows_by_step(rows: list[dict]) -> list[dict]:
    """Train rows deduplicated by step (files of older versions hold replayed steps twice)."""
    by_step = {}
    for r in rows:
        if "loss" in r:
            by_step[r["step"]] = r
    return [by_step[s] for s in sorted(by_step)]


def eval_rows(rows: list[dict]) -> list[dict]:
    """Eval rows (those with eval/loss), the last one per step, in step order."""
    by_step = {r["step"]: r for r in rows if "eval/loss" in r}
    return [by_step[s] for s in sorted(by_step)]


def truncate_after(path: str, step: int) -> None:
    """Drops the rows of ``path`` with a step after ``step`` (and a torn last line), in place.

    A run resumed from the checkpoint at ``step`` replays the steps after it; without this they
    would be logged twice. The file is rewritten atomically (temp file + rename).
    """
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("step", 0) <= step:
            kept.append(line if line.endswith("\n") else line + "\n")
    if len(kept) == len(lines) and all(a == b for a, b in zip(kept, lines)):
        return
    with writing(path):
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.writelines(kept)
        os.replace(path + ".tmp", path)


class Progress:
    """A tqdm bar over steps showing loss and tokens/s; prints plain lines when disabled."""

    def __init__(
        self,
        total: int,
        initial: int = 0,
        *,
        enabled: bool = True,
        every: int = 10,
        quiet: bool = False,
    ):
        """enabled: a tqdm bar, else plain lines every `every` steps; quiet: print nothing."""
        self.every, self.quiet = every, quiet
        self._bar = None
        if enabled:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)
        self._last = initial
        self._t0 = time.perf_counter()

    def update(self, step: int, loss: float, tokens_per_s: float) -> None:
        if self._bar is not None:
            self._bar.update(step - self._last)
            self._bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
        elif step % self.every == 0 and not self.quiet:
            print(f"step {step}: loss {loss:.4f}, {tokens_per_s:,.0f} tokens/s", flush=True)
        self._last = step

    def write(self, msg: str) -> None:
        if self._bar is not None:
            self._bar.write(msg)
        elif not self.quiet:
            print(msg, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.refresh()
            self._bar.close()
            self._bar = None


def batch_crc(batch) -> int:
    """Fingerprint of a batch's content (tokens and image bytes): data order in the logs."""
    crc = zlib.crc32(np.ascontiguousarray(batch["tokens"]).tobytes())
    if "image" in batch:
        crc = zlib.crc32(np.ascontiguousarray(batch["image"]).tobytes(), crc)
    return crc
