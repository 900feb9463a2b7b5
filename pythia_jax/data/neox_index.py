"""GPT-NeoX v1.0 `GPT2Dataset` sample index, for raw (not pre-shuffled) tokenized files.

What NeoX v1.0 does (reference doc section 4.2), reproduced index for index:

- `documents` = every item of the file (`arange(N)`; Pythia used the whole file for training);
  `tokens_per_epoch` = sum of their sizes.
- `num_epochs` = the smallest E with `(E * tokens_per_epoch - 1) // seq_len >= num_samples`.
- One `np.random.RandomState(seed)`, used first to shuffle doc_idx, then shuffle_idx.
- doc_idx: the document list repeated E times (epoch-major), int32, shuffled jointly.
- sample_idx: int32 [S + 1, 2], S = (E * tokens_per_epoch - 1) // seq_len; row s = (position
  in doc_idx, token offset in that document) of the first token of sample s. Samples are
  seq_len + 1 tokens long and overlap by one token: sample s covers stream positions
  [s * seq_len, s * seq_len + seq_len] of the concatenated shuffled documents.
- shuffle_idx: `arange(S)` (uint32, int64 when S >= 2**32 - 1), shuffled.
- sample i = stream tokens of sample `shuffle_idx[i]`.

NeoX builds sample_idx with a token-by-document loop (a C++ helper). `build_sample_idx` here
computes the same rows in vectorized form: the start of sample s is stream position
p = s * seq_len, which lies in the first document of the stream whose cumulative end exceeds p.
"""

from __future__ import annotations

import math
import os
import tempfile
import warnings

import numpy as np

from pythia_jax import paths as _paths
from pythia_jax.data.indexed import IndexedDatasetError, IndexedDatasetIndexError, \
    MMapIndexedDataset

__all__ = [
    "num_epochs_for",
    "build_doc_idx",
    "build_sample_idx",
    "build_shuffle_idx",
    "build_sample_index",
    "pythia_num_samples",
    "index_cache_paths",
    "load_or_build_sample_index",
    "NeoXShuffledDataset",
]


def num_epochs_for(tokens_per_epoch: int, seq_len: int, num_samples: int) -> int:
    """Smallest E with (E * tokens_per_epoch - 1) // seq_len >= num_samples (NeoX `_num_epochs`)."""
    if tokens_per_epoch <= 0:
        raise IndexedDatasetError(f"cannot build samples: the documents hold {tokens_per_epoch} "
                                  "tokens, expected at least 1")
    if seq_len <= 0 or num_samples < 0:
        raise ValueError(f"expected seq_len > 0 and num_samples >= 0, found {seq_len}, "
                         f"{num_samples}")
    # closed form of NeoX's loop (E >= 1): E*T - 1 >= num_samples * seq_len
    return max(1, -(-(num_samples * seq_len + 1) // tokens_per_epoch))


def build_doc_idx(documents: np.ndarray, num_epochs: int, rng: np.random.RandomState) -> np.ndarray:
    """`documents` repeated `num_epochs` times (epoch-major), int32, one joint shuffle."""
    doc_idx = np.tile(np.asarray(documents, dtype=np.int32), num_epochs)
    rng.shuffle(doc_idx)
    return doc_idx


def build_sample_idx(sizes: np.ndarray, doc_idx: np.ndarray, seq_len: int, num_epochs: int,
                     tokens_per_epoch: int, chunk: int = 1 << 23) -> np.ndarray:
    """int32 [S + 1, 2] rows (index into doc_idx, offset in that document), NeoX's layout."""
    num_samples = (num_epochs * tokens_per_epoch - 1) // seq_len
    doc_sizes = np.asarray(sizes)[np.asarray(doc_idx)].astype(np.int64)
    ends = np.cumsum(doc_sizes)  # exclusive end of each stream document
    if ends.size == 0 or int(ends[-1]) != num_epochs * tokens_per_epoch:
        raise IndexedDatasetError(
            f"doc_idx holds {int(ends[-1]) if ends.size else 0} tokens, expected "
            f"num_epochs * tokens_per_epoch = {num_epochs * tokens_per_epoch}")
    if max(len(doc_idx), int(doc_sizes.max(initial=0))) > np.iinfo(np.int32).max:
        raise IndexedDatasetError("sample_idx entries overflow int32 (NeoX v1.0 stores int32)")
    out = np.empty((num_samples + 1, 2), dtype=np.int32)
    for a in range(0, num_samples + 1, chunk):
        pos = np.arange(a, min(a + chunk, num_samples + 1), dtype=np.int64) * seq_len
        k = np.searchsorted(ends, pos, side="right")
        out[a:a + len(pos), 0] = k
        out[a:a + len(pos), 1] = pos - (ends[k] - doc_sizes[k])
    # NeoX writes row 0 as (0, 0) unconditionally (differs only if the first docs are empty).
    out[0] = 0
    return out


def build_shuffle_idx(size: int, rng: np.random.RandomState) -> np.ndarray:
    dtype = np.uint32 if size < np.iinfo(np.uint32).max - 1 else np.int64
    idx = np.arange(size, dtype=dtype)
    rng.shuffle(idx)
    return idx


def build_sample_index(sizes: np.ndarray, num_samples: int, seq_len: int = 2048,
                       seed: int = 1234, documents: np.ndarray | None = None):
    """(doc_idx, sample_idx, shuffle_idx) exactly as GPT-NeoX v1.0 builds them.

    `sizes`: tokens per item of the indexed dataset; `documents`: the items used (default all).
    """
    sizes = np.asarray(sizes)
    if documents is None:
        documents = np.arange(len(sizes), dtype=np.int32)
    documents = np.asarray(documents)
    if documents.size and (documents.min() < 0 or documents.max() >= len(sizes)):
        raise IndexedDatasetIndexError(f"documents must be item indices in [0, {len(sizes)}), "
                                       f"found [{documents.min()}, {documents.max()}]")
    tokens_per_epoch = int(sizes[documents].sum(dtype=np.int64))
    epochs = num_epochs_for(tokens_per_epoch, seq_len, num_samples)
    rng = np.random.RandomState(seed=seed)
    doc_idx = build_doc_idx(documents, epochs, rng)
    sample_idx = build_sample_idx(sizes, doc_idx, seq_len, epochs, tokens_per_epoch)
    shuffle_idx = build_shuffle_idx(sample_idx.shape[0] - 1, rng)
    return doc_idx, sample_idx, shuffle_idx


def pythia_num_samples(train_iters: int = 143000, global_batch: int = 1024) -> int:
    """Samples NeoX requested for a Pythia run: train_iters * batch inflated by 0.5% by the
    blending helper (`ceil(n * 1.005)`): 147,164,160 for Pythia."""
    return int(math.ceil(train_iters * global_batch * 1.005))


def index_cache_paths(prefix: str, num_samples: int, seq_len: int, seed: int,
                      name: str = "train", cache_dir: str | None = None) -> dict[str, str]:
    """NeoX's cache names:
    `{prefix}_{name}_indexmap_{ns}ns_{sl}sl_{seed}s_{doc,sample,shuffle}_idx.npy`."""
    base = prefix if cache_dir is None else os.path.join(cache_dir, os.path.basename(prefix))
    stem = f"{base}_{name}_indexmap_{num_samples}ns_{seq_len}sl_{seed}s"
    return {k: f"{stem}_{k}_idx.npy" for k in ("doc", "sample", "shuffle")}


def _save_atomic(path: str, arr: np.ndarray) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        with _paths.sigterm_held():  # no SIGTERM between the creation and the cleanup block
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.",
                                       suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            np.save(f, arr, allow_pickle=False)
        os.replace(tmp, path)
    except BaseException:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_or_build_sample_index(dataset: MMapIndexedDataset, num_samples: int,
                               seq_len: int = 2048, seed: int = 1234, name: str = "train",
                               cache_dir: str | None = None, cache: bool = True):
    """Load the three index arrays from the `.npy` cache next to the data (or in `cache_dir`),
    building and saving them when missing. A read-only data folder only costs a warning."""
    paths = index_cache_paths(dataset.prefix, num_samples, seq_len, seed, name, cache_dir)
    if cache and all(os.path.isfile(p) for p in paths.values()):
        arrays = tuple(np.load(paths[k], mmap_mode="r", allow_pickle=False)
                       for k in ("doc", "sample", "shuffle"))
        doc_idx, sample_idx, shuffle_idx = arrays
        # the shapes the current .bin/.idx imply: a cache of another (older) file fails here
        tokens = int(dataset.sizes.sum(dtype=np.int64))
        epochs = num_epochs_for(tokens, seq_len, num_samples)
        n_samples = (epochs * tokens - 1) // seq_len
        want = {"doc": (epochs * len(dataset),), "sample": (n_samples + 1, 2),
                "shuffle": (n_samples,)}
        for k, arr in zip(("doc", "sample", "shuffle"), arrays):
            if arr.shape != want[k]:
                raise IndexedDatasetError(
                    f"{paths[k]}: stale or foreign cached index: expected shape {want[k]} for "
                    f"{dataset.prefix} ({len(dataset)} items, {tokens} tokens, {epochs} "
                    f"epochs), found {arr.shape}; delete the cached .npy files")
        return doc_idx, sample_idx, shuffle_idx
    doc_idx, sample_idx, shuffle_idx = build_sample_index(dataset.sizes, num_samples, seq_len,
                                                          seed)
    if cache:
        try:
            for k, arr in (("doc", doc_idx), ("sample", sample_idx), ("shuffle", shuffle_idx)):
                _save_atomic(paths[k], arr)
        except OSError as e:
            warnings.warn(f"could not cache the sample index next to {dataset.prefix} ({e}); "
                          "pass cache_dir= to keep it", stacklevel=2)
    return doc_idx, sample_idx, shuffle_idx


class NeoXShuffledDataset:
    """The training samples GPT-NeoX v1.0 draws from a raw indexed dataset.

    `ds[i]` -> the seq_len + 1 tokens of training sample i (dtype as stored), exactly
    `GPT2Dataset[i]["text"]`; `ds.get_samples(a, b)` -> [b - a, seq_len + 1]. Feed it to
    `PythiaOrder` to get step batches: step k = samples [k * batch, (k + 1) * batch).
    `len(ds)` is the number of samples built (S; NeoX's `__len__` reports S - 1).
    """

    def __init__(self, dataset, num_samples: int, seq_len: int = 2048, seed: int = 1234,
                 name: str = "train", cache_dir: str | None = None, cache: bool = True):
        if not isinstance(dataset, MMapIndexedDataset):
            dataset = MMapIndexedDataset(dataset)
        self.dataset = dataset
        self.num_samples = int(num_samples)
        self.seq_len = int(seq_len)
        self.seed = int(seed)
        self.doc_idx, self.sample_idx, self.shuffle_idx = load_or_build_sample_index(
            dataset, self.num_samples, self.seq_len, self.seed, name, cache_dir, cache)

    @property
    def dtype(self) -> np.dtype:
        return self.dataset.dtype

    @property
    def prefix(self) -> str:
        return self.dataset.prefix

    def __len__(self) -> int:
        return len(self.shuffle_idx)

    def __repr__(self) -> str:
        return (f"NeoXShuffledDataset({self.dataset.prefix!r}, {len(self)} samples of "
                f"{self.seq_len + 1} tokens, seed {self.seed})")

    def __getitem__(self, i) -> np.ndarray:
        n = len(self)
        i = int(i)
        if not -n <= i < n:
            raise IndexedDatasetIndexError(
                f"{self.dataset.prefix}: sample index out of range: expected -{n} <= i < {n}, "
                f"found {i}")
        j = int(self.shuffle_idx[i % n])
        (df, of), (dl, ol) = self.sample_idx[j].tolist(), self.sample_idx[j + 1].tolist()
        ds, docs = self.dataset, self.doc_idx
        if df == dl:
            out = np.array(ds.get(int(docs[df]), offset=of, length=ol - of + 1))
        else:
            parts = [ds.get(int(docs[df]), offset=of)]
            parts += [ds.get(int(docs[k])) for k in range(df + 1, dl)]
            parts.append(ds.get(int(docs[dl]), length=ol + 1))
            out = np.concatenate(parts)
        if out.size != self.seq_len + 1:
            raise IndexedDatasetError(
                f"{self.dataset.prefix}: sample {i} has {out.size} tokens, expected "
                f"{self.seq_len + 1} (corrupt sample index cache?)")
        return out

    def get_samples(self, start: int, stop: int) -> np.ndarray:
        if not 0 <= start <= stop <= len(self):
            raise IndexedDatasetIndexError(
                f"{self.dataset.prefix}: sample range out of range: expected 0 <= start <= stop"
                f" <= {len(self)}, found [{start}, {stop})")
        out = np.empty((stop - start, self.seq_len + 1), dtype=self.dtype)
        for r, i in enumerate(range(start, stop)):
            out[r] = self[i]
        return out
