r"""Memorization of pre-shuffled training rows as in the Pythia paper (32-token prompt, 32 greedy
tokens, score = matches / 32); writes one CSV line per row, resumably.

    python scripts/memorization.py --model=EleutherAI/pythia-160m --revision=step143000 \
        --data=path/to/pile-standard-pythia-preshuffled/document \
        --start_row=0 --end_row=1024 --out=mem.csv [--batch_size=64] [--compute_dtype=float16]

Columns: row,matches,score,first_mismatch,true_logprob (first_mismatch = 32 when the whole
continuation matches; true_logprob = teacher-forced log p of tokens[32:64]). Rerunning with the
same --out skips the rows already there. On a pod every host scores its share of the rows into
its own file (OUT with .processP-of-N before the extension).
"""

import os
import sys

from absl import flags

from pythia_jax.cli import parse_model_flags

FLAGS = flags.FlagValues()
flags.DEFINE_string("model", None, "HF dir / hub id / pythia-jax checkpoint / .gguf",
                    flag_values=FLAGS)
flags.DEFINE_string("revision", None, "hub revision, e.g. step143000", flag_values=FLAGS)
flags.DEFINE_string("data", None, ".bin/.idx prefix of the pre-shuffled stream",
                    flag_values=FLAGS)
flags.DEFINE_integer("start_row", None, "first row (dataset item)", flag_values=FLAGS)
flags.DEFINE_integer("end_row", None, "one past the last row", flag_values=FLAGS)
flags.DEFINE_string("out", None, "results CSV (appended to; rows already there are skipped)",
                    flag_values=FLAGS)
flags.DEFINE_integer("batch_size", 64, "rows per compiled call", flag_values=FLAGS)
flags.DEFINE_enum("compute_dtype", "float32", ["float32", "bfloat16", "float16"],
                  "activation dtype (the paper ran fp16; near-ties can flip a greedy token "
                  "between precisions)", flag_values=FLAGS)
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"], "parameter dtype",
                  flag_values=FLAGS)
flags.DEFINE_bool("suppress_eos", True, "never generate <|endoftext|> (what the paper's "
                  "HF generate(min_length=64) does)", flag_values=FLAGS)


def _err(msg: str) -> int:
    print(f"memorization: error: {msg}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    error = parse_model_flags(FLAGS, argv)
    if error:
        return _err(error)
    for name in ("data", "start_row", "end_row", "out"):
        if getattr(FLAGS, name) is None:
            return _err(f"--{name} is required")
    if FLAGS.batch_size < 1:
        return _err(f"--batch_size must be >= 1, got {FLAGS.batch_size}")
    if FLAGS.start_row < 0 or FLAGS.end_row <= FLAGS.start_row:
        return _err(f"expected 0 <= --start_row < --end_row, got {FLAGS.start_row}, "
                    f"{FLAGS.end_row}")
    out_dir = os.path.dirname(os.path.abspath(FLAGS.out))
    if not os.path.isdir(out_dir):
        return _err(f"--out={FLAGS.out}: no such directory {out_dir}")

    import pythia_jax
    from pythia_jax.research import memorization as mem

    try:
        ds = mem.open_rows(FLAGS.data)
        mem.check_row_range(ds, FLAGS.start_row, FLAGS.end_row)
        mem.read_done_rows(mem.host_output_path(FLAGS.out))  # a bad CSV fails before loading
        model = pythia_jax.from_pretrained(FLAGS.model, revision=FLAGS.revision,
                                           dtype=FLAGS.dtype, compute_dtype=FLAGS.compute_dtype)
        res = mem.run_memorization(model, ds, FLAGS.start_row, FLAGS.end_row, FLAGS.out,
                                   batch_size=FLAGS.batch_size, suppress_eos=FLAGS.suppress_eos,
                                   log=lambda m: print(m, file=sys.stderr))
    except (ValueError, TypeError, OSError) as e:
        return _err(str(e))
    print(f"memorization: {res['computed']} row(s) scored, {res['skipped']} already in "
          f"{res['path']}")
    return 0


def run():
    """Console command `pythia-jax-memorization` (pyproject.toml [project.scripts])."""
    sys.exit(main())


if __name__ == "__main__":
    run()
