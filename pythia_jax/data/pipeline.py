"""Host input pipeline: step -> globally sharded `inputs` / `targets` jax Arrays.

- The global batch of step k is `order.batch(k)` ([B, seq_len + 1] tokens). It is sharded over
  the mesh's batch axes (default `("data", "fsdp")`, those present in the mesh); any other mesh
  axis replicates it.
- Each process reads only the rows its own devices hold (`local_row_blocks`, computed from the
  sharding) and the global array is assembled with `jax.make_array_from_process_local_data`.
  Tokens travel to the devices in their stored dtype (uint16 for Pythia: half the bytes of
  int32); the split into int32 `inputs = x[:, :-1]` and `targets = x[:, 1:]` runs on device.
- `BatchIterator` wraps a grain random-access source (record k = this process's rows of step k)
  with grain's threaded prefetch and one more background thread that builds the device arrays
  ahead of the consumer.
- The position in the stream is the step number only: a run resumed at step k, on any number of
  hosts, sees exactly the global batches k, k+1, ...
"""

from __future__ import annotations

import functools
import queue
import threading
from typing import Iterator, Sequence

import numpy as np

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from pythia_jax.data.indexed import IndexedDatasetError
from pythia_jax.data.order import PythiaOrder, process_rows

__all__ = [
    "batch_sharding",
    "local_row_blocks",
    "read_local_rows",
    "make_global_batch",
    "StepSource",
    "BatchIterator",
    "process_rows",
]

DEFAULT_BATCH_AXES = ("data", "fsdp")


def batch_sharding(mesh: Mesh, batch_axes: Sequence[str] = DEFAULT_BATCH_AXES) -> NamedSharding:
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
    """This process's rows of `step` (a fresh contiguous array, read from the memory map)."""
    parts = [order.rows(step, a, b) for a, b in blocks]
    out = np.concatenate(parts) if len(parts) > 1 else np.array(parts[0])
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
                      batch_axes: Sequence[str] = DEFAULT_BATCH_AXES) -> dict:
    """{"inputs", "targets"}: int32 [batch, seq_len] jax Arrays sharded over `batch_axes`.

    This process reads only its own rows of step's batch from the file.
    """
    sharding = batch_sharding(mesh, batch_axes)
    blocks = local_row_blocks(sharding, order.batch_size)
    return _assemble(read_local_rows(order, step, blocks), sharding, order.batch_size)


class StepSource:
    """grain random-access source: record k = this process's rows of step k (numpy)."""

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


class BatchIterator:
    """Yields `(step, {"inputs", "targets"})` for steps start_step, start_step+1, ... < end_step.

    grain reads records ahead with `num_threads` threads (`prefetch` records buffered); a
    background thread turns them into global device arrays, keeping up to `prefetch` ready.
    Resuming is `BatchIterator(order, start_step=k, mesh)`: the stream is a function of the step.
    """

    def __init__(self, order: PythiaOrder, start_step: int, mesh: Mesh, *,
                 end_step: int | None = None, batch_axes: Sequence[str] = DEFAULT_BATCH_AXES,
                 prefetch: int = 2, num_threads: int = 2):
        import grain

        if not isinstance(order, PythiaOrder):
            order = PythiaOrder(order)
        end = order.num_steps if end_step is None else int(end_step)
        if not 0 <= start_step <= end <= order.num_steps:
            raise IndexError(f"{order.name}: expected 0 <= start_step <= end_step <= "
                             f"{order.num_steps}, found start_step={start_step}, "
                             f"end_step={end_step}")
        self.order = order
        self.start_step, self.end_step = int(start_step), end
        self._next_step = self.start_step
        self.sharding = batch_sharding(mesh, batch_axes)
        self.blocks = local_row_blocks(self.sharding, order.batch_size)
        self.source = StepSource(order, self.blocks)
        ds = grain.MapDataset.source(self.source)[self.start_step:self.end_step]
        read = grain.ReadOptions(num_threads=max(1, num_threads),
                                 prefetch_buffer_size=max(1, prefetch))
        self._records = iter(ds.to_iter_dataset(read))
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, name="pythia-batch-prefetch",
                                        daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        try:
            step = self.start_step
            for local in self._records:
                if self._stop.is_set():
                    return
                batch = _assemble(local, self.sharding, self.order.batch_size)
                if not self._put((step, batch)):
                    return
                step += 1
            self._put(_END)
        except BaseException as e:  # handed to the consumer
            self._put(_Failure(e))

    @property
    def next_step(self) -> int:
        """The step the next `next()` returns (save it to resume)."""
        return self._next_step

    def state(self) -> dict:
        return {"step": self._next_step}

    def __iter__(self) -> Iterator[tuple[int, dict]]:
        return self

    def __next__(self) -> tuple[int, dict]:
        if self._next_step >= self.end_step:
            raise StopIteration
        while True:
            try:
                item = self._queue.get(timeout=1.0)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    raise RuntimeError("batch prefetch thread ended unexpectedly") from None
        if item is _END:
            raise StopIteration
        if isinstance(item, _Failure):
            self.close()
            raise item.exc
        step, batch = item
        self._next_step = step + 1
        return step, batch

    def close(self) -> None:
        self._stop.set()
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
