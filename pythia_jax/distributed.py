"""Multi-process runs: start `jax.distributed` once, before anything touches the devices.

    from pythia_jax import distributed
    distributed.initialize()          # first thing in a CLI's main()

- Cloud TPU VMs and pod slices (and other clusters JAX detects: SLURM, Open MPI, Kubernetes):
  `jax.distributed.initialize()` with no arguments finds the coordinator and this worker's id.
- Anywhere else (CPU test clusters, hand-started processes): set `JAX_COORDINATOR_ADDRESS`
  (host:port), `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID`, or pass them. CPU processes exchange
  collectives over gloo.
- A single process with no cluster around it: nothing to do.

Which process does what, once initialized: every process runs the same jitted step on its own
devices and feeds only its own rows of each batch (`pythia_jax.data.pipeline`); orbax
checkpoints are written collectively (each process writes its own shards, process 0 the
metadata); logs, metrics and the final sample come from process 0 (`is_main_process`).
"""

from __future__ import annotations

import os

import jax

__all__ = ["initialize", "is_main_process", "cluster_env"]

_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def cluster_env() -> dict | None:
    """The explicit cluster description from the environment, or None when not (fully) set."""
    vals = {k: os.environ.get(k) for k in _ENV}
    if not any(vals.values()):
        return None
    missing = [k for k, v in vals.items() if not v]
    if missing:
        raise ValueError(f"multi-process run: {', '.join(missing)} not set (set all of "
                         f"{', '.join(_ENV)} or none)")
    return {"coordinator_address": vals["JAX_COORDINATOR_ADDRESS"],
            "num_processes": int(vals["JAX_NUM_PROCESSES"]),
            "process_id": int(vals["JAX_PROCESS_ID"])}


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, auto: bool = True) -> bool:
    """Start jax.distributed if this run spans several processes. Returns True if it did
    (or it already was). Must run before the first use of `jax.devices()` / any computation.

    Explicit arguments, then the JAX_* environment variables above, then (with `auto`) JAX's
    cluster auto-detection (Cloud TPU, SLURM, …). Without any of them: single process, False.
    """
    if jax.distributed.is_initialized():
        return True
    explicit = None
    if coordinator_address is not None:
        if num_processes is None or process_id is None:
            raise ValueError("initialize: pass num_processes and process_id with "
                             "coordinator_address")
        explicit = {"coordinator_address": coordinator_address,
                    "num_processes": int(num_processes), "process_id": int(process_id)}
    else:
        explicit = cluster_env()
    if explicit is not None:
        if explicit["num_processes"] == 1:
            return False
        # CPU devices of different processes talk over gloo (harmless for TPU / GPU runs).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(**explicit)
        return True
    if not auto:
        return False
    try:
        jax.distributed.initialize()
    except ValueError as e:  # no cluster detected: a plain single-process run
        if "coordinator_address" in str(e):
            return False
        raise
    return True


def is_main_process() -> bool:
    """True on the process that logs and writes non-collective files (process 0)."""
    return jax.process_index() == 0
