"""MMIDIDX reader / writer: the real Megatron files, exact bytes, every dtype, bad input."""

import json
import os
import pickle
import struct

import numpy as np
import pytest

from pythia_jax.data.indexed import (DTYPES, IndexedDatasetError, IndexedDatasetIndexError,
                                     MMapIndexedDataset, MMapIndexedDatasetBuilder, best_dtype,
                                     write_indexed_dataset)

EOD_MEGATRON = 131072


@pytest.fixture(scope="module")
def fixtures(shared_data):
    return shared_data / "mmap" / "megatron_lm_fixtures"


def _expected_index_bytes(code, sizes, itemsize, doc_idx):
    """The layout of reference doc 4.1, written out independently of the implementation."""
    out = b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", code)
    out += struct.pack("<Q", len(sizes)) + struct.pack("<Q", len(doc_idx))
    out += b"".join(struct.pack("<i", s) for s in sizes)
    ptr = 0
    for s in sizes:
        out += struct.pack("<q", ptr)
        ptr += s * itemsize
    out += b"".join(struct.pack("<q", d) for d in doc_idx)
    return out


def test_real_megatron_file_matches_its_jsonl_source(fixtures):
    ds = MMapIndexedDataset(fixtures / "test_text_document")
    lines = (fixtures / "test.jsonl").read_text().splitlines()
    assert len(ds) == 1000 == ds.num_docs == len(lines)
    assert ds.dtype == np.int32 and ds.num_tokens == 5000
    assert ds.sizes.dtype == np.int32 and (ds.sizes == 5).all()
    np.testing.assert_array_equal(ds.doc_idx, np.arange(1001))
    for i in (0, 1, 499, 999):
        ids = [int(t) for t in json.loads(lines[i])["text"].split()] + [EOD_MEGATRON]
        np.testing.assert_array_equal(ds[i], ids)
    np.testing.assert_array_equal(ds[-1], [111214, 343, 54365900, 77, 131072])
    # zero-copy: views into the .bin map, not copies
    x = ds[7]
    assert not x.flags.owndata and not x.flags.writeable
    assert np.shares_memory(ds.get_range(0, 1000), x)
    ds.validate()


def test_real_fim_file_shapes_and_ranges(fixtures):
    ds = MMapIndexedDataset(str(fixtures / "fim_text_document") + ".bin")  # suffix tolerated
    assert len(ds) == 1000 and ds.num_tokens == 7600
    assert set(np.unique(ds.sizes).tolist()) == {7, 8}
    assert int(ds.sizes.sum()) == 7600
    flat = np.fromfile(fixtures / "fim_text_document.bin", dtype="<i4")
    start = int(ds.sizes[:10].sum())
    np.testing.assert_array_equal(ds[10], flat[start:start + ds.sizes[10]])
    np.testing.assert_array_equal(ds.get(10, offset=2, length=3), flat[start + 2:start + 5])
    np.testing.assert_array_equal(ds.get(10, offset=4), flat[start + 4:start + ds.sizes[10]])
    parts = ds[10:13]
    assert [len(p) for p in parts] == ds.sizes[10:13].tolist()
    np.testing.assert_array_equal(np.concatenate(parts), flat[start:start + ds.sizes[10:13].sum()])
    assert ds.document_token_range(10) == (start, start + int(ds.sizes[10]))
    np.testing.assert_array_equal(ds.get_document(10), ds[10])
    assert ds[5:5] == []


def test_writer_is_byte_identical_to_megatron_files(fixtures, tmp_path):
    for name in ("test_text_document", "fim_text_document"):
        src = MMapIndexedDataset(fixtures / name)
        out = write_indexed_dataset(tmp_path / name, (src[i] for i in range(len(src))),
                                    dtype=np.int32)
        for ext in (".bin", ".idx"):
            assert (tmp_path / (name + ext)).read_bytes() == (fixtures / (name + ext)).read_bytes()
        assert len(out) == 1000
    assert sorted(os.listdir(tmp_path)) == sorted(
        f"{n}{e}" for n in ("test_text_document", "fim_text_document") for e in (".bin", ".idx"))


def test_neox_layout_multi_item_documents_uint16(tmp_path):
    """Two documents: [a, b] and [c]; doc_idx = [0, 2, 3]; uint16 because vocab < 65500."""
    a, b, c = [5, 6, 7], [65535], [0, 1]
    with MMapIndexedDatasetBuilder(tmp_path / "x", best_dtype(50277)) as w:
        w.add_item(a)
        w.add_item(np.array(b))
        w.end_document()
        w.add_item(c)
        w.end_document()
    assert (tmp_path / "x.idx").read_bytes() == _expected_index_bytes(8, [3, 1, 2], 2, [0, 2, 3])
    assert (tmp_path / "x.bin").read_bytes() == np.array(a + b + c, "<u2").tobytes()
    ds = MMapIndexedDataset(tmp_path / "x")
    assert ds.dtype == np.uint16 and ds.num_docs == 2 and len(ds) == 3 and ds.num_tokens == 6
    assert ds.document_items(0) == (0, 2)
    assert ds.document_token_range(0) == (0, 4) and ds.document_token_range(1) == (4, 6)
    np.testing.assert_array_equal(ds.get_document(0), a + b)


def test_best_dtype_rule():
    assert best_dtype(50277) == np.uint16
    assert best_dtype(65499) == np.uint16
    assert best_dtype(65500) == np.int32
    assert best_dtype(None) == np.int32


@pytest.mark.parametrize("code", sorted(DTYPES))
def test_every_dtype_code_round_trips(tmp_path, code):
    dt = DTYPES[code]
    docs = [np.array([1, 2, 3], dt), np.array([], dt), np.array([4, 5], dt)]
    if dt.kind == "f":
        docs[0] = np.array([1.5, -2.25, 3.0], dt)
    ds = write_indexed_dataset(tmp_path / "d", docs, dtype=dt)
    assert (tmp_path / "d.idx").read_bytes()[17] == code
    assert (tmp_path / "d.idx").read_bytes() == _expected_index_bytes(code, [3, 0, 2],
                                                                      dt.itemsize, [0, 1, 2, 3])
    assert ds.dtype == dt and len(ds) == 3
    for i, d in enumerate(docs):
        assert ds[i].dtype == dt
        np.testing.assert_array_equal(ds[i], d)


def test_writer_refuses_values_that_do_not_fit(tmp_path):
    w = MMapIndexedDatasetBuilder(tmp_path / "x", np.uint16)
    with pytest.raises(IndexedDatasetError, match=r"fit uint16 .*found range \[0, 70000\]"):
        w.add_item([0, 70000])
    w.abort()
    assert os.listdir(tmp_path) == []


def test_failed_write_leaves_no_files(tmp_path):
    def docs():
        yield [1, 2]
        raise RuntimeError("tokenizer died")

    with pytest.raises(RuntimeError):
        write_indexed_dataset(tmp_path / "x", docs(), vocab_size=100)
    assert os.listdir(tmp_path) == []
    w = MMapIndexedDatasetBuilder(tmp_path / "y", np.int32)
    w.add_document([1])
    assert len(os.listdir(tmp_path)) == 1 and os.listdir(tmp_path)[0].endswith(".tmp")
    w.finalize()
    assert sorted(os.listdir(tmp_path)) == ["y.bin", "y.idx"]


def test_empty_dataset(tmp_path):
    ds = write_indexed_dataset(tmp_path / "e", [], vocab_size=10)
    assert len(ds) == 0 and ds.num_docs == 0 and ds.num_tokens == 0
    with pytest.raises(IndexedDatasetIndexError):
        ds[0]


def test_pickle_reopens(fixtures):
    ds = MMapIndexedDataset(fixtures / "test_text_document")
    ds2 = pickle.loads(pickle.dumps(ds))
    np.testing.assert_array_equal(ds2[3], ds[3])


# -- bad input -------------------------------------------------------------------------------
@pytest.fixture
def small(tmp_path):
    write_indexed_dataset(tmp_path / "s", [[1, 2, 3], [4, 5]], dtype=np.int32)
    return tmp_path / "s"


def _patch(path, offset, data):
    raw = bytearray(path.read_bytes())
    raw[offset:offset + len(data)] = data
    path.write_bytes(bytes(raw))


def test_wrong_magic(small):
    idx = small.with_suffix(".idx")
    _patch(idx, 0, b"TNTIDX\x00\x00")
    with pytest.raises(IndexedDatasetError, match=r"s\.idx: wrong magic: expected .*MMIDIDX.*"
                                                  r"found b'TNTIDX.*cached"):
        MMapIndexedDataset(small)


def test_unknown_version(small):
    _patch(small.with_suffix(".idx"), 9, struct.pack("<Q", 2))
    with pytest.raises(IndexedDatasetError, match=r"s\.idx: unknown version: expected 1, found 2"):
        MMapIndexedDataset(small)


def test_unknown_dtype_code(small):
    _patch(small.with_suffix(".idx"), 17, bytes([9]))
    with pytest.raises(IndexedDatasetError,
                       match=r"s\.idx: unknown dtype code: expected one of \[1, .*8\], found 9"):
        MMapIndexedDataset(small)


def test_bin_shorter_than_index_says(small):
    b = small.with_suffix(".bin")
    b.write_bytes(b.read_bytes()[:-4])
    with pytest.raises(IndexedDatasetError,
                       match=r"s\.bin: size mismatch: .*ends at byte 20, found a file of 16 bytes"
                             r" \(truncated"):
        MMapIndexedDataset(small)


def test_idx_truncated_or_padded(small):
    idx = small.with_suffix(".idx")
    raw = idx.read_bytes()
    idx.write_bytes(raw[:-3])
    with pytest.raises(IndexedDatasetError, match=r"s\.idx: size mismatch: .*needs exactly "
                                                  rf"{len(raw)} bytes, found {len(raw) - 3}"):
        MMapIndexedDataset(small)
    idx.write_bytes(raw[:20])
    with pytest.raises(IndexedDatasetError, match="truncated header: expected 34 bytes, found 20"):
        MMapIndexedDataset(small)


def test_missing_file(small):
    small.with_suffix(".bin").unlink()
    with pytest.raises(FileNotFoundError, match=r"s\.bin: no such file"):
        MMapIndexedDataset(small)


def test_index_out_of_range(small):
    ds = MMapIndexedDataset(small)
    with pytest.raises(IndexedDatasetIndexError,
                       match=r"s\.idx: item index out of range: expected -2 <= i < 2, found 2"):
        ds[2]
    with pytest.raises(IndexError):  # also a plain IndexError
        ds.get(-3)
    with pytest.raises(IndexedDatasetIndexError, match="item 1 has 2 tokens: .*found offset=1, "
                                                       "length=2"):
        ds.get(1, offset=1, length=2)
    with pytest.raises(IndexedDatasetIndexError, match=r"expected -2 <= d < 2, found 5"):
        ds.get_document(5)
    with pytest.raises(IndexedDatasetIndexError, match=r"found \[1, 3\)"):
        ds.get_range(1, 3)


def test_validate_catches_corrupt_pointer(tmp_path):
    write_indexed_dataset(tmp_path / "c", [[1, 2, 3], [4, 5], [6]], dtype=np.int32)
    # pointer of item 1 must be 12 (3 int32 tokens); make it 8: same file sizes, wrong layout
    _patch(tmp_path / "c.idx", 34 + 3 * 4 + 8, struct.pack("<q", 8))
    ds = MMapIndexedDataset(tmp_path / "c")
    with pytest.raises(IndexedDatasetError, match="pointer of item 1: expected 12 .* found 8"):
        ds.validate()
    with pytest.raises(IndexedDatasetError, match="not contiguous"):
        ds.get_range(0, 2)
