r"""The tokens Pythia trained on at given steps (Pythia's `utils/batch_viewer.py`, absl flags).

    python scripts/batch_viewer.py --data=path/to/document --start_step=S --end_step=E \
        --out=indicies.npy [--decode]

saves items [S*1024, (E+1)*1024) of the pre-shuffled dataset (steps S..E inclusive) as an
array of shape [(E-S+1)*1024, 2049] in the stored dtype (uint16 for Pythia's files), streamed to
disk step by step. --decode prints each row as text. --batch_size / --seq_len for small data.
"""

import os
import sys
import tempfile

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("data", None, "Dataset prefix (without .bin/.idx), e.g. .../document.")
flags.DEFINE_integer("start_step", 0, "First step (0-indexed).", lower_bound=0)
flags.DEFINE_integer("end_step", None, "Last step, inclusive (default: start_step).")
flags.DEFINE_string("out", None, "Output .npy file.")
flags.DEFINE_boolean("decode", False, "Print the text of every row.")
flags.DEFINE_integer("decode_limit", 0, "With --decode: rows printed at most (0 = all).",
                     lower_bound=0)
flags.DEFINE_string("tokenizer", None, "Tokenizer for --decode (default: bundled 20B).")
flags.DEFINE_integer("batch_size", 1024, "Sequences per step.", lower_bound=1)
flags.DEFINE_integer("seq_len", 2048, "Tokens per sequence (items hold seq_len + 1).",
                     lower_bound=1)
flags.mark_flag_as_required("data")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import numpy as np

    from pythia_jax.data.indexed import IndexedDatasetError
    from pythia_jax.data.order import PythiaOrder

    start = FLAGS.start_step
    end = start if FLAGS.end_step is None else FLAGS.end_step
    if end < start:
        raise app.UsageError(f"--end_step={end} is before --start_step={start}")
    if FLAGS.out is None and not FLAGS.decode:
        raise app.UsageError("nothing to do: give --out=FILE.npy and/or --decode")
    try:
        order = PythiaOrder(FLAGS.data, batch_size=FLAGS.batch_size, seq_len=FLAGS.seq_len)
        order.item_range(end)  # step past the end: fail before writing anything
    except (IndexedDatasetError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    n_steps = end - start + 1
    B = order.batch_size
    if FLAGS.out:
        out = FLAGS.out
        folder = os.path.dirname(os.path.abspath(out))
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(out)}.", suffix=".tmp")
        os.close(fd)
        try:
            arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=order.dtype,
                                            shape=(n_steps * B, order.item_len))
            for k, step in enumerate(range(start, end + 1)):
                arr[k * B:(k + 1) * B] = order.batch(step)
            arr.flush()
            del arr
            mask = os.umask(0o022)
            os.umask(mask)
            os.chmod(tmp, 0o666 & ~mask)
            os.replace(tmp, out)
        except BaseException as e:
            if os.path.exists(tmp):
                os.remove(tmp)
            if isinstance(e, IndexedDatasetError):
                print(f"error: {e}", file=sys.stderr)
                return 1
            raise
        print(f"saved steps {start}..{end}: [{n_steps * B}, {order.item_len}] {order.dtype} "
              f"-> {out}")
    if FLAGS.decode:
        from pythia_jax.tokenizer import load_tokenizer

        tok = load_tokenizer(FLAGS.tokenizer)
        shown = 0
        for step in range(start, end + 1):
            batch = order.batch(step)
            for r in range(B):
                if FLAGS.decode_limit and shown >= FLAGS.decode_limit:
                    return 0
                item = step * B + r
                print(f"=== step {step} row {r} (item {item}) ===")
                print(tok.decode(batch[r].tolist(), skip_special_tokens=False))
                shown += 1
    return 0


if __name__ == "__main__":
    app.run(main)
