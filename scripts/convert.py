"""Convert checkpoints between HF PyTorch format and pythia-jax (orbax) format.

    python scripts/convert.py --src=EleutherAI/pythia-160m --revision=step3000 --dst=ckpt/ --to=jax
    python scripts/convert.py --src=ckpt/ --dst=hf_export/ --to=hf [--dtype=float16]
    python scripts/convert.py --src=runs/smoke --dst=hf_export/ --to=hf     # latest training step

--src is anything `pythia_jax.from_pretrained` accepts: an HF directory or hub id, a pythia-jax
model directory, a training workdir (its latest checkpoint) or a step directory, a .gguf file.
--src and --dst may be gs:// URLs (the `gcs` extra). The destination is written under a
temporary name and renamed when complete (uploaded when complete, for a URL); an existing
destination is refused unless --overwrite. Memory: one copy of the weights plus one tensor.
"""

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import app, flags  # noqa: E402

from pythia_jax.cli import run_app  # noqa: E402

flags.DEFINE_string("src", None, "source checkpoint (HF dir / hub id / pythia-jax dir / workdir)")
flags.DEFINE_string("dst", None, "destination directory")
flags.DEFINE_enum("to", None, ["jax", "hf"], "output format")
flags.DEFINE_string("revision", None, "hub revision, e.g. step3000 (hub ids only)")
flags.DEFINE_enum("dtype", "auto", ["auto", "float32", "bfloat16", "float16"],
                  "parameter dtype written (auto: as stored in the source)")
flags.DEFINE_string("max_shard_size", "5GB", "HF output: safetensors shard size limit")
flags.DEFINE_bool("overwrite", False, "replace an existing destination")
flags.DEFINE_bool("progress", True, "show a progress bar")
flags.mark_flags_as_required(["src", "dst", "to"])
FLAGS = flags.FLAGS


def main(argv):
    from pythia_jax.cli import exit_on_sigterm

    exit_on_sigterm("convert")
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import pythia_jax
    from pythia_jax import checkpoint, paths

    dst = paths.abspath(FLAGS.dst)
    try:
        for p in (FLAGS.src, dst):
            paths.check_available(p)
        if (paths.exists(dst) and not FLAGS.overwrite
                and (not paths.isdir(dst) or paths.listdir(dst))):
            print(f"convert: error: {dst}: already exists; pass --overwrite to replace it",
                  file=sys.stderr)
            return 2
        model = pythia_jax.from_pretrained(FLAGS.src, revision=FLAGS.revision, dtype=FLAGS.dtype,
                                           progress=FLAGS.progress)
        if FLAGS.to == "jax":
            checkpoint.save_model(model, dst, overwrite=FLAGS.overwrite)
        else:
            pythia_jax.save_pretrained(model, dst, overwrite=FLAGS.overwrite,
                                       max_shard_size=FLAGS.max_shard_size,
                                       progress=FLAGS.progress)
    except (ValueError, OSError, ImportError) as e:
        print(f"convert: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {FLAGS.to} checkpoint to {dst}")
    return 0


def run():
    """Console command `pythia-jax-convert` (pyproject.toml [project.scripts])."""
    run_app(main, __name__)


if __name__ == "__main__":
    run()
