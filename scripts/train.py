r"""Train (or resume) a Pythia model.

    python scripts/train.py --config=configs/smoke.py --workdir=runs/smoke
    python scripts/train.py --config=configs/pythia.py:70m --workdir=gs://bucket/pythia-70m \
        --config.data.path=/data/pile-standard-pythia-preshuffled/document

Any config field can be overridden with --config.<field>=VALUE (e.g.
--config.train.num_steps=2000). The run resumes from the newest checkpoint in --workdir by
itself. --workdir defaults to ./runs/<config name>.

Exit status: 0 finished (num_steps reached); 75 preempted: SIGTERM (or Ctrl-C) saved a
checkpoint at a step boundary (every process of a multi-process run at the same step) and the
run resumes from it when started again (tpu/watch.sh relaunches on 75); 2 bad config or data;
3 with --distributed: the processes did not all join within --distributed_timeout seconds.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from pythia_jax.cli import config_flags_error, help_requested, resolve_config_argv, run_app

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config file, e.g. configs/pythia.py:70m or configs/smoke.py, or "
    "a bundled config by name: smoke, pythia:70m (pythia_jax/configs/NAME.py).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for checkpoints, metrics.jsonl, TensorBoard events and the "
    "config copy; a local path or gs://bucket/... (default: ./runs/<config name>).")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Start jax.distributed first (pythia_jax.distributed.initialize): "
    "multi-host TPU pods (auto-detected), or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / "
    "JAX_PROCESS_ID for other clusters (CPU processes over gloo).")
_DISTRIBUTED_TIMEOUT = flags.DEFINE_float(
    "distributed_timeout", 300.0, "With --distributed: seconds to wait for all processes to "
    "join the coordinator before giving up with an error (exit 3).")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:  # orbax logs every save at INFO
        logging.set_verbosity(logging.WARNING)
    import jax
    from pythia_jax import distributed
    if _DISTRIBUTED.value:
        try:
            distributed.initialize(timeout_s=_DISTRIBUTED_TIMEOUT.value)
        except ValueError as e:  # a half-set or inconsistent JAX_* environment
            print(f"error: --distributed: {e}", file=sys.stderr)
            return 2
    from pythia_jax import paths
    from pythia_jax import train as train_lib
    from pythia_jax.data.indexed import IndexedDatasetError

    config = _CONFIG.value
    if config is None:
        raise app.UsageError("--config is required (e.g. --config=configs/smoke.py)")
    workdir = _WORKDIR.value or os.path.join("runs", str(config.get("name", "run")))
    try:
        summary = train_lib.train(config, workdir)
    except (train_lib.TrainConfigError, train_lib.TrainError, IndexedDatasetError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if jax.process_index() == 0:
        last = summary["history"][-1] if summary["history"] else {}
        state = "preempted at" if summary["preempted"] else "finished at"
        print(f"{state} step {summary['end_step']}"
              + (f", loss {last['loss']:.4f}" if "loss" in last else "")
              + f"; checkpoints in {paths.join(paths.abspath(workdir), 'checkpoints')}")
    return train_lib.PREEMPTED_EXIT_STATUS if summary["preempted"] else 0


def run():
    """Console command `pythia-jax-train` (pyproject.toml [project.scripts]). `--config=NAME`
    that is not a file names a bundled config (`smoke`, `pythia:70m`): its file in the package."""
    argv = resolve_config_argv(sys.argv)
    if not help_requested(argv) and (error := config_flags_error(argv)) is not None:
        print(f"train.py: error: {error}", file=sys.stderr)  # before absl's traceback
        sys.exit(2)
    run_app(main, __name__, argv)


if __name__ == "__main__":
    run()
