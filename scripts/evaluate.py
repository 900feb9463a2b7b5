"""Evaluate a Pythia model; prints one JSON object with the results.

    # LAMBADA (OpenAI), scored exactly like lm-evaluation-harness' lambada_openai
    python scripts/evaluate.py --model=EleutherAI/pythia-70m --task=lambada_openai \
        --data=../shared/data/eval_data/lambada_test.jsonl [--limit=500]
    # perplexity of a Megatron .bin/.idx token stream (documents concatenated in order)
    python scripts/evaluate.py --model=hf_export/ --task=perplexity --data=data/val_text_document \
        --context_length=2048 [--stride=512] [--limit=1000000]

--limit: lambada_openai, the first N examples; perplexity, the first N tokens of the stream.
--stride (perplexity): windows start every `stride` tokens and score only their last `stride`
targets (default: non-overlapping windows of --context_length).
For any other lm-evaluation-harness task use `python -m pythia_jax.lm_eval_adapter`.
"""

import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import flags  # noqa: E402

from pythia_jax.cli import parse_model_flags  # noqa: E402

TASKS = ("lambada_openai", "perplexity")
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_LAMBADA = os.path.join(os.path.dirname(_REPO), "shared", "data", "eval_data",
                               "lambada_test.jsonl")

FLAGS = flags.FlagValues()  # script-local: several scripts can be driven from one process
flags.DEFINE_string("model", None, "HF dir / hub id / pythia-jax checkpoint / .gguf",
                    flag_values=FLAGS)
flags.DEFINE_string("revision", None, "hub revision, e.g. step143000", flag_values=FLAGS)
flags.DEFINE_string("task", None, f"one of {', '.join(TASKS)}", flag_values=FLAGS)
flags.DEFINE_string("data", None, "lambada_openai: a .jsonl of {\"text\": ...} lines (default: "
                    "the shared LAMBADA test set); perplexity: a .bin/.idx prefix",
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
flags.DEFINE_string("tokenizer", None, "tokenizer.json / directory / hub id (default: the "
                    "model's own, else the bundled GPT-NeoX-20B tokenizer)", flag_values=FLAGS)
flags.DEFINE_string("output", None, "also write the JSON here", flag_values=FLAGS)
flags.DEFINE_bool("progress", False, "show a progress bar", flag_values=FLAGS)


def _err(msg: str) -> int:
    print(f"evaluate: error: {msg}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
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
        data = DEFAULT_LAMBADA
    if FLAGS.task == "lambada_openai" and not os.path.isfile(data):
        return _err(f"{data}: no such file (expected the LAMBADA test .jsonl; pass --data)")
    if FLAGS.limit is not None and FLAGS.limit < 1:
        return _err(f"--limit must be >= 1, got {FLAGS.limit}")

    import pythia_jax
    from pythia_jax import evaluate as ev
    from pythia_jax.tokenizer import load_tokenizer

    try:
        model = pythia_jax.from_pretrained(FLAGS.model, revision=FLAGS.revision, dtype=FLAGS.dtype)
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
        with open(FLAGS.output, "w") as fh:
            fh.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
