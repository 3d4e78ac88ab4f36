"""Test setup: 8 fake CPU devices for the sharding tests (must be set before jax is imported)."""

import os
import sys

# The repository root, for `configs` and `experiments` (not installed packages).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
