"""Expert parallelism on 8 fake CPU devices equals the single-device layer.

Each case compiles one jitted value-and-grad (params and input) per mesh; routers x meshes x
backends are covered as a Latin square so every pair appears once without compiling 27 programs.
The EP runs use the dropless buffer (so the equality is exact up to float summation order) and
assert that nothing overflowed; overflow itself has its own tests.
"""

import functools
import importlib.util
import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_jax import MoE, MoEConfig, experts, parallel
from moe_jax.parallel import ep

D, F, N = 16, 32, 8
B, L = 8, 4  # 32 tokens: 4 per shard on 8 shards

CONFIGS = {
    # Null router; the large router std spreads logits so tokens get 0..K real experts.
    "null": dict(router="null", top_k=4, rho=0.5, shared_d_ff=8, router_init_std=1.0),
    "topk": dict(router="topk", top_k=2, activation="gelu", expert_bias=True),
    # gamma = N makes C = T_local, so per-shard capacity drops nothing and one device agrees.
    "threshold": dict(router="threshold", threshold=0.6, router_init_std=1.0),
}
MESHES = [(8, 1, 1), (2, 1, 4), (1, 1, 8), (2, 2, 2), (1, 4, 2), (1, 8, 1)]  # data, fsdp, expert
BACKENDS = ["dense", "ragged", "tiled"]
# Latin square: (router, mesh) -> backend, so each backend meets each router and each mesh.
CASES = [(r, MESHES[m], BACKENDS[(i + m) % 3]) for i, r in enumerate(CONFIGS) for m in range(3)]
# FSDP meshes (expert weights split over "fsdp" too, gathered at the shard_map boundary).
CASES += [(r, MESHES[3 + i], BACKENDS[i]) for i, r in enumerate(CONFIGS)]


def _has_backend(name):
    try:
        experts.get_backend(name)
        return True
    except ValueError:
        return False


def _layer(router, backend="dense", ep_cfg=None, **kw):
    base = dict(d_model=D, d_ff=F, num_experts=N, lb_scope="global", backend=backend)
    cfg = MoEConfig(**{**base, **CONFIGS[router], **kw})
    par = None
    if ep_cfg is not None:
        par = parallel.ExpertParallel(parallel.make_mesh(ep_cfg), ep_cfg)
    return MoE(cfg, rngs=nnx.Rngs(0), parallel=par)


def _inputs(seed=1):
    kx, kc, km = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(kx, (B, L, D))
    ct = jax.random.normal(kc, (B, L, D))  # cotangent for sum(y * ct)
    modality = jax.random.randint(km, (B, L), 0, 2)
    return x, ct, modality


def _loss(gdef, state, x, ct, modality):
    y, aux = nnx.merge(gdef, state)(x, modality)
    return jnp.sum(y * ct) + aux["aux_loss"], (y, aux)


_value_and_grad = jax.jit(jax.value_and_grad(_loss, argnums=(1, 2), has_aux=True), static_argnums=0)


def _run(layer, *args):
    gdef, state = nnx.split(layer)
    (_, (y, aux)), (g_state, g_x) = _value_and_grad(gdef, state, *args)
    return y, aux, g_state, g_x


@functools.cache
def _reference(router):
    return _run(_layer(router, "dense"), *_inputs())


def _assert_tree_close(a, b, what, rtol=2e-5, atol=2e-6):
    for (path, u), v in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(u, v, rtol=rtol, atol=atol, err_msg=f"{what} {path}")


@pytest.mark.parametrize("router,mesh,backend", CASES)
def test_ep_matches_single_device(router, mesh, backend):
    if not _has_backend(backend):
        backend = "ragged"
    ep_cfg = parallel.MeshConfig(
        data=mesh[0], fsdp=mesh[1], expert=mesh[2], buffer_factor="dropless"
    )
    layer = _layer(router, backend, ep_cfg)
    layer_state = parallel.shard_state(nnx.state(layer), layer.parallel.mesh)
    nnx.update(layer, layer_state)  # params stored by the partition rules (fsdp split)
    y, aux, g_state, g_x = _run(layer, *_inputs())
    y0, aux0, g_state0, g_x0 = _reference(router)
    assert float(aux["ep_overflow_fraction"]) == 0.0
    np.testing.assert_allclose(y, y0, rtol=2e-5, atol=2e-6)
    _assert_tree_close({k: aux[k] for k in aux0}, aux0, "aux")
    _assert_tree_close(g_state, g_state0, "grad")
    np.testing.assert_allclose(g_x, g_x0, rtol=2e-5, atol=2e-6)
    # Null slots never travel: rows sent == real assignments.
    np.testing.assert_allclose(aux["ep_rows_sent"], aux0["num_real"])
    if router == "null":
        assert 0.0 < float(aux0["null_ratio"]) < 1.0


def test_threshold_capacity_is_per_shard():
    """With small gamma, capacity drops happen per shard: EP equals one device run on each
    shard's chunk separately (as XMoE computes C from its local batch). Aux losses are off so
    the input gradients compare too (their batch scope differs by design)."""
    kw = dict(capacity_factor=1.0, min_capacity=1, lb_coef=0.0, z_coef=0.0)
    ep_cfg = parallel.MeshConfig(data=2, expert=4, buffer_factor="dropless")
    x, ct, modality = _inputs(2)
    y, aux, _, g_x = _run(_layer("threshold", "ragged", ep_cfg, **kw), x, ct, modality)
    chunk = B // 8
    ref = _layer("threshold", "ragged", **kw)
    ys, gxs = [], []
    for s in range(8):
        sl = slice(s * chunk, (s + 1) * chunk)
        yc, auxc, _, gxc = _run(ref, x[sl], ct[sl], modality[sl])
        ys.append(yc)
        gxs.append(gxc)
    assert float(aux["drop_fraction"]) > 0.05
    np.testing.assert_allclose(y, jnp.concatenate(ys), rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(g_x, jnp.concatenate(gxs), rtol=2e-5, atol=2e-6)


def test_selection_bias_matches_single_device():
    """Selection-only router biases (per-expert and null-ratio controller): EP selects with the
    same bias and, from the global statistics, applies the same update as one device."""
    kw = dict(bias_update_rate=1e-2, null_bias_update_rate=1e-2)
    mc = parallel.MeshConfig(data=2, expert=4, buffer_factor="dropless")
    x, _, modality = _inputs()

    @functools.partial(jax.jit, static_argnums=0)
    def fwd(gdef, state, x, modality):
        layer = nnx.merge(gdef, state)
        y, aux = layer(x, modality)
        return y, aux, nnx.state(layer)

    outs = []
    for ep_cfg in (None, mc):
        layer = _layer("null", "ragged", ep_cfg, **kw)
        bias = jax.random.normal(jax.random.key(3), layer.selection_bias[...].shape)
        layer.selection_bias[...] = bias
        outs.append(fwd(*nnx.split(layer), x, modality))
    (y0, aux0, s0), (y, aux, s) = outs
    np.testing.assert_allclose(y, y0, rtol=2e-5, atol=2e-6)
    _assert_tree_close({k: aux[k] for k in aux0}, aux0, "aux")
    np.testing.assert_allclose(s["selection_bias"][...], s0["selection_bias"][...], atol=1e-7)


def _forced_router(layer, expert):
    """Router kernel sending every token to `expert` first (inputs are all-positive)."""
    k = np.zeros(layer.router.kernel[...].shape, np.float32)
    k[:, expert] = 1.0
    layer.router.kernel[...] = jnp.asarray(k)


def test_all_null_batch():
    """Every slot null: output exactly 0, nothing sent, zero expert gradients, no NaN."""
    layer = _layer("null", "ragged", parallel.MeshConfig(2, 4, buffer_factor=2.0), shared_d_ff=0)
    _forced_router(layer, N)  # the null logit wins everywhere
    x = jnp.abs(_inputs()[0]) + 0.1
    y, aux, g_state, g_x = _run(layer, x, *_inputs()[1:])
    assert float(jnp.max(jnp.abs(y))) == 0.0
    assert float(aux["ep_rows_sent"]) == 0.0 and float(aux["ep_overflow_fraction"]) == 0.0
    assert float(aux["null_ratio"]) == 1.0 and float(aux["zero_compute_fraction"]) == 1.0
    assert float(jnp.max(jnp.abs(g_state["w_in"][...]))) == 0.0
    assert all(bool(jnp.all(jnp.isfinite(v))) for v in jax.tree.leaves((g_state, g_x)))


@pytest.mark.parametrize("factor", ["dropless", 1.0])
def test_one_expert_gets_every_token(factor):
    """Top-1 routing of every token to expert 5 (owned by expert-shard 2 of 4). Dropless equals
    one device; a small buffer sends the first Cb rows of each shard and counts the rest, whose
    tokens get exactly 0 (nothing is silently lost)."""
    kw = dict(top_k=1, activation="swiglu", expert_bias=False)
    x = jnp.abs(_inputs()[0]) + 0.1
    args = (x, *_inputs()[1:])
    ref = _layer("topk", "ragged", **kw)
    _forced_router(ref, 5)
    y0 = _run(ref, *args)[0]
    ep_cfg = parallel.MeshConfig(data=2, expert=4, buffer_factor=factor)
    layer = _layer("topk", "ragged", ep_cfg, **kw)
    _forced_router(layer, 5)
    y, aux, _, _ = _run(layer, *args)
    np.testing.assert_allclose(aux["expert_load"][5], 1.0)
    t_loc = B * L // 8
    if factor == "dropless":
        assert float(aux["ep_overflow_fraction"]) == 0.0
        np.testing.assert_allclose(y, y0, rtol=2e-5, atol=2e-6)
        return
    cb = parallel.buffer_rows(layer.config, ep_cfg, t_loc, 4, train=True)
    assert cb == t_loc // 4  # ceil(1.0 * T_loc * K / EP)
    np.testing.assert_allclose(aux["ep_overflow_fraction"], (t_loc - cb) / t_loc)
    np.testing.assert_allclose(aux["ep_rows_sent"], 8 * cb)
    y, y0 = y.reshape(8, t_loc, D), y0.reshape(8, t_loc, D)
    np.testing.assert_allclose(y[:, :cb], y0[:, :cb], rtol=2e-5, atol=2e-6)
    assert float(jnp.max(jnp.abs(y[:, cb:]))) == 0.0


def _emulated_ragged_all_to_all(
    operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *, axis_name
):
    """ragged_all_to_all semantics on CPU: padded chunks, tiled all_to_all, scatter at the
    receiver-side offsets (exchanged so each receiver knows where its chunks go)."""
    m = operand.shape[0]
    r = jnp.arange(m)
    src = jnp.clip(input_offsets[:, None] + r[None, :], 0, m - 1)  # [P, m]
    packed = jnp.where((r[None, :] < send_sizes[:, None])[..., None], operand[src], 0)
    recv = jax.lax.all_to_all(packed, axis_name, 0, 0, tiled=True)  # [P, m, D]
    offs = jax.lax.all_to_all(output_offsets, axis_name, 0, 0, tiled=True)  # [P]
    dst = jnp.where(r[None, :] < recv_sizes[:, None], offs[:, None] + r[None, :], output.shape[0])
    return output.at[dst.reshape(-1)].set(recv.reshape(-1, operand.shape[1]), mode="drop")


def test_ragged_exchange_matches_padded(monkeypatch):
    """The ragged path's offsets and sizes (run through a CPU emulation of the collective) give
    the same values, gradients and overflow counts as the padded all_to_all."""
    monkeypatch.setattr(ep, "_ragged_all_to_all", _emulated_ragged_all_to_all)
    outs = {}
    for kind in ("padded", "ragged"):
        ep_cfg = parallel.MeshConfig(data=2, expert=4, buffer_factor=1.0, exchange=kind)
        outs[kind] = _run(_layer("null", "ragged", ep_cfg), *_inputs())
    assert float(outs["padded"][1]["ep_overflow_fraction"]) > 0  # the small buffer overflows
    _assert_tree_close(outs["ragged"], outs["padded"], "ragged vs padded")


def test_explicit_axes_mesh():
    mc = parallel.MeshConfig(data=2, expert=4, buffer_factor="dropless")
    explicit = (jax.sharding.AxisType.Explicit,) * 3
    layer = _layer("topk", "ragged")
    layer.parallel = parallel.ExpertParallel(parallel.make_mesh(mc, axis_types=explicit), mc)
    gdef, state = nnx.split(layer)
    x = _inputs()[0]
    y = jax.jit(lambda s, x: nnx.merge(gdef, s)(x)[0])(state, x)
    np.testing.assert_allclose(y, _reference("topk")[0], rtol=2e-5, atol=2e-6)


def test_param_and_batch_placement():
    mesh = parallel.make_mesh(parallel.MeshConfig(data=2, expert=4))
    state = parallel.shard_state(nnx.state(_layer("null")), mesh)
    assert state["w_in"][...].sharding.spec == jax.sharding.PartitionSpec("expert", "fsdp")
    assert state["router"]["kernel"][...].sharding.spec == jax.sharding.PartitionSpec("fsdp")
    assert len(state["w_in"][...].addressable_shards[0].data) == N // 4
    xb = parallel.shard_batch(_inputs()[0], mesh)
    assert xb.addressable_shards[0].data.shape == (B // 8, L, D)
    assert parallel.process_rows(B, mesh) == slice(0, B)  # one process owns every row
    assert parallel.init_distributed() is False  # nothing configured: single process


def test_clear_errors():
    with pytest.raises(ValueError, match="does not match the device count"):
        parallel.make_mesh(parallel.MeshConfig(data=2, expert=2))
    with pytest.raises(ValueError, match="does not match the device count"):
        parallel.make_mesh(parallel.MeshConfig(data=1, expert=2, fsdp=2))
    with pytest.raises(ValueError, match="does not divide the device count"):
        parallel.make_mesh(parallel.MeshConfig(expert=3))
    with pytest.raises(ValueError, match="fsdp x expert = 3 x 1"):
        parallel.make_mesh(parallel.MeshConfig(fsdp=3))
    with pytest.raises(ValueError, match=r"MeshConfig\.fsdp=0"):
        parallel.MeshConfig(fsdp=0)
    with pytest.raises(ValueError, match="buffer_factor"):
        parallel.MeshConfig(buffer_factor=0)
    with pytest.raises(ValueError, match="exchange"):
        parallel.MeshConfig(exchange="nccl")
    with pytest.raises(ValueError, match="unknown partition spec"):
        parallel.spec("fsdp")
    bad_mesh = jax.make_mesh((8,), ("batch",), axis_types=(jax.sharding.AxisType.Auto,))
    with pytest.raises(ValueError, match="needs mesh axes"):
        parallel.ExpertParallel(bad_mesh)
    mc = parallel.MeshConfig(data=2, expert=4)
    x = _inputs()[0]
    with pytest.raises(ValueError, match="num_experts=6 is not divisible"):
        _layer("topk", num_experts=6, ep_cfg=mc)(x)
    with pytest.raises(ValueError, match="batch size 4 is not divisible"):
        _layer("topk", ep_cfg=mc)(x[:4])
    with pytest.raises(ValueError, match="not mesh axes"):
        _layer("topk", ep_cfg=mc, lb_axis_name="model")(x)


# ---------------------------------------------------------------------------------------------
# Two processes x 2 CPU devices, one mesh through jax.distributed.
# ---------------------------------------------------------------------------------------------
_WORKER = pathlib.Path(__file__).with_name("ep_multiprocess_worker.py")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_like_one_device(tmp_path):
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    repo = str(pathlib.Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
    out = tmp_path / "losses.json"
    procs = [
        subprocess.Popen(
            [sys.executable, str(_WORKER), str(pid), "2", str(port), str(out)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for pid in range(2)
    ]
    # The single-device reference runs here while the two processes start up.
    spec = importlib.util.spec_from_file_location("ep_worker", _WORKER)
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    want = worker.train_losses(mesh=None)
    logs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)
    got = json.loads(out.read_text())
    assert got["num_devices"] == 4 and got["num_processes"] == 2
    np.testing.assert_allclose(got["losses"], want, rtol=1e-5)
    assert want[-1] < want[0]
