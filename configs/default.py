"""Training configs: a vision-language decoder with MoE layers on the procedural shapes data.

get_config(arg) takes a comma-separated list: one variant and optional modifiers.

Variants (all share D, layers, data and the expert width F, so FLOPs compare directly):
  default     K^4_0.5: null router, N=8 real experts, K=4 slots, rho=0.5 (M=8), E[K]=2
  k2_rho1     K^2_1.0: null router with rho=1 (no null copies), E[K]=2
  k4_rho05    K^4_0.5 (same as default), E[K]=2
  k8_rho025   K^8_0.25: M=24 null copies, E[K]=2
  topk        top-2 token choice, renormalized gates, Switch-style balance loss
  switch      Switch top-1
  xmoe        XMoE threshold router t=0.9 over 32 small experts (F/4 each), gamma=8, GELU+bias
  xmoe_dense  dense-to-sparse (our reconstruction of XMoE's recipe, experimental): the dense FFN
              (hidden 2F) split into 16 small SwiGLU experts, threshold router at t=1.0 with
              gamma=16=N, so training computes every expert (dense FLOPs); lower
              moe.threshold_eval / moe.capacity_factor_eval at inference
  dense       no MoE: every FFN has hidden 2F, the active FLOPs of E[K]=2 experts of width F
  lm          text-only LM on the scene captions (no images), K^4_0.5 MoE
Modifiers:
  smoke       shrinks model, data and steps so a run takes seconds (tests)
  fine        fine-grained experts at the same active FLOPs: 4x the experts at a quarter of the
              width and 4x the slots (default,fine = K^16_0.5 over N=32 experts of F/4;
              k2_rho1,fine = K^8_1.0; topk,fine = top-8); dense, switch and XMoE are unchanged

Launch:
  python train.py                                         # default, ./workdir/default
  python train.py --config=configs/default.py:k8_rho025 --workdir=/tmp/k8
  python train.py --config=configs/default.py:smoke --workdir=/tmp/smoke
  python train.py --config=configs/default.py:k8_rho025,smoke
  python train.py --config=configs/default.py --config.moe.rho=0.25 --config.moe.top_k=8
  python train.py --config=configs/default.py --config.moe.router=topk --config.moe.top_k=2
      # switching router on the command line drops the file's null-router moe.rho /
      # moe.num_null_experts unless they are given on the command line too
  python train.py --config=configs/default.py:xmoe_dense --workdir=/tmp/xd
  python experiments/eval_sweep.py --run=xmoe_dense@/tmp/xd --t_eval=1.0,0.9,0.7,0.5
  python train.py --config=configs/default.py --config.mesh.expert=4   # expert parallel
  python train.py --config=configs/default.py:smoke --config.mesh.fsdp=2 --config.mesh.expert=2 \
      --config.dist.coordinator_address=127.0.0.1:1234 --config.dist.num_processes=2 \
      --config.dist.process_id=0 --config.dist.local_devices=4 --workdir=/tmp/mh  # and id 1
  tensorboard --logdir=./workdir        # the viewer: pip install -e ".[tensorboard]"
  python train.py --config=configs/default.py:lm --config.init.hf=/path/to/checkpoint \
      --config.init.granularity=4 --config.data.kind=text "--config.data.paths=('a.jsonl',)"
      # upcycle a Hugging Face Llama / Qwen2 / Mistral checkpoint (docs/huggingface.md, moe_jax.train.hf_init)
Config errors print one line `error: config.<section>.<field>=<value> is invalid: ...` and exit 2.
"""

from __future__ import annotations

import ml_collections
from ml_collections.config_dict import placeholder

VARIANTS = (
    "default",
    "k2_rho1",
    "k4_rho05",
    "k8_rho025",
    "topk",
    "switch",
    "xmoe",
    "xmoe_dense",
    "dense",
    "lm",
)
MODIFIERS = ("smoke", "fine")


def _parse(arg: str | None) -> tuple[str, set[str]]:
    parts = [p.strip() for p in (arg or "").split(",") if p.strip()]
    mods = {p for p in parts if p in MODIFIERS}
    rest = [p for p in parts if p not in MODIFIERS]
    if len(rest) > 1 or (rest and rest[0] not in VARIANTS):
        raise ValueError(
            f"config arg {arg!r} is invalid: expected one variant of {VARIANTS} "
            f"plus optional modifiers {MODIFIERS}, comma-separated"
        )
    return (rest[0] if rest else "default"), mods


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant, mods = _parse(arg)
    c = ml_collections.ConfigDict()
    c.name = "_".join([variant, *sorted(mods)])  # run name; default workdir ./workdir/<name>
    c.seed = 0  # parameter init and data shuffle seed
    c.num_steps = 400  # optimizer steps in the run
    c.fail_at_step = -1  # debug: poison the loss with NaN at this step (-1 = never; tests)

    c.model = m = ml_collections.ConfigDict()
    m.d_model = 128  # D: model width
    m.n_layers = 4  # decoder blocks
    m.n_heads = 4  # attention heads
    m.n_kv_heads = 2  # key/value heads (grouped-query attention); divides n_heads
    m.d_ff = 256  # hidden width of dense FFNs (2x the expert width: E[K]=2 active FLOPs)
    m.moe_every = 1  # every n-th block's FFN is an MoE layer (0 or model without moe: none)
    m.mode = "vlm"  # vlm: image patch prefix + text | lm: text only
    m.vision_encoder = "mlp"  # patch encoder in front of the decoder: mlp | vit
    m.vision_layers = 1  # bidirectional blocks in the vit encoder
    m.tie_embeddings = True  # share the input embedding with the output projection
    m.remat = False  # rematerialize blocks in the backward pass (saves memory)
    m.scan_layers = True  # blocks as one scanned stack: compile time independent of depth
    m.dtype = "float32"  # compute dtype
    m.param_dtype = "float32"  # parameter dtype
    m.rope_theta = 10_000.0  # rotary embedding base

    c.moe = e = ml_collections.ConfigDict()
    e.enabled = True  # False: dense FFN everywhere (the dense variant)
    e.router = "null"  # null | topk | switch | threshold | expert_choice
    e.num_experts = 8  # N: real experts per MoE layer
    e.top_k = 4  # K: slots picked per token (k_max for the null router)
    e.rho = 0.5  # null router density N/(N+M); E[K] = top_k * rho; null router only
    e.d_ff = 128  # F: hidden width of each expert
    e.activation = "swiglu"  # swiglu | gelu
    e.expert_bias = False  # biases in the expert FFNs
    e.shared_d_ff = 0  # hidden width of an always-on shared expert (0 = none)
    e.threshold = 0.9  # t for the threshold router (training)
    e.threshold_eval = placeholder(float)  # t at eval and decoding; None = threshold
    e.capacity_factor = placeholder(float)  # XMoE gamma / expert-choice c; None = default
    e.capacity_factor_eval = placeholder(float)  # capacity at eval and decoding; None = as train
    e.renormalize = True  # renormalize gates over the selected real experts (null/topk)
    e.lb_coef = placeholder(float)  # balance loss coefficient; None = router default
    e.z_coef = 1e-3  # router z-loss coefficient
    e.bias_update_rate = 0.0  # u of aux-loss-free per-expert selection bias (0 = off)
    e.null_bias_update_rate = 0.0  # u of the null-ratio controller on the null logit (0 = off)
    e.null_controller = "pi"  # pi (u = integral gain) | sign (b -= u * sign(error))
    e.null_kp = 0.0  # proportional gain of the pi null-ratio controller
    e.null_calibrate = True  # first training batch sets the null bias: E[real] = K*rho at step 1
    e.backend = "auto"  # expert backend: auto | dense | ragged | tiled | pallas | tokamax
    e.router_dtype = "float32"  # router logits/softmax dtype

    c.mesh = x = ml_collections.ConfigDict()
    x.expert = 0  # expert-parallel mesh axis size (divides N and the device count); 0 = off
    x.fsdp = 1  # parameter-shard axis size (non-expert and expert weights split over it)
    x.data = -1  # data-parallel axis size; -1 = devices / (fsdp * expert)
    x.buffer_factor = 2.0  # EP send buffer over expected real rows; 0 = dropless (worst case)
    x.exchange = "auto"  # EP row exchange: auto | ragged (TPU/GPU) | padded (any platform)

    c.init = i = ml_collections.ConfigDict()
    i.hf = ""  # Hugging Face checkpoint folder to upcycle (lm mode; docs/huggingface.md); "" = random init
    i.granularity = 1  # g: each dense FFN becomes experts of hidden F/g (sets moe.d_ff)
    i.reinit_fraction = 0.3  # share of each expert's hidden units re-initialized
    i.output_scale = 1.0  # multiplies the experts' w_out (g: uniform gates give the dense FFN)

    c.dist = t = ml_collections.ConfigDict()
    t.coordinator_address = placeholder(str)  # "host:port" of process 0; None = environment
    t.num_processes = placeholder(int)  # processes in the run; None = environment or 1
    t.process_id = placeholder(int)  # this process in [0, num_processes); None = environment
    t.local_devices = placeholder(int)  # CPU only: devices per process (local multi-process)

    c.data = d = ml_collections.ConfigDict()
    d.kind = "shapes"  # shapes | shapes_text | manifest | text
    d.image_size = 32  # pixels per image side
    d.patch_size = 4  # pixels per patch side: (32/4)^2 = 64 vision tokens
    d.text_len = 24  # text tokens per row: bos + at most text_len - 1 caption tokens + eos
    d.batch_size = 16  # global batch (sequences of 64 patch + 24 text tokens)
    d.n_eval = 256  # held-out records for the eval loop
    d.n_train = placeholder(int)  # train records; None: shapes 100_000, files all but n_eval
    d.max_shapes = 3  # shapes per scene (1..5)
    d.num_workers = 0  # grain worker processes (0 = main process)
    d.paths = ()  # manifest / text files for the file kinds (docs/training.md, own files)
    d.truncate = (
        False  # manifest: cut captions longer than text_len - 1 tokens (eos kept); False: error
    )
    d.resize = False  # manifest: resize images that are not image_size square; False: error

    c.opt = o = ml_collections.ConfigDict()
    o.lr = 3e-3  # peak learning rate
    o.schedule = "cosine"  # cosine (warmup-cosine) | wsd (warmup-stable-decay) | constant
    o.warmup_steps = 50  # linear warmup from 0
    o.decay_fraction = 0.2  # wsd: share of num_steps spent in the final linear decay
    o.min_lr_ratio = 0.1  # final lr = min_lr_ratio * lr
    o.weight_decay = 0.05  # AdamW decoupled weight decay (not on norms / biases)
    o.b1 = 0.9  # Adam beta1
    o.b2 = 0.95  # Adam beta2
    o.eps = 1e-8  # Adam epsilon
    o.clip_norm = 1.0  # global gradient-norm clip (0 = off)
    o.grad_accum = 1  # micro-batches per step; divides data.batch_size

    c.ckpt = k = ml_collections.ConfigDict()
    k.every_steps = 100  # save a checkpoint every n steps (and at the end)
    k.keep = 3  # keep the last n checkpoints
    k.async_save = True  # write checkpoints in a background thread
    k.resume = True  # resume from the latest complete checkpoint in the workdir

    c.log = g = ml_collections.ConfigDict()
    g.every_steps = 10  # metrics to JSONL / TensorBoard every n steps
    g.eval_every = 200  # run the held-out eval every n steps (0 = end only)
    g.eval_batches = 4  # batches per eval (0 = the whole held-out split)
    g.tensorboard = True  # also write TensorBoard scalars
    g.progress = True  # tqdm progress bar with loss and tokens/s
    g.plots = True  # PNG plots in the workdir at the end
    g.heatmap_images = 4  # held-out images in the routing heatmap

    _apply_variant(c, variant)
    if "fine" in mods:
        _apply_fine(c, variant)
    if "smoke" in mods:
        _apply_smoke(c, variant)
    return c


def _apply_variant(c: ml_collections.ConfigDict, variant: str) -> None:
    e = c.moe
    if variant == "k2_rho1":
        e.top_k, e.rho = 2, 1.0
    elif variant == "k8_rho025":
        e.top_k, e.rho = 8, 0.25
    elif variant == "topk":
        e.router, e.top_k, e.rho = "topk", 2, None
    elif variant == "switch":
        e.router, e.top_k, e.rho = "switch", 1, None
    elif variant == "xmoe":
        e.router, e.top_k, e.rho = "threshold", 1, None
        e.num_experts, e.d_ff = 32, 32  # 32 small experts of width F/4
        e.threshold, e.capacity_factor = 0.9, 8.0
        e.activation, e.expert_bias = "gelu", True
    elif variant == "xmoe_dense":
        e.router, e.top_k, e.rho = "threshold", 1, None
        e.num_experts = 16  # N slices of the dense FFN
        e.d_ff = c.model.d_ff // e.num_experts  # F = model.d_ff / N: N experts = one dense FFN
        e.threshold, e.capacity_factor = 1.0, 16.0  # every expert, gamma = N: no drops
    elif variant == "dense":
        e.enabled = False
    elif variant == "lm":
        c.model.mode = "lm"
        c.data.kind = "shapes_text"


def _apply_fine(c: ml_collections.ConfigDict, variant: str, g: int = 4) -> None:
    if variant in ("xmoe", "xmoe_dense", "dense", "switch"):
        return  # already fine-grained, no experts, or one expert per token by definition
    e = c.moe
    e.num_experts, e.d_ff, e.top_k = g * e.num_experts, e.d_ff // g, g * e.top_k


def _apply_smoke(c: ml_collections.ConfigDict, variant: str) -> None:
    c.num_steps = 30
    c.model.d_model, c.model.n_layers, c.model.n_heads, c.model.n_kv_heads = 32, 2, 2, 1
    c.model.d_ff = 64
    c.moe.d_ff = 32 if c.moe.router != "threshold" else 8
    # N >= K: the null router's compact top-K runs over the N real logits.
    c.moe.num_experts = 8 if c.moe.router == "threshold" else max(4, c.moe.top_k)
    if variant == "xmoe_dense":  # keep the dense FFN split: N * F = model.d_ff
        c.moe.d_ff = c.model.d_ff // c.moe.num_experts
    c.data.image_size, c.data.patch_size, c.data.text_len = 16, 4, 16
    c.data.batch_size, c.data.n_eval, c.data.max_shapes = 8, 16, 1
    c.opt.lr, c.opt.warmup_steps = 1e-2, 5
    c.ckpt.every_steps, c.ckpt.keep = 10, 2
    c.log.every_steps, c.log.eval_every, c.log.eval_batches = 1, 0, 2
    c.log.heatmap_images = 2
