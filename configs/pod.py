"""Pod-scale configs: text LMs upcycled-Mixtral-shaped or fine-grained, FSDP + expert parallel.

get_config(arg): one variant, optional modifiers, comma-separated.
Variants:
  mixtral       D=4096, 32 layers, GQA 32/8 heads, vocab 32000, N=8 experts of F=14336 in every
                block, null router K^4_0.5 (E[K]=2); mesh fsdp=8 x expert=8 (64 chips)
  fine_grained  D=2048, 24 layers, GQA 16/8 heads, vocab 32000, N=64 experts of F=1408, null
                router K^8_0.5 (E[K]=4); mesh fsdp=8 x expert=8 (64 chips)
A quick compile of the same shapes at lower depth: --config.model.n_layers=2.
Both use bf16 parameters and compute, remat of every block and sequences of 2048 tokens; the
data section is a placeholder for the AOT fit check (it only fixes the batch shapes): to
train, point it at your text with --config.data.kind=text --config.data.paths=...

Compile and check the fit from any machine (python -m moe_jax.aot; docs/scaling.md has the
measured table):
  python -m moe_jax.aot --target=tpu:v5p:4x4x4 --config=configs/pod.py:mixtral
  python -m moe_jax.aot --target=tpu:v5e:8x8 --config=configs/pod.py:fine_grained
Train on a TPU pod (the same command on every worker; jax finds the other hosts):
  gcloud compute tpus tpu-vm ssh $TPU --worker=all --command="cd moe_jax && \\
    python train.py --config=configs/pod.py:mixtral --config.data.kind=text \\
    --config.data.paths=/data/train.txt --workdir=gs-fuse-or-nfs/run1"
"""

from __future__ import annotations

import importlib.util
import pathlib

import ml_collections

_spec = importlib.util.spec_from_file_location(
    "moe_jax_configs_default", pathlib.Path(__file__).with_name("default.py")
)
_default = importlib.util.module_from_spec(_spec)  # configs/default.py: every field's comment
_spec.loader.exec_module(_default)

VARIANTS = ("mixtral", "fine_grained")
MODIFIERS: tuple[str, ...] = ()


def _parse(arg: str | None) -> tuple[str, set[str]]:
    parts = [p.strip() for p in (arg or "mixtral").split(",") if p.strip()]
    mods = {p for p in parts if p in MODIFIERS}
    rest = [p for p in parts if p not in MODIFIERS]
    if len(rest) != 1 or rest[0] not in VARIANTS:
        raise ValueError(
            f"config arg {arg!r} is invalid: expected one variant of {VARIANTS} "
            f"plus optional modifiers {MODIFIERS}, comma-separated"
        )
    return rest[0], mods


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant, mods = _parse(arg)
    c = _default.get_config("lm")  # text-only LM variant of configs/default.py
    c.name = "_".join(["pod", variant, *sorted(mods)])
    c.num_steps = 10_000  # optimizer steps

    m = c.model
    m.mode = "lm"  # text only
    m.vocab_size = 32_000  # padded vocabulary (>= the tokenizer's)
    m.tie_embeddings = False  # separate input embedding and output head
    m.remat = True  # rematerialize every block in the backward pass
    m.dtype = "bfloat16"  # compute dtype
    m.param_dtype = "bfloat16"  # params and Adam moments in bf16
    m.moe_every = 1  # every block's FFN is an MoE layer

    e = c.moe
    e.router = "null"  # K^k_rho null router
    e.activation = "swiglu"  # Mixtral's expert FFN
    e.backend = "auto"  # Pallas (Mosaic) grouped matmul on TPU, Triton on recent GPUs

    x = c.mesh
    x.fsdp, x.expert, x.data = 8, 8, -1  # 64 chips: params over fsdp x expert, batch over all

    d = c.data
    d.text_len = 2048  # tokens per sequence
    d.batch_size = 64  # global batch: one sequence per chip on 64 chips
    d.n_eval = 64  # held-out sequences

    c.opt.lr, c.opt.warmup_steps = 3e-4, 500  # peak lr, warmup steps
    c.ckpt.every_steps = 500  # checkpoint cadence
    c.log.every_steps, c.log.eval_every = 10, 1000  # logging, eval cadence

    if variant == "mixtral":
        m.d_model, m.n_layers, m.n_heads, m.n_kv_heads = 4096, 32, 32, 8
        m.d_ff = 14_336  # dense FFN width (unused: every block is MoE)
        m.rope_theta = 1e6  # Mixtral's RoPE base
        e.num_experts, e.d_ff, e.top_k, e.rho = 8, 14_336, 4, 0.5  # K^4_0.5
    else:
        m.d_model, m.n_layers, m.n_heads, m.n_kv_heads = 2048, 24, 16, 8
        m.d_ff = 5632  # dense FFN width (unused: every block is MoE)
        e.num_experts, e.d_ff, e.top_k, e.rho = 64, 1408, 8, 0.5  # K^8_0.5
    return c
