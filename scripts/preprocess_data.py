r"""Tokenize documents into Megatron/GPT-NeoX indexed datasets (`.bin` + `.idx`).

GPT-NeoX's `tools/preprocess_data.py`, with absl flags:

    python scripts/preprocess_data.py --input=a.jsonl,b.jsonl.zst --json_keys=text \
        --output_prefix=data/mydata --append_eod [--tokenizer=path/to/tokenizer.json] [--workers=4]

writes `data/mydata_text_document.{bin,idx}`: one item per non-empty document (its token ids,
then `<|endoftext|>` = 0 with --append_eod), uint16 for the 20B tokenizer. Inputs: `.jsonl`,
`.jsonl.zst`, `.jsonl.gz` (one JSON object per line) and `.txt` (one document per file).
--tokenizer defaults to the bundled GPT-NeoX-20B tokenizer. Bad input (malformed JSON, missing
key) stops with an error naming the file and line and leaves no output files.
"""

import sys

from absl import app, flags

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
flags.mark_flags_as_required(["input", "output_prefix"])


def main(argv):
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


if __name__ == "__main__":
    app.run(main)
