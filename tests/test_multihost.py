"""train.run across processes: 2 local processes x 4 CPU devices (gloo) on a (data=2, fsdp=2,
expert=2) mesh against one process with 8 devices, a host killed mid-run, a preemption notice
to one host, config disagreement; and per-device parameter bytes against the fsdp size.

The two-process runs are subprocesses of tests/train_multiprocess_worker.py (the config of
train.py's configs/default.py:smoke with the mesh and config.dist fields set).
"""

import atexit
import importlib.util
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile

import jax
import numpy as np
import pytest

from moe_jax import parallel
from moe_jax.train import config as train_config
from moe_jax.train import step as step_lib

_WORKER = pathlib.Path(__file__).with_name("train_multiprocess_worker.py")
_spec = importlib.util.spec_from_file_location("train_worker", _WORKER)
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)


_CACHE = tempfile.mkdtemp(prefix="moe_jax_multihost_cache_")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(workdir, *args):
    """Starts both processes of one run; returns the Popen objects. All launches share one
    persistent compilation cache, so relaunches load the programs the first launch compiled."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # 4 devices from config
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_COMPILATION_CACHE_DIR"] = _CACHE
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    repo = str(pathlib.Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
    port = str(_free_port())
    return [
        subprocess.Popen(
            [sys.executable, str(_WORKER), str(pid), port, str(workdir), *map(str, args)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for pid in range(2)
    ]


def _finish(procs, timeout=600):
    logs = [p.communicate(timeout=timeout)[0] for p in procs]
    return [p.returncode for p in procs], logs


def _losses(workdir):
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _params(workdir):
    with np.load(os.path.join(workdir, "final_params.npz")) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(two-process workdir, one-process workdir) of the same 30-step run."""
    two = tmp_path_factory.mktemp("two_processes")
    one = tmp_path_factory.mktemp("one_process")
    procs = _launch(two)
    from moe_jax import train  # the 8-device reference runs here while the two start up

    assert jax.device_count() == 8
    train.run(worker.config(), str(one), hooks=[worker._Hook(str(one))])
    codes, logs = _finish(procs)
    assert codes == [0, 0], "\n".join(logs)
    return two, one


@pytest.mark.slow
def test_two_processes_match_one_process(runs):
    """Same mesh shape and global batches: only the reduction order of the gloo collectives
    differs from the in-process ones, so float32 sums agree to rounding (measured: losses
    2e-7 relative, parameters 4e-7 absolute after 30 Adam steps); tolerances 1e-5."""
    two, one = runs
    l2, l1 = _losses(two), _losses(one)
    assert sorted(l2) == list(range(1, 31)) == sorted(l1)
    np.testing.assert_allclose([l2[s] for s in l1], [l1[s] for s in l1], rtol=1e-5)
    assert l1[30] < l1[1]
    p2, p1 = _params(two), _params(one)
    assert sorted(p2) == sorted(p1)
    for k in p1:
        np.testing.assert_allclose(p2[k], p1[k], rtol=1e-5, atol=1e-5, err_msg=k)
    config = json.load(open(two / "config.json"))["config"]
    assert config["mesh"]["fsdp"] == 2 and config["dist"]["num_processes"] == 2
    # Each process saved its own data-iterator position with the checkpoint.
    data = sorted(os.listdir(two / "checkpoints" / "30" / "data"))
    assert "process_0-of-2.json" in data and "process_1-of-2.json" in data


@pytest.mark.slow
def test_preempt_one_host_then_kill_one_then_resume(runs, tmp_path):
    """SIGTERM to process 1 at step 8: both stop at the same step, save it and exit 0 (the
    signal travels in the next step's inputs, so that is a step or three later). Relaunched, they
    resume; process 1 is SIGKILLed at step 17 and process 0 is killed by the test (a cluster
    manager's job). Relaunched again, they finish: every step's loss and the final parameters
    equal the uninterrupted two-process run exactly."""
    two, _ = runs
    codes, logs = _finish(_launch(tmp_path, -1, 8))
    assert codes == [0, 0], "\n".join(logs)
    stops = [int(lg.split("preempted at step ")[1].split()[0]) for lg in logs]
    assert stops[0] == stops[1] and 9 <= stops[0] <= 12, stops
    ckpts = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
    assert ckpts[-1] == stops[0]

    procs = _launch(tmp_path, 17)
    assert procs[1].wait(timeout=600) == -9
    procs[0].kill()  # its peer is gone: the cluster manager stops the survivor
    logs = [p.communicate()[0] for p in procs]
    assert f"resumed from the checkpoint at step {stops[0]}" in logs[0], logs[0]
    assert "step 15:" in logs[0]  # process 0 was past step 15 when its peer died
    ckpts = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
    assert stops[0] <= ckpts[-1] < 30, ckpts

    codes, logs = _finish(_launch(tmp_path))
    assert codes == [0, 0], "\n".join(logs)
    assert f"resumed from the checkpoint at step {ckpts[-1]}" in logs[0], logs[0]
    assert _losses(tmp_path) == _losses(two)
    want, got = _params(two), _params(tmp_path)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


@pytest.mark.slow
def test_processes_that_disagree_on_the_config_fail_before_compute(tmp_path):
    procs = _launch(tmp_path, -1, -1, "disagree")
    codes, logs = _finish(procs, timeout=120)
    assert codes[0] != 0 and codes[1] != 0
    assert all("processes disagree on the config" in lg for lg in logs), logs
    assert not (tmp_path / "checkpoints").exists()


def _param_bytes(fsdp, expert):
    c = worker.config(**{"mesh.fsdp": fsdp, "mesh.expert": expert, "mesh.data": -1})
    cfg = train_config.from_config_dict(c)
    ep = parallel.ExpertParallel(parallel.make_mesh(cfg.mesh), cfg.mesh)
    _, state = step_lib.abstract_state(cfg, ep)
    per_dev = parallel.bytes_per_device({"params": state["params"], "opt": state["opt"]})
    return max(per_dev.values()), state, cfg, ep


def test_param_bytes_fall_as_fsdp_grows():
    """Per-device bytes of params + Adam moments, from the shardings, strictly fall as fsdp
    grows (expert fixed), and the state created by init_state has exactly those shards."""
    sizes = {}
    for fsdp in (1, 2, 4):
        sizes[fsdp], state, cfg, ep = _param_bytes(fsdp, 2)
    assert sizes[1] > sizes[2] > sizes[4], sizes
    total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state["params"]))
    assert sizes[4] < 0.5 * 3 * total  # well under a replicated copy of params + 2 moments
    _, real = step_lib.init_state(cfg, ep)  # fsdp=4, expert=2: created sharded
    for a, s in zip(jax.tree.leaves(real), jax.tree.leaves(state)):
        assert a.sharding.is_equivalent_to(s.sharding, len(s.shape))
    w = real["params"]["stack"]["scanned"]["blocks"][0]["ffn"]["w_in"][...]  # [G, N, D, F]
    assert w.addressable_shards[0].data.shape == (
        w.shape[0],
        w.shape[1] // 2,
        w.shape[2] // 4,
        w.shape[3],
    )
    got = parallel.bytes_per_device({"params": real["params"], "opt": real["opt"]})
    assert max(got.values()) == sizes[4]


@pytest.mark.parametrize(
    "overrides, pattern",
    [
        (
            {"mesh.data": 4},
            r"config\.mesh\.data=4 .*4 x 2 x 2 = 16 does not match the device count 8",
        ),
        ({"mesh.fsdp": 3}, r"config\.mesh\.fsdp=3 .*divide the device count 8"),
        ({"mesh.expert": 8, "mesh.fsdp": 1}, r"config\.mesh\.expert=8 .*num_experts=4"),
        ({"mesh.fsdp": 4, "mesh.expert": 4}, r"config\.mesh\.fsdp=4 .*4 x 4 must divide"),
        ({"data.batch_size": 4}, r"config\.data\.batch_size=4 .*2 x 2 x 2 = 8"),
        ({"dist.num_processes": 2, "dist.process_id": 2}, r"config\.dist\.process_id=2"),
        ({"dist.coordinator_address": "localhost"}, r"config\.dist\.coordinator_address"),
    ],
)
def test_bad_mesh_or_dist_is_named_before_compute(tmp_path, overrides, pattern):
    from moe_jax import train

    c = worker.config(**{"mesh.data": -1, **overrides})
    with pytest.raises(ValueError, match=pattern):
        train.run(c, str(tmp_path / "never"))
    assert not (tmp_path / "never").exists()


def _pod_config(variant):
    spec = importlib.util.spec_from_file_location(
        "pod_config", pathlib.Path(__file__).resolve().parents[1] / "configs" / "pod.py"
    )
    pod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pod)
    return train_config.from_config_dict(pod.get_config(variant), num_devices=64)


@pytest.mark.parametrize("variant", ["mixtral", "fine_grained"])
def test_pod_configs_shard_params_and_moments_over_64_chips(variant):
    """The pod configs validate for 64 chips (fsdp 8 x expert 8), and the partition rules cut
    every chip's share of params + two Adam moments to under 1/8 of the whole (non-expert
    weights over fsdp, expert weights over fsdp x expert), counted from the shapes and specs."""
    cfg = _pod_config(variant)
    assert (cfg.mesh.fsdp, cfg.mesh.expert) == (8, 8)
    shapes = jax.eval_shape(lambda: step_lib.nnx.split(
        step_lib.model_lib.Transformer(cfg.model, rngs=step_lib.nnx.Rngs(0)), step_lib.nnx.Param, ...
    )[1])  # fmt: skip
    sizes = {"fsdp": 8, "expert": 8, "data": 1}
    total = per_chip = expert_params = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(shapes):
        spec = parallel.param_spec(path, leaf)
        div = 1
        for axis in spec:
            div *= sizes[axis] if axis else 1
        nbytes = leaf.size * leaf.dtype.itemsize
        total += nbytes
        per_chip += nbytes / div
        if "expert" in spec:
            expert_params += leaf.size
    non_expert = total / 2 - expert_params  # bf16 params
    if variant == "mixtral":  # the estimate: about 1.6B non-expert parameters
        assert 1.5e9 < non_expert < 1.7e9, non_expert
    # Non-expert weights over fsdp (8), expert weights over fsdp x expert (64); only norm
    # scales stay whole (under 0.1%).
    want = 2 * non_expert / 8 + 2 * expert_params / 64
    assert want <= per_chip < 1.001 * want, (per_chip, want)
    assert 3 * per_chip < 16e9  # params + two moments fit a 16 GB v5e chip with room left
