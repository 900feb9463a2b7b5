r"""Evaluate a Pythia model; prints one JSON object with the results.

    # LAMBADA (OpenAI), scored exactly like lm-evaluation-harness' lambada_openai
    python scripts/evaluate.py --model=EleutherAI/pythia-70m --task=lambada_openai [--limit=500] \
        [--data=lambada_test.jsonl]     # default: the hub dataset EleutherAI/lambada_openai
    # perplexity of a Megatron .bin/.idx token stream (documents concatenated in order)
    python scripts/evaluate.py --model=hf_export/ --task=perplexity --data=data/val_text_document \
        --context_length=2048 [--stride=512] [--limit=1000000]

--limit: lambada_openai, the first N examples; perplexity, the first N tokens of the stream.
--stride (perplexity): windows start every `stride` tokens and score only their last `stride`
targets (default: non-overlapping windows of --context_length).
For any other lm-evaluation-harness task use `pythia-jax-lm-eval` (lm_eval's arguments).
"""

import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import flags  # noqa: E402

from pythia_jax.attention import IMPLS as ATTENTION_IMPLS  # noqa: E402
from pythia_jax.cli import (LAMBADA_HUB_FILE, LAMBADA_HUB_REPO, default_lambada_path,  # noqa: E402
                            exit_on_sigterm, output_path_error, parse_model_flags,
                            write_text_atomic)
from pythia_jax.evaluate import TASKS  # noqa: E402

FLAGS = flags.FlagValues()  # script-local: several scripts can be driven from one process
flags.DEFINE_string("model", None, "HF dir / hub id / pythia-jax checkpoint / .gguf",
                    flag_values=FLAGS)
flags.DEFINE_string("revision", None, "hub revision, e.g. step143000", flag_values=FLAGS)
flags.DEFINE_string("task", None, f"one of {', '.join(TASKS)}", flag_values=FLAGS)
flags.DEFINE_string("data", None, "lambada_openai: a .jsonl of {\"text\": ...} lines (default: "
                    f"{LAMBADA_HUB_FILE} of the hub dataset {LAMBADA_HUB_REPO}, downloaded "
                    "once); perplexity: a .bin/.idx prefix",
                    flag_values=FLAGS)
flags.DEFINE_integer("limit", None, "first N examples (lambada) / tokens (perplexity)",
                     flag_values=FLAGS)
flags.DEFINE_integer("batch_size", 16, "rows per scoring call", flag_values=FLAGS)
flags.DEFINE_integer("context_length", None, "perplexity window (default: the model context)",
                     flag_values=FLAGS)
flags.DEFINE_integer("stride", None, "perplexity: window stride (default: context_length)",
                     flag_values=FLAGS)
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"], "parameter dtype",
                  flag_values=FLAGS)
flags.DEFINE_enum("compute_dtype", None, ["float32", "bfloat16", "float16"],
                  "activation / matmul dtype (default float32)", flag_values=FLAGS)
flags.DEFINE_enum("attention_impl", None, list(ATTENTION_IMPLS), "attention kernel (default: "
                  "the checkpoint's, else xla; auto picks pallas / splash on TPU, cudnn on GPU)",
                  flag_values=FLAGS)
flags.DEFINE_string("tokenizer", None, "tokenizer.json / directory / hub id (default: the "
                    "model's own, else the bundled GPT-NeoX-20B tokenizer)", flag_values=FLAGS)
flags.DEFINE_string("output", None, "also write the JSON here", flag_values=FLAGS)
flags.DEFINE_bool("progress", True, "show a progress bar (stderr)", flag_values=FLAGS)


def _err(msg: str) -> int:
    print(f"evaluate: error: {msg}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    exit_on_sigterm("evaluate")
    error = parse_model_flags(FLAGS, argv)
    if error:
        return _err(error)
    if FLAGS.task not in TASKS:
        return _err(f"unknown task {FLAGS.task!r}: expected --task= one of {', '.join(TASKS)} "
                    "(other lm-evaluation-harness tasks: python -m pythia_jax.lm_eval_adapter)")
    data = FLAGS.data
    if data is None:
        if FLAGS.task != "lambada_openai":
            return _err("--data is required for --task=perplexity (a .bin/.idx prefix)")
        try:
            data = default_lambada_path()
        except OSError as e:
            return _err(str(e))
    from pythia_jax import paths
    if FLAGS.task == "lambada_openai" and paths.is_remote(data):
        try:
            paths.check_available(data)
        except ImportError as e:
            return _err(str(e))
    if FLAGS.task == "lambada_openai" and not paths.isfile(data):
        return _err(f"{data}: no such file (expected the LAMBADA test .jsonl; pass --data)")
    if FLAGS.limit is not None and FLAGS.limit < 1:
        return _err(f"--limit must be >= 1, got {FLAGS.limit}")
    if FLAGS.output:  # before the evaluation, not after it
        error = output_path_error(FLAGS.output, "--output")
        if error:
            return _err(error)

    import pythia_jax
    from pythia_jax import evaluate as ev
    from pythia_jax.tokenizer import load_tokenizer

    try:
        model = pythia_jax.from_pretrained(FLAGS.model, revision=FLAGS.revision, dtype=FLAGS.dtype,
                                           compute_dtype=FLAGS.compute_dtype,
                                           **({"attention_impl": FLAGS.attention_impl}
                                              if FLAGS.attention_impl else {}))
        tok = None
        if FLAGS.task == "lambada_openai":
            tok = load_tokenizer(FLAGS.tokenizer) if FLAGS.tokenizer else \
                ev.tokenizer_for(FLAGS.model, FLAGS.revision)
        res = ev.run_task(FLAGS.task, model, data=data, tokenizer=tok, limit=FLAGS.limit,
                          context_length=FLAGS.context_length, stride=FLAGS.stride,
                          batch_size=FLAGS.batch_size, progress=FLAGS.progress)
    except (ValueError, TypeError, OSError) as e:
        return _err(str(e))
    res = {"model": FLAGS.model, "revision": FLAGS.revision, **res}
    text = json.dumps(res, indent=2)
    print(text)
    if FLAGS.output:
        try:
            write_text_atomic(FLAGS.output, text + "\n")
        except OSError as e:
            return _err(f"--output={FLAGS.output}: {e.strerror or e}")
    return 0


def run():
    """Console command `pythia-jax-evaluate` (pyproject.toml [project.scripts])."""
    sys.exit(main())


if __name__ == "__main__":
    run()
