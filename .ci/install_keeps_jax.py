"""Installing moe_jax keeps the user's jax: pip dry runs in environments that already hold a
supported jax and its CUDA plugin (a GPU notebook runtime, the NVIDIA image our GPU runs use,
the oldest supported pair), plus: on Python 3.12 and 3.13 a fresh install takes the newest
jax on the index.

Usage: python .ci/install_keeps_jax.py PYTHON311 PYTHON312 [PYTHON313]
Each case builds a scratch virtualenv, installs the jax wheels it starts from without their
dependencies (a dry run only reads them), and asks pip what `pip install -e .[extras]` would
install. Exit status 1 with one line per broken case.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
JAX_FAMILY = ("jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda12-pjrt")
JAX_FAMILY += ("jax-cuda13-plugin", "jax-cuda13-pjrt")

# (name, python, starting wheels, extras to dry-run, packages the dry run must bring at the
# starting jax version)
CASES = [
    (
        "GPU notebook runtime (Python 3.12, jax[cuda12] 0.12.0.1)",
        "py312",
        ["jax==0.12.0.1", "jaxlib==0.12.0.1", "jax-cuda12-plugin==0.12.0.1"]
        + ["jax-cuda12-pjrt==0.12.0.1"],
        ["", "[gpu]", "[aot]"],
        {"[aot]": ["libtpu"]},
    ),
    (
        "NVIDIA image (Python 3.12, jax 0.11.2, CUDA 13 plugin)",
        "py312",
        ["jax==0.11.2", "jaxlib==0.11.2", "jax-cuda13-plugin==0.11.2", "jax-cuda13-pjrt==0.11.2"],
        ["", "[cuda13]", "[tpu]"],
        {"[tpu]": ["libtpu"]},
    ),
    (
        "oldest supported (Python 3.11, jax[cuda12] 0.10.2)",
        "py311",
        ["jax==0.10.2", "jaxlib==0.10.2", "jax-cuda12-plugin==0.10.2", "jax-cuda12-pjrt==0.10.2"],
        ["", "[gpu]", "[aot]"],
        {"[aot]": ["libtpu"]},
    ),
]
# libtpu releases paired with each jax (jax[tpu]'s own pin).
LIBTPU_FOR = {"0.10.2": "0.0.42", "0.11.2": "0.0.48", "0.12.0.1": "0.0.50"}


def _run(*cmd: str) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def _venv(python: str, where: pathlib.Path) -> str:
    _run(python, "-m", "venv", str(where))
    py = str(where / "bin" / "python")
    _run(py, "-m", "pip", "install", "-q", "--upgrade", "pip")
    return py


def _dry_run(py: str, extras: str, report: pathlib.Path) -> dict[str, str]:
    """{name: version} of what `pip install -e .[extras]` would install."""
    _run(
        py, "-m", "pip", "install", "-q", "--dry-run", "--report", str(report), f"-e{ROOT}{extras}"
    )
    items = json.loads(report.read_text())["install"]
    return {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in items}


def main(py311: str, py312: str, py313: str | None = None) -> int:
    pythons = {"py311": py311, "py312": py312}
    errors = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, which, start, extras_list, brings) in enumerate(CASES):
            py = _venv(pythons[which], pathlib.Path(tmp) / f"case{i}")
            _run(py, "-m", "pip", "install", "-q", "--no-deps", *start)
            jax_version = start[0].split("==")[1]
            for extras in extras_list:
                before = len(errors)
                plan = _dry_run(py, extras, pathlib.Path(tmp) / f"report{i}.json")
                changed = sorted(f"{p} {v}" for p, v in plan.items() if p in JAX_FAMILY)
                if changed:
                    errors.append(f"{name}: pip install -e .{extras} would install {changed}")
                for package in brings.get(extras, []):
                    version = plan.get(package)
                    if version is None or not version.startswith(LIBTPU_FOR[jax_version]):
                        errors.append(
                            f"{name}: .{extras} brings {package} {version}, expected the one "
                            f"paired with jax {jax_version} ({LIBTPU_FOR[jax_version]}.*)"
                        )
                status = "ok" if len(errors) == before else "FAIL"
                print(f"{status}: {name}: pip install -e .{extras}", flush=True)
        # Fresh environments on Python >= 3.12: a plain install (and the test one) resolves,
        # taking the newest jax on the index.
        for label, fresh_python in [("3.12", py312)] + ([("3.13", py313)] if py313 else []):
            py = _venv(fresh_python, pathlib.Path(tmp) / f"fresh{label}")
            newest = _run(py, "-m", "pip", "index", "versions", "jax").split("(")[1].split(")")[0]
            for extras in ("", "[test,aot]"):
                plan = _dry_run(py, extras, pathlib.Path(tmp) / f"fresh{label}.json")
                if plan.get("jax") != newest:
                    errors.append(
                        f"fresh Python {label}: pip install -e .{extras} takes jax "
                        f"{plan.get('jax')}, the newest on the index is {newest}"
                    )
                print(
                    f"fresh Python {label}: pip install -e .{extras} takes jax "
                    f"{plan.get('jax')}, flax {plan.get('flax')} (newest jax {newest})"
                )
    for e in errors:
        print("FAIL:", e)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
