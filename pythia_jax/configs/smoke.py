"""The embedded default: a small Pythia-shaped model on a bundled corpus, minutes on a laptop CPU.

    python scripts/train.py --config=configs/smoke.py --workdir=runs/smoke
    # in Python: pythia_jax.configs.smoke.get_config()

On first use it tokenizes `pythia_jax/assets/tinyshakespeare.txt` (shipped in the package) with
the project's preprocessing (`pythia_jax.data.preprocess`, GPT-NeoX-20B tokenizer), cuts the
stream into rows of seq_len + 1 tokens, shuffles them and writes a pre-shuffled-style
`.bin/.idx` under WORKDIR/data, so training reads it through the same `PythiaOrder` path as the
Pile. Everything else (optimizer, schedule formula, init, checkpoints, logging) is Pythia's,
scaled down: see `pythia_jax.configs.pythia` for the fields.
"""

from __future__ import annotations

from importlib import resources

import ml_collections

from pythia_jax.configs import pythia


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    if arg:
        raise ValueError(f"configs/smoke.py takes no argument, got {arg!r} (use "
                         f"--config=configs/smoke.py and --config.FIELD=VALUE overrides)")
    c = pythia.get_config("14m")
    c.name = "smoke"

    # Pythia-shaped (parallel residual, partial rotary, untied embeddings, padded 50304 vocab,
    # small_init / wang_init), 4 layers of width 64.
    c.model.hidden_size = 64
    c.model.num_layers = 4
    c.model.num_heads = 4
    c.model.intermediate_size = 256
    c.model.dtype = "float32"          # bf16 matmuls are slow on CPUs
    c.model.scan_layers = False
    c.model.remat = "none"
    c.model.attention_impl = "xla"

    corpus = str(resources.files("pythia_jax") / "assets" / "tinyshakespeare.txt")
    c.data.path = "{workdir}/data/tinyshakespeare_rows"
    c.data.build_from_text = corpus
    c.data.build_eval_rows = 64
    c.data.eval_path = "{workdir}/data/tinyshakespeare_rows_eval"

    c.train.num_steps = 300
    c.train.batch_size = 8
    c.train.microbatch_per_device = 0  # the whole batch at once (the 14m default caps at 16)
    c.train.seq_len = 64
    c.train.log_every = 25
    c.train.eval_every = 100
    c.train.eval_steps = 4

    c.optim.peak_lr = 3.0e-3
    c.optim.min_lr = 3.0e-4
    c.optim.warmup_steps = 30          # NeoX's formula, with a schedule sized for this run
    c.optim.decay_steps = 300

    c.checkpoint.extra_steps = (0, 1, 2, 4, 8, 16, 32, 64, 128)
    c.checkpoint.every = 100
    c.checkpoint.rolling_every = 50

    c.sample.prompt = "ROMEO:"
    c.sample.max_new_tokens = 48
    c.sample.temperature = 0.7
    c.sample.top_k = 40
    return c
