"""GPT-NeoX v1.0 sample index on small inputs whose answer is derived by hand here."""

import os

import numpy as np
import pytest

from pythia_jax.data.indexed import IndexedDatasetError, IndexedDatasetIndexError, \
    write_indexed_dataset
from pythia_jax.data.neox_index import (NeoXShuffledDataset, build_sample_idx,
                                        build_sample_index, index_cache_paths, num_epochs_for,
                                        pythia_num_samples)
from pythia_jax.data.order import PythiaOrder


def test_epoch_rule_by_hand():
    # 10 tokens per epoch, seq_len 4: after E epochs there are (10E - 1) // 4 samples.
    assert num_epochs_for(10, 4, 0) == 1
    assert num_epochs_for(10, 4, 2) == 1   # (10 - 1) // 4 = 2
    assert num_epochs_for(10, 4, 3) == 2   # 2 < 3; (20 - 1) // 4 = 4
    assert num_epochs_for(10, 4, 4) == 2
    assert num_epochs_for(10, 4, 5) == 3   # (30 - 1) // 4 = 7
    assert num_epochs_for(8, 4, 1) == 1    # (8 - 1) // 4 = 1
    assert num_epochs_for(8, 4, 2) == 2    # 1 < 2; (16 - 1) // 4 = 3
    # Pythia: 143000 steps x 1024, inflated by 0.5% by NeoX's blending helper
    assert pythia_num_samples() == 147_164_160


def test_sample_idx_by_hand():
    # sizes of docs 0, 1, 2 = 3, 5, 2; stream order (doc_idx) = 1, 0, 2, 2, 0, 1:
    #   doc_idx position: 0       1      2     3      4       5
    #   stream tokens:    0-4     5-7    8-9   10-11  12-14   15-19
    # seq_len 4 -> sample s starts at stream position 4s; S = (2 * 10 - 1) // 4 = 4 samples.
    #   p=0 -> (0, 0); p=4 -> (0, 4); p=8 -> (2, 0); p=12 -> (4, 0); p=16 -> (5, 1)
    sizes = np.array([3, 5, 2], np.int32)
    doc_idx = np.array([1, 0, 2, 2, 0, 1], np.int32)
    got = build_sample_idx(sizes, doc_idx, 4, 2, 10)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, [[0, 0], [0, 4], [2, 0], [4, 0], [5, 1]])


def test_sample_idx_with_empty_first_document_by_hand():
    # sizes 0, 5, seq_len 2: NeoX writes row 0 as (0, 0) even though doc 0 is empty; the
    # next starts are stream positions 2 and 4, both in doc_idx position 1.
    got = build_sample_idx(np.array([0, 5], np.int32), np.array([0, 1], np.int32), 2, 1, 5)
    np.testing.assert_array_equal(got, [[0, 0], [1, 2], [1, 4]])


def _neox_loop(sizes, doc_idx, seq_len, num_epochs, tokens_per_epoch):
    """NeoX's walk over documents, written out literally (the C++ helper's algorithm)."""
    num_samples = (num_epochs * tokens_per_epoch - 1) // seq_len
    out = np.zeros((num_samples + 1, 2), np.int32)
    s, d, off = 1, 0, 0
    while s <= num_samples:
        remaining = seq_len + 1
        while remaining != 0:
            length = sizes[doc_idx[d]] - off
            remaining -= length
            if remaining <= 0:
                off += remaining + length - 1
                remaining = 0
            else:
                d += 1
                off = 0
        out[s] = d, off
        s += 1
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vectorized_sample_idx_equals_the_loop(seed):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(0, 9, size=40).astype(np.int32)
    sizes[rng.integers(0, 40)] = 30  # one document longer than a sample
    for seq_len in (1, 3, 7, 16):
        doc_idx = rng.permutation(np.tile(np.arange(40, dtype=np.int32), 2))
        t = int(sizes.sum())
        np.testing.assert_array_equal(build_sample_idx(sizes, doc_idx, seq_len, 2, t),
                                      _neox_loop(sizes, doc_idx, seq_len, 2, t))


def test_build_sample_index_rng_protocol():
    """One RandomState(seed): first the joint shuffle of doc_idx, then of shuffle_idx."""
    sizes = np.array([3, 5, 2], np.int32)
    doc_idx, sample_idx, shuffle_idx = build_sample_index(sizes, num_samples=3, seq_len=4,
                                                          seed=1234)
    rng = np.random.RandomState(1234)
    expect_doc = np.array([0, 1, 2, 0, 1, 2], np.int32)  # 2 epochs, epoch-major
    rng.shuffle(expect_doc)
    expect_shuffle = np.arange(4, dtype=np.uint32)       # S = (20 - 1) // 4 = 4
    rng.shuffle(expect_shuffle)
    assert doc_idx.dtype == np.int32 and shuffle_idx.dtype == np.uint32
    np.testing.assert_array_equal(doc_idx, expect_doc)
    np.testing.assert_array_equal(shuffle_idx, expect_shuffle)
    assert sorted(doc_idx.tolist()) == [0, 0, 1, 1, 2, 2]
    np.testing.assert_array_equal(sample_idx, _neox_loop(sizes, doc_idx, 4, 2, 10))


def test_shuffled_dataset_samples_and_cache(tmp_path):
    sizes = [3, 5, 2]
    docs = [np.arange(s, dtype=np.uint16) + 10 * (d + 1) for d, s in enumerate(sizes)]
    write_indexed_dataset(tmp_path / "raw", docs, vocab_size=50277)
    ds = NeoXShuffledDataset(tmp_path / "raw", num_samples=3, seq_len=4, seed=1234)
    assert len(ds) == 4 and ds.dtype == np.uint16
    # sample j of the stream = stream tokens [4j, 4j + 4] (5 tokens, overlapping by one)
    stream = np.concatenate([docs[d] for d in ds.doc_idx])
    for i in range(4):
        j = int(ds.shuffle_idx[i])
        np.testing.assert_array_equal(ds[i], stream[4 * j:4 * j + 5])
    np.testing.assert_array_equal(ds.get_samples(1, 3), np.stack([ds[1], ds[2]]))
    with pytest.raises(IndexedDatasetIndexError, match="sample index out of range"):
        ds[4]
    # cached next to the data under NeoX's names, and loaded from there the second time
    paths = index_cache_paths(str(tmp_path / "raw"), 3, 4, 1234)
    assert paths["doc"] == str(tmp_path / "raw_train_indexmap_3ns_4sl_1234s_doc_idx.npy")
    for p in paths.values():
        assert os.path.isfile(p)
    np.save(paths["shuffle"], np.array([3, 2, 1, 0], np.uint32))  # a cache is trusted as is
    again = NeoXShuffledDataset(tmp_path / "raw", num_samples=3, seq_len=4, seed=1234)
    np.testing.assert_array_equal(again[0], stream[12:17])
    # a step view over it: batch 2 x 4 tokens, step 1 = samples 2, 3
    order = PythiaOrder(again, batch_size=2, seq_len=4)
    assert order.num_steps == 2
    np.testing.assert_array_equal(order.batch(1), np.stack([again[2], again[3]]))
    with pytest.raises(Exception, match="seq_len 4, expected 8"):
        PythiaOrder(again, batch_size=2, seq_len=8)
    # a cache that does not fit the data (here: the file grew to 14 tokens, 1 epoch) is refused
    write_indexed_dataset(tmp_path / "raw", docs + [np.arange(4, dtype=np.uint16)],
                          vocab_size=50277)
    with pytest.raises(IndexedDatasetError,
                       match=r"raw_train_indexmap_3ns_4sl_1234s_doc_idx\.npy: stale or foreign "
                             r"cached index: expected shape \(4,\) .*14 tokens, 1 epochs.* "
                             r"found \(6,\)"):
        NeoXShuffledDataset(tmp_path / "raw", num_samples=3, seq_len=4, seed=1234)
