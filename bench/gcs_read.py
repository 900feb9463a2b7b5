"""Benchmark: a host's rows of a step read from a bucket by our reader vs a plain ranged read.

    JAX_PLATFORMS=cpu python bench/gcs_read.py [--steps=16] [--hosts=2] [--repeats=5]
        [--shard_size=0]

Starts a local GCS emulator (`gcp-storage-emulator`, in memory, on a free 127.0.0.1 port),
uploads a synthetic pre-shuffled file of `--steps` Pythia steps (1024 x 2049 uint16 = 4.2 MB a
step; with `--shard_size` as byte shards read in place) and times, interleaved round by round
in one process (the median round is reported):

  plain      gcsfs `cat_file(path, start, end)` of exactly the bytes of host 0's rows of each
             step (rows [0, 1024 / hosts)): one ranged GET, bytes -> numpy
  reader     `PythiaOrder(gs://...).rows(step, 0, 1024 / hosts)`: the project's reader
             (`MMapIndexedDataset` over `TokenBytes`, the .idx read once at open), synchronous
  prefetch   `HostBatchIterator` over the same rows: the reader in its background thread,
             `prefetch` steps ahead (the training path's host side), timed from the first
             batch's arrival (iterator start-up excluded), with a consumer that does nothing

The emulator is a single-threaded Python HTTP server on the same machine: absolute rates are the
emulator's, not a bucket's; the ratio reader / plain is the reader's own overhead. Prints one
JSON line per mode.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

import numpy as np
from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_integer("steps", 16, "Steps in the file.", lower_bound=2)
flags.DEFINE_integer("hosts", 2, "Simulated hosts: host 0 reads 1024 / hosts rows a step.",
                     lower_bound=1)
flags.DEFINE_integer("repeats", 5, "Rounds (each reads every step once per mode).",
                     lower_bound=1)
flags.DEFINE_integer("shard_size", 0, "Split the .bin into byte shards of this size (0: one "
                     ".bin).", lower_bound=0)
flags.DEFINE_integer("prefetch", 2, "HostBatchIterator prefetch depth.", lower_bound=1)

B, SEQ = 1024, 2048
BUCKET = "bench"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_emulator():
    port = _free_port()
    exe = os.path.join(os.path.dirname(sys.executable), "gcp-storage-emulator")
    proc = subprocess.Popen([exe, "start", "--host=127.0.0.1", f"--port={port}", "--in-memory",
                             f"--default-bucket={BUCKET}", "-q"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    host = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"{host}/storage/v1/b/{BUCKET}", timeout=2):
                break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"gcp-storage-emulator did not come up on {host}")
            time.sleep(0.2)
    os.environ.update({"STORAGE_EMULATOR_HOST": host, "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
                       "FSSPEC_GCS_TOKEN": "anon"})
    return proc


def main(argv):
    del argv
    proc = _start_emulator()
    try:
        run()
    finally:
        proc.kill()
        proc.wait()


def run():
    import fsspec

    from pythia_jax import paths
    from pythia_jax.data import HostBatchIterator, PythiaOrder, shard, write_indexed_dataset

    paths.configure("gs", token="anon")
    fs = fsspec.filesystem("gs", token="anon")
    rows_per_host = B // FLAGS.hosts
    with tempfile.TemporaryDirectory() as tmp:
        prefix = os.path.join(tmp, "document")
        rng = np.random.RandomState(0)
        write_indexed_dataset(prefix, (rng.randint(0, 50277, SEQ + 1).astype(np.uint16)
                                       for _ in range(FLAGS.steps * B)), dtype=np.uint16)
        files = [prefix + ".idx"]
        if FLAGS.shard_size:
            files += shard(prefix + ".bin", FLAGS.shard_size)
        else:
            files.append(prefix + ".bin")
        for f in files:
            fs.put_file(f, f"{BUCKET}/data/{os.path.basename(f)}")
    url = f"gs://{BUCKET}/data/document"
    t0 = time.perf_counter()
    order = PythiaOrder(url)
    open_s = time.perf_counter() - t0
    ds = order.dataset
    step_bytes = rows_per_host * (SEQ + 1) * 2
    # the plain read: the same byte range of the same object(s), straight through gcsfs
    bins = [b[len("gs://"):] for b in ds.layout.bins]
    starts = np.concatenate([[0], np.cumsum(ds.layout.sizes)])

    def plain(step):
        a = int(ds.pointers[step * B])
        b = a + step_bytes
        parts = []
        for i, key in enumerate(bins):
            lo, hi = max(a, starts[i]), min(b, starts[i + 1])
            if hi > lo:
                parts.append(fs.cat_file(key, start=int(lo - starts[i]), end=int(hi - starts[i])))
        return np.frombuffer(b"".join(parts), np.uint16).reshape(rows_per_host, SEQ + 1)

    def reader(step):
        return order.rows(step, 0, rows_per_host)

    np.testing.assert_array_equal(plain(1), reader(1))
    steps = range(FLAGS.steps)
    times = {"plain": [], "reader": [], "prefetch": []}
    for _ in range(FLAGS.repeats):
        for name, fn in (("plain", plain), ("reader", reader)):
            t = time.perf_counter()
            for s in steps:
                fn(s)
            times[name].append(time.perf_counter() - t)
        with HostBatchIterator(order, 0, blocks=[(0, rows_per_host)],
                               prefetch=FLAGS.prefetch) as it:
            next(it)  # steady state: timed from the first batch's arrival (no start-up)
            t = time.perf_counter()
            for _ in it:
                pass
        # steps 1..n-1 timed: scaled to n steps like the other modes
        times["prefetch"].append((time.perf_counter() - t) * FLAGS.steps / (FLAGS.steps - 1))
    base = statistics.median(times["plain"])
    for name, ts in times.items():
        med = statistics.median(ts)
        print(json.dumps({
            "mode": name, "steps": FLAGS.steps, "hosts": FLAGS.hosts,
            "bytes_per_step_per_host": step_bytes, "shards": len(bins),
            "ms_per_step": round(1e3 * med / FLAGS.steps, 2),
            "MB_per_s": round(step_bytes * FLAGS.steps / med / 1e6, 1),
            "vs_plain": round(med / base, 3), "open_s": round(open_s, 3)}))


if __name__ == "__main__":
    app.run(main)
