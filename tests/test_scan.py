"""Scanned layers (ModelConfig.scan_layers): the scanned and unrolled decoders built from the same
key hold the same weights and agree in logits, per-layer aux, gradients, controller state,
null calibration and recorded routing; a moe_every=2 model with a leftover dense block (5
layers: two dense+MoE groups and a tail); the native format loads into either layout; a workdir
of the other layout is refused in one line naming the flag."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import configs.default as default
from moe_jax.core.config import MoEConfig
from moe_jax.hf import load_native, save_native
from moe_jax.model.stack import stack_params, unstack_params
from moe_jax.model.transformer import ModelConfig, Transformer, forward_with_routing
from moe_jax.moe import calibrate_null
from moe_jax.parallel.mesh import param_spec
from moe_jax.train import workdir as wd
from moe_jax.train.config import from_config_dict

MOE = MoEConfig(
    d_model=32,
    d_ff=16,
    num_experts=4,
    top_k=2,
    router="null",
    rho=0.5,
    backend="ragged",
    bias_update_rate=0.01,
    null_bias_update_rate=0.05,
)
CFG = ModelConfig(
    vocab_size=64, d_model=32, n_layers=5, n_heads=2, d_ff=32, moe=MOE, moe_every=2,
    mode="lm", max_len=16,
)  # fmt: skip


def _loss(model, tokens):
    logits, aux = model(tokens)
    return jnp.mean(logits**2) + aux["aux_loss"], (logits, aux)


@nnx.jit
def _train_call(model, tokens):  # one compile per layout: training step, routing, decoding
    calibrate_null(model, tokens)  # each layer's null bias, in forward order
    (_, (logits, aux)), grads = nnx.value_and_grad(_loss, has_aux=True)(model, tokens)
    (full, _), ids = forward_with_routing(model, tokens, deterministic=True)
    cache = model.init_cache(2, 12)
    step, cache = model.prefill(tokens[:, :9], None, cache)
    steps = [step]
    for i in range(9, 12):
        step, cache = model.decode_step(tokens[:, i : i + 1], cache, i)
        steps.append(step)
    return logits, aux["moe"], grads, ids, (jnp.concatenate(steps, axis=1), full)


@pytest.fixture(scope="module")
def pair():
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, 64)
    out = {}
    for scan in (False, True):
        model = Transformer(CFG.replace(scan_layers=scan), rngs=nnx.Rngs(0))
        out[scan] = (model, *_train_call(model, tokens))
    return tokens, out


def _pure(model, *filters):
    return unstack_params(model.cfg, nnx.to_pure_dict(nnx.state(model, *filters)))


def _close(a, b, tol=2e-5):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=tol, rtol=tol), a, b)


def test_scanned_equals_unrolled(pair):
    """Same weights at init; logits, each layer's aux, gradients, the router state after the
    controllers' step and calibration, and the recorded ids (forward order) agree."""
    _, out = pair
    (m0, lg0, aux0, g0, ids0, _), (m1, lg1, aux1, g1, ids1, _) = out[False], out[True]
    assert "stack" in nnx.to_pure_dict(nnx.state(m1)) and not hasattr(m1, "blocks")
    assert len(m1.stack.tail) == 1  # 5 layers, groups of 2: block 4 is the dense tail
    _close(_pure(m0, nnx.Param), _pure(m1, nnx.Param), 0)
    _close(lg0, lg1)
    assert len(aux0) == len(aux1) == len(CFG.moe_layers) == 2
    _close(aux0, aux1)  # per layer: null_ratio, expert_load, per-modality stats, ...
    assert not np.allclose(aux1[0]["expert_load"], aux1[1]["expert_load"])  # not one layer twice
    _close(unstack_params(CFG, nnx.to_pure_dict(g0)), unstack_params(CFG, nnx.to_pure_dict(g1)))
    bias0, bias1 = _pure(m0, nnx.Not(nnx.Param)), _pure(m1, nnx.Not(nnx.Param))
    _close(bias0, bias1)
    b = [bias1["blocks"][i]["ffn"]["selection_bias"] for i in CFG.moe_layers]
    assert not np.allclose(b[0], b[1])  # calibrated and stepped per layer
    assert [n for _, n in ids0] == [n for _, n in ids1] == [4, 4]
    for (a, _), (c, _) in zip(ids0, ids1):
        np.testing.assert_array_equal(a, c)


def test_kv_cache_decode_scanned(pair):
    """prefill + decode_step of the scanned model (its stacked cache, the tail's list) equal
    its forward."""
    decoded, full = pair[1][True][-1]
    _close(decoded, full, 1e-4)


def test_native_format_does_not_depend_on_layout(pair, tmp_path):
    """save_native of one layout loads into the other (every array equal, same logits)."""
    out = pair[1]
    for scan in (False, True):
        src = out[scan][0]
        save_native(src, str(tmp_path / str(scan)))
        dst, cfg = load_native(str(tmp_path / str(scan)), scan_layers=not scan)
        assert cfg.scan_layers is (not scan) and hasattr(dst, "stack") is (not scan)
        _close(_pure(src), _pure(dst), 0)  # every array: so the same function


def test_layout_conversion_and_sharding():
    """stack_params/unstack_params are inverses (tail included); stacked leaves keep their
    logical axes behind an unsplit layer axis."""
    blocks = {i: {"w": np.full((2,), i)} for i in range(5)}
    pure = {"embed": 1, "blocks": blocks}
    st = stack_params(CFG, pure)
    assert st["stack"]["scanned"]["blocks"][1]["w"][:, 0].tolist() == [1, 3]
    assert st["stack"]["tail"][0]["w"][0] == 4
    _close(unstack_params(CFG, st), pure, 0)
    key = jax.tree_util.DictKey
    path = tuple(map(key, ("stack", "scanned", "blocks"))) + (key(1), key("ffn"), key("w_in"))
    assert param_spec(path, jnp.zeros((2, 4, 32, 16))) == P(None, "expert", "fsdp")
    assert param_spec(path[3:], jnp.zeros((4, 32, 16))) == P("expert", "fsdp")


def test_unrolled_workdir_is_refused_naming_the_flag(tmp_path):
    """A workdir from before scanned layers (no model.scan_layers stored) holds unrolled
    blocks: resuming it scanned is refused in one line that names the flag to set."""
    cfg = from_config_dict(default.get_config("smoke"))
    assert cfg.model.scan_layers  # the default
    wd.write_config(str(tmp_path), cfg)
    path = tmp_path / wd.CONFIG_FILE
    data = json.loads(path.read_text())
    del data["config"]["model"]["scan_layers"]
    path.write_text(json.dumps(data))
    with pytest.raises(wd.ConfigMismatchError, match="--config.model.scan_layers=False") as e:
        wd.check_resume_config(str(tmp_path), cfg, resuming=True, allow_change=True)
    assert "\n" not in str(e.value)
    unrolled = dataclasses.replace(cfg, model=cfg.model.replace(scan_layers=False))
    assert wd.check_resume_config(str(tmp_path), unrolled, resuming=True) == []
