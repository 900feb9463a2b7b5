"""Fault cases of the data layer (issue 14): token ids outside the vocabulary, a mismatched
`.bin`/`.idx` pair and the builder's rename order, shards written under temporary names, and the
scripts' shared output helpers (`pythia_jax.cli`)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from pythia_jax import cli
from pythia_jax.data import indexed, shards
from pythia_jax.data.indexed import IndexedDatasetError, MMapIndexedDataset, \
    MMapIndexedDatasetBuilder, write_indexed_dataset
from pythia_jax.data.order import PythiaOrder
from pythia_jax.data.pipeline import HostBatchIterator


def _rows(prefix, n_rows=12, item_len=5, vocab=100):
    rows = (np.arange(n_rows * item_len) % vocab).reshape(n_rows, item_len).astype(np.uint16)
    write_indexed_dataset(prefix, list(rows), dtype=np.uint16)
    return rows


# -- token ids against the vocabulary -----------------------------------------------------------
def test_out_of_vocab_id_names_file_item_row_and_id(tmp_path):
    rows = _rows(tmp_path / "d")
    rows[7, 3] = 100  # step 1 (batch 4), row 3
    write_indexed_dataset(tmp_path / "d", list(rows), dtype=np.uint16)
    order = PythiaOrder(tmp_path / "d", batch_size=4, seq_len=4, vocab_size=100)
    np.testing.assert_array_equal(order.batch(0), rows[:4])  # the clean step reads fine
    with pytest.raises(IndexedDatasetError) as e:
        order.batch(1)
    msg = str(e.value)
    assert str(tmp_path / "d.bin") in msg
    assert "item 7 (step 1, row 3, position 3) holds token id 100" in msg
    assert "[0, 100)" in msg
    # a process-local slice names the row within the whole batch
    with pytest.raises(IndexedDatasetError, match=r"item 7 \(step 1, row 3,"):
        order.rows(1, 2, 4)
    order.rows(1, 0, 3)  # rows without the bad id pass
    # without a vocabulary (batch_viewer) nothing is checked
    assert PythiaOrder(tmp_path / "d", batch_size=4, seq_len=4).batch(1)[3, 3] == 100


def test_largest_valid_id_passes_and_negative_ids_are_caught(tmp_path):
    rows = _rows(tmp_path / "d")
    rows[0, 0] = 99
    write_indexed_dataset(tmp_path / "d", list(rows), dtype=np.uint16)
    PythiaOrder(tmp_path / "d", batch_size=4, seq_len=4, vocab_size=100).batch(0)
    signed = rows.astype(np.int32)
    signed[5, 1] = -1
    write_indexed_dataset(tmp_path / "s", list(signed), dtype=np.int32)
    with pytest.raises(IndexedDatasetError, match=r"item 5 \(step 1, row 1, position 1\) holds "
                                                  r"token id -1"):
        PythiaOrder(tmp_path / "s", batch_size=4, seq_len=4, vocab_size=100).batch(1)


def test_pipeline_raises_the_id_error_at_the_bad_step(tmp_path):
    rows = _rows(tmp_path / "d")
    rows[9, 0] = 4000
    write_indexed_dataset(tmp_path / "d", list(rows), dtype=np.uint16)
    order = PythiaOrder(tmp_path / "d", batch_size=4, seq_len=4, vocab_size=100)
    it = HostBatchIterator(order, 0)
    with it:
        assert next(it)[0] == 0
        assert next(it)[0] == 1
        with pytest.raises(IndexedDatasetError, match=r"item 9 \(step 2, row 1, position 0\) "
                                                      r"holds token id 4000"):
            next(it)


# -- a .bin/.idx pair from two builds -------------------------------------------------------------
def test_open_detects_a_mismatched_pair_naming_both_files(tmp_path):
    write_indexed_dataset(tmp_path / "a", [[1, 2, 3], [4, 5]], dtype=np.uint16)
    write_indexed_dataset(tmp_path / "b", [[1, 2, 3, 4], [5, 6, 7]], dtype=np.uint16)
    os.replace(tmp_path / "b.bin", tmp_path / "a.bin")  # new .bin beside the old .idx
    with pytest.raises(IndexedDatasetError) as e:
        MMapIndexedDataset(tmp_path / "a")
    msg = str(e.value)
    assert str(tmp_path / "a.bin") in msg and str(tmp_path / "a.idx") in msg
    assert "ends at byte 10, found a file of 14 bytes" in msg


def test_finalize_never_leaves_a_new_bin_beside_the_old_idx(tmp_path, monkeypatch):
    prefix = tmp_path / "d"
    write_indexed_dataset(prefix, [[1, 2, 3]], dtype=np.uint16)
    real_replace = os.replace
    calls = []

    def crash_before_idx(src, dst):  # the process dies between the two renames
        calls.append(os.fspath(dst))
        if os.fspath(dst).endswith(".idx"):
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(indexed.os, "replace", crash_before_idx)
    b = MMapIndexedDatasetBuilder(prefix, np.uint16)
    b.add_document([7, 8, 9, 10, 11])
    with pytest.raises(KeyboardInterrupt):
        b.finalize()
    monkeypatch.setattr(indexed.os, "replace", real_replace)
    assert calls == [str(prefix) + ".bin", str(prefix) + ".idx"]
    # the pair on disk is not mismatched: the .idx is gone, and open says so
    assert sorted(os.listdir(tmp_path)) == ["d.bin"]
    with pytest.raises(FileNotFoundError, match=r"d\.idx: no such file"):
        MMapIndexedDataset(prefix)


# -- shard(): temporary names, renamed only when all shards are complete ------------------------
def test_shard_failure_leaves_no_shard(tmp_path, monkeypatch):
    src = tmp_path / "x.bin"
    src.write_bytes(bytes(range(256)) * 4)  # 1024 bytes -> 4 shards of 256
    real_replace = os.replace
    seen = []

    def fail_on_third(a, b):
        seen.append(os.path.basename(b))
        # while shards are renamed, every one of them is already complete under its temp name
        assert all(os.path.getsize(t) == 256 for t in tmp_path.glob(".x-*.tmp"))
        if len(seen) == 3:
            raise OSError(28, "No space left on device")
        real_replace(a, b)

    monkeypatch.setattr(shards.os, "replace", fail_on_third)
    with pytest.raises(OSError):
        shards.shard(str(src), shard_size=256)
    assert seen[:3] == ["x-00000-of-00003.bin", "x-00001-of-00003.bin", "x-00002-of-00003.bin"]
    assert not list(tmp_path.glob(".*"))  # no temporary file left
    monkeypatch.setattr(shards.os, "replace", real_replace)
    outs = shards.shard(str(src), shard_size=256)
    assert [os.path.getsize(p) for p in outs] == [256] * 4
    assert b"".join(open(p, "rb").read() for p in outs) == src.read_bytes()
    assert sorted(os.listdir(tmp_path)) == sorted(["x.bin", *map(os.path.basename, outs)])


def test_shard_interrupted_while_writing_leaves_nothing(tmp_path, monkeypatch):
    src = tmp_path / "x.bin"
    src.write_bytes(b"\1" * 1000)
    real_fdopen = os.fdopen
    opened = []

    def interrupt_second(fd, *a, **k):
        opened.append(fd)
        if len(opened) == 2:
            os.close(fd)
            raise KeyboardInterrupt
        return real_fdopen(fd, *a, **k)

    monkeypatch.setattr(shards.os, "fdopen", interrupt_second)
    with pytest.raises(KeyboardInterrupt):
        shards.shard(str(src), shard_size=400)
    assert os.listdir(tmp_path) == ["x.bin"]  # neither a final-named shard nor a temp file


# -- pythia_jax.cli: output paths checked first, written atomically -----------------------------
def test_output_path_error_cases(tmp_path):
    assert cli.output_path_error(str(tmp_path / "x.json"), "--output") is None
    (tmp_path / "old.json").write_text("{}")
    assert cli.output_path_error(str(tmp_path / "old.json"), "--output") is None
    assert cli.output_path_error(str(tmp_path), "--out") == \
        f"--out={tmp_path}: is a directory; expected a file path"
    assert cli.output_path_error("/nonexistent/x.json", "--output") == \
        "--output=/nonexistent/x.json: folder /nonexistent does not exist"
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.geteuid() != 0:  # root writes anywhere: access() cannot say no
            assert "is not writable" in cli.output_path_error(str(ro / "x"), "--output")
    finally:
        ro.chmod(0o700)


def test_atomic_output_leaves_nothing_on_error_and_replaces_on_success(tmp_path):
    out = tmp_path / "r.json"
    out.write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with cli.atomic_output(str(out)) as tmp:
            with open(tmp, "w") as f:
                f.write("half")
            raise KeyboardInterrupt
    assert out.read_text() == "old" and sorted(os.listdir(tmp_path)) == ["r.json"]
    mask = os.umask(0o022)
    os.umask(mask)
    cli.write_text_atomic(str(out), "new\n")
    assert out.read_text() == "new\n" and sorted(os.listdir(tmp_path)) == ["r.json"]
    assert (out.stat().st_mode & 0o777) == 0o666 & ~mask


# -- a SIGTERM the instant a temporary output is created ------------------------------------------
# CI caught `preprocess_data.py` leaving `.x_text_document.bin.*.tmp` behind: the signal landed
# between `mkstemp` creating the file and the builder recording its name, so no cleanup knew of
# it. Every writer holds SIGTERM across that window (`paths.sigterm_held`); this sends one inside
# it, from `mkstemp` / `mkdtemp` themselves (the process signals itself the moment the file
# exists), and checks that the writer stops (exit status 143) and leaves its folder as it was.
def _writers(folder):
    from pythia_jax import paths
    from pythia_jax.data import neox_index

    src = os.path.join(folder, "src.bin")

    def builder_init():
        b = MMapIndexedDatasetBuilder(os.path.join(folder, "d"), np.uint16)
        b.abort()  # never reached when the signal lands

    def builder_finalize():
        b = MMapIndexedDatasetBuilder(os.path.join(folder, "d"), np.uint16)
        b.add_document(np.arange(4))
        b.finalize()

    def atomic_output():
        with cli.atomic_output(os.path.join(folder, "f")) as tmp:
            open(tmp, "w").close()

    def atomic_write():
        with paths.atomic_write(os.path.join(folder, "f")) as fh:
            fh.write(b"x")

    def atomic_dir():
        with paths.atomic_dir(os.path.join(folder, "dir")):
            pass

    def save_index():
        neox_index._save_atomic(os.path.join(folder, "i.npy"), np.arange(3))

    def shard():
        shards.shard(src, shard_size=8)

    def unshard():
        first = shards.shard_paths(os.path.join(folder, "s"), 2)[0]
        shards.unshard(first, 2, output=os.path.join(folder, "merged.bin"))

    return {"builder_init": builder_init, "builder_finalize": builder_finalize,
            "atomic_output": atomic_output, "atomic_write": atomic_write,
            "atomic_dir": atomic_dir, "save_index": save_index, "shard": shard,
            "unshard": unshard}


@pytest.mark.parametrize("writer", ["builder_init", "builder_finalize", "atomic_output",
                                    "atomic_write", "atomic_dir", "save_index", "shard",
                                    "unshard"])
def test_sigterm_as_the_temporary_is_created_leaves_nothing(tmp_path, monkeypatch, writer):
    import signal
    import tempfile

    out = tmp_path / "out"
    out.mkdir()
    inputs = {}
    if writer == "shard":
        (out / "src.bin").write_bytes(bytes(range(20)))
    if writer == "unshard":
        for i, p in enumerate(shards.shard_paths(str(out / "s"), 2)):
            open(p, "wb").write(bytes([i]) * 8)
    inputs = set(os.listdir(out))
    created = []

    def signalling(real):
        def make(*a, **kw):
            made = real(*a, **kw)
            created.append(made)
            if len(created) == (2 if writer == "builder_finalize" else 1):
                os.kill(os.getpid(), signal.SIGTERM)  # the handler runs at the next bytecode
            return made
        return make

    monkeypatch.setattr(tempfile, "mkstemp", signalling(tempfile.mkstemp))
    monkeypatch.setattr(tempfile, "mkdtemp", signalling(tempfile.mkdtemp))
    old = signal.getsignal(signal.SIGTERM)
    try:
        cli.exit_on_sigterm("writer")
        with pytest.raises(cli.Terminated) as e:
            _writers(str(out))[writer]()
    finally:
        signal.signal(signal.SIGTERM, old)
    assert e.value.code == 143
    assert created, "the writer made no temporary (the test would check nothing)"
    assert set(os.listdir(out)) == inputs
