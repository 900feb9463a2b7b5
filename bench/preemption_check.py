"""Per-step cost of the multi-process "did anyone get SIGTERM?" check (bench/RESULTS.md,
"Preemption check").

Two local processes (jax.distributed over 127.0.0.1, gloo CPU collectives, 4 fake devices
each) run a stand-in train step (a jitted, cross-process sharded matmul + all-reduce,
dispatched asynchronously like the real one) and, after each step, one of:
  none       no check (the flag is never consulted): the floor
  allgather  the old scheme: a blocking `process_allgather` of the flag every step
  every=K    the new one (`pythia_jax.train._Preemption`): every K steps an asynchronous
             all-reduce of the flag, reading the previous check's result
Rounds interleave the methods; figures are medians over rounds (ms per step, process 0).

The loop waits for the step's output every `--sync_every` steps (default 4), as a training loop
that reads its metrics every few steps does. On CPU it must: with gloo collectives, two processes
that queue dozens of steps with cross-process all-reduces without waiting deadlock inside XLA's
CPU executor (seen here with 50 queued steps; 4 run). On a TPU the device runs its queue in order
and a blocking check stalls the whole pipeline, so there the "allgather" row costs more than
this CPU figure shows.

    python bench/preemption_check.py                      # starts both processes itself
    python bench/preemption_check.py --steps=200 --rounds=5 --every=1,2,5,10,20
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _worker(pid: int, port: int, steps: int, rounds: int, every: list[int], dim: int,
            sync_every: int):
    from pythia_jax import distributed
    distributed.initialize(f"127.0.0.1:{port}", 2, pid)
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.experimental import multihost_utils
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from pythia_jax.train import _Preemption

    mesh = Mesh(np.asarray(jax.devices()), ("d",))
    x_sh = NamedSharding(mesh, P("d", None))
    w = jax.device_put(jnp.eye(dim, dtype=jnp.float32) * 0.5, NamedSharding(mesh, P()))

    @jax.jit
    def step(x, w):  # rows sharded over both processes; the mean needs an all-reduce
        y = jnp.tanh(x @ w)
        return y - jnp.mean(y, axis=0, keepdims=True)

    x = jax.make_array_from_callback((8 * 64, dim), x_sh,
                                     lambda idx: np.ones((64, dim), np.float32))
    x = step(x, w).block_until_ready()

    flag = np.array([0], np.int32)
    methods = ["none", "allgather"] + [f"every={k}" for k in every]

    def run(method):
        nonlocal x
        pre = _Preemption(int(method.split("=")[1])) if method.startswith("every=") else None
        jax.block_until_ready(x)
        t = time.perf_counter()
        for s in range(1, steps + 1):
            x = step(x, w)
            if s % sync_every == 0:
                x.block_until_ready()
            if method == "allgather":
                assert not multihost_utils.process_allgather(flag).max()
            elif pre is not None:
                assert not pre.requested(s)
        jax.block_until_ready(x)
        return (time.perf_counter() - t) / steps * 1e3

    for m in methods:  # warm-up (compiles)
        run(m)
    times = {m: [] for m in methods}
    for _ in range(rounds):
        for m in methods:
            multihost_utils.sync_global_devices(m)
            times[m].append(run(m))
    if pid == 0:
        print(json.dumps({m: sorted(v)[len(v) // 2] for m, v in times.items()}))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--every", default="1,2,5,10,20")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--sync_every", type=int, default=4,
                    help="wait for the step's output every N steps (see the module docstring)")
    ap.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args()
    every = [int(k) for k in a.every.split(",")]
    if a.worker is not None:
        return _worker(a.worker, a.port, a.steps, a.rounds, every, a.dim, a.sync_every)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=4",
               PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    procs = [subprocess.Popen([sys.executable, __file__, f"--worker={i}", f"--port={port}",
                               f"--steps={a.steps}", f"--rounds={a.rounds}",
                               f"--every={a.every}", f"--dim={a.dim}",
                               f"--sync_every={a.sync_every}"], env=env,
                              stdout=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        sys.exit(f"a worker failed: {[p.returncode for p in procs]}")
    res = json.loads(outs[0].strip().splitlines()[-1])
    base = res["none"]
    print(f"{'method':>10}  ms/step  overhead ms/step")
    for m, v in res.items():
        print(f"{m:>10}  {v:7.3f}  {v - base:+.3f}")


if __name__ == "__main__":
    main()
