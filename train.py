"""Train a model from a config file: the command-line entry point of moe_jax.

    python train.py                                        # default config, ./workdir/default
    python train.py --config=configs/default.py:k8_rho025 --workdir=/tmp/k8
    python train.py --config=configs/default.py:smoke --config.num_steps=50
    python train.py --config=configs/default.py --config.moe.rho=0.25 --config.moe.top_k=8

Re-running with the same workdir resumes from its latest complete checkpoint. SIGTERM or Ctrl-C
saves a checkpoint at the current step and exits with status 0 (a second Ctrl-C aborts at once,
status 130); a NaN/Inf loss or a failed write (full disk, quota, ulimit -f: the current step
is saved first where the checkpoint itself can still be written) exits with status 1;
an invalid config or data file prints one line `error: <message naming the field>` and exits
with status 2. Multi-host: the same command on every host with the same --workdir; see
docs/scaling.md (config.dist.* and config.mesh.*). Switching router on the command line (--config.moe.router=topk) drops the
file's null-router moe.rho / moe.num_null_experts unless they are given too
(moe_jax.train.config.cli_overrides).

On Linux the process re-executes itself once with glibc's malloc on transparent huge pages
(GLIBC_TUNABLES=glibc.malloc.hugetlb=1) where the kernel leaves them to madvise: XLA's CPU
runtime maps each step's temp buffer afresh, and faulting it in 4 KiB pages took about a
quarter of the dense default model's step (docs/training.md, "Huge pages"). MOE_JAX_HUGE_PAGES=0 turns
this off.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_HERE = os.path.dirname(os.path.abspath(__file__))


def _unknown_field(err: Exception, argv) -> None:
    """An override of a config field that does not exist (ml_collections raises AttributeError
    / KeyError): one line naming it, status 2."""
    key = str(err).strip("\"'")
    given = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
    bad = [a for a in given if key in a.split(".")] or given
    print(
        f"error: {', '.join(bad)}: the config has no field {key!r} (its fields and their "
        "comments are in the config file, e.g. configs/default.py)",
        file=sys.stderr,
        flush=True,
    )
    sys.exit(2)


try:  # without --config the default file is loaded (and overridden) right here
    _CONFIG = config_flags.DEFINE_config_file(
        "config",
        os.path.join(_HERE, "configs", "default.py"),
        "Config file and optional ':variant[,smoke]' argument; fields override with "
        "--config.x.y=v.",
        lock_config=True,
    )
except (AttributeError, KeyError) as _err:
    _unknown_field(_err, sys.argv)

_WORKDIR = flags.DEFINE_string(
    "workdir",
    None,
    "Output folder (metrics, checkpoints, plots). Default: ./workdir/<config name>.",
)


def _exec_with_huge_pages() -> None:
    """Re-execute this command with glibc.malloc.hugetlb=1 when it can help (see above)."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if os.environ.get("MOE_JAX_HUGE_PAGES", "1") == "0" or "glibc.malloc.hugetlb" in tunables:
        return
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            if "[madvise]" not in f.read():
                return  # [always]: malloc gets them anyway; [never]: nothing to gain
    except OSError:
        return  # not Linux
    env = dict(
        os.environ, GLIBC_TUNABLES=":".join(filter(None, (tunables, "glibc.malloc.hugetlb=1")))
    )
    os.execve(sys.executable, sys.orig_argv, env)


def _parse_flags(argv):
    """absl's flag parsing, with _unknown_field for a bad override."""
    try:
        return app.parse_flags_with_usage(argv)
    except (AttributeError, KeyError) as err:
        _unknown_field(err, argv)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # keep orbax's per-save INFO lines off the console
    from moe_jax import data, train  # after flag parsing: jax reads its env on import

    config = train.config.cli_overrides(
        _CONFIG.value, config_flags.get_override_values(flags.FLAGS["config"])
    )
    workdir = _WORKDIR.value or os.path.join("workdir", config.get("name", "run"))
    try:  # every config and data-file error, before anything is built: one line, status 2
        train.multihost.initialize(config)  # several processes: before any device is touched
        cfg = train.from_config_dict(config)
        train.workdir.check_workdir(workdir)
        train.memory.check(cfg)  # parameters + optimizer + activations vs the memory there is
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    try:
        train.run(cfg, workdir)
    except KeyboardInterrupt:  # a second Ctrl-C (the first one saves and stops cleanly)
        print(
            f"aborted by a second Ctrl-C; {workdir} keeps its last complete checkpoint",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(130)
    except train.WriteFailedError as err:  # full disk, quota, ulimit -f: one line, status 1
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(1)
    except data.ManifestError as err:  # an image changed or damaged after the up-front check
        print(f"error: {err}; {workdir} keeps its last complete checkpoint", file=sys.stderr)
        sys.exit(1)
    except (train.NonFiniteLossError, train.WorkdirVanishedError) as err:
        logging.error("%s", err)
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(1)
    except (
        train.ConfigMismatchError,
        train.CheckpointMismatchError,
        train.WorkdirBusyError,
        train.WorkdirError,
    ) as err:
        # resume refused (another config, a checkpoint of other shapes) or the workdir in use
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    _exec_with_huge_pages()
    app.run(main, flags_parser=_parse_flags)
