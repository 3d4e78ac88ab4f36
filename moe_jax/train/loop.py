"""The training loop: resume, step, fetch metrics one step late, checkpoint, eval, plot.

    result = run(config_dict_or_TrainConfig, workdir)            # what train.py calls
    result = Loop(cfg, workdir, preempt, hooks=[my_hook]).run()  # experiments add hooks

Order inside one iteration: draw batch t, dispatch train_step t, then read step t-1's metrics
(the device is already busy with t). Before a checkpoint or an eval at step t the loop reads
step t's metrics too, so every saved checkpoint passed the step's finite check (loss and
gradient norm; a failing step's update is not even applied): the "last good
checkpoint" named by a NaN stop restores finite. The workdir is locked for the run and its
stored config checked before any restore (train.workdir); metrics.jsonl holds each step once.
"""

from __future__ import annotations

import collections
import math
import os
import time
from typing import Protocol

import jax
import numpy as np

from moe_jax import data as data_lib
from moe_jax import model as model_lib
from moe_jax import parallel
from moe_jax.train import memory, multihost, report, writes
from moe_jax.train import metrics as metrics_lib
from moe_jax.train import workdir as workdir_lib
from moe_jax.train.checkpoint import Checkpointer
from moe_jax.train.config import TrainConfig, from_config_dict
from moe_jax.train.metrics import batch_crc
from moe_jax.train.preempt import Preemption
from moe_jax.train.step import (
    NonFiniteLossError,
    StepSpec,
    calibrate_null_state,
    evaluate,
    init_state,
    make_optimizer,
    model_graphdef,
    train_step,
)
from moe_jax.train.writes import WriteFailedError


class Hook(Protocol):
    """Optional callbacks into a run (experiments use them; both methods may be left out).

    on_step(step, metrics): every step, when the loop reads its metrics (one step after it
    was dispatched; `metrics` are the train step's device arrays, the loss already checked).
    on_end(graphdef, state): once after the last step of a finished run (not on preemption),
    with the single-device graphdef and the final train state (also when a finished run is
    rerun: then with the state restored from its last checkpoint).
    """

    def on_step(self, step: int, metrics: dict) -> None: ...

    def on_end(self, graphdef, state) -> None: ...


def run(
    config,
    workdir: str,
    *,
    stop_at: int | None = None,
    hooks=(),
    allow_config_change: bool = False,
) -> dict:
    """Trains ``config`` (ConfigDict or TrainConfig) in ``workdir``; resumes what is there.

    Args:
        config: a ConfigDict from a config file's get_config (validated here), or a TrainConfig.
        workdir: the run's folder: checkpoints, config.json, metrics.jsonl, tb/, plots.
        stop_at: behave as if SIGTERM arrived after this step (save, return "preempted"); the
            schedule still follows config.num_steps, so a later run resumes the same trajectory.
        hooks: objects with on_step / on_end (see Hook).
        allow_config_change: resume even if the config differs from the stored one in fields
            outside workdir.SAFE_TO_CHANGE (also MOE_JAX_ALLOW_CONFIG_CHANGE=1).

    Returns:
        {"status": "done" | "preempted", "step", "final_loss", "eval", "seconds"}; a rerun of a
        finished run returns its stored results with "already_done": True and writes nothing.

    Raises:
        ValueError: an invalid config, naming the field; its subclasses ConfigMismatchError (a
            resume with another config), MemoryEstimateError (too big), WorkdirError.
        NonFiniteLossError: a NaN/Inf loss, gradient or parameter (the step is not applied).
        WorkdirBusyError: another run holds the workdir.
        WriteFailedError: a file of the run could not be written (disk full, quota, ...).
    """
    if not isinstance(config, TrainConfig):
        multihost.initialize(config)  # several processes: before anything touches a device
    cfg = config if isinstance(config, TrainConfig) else from_config_dict(config)
    multihost.check_same_config(workdir_lib.config_json(cfg))
    with Preemption() as preempt:
        return Loop(
            cfg,
            workdir,
            preempt,
            stop_at=stop_at,
            hooks=hooks,
            allow_config_change=allow_config_change,
        ).run()


def summary(cfg: TrainConfig) -> str:
    """The model summary (parameters, FLOPs) plus the data and optimizer settings."""
    d, o = cfg.data, cfg.opt
    tokens = d.batch_size * (cfg.model.num_patches + d.text_len)
    backend = f", expert backend {cfg.moe.backend}" if cfg.moe is not None else ""
    return (
        f"{model_lib.format_summary(cfg.model)}\n"
        f"data: {d.kind}, batch {d.batch_size} ({tokens} tokens/step){backend}; "
        f"{cfg.num_steps} steps of AdamW lr {o.lr:g} ({o.schedule}, warmup {o.warmup_steps})"
    )


class Loop:
    """One run of ``cfg`` in ``workdir``; ``Loop(...).run()`` trains and returns as run() does.

    Args:
        cfg: the validated config (from_config_dict).
        workdir: the run's folder.
        preempt: anything whose ``requested`` turns true to stop (train.preempt.Preemption
            does on SIGTERM / SIGINT): the loop saves at the current step and returns.
        stop_at: stop as if preempted after this step.
        hooks: objects with on_step / on_end (see Hook).
        allow_config_change: as in run().
    """

    def __init__(
        self,
        cfg: TrainConfig,
        workdir: str,
        preempt,
        *,
        stop_at: int | None = None,
        hooks=(),
        allow_config_change: bool = False,
    ):
        self.cfg, self.workdir, self.preempt = cfg, os.path.abspath(workdir), preempt
        self.stop_at, self.allow_config_change = stop_at, allow_config_change
        self.hooks = tuple(hooks)
        self.tokens_per_step = cfg.data.batch_size * (cfg.model.num_patches + cfg.data.text_len)
        self.last_saved: int | None = None
        self._consumed: int | None = None  # the last step whose metrics were read
        self.final_loss = math.nan
        # (step, time) of the last consumed steps: tokens/s over a window of up to 10 steps, so
        # one step read late (its successor then reads at once) does not show a spike.
        self._recent = collections.deque(maxlen=11)
        self.main = multihost.is_main()  # the process that logs, plots and writes bookkeeping
        self.multi = jax.process_count() > 1
        self._agreed_stop = False  # multi-process: some process was signalled (step metrics)

    def run(self) -> dict:
        workdir_lib.check_workdir(self.workdir)
        os.makedirs(self.workdir, exist_ok=True)
        lock = workdir_lib.LOCK_FILE + (f".{jax.process_index()}" if self.multi else "")
        with workdir_lib.WorkdirLock(self.workdir, lock):  # one run per workdir (and process)
            return self._run()

    def _print(self, msg: str) -> None:
        if self.main:
            print(msg, flush=True)

    def _run(self) -> dict:
        cfg, t0 = self.cfg, time.perf_counter()
        if not cfg.ckpt.resume and self.main:  # a fresh start: the workdir holds this run only
            if moved := workdir_lib.move_previous_run(self.workdir):
                self._print(f"ckpt.resume=False: moved the previous run here to {moved}")
        if not cfg.ckpt.resume and self.multi:
            multihost.sync("fresh_start")  # the others wait until process 0 moved it
        self.ckpt = Checkpointer(
            os.path.join(self.workdir, "checkpoints"),
            every_steps=cfg.ckpt.every_steps,
            keep=cfg.ckpt.keep,
            async_save=cfg.ckpt.async_save,
        )
        try:
            # Before anything is restored (or compiled): a resume must use the stored config.
            self.changed = workdir_lib.check_resume_config(
                self.workdir,
                cfg,
                resuming=cfg.ckpt.resume and bool(self.ckpt.steps()),
                allow_change=self.allow_config_change,
            )
            memory.check(cfg)  # a config that cannot fit is refused before anything is made
            self.plain_graphdef, mesh = model_graphdef(cfg), None
            if cfg.mesh is None:
                graphdef, state = init_state(cfg)
            else:  # FSDP + expert parallel: state created sharded, MoE layers in a shard_map
                mesh = parallel.make_mesh(cfg.mesh)
                multihost.process_slice(cfg.data.batch_size, mesh)  # rows == the data shard
                graphdef, state = init_state(cfg, parallel.ExpertParallel(mesh, cfg.mesh))
            return self._train(graphdef, mesh, state, t0)
        except WriteFailedError as err:  # full disk, quota, size limit: save what can be saved
            raise self._after_write_failure(err) from err
        finally:
            if hasattr(self, "progress"):
                self.progress.close()
            self.ckpt.close()
            if hasattr(self, "writer"):
                self.writer.close()

    def _train(self, graphdef, mesh, state, t0: float) -> dict:
        cfg = self.cfg
        shard = dict(process_index=jax.process_index(), process_count=jax.process_count())
        train_iter = data_lib.make_dataset(cfg.data, "train", **shard)  # this process's rows
        start = 0
        if cfg.ckpt.resume and self.ckpt.steps():
            restored = self.ckpt.restore_latest(state, train_iter, changed=self.changed)
            if restored is None:  # every step unreadable: start over from a fresh iterator
                train_iter = data_lib.make_dataset(cfg.data, "train", **shard)
            else:
                start, state = restored
                self.last_saved = start
        report = workdir_lib.read_report(self.workdir)
        if self.main:
            workdir_lib.write_config(self.workdir, cfg)  # the config of the state in memory
        if start >= cfg.num_steps and report is not None:
            return self._already_done(start, state, report, t0)
        self._print(f"moe_jax run '{cfg.name}' in {self.workdir}\n{summary(cfg)}")
        if start:
            self._print(f"resumed from the checkpoint at step {start}")
        metrics_path = os.path.join(self.workdir, "metrics.jsonl")
        if self.main:
            metrics_lib.truncate_after(metrics_path, start)  # the steps after it are replayed
        done_rows = metrics_lib.last_rows_by_step(metrics_lib.read_jsonl(metrics_path))
        if done_rows and done_rows[-1]["step"] == start:
            self.final_loss = done_rows[-1]["loss"]
        self.writer = metrics_lib.MetricWriter(
            self.workdir, tensorboard=cfg.log.tensorboard, enabled=self.main
        )
        self.progress = metrics_lib.Progress(
            cfg.num_steps, start, enabled=cfg.log.progress and self.main, every=cfg.log.every_steps,
            quiet=not self.main,
        )  # fmt: skip
        self.put = None if mesh is None else (
            lambda b: multihost.to_global(b, mesh, cfg.data.batch_size)
        )  # fmt: skip
        tx, schedule = make_optimizer(cfg.opt, cfg.num_steps)
        kw = dict(graphdef=graphdef, tx=tx, schedule=schedule, spec=StepSpec(cfg.opt.grad_accum))
        fail_at = np.int32(cfg.fail_at_step)
        status, step, pending = "done", start, None
        for step in range(start + 1, cfg.num_steps + 1):
            batch = next(train_iter)
            crc = batch_crc(batch)  # of this process's rows
            if self.put is not None:
                batch = self.put(batch)
            if step == 1:  # fresh run: K*rho real experts per token from the first step
                state = calibrate_null_state(graphdef, state, batch)
            flags = multihost.stop_flags(self.preempt.requested, mesh) if self.multi else None
            state, m = train_step(state, batch, fail_at, flags, **kw)
            self._live = (step, state, m, train_iter)  # what a failed write saves (below)
            self.ckpt.check()  # a background save that failed stops the run now
            if pending is not None:
                self._consume(*pending)
            pending = (step, m, crc)
            # Several processes stop at the same step: when one read a signal in the metrics.
            signalled = self._agreed_stop if self.multi else self.preempt.requested
            stop = signalled or step == self.stop_at
            save = self.ckpt.should_save(step) or step == cfg.num_steps or stop
            ev = cfg.log.eval_every and step % cfg.log.eval_every == 0 and step < cfg.num_steps
            if save or ev:
                self._consume(*pending)  # a saved state is always a checked (finite) one
                pending = None
            if save:
                self.ckpt.save(step, state, train_iter)
                self.last_saved = step
            if ev:
                self.writer.write(step, evaluate(cfg, graphdef, state, put=self.put))
                self._recent.clear()  # eval time does not count against tokens/s
            if stop:
                status = "preempted"
                self.progress.write(f"preempted: saved a checkpoint at step {step}; exiting")
                break
        if pending is not None:
            self._consume(*pending)
        self.ckpt.wait()
        self.progress.close()  # the report below prints under a finished bar
        result = {"status": status, "step": step, "final_loss": self.final_loss}
        if status == "done":
            result["eval"] = evaluate(cfg, graphdef, state, put=self.put)
            self.writer.write(step, result["eval"])
            self.writer.flush()
            self._finish(graphdef, state, result)
            self._call_hooks("on_end", self.plain_graphdef, state)
        result["seconds"] = time.perf_counter() - t0
        self._print(f"{status} at step {step} in {result['seconds']:.0f} s")
        return result

    def _after_write_failure(self, err: WriteFailedError) -> WriteFailedError:
        """A write failed: stop logging; unless the failed write was a checkpoint, save the
        current step (its loss checked first); return the error naming what is kept."""
        self.ckpt.mark_failed()
        if hasattr(self, "writer"):
            self.writer.enabled = False
        live = getattr(self, "_live", None)
        if live is not None and not err.checkpoint and live[0] != self.last_saved:
            step, state, m, data_iter = live
            try:
                if self._consumed != step:
                    self._consume(step, m, 0)
                self.ckpt.save(step, state, data_iter)
                self.ckpt.wait()
                self.last_saved = step
            except WriteFailedError:
                pass  # the disk is full for checkpoints too: the last complete one stays
        self.last_saved = self.ckpt.newest_on_disk()
        kept = (
            f"kept the checkpoint at step {self.last_saved} in {self.ckpt.directory}"
            if self.last_saved is not None
            else "no checkpoint of this run was saved"
        )
        return WriteFailedError(
            err.path, f"{err.reason}. Stopped; {kept}; {writes.hint()}", checkpoint=err.checkpoint
        )

    def _already_done(self, step: int, state, report: str, t0: float) -> dict:
        """A rerun of a finished run: prints its stored report, writes nothing, and calls the
        hooks' on_end with the restored final state."""
        self._call_hooks("on_end", self.plain_graphdef, state)
        rows = metrics_lib.read_jsonl(self._path("metrics.jsonl"))
        train_rows, eval_rows = metrics_lib.last_rows_by_step(rows), metrics_lib.eval_rows(rows)
        self._print(
            f"moe_jax run '{self.cfg.name}' in {self.workdir} already finished at step {step} "
            f"(num_steps {self.cfg.num_steps}); nothing to do. Its report:\n{report}"
        )
        return {
            "status": "done",
            "already_done": True,
            "step": step,
            "final_loss": train_rows[-1]["loss"] if train_rows else math.nan,
            "eval": {k: v for k, v in eval_rows[-1].items() if k != "step"} if eval_rows else {},
            "report": report,
            "seconds": time.perf_counter() - t0,
        }

    def _consume(self, step: int, m, crc: int) -> None:
        """Reads step ``step``'s metrics (blocks until it is done), checks that the loss and
        the gradient are finite, logs."""
        cfg = self.cfg
        loss = float(m["loss"])
        now = time.perf_counter()
        if not bool(m["finite"]):
            where = (
                f"step {self.last_saved} in {self.ckpt.directory}"
                if self.last_saved is not None
                else "none (no checkpoint was saved before this step)"
            )
            grad_norm = float(m["grad_norm"])
            what = (
                f"training loss is {loss}" if not math.isfinite(loss) else
                f"gradient norm is {grad_norm}"
            )  # fmt: skip
            raise NonFiniteLossError(
                f"{what} at step {step}; the update was not applied; stopping. "
                f"Last good checkpoint: {where}"
            )
        self.final_loss, self._consumed = loss, step
        if "stop" in m:
            self._agreed_stop = self._agreed_stop or bool(m["stop"])
        self._call_hooks("on_step", step, m)
        tps = math.nan
        if self._recent and step > self._recent[0][0]:
            first_step, first_time = self._recent[0]
            tps = self.tokens_per_step * (step - first_step) / max(now - first_time, 1e-9)
        self._recent.append((step, now))
        if self.main and (step % cfg.log.every_steps == 0 or step == cfg.num_steps):
            host = metrics_lib.to_host(m)
            row = {k: host[k] for k in ("loss", "aux_loss", "lr", "grad_norm")}
            row["tokens_per_s"] = tps
            row["data/crc32"] = crc
            row.update(metrics_lib.flatten_routing(host["moe"], cfg.moe))
            self.writer.write(step, row)
        self.progress.update(step, loss, tps if math.isfinite(tps) else 0.0)

    def _finish(self, graphdef, state, result: dict) -> None:
        """Plots and the closing report (train.report); process 0 only."""
        if self.main:
            report.finish(self, graphdef, state, result)

    def _call_hooks(self, method: str, *args) -> None:
        """Calls ``method`` on every hook that defines it (both Hook methods are optional)."""
        for hook in self.hooks:
            if hasattr(hook, method):
                getattr(hook, method)(*args)

    def _path(self, name: str) -> str:
        return os.path.join(self.workdir, name)
