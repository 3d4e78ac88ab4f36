"""Command line of the ahead-of-time fit check (moe_jax.train.aot): compiles the train step for
a TPU or NVIDIA target on this machine and says whether it fits.

    python -m moe_jax.aot --target=tpu:v5e:1x1 --config=configs/default.py:smoke [--json]

Exit status: 0 fits; 3 does not fit (also when XLA stops the compile for want of memory: the
report then gives the arguments' bytes and XLA's required and available figures); 2 bad input
(config, target, a mesh the target's devices do not divide); 4 no verdict: the compiler failed,
or crashed. The compile runs in a child process (this command again, with MOE_JAX_AOT_IN_PROCESS
=1, which also runs it in-process by hand), because a compiler abort inside libtpu ends the
process it runs in; the parent turns such a crash into an error naming the target, the
compiler's last message and what to try. libtpu's multi-process lock is skipped
(ALLOW_MULTIPLE_LIBTPU_LOAD=1): compile-only devices need no TPU, so the check runs beside a
process that holds libtpu (a TPU job, a notebook) and does not block one from starting.
"""

from __future__ import annotations

import collections
import json
import os
import pathlib
import re
import signal
import subprocess
import sys

from absl import app, flags
from ml_collections import config_flags

_DEFAULT_CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "default.py"
_TARGET = flags.DEFINE_string("target", None, "tpu:<topology> or gpu:<name>x<count>")
_CONFIG = config_flags.DEFINE_config_file(
    "config", str(_DEFAULT_CONFIG), "config file[:variant]; override fields with --config.x=y"
)
_JSON = flags.DEFINE_bool("json", False, "print the report as one JSON object")

IN_PROCESS = "MOE_JAX_AOT_IN_PROCESS"  # "1": compile in this process (the child; debugging)
FITS, BAD_INPUT, DOES_NOT_FIT, NO_VERDICT = 0, 2, 3, 4
# Lines of a crashed compile's stderr worth quoting: a failed CHECK or fatal log line of libtpu
# / XLA (glog "F1203 12:00:00.000 ..."), an uncaught C++ exception. (libtpu 0.0.42-0.0.50 also
# abort without a word, e.g. on a std::bad_optional_access in its scatter emitter.)
_LAST_WORDS = re.compile(r"^F\d{4} |Check failed|terminate called|what\(\):")


def _compile(target: str) -> int:
    """Compile and print the report (the child); returns the exit status."""
    import jax

    jax.config.update("jax_platforms", "cpu")  # compile-only devices: jax runs on the CPU
    from moe_jax.train import aot
    from moe_jax.train.config import from_config_dict

    try:
        n = len(aot.target_devices(target))  # the mesh is laid over the target's devices
        report = aot.compile_train_step(from_config_dict(_CONFIG.value, num_devices=n), target)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return BAD_INPUT
    except aot.CompileError as e:
        print(f"error: no verdict: {e}", file=sys.stderr)
        return NO_VERDICT
    print(json.dumps(report) if _JSON.value else aot.format_report(report), flush=True)
    return FITS if report["fits"] else DOES_NOT_FIT


def _crash_verdict(target: str, status: int, stderr_tail) -> str:
    """The error for a child that died without a verdict (signal or an uncaught exception)."""
    if status < 0:
        how = f"crashed ({signal.Signals(-status).name})"
    else:
        how = f"ended with status {status} (traceback above)"
    if any("backend_compile" in ln for ln in stderr_tail):  # Python's stack of the crash
        how += " inside the XLA compiler"
    words = [ln.strip() for ln in stderr_tail if _LAST_WORDS.search(ln)]
    lines = [f"error: no verdict for {target}: the compile {how}"]
    if words:
        lines.append(f"  compiler's last message: {words[0]}")
    if status == -signal.SIGKILL:
        lines.append("  SIGKILL: often this host running out of memory; try a machine with more")
    lines.append(
        "  try: another expert backend (--config.moe.backend=tiled or dense), another mesh "
        "(--config.mesh.expert, --config.mesh.fsdp) or --config.data.batch_size, or another "
        "jax / libtpu release; please report the command with this output"
    )
    return "\n".join(lines)


def _compile_in_child(target: str) -> int:
    """Run this command again in a child process, relay its output and exit status, and turn a
    crash (no status of ours) into a verdict."""
    env = dict(os.environ, **{IN_PROCESS: "1"})
    cmd = [sys.executable, "-m", "moe_jax.aot", *sys.argv[1:]]
    tail = collections.deque(maxlen=400)
    with subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE) as child:
        for line in child.stderr:  # pass stderr through as it comes, keep its tail
            sys.stderr.buffer.write(line)
            sys.stderr.flush()
            tail.append(line.decode(errors="replace"))
    if child.returncode in (FITS, BAD_INPUT, DOES_NOT_FIT, NO_VERDICT):
        return child.returncode
    print(_crash_verdict(target, child.returncode, tail), file=sys.stderr, flush=True)
    return NO_VERDICT


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not _TARGET.value:
        raise app.UsageError("--target is required, e.g. --target=tpu:v5e:4x4 or gpu:h100x8")
    # Compile-only devices of another platform: no CUDA check, no TPU lock (read by libtpu when
    # it initializes, i.e. at the first TPU topology, after this).
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
    os.environ["ALLOW_MULTIPLE_LIBTPU_LOAD"] = "1"
    if os.environ.get(IN_PROCESS) == "1":
        sys.exit(_compile(_TARGET.value))
    sys.exit(_compile_in_child(_TARGET.value))


if __name__ == "__main__":
    app.run(main)
