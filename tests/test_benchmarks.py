"""The benchmark helpers measure what they claim (no timing is asserted): the profiler
breakdown attributes a program's ops to the named scopes they were traced under; and
benchmarks/accelerator.py runs every section (smoke, on CPU), keeps going past a failing one,
and runs its kernel and layer sections without the packages the device image lacks."""

import json
import pathlib
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import accelerator  # noqa: E402
import profile_scopes  # noqa: E402
import wheelhouse  # noqa: E402


def test_scope_shares_follow_the_named_scopes():
    # "big" holds 64x the matmul work of "small"; the rest is a cheap reduction.
    @jax.jit
    def f(a, b):
        with jax.named_scope("big"):
            x = jnp.tanh(a @ a)  # [512, 512] @ [512, 512]
        with jax.named_scope("small"):
            y = jnp.tanh(b @ b)  # [128, 128] @ [128, 128]
        return jnp.sum(x) + jnp.sum(y)

    a, b = jnp.ones((512, 512)) * 1e-3, jnp.ones((128, 128)) * 1e-3
    compiled = f.lower(a, b).compile()
    cats = (("big", ("big",)), ("small", ("small",)))
    shares = profile_scopes.scope_shares(
        compiled, lambda: jax.block_until_ready(compiled(a, b)), cats, calls=3
    )
    assert set(shares) == {"big", "small", "rest"}
    assert abs(sum(shares.values()) - 1.0) < 1e-6
    assert shares["big"] > 0.5 and shares["big"] > 4 * shares["small"] > 0


def test_categorize_matches_whole_scope_names():
    cats = (("combine", ("combine",)), ("router", ("route", "router_logits")))
    assert profile_scopes.categorize("jit(f)/transpose(jvp(route))/top_k", cats) == "router"
    assert profile_scopes.categorize("jit(f)/experts/while/body/combine/add", cats) == "combine"
    assert profile_scopes.categorize("jit(f)/routed/dot", cats) == "rest"  # not a prefix match


# --- benchmarks/accelerator.py ---------------------------------------------------------------
BENCHMARKS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"
# What the lent GPU image lacks: the kernel and layer sections must not import any of it.
TRAIN_ONLY = ("grain", "ml_collections", "array_record", "tensorboardX")
_RUN = """
import importlib.abc, runpy, sys
blocked, script = set(sys.argv[1].split(",")) - {""}, sys.argv[2]

class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in blocked:
            raise ImportError(f"{name} is blocked by the test")

sys.meta_path.insert(0, Blocker())
sys.path.insert(0, sys.argv[3])
sys.argv = [script, *sys.argv[4:]]
runpy.run_path(script, run_name="__main__")
"""


def _smoke(tmp_path, *args, blocked=()) -> dict:
    """accelerator.py --smoke in a fresh process (CPU, interpret mode); its JSON."""
    out = tmp_path / "accelerator.json"
    script = str(BENCHMARKS / "accelerator.py")
    cmd = [sys.executable, "-c", _RUN, ",".join(blocked), script, str(BENCHMARKS)]
    t0 = time.perf_counter()
    proc = subprocess.run(
        [*cmd, "--smoke", "--json", str(out), *args], capture_output=True, text=True, timeout=1200
    )
    print(f"accelerator.py --smoke {' '.join(args)}: {time.perf_counter() - t0:.0f} s")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_accelerator_smoke_runs_every_section(tmp_path):
    data = _smoke(tmp_path)
    assert data["finished"] and data["meta"]["smoke"]
    assert list(data["sections"]) == list(accelerator.SECTIONS)
    for name, sec in data["sections"].items():
        assert sec["status"] == "ok", (name, sec.get("error"))
        assert not sec["errors"] and not sec["skipped"], name
    correctness = data["sections"]["correctness"]["summary"]
    assert correctness["all_ok"] and correctness["checks"] >= 20, correctness
    assert all(correctness["backends"][n] for n in ("dense", "ragged", "tiled", "pallas"))
    gmm = data["sections"]["gmm"]
    points = [p for p in gmm["items"].values() if "shape" in p]
    assert points and all({"gmm", "dense", "ragged", "tgmm"} <= set(p["tflops"]) for p in points)
    assert "gmm/dense" in points[0]["ratios"]
    (layer,) = data["sections"]["layer"]["items"].values()
    assert {r["section"] for r in layer["ratios"]} >= {"1 rho sweep", "2 iso-FLOP"}
    train = data["sections"]["train"]["summary"]["variants"]
    assert set(train) == {"dense", "K^4_0.5"}
    assert all(r["tokens_per_s"] > 0 and r["ratio_to_dense"] > 0 for r in train.values())
    assert all(r["mfu"] is None for r in train.values())  # no peak for a CPU


@pytest.mark.slow
def test_accelerator_kernel_and_layer_sections_need_no_training_packages(tmp_path):
    data = _smoke(tmp_path, "--sections", "gmm,layer,train", blocked=TRAIN_ONLY)
    for name in ("gmm", "layer"):
        sec = data["sections"][name]
        assert sec["status"] == "ok" and not sec["errors"], (name, sec)
    train = data["sections"]["train"]  # needs grain: fails, recorded, after the others ran
    assert train["status"] == "error" and "blocked by the test" in train["error"]
    assert data["finished"]


def test_a_failing_section_is_recorded_and_the_next_still_runs(tmp_path):
    path = tmp_path / "run.json"
    runner = accelerator.Runner(str(path), {"device_kind": "test"})

    def broken(sec):
        sec.item("first", lambda: {"value": 1.0})
        raise RuntimeError("section broke")

    def partly(sec):
        sec.item("bad", lambda: 1 / 0)
        sec.item("good", lambda: {"value": float("nan")})  # non-finite -> null in the JSON
        return {"done": True}

    runner.section("a", broken, 60.0)
    runner.section("b", partly, 60.0)
    runner.section("c", lambda sec: sec.item("late", lambda: 1), 0.0)  # budget spent at once
    data = json.loads(path.read_text())["sections"]
    assert data["a"]["status"] == "error" and "section broke" in data["a"]["error"]
    assert data["a"]["items"] == {"first": {"value": 1.0}}  # saved before the failure
    assert data["b"]["status"] == "ok" and data["b"]["summary"] == {"done": True}
    assert "ZeroDivisionError" in data["b"]["errors"]["bad"]
    assert data["b"]["items"]["good"] == {"value": None}
    assert data["c"]["skipped"] == ["late"] and "budget" in data["c"]["note"]


def test_peak_table_covers_the_lent_and_common_chips():
    peak = lambda kind: accelerator.peak_tflops(kind)[0]  # noqa: E731
    assert peak("NVIDIA H200") == peak("NVIDIA H100 80GB HBM3") == 989.0
    assert peak("NVIDIA H100 PCIe") == 756.0 and peak("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak("TPU v5 lite") == 197.0 and peak("TPU v5") == 459.0
    assert peak("TPU v6 lite") == 918.0
    assert peak("cpu") is None and peak("NVIDIA H200 NVL") is None and peak("Tesla T4") is None


def test_wheelhouse_brings_every_blocked_module():
    names = {w.split("==")[0].lower().replace("-", "_") for w in wheelhouse.TRAIN_WHEELS}
    assert {m.lower() for m in TRAIN_ONLY} <= names
