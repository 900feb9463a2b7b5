r"""Merge Pythia's byte shards `NAME-00000-of-000NN.bin` ... into `NAME.bin` (streaming).

    python scripts/unshard.py --input=path/document-00000-of-00020.bin \
        [--num_shards=21] [--output=path/document.bin] \
        [--hashes=shard_hashes.txt] [--sha256=<hash of the merged file>]

The shard count is read from the name (`-of-{last}` with last = num_shards - 1); --num_shards,
when given, must agree. With --hashes (lines `<file> <sha256>`, as Pythia's
`utils/shard_hashes.txt`) every shard is verified while it is copied; on any mismatch the
output is not created. Remember to copy the `.idx` next to the merged `.bin`.
"""

import sys

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("input", None, "The first shard, NAME-00000-of-000NN.bin.")
flags.DEFINE_alias("input_file", "input")
flags.DEFINE_integer("num_shards", None, "Total shards (default: from the name).", lower_bound=1)
flags.DEFINE_string("output", None, "Merged file (default NAME.bin next to the shards).")
flags.DEFINE_string("hashes", None, "Hash list to verify each shard against.")
flags.DEFINE_string("sha256", None, "Expected sha256 of the merged file.")
flags.DEFINE_boolean("overwrite", False, "Replace an existing output file.")
flags.DEFINE_boolean("progress", True, "Show a progress bar.")
flags.mark_flag_as_required("input")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from pythia_jax.data.shards import ShardError, unshard

    try:
        out = unshard(FLAGS.input, num_shards=FLAGS.num_shards, output=FLAGS.output,
                      hashes=FLAGS.hashes, expected_sha256=FLAGS.sha256,
                      overwrite=FLAGS.overwrite, progress=FLAGS.progress)
    except (ShardError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}" + (" (all shard hashes verified)" if FLAGS.hashes else ""))
    return 0


if __name__ == "__main__":
    app.run(main)
