"""The wheels benchmarks/accelerator.py's train section needs on a device image without them.

The lent GPU image (Python 3.12, jax, flax, optax, orbax-checkpoint, absl-py, etils,
cloudpickle, protobuf, pyyaml, packaging, psutil preinstalled) lacks grain (moe_jax.data),
ml-collections (configs/), array_record (grain's record reader), portpicker (a grain import)
and tensorboardX (moe_jax.train.metrics), and reaches no package index. This downloads those
as Python 3.12 manylinux x86-64 wheels, without their dependencies (the image has them), at
the versions tested here, into one folder that travels with the working tree (the tool `run`,
carry; the whole tree must stay under 64 MiB). --with-tokamax adds tokamax and what it needs
beyond the image (about 36 MiB more, mostly xprof), for the side-by-side columns.

  python benchmarks/wheelhouse.py .whl                 # 5 wheels, about 4.4 MiB
  python benchmarks/wheelhouse.py .whl --with-tokamax  # 16 wheels, about 40 MiB
  echo /.whl/ >> .git/info/exclude                     # keep it out of commits

On the device (benchmarks/accelerator.py's docstring has the whole command line):
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
"""

from __future__ import annotations

import argparse
import pathlib
import subprocess
import sys

# name==version: what the train section imports beyond the image (versions tested here).
TRAIN_WHEELS = (
    "grain==0.2.18",
    "array_record==0.8.6",
    "ml-collections==1.1.0",
    "portpicker==1.6.0",
    "tensorboardX==2.6.5",
)
# tokamax 0.0.17 and its imports that the image lacks (xprof: its profiler hooks; fire and
# termcolor: xprof's command line; pydantic and its core: tokamax's configs; qwix, einshape,
# immutabledict: its kernels).
TOKAMAX_WHEELS = (
    "tokamax==0.0.17",
    "xprof==2.24.2",
    "fire==0.7.1",
    "termcolor==3.3.0",
    "pydantic==2.14.4",
    "pydantic-core==2.50.5",
    "annotated-types==0.8.0",
    "typing-inspection==0.4.5",
    "qwix==0.1.8",
    "einshape==1.0",
    "immutabledict==4.3.1",
)
PLATFORMS = (  # pip matches manylinux tags exactly: list the ones these wheels carry
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_24_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
)
LIMIT_MIB = 40.0  # the working tree (about 3 MiB) and the wheels travel in 64 MiB together


def download(folder: str, with_tokamax: bool = False) -> float:
    """pip-downloads the wheels into `folder`; prints each with its size; returns MiB."""
    out = pathlib.Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    wanted = TRAIN_WHEELS + (TOKAMAX_WHEELS if with_tokamax else ())
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:"]
    cmd += ["--python-version", "3.12", "--implementation", "cp", "-d", str(out)]
    for tag in PLATFORMS:
        cmd += ["--platform", tag]
    subprocess.run(cmd + list(wanted), check=True)
    wheels = sorted(out.glob("*.whl"))
    total = sum(w.stat().st_size for w in wheels) / 2**20
    for w in wheels:
        print(f"{w.stat().st_size / 2**20:8.2f} MiB  {w.name}")
    print(f"{total:8.2f} MiB  in {len(wheels)} wheels in {out}/")
    limit = LIMIT_MIB + (8.0 if with_tokamax else 0.0)
    if total > limit:
        raise SystemExit(f"{out}/ holds {total:.1f} MiB, over {limit:.0f} MiB: remove stale wheels")
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("folder", help="where the wheels go (e.g. .whl, git-ignored)")
    ap.add_argument("--with-tokamax", action="store_true", help="also tokamax and its imports")
    args = ap.parse_args()
    download(args.folder, args.with_tokamax)


if __name__ == "__main__":
    main()
