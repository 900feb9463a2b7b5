"""Train (or resume) a Pythia model.

    python scripts/train.py --config=configs/smoke.py --workdir=runs/smoke
    python scripts/train.py --config=configs/pythia.py:70m --workdir=gs://bucket/pythia-70m \
        --config.data.path=/data/pile-standard-pythia-preshuffled/document

Any config field can be overridden with --config.<field>=VALUE (e.g.
--config.train.num_steps=2000). The run resumes from the newest checkpoint in --workdir by
itself; SIGTERM saves a checkpoint and exits cleanly. --workdir defaults to ./runs/<config name>.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config file, e.g. configs/pythia.py:70m or configs/smoke.py.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for checkpoints, metrics.jsonl and TensorBoard events "
    "(default: ./runs/<config name>).")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() first (multi-host TPU pods).")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:  # orbax logs every save at INFO
        logging.set_verbosity(logging.WARNING)
    import jax
    if _DISTRIBUTED.value:
        jax.distributed.initialize()
    from pythia_jax import train as train_lib

    config = _CONFIG.value
    if config is None:
        raise app.UsageError("--config is required (e.g. --config=configs/smoke.py)")
    workdir = _WORKDIR.value or os.path.join("runs", str(config.get("name", "run")))
    try:
        summary = train_lib.train(config, workdir)
    except (train_lib.TrainConfigError, train_lib.TrainError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if jax.process_index() == 0:
        last = summary["history"][-1] if summary["history"] else {}
        state = "preempted at" if summary["preempted"] else "finished at"
        print(f"{state} step {summary['end_step']}"
              + (f", loss {last['loss']:.4f}" if "loss" in last else "")
              + f"; checkpoints in {os.path.join(os.path.abspath(workdir), 'checkpoints')}")
    return 0


if __name__ == "__main__":
    app.run(main)
