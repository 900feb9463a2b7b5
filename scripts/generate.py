r"""Continue a prompt with a Pythia model, printing the text as it is produced.

    python scripts/generate.py --model=EleutherAI/pythia-70m --revision=step143000 \
        --prompt="The capital of France is" --max_new_tokens=32
    python scripts/generate.py --model=hf_export/ --prompt="Once upon a time" \
        --max_new_tokens=64 --temperature=0.8 --top_k=50 --top_p=0.95 --seed=1

--model is anything `pythia_jax.from_pretrained` accepts (HF directory or hub id, pythia-jax
checkpoint, .gguf file). The tokenizer is the model's own tokenizer.json when it has one, else
the bundled GPT-NeoX-20B tokenizer. Generation stops at <|endoftext|> (unless --noeos) or after
--max_new_tokens tokens. --temperature=0 (the default) is greedy decoding.
"""

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import flags  # noqa: E402

from pythia_jax.attention import IMPLS as ATTENTION_IMPLS  # noqa: E402
from pythia_jax.cli import parse_model_flags  # noqa: E402

FLAGS = flags.FlagValues()  # script-local: several scripts can be driven from one process
flags.DEFINE_string("model", None, "HF dir / hub id / pythia-jax checkpoint / .gguf",
                    flag_values=FLAGS)
flags.DEFINE_string("revision", None, "hub revision, e.g. step143000", flag_values=FLAGS)
flags.DEFINE_string("prompt", None, "the text to continue", flag_values=FLAGS)
flags.DEFINE_integer("max_new_tokens", 64, "most tokens to generate", flag_values=FLAGS)
flags.DEFINE_float("temperature", 0.0, "0 = greedy; > 0 samples", flag_values=FLAGS)
flags.DEFINE_integer("top_k", None, "sample only among the k most likely tokens",
                     flag_values=FLAGS)
flags.DEFINE_float("top_p", None, "nucleus sampling: smallest set with this probability mass",
                   flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "sampling seed", flag_values=FLAGS)
flags.DEFINE_bool("eos", True, "stop at <|endoftext|>", flag_values=FLAGS)
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"], "parameter dtype",
                  flag_values=FLAGS)
flags.DEFINE_enum("compute_dtype", None, ["float32", "bfloat16", "float16"],
                  "activation / matmul dtype (default float32)", flag_values=FLAGS)
flags.DEFINE_enum("attention_impl", None, list(ATTENTION_IMPLS), "attention kernel (default: "
                  "the checkpoint's, else xla; auto picks pallas / splash on TPU, cudnn on GPU)",
                  flag_values=FLAGS)
flags.DEFINE_string("tokenizer", None, "tokenizer.json / directory / hub id (default: the "
                    "model's own, else the bundled GPT-NeoX-20B tokenizer)", flag_values=FLAGS)


def _err(msg: str) -> int:
    print(f"generate: error: {msg}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    error = parse_model_flags(FLAGS, argv)
    if error:
        return _err(error)
    if FLAGS.prompt is None or FLAGS.prompt == "":
        return _err("--prompt is empty: give the text to continue")
    if FLAGS.max_new_tokens < 1:
        return _err(f"--max_new_tokens must be >= 1, got {FLAGS.max_new_tokens}")

    import pythia_jax
    from pythia_jax.evaluate import tokenizer_for
    from pythia_jax.generation import stream_generate
    from pythia_jax.tokenizer import EOD_ID, load_tokenizer

    try:
        tok = load_tokenizer(FLAGS.tokenizer) if FLAGS.tokenizer else \
            tokenizer_for(FLAGS.model, FLAGS.revision)
        ids = tok.encode(FLAGS.prompt).ids
        if not ids:
            return _err("--prompt encodes to no tokens")
        model = pythia_jax.from_pretrained(FLAGS.model, revision=FLAGS.revision, dtype=FLAGS.dtype,
                                           compute_dtype=FLAGS.compute_dtype,
                                           **({"attention_impl": FLAGS.attention_impl}
                                              if FLAGS.attention_impl else {}))
        steps = stream_generate(model, [ids], FLAGS.max_new_tokens,
                                temperature=FLAGS.temperature, top_k=FLAGS.top_k,
                                top_p=FLAGS.top_p, seed=FLAGS.seed,
                                eos_token_id=EOD_ID if FLAGS.eos else [])
        out: list[int] = []
        shown = 0
        sys.stdout.write(FLAGS.prompt)
        sys.stdout.flush()
        for toks, _ in steps:
            t = int(toks[0])
            if FLAGS.eos and t == EOD_ID:
                break
            out.append(t)
            text = tok.decode(out)
            # hold back an incomplete UTF-8 character (byte-level BPE splits some)
            stable = len(text.rstrip("\ufffd"))
            if stable > shown:
                sys.stdout.write(text[shown:stable])
                sys.stdout.flush()
                shown = stable
        text = tok.decode(out)
        sys.stdout.write(text[shown:] + "\n")
        sys.stdout.flush()
    except (ValueError, TypeError, OSError) as e:
        return _err(str(e))
    return 0


def run():
    """Console command `pythia-jax-generate` (pyproject.toml [project.scripts])."""
    sys.exit(main())


if __name__ == "__main__":
    run()
