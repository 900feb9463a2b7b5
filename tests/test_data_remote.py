"""Token data read from a bucket (a real GCS emulator on 127.0.0.1): the same batches, bit for bit,
as the local file for two simulated hosts, one ranged read per step per host (counted at the
server), the reads made ahead of the consumer, the `.idx` read once; `batch_viewer.py --data=gs://`.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import jax
import numpy as np
import pytest

from gcs_utils import _LAUNCHER, BUCKET, GcsEmulator, _free_port, gcs  # noqa: F401  (fixtures)
from pythia_jax.data import (BatchIterator, HostBatchIterator, IndexedDatasetError,
                             MMapIndexedDataset, PythiaOrder, write_indexed_dataset)

REPO = pathlib.Path(__file__).resolve().parents[1]
B, T, STEPS = 8, 15, 6  # 8 rows of 16 tokens per step, 6 steps (+ 3 spare rows)


@pytest.fixture(scope="module")
def gcs_emulator(tmp_path_factory):
    """gcs_utils' emulator, but logging every request (to count the ranged reads)."""
    port = _free_port()
    log = tmp_path_factory.mktemp("gcs-emulator-log") / "emulator.log"
    with open(log, "wb") as fh:  # gcs_utils' launcher, without -q: one log line per request
        proc = subprocess.Popen([sys.executable, "-c", _LAUNCHER, "start", "--host=127.0.0.1", f"--port={port}",
                                 "--in-memory", f"--default-bucket={BUCKET}"],
                                stdout=fh, stderr=subprocess.STDOUT)
    host = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"{host}/storage/v1/b/{BUCKET}", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"emulator did not come up: {log.read_text()[-2000:]}")
        time.sleep(0.2)
    emu = GcsEmulator(host, BUCKET)
    emu.log = log
    try:
        yield emu
    finally:
        proc.kill()
        proc.wait()


def downloads(emu, url: str) -> int:
    """GET requests for the object `url` the server has answered so far."""
    obj = url[len(f"gs://{emu.bucket}/"):]
    needle = f"/b/{emu.bucket}/o/{urllib.parse.quote(obj, safe='')}?"
    return sum(1 for line in emu.log.read_text().splitlines()
               if line.startswith('"GET /download/') and needle in line)


def wait_for(cond, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        time.sleep(0.05)


def write_local(prefix) -> np.ndarray:
    rows = np.random.RandomState(0).randint(0, 50277, (STEPS * B + 3, T + 1)).astype(np.uint16)
    write_indexed_dataset(prefix, list(rows), dtype=np.uint16)
    return rows


@pytest.fixture
def data(gcs, tmp_path):
    local = str(tmp_path / "document")
    rows = write_local(local)
    url = gcs.url("pile/document")
    for ext in (".bin", ".idx"):
        gcs.fs.put_file(local + ext, url + ext)
    return local, url, rows


def test_bucket_batches_equal_the_local_file_one_read_per_step_per_host(gcs, data):
    local, url, rows = data
    emu = gcs.emulator
    idx_before = downloads(emu, url + ".idx")
    remote = PythiaOrder(url, batch_size=B, seq_len=T)
    assert downloads(emu, url + ".idx") == idx_before + 1  # the index is read once
    assert remote.dataset.layout.remote and remote.num_steps == STEPS
    np.testing.assert_array_equal(remote.dataset.sizes, np.full(len(rows), T + 1))
    ref = PythiaOrder(local, batch_size=B, seq_len=T)
    per = B // 2
    for host in (0, 1):  # two hosts: each reads only its contiguous half of every step
        blocks = [(host * per, (host + 1) * per)]
        before = downloads(emu, url + ".bin")
        with HostBatchIterator(remote, 0, blocks=blocks, prefetch=2) as it:
            got = [(step, x.copy()) for step, x in it]
        assert [s for s, _ in got] == list(range(STEPS))
        for step, x in got:
            want = ref.rows(step, *blocks[0])
            assert x.dtype == want.dtype == np.uint16 and x.shape == (per, T + 1)
            np.testing.assert_array_equal(x, want)
            np.testing.assert_array_equal(x, rows[step * B + host * per: step * B + (host + 1)
                                                 * per])
        assert downloads(emu, url + ".bin") - before == STEPS  # one ranged GET per step
    assert downloads(emu, url + ".idx") == idx_before + 1  # and never again
    assert remote.dataset.token_bytes.requests == 2 * STEPS


def test_reads_run_ahead_of_the_consumer(gcs, data):
    _, url, _ = data
    order = PythiaOrder(url, batch_size=B, seq_len=T)
    before = downloads(gcs.emulator, url + ".bin")
    with HostBatchIterator(order, 0, prefetch=3) as it:
        step, _ = next(it)
        assert step == 0
        # the consumer asked for step 0 only; steps 1..3 are fetched by the prefetch thread
        wait_for(lambda: downloads(gcs.emulator, url + ".bin") - before >= 4,
                 "reads of steps 1..3 before they are asked for")


def test_global_batches_from_the_bucket(gcs, data):
    local, url, _ = data
    mesh = jax.make_mesh((1, 1, 1), ("data", "fsdp", "tensor"))
    ref = PythiaOrder(local, batch_size=B, seq_len=T)
    with BatchIterator(PythiaOrder(url, batch_size=B, seq_len=T), 2, mesh, end_step=5) as it:
        for step, batch in it:
            want = ref.batch(step).astype(np.int32)
            np.testing.assert_array_equal(np.asarray(batch["inputs"]), want[:, :-1])
            np.testing.assert_array_equal(np.asarray(batch["targets"]), want[:, 1:])
    assert it.next_step == 5


def test_truncated_or_missing_remote_files_are_named(gcs, data, tmp_path):
    local, _, _ = data
    url = gcs.url("bad/document")
    with open(local + ".bin", "rb") as f:
        gcs.fs.pipe_file(url + ".bin", f.read()[:-6])
    with pytest.raises(FileNotFoundError, match=r"bad/document\.idx: no such file"):
        MMapIndexedDataset(url)
    gcs.fs.put_file(local + ".idx", url + ".idx")
    with pytest.raises(IndexedDatasetError, match=r"bad/document\.bin: size mismatch.*truncated"):
        MMapIndexedDataset(url)
    with pytest.raises(FileNotFoundError, match=r"nothing\.bin: no such file"):
        PythiaOrder(gcs.url("nothing"))


def _viewer(env, *args):
    return subprocess.run([sys.executable, str(REPO / "scripts" / "batch_viewer.py"), *args],
                          env=env, capture_output=True, text=True, timeout=300)


def test_batch_viewer_reads_a_bucket(gcs, data, tmp_path):
    local, url, _ = data
    out = tmp_path / "steps.npy"
    r = _viewer(gcs.env, f"--data={url}", "--start_step=1", "--end_step=3", f"--out={out}",
                f"--batch_size={B}", f"--seq_len={T}")
    assert r.returncode == 0, r.stderr
    ref = PythiaOrder(local, batch_size=B, seq_len=T)
    np.testing.assert_array_equal(np.load(out), np.concatenate([ref.batch(s) for s in (1, 2, 3)]))
    # a prefix with nothing behind it: exit 1, the missing object named, no output file
    bad = tmp_path / "bad.npy"
    r = _viewer(gcs.env, f"--data={gcs.url('missing/document')}", f"--out={bad}",
                f"--batch_size={B}", f"--seq_len={T}")
    assert r.returncode == 1 and "missing/document.bin: no such file" in r.stderr, r.stderr
    assert not bad.exists()
