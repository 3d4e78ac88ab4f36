"""Workdirs cross the supported jax range: a run checkpointed under one end (jax 0.10.2) resumes
under the other (jax 0.12) and the reverse, with its stored config accepted, its data order
kept and its losses on the uninterrupted run's trajectory.

The other end is another Python environment, named by MOE_JAX_PEER_PYTHON (its interpreter with
moe_jax installed). These tests carry the `cross_version` marker, which pyproject deselects by
default; .ci/run installs both environments and runs them with `pytest -m cross_version`, and
they fail (never skip) when selected without a peer.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, STOP = 20, 10
# One training call in a fresh process: the smoke config, `STEPS` steps, optionally stopped
# after `stop` as on SIGTERM. Prints the jax version and the run's result.
DRIVER = f"""
import json, sys
sys.path.insert(0, {ROOT!r})
import jax
from configs import default
from moe_jax import train
c = default.get_config("smoke")
c.num_steps, c.log.progress, c.log.plots = {STEPS}, False, False
stop = int(sys.argv[2]) or None
r = train.run(c, sys.argv[1], stop_at=stop)
print("RESULT", json.dumps({{"jax": jax.__version__, "status": r["status"], "step": r["step"]}}))
"""

pytestmark = [pytest.mark.cross_version, pytest.mark.slow]


def _peer() -> str:
    peer = os.environ.get("MOE_JAX_PEER_PYTHON", "")
    if not peer or not os.path.exists(peer):
        pytest.fail(
            "cross-version tests need MOE_JAX_PEER_PYTHON: the python of an environment with "
            f"moe_jax and the other end's jax installed (got {peer!r}); .ci/run sets it"
        )
    return peer


def _train(python: str, workdir: str, stop: int = 0) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", MOE_JAX_HUGE_PAGES="0")
    env.pop("XLA_FLAGS", None)  # one CPU device, as train.py runs by default
    proc = subprocess.run(
        [python, "-c", DRIVER, workdir, str(stop)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return dict(json.loads(line.removeprefix("RESULT ")), stdout=proc.stdout)


def _rows(workdir: str) -> list[dict]:
    from moe_jax.train import metrics

    path = os.path.join(workdir, "metrics.jsonl")
    return metrics.last_rows_by_step(metrics.read_jsonl(path))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Uninterrupted runs on each end, and runs stopped on one end and resumed on the other."""
    here, peer = sys.executable, _peer()
    out = {}
    for name, first, second in (("peer_to_here", peer, here), ("here_to_peer", here, peer)):
        wd = str(tmp_path_factory.mktemp(name))
        stopped = _train(first, wd, STOP)
        resumed = _train(second, wd)
        straight_wd = str(tmp_path_factory.mktemp(f"{name}_straight"))
        straight = _train(second, straight_wd)
        out[name] = (stopped, resumed, _rows(wd), straight, _rows(straight_wd))
    return out


@pytest.mark.parametrize("direction", ["peer_to_here", "here_to_peer"])
def test_workdir_resumes_across_jax_versions(runs, direction):
    stopped, resumed, rows, straight, straight_rows = runs[direction]
    assert stopped["jax"] != resumed["jax"], "both environments have the same jax"
    assert stopped["status"] == "preempted" and stopped["step"] == STOP
    assert resumed["status"] == "done" and resumed["step"] == STEPS
    assert f"resumed from the checkpoint at step {STOP}" in resumed["stdout"], resumed["stdout"]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    # The grain iterator state crossed too: the same batches as the uninterrupted run.
    assert [r["data/crc32"] for r in rows] == [r["data/crc32"] for r in straight_rows]
    # Restored weights and optimizer state continue the trajectory: after the switch the
    # losses follow the uninterrupted run on the resuming jax (XLA versions differ in the last
    # bits, so closely, not bitwise).
    for a, b in zip(rows[STOP:], straight_rows[STOP:], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=2e-2), (a["step"], a["loss"], b["loss"])
