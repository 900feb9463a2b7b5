"""Pythia's byte-level `.bin` shards: `{base}-{i:05d}-of-{last:05d}.bin`, last = num_shards - 1.

`unshard` concatenates the shards into `{base}.bin` by streaming fixed-size chunks (a shard is
never loaded in memory), computing the sha256 of every shard on the way and checking it against
a hash list (lines of `<file name> <sha256>`, as Pythia's `utils/shard_hashes.txt`; the
`sha256sum` order `<sha256>  <file name>` is accepted too). The output is written under a
temporary name and renamed only when complete and verified. `shard` is the inverse split
(Pythia's `shard_memmap.py` uses 5,000,000,000-byte shards).
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile

from pythia_jax import paths as _paths
from pythia_jax.data.errors import ShardError

__all__ = ["ShardError", "parse_shard_name", "shard_paths", "read_hash_list", "unshard", "shard",
           "sha256_file"]

_SHARD_RE = re.compile(r"^(?P<base>.+)-(?P<index>\d{5})-of-(?P<last>\d{5})\.bin$")
_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")
CHUNK = 16 << 20


def parse_shard_name(path: str) -> tuple[str, int, int]:
    """`/d/x-00003-of-00082.bin` -> (`/d/x`, 3, 83): base path, shard index, number of shards."""
    folder, name = os.path.split(os.fspath(path))
    m = _SHARD_RE.match(name)
    if not m:
        raise ShardError(f"{path}: not a shard name: expected NAME-00000-of-000NN.bin")
    return os.path.join(folder, m["base"]), int(m["index"]), int(m["last"]) + 1


def shard_paths(base: str, num_shards: int) -> list[str]:
    last = num_shards - 1
    return [f"{base}-{i:05d}-of-{last:05d}.bin" for i in range(num_shards)]


def read_hash_list(path: str) -> dict[str, str]:
    """{file name: sha256 (lower case)} from a `name hash` or `hash  name` list."""
    out: dict[str, str] = {}
    with open(path, "r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            parts = line.split()
            if not parts or parts[0].startswith("#"):
                continue
            if len(parts) != 2:
                raise ShardError(f"{path}:{lineno}: expected '<file> <sha256>', found {line!r}")
            a, b = parts
            if _HEX64.match(b):
                name, digest = a, b
            elif _HEX64.match(a):
                name, digest = b.lstrip("*"), a
            else:
                raise ShardError(f"{path}:{lineno}: no 64-hex-digit sha256 in {line.strip()!r}")
            out[os.path.basename(name)] = digest.lower()
    return out


def sha256_file(path: str, chunk: int = CHUNK) -> str:
    h = hashlib.sha256()
    buf = bytearray(chunk)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                dynamic_ncols=True)


def unshard(first_shard: str, num_shards: int | None = None, output: str | None = None,
            hashes: str | dict[str, str] | None = None, expected_sha256: str | None = None,
            overwrite: bool = False, progress: bool = False, chunk: int = CHUNK) -> str:
    """Merge `NAME-00000-of-000NN.bin` and its siblings into `NAME.bin` (or `output`).

    `num_shards` defaults to the count in the name (and must agree with it). `hashes`: a hash
    list path or dict; every shard must be listed and match. `expected_sha256`: the merged
    file's hash. When the list also names `NAME.idx` and it sits next to the shards, it is checked
    too. Returns the output path.
    """
    base, index, named = parse_shard_name(first_shard)
    if index != 0:
        raise ShardError(f"{first_shard}: expected the first shard (index 00000), found {index}")
    if num_shards is None:
        num_shards = named
    if num_shards != named:
        raise ShardError(f"{first_shard}: the name says {named} shards (last index "
                         f"{named - 1:05d}), --num_shards says {num_shards}")
    paths = shard_paths(base, num_shards)
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise ShardError(f"{len(missing)} of {num_shards} shards missing, e.g. {missing[0]}")
    table = read_hash_list(hashes) if isinstance(hashes, (str, os.PathLike)) else hashes
    if table is not None:
        unlisted = [p for p in paths if os.path.basename(p) not in table]
        if unlisted:
            raise ShardError(f"{unlisted[0]}: no sha256 for this shard in the hash list "
                             f"({len(unlisted)} shards unlisted)")
    output = os.fspath(output) if output is not None else base + ".bin"
    if os.path.exists(output) and not overwrite:
        raise ShardError(f"{output}: already exists (pass overwrite=True / --overwrite)")
    idx = base + ".idx"  # Pythia's list also covers the (unsharded) .idx: check it if present
    if table is not None and os.path.basename(idx) in table and os.path.isfile(idx):
        want, found = table[os.path.basename(idx)], sha256_file(idx, chunk)
        if found != want:
            raise ShardError(f"{idx}: sha256 mismatch: expected {want}, found {found}")
    total = sum(os.path.getsize(p) for p in paths)
    folder = os.path.dirname(os.path.abspath(output))
    merged = hashlib.sha256() if expected_sha256 else None
    buf = bytearray(chunk)
    view = memoryview(buf)
    bar = _progress(total, os.path.basename(output), progress)
    # the temporary file is created last, inside the block that removes it on any exception
    # (Ctrl-C / SIGTERM included)
    tmp = None
    try:
        with _paths.sigterm_held():
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(output)}.",
                                       suffix=".tmp")
        with os.fdopen(fd, "wb") as out:
            for p in paths:
                h = hashlib.sha256() if table is not None else None
                with open(p, "rb", buffering=0) as f:
                    while n := f.readinto(buf):
                        part = view[:n]
                        out.write(part)
                        if h is not None:
                            h.update(part)
                        if merged is not None:
                            merged.update(part)
                        if bar is not None:
                            bar.update(n)
                if h is not None:
                    want = table[os.path.basename(p)]
                    if h.hexdigest() != want:
                        raise ShardError(f"{p}: sha256 mismatch: expected {want}, found "
                                         f"{h.hexdigest()} (corrupt or incomplete download)")
        if merged is not None and merged.hexdigest() != expected_sha256.lower():
            raise ShardError(f"{output}: sha256 of the merged file: expected "
                             f"{expected_sha256.lower()}, found {merged.hexdigest()}")
        size = os.path.getsize(tmp)
        if size != total:
            raise ShardError(f"{output}: wrote {size} bytes, expected {total}")
        mask = os.umask(0o022)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)
        os.replace(tmp, output)
    except BaseException:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
        raise
    finally:
        if bar is not None:
            bar.close()
    return output


def shard(path: str, shard_size: int = 5_000_000_000, chunk: int = CHUNK) -> list[str]:
    """Split `NAME.bin` into Pythia-named byte shards of `shard_size` bytes (last one shorter).

    Every shard is written under a hidden temporary name beside it; only when all are complete
    are they renamed to their final names, so a failed or interrupted split leaves no shard
    (and no file under a final name that is incomplete)."""
    if not path.endswith(".bin"):
        raise ShardError(f"{path}: expected a .bin file")
    size = os.path.getsize(path)
    n = max(1, -(-size // shard_size))
    outs = shard_paths(path[:-4], n)
    buf = bytearray(min(chunk, shard_size))
    temps: list[str] = []
    try:
        with open(path, "rb", buffering=0) as f:
            for out in outs:
                left = shard_size
                with _paths.sigterm_held():  # the name is recorded before a SIGTERM lands
                    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(out)),
                                               prefix=f".{os.path.basename(out)}.",
                                               suffix=".tmp")
                    temps.append(tmp)
                with os.fdopen(fd, "wb") as g:
                    while left:
                        k = f.readinto(memoryview(buf)[:min(len(buf), left)])
                        if not k:
                            break
                        g.write(memoryview(buf)[:k])
                        left -= k
        mask = os.umask(0o022)
        os.umask(mask)
        for tmp, out in zip(temps, outs):
            os.chmod(tmp, 0o666 & ~mask)
            os.replace(tmp, out)
    except BaseException:
        for tmp in temps:
            if os.path.exists(tmp):
                os.remove(tmp)
        raise
    return outs
