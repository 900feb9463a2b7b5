r"""Train a tuned lens (one affine translator per layer, the tuned-lens KL objective against the
model's own final logits) on token rows of an indexed dataset, and save it to a directory.

    python scripts/tuned_lens.py --model=EleutherAI/pythia-160m --revision=step143000 \
        --data=path/to/document --steps=250 --out=lens_160m [--batch_size=8] [--seq_len=512] \
        [--lr=1e-3] [--start_row=0] [--eval_rows=16]

Training reads rows start_row, start_row + 1, ... batch_size at a time (wrapping around the
rows it is given); the `eval_rows` rows after them are held out, and the mean KL per layer on
them is printed before and after training. `--out` gets tuned_lens.npz + tuned_lens.json,
written under a temporary name and renamed at the end (an existing --out is refused unless
--overwrite). Load it with `pythia_jax.interp.TunedLens.load(DIR)`.
"""

import os
import sys

from absl import flags

from pythia_jax.cli import parse_model_flags

FLAGS = flags.FlagValues()
flags.DEFINE_string("model", None, "HF dir / hub id / pythia-jax checkpoint / .gguf",
                    flag_values=FLAGS)
flags.DEFINE_string("revision", None, "hub revision, e.g. step143000", flag_values=FLAGS)
flags.DEFINE_string("data", None, ".bin/.idx prefix of token rows", flag_values=FLAGS)
flags.DEFINE_integer("steps", None, "optimizer steps", flag_values=FLAGS)
flags.DEFINE_string("out", None, "output directory", flag_values=FLAGS)
flags.DEFINE_bool("overwrite", False, "replace an existing --out", flag_values=FLAGS)
flags.DEFINE_integer("batch_size", 8, "rows per step", flag_values=FLAGS)
flags.DEFINE_integer("seq_len", 512, "tokens per row", flag_values=FLAGS)
flags.DEFINE_integer("train_rows", None, "rows to train on (default: every row before the "
                     "held-out ones)", flag_values=FLAGS)
flags.DEFINE_integer("start_row", 0, "first training row", flag_values=FLAGS)
flags.DEFINE_integer("eval_rows", 16, "held-out rows after the training rows", flag_values=FLAGS)
flags.DEFINE_float("lr", 1e-3, "Adam learning rate (linear warm-up over a tenth of the steps)",
                   flag_values=FLAGS)


def _err(msg: str) -> int:
    print(f"tuned_lens: error: {msg}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    error = parse_model_flags(FLAGS, argv)
    if error:
        return _err(error)
    for name in ("data", "steps", "out"):
        if getattr(FLAGS, name) is None:
            return _err(f"--{name} is required")
    for name in ("steps", "batch_size", "seq_len", "eval_rows"):
        if getattr(FLAGS, name) < 1:
            return _err(f"--{name} must be >= 1, got {getattr(FLAGS, name)}")
    if FLAGS.start_row < 0:
        return _err(f"--start_row must be >= 0, got {FLAGS.start_row}")
    if not FLAGS.lr > 0:
        return _err(f"--lr must be > 0, got {FLAGS.lr}")
    from pythia_jax import paths
    try:
        paths.check_available(FLAGS.out)
        if not paths.is_remote(FLAGS.out):  # a bucket has no folders to check
            out_parent = os.path.dirname(os.path.abspath(FLAGS.out))
            if not os.path.isdir(out_parent):
                return _err(f"--out={FLAGS.out}: no such directory {out_parent}")
        if paths.exists(FLAGS.out) and not FLAGS.overwrite:
            return _err(f"--out={FLAGS.out}: already exists (pass --overwrite to replace it)")
    except ImportError as e:
        return _err(str(e))

    import numpy as np

    import pythia_jax
    from pythia_jax import interp
    from pythia_jax.data.indexed import MMapIndexedDataset

    try:
        n_items = len(MMapIndexedDataset(FLAGS.data))
        train_rows = FLAGS.train_rows
        if train_rows is None:
            train_rows = n_items - FLAGS.start_row - FLAGS.eval_rows
        if train_rows < FLAGS.batch_size:
            return _err(f"--data={FLAGS.data}: {n_items} items leave {train_rows} training "
                        f"row(s) after --start_row={FLAGS.start_row} and --eval_rows="
                        f"{FLAGS.eval_rows}; need at least --batch_size={FLAGS.batch_size}")
        train = interp.read_token_rows(FLAGS.data, FLAGS.start_row, train_rows, FLAGS.seq_len)
        held = interp.read_token_rows(FLAGS.data, FLAGS.start_row + train_rows, FLAGS.eval_rows,
                                      FLAGS.seq_len)
        model = pythia_jax.from_pretrained(FLAGS.model, revision=FLAGS.revision)

        def batches():
            for step in range(FLAGS.steps):
                rows = (step * FLAGS.batch_size + np.arange(FLAGS.batch_size)) % len(train)
                yield train[rows]

        before = interp.TunedLens.identity(model).kl(model, held)
        lens, losses = interp.train_tuned_lens(
            model, batches(), steps=FLAGS.steps, lr=FLAGS.lr,
            log=lambda s, v: print(f"tuned_lens: step {s}: train KL {v:.4f}", file=sys.stderr)
            if s % max(1, FLAGS.steps // 10) == 0 else None)
        after = lens.kl(model, held)
        lens.info.update(model=FLAGS.model, revision=FLAGS.revision, data=FLAGS.data,
                         held_out_kl_before=[float(x) for x in before],
                         held_out_kl_after=[float(x) for x in after])
        lens.save(FLAGS.out, overwrite=FLAGS.overwrite)
    except (ValueError, TypeError, OSError) as e:
        return _err(str(e))
    for layer, (b, a) in enumerate(zip(before, after)):
        print(f"layer {layer}: held-out KL {b:.4f} (logit lens) -> {a:.4f} (tuned)")
    print(f"tuned_lens: wrote {FLAGS.out}")
    return 0


def run():
    """Console command `pythia-jax-tuned-lens` (pyproject.toml [project.scripts])."""
    sys.exit(main(sys.argv))


if __name__ == "__main__":
    run()
