"""Where a dataset's tokens live: one `.bin` or Pythia's byte shards, on local disk or in a bucket.

`locate(prefix)` finds the files of `prefix` (a local path or `gs://bucket/.../document`):

- `{prefix}.idx` plus `{prefix}.bin`, or, when that `.bin` is absent,
- `{prefix}.idx` plus Pythia's byte shards `{prefix}-00000-of-000NN.bin` ... `-000NN-of-000NN.bin`
  (the name carries the index of the last shard). The shards are one byte stream: an item, or a
  single uint16 token, may start in one shard and end in the next (Pythia's `shard_memmap.py`
  cuts every 5,000,000,000 bytes). Nothing is merged or copied.

`TokenBytes(layout).read(offset, nbytes)` returns bytes [offset, offset + nbytes) of that stream:
a view of the memory map for a local range inside one file (zero copy), one ranged read per file
touched for a bucket (one HTTP request for a step's rows unless they cross a shard boundary),
pieces joined only when a range crosses shards. `read_index(layout)` reads the `.idx` once (local:
memory-mapped; bucket: read into memory, big files in concurrent 64 MiB ranges).
`verify_hashes(layout, hashes)` checks every shard (and the `.idx` when listed) against a hash
list in `unshard`'s format.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import os
import re
from typing import Mapping

import numpy as np

from pythia_jax import paths
from pythia_jax.data.errors import IndexedDatasetError, ShardError
from pythia_jax.data.shards import CHUNK, read_hash_list, sha256_file, shard_paths
from pythia_jax.paths import is_remote

__all__ = ["Layout", "locate", "dataset_exists", "missing_file", "TokenBytes", "read_index",
           "verify_hashes", "check_total_size", "INDEX_READ_CHUNK"]

#: A remote `.idx` larger than this is read in concurrent ranges of this size.
INDEX_READ_CHUNK = 64 << 20


def _split(path: str) -> tuple[str, str]:
    return paths.dirname(path), paths.basename(path)


def _file_size(path: str) -> int | None:
    """Size of a file, None when absent."""
    if not is_remote(path) and not os.path.isfile(path):
        return None
    try:
        return paths.size(path)
    except (FileNotFoundError, IsADirectoryError):
        return None


# -- layout -----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Layout:
    """The files of one dataset: its `.idx` and the `.bin` (one file, or the shards in order)."""
    prefix: str
    idx: str
    idx_size: int
    bins: tuple[str, ...]
    sizes: tuple[int, ...]
    sharded: bool

    @property
    def remote(self) -> bool:
        return is_remote(self.prefix)

    @property
    def bin_size(self) -> int:
        return int(sum(self.sizes))

    @property
    def bin_name(self) -> str:
        """`prefix.bin`, or `prefix-{00000..000NN}-of-000NN.bin` for shards (for messages)."""
        if not self.sharded:
            return self.bins[0]
        last = len(self.bins) - 1
        return f"{self.prefix}-{{00000..{last:05d}}}-of-{last:05d}.bin"


def _shard_files(prefix: str, listing: Mapping[str, int]) -> tuple[list[str], list[int]] | None:
    """The shards of `prefix` named in `listing` (complete and of one count), or None."""
    folder, base = _split(prefix)
    rx = re.compile(rf"^{re.escape(base)}-(\d{{5}})-of-(\d{{5}})\.bin$")
    found: dict[int, dict[int, str]] = {}
    for name in listing:
        m = rx.match(name)
        if m:
            found.setdefault(int(m[2]), {})[int(m[1])] = name
    if not found:
        return None
    if len(found) > 1:
        counts = ", ".join(f"-of-{last:05d}" for last in sorted(found))
        raise ShardError(f"{prefix}: shards of several counts side by side ({counts}); expected "
                         "one set NAME-00000-of-000NN.bin ... NAME-000NN-of-000NN.bin")
    last = next(iter(found))
    expected = [_split(p)[1] for p in shard_paths(base, last + 1)]
    missing = [n for n in expected if n not in listing]
    if missing:
        raise ShardError(f"{paths.join(folder, missing[0])}: shard missing ({len(missing)} of "
                         f"{last + 1} shards missing; {prefix}.bin is absent, so the dataset is "
                         "read from the shards in place and needs all of them)")
    return [paths.join(folder, n) for n in expected], [int(listing[n]) for n in expected]


def locate(prefix: str) -> Layout:
    """The files of the dataset `prefix` (without `.bin`/`.idx`). `FileNotFoundError` naming
    the first missing file; `ShardError` for an incomplete or ambiguous set of shards."""
    prefix = os.fspath(prefix)
    idx, binp = prefix + ".idx", prefix + ".bin"
    if is_remote(prefix):
        listing = paths.list_sizes(_split(prefix)[0])
        idx_size = listing.get(_split(idx)[1])
        bin_size = listing.get(_split(binp)[1])
    else:
        idx_size, bin_size = _file_size(idx), _file_size(binp)
        listing = None
    if bin_size is not None:
        bins, sizes, sharded = [binp], [bin_size], False
    else:
        if listing is None:
            listing = paths.list_sizes(_split(prefix)[0])
        shards = _shard_files(prefix, listing)
        if shards is None:
            raise FileNotFoundError(f"{binp}: no such file (expected {binp} and {idx}, or "
                                    f"{idx} and the shards {_split(prefix)[1]}-00000-of-000NN"
                                    ".bin ... beside it, read in place)")
        bins, sizes = shards
        sharded = True
    if idx_size is None:
        raise FileNotFoundError(f"{idx}: no such file (expected "
                                f"{'the shards' if sharded else binp} and {idx})")
    return Layout(prefix, idx, int(idx_size), tuple(bins), tuple(sizes), sharded)


def missing_file(prefix: str) -> str | None:
    """The first missing file of dataset `prefix` as a message, or None when it is complete."""
    try:
        locate(prefix)
    except FileNotFoundError as e:
        return str(e)
    return None


def dataset_exists(prefix: str) -> bool:
    """True when `prefix.idx` and `prefix.bin` (or its complete shards) exist."""
    try:
        locate(prefix)
    except (FileNotFoundError, ShardError):
        return False
    return True


def check_total_size(layout: Layout, need: int, what: str) -> None:
    """The `.bin` bytes must end exactly where the index says (`need`); otherwise an
    `IndexedDatasetError` naming the file (for shards: the shard that is short or long)."""
    total = layout.bin_size
    if total == need:
        return
    tail = "; or the two files come from different builds: rebuild or re-fetch both)"
    if not layout.sharded:
        raise IndexedDatasetError(
            f"{layout.bins[0]}: size mismatch: the index {what} says the data ends at byte "
            f"{need}, found a file of {total} bytes"
            + (" (truncated: incomplete download or unshard?" if total < need
               else " (trailing bytes") + tail)
    sizes = layout.sizes
    n = len(sizes)
    if n > 1:
        common = max(sizes[:-1])
        short = [i for i in range(n - 1) if sizes[i] != common]
        if short:
            i = short[0]
            raise ShardError(
                f"{layout.bins[i]}: shard of {sizes[i]} bytes, expected {common} like the "
                f"other shards (truncated: incomplete download?); the index {what} needs "
                f"{need} bytes in all, the {n} shards hold {total}")
        want_last = need - common * (n - 1)
    else:
        want_last = need
    raise ShardError(
        f"{layout.bins[-1]}: last shard of {sizes[-1]} bytes, expected {want_last} (the index "
        f"{what} needs {need} bytes in all, the {n} shards hold {total}"
        + (": truncated, incomplete download?)" if total < need else ": trailing bytes)"))


# -- reading ----------------------------------------------------------------------------------
def _read(path: str, start: int, stop: int) -> bytes:
    """Bytes [start, stop) of `path`: one ranged request for a bucket."""
    try:
        return paths.read_range(path, start, stop - start)
    except EOFError as e:
        raise IndexedDatasetError(f"{e} (the file changed or was truncated after it was "
                                  "opened?)") from None


def read_index(layout: Layout) -> np.ndarray:
    """The `.idx` bytes as a uint8 array: a memory map for a local file, read into memory once
    for a bucket (concurrent `INDEX_READ_CHUNK` ranges for a large one)."""
    n = layout.idx_size
    if not layout.remote:
        if n == 0:
            return np.zeros(0, np.uint8)
        return np.memmap(layout.idx, dtype=np.uint8, mode="r")
    out = np.empty(n, np.uint8)
    starts = range(0, n, INDEX_READ_CHUNK)

    def fetch(start: int) -> None:
        stop = min(start + INDEX_READ_CHUNK, n)
        out[start:stop] = np.frombuffer(_read(layout.idx, start, stop), np.uint8)

    with concurrent.futures.ThreadPoolExecutor(min(8, max(1, len(starts)))) as pool:
        list(pool.map(fetch, starts))
    return out


class TokenBytes:
    """The `.bin` byte stream of a `Layout` (one file or its shards, local or in a bucket).

    `read(offset, nbytes)` -> read-only uint8 array. `requests` counts the ranged reads sent to
    a bucket (one per file a range touches)."""

    def __init__(self, layout: Layout):
        self.layout = layout
        self.size = layout.bin_size
        self._starts = np.concatenate([[0], np.cumsum(layout.sizes, dtype=np.int64)])
        self.requests = 0
        if layout.remote:
            paths.check_available(layout.prefix)
            self._maps = None
        else:
            self._maps = [np.memmap(b, dtype=np.uint8, mode="r") if s else np.zeros(0, np.uint8)
                          for b, s in zip(layout.bins, layout.sizes)]

    def _piece(self, i: int, a: int, b: int) -> np.ndarray:
        if self._maps is not None:
            return self._maps[i][a:b]
        self.requests += 1
        return np.frombuffer(_read(self.layout.bins[i], a, b), np.uint8)

    def read(self, offset: int, nbytes: int) -> np.ndarray:
        end = offset + nbytes
        if offset < 0 or nbytes < 0 or end > self.size:
            raise IndexedDatasetError(f"{self.layout.bin_name}: bytes [{offset}, {end}) asked, "
                                      f"the data has {self.size} bytes")
        if nbytes == 0:
            return np.zeros(0, np.uint8)
        first = int(np.searchsorted(self._starts, offset, side="right")) - 1
        last = int(np.searchsorted(self._starts, end, side="left")) - 1
        pieces = []
        for i in range(first, last + 1):
            lo = max(offset, int(self._starts[i])) - int(self._starts[i])
            hi = min(end, int(self._starts[i + 1])) - int(self._starts[i])
            if hi > lo:
                pieces.append(self._piece(i, lo, hi))
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)


# -- hashes -----------------------------------------------------------------------------------
def _sha256(path: str, chunk: int) -> str:
    if not is_remote(path):
        return sha256_file(path, chunk)
    h = hashlib.sha256()
    with paths.open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify_hashes(layout: Layout, hashes, chunk: int = CHUNK) -> None:
    """Check every `.bin` file (each shard) against a hash list (a path in `unshard`'s format,
    lines `<file> <sha256>` or `<sha256>  <file>`, or a {name: sha256} dict); the `.idx` too
    when the list names it. `ShardError` naming the first file unlisted or mismatched."""
    table = read_hash_list(hashes) if isinstance(hashes, (str, os.PathLike)) else dict(hashes)
    unlisted = [b for b in layout.bins if _split(b)[1] not in table]
    if unlisted:
        raise ShardError(f"{unlisted[0]}: no sha256 for this file in the hash list "
                         f"({len(unlisted)} of {len(layout.bins)} unlisted)")
    files = list(layout.bins)
    if _split(layout.idx)[1] in table:
        files.append(layout.idx)
    with concurrent.futures.ThreadPoolExecutor(min(8, len(files))) as pool:  # one stream each
        found_all = list(pool.map(lambda p: _sha256(p, chunk), files))
    for path, found in zip(files, found_all):
        want = table[_split(path)[1]].lower()
        if found != want:
            raise ShardError(f"{path}: sha256 mismatch: expected {want}, found {found} "
                             "(corrupt or incomplete download)")
