"""From a Hugging Face checkpoint to training: the upcycled model keeps the dense logits where
it should (vs the PyTorch forward), the checkpoint's tokenizer round-trips and agrees with
transformers, ArrayRecord windows equal the text kind's and resume exactly, and a few
train steps run from an upcycled checkpoint through the normal config."""

from __future__ import annotations

import json

import hf_models as H
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import default
from moe_jax import hf, train
from moe_jax.core.config import MoEConfig
from moe_jax.data import DataConfig, make_dataset
from moe_jax.data.arrayrecord import convert
from moe_jax.data.hf_tokenizer import HFTokenizer
from moe_jax.train import workdir as workdir_lib


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A Llama checkpoint with its tokenizer, the torch model, and a JSONL corpus."""
    root = tmp_path_factory.mktemp("ckpt")
    model = H.build("llama", seed=1)
    path = H.save(model, str(root / "llama"))
    H.save_tokenizer(path)
    corpus = str(root / "corpus.jsonl")
    with open(corpus, "w") as f:
        for i in range(30):
            f.write(json.dumps({"text": H.CORPUS[i % len(H.CORPUS)]}) + "\n")
    return path, model, corpus


@nnx.jit
def _forward(model, tokens):
    return model(tokens, deterministic=True)[0]


def _logits(model, tokens):
    return np.asarray(_forward(model, jnp.asarray(tokens)))


@pytest.mark.parametrize("router", ["topk", "null"])
def test_upcycled_checkpoint_keeps_dense_logits(ckpt, router):
    """reinit 0, output_scale g, every real expert selected with equal gates 1/N: the MoE
    model gives the PyTorch dense model's logits (moe_jax.hf.upcycle docstring). Null router:
    zero real logits and a selection-only bias of -1e3 on the null logit, so the N+M = 8 slots
    rank the 4 real experts first and K = 4 takes exactly them."""
    path, model, _ = ckpt
    g, n = 2, 4
    null = dict(rho=0.5, null_bias_update_rate=1e-3) if router == "null" else {}
    cfg = MoEConfig(d_model=H.D, d_ff=H.F // g, num_experts=n, top_k=n, router=router, **null)
    moe = hf.upcycle_checkpoint(path, cfg, g, 0.0, rng=jax.random.key(0), output_scale=g)
    tokens = H.tokens(3)
    ref = H.torch_logits(model, tokens)
    # A fresh router (as upcycling draws it) moves the step-0 output away from the dense one.
    assert np.abs(_logits(moe, tokens) - ref).max() > 1e-4
    ffn = moe.stack.scanned.blocks[0].ffn  # every layer's, stacked [G, ...]
    ffn.router.kernel[...] = jnp.zeros_like(ffn.router.kernel[...])
    if router == "null":
        ffn.selection_bias[...] = jnp.zeros((H.L, n + 1)).at[:, n].set(-1e3)
    np.testing.assert_allclose(_logits(moe, tokens), ref, atol=2e-5, rtol=1e-5)
    if router == "null":  # without the bias the null copies win (log M > 0): output differs
        ffn.selection_bias[...] = jnp.zeros((H.L, n + 1))
        assert np.abs(_logits(moe, tokens) - ref).max() > 1e-3


def test_tokenizer_round_trip_and_agrees_with_transformers(ckpt):
    from transformers import AutoTokenizer

    path, _, _ = ckpt
    ours, theirs = HFTokenizer(path), AutoTokenizer.from_pretrained(path)
    assert (ours.bos_id, ours.eos_id) == (theirs.bos_token_id, theirs.eos_token_id) == (1, 2)
    for text in H.CORPUS:
        ids = ours.encode(text, bos=True, eos=True)
        assert ids[0] == ours.bos_id and ids[-1] == ours.eos_id
        plain = theirs(text, add_special_tokens=False)["input_ids"]
        assert ids[1:-1].tolist() == plain
        assert ours.decode(ids[1:]) == text == theirs.decode(plain)
        assert (
            ours.decode(np.concatenate([ids, ours.encode("every token")])) == text
        )  # stops at eos


def _data(kind, paths, tok_path, **kw):
    base = dict(text_len=16, batch_size=4, n_eval=8, tokenizer="hf", tokenizer_path=tok_path)
    return DataConfig(kind=kind, paths=paths, **{**base, **kw})


def _batches(it, n):
    return [next(it)["tokens"].copy() for _ in range(n)]


def test_arrayrecord_windows_equal_text_kind_and_resume(ckpt, tmp_path):
    path, _, corpus = ckpt
    out = str(tmp_path / "train.array_record")
    n = convert([corpus], out, text_len=16, tokenizer=HFTokenizer(path))
    text_cfg, ar_cfg = _data("text", (corpus,), path), _data("arrayrecord", (out,), path)
    assert n >= 16
    # the same windows in the same shuffled order as the text kind (same tokenizer and seed)
    ref = _batches(make_dataset(text_cfg, "train"), 6)
    it = make_dataset(ar_cfg, "train")
    first = _batches(it, 3)
    state = it.get_state()
    rest = _batches(it, 3)
    for a, b in zip(first + rest, ref):
        np.testing.assert_array_equal(a, b)
    again = make_dataset(ar_cfg, "train")
    again.set_state(state)
    for a, b in zip(_batches(again, 3), rest):
        np.testing.assert_array_equal(a, b)
    # eval split: the held-out windows, in order, equal too
    np.testing.assert_array_equal(
        next(make_dataset(ar_cfg, "eval"))["tokens"], next(make_dataset(text_cfg, "eval"))["tokens"]
    )
    bad = _data("arrayrecord", (out,), path, text_len=8)
    with pytest.raises(ValueError, match="text_len=16"):
        make_dataset(bad, "train")


def _config(path, corpus, **over):
    c = default.get_config("lm,smoke")
    c.log.progress, c.log.plots, c.log.tensorboard = False, False, False
    c.num_steps, c.ckpt.every_steps = 4, 0
    c.init.hf, c.init.granularity = path, 2
    c.data.kind, c.data.paths, c.data.n_eval = "text", (corpus,), 8
    c.data.batch_size = 4
    for key, value in over.items():
        section, field = key.split(".")
        c[section][field] = value
    return c


def test_train_steps_from_upcycled_checkpoint(ckpt, tmp_path):
    path, model, corpus = ckpt
    cfg = train.from_config_dict(_config(path, corpus))
    assert (cfg.model.d_model, cfg.model.n_layers, cfg.model.vocab_size) == (H.D, H.L, H.V)
    assert cfg.moe.d_ff == H.F // 2 and cfg.model.rope_scaling == "llama3"
    assert cfg.data.tokenizer == "hf"
    _, state = train.init_state(cfg)
    wq = np.asarray(state["params"]["stack"]["scanned"]["blocks"][0]["attn"]["wq"]["kernel"][1])
    np.testing.assert_array_equal(
        wq, model.model.layers[1].self_attn.q_proj.weight.detach().numpy().T
    )
    losses = []

    class Record:
        def on_step(self, step, metrics):
            losses.append(float(metrics["loss"]))

    result = train.run(cfg, str(tmp_path / "run"), hooks=[Record()])
    assert result["status"] == "done" and len(losses) == 4
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]


@pytest.mark.parametrize(
    "over,named",
    [
        ({"model.mode": "vlm"}, "config.model.mode"),
        ({"init.granularity": 3}, "config.init.granularity"),
        ({"data.tokenizer": "byte"}, "config.data.tokenizer"),
        ({"init.hf": "/nonexistent/ckpt"}, "config.init.hf"),
    ],
)
def test_init_config_errors_name_the_field(ckpt, over, named):
    path, _, corpus = ckpt
    with pytest.raises(ValueError, match=named.replace(".", r"\.")):
        train.from_config_dict(_config(path, corpus, **over))


def test_configs_stored_before_the_new_fields_still_resume():
    """A default config as stored before init / the checkpoint model fields existed compares
    equal to today's default: old workdirs resume."""
    now = workdir_lib.config_json(train.from_config_dict(default.get_config("smoke")))
    old = json.loads(json.dumps(now))
    old.pop("init")
    # model.scan_layers: a stored config without it holds unrolled blocks, and is refused
    # naming the flag (tests/test_scan.py)
    added = [k for k in workdir_lib.ADDED_FIELDS if k not in ("init", "model.scan_layers")]
    for key in [*added, "model.head_dim", "model.moe.null_controller"]:
        *parents, leaf = key.split(".")
        node = old
        for p in parents:
            node = node.get(p) or {}
        node.pop(leaf, None)
    assert "null_kp" not in old["model"]["moe"] and old["dist"] == {}
    old.pop("dist")  # stored configs before multi-host runs have no dist section
    assert workdir_lib.config_diff(old, now) == []
    old["model"]["d_model"] = 2 * now["model"]["d_model"]  # a real difference still shows
    assert [d[0] for d in workdir_lib.config_diff(old, now)][0] == "model.d_model"


def test_dense_init_from_checkpoint_equals_transformers(ckpt):
    """moe.enabled=False with init.hf: the trainer's initial model is the checkpoint itself."""
    path, model, corpus = ckpt
    cfg = train.from_config_dict(_config(path, corpus, **{"moe.enabled": False}))
    assert cfg.model.moe_layers == () and cfg.model.d_ff == H.F
    graphdef, state = train.init_state(cfg)
    dense = nnx.merge(graphdef, state["params"], state["rest"])
    tokens = H.tokens(4, (2, 16))
    np.testing.assert_allclose(_logits(dense, tokens), H.torch_logits(model, tokens), atol=2e-5)


def test_converter_command_line_writes_the_same_windows(ckpt, tmp_path):
    from moe_jax.data import make_arrayrecord
    from moe_jax.data.arrayrecord import WindowRecords, read_meta

    path, _, corpus = ckpt
    a, b = str(tmp_path / "a.array_record"), str(tmp_path / "b.array_record")
    convert([corpus], a, text_len=16, tokenizer=HFTokenizer(path))
    args = [corpus, f"--out={b}", "--text_len=16", f"--tokenizer={path}"]
    assert make_arrayrecord.main(args) == 0
    meta = read_meta(b)
    assert meta["text_len"] == 16 and meta["vocab_size"] == HFTokenizer(path).vocab_size
    ra, rb = (WindowRecords((p,), start=0, length=meta["windows"], text_len=16) for p in (a, b))
    for i in range(meta["windows"]):
        np.testing.assert_array_equal(ra[i]["tokens"], rb[i]["tokens"])
