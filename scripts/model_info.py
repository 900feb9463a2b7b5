"""Print a model's parameter counts and FLOPs per token as JSON.

    python scripts/model_info.py --model=pythia-70m
    python scripts/model_info.py --model=all            # every preset, one JSON list
    python scripts/model_info.py --model=path/to/hf_dir_or_config.json

Counts come from the real parameter tree, initialized abstractly (no allocation), so even 12b
takes well under a second.
"""

import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import app, flags  # noqa: E402

from pythia_jax.cli import run_app  # noqa: E402

flags.DEFINE_string("model", "pythia-70m", "preset name (pythia-70m, 1b, …), 'all', an HF "
                    "directory or config.json, or a pythia-jax checkpoint directory")
flags.DEFINE_integer("seq_len", 2048, "sequence length for the attention FLOPs")
FLAGS = flags.FLAGS


def info(name: str, cfg, seq_len: int) -> dict:
    from pythia_jax.model import abstract_model, count_params
    counts = count_params(abstract_model(cfg))
    formula = cfg.param_counts()
    if counts != formula:  # the closed form is documented; disagreeing means a layout bug
        raise AssertionError(f"{name}: parameter tree {counts} != closed form {formula}")
    fl = cfg.flops_per_token(seq_len)
    return {
        "model": name,
        "total_params": counts["total"],
        "non_embedding_params": counts["non_embedding"],
        "flops_per_token": fl["training"],
        "forward_flops_per_token": fl["forward"],
        "seq_len": seq_len,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_layers": cfg.num_layers,
        "num_heads": cfg.num_heads,
        "head_dim": cfg.head_dim,
        "rotary_dim": cfg.rotary_dim,
        "intermediate_size": cfg.intermediate_size,
    }


def resolve(name: str):
    from pythia_jax import config as config_lib
    from pythia_jax import paths
    if paths.is_remote(name) or os.path.exists(name):
        paths.check_available(name)
        if paths.isfile(name):
            with paths.local_copy(name) as local:
                return config_lib.ModelConfig.from_hf_json(local)
        if paths.isdir(name):
            if paths.isfile(paths.join(name, "config.json")):
                with paths.local_copy(paths.join(name, "config.json")) as local:
                    return config_lib.ModelConfig.from_hf_json(local)
            from pythia_jax import checkpoint
            d = checkpoint.resolve_model_dir(name)
            return checkpoint.config_from_json(paths.join(d, checkpoint.CONFIG_NAME))
        if paths.is_remote(name):
            raise FileNotFoundError(f"{name}: no such file or directory")
    return config_lib.get_preset(name)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from pythia_jax import config as config_lib
    try:
        if FLAGS.model == "all":
            out = [info(n, c, FLAGS.seq_len) for n, c in config_lib.PRESETS.items()]
        else:
            out = info(FLAGS.model, resolve(FLAGS.model), FLAGS.seq_len)
    except (ValueError, OSError, ImportError) as e:  # ImportError: gs:// without the gcs extra
        print(f"model_info: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(out, indent=2))
    return 0


def run():
    """Console command `pythia-jax-model-info` (pyproject.toml [project.scripts])."""
    run_app(main, __name__)


if __name__ == "__main__":
    run()
