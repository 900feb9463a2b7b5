"""Pythia's step order over pre-shuffled files: step k = items [Bk, Bk + B)."""

import itertools

import numpy as np
import pytest

from pythia_jax.data.indexed import IndexedDatasetError, IndexedDatasetIndexError, \
    MMapIndexedDataset, write_indexed_dataset
from pythia_jax.data.order import PythiaOrder, process_rows


def test_pythia_defaults_on_a_two_step_file(tmp_path):
    """1024 x 2049 uint16 per step; item i sits at byte i * 2049 * 2 (reference doc 4.3)."""
    rng = np.random.default_rng(0)
    items = rng.integers(0, 50277, size=(2 * 1024 + 5, 2049), dtype=np.uint16)
    write_indexed_dataset(tmp_path / "document", items, vocab_size=50277)
    order = PythiaOrder(tmp_path / "document")
    assert order.num_steps == 2 and order.batch_size == 1024 and order.seq_len == 2048
    raw = np.memmap(tmp_path / "document.bin", dtype=np.uint16, mode="r")
    for step in (0, 1):
        b = order.batch(step)
        assert b.shape == (1024, 2049) and b.dtype == np.uint16
        np.testing.assert_array_equal(b, items[1024 * step:1024 * (step + 1)])
        r = 517
        i = 1024 * step + r
        np.testing.assert_array_equal(b[r], raw[i * 2049:(i + 1) * 2049])
    inputs, targets = order.inputs_targets(1)
    np.testing.assert_array_equal(inputs, items[1024:2048, :2048])
    np.testing.assert_array_equal(targets, items[1024:2048, 1:])
    with pytest.raises(IndexedDatasetIndexError,
                       match=r"document\.bin: step 2 is past the end: expected 0 <= step < 2 "
                             r"\(2053 items = 2 full steps of 1024\)"):
        order.batch(2)


@pytest.fixture
def small(tmp_path):
    items = np.arange(10 * 4 * 9, dtype=np.int64).reshape(40, 9) % 50000
    write_indexed_dataset(tmp_path / "small", items, vocab_size=50277)
    return tmp_path / "small", items.astype(np.uint16)


def test_small_batches_rows_and_views(small):
    prefix, items = small
    order = PythiaOrder(str(prefix), batch_size=4, seq_len=8)
    assert order.num_steps == 10 and len(order) == 10
    for step in range(10):
        np.testing.assert_array_equal(order.batch(step), items[4 * step:4 * step + 4])
    np.testing.assert_array_equal(order.rows(3, 1, 3), items[13:15])
    assert order.item_range(3, 1, 3) == range(13, 15)
    assert not order.batch(2).flags.owndata  # a view into the memory map
    with pytest.raises(IndexedDatasetIndexError, match=r"row range out of range: .*found \[2, 5\)"):
        order.rows(0, 2, 5)
    with pytest.raises(IndexedDatasetIndexError, match="step -1 is past the end"):
        order.batch(-1)


def test_item_of_wrong_length(tmp_path):
    items = [np.arange(9) for _ in range(8)]
    items[6] = np.arange(8)  # row 2 of step 1 is one token short
    items.append(np.arange(10))
    write_indexed_dataset(tmp_path / "bad", items, vocab_size=100)
    order = PythiaOrder(tmp_path / "bad", batch_size=4, seq_len=8)
    np.testing.assert_array_equal(order.batch(0)[3], np.arange(9))
    with pytest.raises(IndexedDatasetError,
                       match=r"bad\.bin: item 6 \(step 1, row 2\) has 8 tokens, expected "
                             r"seq_len \+ 1 = 9"):
        order.batch(1)
    np.testing.assert_array_equal(order.rows(1, 0, 2), [np.arange(9)] * 2)  # rows before it
    # a file whose first item does not match seq_len fails on open
    with pytest.raises(IndexedDatasetError, match=r"item 0 has 9 tokens, expected seq_len \+ 1 = "
                                                  r"2049"):
        PythiaOrder(tmp_path / "bad")


def test_order_from_a_dataset_object_and_sequence(small):
    prefix, items = small
    ds = MMapIndexedDataset(prefix)
    np.testing.assert_array_equal(PythiaOrder(ds, 5, 8).batch(7), items[35:40])
    seq = [items[i] for i in range(40)]
    order = PythiaOrder(type("Seq", (), {"__len__": lambda s: 40,
                                          "__getitem__": lambda s, i: seq[i],
                                          "dtype": np.uint16})(), 8, 8)
    np.testing.assert_array_equal(order.batch(4), items[32:40])


@pytest.mark.parametrize("P", [1, 2, 4])
def test_process_rows_partition_the_global_batch(P):
    for step in (0, 5, 142999):
        ranges = [process_rows(step, p, P) for p in range(P)]
        assert all(len(r) == 1024 // P for r in ranges)
        assert list(itertools.chain(*ranges)) == list(range(1024 * step, 1024 * (step + 1)))


def test_process_rows_errors(small):
    with pytest.raises(ValueError, match="not divisible by 3"):
        process_rows(0, 0, 3)
    with pytest.raises(ValueError, match="process_index < process_count"):
        process_rows(0, 2, 2)
    order = PythiaOrder(small[0], batch_size=4, seq_len=8)
    assert order.process_rows(2, 1, 2) == range(10, 12)
    with pytest.raises(IndexedDatasetIndexError, match="past the end"):
        order.process_rows(10, 0, 2)
