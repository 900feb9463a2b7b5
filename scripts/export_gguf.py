"""Export a checkpoint to a llama.cpp GGUF file (architecture `gptneox`).

    python scripts/export_gguf.py --src=EleutherAI/pythia-160m --dst=pythia-160m-f16.gguf --type=f16
    python scripts/export_gguf.py --src=runs/smoke --dst=smoke-q8_0.gguf --type=q8_0
    python scripts/export_gguf.py --src=hf_dir/ --dst=model-q4_k_m.gguf --type=q4_k_m

--src is anything `pythia_jax.from_pretrained` accepts: an HF directory or hub id (with
--revision=step3000), a pythia-jax model directory, a training workdir (its latest checkpoint) or
a step directory, or another GGUF file (re-quantize).

--type: f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1 are written directly (gguf package, numpy);
the K-quants q2_k, q3_k_s, q3_k_m, q3_k_l, q4_k_s, q4_k_m, q5_k_s, q5_k_m, q6_k go through
llama.cpp's quantizer (needs llama-cpp-python) from a temporary --intermediate file.

Memory: the model (use --dtype=auto, the default, to keep fp16 hub weights in fp16) plus one
tensor. The output is written under a temporary name beside --dst and renamed when complete; an
existing --dst is refused unless --overwrite.
"""

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import app, flags  # noqa: E402

from pythia_jax.cli import run_app  # noqa: E402

from pythia_jax.gguf import EXPORT_TYPES  # noqa: E402

flags.DEFINE_string("src", None, "source checkpoint (HF dir / hub id / pythia-jax dir / workdir / "
                    ".gguf)")
flags.DEFINE_string("dst", None, "destination .gguf file")
flags.DEFINE_enum("type", None, list(EXPORT_TYPES), "GGUF tensor type", case_sensitive=False)
flags.DEFINE_string("revision", None, "hub revision, e.g. step3000 (hub ids only)")
flags.DEFINE_enum("dtype", "auto", ["auto", "float32", "bfloat16", "float16"],
                  "dtype the model is loaded in (auto: as the source stores it)")
flags.DEFINE_string("tokenizer", None, "tokenizer.json to embed (default: the bundled "
                    "GPT-NeoX-20B tokenizer)")
flags.DEFINE_string("name", None, "general.name (default: the destination file name)")
flags.DEFINE_enum("intermediate", "f16", ["f32", "f16", "bf16"],
                  "K-quants: type of the temporary file llama.cpp quantizes from")
flags.DEFINE_integer("threads", None, "K-quants: llama.cpp quantizer threads (default: all)")
flags.DEFINE_bool("overwrite", False, "replace an existing destination")
flags.DEFINE_bool("progress", True, "show a progress bar")
flags.DEFINE_bool("verbose", False, "show llama.cpp's quantizer log")
flags.mark_flags_as_required(["src", "dst", "type"])
FLAGS = flags.FLAGS


def main(argv):
    from pythia_jax.cli import exit_on_sigterm

    exit_on_sigterm("export_gguf")
    from pythia_jax import progress
    progress.console()
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import tempfile

    import pythia_jax
    from pythia_jax import gguf as gguf_lib
    from pythia_jax import paths

    dst = paths.abspath(FLAGS.dst)
    try:
        for p in (FLAGS.src, dst):
            paths.check_available(p)
        if paths.isdir(dst):
            print(f"export_gguf: error: {dst}: is a directory; expected a .gguf file path",
                  file=sys.stderr)
            return 2
        if paths.exists(dst) and not FLAGS.overwrite:
            print(f"export_gguf: error: {dst}: already exists; pass --overwrite to replace it",
                  file=sys.stderr)
            return 2
        name = FLAGS.name or paths.basename(FLAGS.src)
        if name.endswith(".gguf"):
            name = name[: -len(".gguf")]
        model = pythia_jax.from_pretrained(FLAGS.src, revision=FLAGS.revision, dtype=FLAGS.dtype,
                                           progress=FLAGS.progress)
        export = dict(tokenizer=FLAGS.tokenizer, name=name, overwrite=FLAGS.overwrite,
                      progress=FLAGS.progress, intermediate=FLAGS.intermediate,
                      threads=FLAGS.threads, verbose=FLAGS.verbose)
        if paths.is_remote(dst):  # written locally (llama.cpp needs a file), uploaded whole
            with tempfile.TemporaryDirectory(prefix="export_gguf-") as tmp:
                local = os.path.join(tmp, paths.basename(dst))
                gguf_lib.export_gguf(model, local, FLAGS.type.lower(), **export)
                paths.upload(local, dst)
        else:
            gguf_lib.export_gguf(model, dst, FLAGS.type.lower(), **export)
    except (ValueError, OSError, ImportError) as e:
        print(f"export_gguf: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {FLAGS.type.lower()} GGUF to {dst} ({paths.size(dst) / 2**20:.1f} MiB)")
    return 0


def run():
    """Console command `pythia-jax-export-gguf` (pyproject.toml [project.scripts])."""
    run_app(main, __name__)


if __name__ == "__main__":
    run()
