"""Test setup: 8 fake CPU devices for the sharding tests (must be set before jax is imported)."""

import os
import sys

# The repository root, for `configs` and `experiments` (not installed packages).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _tokamax_installable() -> tuple[bool, str]:
    """tokamax 0.0.17's own requirements (its wheel metadata): Python >= 3.12, jax >= 0.11.1."""
    import importlib.metadata
    import re

    jax_version = importlib.metadata.version("jax")
    parts = tuple(int(p) for p in re.findall(r"\d+", jax_version)[:3])
    ok = sys.version_info >= (3, 12) and parts >= (0, 11, 1)
    why = f"Python {sys.version.split()[0]}, jax {jax_version}"
    return ok, why


# Whether tokamax can be installed here at all, and this environment in words; the tokamax
# tests (tests/test_tokamax.py) read these too.
TOKAMAX_INSTALLABLE, TOKAMAX_ENV = _tokamax_installable()


def pytest_report_header(config):
    if not TOKAMAX_INSTALLABLE:
        return (
            "tokamax tests deselected: tokamax needs Python >= 3.12 and jax >= 0.11.1 "
            f"({TOKAMAX_ENV}); "
            "test_clear_error_without_tokamax covers this environment"
        )
    return None


def pytest_collection_modifyitems(config, items):
    """Tests of the tokamax backend (those using the `tokamax` fixture) are deselected, not
    skipped, where tokamax cannot be installed at all; the header line says so."""
    if TOKAMAX_INSTALLABLE:
        return
    drop = [it for it in items if "tokamax" in getattr(it, "fixturenames", ())]
    if drop:
        dropped = {id(it) for it in drop}
        items[:] = [it for it in items if id(it) not in dropped]
        config.hook.pytest_deselected(items=drop)
