r"""Tokenize documents into Megatron/GPT-NeoX indexed datasets (`.bin` + `.idx`).

GPT-NeoX's `tools/preprocess_data.py`, with absl flags:

    python scripts/preprocess_data.py --input=a.jsonl,b.jsonl.zst --json_keys=text \
        --output_prefix=data/mydata --append_eod [--tokenizer=path/to/tokenizer.json] [--workers=4]

writes `data/mydata_text_document.{bin,idx}`: one item per non-empty document (its token ids,
then `<|endoftext|>` = 0 with --append_eod), uint16 for the 20B tokenizer. Inputs: `.jsonl`,
`.jsonl.zst`, `.jsonl.gz` (one JSON object per line) and `.txt` (one document per file).
--tokenizer defaults to the bundled GPT-NeoX-20B tokenizer. Bad input (malformed JSON, missing
key) stops with an error naming the file and line and leaves no output files.
GPT-NeoX's spellings work too: `--input=a.jsonl --output-prefix=data/mydata --tokenizer-type
HFTokenizer --vocab-file 20B_tokenizer.json --append-eod --jsonl-keys text`.
"""

import sys

from absl import app, flags

from pythia_jax.cli import exit_on_sigterm, run_app

FLAGS = flags.FLAGS
flags.DEFINE_list("input", None, "Comma-separated input files (.jsonl, .jsonl.zst, .jsonl.gz, "
                  ".txt).")
flags.DEFINE_list("json_keys", ["text"], "JSON keys to tokenize; one output dataset per key.")
flags.DEFINE_string("output_prefix", None, "Output prefix: writes PREFIX_{key}_document.{bin,idx}.")
flags.DEFINE_string("tokenizer", None, "tokenizer.json (or a folder holding one); default: the "
                    "bundled GPT-NeoX-20B tokenizer.")
flags.DEFINE_alias("vocab_file", "tokenizer")
flags.DEFINE_boolean("append_eod", False, "Append <|endoftext|> (id 0) to every document.")
flags.DEFINE_integer("workers", 1, "Tokenizer processes.", lower_bound=1)
flags.DEFINE_boolean("progress", True, "Show a progress bar (documents/s, tokens/s).")
flags.DEFINE_enum("tokenizer_type", "HFTokenizer", ["HFTokenizer"], "GPT-NeoX's "
                  "--tokenizer-type: only HFTokenizer (a tokenizer.json, --vocab-file) is supported.")
flags.mark_flags_as_required(["input", "output_prefix"])

#: GPT-NeoX tools/datasets/preprocess_data.py spellings -> ours (same meaning; --jsonl-keys takes
#: space-separated keys there, a comma list here).
NEOX_FLAGS = {"--output-prefix": "--output_prefix", "--tokenizer-type": "--tokenizer_type",
              "--vocab-file": "--tokenizer", "--append-eod": "--append_eod",
              "--jsonl-keys": "--json_keys"}


def neox_argv(argv: list[str]) -> list[str]:
    """`argv` with GPT-NeoX's flag names turned into ours: `--output-prefix X` ->
    `--output_prefix X`, `--jsonl-keys text title` -> `--json_keys=text,title`."""
    out, i = [argv[0]], 1
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            out += argv[i:]
            break
        name, sep, value = arg.partition("=")
        if name == "--jsonl-keys":
            keys = [value] if sep else []
            while not sep and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
                i += 1
                keys.append(argv[i])
            arg = f"--json_keys={','.join(keys)}"
        elif name in NEOX_FLAGS:
            arg = NEOX_FLAGS[name] + sep + value
        out.append(arg)
        i += 1
    return out


def main(argv):
    exit_on_sigterm("preprocess_data")
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from pythia_jax.data.indexed import MMapIndexedDataset
    from pythia_jax.data.preprocess import PreprocessError, tokenize_to_indexed

    try:
        prefixes = tokenize_to_indexed(FLAGS.input, FLAGS.output_prefix, tokenizer=FLAGS.tokenizer,
                                       json_keys=FLAGS.json_keys, append_eod=FLAGS.append_eod,
                                       workers=FLAGS.workers, progress=FLAGS.progress)
    except (PreprocessError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for key, prefix in prefixes.items():
        ds = MMapIndexedDataset(prefix)
        print(f"{key}: {prefix}.{{bin,idx}}: {len(ds)} documents, {ds.num_tokens} tokens, "
              f"{ds.dtype}")
    return 0


def run():
    """Console command `pythia-jax-preprocess` (pyproject.toml [project.scripts])."""
    run_app(main, __name__, neox_argv(sys.argv))


if __name__ == "__main__":
    run()
