"""Pythia training configs: `pythia_jax.configs.pythia.get_config("70m")`, on the command line
`--config=configs/pythia.py:70m` (14m, 31m, 70m, 160m, 410m, 1b, 1.4b, 2.8b, 6.9b, 12b; append
`-deduped` for the deduplicated Pile). `configs/pythia.py` in the repository re-exports this
module, so the file path and the import give the same config.

Every hyperparameter of EleutherAI's runs (`pythia/models/*/pythia-*.yml`, GPT-NeoX v1.0
defaults; reference doc section 3) is a field here. Override any of them on the command line:

    python scripts/train.py --config=configs/pythia.py:160m --workdir=gs://bucket/run \
        --config.train.num_steps=2000 --config.data.path=/data/pile/document

A shorter `train.num_steps` keeps the full 143,000-step LR schedule (`optim.decay_steps`,
`optim.warmup_steps`) unless those are overridden too.
"""

from __future__ import annotations

import dataclasses

import ml_collections
from ml_collections import config_dict

from pythia_jax.config import get_preset

#: size -> (peak lr, min lr) from the ymls (1b: 2.5e-4 in the yml; the README table says 3e-4).
LEARNING_RATES = {
    "14m": (1.0e-3, 1.0e-4),
    "31m": (1.0e-3, 1.0e-4),
    "70m": (1.0e-3, 1.0e-4),
    "160m": (6.0e-4, 6.0e-5),
    "410m": (3.0e-4, 3.0e-5),
    "1b": (2.5e-4, 2.5e-5),
    "1.4b": (2.0e-4, 2.0e-5),
    "2.8b": (1.6e-4, 1.6e-5),
    "6.9b": (1.2e-4, 1.2e-5),
    "12b": (1.2e-4, 1.2e-5),
}

#: size -> (GPUs, model parallel, micro batch per GPU, gradient accumulation) in the NeoX runs.
NEOX_LAYOUT = {
    "14m": (32, 1, 32, 1), "31m": (32, 1, 32, 1), "70m": (32, 1, 32, 1),
    "160m": (32, 1, 32, 1), "410m": (32, 1, 32, 1),
    "1b": (64, 1, 16, 1), "1.4b": (64, 1, 16, 1), "2.8b": (64, 1, 16, 1),
    "6.9b": (128, 2, 8, 2), "12b": (256, 4, 8, 2),
}

#: size -> (remat policy, sequences per device per microbatch): the defaults, chosen from
#: deviceless compiles of the real step by the cycles model (`scripts/aot_report.py`;
#: docs/scaling.md has the tables and commands; regenerated 4 Dec 2026 after the QKV bias and
#: di moved into the attention kernels). 70m-410m: v5e (16 GiB HBM) with pure data
#: parallelism, the largest power-of-two microbatch that fits with the policy: remat "none"
#: beat "dots_saveable" at 160m (71.8 vs 62.9 % MFU), "dots_saveable" beat "none" at 410m
#: (65.2 vs 59.9 %; microbatch 4 against 2). 14m and 31m take 70m's microbatch (their
#: activations are smaller; not compiled). 1b-12b: v5p (95 GiB) with fsdp over the slice;
#: "dots_saveable" beat NeoX's "full" at 1b (v5p:2x4x4) and 12b (v5p:4x8x8); the microbatch
#: is the largest that fits on those slices (1b 32 on 2x4x4; 2.8b 8 on 4x4x4; 6.9b 8 on
#: 4x4x8; 12b 4 on 4x8x8: one microbatch per step at 1b, 6.9b, 12b), except 1.4b and 2.8b,
#: where twice the microbatch fits but two microbatches are faster by the cycles model (1.4b
#: 16 x 2: 91.5 vs 89.8 % for 32 x 1; 2.8b 8 x 2: 77.2 vs 76.1 % for 16 x 1; the roofline says
#: the reverse at both, 76.2 vs 77.4 % and 76.3 vs 78.2 %).
#: The microbatch is a cap: a device holding fewer rows takes them in one microbatch
#: (`train.grad_accum_steps` overrides it).
TRAIN_DEFAULTS = {
    "14m": ("none", 16), "31m": ("none", 16), "70m": ("none", 16), "160m": ("none", 8),
    "410m": ("dots_saveable", 4),
    "1b": ("dots_saveable", 32), "1.4b": ("dots_saveable", 16), "2.8b": ("dots_saveable", 8),
    "6.9b": ("dots_saveable", 8), "12b": ("dots_saveable", 4),
}

EVAL_INTERVAL = {"14m": 100000, "31m": 100000, "70m": 100000, "6.9b": 1000, "12b": 1000}

#: Pythia's checkpoint grid: step 0 and powers of two to 512, then every 1000 (plus the last).
PYTHIA_EXTRA_SAVE_STEPS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

DATA_PATHS = {
    "standard": "data/pile-standard-pythia-preshuffled/document",
    "deduped": "data/pile-deduped-pythia-preshuffled/document",
}


def get_config(arg: str = "70m") -> ml_collections.ConfigDict:
    arg = (arg or "70m").lower().removeprefix("pythia-")
    deduped = arg.endswith("-deduped")
    size = arg.removesuffix("-deduped")
    if size not in LEARNING_RATES:
        raise ValueError(f"configs/pythia.py: unknown size {arg!r}; expected one of "
                         f"{sorted(LEARNING_RATES)} (optionally with -deduped)")
    preset = get_preset(size)
    peak_lr, min_lr = LEARNING_RATES[size]
    gpus, mp, micro, gas = NEOX_LAYOUT[size]

    c = ml_collections.ConfigDict()
    c.name = f"pythia-{size}" + ("-deduped" if deduped else "")

    # --- model: every ModelConfig field (architecture from the preset) --------------------------
    m = dataclasses.asdict(preset)
    m.update(
        param_dtype="float32",   # fp32 master weights
        dtype="bfloat16",        # compute dtype (NeoX trained in fp16 with loss scaling; 1b: bf16)
        # NeoX `bias-gelu-fusion: true` trained with the tanh GELU (reference doc 1.3); exports
        # then say hidden_act="gelu_new". Set False to train with the exact erf GELU.
        gelu_approximate=True,
        scan_layers=True,
        remat=TRAIN_DEFAULTS[size][0],  # chosen from compiles (TRAIN_DEFAULTS)
        attention_impl="auto",   # TPU: Pallas flash kernel, GPU: cuDNN, CPU: xla
        # None: rotary fused into the Pallas kernel wherever auto picks it (ModelConfig); a
        # typed placeholder so --config.model.fused_rotary=true|false still overrides it.
        fused_rotary=config_dict.placeholder(bool),
    )
    c.model = ml_collections.ConfigDict(m)

    # --- data ------------------------------------------------------------------------------------
    c.data = ml_collections.ConfigDict()
    # Prefix of the pre-shuffled Pile (`document.bin` + `document.idx`, items of 2049 tokens);
    # step k trains on items [1024 k, 1024 k + 1024).
    c.data.path = DATA_PATHS["deduped" if deduped else "standard"]
    c.data.prefetch = 2
    # When set and `data.path` does not exist: tokenize this text file into fixed-length rows
    # at `data.path` first (used by configs/smoke.py).
    c.data.build_from_text = ""
    c.data.build_shuffle_seed = 1234
    c.data.build_eval_rows = 0            # rows held out of the built file for evaluation
    # Optional held-out rows (same format) for `train.eval_every`; "" = no evaluation.
    c.data.eval_path = ""

    # --- training --------------------------------------------------------------------------------
    c.train = ml_collections.ConfigDict()
    c.train.num_steps = 143_000           # train-iters
    c.train.batch_size = 1024             # global batch (sequences)
    c.train.seq_len = 2048                # seq-length; rows hold seq_len + 1 tokens
    # Gradient accumulation: 0 = derive from microbatch_per_device, at most that many sequences
    # per device per microbatch (0 = no cap: no accumulation); the per-size default fits a
    # 16 GiB v5e chip (TRAIN_DEFAULTS; on chips with more HBM `scripts/aot_report.py` finds
    # the largest that fits).
    c.train.grad_accum_steps = 0
    c.train.microbatch_per_device = TRAIN_DEFAULTS[size][1]
    # Where the gradients of the accumulation are reduced across devices: "step" (each device
    # sums its own microbatches' gradients, one reduction after the loop), "microbatch" (XLA
    # reduces inside the loop, once per microbatch), "auto" = step unless the mesh has an fsdp
    # axis (there a per-step reduction would need a full-size gradient buffer per device).
    c.train.grad_reduce = "auto"
    # The output layer fused with the cross-entropy (`pythia_jax.fused_loss`, a Pallas TPU
    # kernel that never writes the [tokens, vocab] fp32 logits to HBM). Used only where the step
    # is traced for TPU (elsewhere, and on meshes with tensor > 1, the plain loss). On, with
    # stored probabilities: the v5e compile estimates put that variant at 0.80-0.88 x the plain
    # loss's time per microbatch (70m-410m) with half its HBM temporaries; no TPU timing yet
    # (bench/RESULTS.md "Fused output layer + cross-entropy"). False restores the plain loss.
    c.train.fused_loss = True
    # With fused_loss: the forward keeps bf16 probabilities ([tokens, vocab], half the plain
    # path's fp32 logits) for the backward instead of recomputing the logits there (the plain
    # path's FLOPs instead of 4/3 of them). False: nothing [tokens, vocab] in HBM at all (the
    # least memory; slower above 70m by the same estimates).
    c.train.fused_loss_store_probs = True
    c.train.seed = 1234                   # NeoX default seed
    c.train.log_every = 10                # log-interval
    c.train.progress_bar = True
    # Peak FLOP/s of one device for MFU; 0 = from the device kind (unknown on CPU: no MFU).
    c.train.peak_flops_per_device = 0.0
    # metrics.jsonl + TensorBoard events; "" = the workdir (for a gs:// workdir: ./runs/<name>)
    c.train.log_dir = ""
    # Weights & Biases project for the same scalars ("" = off; needs the wandb extra)
    c.train.wandb_project = ""
    c.train.eval_every = EVAL_INTERVAL.get(size, 40000)  # eval-interval (0 = never)
    c.train.eval_steps = 10                               # eval-iters
    # Abort when this many consecutive updates were skipped for non-finite gradients.
    c.train.max_consecutive_nonfinite = 100
    # Multi-process runs: every this many steps the processes agree whether one got SIGTERM
    # (a stop comes 1-2 x this many steps after the signal; bench/RESULTS.md "preemption").
    c.train.preemption_check_every = 10

    # --- optimizer (Adam in AdamW mode, NeoX v1.0 AnnealingLR cosine) ----------------------------
    c.optim = ml_collections.ConfigDict()
    c.optim.peak_lr = peak_lr
    c.optim.min_lr = min_lr               # 0.1 x peak
    c.optim.warmup_steps = 1430           # warmup 0.01 x lr-decay-iters
    c.optim.decay_steps = 143_000         # lr-decay-iters (the cosine's period)
    c.optim.b1 = 0.9
    c.optim.b2 = 0.95
    c.optim.eps = 1.0e-8
    c.optim.weight_decay = 0.1            # kernels and embeddings only
    c.optim.grad_clip = 1.0               # global L2 norm
    c.optim.skip_nonfinite = True
    # optax.apply_if_finite's own limit (the optimizer then applies a non-finite update); the
    # run stops earlier at train.max_consecutive_nonfinite.
    c.optim.max_consecutive_nonfinite = 2**30

    # --- checkpoints -----------------------------------------------------------------------------
    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.extra_steps = PYTHIA_EXTRA_SAVE_STEPS   # extra-save-iters
    c.checkpoint.every = 1000                            # checkpoint-factor
    c.checkpoint.save_final = True                       # NeoX always saves the last iteration
    c.checkpoint.rolling_every = 250                     # preemption checkpoint (0 = off)
    c.checkpoint.keep_rolling = 1
    c.checkpoint.async_save = True

    # --- device mesh -----------------------------------------------------------------------------
    c.mesh = ml_collections.ConfigDict()
    c.mesh.shape = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})

    # --- a generated sample printed at the end (0 tokens = none) ---------------------------------
    c.sample = ml_collections.ConfigDict()
    c.sample.prompt = "The"
    c.sample.max_new_tokens = 0
    c.sample.temperature = 0.0
    c.sample.top_k = 0                    # 0 = no top-k filter
    c.sample.seed = 0

    # --- what the NeoX runs used that has no direct equivalent here (for the record) -------------
    c.neox = ml_collections.ConfigDict()
    c.neox.gpus = gpus
    c.neox.model_parallel_size = mp
    c.neox.train_micro_batch_size_per_gpu = micro
    c.neox.gradient_accumulation_steps = gas
    c.neox.zero_stage = 0 if size in ("14m", "31m") else 1
    c.neox.precision = "bf16" if size == "1b" else "fp16"
    c.neox.fp16_initial_scale_power = 12
    c.neox.fp16_loss_scale_window = 1000
    c.neox.fp16_hysteresis = 2
    c.neox.fp16_min_loss_scale = 1
    c.neox.attention = "flash"
    c.neox.hidden_dropout = 0.0
    c.neox.attention_dropout = 0.0
    return c
