r"""Compile the real training step for a TPU slice on a CPU-only machine and report what it needs.

    pip install 'pythia-jax[tpu]'        # libtpu: the TPU compiler, no TPU needed
    python scripts/aot_report.py --model=pythia-1b --topology=v5p:2x4x4 \
        --mesh=data:-1,fsdp:32,tensor:1 --batch=1024 --microbatch=16 --remat=full

With only `--model` and `--topology` it takes the training config's remat and the largest
power-of-two microbatch that fits (compiling the candidates; the report says what it chose).
Prints per-device memory against the chip's HBM (fits or not), FLOPs per step (attention
counted causally, PaLM's full count beside it), the collectives per step with an ICI lower
bound, two estimated step times (XLA's roofline `optimal_seconds`, and libtpu's summed per-op
cycles) and the MFU each implies, and the Pallas kernels without a cost estimate; `--json=FILE`
also writes the report as JSON (`fits`, `mfu.roofline`, `mfu.cycles`, `flops_convention`, ...),
atomically, and nothing on a bad request. How
the figures are measured: `pythia_jax.aot` (this script is its command line). Any field of the
training config (`pythia_jax.configs.pythia`) can be overridden with `--config.FIELD=VALUE` or
`--set=FIELD=VALUE`, e.g. `--config.model.num_layers=4`.
"""

from __future__ import annotations

import json
import os
import sys

# The process computes on the CPU; libtpu is loaded only as the TPU compiler.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app, flags  # noqa: E402

from pythia_jax import aot  # noqa: E402
from pythia_jax.cli import (exit_on_sigterm, output_path_error, run_app,  # noqa: E402
                            write_text_atomic)

_MODEL = flags.DEFINE_string("model", "pythia-1b", "Pythia size (pythia-70m … pythia-12b)")
_TOPOLOGY = flags.DEFINE_string("topology", "v5p:2x2x1",
                                "TPU topology, CHIP:SHAPE, e.g. v5e:2x4, v5p:4x4x4, v6e:4x4")
_MESH = flags.DEFINE_string("mesh", "data:-1,fsdp:1,tensor:1",
                            "mesh axis sizes, e.g. data:-1,fsdp:8,tensor:1 (-1: the rest)")
_BATCH = flags.DEFINE_integer("batch", 1024, "global batch in sequences (Pythia: 1024)")
_SEQ = flags.DEFINE_integer("seq_len", 2048, "sequence length (Pythia: 2048)")
_MICRO = flags.DEFINE_integer("microbatch", None, "sequences per device per microbatch "
                              "(gradient accumulation = rows per device / this); 0 = none; "
                              "default: the largest power of two that fits (searched by "
                              "compiling)")
_ACCUM = flags.DEFINE_integer("grad_accum", 0, "gradient accumulation steps (overrides "
                              "--microbatch); 0 = from --microbatch")
_REMAT = flags.DEFINE_enum("remat", None, list(aot.REMAT_POLICIES),
                           "remat policy (default: the training config's)")
_SCAN = flags.DEFINE_bool("scan_layers", True, "scan over the stacked layers")
_ATTN = flags.DEFINE_enum("attention", "pallas", list(aot.ATTENTION_IMPLS),
                          "attention implementation compiled into the step")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "compute dtype")
_COST = flags.DEFINE_enum("cost", "extrapolate", list(aot.COST_METHODS),
                          "how FLOPs / estimated time are measured (see pythia_jax.aot); "
                          "check: extrapolate, and also compile the full unrolled step to "
                          "compare")
_JSON = flags.DEFINE_string("json", None, "also write the report as JSON to this file")
_SET = flags.DEFINE_multi_string("set", [], "override a training-config field, e.g. "
                                 "--set=model.num_layers=4 --set=optim.skip_nonfinite=False "
                                 "(the same as --config.model.num_layers=4)")

_CONFIG_PREFIX = "--config."


def config_overrides_as_set(argv: list[str]) -> list[str]:
    """`--config.a.b=V` (or `--config.a.b V`) -> `--set=a.b=V`: the training-config overrides
    spelled as scripts/train.py spells them."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith(_CONFIG_PREFIX):
            field, sep, value = arg[len(_CONFIG_PREFIX):].partition("=")
            if sep or i + 1 < len(argv):  # else absl reports the flag without a value
                if not sep:
                    i, value = i + 1, argv[i + 1]
                arg = f"--set={field}={value}"
        out.append(arg)
        i += 1
    return out


def _err(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


def main(argv):
    exit_on_sigterm("aot_report")
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _JSON.value:  # before the compiles, not after them
        error = output_path_error(_JSON.value, "--json")
        if error:
            return _err(error)
    try:
        r = aot.report(_MODEL.value, _TOPOLOGY.value, aot.parse_mesh(_MESH.value),
                       batch=_BATCH.value, seq_len=_SEQ.value, microbatch=_MICRO.value,
                       grad_accum=_ACCUM.value, remat=_REMAT.value, scan_layers=_SCAN.value,
                       attention=_ATTN.value, dtype=_DTYPE.value, cost=_COST.value,
                       overrides=_SET.value)
    except (RuntimeError, ValueError) as e:
        return _err(str(e))
    print(aot.format_report(r), flush=True)
    if _JSON.value:
        try:
            write_text_atomic(_JSON.value, json.dumps(r, indent=2, allow_nan=False) + "\n")
        except OSError as e:
            return _err(f"--json={_JSON.value}: {e.strerror or e}")
    return 0


def run():
    """Console command `pythia-jax-aot-report` (pyproject.toml [project.scripts])."""
    run_app(main, __name__, config_overrides_as_set(sys.argv))


if __name__ == "__main__":
    run()
