"""Research tools on Pythia's public API: memorization as in the Pythia paper, the training
stream (which step read a row, what one update changed), checkpoint sweeps.
See docs/research.md. Nothing in the package imports this subpackage."""

from pythia_jax.research import memorization, stream, sweep
from pythia_jax.research.memorization import memorize_rows, run_memorization
from pythia_jax.research.stream import (PYTHIA_CHECKPOINT_STEPS, batch_index, batch_rows,
                                        first_checkpoint_with, step_loss_delta, step_of_row)
from pythia_jax.research.sweep import fingerprint, plot_sweep, resolve_revisions

__all__ = ["memorization", "stream", "sweep", "memorize_rows", "run_memorization",
           "PYTHIA_CHECKPOINT_STEPS", "batch_index", "batch_rows", "first_checkpoint_with",
           "step_loss_delta", "step_of_row", "fingerprint", "plot_sweep", "resolve_revisions"]
