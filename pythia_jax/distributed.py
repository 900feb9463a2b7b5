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
import signal
import sys
import threading

import jax
from jax._src import distributed as _jax_distributed  # the state of an initialization under way

__all__ = ["initialize", "is_main_process", "cluster_env", "INIT_TIMEOUT_S",
           "INIT_TIMEOUT_EXIT_STATUS"]

_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
#: How long (seconds) a process waits for all the others to join the coordinator.
INIT_TIMEOUT_S = 300
#: The exit status when they did not (the run never started; nothing to save).
INIT_TIMEOUT_EXIT_STATUS = 3
# JAX aborts the process (a C++ fatal error, no Python exception) at its own
# initialization_timeout; it gets this much longer so that our clear message comes first.
_JAX_TIMEOUT_MARGIN_S = 30


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


def _describe() -> str:
    """'process I of N, coordinator HOST:PORT' of the initialization under way."""
    st = _jax_distributed.global_state
    n = getattr(st, "num_processes", None)
    return (f"process {getattr(st, 'process_id', '?')} of {n}, coordinator "
            f"{getattr(st, 'coordinator_address', None) or '?'}"
            + (f" (waiting for the other {n - 1})" if isinstance(n, int) else ""))


def _start(timeout_s: float, **kwargs) -> None:
    """jax.distributed.initialize(**kwargs), or a one-line error and exit status
    INIT_TIMEOUT_EXIT_STATUS when the processes have not all joined within `timeout_s`.

    SIGTERM is handed back to Python afterwards: JAX's preemption notifier takes the signal
    over with a C handler that only records it, so a SIGTERM before the training loop (which
    installs its own handler) would be swallowed and the process would not stop."""
    timeout_s = float(timeout_s)
    if timeout_s <= 0:
        raise ValueError(f"initialize: timeout_s must be positive, got {timeout_s}")

    def give_up():
        print(f"error: jax.distributed: {_describe()}: not all processes joined within "
              f"{timeout_s:g} s (distributed.initialize timeout_s; --distributed_timeout in "
              "scripts/train.py). Check that every worker runs the same command and can reach "
              "the coordinator.", file=sys.stderr, flush=True)
        os._exit(INIT_TIMEOUT_EXIT_STATUS)

    main = threading.current_thread() is threading.main_thread()
    sigterm = signal.getsignal(signal.SIGTERM) if main else None
    timer = threading.Timer(timeout_s, give_up)
    timer.daemon = True
    timer.start()
    try:
        jax.distributed.initialize(
            initialization_timeout=int(timeout_s + 0.999) + _JAX_TIMEOUT_MARGIN_S, **kwargs)
    finally:
        timer.cancel()
    if sigterm is not None:
        signal.signal(signal.SIGTERM, sigterm)


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, auto: bool = True,
               timeout_s: float = INIT_TIMEOUT_S) -> bool:
    """Start jax.distributed if this run spans several processes. Returns True if it did
    (or it already was). Must run before the first use of `jax.devices()` / any computation.

    Explicit arguments, then the JAX_* environment variables above, then (with `auto`) JAX's
    cluster auto-detection (Cloud TPU, SLURM, …). Without any of them: single process, False.
    A process that has not met all the others within `timeout_s` seconds (a worker that never
    came up, a wrong coordinator address) prints one line naming the coordinator, this
    process and the process count, and exits with INIT_TIMEOUT_EXIT_STATUS instead of hanging.
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
        n, i = explicit["num_processes"], explicit["process_id"]
        if not 0 <= i < n:
            raise ValueError(f"multi-process run: process id {i} is not in 0..{n - 1} "
                             f"(JAX_PROCESS_ID / JAX_NUM_PROCESSES)")
        _start(timeout_s, **explicit)
        return True
    if not auto:
        return False
    try:
        _start(timeout_s)
    except ValueError as e:  # no cluster detected: a plain single-process run
        if "coordinator_address" in str(e):
            return False
        raise
    return True


def is_main_process() -> bool:
    """True on the process that logs and writes non-collective files (process 0)."""
    return jax.process_index() == 0
