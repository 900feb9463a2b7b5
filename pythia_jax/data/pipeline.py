"""Host input pipeline: step -> globally sharded `inputs` / `targets` jax Arrays.

- The global batch of step k is `order.batch(k)` ([B, seq_len + 1] tokens). It is sharded over
  the mesh's batch axes (default `sharding.BATCH_AXES`, data and fsdp, those present in the
  mesh); any other mesh axis replicates it.
- Each process reads only the rows its own devices hold (`local_row_blocks`, computed from the
  sharding) and the global array is assembled with `jax.make_array_from_process_local_data`.
  Tokens travel to the devices in their stored dtype (uint16 for Pythia: half the bytes of
  int32); the split into int32 `inputs = x[:, :-1]` and `targets = x[:, 1:]` runs on device.
- `BatchIterator` reads through grain (a `MapDataset` over the random-access `StepSource`,
  record k = this process's rows of step k) in a background thread that also builds the device
  arrays, keeping `prefetch` steps ready ahead of the consumer.
- Data in a bucket (`gs://…`) reads the same way: a process's rows of a step are one
  contiguous byte range, so one ranged read per step, made in the background thread.
- The position in the stream is the step number only: a run resumed at step k, on any number of
  hosts, sees exactly the global batches k, k+1, ...
- grain is imported with this module, not when the first iterator is built: grain's import runs
  `etils.epy.lazy_imports()`, which swaps `builtins.__import__` for every thread while it is
  open. Imported mid-run, it made an in-flight orbax save's `from math import log` (humanize,
  reporting write speed) return a LazyModule and the save fail ("'LazyModule' object is not
  callable"; seen on Python 3.12 CI).
"""

from __future__ import annotations

import functools
import queue
import sys
import threading
from typing import Iterator, Sequence

import grain  # at import time, never mid-run: see the module docstring
import numpy as np

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from pythia_jax.data.indexed import IndexedDatasetError
from pythia_jax.data.order import PythiaOrder, process_rows
from pythia_jax.sharding import BATCH_AXES

__all__ = [
    "batch_sharding",
    "local_row_blocks",
    "read_local_rows",
    "make_global_batch",
    "StepSource",
    "BatchIterator",
    "HostBatchIterator",
    "process_rows",
]


def batch_sharding(mesh: Mesh, batch_axes: Sequence[str] = BATCH_AXES) -> NamedSharding:
    """[batch, length] sharding: batch over the mesh's `batch_axes` present, length replicated."""
    if isinstance(batch_axes, str):
        batch_axes = (batch_axes,)
    axes = tuple(a for a in batch_axes if a in mesh.axis_names)
    spec = PartitionSpec(axes if len(axes) > 1 else (axes[0] if axes else None), None)
    return NamedSharding(mesh, spec)


def _num_batch_shards(sharding: NamedSharding) -> int:
    first = sharding.spec[0] if len(sharding.spec) else None
    if first is None:
        return 1
    names = (first,) if isinstance(first, str) else tuple(first)
    return int(np.prod([sharding.mesh.shape[n] for n in names]))


def local_row_blocks(sharding: NamedSharding, batch_size: int,
                     devices: Sequence[jax.Device] | None = None) -> list[tuple[int, int]]:
    """Global batch rows held by `devices` (default: this process's), as sorted merged blocks.

    The concatenation of these blocks, in order, is the process-local data that
    `jax.make_array_from_process_local_data` expects for a [batch_size, ...] array.
    """
    shards = _num_batch_shards(sharding)
    if batch_size % shards:
        raise ValueError(f"batch size {batch_size} is not divisible by the {shards} shards of "
                         f"the mesh batch axes {sharding.spec[0]}")
    index_map = sharding.devices_indices_map((batch_size, 1))
    if devices is None:
        devices = [d for d in sharding.mesh.devices.flat
                   if d.process_index == jax.process_index()]
    spans = set()
    for d in devices:
        sl = index_map[d][0]
        spans.add((sl.start or 0, batch_size if sl.stop is None else sl.stop))
    blocks: list[list[int]] = []
    for a, b in sorted(spans):
        if blocks and a <= blocks[-1][1]:
            blocks[-1][1] = max(blocks[-1][1], b)
        else:
            blocks.append([a, b])
    return [(a, b) for a, b in blocks]


def read_local_rows(order: PythiaOrder, step: int, blocks: Sequence[tuple[int, int]]) -> np.ndarray:
    """This process's rows of `step`, checked. One block of a memory-mapped file comes back as a
    read-only view of the map (the device transfer is then the only copy); several blocks are
    concatenated into a fresh array."""
    parts = [order.rows(step, a, b) for a, b in blocks]
    out = np.concatenate(parts) if len(parts) > 1 else parts[0]
    if out.dtype.itemsize > 4 or out.dtype.kind == "f":
        if out.dtype.kind == "f":
            raise IndexedDatasetError(f"{order.name}: token files must hold integers, found "
                                      f"{out.dtype}")
        if out.size and (out.min() < 0 or out.max() > np.iinfo(np.int32).max):
            raise IndexedDatasetError(f"{order.name}: step {step}: token ids outside int32")
        out = out.astype(np.int32)
    return out


def _split_tokens(tokens: jax.Array):
    x = tokens.astype(jnp.int32)
    return x[:, :-1], x[:, 1:]


@functools.lru_cache(maxsize=32)
def _splitter(sharding: NamedSharding):
    return jax.jit(_split_tokens, out_shardings=(sharding, sharding))


def _assemble(local: np.ndarray, sharding: NamedSharding, global_rows: int) -> dict:
    shape = (global_rows,) + local.shape[1:]
    tokens = jax.make_array_from_process_local_data(sharding, local, shape)
    inputs, targets = _splitter(sharding)(tokens)
    return {"inputs": inputs, "targets": targets}


def make_global_batch(order: PythiaOrder, step: int, mesh: Mesh,
                      batch_axes: Sequence[str] = BATCH_AXES) -> dict:
    """{"inputs", "targets"}: int32 [batch, seq_len] jax Arrays sharded over `batch_axes`.

    This process reads only its own rows of step's batch from the file.
    """
    sharding = batch_sharding(mesh, batch_axes)
    blocks = local_row_blocks(sharding, order.batch_size)
    return _assemble(read_local_rows(order, step, blocks), sharding, order.batch_size)


class StepSource:
    """grain random-access source: record k = this process's rows of step k (numpy).

    A record is checked (lengths, range) and, for one block of a memory-mapped file, is a view
    of the map: the one copy (and any disk read) happens where it is consumed, in the prefetch
    thread (device transfer, or `HostBatchIterator`'s materialization)."""

    def __init__(self, order: PythiaOrder, blocks: Sequence[tuple[int, int]]):
        self.order = order
        self.blocks = [tuple(b) for b in blocks]

    def __len__(self) -> int:
        return self.order.num_steps

    def __getitem__(self, step: int) -> np.ndarray:
        return read_local_rows(self.order, int(step), self.blocks)

    def __repr__(self) -> str:
        return f"StepSource({self.order!r}, rows={self.blocks})"


_END = object()


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


class _Prefetcher:
    """Runs `produce(record)` for each record of `records` (an iterator) in one background
    thread, keeping up to `depth` results ready; yields `(step, result)` in order, from
    `start_step`. Exceptions surface in the consumer at the step that raised them.

    The bounded hand-off is two C-level `SimpleQueue`s (results, and free-slot tokens): cheaper
    than `queue.Queue`'s Python conditions, which cost ~0.1 ms of CPU per step on a busy host.
    """

    def __init__(self, records: Iterator, produce, start_step: int, end_step: int, depth: int,
                 name: str):
        self.start_step, self.end_step = int(start_step), int(end_step)
        self._next_step = self.start_step
        self._records = records
        self._produce_fn = produce
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._free: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(max(1, depth)):
            self._free.put(None)
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        final = _END
        try:
            step = self.start_step
            for record in self._records:
                if self._stop.is_set():
                    return
                result = self._produce_fn(record)
                self._free.get()  # wait for a free slot (close() hands one over)
                if self._stop.is_set():
                    return
                self._queue.put((step, result))
                step += 1
        except BaseException as e:  # handed to the consumer
            final = _Failure(e)
        finally:
            self._queue.put(final)  # the sentinel needs no slot: the consumer never waits forever

    @property
    def next_step(self) -> int:
        """The step the next `next()` returns (save it to resume)."""
        return self._next_step

    def state(self) -> dict:
        return {"step": self._next_step}

    def __iter__(self):
        return self

    def __next__(self):
        if self._done or self._next_step >= self.end_step:
            raise StopIteration
        item = self._queue.get()
        if item is _END:
            self._done = True
            raise StopIteration
        if isinstance(item, _Failure):
            self._done = True  # next_step stays at the step that failed
            self.close()
            raise item.exc
        self._free.put(None)
        step, result = item
        self._next_step = step + 1
        return step, result

    def close(self) -> None:
        self._stop.set()
        self._free.put(None)  # wake the producer if it waits for a slot
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=5.0)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __del__(self):
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()
            self._free.put(None)


def _step_records(order: PythiaOrder, blocks, start_step: int, end_step: int,
                  num_threads: int) -> tuple[StepSource, Iterator]:
    """grain over `StepSource`: records of steps start..end-1, in order. One reader: the
    prefetch thread indexes the MapDataset itself; more: grain's threaded read-ahead."""
    source = StepSource(order, blocks)
    ds = grain.MapDataset.source(source)
    if num_threads <= 1:  # records are indexed by step: no slice layer (grain's per-element cost)
        return source, (ds[step] for step in range(start_step, end_step))
    read = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=2 * num_threads)
    return source, iter(ds[start_step:end_step].to_iter_dataset(read))


def _check_range(order: PythiaOrder, start_step: int, end_step: int | None) -> int:
    end = order.num_steps if end_step is None else int(end_step)
    if not 0 <= start_step <= end <= order.num_steps:
        raise IndexError(f"{order.name}: expected 0 <= start_step <= end_step <= "
                         f"{order.num_steps}, found start_step={start_step}, "
                         f"end_step={end_step}")
    return end


class _BufferPool:
    """Reuses output arrays the consumer has dropped (CPython refcount), so the reader thread
    does not allocate (and page-fault) 4 MB per step: allocating in one thread and freeing in
    another made glibc hand the memory back and forth, ~0.1-0.2 ms of CPU per step. At most
    `limit` arrays are kept; beyond that (a consumer holding many batches) arrays are fresh."""

    def __init__(self, limit: int):
        self._arrays: list[np.ndarray] = []
        self._limit = limit

    def copy(self, x: np.ndarray) -> np.ndarray:
        for buf in self._arrays:
            # references: the list, `buf`, getrefcount's argument -> nobody else holds it
            if sys.getrefcount(buf) == 3 and buf.shape == x.shape and buf.dtype == x.dtype:
                np.copyto(buf, x)
                return buf
        out = np.array(x)
        if len(self._arrays) < self._limit:
            self._arrays.append(out)
        return out


class HostBatchIterator(_Prefetcher):
    """Host side only: yields `(step, rows)`, this process's rows of each step as a numpy array
    of its own (`blocks` as from `local_row_blocks`; default: the whole batch), read into
    memory ahead of the consumer by a background thread. An array is reused for a later step
    only once the consumer holds no reference to it (nor to a view of it).
    """

    def __init__(self, order: PythiaOrder, start_step: int, *, end_step: int | None = None,
                 blocks: Sequence[tuple[int, int]] | None = None, prefetch: int = 2,
                 num_threads: int = 1):
        if not isinstance(order, PythiaOrder):
            order = PythiaOrder(order)
        end = _check_range(order, start_step, end_step)
        self.order = order
        self.blocks = [(0, order.batch_size)] if blocks is None else [tuple(b) for b in blocks]
        self.source, records = _step_records(order, self.blocks, start_step, end, num_threads)
        pool = _BufferPool(limit=max(1, prefetch) + 4)
        super().__init__(records, pool.copy, start_step, end, prefetch, "pythia-host-prefetch")


class BatchIterator(_Prefetcher):
    """Yields `(step, {"inputs", "targets"})` for steps start_step, start_step+1, ... < end_step.

    A background thread reads each step's local rows through grain (a `MapDataset` over
    `StepSource`, checked views of the map) and copies them straight into global device arrays
    (the only copy, so disk reads happen in that thread too), keeping up to
    `prefetch` steps ready. `num_threads > 1` adds grain's threaded read-ahead in front (for
    slow storage); with the file in the page cache one reader is fastest
    (`bench/data_pipeline.py`). Resuming is `BatchIterator(order, start_step=k, mesh)`: the
    stream is a function of the step only. Use it as a context manager (or call `close()`) so
    the thread stops when a loop ends early.
    """

    def __init__(self, order: PythiaOrder, start_step: int, mesh: Mesh, *,
                 end_step: int | None = None, batch_axes: Sequence[str] = BATCH_AXES,
                 prefetch: int = 2, num_threads: int = 1):
        if not isinstance(order, PythiaOrder):
            order = PythiaOrder(order)
        end = _check_range(order, start_step, end_step)
        self.order = order
        self.sharding = batch_sharding(mesh, batch_axes)
        self.blocks = local_row_blocks(self.sharding, order.batch_size)
        self.source, records = _step_records(order, self.blocks, start_step, end, num_threads)
        sharding, rows = self.sharding, order.batch_size
        super().__init__(records, lambda local: _assemble(local, sharding, rows), start_step,
                         end, prefetch, "pythia-batch-prefetch")
