"""A config that cannot fit is refused before anything is allocated, naming both figures
(moe_jax.train.memory): the estimate is a lower bound built from the config alone."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from test_training import smoke  # noqa: E402

from moe_jax import train as training  # noqa: E402
from moe_jax.train import memory  # noqa: E402


def _nbytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def test_parameter_and_optimizer_parts_equal_the_real_state():
    cfg = training.from_config_dict(smoke())
    est = memory.estimate(cfg)
    state = jax.eval_shape(lambda: training.init_state(cfg)[1])  # shapes only, no arrays
    assert est["parameters"] == _nbytes(state["params"])
    moments = _nbytes(state["opt"])  # AdamW mu and nu (+ a few scalars)
    assert est["optimizer"] <= moments <= est["optimizer"] * 1.01
    assert est["total"] == pytest.approx(sum(v for k, v in est.items() if k != "total"))


def test_sharding_divides_the_state_and_data_parallel_the_activations():
    c = smoke()
    c.mesh.expert, c.mesh.fsdp = 2, 2
    one = memory.estimate(training.from_config_dict(smoke()))
    four = memory.estimate(training.from_config_dict(c), n_devices=8)
    assert four["parameters"] == pytest.approx(one["parameters"] / 4)
    assert four["activations"] == pytest.approx(one["activations"] / 2)  # data = 8 / 4


class _Device:
    def __init__(self, platform, limit):
        self.platform, self.device_kind, self._limit = platform, "TPU v5 lite", limit

    def memory_stats(self):
        return {"bytes_limit": self._limit}


def test_too_big_is_refused_naming_both_figures_and_the_fields():
    cfg = training.from_config_dict(smoke(**{"moe.num_experts": 1_000_000}))
    with pytest.raises(memory.MemoryEstimateError) as err:
        memory.check(cfg, [_Device("tpu", 16 << 30)])
    msg = str(err.value)
    need = memory.estimate(cfg)["total"] / memory.GIB
    assert f"at least {need:.2f} GiB per device" in msg and "TPU v5 lite memory is 16.00 GiB" in msg
    assert "moe.num_experts" in msg and memory.SKIP_ENV in msg


def test_what_fits_passes_and_the_host_figure_is_real(monkeypatch):
    cfg = training.from_config_dict(smoke())
    assert memory.check(cfg)["total"] > 0  # the smoke run fits this host
    have, what = memory.available(jax.devices()[0])
    assert have is not None and 0 < have < 1 << 50 and "host memory" in what
    big = training.from_config_dict(smoke(**{"moe.num_experts": 1_000_000}))
    monkeypatch.setenv(memory.SKIP_ENV, "1")
    assert memory.check(big) == {}


def test_train_py_refuses_a_million_experts_in_seconds(tmp_path):
    """Was: OOM-killed without a word (exit 137 at 24 GB)."""
    cmd = [sys.executable, "train.py", f"--workdir={tmp_path / 'run'}"]
    cmd += ["--config.moe.num_experts=1000000"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    (line,) = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert "the config needs at least" in line and "free host memory" in line, line
    assert not os.path.exists(tmp_path / "run")  # refused before the workdir was made
