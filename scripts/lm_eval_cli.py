r"""lm-evaluation-harness' own command line (`lm_eval`, the same arguments) with the model
`pythia_jax` registered first, for every harness task:

    pythia-jax-lm-eval --model pythia_jax \
        --model_args pretrained=EleutherAI/pythia-70m,revision=step143000 \
        --tasks lambada_openai,piqa --batch_size 16 [--output_path results/]

lm-eval 0.4.13 finds models only in its own registry (it reads no entry points), so a plain
`lm_eval --model pythia_jax` cannot find ours; `python -m pythia_jax.lm_eval_adapter` is the same
command. model_args: see `pythia_jax.lm_eval_adapter`. Needs the `eval` extra.
"""

import importlib.util
import os
import sys

from pythia_jax.cli import help_requested


def run() -> None:
    """Console command `pythia-jax-lm-eval`."""
    if importlib.util.find_spec("lm_eval") is None:
        print("pythia-jax-lm-eval: error: lm-evaluation-harness is not installed "
              "(pip install 'pythia-jax[eval]')", file=sys.stderr)
        sys.exit(2)
    here = os.path.dirname(os.path.abspath(__file__))  # run by path: scripts/evaluate.py must
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]  # not hide HF's
    from pythia_jax import lm_eval_adapter  # imports lm_eval, an optional dependency

    if help_requested(sys.argv):  # this docstring, then lm_eval's own --help
        sys.stdout.write(__doc__.lstrip("\n") + "\nlm_eval's arguments:\n\n")
        sys.stdout.flush()
        lm_eval_adapter.main(["--help"])
    lm_eval_adapter.main()


if __name__ == "__main__":
    run()
