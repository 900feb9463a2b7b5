r"""The tokens Pythia trained on at given steps (Pythia's `utils/batch_viewer.py`, absl flags).

    python scripts/batch_viewer.py --data=path/to/document --start_step=S --end_step=E \
        --out=indicies.npy [--decode]

saves items [S*1024, (E+1)*1024) of the pre-shuffled dataset (steps S..E inclusive) as an
array of shape [(E-S+1)*1024, 2049] in the stored dtype (uint16 for Pythia's files), streamed to
disk step by step. --decode prints each row as text. --batch_size / --seq_len for small data.
Pythia's own command line works too: `--load_path=DOC --start_iteration=S --end_iteration=E
--save_path=DIR` writes DIR/indicies.npy (the same steps S..E, inclusive).
"""

import errno
import os
import sys

from absl import app, flags

from pythia_jax.cli import atomic_output, exit_on_sigterm, output_path_error, run_app

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
# Pythia's utils/batch_viewer.py spellings: the same steps (end inclusive there too).
flags.DEFINE_alias("start_iteration", "start_step")
flags.DEFINE_alias("end_iteration", "end_step")
flags.DEFINE_alias("load_path", "data")
flags.DEFINE_string("save_path", None, "Pythia's flag: a folder; writes SAVE_PATH/indicies.npy "
                    "(the folder is created). Instead of --out.")
flags.DEFINE_string("conf_dir", None, "Accepted for Pythia's command lines and ignored (its "
                    "batch_viewer.py does not read it either).")
flags.mark_flag_as_required("data")


def _write_npy(tmp: str, order, start: int, end: int) -> None:
    """Steps start..end of `order` as one .npy array in `tmp`: the file's full size is
    allocated first (a full disk fails here, before any work: no sparse file, no SIGBUS), then
    each step's rows are written in turn."""
    import numpy as np

    n_rows = (end - start + 1) * order.batch_size
    header = {"descr": np.lib.format.dtype_to_descr(order.dtype), "fortran_order": False,
              "shape": (n_rows, order.item_len)}
    with open(tmp, "wb") as fh:
        np.lib.format.write_array_header_1_0(fh, header)
        fh.flush()
        body = n_rows * order.item_len * order.dtype.itemsize
        os.posix_fallocate(fh.fileno(), 0, fh.tell() + body)
        for step in range(start, end + 1):
            fh.write(np.ascontiguousarray(order.batch(step)).data)
        fh.flush()
        os.fsync(fh.fileno())


def main(argv):
    exit_on_sigterm("batch_viewer")
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from pythia_jax.data.indexed import IndexedDatasetError
    from pythia_jax.data.order import PythiaOrder

    start = FLAGS.start_step
    end = start if FLAGS.end_step is None else FLAGS.end_step
    if end < start:
        raise app.UsageError(f"--end_step={end} is before --start_step={start}")
    if FLAGS.save_path is not None:  # Pythia: os.makedirs(save_path); save_path/indicies.npy
        if FLAGS.out is not None:
            raise app.UsageError("give --out=FILE.npy or --save_path=DIR, not both")
        try:
            os.makedirs(FLAGS.save_path, exist_ok=True)
        except OSError as e:
            print(f"error: --save_path={FLAGS.save_path}: {e.strerror or e}", file=sys.stderr)
            return 1
        FLAGS.out = os.path.join(FLAGS.save_path, "indicies.npy")
    if FLAGS.out is None and not FLAGS.decode:
        raise app.UsageError("nothing to do: give --out=FILE.npy and/or --decode")
    if FLAGS.out is not None:
        error = output_path_error(FLAGS.out, "--out")
        if error:
            print(f"error: {error}", file=sys.stderr)
            return 1
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
        try:
            with atomic_output(out) as tmp:
                _write_npy(tmp, order, start, end)
        except IndexedDatasetError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        except OSError as e:
            why = ("no space left on the device" if e.errno == errno.ENOSPC else
                   "file too large for this process or file system" if e.errno == errno.EFBIG
                   else e.strerror or str(e))
            size = n_steps * B * order.item_len * order.dtype.itemsize
            print(f"error: --out={out}: {why} (the array needs {size:,} bytes); nothing was "
                  "written", file=sys.stderr)
            return 1
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


def run():
    """Console command `pythia-jax-batch-viewer` (pyproject.toml [project.scripts])."""
    run_app(main, __name__)


if __name__ == "__main__":
    run()
