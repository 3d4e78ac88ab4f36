"""The jax versions this distribution (moe_jax and kernels_pallas) supports, checked at import.

A jax outside the range fails here with one message naming the installed and the supported
versions, instead of obscurely inside a kernel lowering or a Flax call. CI runs the full test
suite at both ends of the range (docs/install.md, "Supported versions"). Set MOE_JAX_SKIP_VERSION_CHECK=1
to try an unsupported jax anyway.
"""

from __future__ import annotations

import os
import re
from importlib import metadata

# Inclusive lower bound, exclusive upper bound; setup.py pins the same range.
MIN_JAX = (0, 10, 2)
MAX_JAX = (0, 13)


def parse(version: str) -> tuple[int, ...]:
    """The leading numeric release of a version string: "0.12.0.1" -> (0, 12, 0, 1),
    "0.13.0.dev20261201" -> (0, 13, 0)."""
    m = re.match(r"^\s*(\d+(?:\.\d+)*)", version)
    if m is None:
        raise ValueError(f"cannot read the version {version!r}")
    return tuple(int(p) for p in m[1].split("."))


def supported_range() -> str:
    """The supported range as text, e.g. ">=0.10.2,<0.13"."""
    return f">={'.'.join(map(str, MIN_JAX))},<{'.'.join(map(str, MAX_JAX))}"


def check(jax_version: str, jaxlib_version: str) -> None:
    """Raise ImportError when jax or jaxlib is outside the supported range."""
    for name, version in (("jax", jax_version), ("jaxlib", jaxlib_version)):
        if not MIN_JAX <= parse(version) < MAX_JAX:
            raise ImportError(
                f"moe_jax supports {name}{supported_range()}, but {name} {version} is "
                f"installed. Install a supported one (pip install 'jax{supported_range()}' "
                "with its jaxlib and CUDA/TPU plugin), or set MOE_JAX_SKIP_VERSION_CHECK=1 to "
                "try this one anyway."
            )


def check_installed() -> None:
    """check() on the installed jax and jaxlib (skipped with MOE_JAX_SKIP_VERSION_CHECK=1)."""
    if os.environ.get("MOE_JAX_SKIP_VERSION_CHECK", "").strip() in ("1", "true", "yes"):
        return
    # Read from the installed distributions: importing a mismatched jax may itself fail.
    try:
        versions = metadata.version("jax"), metadata.version("jaxlib")
    except metadata.PackageNotFoundError as e:
        raise ImportError(f"moe_jax needs jax{supported_range()} and its jaxlib: {e}") from e
    check(*versions)
