r"""Merge Pythia's byte shards `NAME-00000-of-000NN.bin` ... into `NAME.bin` (streaming).

    python scripts/unshard.py --input=path/document-00000-of-00020.bin \
        [--num_shards=21] [--output=path/document.bin | --output_dir=merged/] \
        [--hashes=shard_hashes.txt] [--sha256=<hash of the merged file>]

The shard count is read from the name (`-of-{last}` with last = num_shards - 1); --num_shards,
when given, must agree. With --hashes (lines `<file> <sha256>`, as Pythia's
`utils/shard_hashes.txt`) every shard is verified while it is copied; on any mismatch the
output is not created. Remember to copy the `.idx` next to the merged `.bin`.

Merging is optional: the shards beside `NAME.idx` (locally or in a gs:// bucket) are read in
place by training and every tool. `--verify_only --hashes=FILE` checks them there and writes
nothing.
"""

import os
import sys

from absl import app, flags

from pythia_jax.cli import exit_on_sigterm, run_app

FLAGS = flags.FLAGS
flags.DEFINE_string("input", None, "The first shard, NAME-00000-of-000NN.bin.")
flags.DEFINE_alias("input_file", "input")
flags.DEFINE_integer("num_shards", None, "Total shards (default: from the name).", lower_bound=1)
flags.DEFINE_string("output", None, "Merged file (default NAME.bin next to the shards).")
flags.DEFINE_string("output_dir", None, "Pythia's unshard_memmap flag: write NAME.bin into this "
                    "folder (created if missing); instead of --output.")
flags.DEFINE_string("hashes", None, "Hash list to verify each shard against.")
flags.DEFINE_string("sha256", None, "Expected sha256 of the merged file.")
flags.DEFINE_boolean("overwrite", False, "Replace an existing output file.")
flags.DEFINE_boolean("progress", True, "Show a progress bar.")
flags.DEFINE_boolean("verify_only", False, "Only check the shards against --hashes where they "
                     "lie (local or gs://; training and the other tools read them in place, "
                     "beside NAME.idx) and write nothing.")
flags.mark_flag_as_required("input")


def main(argv):
    exit_on_sigterm("unshard")
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from pythia_jax.data.shards import ShardError, parse_shard_name, unshard

    if FLAGS.verify_only:
        return verify_in_place()
    output = FLAGS.output
    if FLAGS.output_dir is not None:  # Pythia's utils/unshard_memmap.py: DIR/NAME.bin
        if output is not None:
            raise app.UsageError("give --output=FILE or --output_dir=DIR, not both")
        try:
            base = parse_shard_name(FLAGS.input)[0]
            os.makedirs(FLAGS.output_dir, exist_ok=True)
        except (ShardError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        output = os.path.join(FLAGS.output_dir, os.path.basename(base) + ".bin")
    try:
        out = unshard(FLAGS.input, num_shards=FLAGS.num_shards, output=output,
                      hashes=FLAGS.hashes, expected_sha256=FLAGS.sha256,
                      overwrite=FLAGS.overwrite, progress=FLAGS.progress)
    except (ShardError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}" + (" (all shard hashes verified)" if FLAGS.hashes else ""))
    return 0


def verify_in_place() -> int:
    """--verify_only: the dataset NAME (its .idx and shards) opened with the hash list."""
    from pythia_jax.data.indexed import IndexedDatasetError, MMapIndexedDataset
    from pythia_jax.data.shards import parse_shard_name

    if not FLAGS.hashes:
        raise app.UsageError("--verify_only needs --hashes=FILE (lines '<file> <sha256>')")
    try:
        base, _, count = parse_shard_name(FLAGS.input)
        MMapIndexedDataset(base, hashes=FLAGS.hashes)
    except (IndexedDatasetError, OSError) as e:  # ShardError is an IndexedDatasetError
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{count} shards of {base} match {FLAGS.hashes}; read them in place with "
          f"--data={base}")
    return 0


def run():
    """Console command `pythia-jax-unshard` (pyproject.toml [project.scripts])."""
    run_app(main, __name__)


if __name__ == "__main__":
    run()
