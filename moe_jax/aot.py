"""Command line of the ahead-of-time fit check (moe_jax.train.aot): compiles the train step for
a TPU or NVIDIA target on this machine and says whether it fits.

    python -m moe_jax.aot --target=tpu:v5e:1x1 --config=configs/default.py:smoke [--json]
"""

from __future__ import annotations

import json
import os
import pathlib
import sys

from absl import app, flags
from ml_collections import config_flags

_DEFAULT_CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "default.py"
_TARGET = flags.DEFINE_string("target", None, "tpu:<topology> or gpu:<name>x<count>")
_CONFIG = config_flags.DEFINE_config_file(
    "config", str(_DEFAULT_CONFIG), "config file[:variant]; override fields with --config.x=y"
)
_JSON = flags.DEFINE_bool("json", False, "print the report as one JSON object")


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not _TARGET.value:
        raise app.UsageError("--target is required, e.g. --target=tpu:v5e:4x4 or gpu:h100x8")
    # Compile-only devices of another platform: keep jax's own runtime on the CPU.
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
    import jax

    jax.config.update("jax_platforms", "cpu")
    from moe_jax.train import aot
    from moe_jax.train.config import from_config_dict

    try:
        n = len(aot.target_devices(_TARGET.value))  # the mesh is laid over the target's devices
        report = aot.compile_train_step(
            from_config_dict(_CONFIG.value, num_devices=n), _TARGET.value
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(report) if _JSON.value else aot.format_report(report), flush=True)
    sys.exit(0 if report["fits"] else 1)


if __name__ == "__main__":
    app.run(main)
