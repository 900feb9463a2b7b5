"""Benchmark: reading a step's batch (1024 x 2049 uint16) through the pipeline vs raw memmap.

    JAX_PLATFORMS=cpu python bench/data_pipeline.py [--steps=32] [--repeats=5] [--data=PREFIX]

Builds (unless --data is given) a synthetic pre-shuffled file of `--steps` Pythia steps in a
temporary folder, then times, interleaved round by round (the median round is reported):

  raw        plain numpy: np.memmap(.bin, uint16), slice rows [1024k, 1024k+1024), copy
  order      PythiaOrder.batch(k) (length / range checks, zero-copy view), copied
  grain      the host side of the pipeline (HostBatchIterator): a background thread reads
             each step through grain (MapDataset over StepSource: rows checked) into a fresh
             numpy array, `prefetch` steps ahead of the consumer
  global     make_global_batch(order, k, mesh): numpy rows -> make_array_from_process_local_data
             -> int32 inputs / targets split on device (synchronous, one step at a time)
  iterator   BatchIterator end to end (grain prefetch + device-array prefetch thread)

Rounds are interleaved (raw, order, grain, global, iterator, raw, ...); ratios to raw are the
median over rounds of the per-round ratio, of wall time and of process CPU time (all threads).
On a shared, loaded machine wall time mostly measures the scheduler; CPU time per step is the
cost that bounds the rate on a core of one's own.
Each round times steps 1..n-1 after the first batch has arrived (steady state; the first
batch's latency, which includes iterator start-up, is reported separately). The file is read
from the page cache after the warm-up round (the figures measure the pipeline's own cost, not
the disk); each round opens fresh memory maps, as a run reads each step once. Ratios are
against `raw`.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import tempfile
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("data", None, "Existing pre-shuffled prefix (default: build a synthetic one).")
flags.DEFINE_integer("steps", 32, "Steps in the synthetic file (4.2 MB each).", lower_bound=2)
flags.DEFINE_integer("repeats", 15, "Rounds; medians over rounds are reported.", lower_bound=1)
flags.DEFINE_integer("batch_size", 1024, "Rows per step.")
flags.DEFINE_integer("seq_len", 2048, "Tokens per row minus one.")
flags.DEFINE_integer("threads", 1, "grain read threads.")
flags.DEFINE_integer("prefetch", 2, "Prefetch depth (grain buffer and device-array queue).")
flags.DEFINE_string("json_out", None, "Also write the figures as JSON here.")


def _build(prefix: str, steps: int, B: int, L: int) -> None:
    import numpy as np

    from pythia_jax.data.indexed import MMapIndexedDatasetBuilder

    rng = np.random.default_rng(0)
    with MMapIndexedDatasetBuilder(prefix, np.uint16) as b:
        for _ in range(steps):
            rows = rng.integers(0, 50277, size=(B, L + 1), dtype=np.uint16)
            for r in rows:
                b.add_document(r)


def main(argv):
    del argv
    import jax
    import numpy as np

    from pythia_jax.data.order import PythiaOrder
    from pythia_jax.data.pipeline import (BatchIterator, HostBatchIterator, batch_sharding,
                                          local_row_blocks, make_global_batch)

    B, L = FLAGS.batch_size, FLAGS.seq_len
    tmp = None
    if FLAGS.data:
        prefix = FLAGS.data
    else:
        tmp = tempfile.TemporaryDirectory(prefix="bench-data-")
        prefix = os.path.join(tmp.name, "document")
        t = time.perf_counter()
        _build(prefix, FLAGS.steps, B, L)
        print(f"built {prefix}: {FLAGS.steps} steps in {time.perf_counter() - t:.1f} s",
              file=sys.stderr)
    order = PythiaOrder(prefix, batch_size=B, seq_len=L)
    steps = range(order.num_steps)
    n = len(steps)
    row_elems = L + 1
    mesh = jax.make_mesh((1,), ("data",))
    sharding = batch_sharding(mesh)
    blocks = local_row_blocks(sharding, B)

    # Each method yields one step's batch at a time; a round times steps 1..n-1 after the
    # first batch arrived (iterator start-up, reported separately, is a one-off cost).
    # Every round opens fresh memory maps, as a training run reads each step once (the pages
    # are in the page cache but not yet mapped into the process).
    def raw():
        mm = np.memmap(prefix + ".bin", dtype=np.uint16, mode="r")
        for k in steps:
            yield np.array(mm[k * B * row_elems:(k + 1) * B * row_elems]).reshape(B, row_elems)

    def fresh():
        return PythiaOrder(prefix, batch_size=B, seq_len=L)

    def order_copy():
        o = fresh()
        for k in steps:
            yield np.array(o.batch(k))

    def grain_host():
        with HostBatchIterator(fresh(), 0, blocks=blocks, prefetch=FLAGS.prefetch,
                               num_threads=FLAGS.threads) as it:
            for _, x in it:
                yield x  # read into memory by the background thread

    def global_sync():
        o = fresh()
        for k in steps:
            yield jax.block_until_ready(make_global_batch(o, k, mesh))

    def iterator():
        with BatchIterator(fresh(), 0, mesh, prefetch=FLAGS.prefetch,
                           num_threads=FLAGS.threads) as it:
            for _, b in it:
                yield jax.block_until_ready(b)

    def timed(gen):
        t0 = time.perf_counter()
        it = iter(gen())
        next(it)
        t1, c1 = time.perf_counter(), time.process_time()
        count = 1 + sum(1 for _ in it)
        assert count == n, count
        return time.perf_counter() - t1, time.process_time() - c1, t1 - t0

    methods = {"raw": raw, "order": order_copy, "grain": grain_host, "global": global_sync,
               "iterator": iterator}
    for f in methods.values():  # warm: page cache, jit of the split, grain imports
        timed(f)
    wall: dict[str, list[float]] = {k: [] for k in methods}
    cpu: dict[str, list[float]] = {k: [] for k in methods}
    first: dict[str, list[float]] = {k: [] for k in methods}
    for _ in range(FLAGS.repeats):
        for name, f in methods.items():
            w, c, t_first = timed(f)
            wall[name].append(w)
            cpu[name].append(c)
            first[name].append(t_first)
    n_timed = n - 1
    med = {k: statistics.median(v) for k, v in wall.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    step_bytes = B * row_elems * 2

    def per_round_ratio(table, k):  # same round = same moment of the machine's load
        return statistics.median(r / m for r, m in zip(table["raw"], table[k]))

    res = {
        "command": "JAX_PLATFORMS=cpu python bench/data_pipeline.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "jax": jax.__version__, "device": str(jax.devices()[0]),
        "steps_timed_per_round": n_timed, "batch": [B, row_elems], "repeats": FLAGS.repeats,
        "threads": FLAGS.threads, "prefetch": FLAGS.prefetch,
        "steps_per_s": {k: n_timed / v for k, v in med.items()},
        "ms_per_step": {k: 1e3 * v / n_timed for k, v in med.items()},
        "cpu_ms_per_step": {k: 1e3 * v / n_timed for k, v in med_cpu.items()},
        "GB_per_s": {k: n_timed * step_bytes / v / 1e9 for k, v in med.items()},
        "ratio_vs_raw_wall": {k: per_round_ratio(wall, k) for k in methods},
        "ratio_vs_raw_cpu": {k: per_round_ratio(cpu, k) for k in methods},
        "first_batch_ms": {k: 1e3 * statistics.median(v) for k, v in first.items()},
    }
    res["tokens_per_s"] = {k: s * B * L for k, s in res["steps_per_s"].items()}
    print(f"{'method':9s} {'steps/s':>8s} {'ms/step':>8s} {'cpu ms':>7s} {'GB/s':>6s} "
          f"{'x raw':>6s} {'x raw cpu':>9s} {'first ms':>9s}")
    for k in methods:
        print(f"{k:9s} {res['steps_per_s'][k]:8.1f} {res['ms_per_step'][k]:8.2f} "
              f"{res['cpu_ms_per_step'][k]:7.2f} {res['GB_per_s'][k]:6.2f} "
              f"{res['ratio_vs_raw_wall'][k]:6.2f} {res['ratio_vs_raw_cpu'][k]:9.2f} "
              f"{res['first_batch_ms'][k]:9.2f}")
    print(json.dumps(res))
    if FLAGS.json_out:
        with open(FLAGS.json_out, "w") as f:
            json.dump(res, f, indent=1)
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    app.run(main)
