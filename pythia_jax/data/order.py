"""Pythia's training order: step k's batch is items [k * B, (k + 1) * B) of the pre-shuffled file.

EleutherAI's pre-shuffled Pile files (`pile-{standard,deduped}-pythia-preshuffled`) hold the
exact training stream: item i is the i-th training sample, exactly 2049 uint16 tokens. With
B = 1024 sequences per step (reference doc sections 3.2, 4.3)::

    batch(k)   = items [1024 k, 1024 k + 1024)   -> [1024, 2049]
    inputs     = batch[:, :2048]
    targets    = batch[:, 1:]

`PythiaOrder` also accepts a `NeoXShuffledDataset` (raw files + NeoX v1.0's sample index) or
any sequence of equal-length token arrays. Batch size and sequence length are parameters for
small experiments; the defaults are Pythia's.
"""

from __future__ import annotations

import os

import numpy as np

from pythia_jax.data.indexed import IndexedDatasetError, IndexedDatasetIndexError, \
    MMapIndexedDataset

__all__ = ["PythiaOrder", "process_rows", "PYTHIA_BATCH_SIZE", "PYTHIA_SEQ_LEN"]

PYTHIA_BATCH_SIZE = 1024
PYTHIA_SEQ_LEN = 2048


def process_rows(step: int, process_index: int, process_count: int,
                 batch_size: int = PYTHIA_BATCH_SIZE) -> range:
    """Dataset items that process `process_index` of `process_count` reads for `step`.

    The canonical data-parallel layout (a mesh whose batch axes are laid out process-major, as
    `jax.make_mesh` does): process p reads the p-th contiguous 1/P of the global batch. It is a
    pure function of the step, so the global batch does not depend on the number of hosts.
    """
    if process_count <= 0 or not 0 <= process_index < process_count:
        raise ValueError(f"expected 0 <= process_index < process_count, found "
                         f"{process_index} of {process_count}")
    if batch_size % process_count:
        raise ValueError(f"batch size {batch_size} is not divisible by {process_count} processes")
    if step < 0:
        raise IndexedDatasetIndexError(f"step must be >= 0, found {step}")
    per = batch_size // process_count
    start = step * batch_size + process_index * per
    return range(start, start + per)


class PythiaOrder:
    """Step-indexed view: `batch(step)` -> [batch_size, seq_len + 1] tokens (dtype as stored).

    `rows(step, start, stop)` -> rows start..stop-1 of that step's batch (a process-local slice).
    From an `MMapIndexedDataset` both are zero-copy read-only views into the memory map.
    With `vocab_size` (training passes `model.vocab_size`) every batch read is checked for ids
    outside [0, vocab_size): the `.idx` holds no maximum, and an id past the embedding would
    otherwise train on NaN.
    """

    def __init__(self, prefix_or_dataset, batch_size: int = PYTHIA_BATCH_SIZE,
                 seq_len: int = PYTHIA_SEQ_LEN, vocab_size: int | None = None):
        ds = prefix_or_dataset
        if isinstance(ds, (str, os.PathLike)):
            ds = MMapIndexedDataset(ds)
        if batch_size <= 0 or seq_len <= 0:
            raise ValueError(f"expected batch_size > 0 and seq_len > 0, found {batch_size}, "
                             f"{seq_len}")
        if vocab_size is not None and vocab_size <= 0:
            raise ValueError(f"expected vocab_size > 0, found {vocab_size}")
        self.dataset = ds
        self.vocab_size = None if vocab_size is None else int(vocab_size)
        self.batch_size = int(batch_size)
        self.seq_len = int(seq_len)
        self.item_len = self.seq_len + 1
        self._mmap = isinstance(ds, MMapIndexedDataset)
        self.name = getattr(ds, "bin_path", None) or getattr(ds, "prefix", None) or repr(ds)
        ds_seq = getattr(ds, "seq_len", None)
        if not self._mmap and ds_seq is not None and ds_seq != self.seq_len:
            raise IndexedDatasetError(f"{self.name}: dataset builds samples of seq_len {ds_seq}, "
                                      f"expected {self.seq_len}")
        self.num_items = len(ds)
        self.num_steps = self.num_items // self.batch_size
        if self._mmap and self.num_items and int(ds.sizes[0]) != self.item_len:
            raise IndexedDatasetError(
                f"{self.name}: item 0 has {int(ds.sizes[0])} tokens, expected seq_len + 1 = "
                f"{self.item_len} (a pre-shuffled Pythia file has items of exactly 2049 tokens;"
                " is this a raw file needing NeoXShuffledDataset, or a different --seq_len?)")

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.dataset.dtype)

    def __len__(self) -> int:
        return self.num_steps

    def __repr__(self) -> str:
        return (f"PythiaOrder({self.name}: {self.num_steps} steps of {self.batch_size} x "
                f"{self.item_len} tokens)")

    def item_range(self, step: int, start: int = 0, stop: int | None = None) -> range:
        """Dataset items of rows start..stop-1 of step's batch."""
        step = int(step)
        if not 0 <= step < self.num_steps:
            raise IndexedDatasetIndexError(
                f"{self.name}: step {step} is past the end: expected 0 <= step < "
                f"{self.num_steps} ({self.num_items} items = {self.num_steps} full steps of "
                f"{self.batch_size})")
        stop = self.batch_size if stop is None else int(stop)
        if not 0 <= start <= stop <= self.batch_size:
            raise IndexedDatasetIndexError(
                f"{self.name}: row range out of range: expected 0 <= start <= stop <= "
                f"{self.batch_size}, found [{start}, {stop})")
        base = step * self.batch_size
        return range(base + start, base + stop)

    def rows(self, step: int, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows start..stop-1 of step's batch, [stop - start, seq_len + 1]; with `vocab_size`,
        every token id is checked to lie in [0, vocab_size) (one min/max pass over the rows)."""
        out = self._rows(step, start, stop)
        if self.vocab_size is not None:
            self.check_token_ids(out, step, start)
        return out

    def check_token_ids(self, rows: np.ndarray, step: int, start: int = 0) -> None:
        """Raise `IndexedDatasetError` naming the file, item, step, row and id when `rows`
        (rows start.. of step's batch) hold an id outside [0, vocab_size)."""
        if self.vocab_size is None or not rows.size:
            return
        lo, hi = rows.min(), rows.max()
        if hi < self.vocab_size and lo >= 0:
            return
        bad = np.argwhere((rows >= self.vocab_size) | (rows < 0))[0]
        r, c = int(bad[0]), int(bad[1])
        row = start + r
        item = int(step) * self.batch_size + row
        raise IndexedDatasetError(
            f"{self.name}: item {item} (step {step}, row {row}, position {c}) holds token id "
            f"{int(rows[r, c])}, outside the vocabulary [0, {self.vocab_size}) "
            "(model.vocab_size): a dataset tokenized with another tokenizer?")

    def _rows(self, step: int, start: int = 0, stop: int | None = None) -> np.ndarray:
        items = self.item_range(step, start, stop)
        a, b = items.start, items.stop
        if self._mmap:
            ds = self.dataset
            sizes = ds.sizes[a:b]
            bad = np.nonzero(sizes != self.item_len)[0]
            if bad.size:
                k = a + int(bad[0])
                raise IndexedDatasetError(
                    f"{self.name}: item {k} (step {step}, row {k - step * self.batch_size}) has "
                    f"{int(ds.sizes[k])} tokens, expected seq_len + 1 = {self.item_len}")
            return ds.get_range(a, b).reshape(b - a, self.item_len)
        if hasattr(self.dataset, "get_samples"):
            out = self.dataset.get_samples(a, b)
        else:
            out = np.empty((b - a, self.item_len), dtype=self.dtype)
            for r, i in enumerate(items):
                x = np.asarray(self.dataset[i])
                if x.shape != (self.item_len,):
                    raise IndexedDatasetError(
                        f"{self.name}: item {i} (step {step}) has shape {x.shape}, expected "
                        f"({self.item_len},)")
                out[r] = x
        if out.shape != (b - a, self.item_len):
            raise IndexedDatasetError(f"{self.name}: step {step} rows have shape {out.shape}, "
                                      f"expected {(b - a, self.item_len)}")
        return out

    def batch(self, step: int) -> np.ndarray:
        return self.rows(step, 0, self.batch_size)

    def inputs_targets(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(inputs, targets) = (batch[:, :-1], batch[:, 1:]) as numpy views."""
        b = self.batch(step)
        return b[:, :-1], b[:, 1:]

    def process_rows(self, step: int, process_index: int, process_count: int) -> range:
        """Items of this step read by one process in the canonical layout (see `process_rows`)."""
        self.item_range(step)
        return process_rows(step, process_index, process_count, self.batch_size)
