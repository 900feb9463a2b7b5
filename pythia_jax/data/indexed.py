"""Megatron / GPT-NeoX `MMIDIDX` indexed datasets: a `.bin` of tokens plus an `.idx` index.

Layout (reference doc section 4.1; all little-endian)::

    .idx  offset 0   9 bytes  magic b"MMIDIDX\\x00\\x00"
                 9   uint64   version (1)
                17   uint8    dtype code (1 uint8, 2 int8, 3 int16, 4 int32, 5 int64,
                                          6 float32, 7 float64, 8 uint16)
                18   uint64   N, number of items ("sequences")
                26   uint64   M, length of doc_idx
                34   int32    sizes[N]      tokens per item
            34+4N    int64    pointers[N]   byte offset of item i in .bin
           34+12N    int64    doc_idx[M]    first item of each document, then N
    .bin  the items' tokens back to back, no header

`MMapIndexedDataset(prefix)` is the one opener of token data in the project: `prefix` may be
local or a `gs://` URL, and its `.bin` one file or Pythia's byte shards read in place
(`data.source`). Local files are memory-mapped and every accessor returns a read-only view into
the mapping (zero copy; a range that crosses a shard boundary is joined into a fresh array); in
a bucket the `.idx` is read once at open and each accessor is one ranged read per file touched. `MMapIndexedDatasetBuilder` writes files byte-identical to
GPT-NeoX's builder, to temporary names that are renamed into place only when complete.

Every inconsistency (wrong magic, unknown version or dtype code, a truncated file, an index out
of range) raises `IndexedDatasetError` naming the file and what was expected versus found.
"""

from __future__ import annotations

import os
import struct
import tempfile
from array import array
from typing import Iterable, Sequence

import numpy as np

from pythia_jax import paths
from pythia_jax.data.errors import IndexedDatasetError, IndexedDatasetIndexError
from pythia_jax.data.source import (Layout, TokenBytes, check_total_size, dataset_exists, locate,
                                    read_index, verify_hashes)

__all__ = [
    "MMapIndexedDataset",
    "MMapIndexedDatasetBuilder",
    "IndexedDatasetError",
    "IndexedDatasetIndexError",
    "DTYPES",
    "best_dtype",
    "best_fitting_dtype",
    "dtype_code",
    "write_indexed_dataset",
    "split_prefix",
]

MAGIC = b"MMIDIDX\x00\x00"
_WRITE_BUFFER = 8 << 20  # large writes: fewer syscalls, large page-cache folios for readers
VERSION = 1
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, N, M -> 34 bytes
HEADER_SIZE = _HEADER.size

#: dtype code -> numpy dtype (the codes of Megatron / GPT-NeoX `indexed_dataset.py`).
DTYPES: dict[int, np.dtype] = {
    1: np.dtype(np.uint8),
    2: np.dtype(np.int8),
    3: np.dtype(np.int16),
    4: np.dtype(np.int32),
    5: np.dtype(np.int64),
    6: np.dtype(np.float32),
    7: np.dtype(np.float64),
    8: np.dtype(np.uint16),
}


def dtype_code(dtype) -> int:
    dt = np.dtype(dtype)
    for code, d in DTYPES.items():
        if d == dt:
            return code
    raise IndexedDatasetError(f"dtype {dt} has no MMIDIDX code; supported: "
                              f"{sorted(str(d) for d in DTYPES.values())}")


def best_dtype(vocab_size: int | None) -> np.dtype:
    """GPT-NeoX's rule: uint16 when the vocabulary is below 65,500 ids, else int32."""
    if vocab_size is not None and vocab_size < 65500:
        return np.dtype(np.uint16)
    return np.dtype(np.int32)


best_fitting_dtype = best_dtype  # the GPT-NeoX name


def split_prefix(path: str | os.PathLike) -> str:
    """`foo`, `foo.bin` or `foo.idx` -> `foo`."""
    path = os.fspath(path)
    for ext in (".bin", ".idx"):
        if path.endswith(ext):
            return path[: -len(ext)]
    return path


def _check_int(i, what: str) -> int:
    if isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer)):
        raise TypeError(f"{what} must be an integer, got {type(i).__name__}")
    return int(i)


# ---------------------------------------------------------------------------------------------
# Reader
# ---------------------------------------------------------------------------------------------
class MMapIndexedDataset:
    """Read-only, memory-mapped view of `prefix.bin` + `prefix.idx`.

    - `len(ds)` items; `ds[i]` -> the tokens of item i (a view); `ds[a:b]` -> list of views;
    - `ds.get(i, offset=0, length=None)` -> part of item i (GPT-NeoX's `get`);
    - `ds.get_range(a, b)` -> the tokens of items a..b-1 as one flat view;
    - `ds.num_docs`, `ds.document_items(d)`, `ds.document_token_range(d)`, `ds.get_document(d)`;
    - `ds.sizes` (int32), `ds.pointers` (int64), `ds.doc_idx` (int64), `ds.dtype`, `ds.num_tokens`.

    Opening a local dataset maps the `.idx` and checks its header against the file sizes, so it
    is O(1) even for the 300B-token Pile (a bucket's `.idx` is read into memory once);
    `validate()` does the full O(N) consistency check. `hashes`: a hash list (`unshard`'s
    format) to check every `.bin` file / shard against at open (`verify`). `layout` says where
    the files are, `token_bytes.requests` counts the ranged reads sent to a bucket.
    """

    def __init__(self, prefix: str | os.PathLike, *, hashes=None):
        self._prefix = split_prefix(prefix)
        self._open()
        if hashes is not None:
            self.verify(hashes)

    # -- pickling (grain / multiprocessing workers re-open the maps) ---------------------------
    def __getstate__(self):
        return {"prefix": self._prefix}

    def __setstate__(self, state):
        self._prefix = state["prefix"]
        self._open()

    def _open(self) -> None:
        layout = locate(self._prefix)  # FileNotFoundError / ShardError naming the missing file
        self._layout = layout
        idx_path, idx_size = layout.idx, layout.idx_size
        buf = read_index(layout)
        head = bytes(buf[:HEADER_SIZE])
        if len(head) < len(MAGIC) or head[: len(MAGIC)] != MAGIC:
            found = head[: len(MAGIC)]
            hint = (" (that is the old non-mmap 'cached' Megatron format, not supported)"
                    if found.startswith(b"TNTIDX") else "")
            raise IndexedDatasetError(f"{idx_path}: wrong magic: expected {MAGIC!r}, found "
                                      f"{found!r}{hint}")
        if len(head) < HEADER_SIZE:
            raise IndexedDatasetError(f"{idx_path}: truncated header: expected {HEADER_SIZE} "
                                      f"bytes, found {len(head)}")
        _, version, code, n, m = _HEADER.unpack(head)
        if version != VERSION:
            raise IndexedDatasetError(f"{idx_path}: unknown version: expected {VERSION}, "
                                      f"found {version}")
        if code not in DTYPES:
            raise IndexedDatasetError(f"{idx_path}: unknown dtype code: expected one of "
                                      f"{sorted(DTYPES)}, found {code}")
        self._dtype = DTYPES[code]
        expect = HEADER_SIZE + 12 * n + 8 * m
        if idx_size != expect:
            raise IndexedDatasetError(
                f"{idx_path}: size mismatch: the header (N={n} items, M={m} doc_idx entries) "
                f"needs exactly {expect} bytes, found {idx_size}"
                + (" (truncated)" if idx_size < expect else " (trailing bytes)"))
        self._n, self._m = int(n), int(m)
        self._idx_map = buf
        self._sizes = np.frombuffer(buf, dtype="<i4", count=n, offset=HEADER_SIZE)
        self._pointers = np.frombuffer(buf, dtype="<i8", count=n, offset=HEADER_SIZE + 4 * n)
        self._doc_idx = np.frombuffer(buf, dtype="<i8", count=m, offset=HEADER_SIZE + 12 * n)

        itemsize = self._dtype.itemsize
        if n:
            last_ptr, last_size = int(self._pointers[-1]), int(self._sizes[-1])
            if last_ptr < 0 or last_size < 0 or last_ptr % itemsize:
                raise IndexedDatasetError(
                    f"{idx_path}: corrupt index: last item has pointer {last_ptr} and size "
                    f"{last_size} (expected non-negative, pointer a multiple of {itemsize})")
            need = last_ptr + last_size * itemsize
        else:
            need = 0
        check_total_size(layout, need, f"{idx_path} ({n} items of {self._dtype})")
        self._bin_size = layout.bin_size
        if m and (int(self._doc_idx[0]) != 0 or not 0 <= int(self._doc_idx[-1]) <= n):
            raise IndexedDatasetError(
                f"{idx_path}: corrupt doc_idx: expected it to start at 0 and end at most at "
                f"N={n}, found first {int(self._doc_idx[0])}, last {int(self._doc_idx[-1])}")
        self._bytes = TokenBytes(layout)

    # -- basic properties -----------------------------------------------------------------------
    @property
    def prefix(self) -> str:
        return self._prefix

    @property
    def bin_path(self) -> str:
        """`prefix.bin`, or for shards read in place `prefix-{00000..000NN}-of-000NN.bin`."""
        return self._layout.bin_name

    @property
    def layout(self) -> Layout:
        """Where the files are (`source.Layout`: the `.idx`, the `.bin` or its shards)."""
        return self._layout

    @property
    def token_bytes(self) -> TokenBytes:
        """The `.bin` byte stream (`requests` counts ranged reads sent to a bucket)."""
        return self._bytes

    @property
    def idx_path(self) -> str:
        return self._prefix + ".idx"

    def verify(self, hashes) -> None:
        """Check the `.bin` (every shard) and, when listed, the `.idx` against a hash list
        (`unshard`'s format); `ShardError` naming the first file that does not match."""
        verify_hashes(self._layout, hashes)

    @property
    def dtype(self) -> np.dtype:
        return self._dtype

    @property
    def sizes(self) -> np.ndarray:
        """int32 [N]: tokens per item (read-only view into the `.idx` map)."""
        return self._sizes

    @property
    def pointers(self) -> np.ndarray:
        """int64 [N]: byte offset of each item in the `.bin`."""
        return self._pointers

    @property
    def doc_idx(self) -> np.ndarray:
        """int64 [M]: first item of each document, followed by N."""
        return self._doc_idx

    @property
    def num_items(self) -> int:
        return self._n

    @property
    def num_docs(self) -> int:
        return max(self._m - 1, 0)

    @property
    def num_tokens(self) -> int:
        """Total tokens in the `.bin` (O(1): the end of the last item)."""
        return self._bin_size // self._dtype.itemsize

    supports_prefetch = False

    def __len__(self) -> int:
        return self._n

    def __repr__(self) -> str:
        return (f"MMapIndexedDataset({self._prefix!r}: {self._n} items, {self.num_docs} docs, "
                f"{self.num_tokens} tokens, {self._dtype})")

    @staticmethod
    def exists(prefix) -> bool:
        """True when `prefix.idx` and `prefix.bin` (or all of its shards) exist."""
        return dataset_exists(split_prefix(prefix))

    # -- item access ----------------------------------------------------------------------------
    def _item_index(self, i) -> int:
        i = _check_int(i, "item index")
        j = i + self._n if i < 0 else i
        if not 0 <= j < self._n:
            raise IndexedDatasetIndexError(
                f"{self.idx_path}: item index out of range: expected -{self._n} <= i < {self._n},"
                f" found {i}")
        return j

    def _view(self, byte_offset: int, count: int, what: str) -> np.ndarray:
        end = byte_offset + count * self._dtype.itemsize
        if byte_offset < 0 or count < 0 or end > self._bin_size:
            raise IndexedDatasetError(
                f"{self.bin_path}: {what} spans bytes [{byte_offset}, {end}) but the file has "
                f"{self._bin_size} bytes (corrupt index)")
        return np.frombuffer(self._bytes.read(byte_offset, end - byte_offset), dtype=self._dtype)

    def get(self, i, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens [offset, offset+length) of item i (default: to the end of the item)."""
        j = self._item_index(i)
        size = int(self._sizes[j])
        offset = _check_int(offset, "offset")
        if length is None:
            length = size - offset
        length = _check_int(length, "length")
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexedDatasetIndexError(
                f"{self.idx_path}: item {j} has {size} tokens: expected 0 <= offset <= "
                f"offset+length <= {size}, found offset={offset}, length={length}")
        ptr = int(self._pointers[j]) + offset * self._dtype.itemsize
        return self._view(ptr, length, f"item {j}")

    def __getitem__(self, idx):
        if isinstance(idx, slice):
            start, stop, step = idx.indices(self._n)
            if step != 1:
                raise IndexedDatasetError(f"{self.idx_path}: slices must be contiguous "
                                          f"(step 1), found step {step}")
            if stop <= start:
                return []
            flat = self.get_range(start, stop)
            return np.split(flat, np.cumsum(self._sizes[start:stop], dtype=np.int64)[:-1])
        return self.get(idx)

    def get_range(self, start: int, stop: int) -> np.ndarray:
        """The tokens of items start..stop-1 as one flat view (items are contiguous in `.bin`)."""
        start, stop = _check_int(start, "start"), _check_int(stop, "stop")
        if not 0 <= start <= stop <= self._n:
            raise IndexedDatasetIndexError(
                f"{self.idx_path}: item range out of range: expected 0 <= start <= stop <= "
                f"{self._n}, found [{start}, {stop})")
        if start == stop:
            return np.zeros(0, self._dtype)
        count = int(self._sizes[start:stop].sum(dtype=np.int64))
        ptr = int(self._pointers[start])
        end_ptr = int(self._pointers[stop - 1]) + int(self._sizes[stop - 1]) * self._dtype.itemsize
        if end_ptr - ptr != count * self._dtype.itemsize:
            raise IndexedDatasetError(
                f"{self.idx_path}: items [{start}, {stop}) are not contiguous in the .bin: "
                f"expected {count * self._dtype.itemsize} bytes between their pointers, found "
                f"{end_ptr - ptr}")
        return self._view(ptr, count, f"items [{start}, {stop})")

    # -- documents ------------------------------------------------------------------------------
    def _doc_index(self, d) -> int:
        d = _check_int(d, "document index")
        j = d + self.num_docs if d < 0 else d
        if not 0 <= j < self.num_docs:
            raise IndexedDatasetIndexError(
                f"{self.idx_path}: document index out of range: expected -{self.num_docs} <= d < "
                f"{self.num_docs}, found {d}")
        return j

    def document_items(self, d) -> tuple[int, int]:
        """Item range [first, last+1) of document d."""
        j = self._doc_index(d)
        return int(self._doc_idx[j]), int(self._doc_idx[j + 1])

    def document_token_range(self, d) -> tuple[int, int]:
        """Token range [start, stop) of document d within the `.bin` (in tokens, not bytes)."""
        a, b = self.document_items(d)
        isz = self._dtype.itemsize
        if a == b:
            start = (int(self._pointers[a]) // isz) if a < self._n else self.num_tokens
            return start, start
        start = int(self._pointers[a]) // isz
        stop = int(self._pointers[b - 1]) // isz + int(self._sizes[b - 1])
        return start, stop

    def get_document(self, d) -> np.ndarray:
        """All tokens of document d as one flat view."""
        a, b = self.document_items(d)
        return self.get_range(a, b)

    # -- full check -----------------------------------------------------------------------------
    def validate(self, chunk: int = 1 << 22) -> None:
        """O(N) check: sizes >= 0, pointers = running sum of sizes, doc_idx non-decreasing."""
        isz = self._dtype.itemsize
        running = 0
        for a in range(0, self._n, chunk):
            s = self._sizes[a:a + chunk].astype(np.int64)
            if (s < 0).any():
                k = a + int(np.argmax(s < 0))
                raise IndexedDatasetError(f"{self.idx_path}: item {k} has negative size "
                                          f"{int(self._sizes[k])}")
            expect = running + np.concatenate([[0], np.cumsum(s[:-1])]) * isz
            bad = np.nonzero(self._pointers[a:a + chunk] != expect)[0]
            if bad.size:
                k = a + int(bad[0])
                raise IndexedDatasetError(
                    f"{self.idx_path}: pointer of item {k}: expected {int(expect[bad[0]])} "
                    f"(running sum of sizes), found {int(self._pointers[k])}")
            running = int(expect[-1]) + int(s[-1]) * isz
        if self._m:
            d = np.diff(self._doc_idx)
            if (d < 0).any():
                k = int(np.argmax(d < 0))
                raise IndexedDatasetError(f"{self.idx_path}: doc_idx decreases at entry {k + 1}: "
                                          f"{int(self._doc_idx[k])} -> {int(self._doc_idx[k + 1])}")


# ---------------------------------------------------------------------------------------------
# Writer
# ---------------------------------------------------------------------------------------------
def _index_bytes(dtype: np.dtype, sizes: np.ndarray, doc_idx: np.ndarray) -> bytes:
    sizes64 = np.asarray(sizes, dtype=np.int64)
    pointers = np.zeros(len(sizes64), dtype=np.int64)
    if len(sizes64) > 1:
        np.cumsum(sizes64[:-1] * dtype.itemsize, out=pointers[1:])
    header = _HEADER.pack(MAGIC, VERSION, dtype_code(dtype), len(sizes64), len(doc_idx))
    return b"".join([header, sizes64.astype("<i4").tobytes(), pointers.astype("<i8").tobytes(),
                     np.asarray(doc_idx, dtype="<i8").tobytes()])


def _file_mode() -> int:
    """0o666 minus the process umask: what `open(path, "wb")` would have given the file."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


class MMapIndexedDatasetBuilder:
    """Writes `prefix.bin` + `prefix.idx` exactly as GPT-NeoX's `MMapIndexedDatasetBuilder`.

    `add_item(tokens)` appends one item; `end_document()` closes a document (doc_idx gets the
    current item count); `finalize()` writes the index. Both files are written under temporary
    names in the target folder and renamed into place by `finalize()`; `abort()` (or leaving a
    `with` block by an exception) deletes them, so a failed run leaves no output files.
    """

    def __init__(self, prefix: str | os.PathLike, dtype=np.int64):
        self.prefix = split_prefix(prefix)
        self.dtype = np.dtype(dtype)
        dtype_code(self.dtype)  # reject dtypes without a code early
        folder = os.path.dirname(os.path.abspath(self.prefix))
        base = os.path.basename(self.prefix)
        self._bin_tmp: str | None = None
        self._idx_tmp: str | None = None
        self._data_file = None
        self._sizes = array("q")
        self._doc_idx = array("q", [0])
        self._done = False
        try:
            # A SIGTERM between the creation and the recording of the name would leave the
            # temporary behind: it is held until both are done, then lands in this `try`.
            with paths.sigterm_held():
                fd, self._bin_tmp = tempfile.mkstemp(dir=folder, prefix=f".{base}.bin.",
                                                     suffix=".tmp")
                self._data_file = os.fdopen(fd, "wb", buffering=_WRITE_BUFFER)
        except BaseException:
            self.abort()
            raise

    @property
    def num_items(self) -> int:
        return len(self._sizes)

    def add_item(self, tokens) -> None:
        if self._done:
            raise IndexedDatasetError(f"{self.prefix}: builder already finalized or aborted")
        arr = np.asarray(tokens)
        if arr.ndim != 1:
            arr = arr.reshape(-1)
        if arr.dtype != self.dtype:
            if arr.size and np.issubdtype(self.dtype, np.integer):
                if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_):
                    raise IndexedDatasetError(
                        f"{self.prefix}: item {len(self._sizes)}: expected integer tokens for a "
                        f"{self.dtype} dataset, found {arr.dtype}")
                info = np.iinfo(self.dtype)
                lo, hi = int(arr.min()), int(arr.max())
                if lo < info.min or hi > info.max:
                    raise IndexedDatasetError(
                        f"{self.prefix}: item {len(self._sizes)}: token ids must fit {self.dtype}"
                        f" [{info.min}, {info.max}], found range [{lo}, {hi}]")
            arr = arr.astype(self.dtype)
        if arr.size > np.iinfo(np.int32).max:
            raise IndexedDatasetError(f"{self.prefix}: item of {arr.size} tokens does not fit "
                                      "the int32 sizes field")
        little = np.ascontiguousarray(arr, dtype=self.dtype.newbyteorder("<"))
        self._data_file.write(little.tobytes())
        self._sizes.append(int(arr.size))

    def end_document(self) -> None:
        self._doc_idx.append(len(self._sizes))

    def add_document(self, tokens) -> None:
        """One item followed by `end_document()`."""
        self.add_item(tokens)
        self.end_document()

    def finalize(self, index_file: str | os.PathLike | None = None) -> None:
        """Write the index and move both files into place (`index_file` defaults to prefix.idx)."""
        if self._done:
            raise IndexedDatasetError(f"{self.prefix}: builder already finalized or aborted")
        try:
            self._data_file.flush()
            os.fsync(self._data_file.fileno())  # the data is on disk before any rename
            self._data_file.close()
            idx_dest = os.fspath(index_file) if index_file is not None else self.prefix + ".idx"
            folder = os.path.dirname(os.path.abspath(idx_dest))
            with paths.sigterm_held():
                fd, self._idx_tmp = tempfile.mkstemp(
                    dir=folder, prefix=f".{os.path.basename(idx_dest)}.", suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                f.write(_index_bytes(self.dtype, np.frombuffer(self._sizes, np.int64),
                                     np.frombuffer(self._doc_idx, np.int64)))
                f.flush()
                os.fsync(f.fileno())
            mode = _file_mode()
            for tmp in (self._bin_tmp, self._idx_tmp):
                os.chmod(tmp, mode)
            # Never a mismatched pair on disk: the old index goes first, so a crash between
            # the two renames leaves a .bin without its .idx ("no such file" on open), not a
            # new .bin beside an old .idx.
            if os.path.lexists(idx_dest):
                os.remove(idx_dest)
            os.replace(self._bin_tmp, self.prefix + ".bin")
            os.replace(self._idx_tmp, idx_dest)
        except BaseException:
            self.abort()
            raise
        self._done = True

    def abort(self) -> None:
        """Delete the temporary files; nothing is left behind."""
        self._done = True
        try:
            self._data_file.close()
        except Exception:
            pass
        for tmp in (self._bin_tmp, self._idx_tmp):
            if tmp and os.path.exists(tmp):
                try:
                    os.remove(tmp)
                except OSError:
                    pass

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()
        elif not self._done:
            self.finalize()
        return False

    def __del__(self):
        if not getattr(self, "_done", True):
            self.abort()


def write_indexed_dataset(prefix: str | os.PathLike, documents: Iterable[Sequence[int]],
                          vocab_size: int | None = None, dtype=None) -> MMapIndexedDataset:
    """Write one item per document (then `end_document`); dtype from `best_dtype(vocab_size)`
    unless given. Returns the opened dataset."""
    dt = np.dtype(dtype) if dtype is not None else best_dtype(vocab_size)
    with MMapIndexedDatasetBuilder(prefix, dt) as b:
        for doc in documents:
            b.add_document(doc)
    return MMapIndexedDataset(prefix)
