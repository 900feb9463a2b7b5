"""The project's one path layer: local paths and `gs://` URLs behind the same small API.

Every user path (a workdir, `--model/--src/--dst/--out/--data`, a data prefix) goes through
these functions instead of `os.path` / `open()`, so a `gs://bucket/...` works wherever a local
path does. Local paths use the standard library (and keep its semantics: atomic renames, mmap);
URLs go to an `fsspec` filesystem (`gcsfs` for `gs://`).

Why fsspec and not `etils.epath`: orbax reaches `gs://` through `epath`, whose gs backend *is*
fsspec/gcsfs unless TensorFlow is installed (then it silently switches to `tf.io.gfile`); going
to fsspec directly gives the same library and credentials as orbax on a TPU VM without that
switch, and gives what the data reader needs: a byte range in one request (`read_range` is one
ranged GET, `cat_file(start, end)`), object sizes and directory listings with sizes in one call.

Object stores have no rename and no append: `atomic_write` and `atomic_dir` write to a local
temporary and upload at the end (a GCS object appears whole when its upload finishes, so a
reader never sees half a file); `sync_up` copies a local folder's files into a remote folder
(TensorBoard events and `metrics.jsonl` of a remote workdir are written locally and synced).

The cloud packages live in the `gcs` extra; without them a URL gives one line naming it:
`MissingCloudDependency` (an `ImportError`).

Test hooks (tests/gcs_utils.py): `STORAGE_EMULATOR_HOST` points gcsfs at a local emulator;
`FSSPEC_GCS_TOKEN=anon` (fsspec's own config variable) or `configure(token="anon")` gives
anonymous credentials.
"""

from __future__ import annotations

import builtins
import contextlib
import functools
import os
import posixpath
import shutil
import signal
import tempfile
import threading
from typing import IO, Iterator

__all__ = ["GCS_EXTRA", "MissingCloudDependency", "is_remote", "join", "abspath", "dirname",
           "basename", "open", "exists", "isdir", "isfile", "listdir", "list_sizes", "size",
           "makedirs", "remove", "rmtree", "read_range", "read_bytes", "read_text",
           "write_bytes", "write_text", "atomic_write", "download", "upload", "sync_up",
           "local_copy", "check_available", "configure", "replace_dir", "atomic_dir",
           "default_dir_mode", "default_file_mode", "block_sigterm", "restore_sigterm", "sigterm_held"]

#: The pyproject extra that installs the cloud filesystems.
GCS_EXTRA = "gcs"
_INSTALL = f"pip install 'pythia-jax[{GCS_EXTRA}]'"
_fs_options: dict[str, dict] = {}


class MissingCloudDependency(ImportError):
    """A URL path was given but its filesystem package (gcsfs) is not installed."""


def is_remote(path) -> bool:
    """True for a URL-style path (`gs://bucket/x`), False for a local one."""
    return "://" in os.fspath(path)


def configure(protocol: str = "gs", **options) -> None:
    """Extra fsspec options for `protocol` (e.g. `token="anon"`); later calls replace them."""
    _fs_options[protocol] = dict(options)
    _filesystem.cache_clear()


def _protocol(path: str) -> str:
    return path.split("://", 1)[0]


@functools.lru_cache(maxsize=None)
def _filesystem(protocol: str):
    try:
        import fsspec
        # gcsfs keeps a listings cache; orbax writes through another instance, so listings
        # must be fresh each time (a resumed run must see the step orbax just wrote).
        return fsspec.filesystem(protocol, use_listings_cache=False,
                                 **_fs_options.get(protocol, {}))
    except ImportError as e:
        raise MissingCloudDependency(
            f"{protocol}:// paths need the cloud filesystem packages ({e}); install them "
            f"with: {_INSTALL}") from None


def _fs(path: str):
    return _filesystem(_protocol(path))


def check_available(path) -> None:
    """Raise `MissingCloudDependency` (one line naming the extra) when `path` is a URL whose
    filesystem is not installed; nothing for a local path. Call it before handing a URL to a
    library (orbax) that would fail deep inside with its own message."""
    path = os.fspath(path)
    if is_remote(path):
        _fs(path)
        if _protocol(path) in ("gs", "gcs"):
            try:
                import gcsfs  # noqa: F401  (orbax's epath needs it too)
            except ImportError as e:
                raise MissingCloudDependency(f"{path}: gs:// paths need gcsfs ({e}); install "
                                             f"it with: {_INSTALL}") from None


# ------------------------------------------------------------------------------------------------
# Names
def join(base, *parts: str) -> str:
    base = os.fspath(base)
    if is_remote(base):
        out = base
        for p in parts:
            out = out.rstrip("/") + "/" + os.fspath(p).lstrip("/")
        return out
    return os.path.join(base, *parts)


def abspath(path) -> str:
    """A local path made absolute (`~` expanded); a URL unchanged (trailing `/` removed)."""
    path = os.fspath(path)
    if is_remote(path):
        return path.rstrip("/") if not path.endswith("://") else path
    return os.path.abspath(os.path.expanduser(path))


def dirname(path) -> str:
    path = os.fspath(path)
    if is_remote(path):
        head, _, _ = path.rstrip("/").rpartition("/")
        return head
    return os.path.dirname(path)


def basename(path) -> str:
    path = os.fspath(path)
    if is_remote(path):
        return path.rstrip("/").rpartition("/")[2]
    return os.path.basename(os.path.normpath(path))


# ------------------------------------------------------------------------------------------------
# Queries
def exists(path) -> bool:
    path = os.fspath(path)
    return _fs(path).exists(path) if is_remote(path) else os.path.exists(path)


def isdir(path) -> bool:
    path = os.fspath(path)
    return _fs(path).isdir(path) if is_remote(path) else os.path.isdir(path)


def isfile(path) -> bool:
    path = os.fspath(path)
    return _fs(path).isfile(path) if is_remote(path) else os.path.isfile(path)


def listdir(path) -> list[str]:
    """The names (not paths) directly in folder `path`, sorted; FileNotFoundError if absent."""
    path = os.fspath(path)
    if not is_remote(path):
        return sorted(os.listdir(path))
    fs = _fs(path)
    try:
        entries = fs.ls(path, detail=False)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such directory") from None
    if not entries and not fs.isdir(path):
        raise FileNotFoundError(f"{path}: no such directory")
    names = {posixpath.basename(e.rstrip("/")) for e in entries}
    return sorted(n for n in names if n)


def list_sizes(path) -> dict[str, int]:
    """{name: size in bytes} of the *files* directly in folder `path` (one listing request for
    a bucket); {} when the folder does not exist."""
    path = os.fspath(path)
    if is_remote(path):
        try:
            entries = _fs(path).ls(path, detail=True)
        except FileNotFoundError:
            return {}
        return {posixpath.basename(e["name"].rstrip("/")): int(e.get("size") or 0)
                for e in entries if e.get("type") == "file"}
    try:
        names = os.listdir(path or ".")
    except (FileNotFoundError, NotADirectoryError):
        return {}
    out = {}
    for n in names:
        p = os.path.join(path, n)
        if os.path.isfile(p):
            out[n] = os.path.getsize(p)
    return out


def size(path) -> int:
    """Size of a file in bytes; FileNotFoundError naming it when absent."""
    path = os.fspath(path)
    if not is_remote(path):
        return os.path.getsize(path)
    info = _fs(path).info(path)  # raises FileNotFoundError
    if info.get("type") != "file":
        raise IsADirectoryError(f"{path}: is a directory, expected a file")
    return int(info["size"])


# ------------------------------------------------------------------------------------------------
# Reading and writing
def open(path, mode: str = "rb", *, encoding: str | None = None) -> IO:  # noqa: A001
    """A file object for `path`. Remote files support "r"/"rb" (seekable) and "w"/"wb" (the
    object appears when the file is closed); there is no append on an object store."""
    path = os.fspath(path)
    if "b" not in mode and encoding is None:
        encoding = "utf-8"
    if not is_remote(path):
        return builtins.open(path, mode, encoding=encoding)
    if "a" in mode or "+" in mode:
        raise ValueError(f"{path}: mode {mode!r}: object stores have no append/update; "
                         "write the whole file (atomic_write) or sync a local copy (sync_up)")
    if "b" in mode:
        return _fs(path).open(path, mode)
    return _fs(path).open(path, mode, encoding=encoding)


def read_range(path, offset: int, length: int) -> bytes:
    """`length` bytes of file `path` from byte `offset` (one ranged request for a URL).
    A range past the end of the file is an `EOFError` naming the file and the sizes."""
    path = os.fspath(path)
    offset, length = int(offset), int(length)
    if offset < 0 or length < 0:
        raise ValueError(f"{path}: read_range({offset}, {length}): negative offset or length")
    if length == 0:
        return b""
    if is_remote(path):
        data = _fs(path).cat_file(path, start=offset, end=offset + length)
    else:
        with builtins.open(path, "rb") as fh:
            fh.seek(offset)
            data = fh.read(length)
    if len(data) != length:
        raise EOFError(f"{path}: wanted bytes [{offset}, {offset + length}), the file ends at "
                       f"{offset + len(data)}")
    return data


def read_bytes(path) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


def read_text(path) -> str:
    with open(path, "r", encoding="utf-8") as fh:
        return fh.read()


@contextlib.contextmanager
def atomic_write(path, mode: str = "wb", *, encoding: str | None = None) -> Iterator[IO]:
    """A file to write `path` through: a temporary beside it (locally; renamed over `path` on
    success) or a local temporary uploaded on success (a URL). On an error nothing changes."""
    path = os.fspath(path)
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write: mode must be 'w' or 'wb', got {mode!r}")
    if "b" not in mode and encoding is None:
        encoding = "utf-8"
    if is_remote(path):
        _fs(path)  # a missing filesystem fails before anything is written
        folder = None
    else:
        folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        with sigterm_held():  # no SIGTERM between the creation and the cleanup block
            fd, tmp = tempfile.mkstemp(prefix=f".{basename(path)}.tmp-", dir=folder)
        with builtins.open(fd, mode, encoding=encoding) as fh:
            yield fh
            fh.flush()
            if folder is not None:
                os.fsync(fh.fileno())
        if folder is None:
            _fs(path).put_file(tmp, path)
            os.remove(tmp)
        else:
            os.chmod(tmp, default_file_mode())  # mkstemp makes 0600
            os.replace(tmp, path)
    except BaseException:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
        raise


def write_bytes(path, data: bytes) -> None:
    """Write a whole file atomically (`atomic_write`)."""
    with atomic_write(path, "wb") as fh:
        fh.write(data)


def write_text(path, text: str) -> None:
    with atomic_write(path, "w", encoding="utf-8") as fh:
        fh.write(text)


def makedirs(path, exist_ok: bool = True) -> None:
    """Create a folder and its parents. On an object store folders exist only through their
    files: nothing is created, but an existing *file* at `path` is still refused."""
    path = os.fspath(path)
    if not is_remote(path):
        os.makedirs(path, exist_ok=exist_ok)
        return
    fs = _fs(path)
    if fs.isfile(path):
        raise FileExistsError(f"{path}: exists and is not a directory")


def remove(path) -> None:
    """Remove one file (FileNotFoundError when absent)."""
    path = os.fspath(path)
    if is_remote(path):
        if not _fs(path).isfile(path):
            raise FileNotFoundError(f"{path}: no such file")
        _fs(path).rm_file(path)
    else:
        os.remove(path)


def rmtree(path, ignore_errors: bool = False) -> None:
    path = os.fspath(path)
    if not is_remote(path):
        shutil.rmtree(path, ignore_errors=ignore_errors)
        return
    try:
        _fs(path).rm(path, recursive=True)
    except FileNotFoundError:
        if not ignore_errors:
            raise


# ------------------------------------------------------------------------------------------------
# Copies between local and remote
def download(src, dst) -> str:
    """Copy a file or folder `src` (any path) to local `dst`; returns `dst`."""
    src, dst = os.fspath(src), os.fspath(dst)
    if not is_remote(src):
        (shutil.copytree(src, dst, dirs_exist_ok=True) if os.path.isdir(src)
         else shutil.copyfile(src, dst))
        return dst
    fs = _fs(src)
    if fs.isdir(src):
        os.makedirs(dst, exist_ok=True)
        for name in listdir(src):
            download(join(src, name), os.path.join(dst, name))
    else:
        if not fs.exists(src):
            raise FileNotFoundError(f"{src}: no such file or directory")
        fs.get_file(src, dst)
    return dst


def upload(src: str, dst) -> None:
    """Copy local file or folder `src` to `dst` (any path), folder contents merged."""
    dst = os.fspath(dst)
    if os.path.isdir(src):
        makedirs(dst)
        for name in os.listdir(src):
            upload(os.path.join(src, name), join(dst, name))
    elif is_remote(dst):
        _fs(dst).put_file(src, dst)
    else:
        shutil.copyfile(src, dst)


def sync_up(src: str, dst, state: dict | None = None) -> None:
    """Upload the files of local folder `src` (recursively) that changed since the last call
    with the same `state` dict (size and mtime compared) into folder `dst`."""
    state = {} if state is None else state
    for root, _, files in os.walk(src):
        for name in files:
            p = os.path.join(root, name)
            st = os.stat(p)
            key = (st.st_size, st.st_mtime_ns)
            if state.get(p) == key:
                continue
            rel = os.path.relpath(p, src).replace(os.sep, "/")
            upload(p, join(dst, rel))
            state[p] = key


@contextlib.contextmanager
def local_copy(path) -> Iterator[str]:
    """A local path with the contents of `path`: `path` itself when local, else a temporary
    download (file or folder) removed at the end. For readers that need a real file (mmap)."""
    path = os.fspath(path)
    if not is_remote(path):
        yield path
        return
    check_available(path)
    with tempfile.TemporaryDirectory(prefix="pythia-jax-") as tmp:
        yield download(path, os.path.join(tmp, basename(path) or "root"))


# ------------------------------------------------------------------------------------------------
# Whole directories
def replace_dir(tmp, dst) -> None:
    """Rename local `tmp` to `dst`; an existing `dst` is moved aside first and removed only after."""
    tmp, dst = os.fspath(tmp), os.fspath(dst)
    if os.path.exists(dst):
        old = dst + ".old-" + os.path.basename(tmp)
        os.rename(dst, old)
        try:
            os.rename(tmp, dst)
        except BaseException:
            os.rename(old, dst)
            raise
        shutil.rmtree(old, ignore_errors=True) if os.path.isdir(old) else os.remove(old)
    else:
        os.rename(tmp, dst)


def _refuse_existing(dst: str, overwrite: bool) -> None:
    if overwrite or not exists(dst):
        return
    if not isdir(dst) or listdir(dst):
        raise FileExistsError(f"{dst}: already exists; pass overwrite=True to replace it")


@contextlib.contextmanager
def atomic_dir(dst, *, overwrite: bool = False) -> Iterator[str]:
    """Yield a fresh local temporary directory; on success it replaces `dst`, on any error it
    is removed and `dst` is left as it was.

    Locally the temporary lies beside `dst` and is renamed into place. For a URL it is a local
    temporary uploaded on success (an existing `dst` is removed first when `overwrite`; an
    object store has no directory rename, so a reader may see a half-uploaded folder for the
    duration of the upload, never a half-written file).
    An existing non-empty `dst` (or a file) is refused with `FileExistsError` unless `overwrite`.
    """
    dst = abspath(dst)
    _refuse_existing(dst, overwrite)
    if is_remote(dst):
        with tempfile.TemporaryDirectory(prefix=f".{basename(dst)}.tmp-") as tmp:
            yield tmp
            if exists(dst):
                rmtree(dst)
            upload(tmp, dst)
        return
    parent = os.path.dirname(dst)
    os.makedirs(parent, exist_ok=True)
    tmp = None
    try:
        with sigterm_held():  # no SIGTERM between the creation and the cleanup block
            tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.tmp-", dir=parent)
        os.chmod(tmp, default_dir_mode())  # mkdtemp makes 0700; a directory gets the umask's
        yield tmp
        replace_dir(tmp, dst)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_dir_mode() -> int:
    """The mode `mkdir` gives a new directory under the current umask (0o755 for umask 022)."""
    return 0o777 & ~_umask()


def default_file_mode() -> int:
    """The mode `open(..., "w")` gives a new file under the current umask (0o644 for 022)."""
    return 0o666 & ~_umask()


def block_sigterm():
    """Hold SIGTERM back in the main thread; returns the state for `restore_sigterm` (None in
    other threads: Python runs signal handlers in the main thread only). Used between the
    creation of a temporary output and the start of the block that removes it, so that a
    SIGTERM cannot land in between and leave the temporary behind.

    The Python handler is swapped for one that only records the signal (a signal mask would not
    do: in a process with other threads, XLA's or the data loader's, the kernel delivers a
    process-directed SIGTERM to a thread that does not block it, and the main thread then runs
    the Python handler at its next bytecode boundary, mask or not)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    pending: list[int] = []
    old = signal.signal(signal.SIGTERM, lambda signum, frame: pending.append(signum))
    return (signal.SIG_DFL if old is None else old), pending


@contextlib.contextmanager
def sigterm_held() -> Iterator[None]:
    """`block_sigterm` for the block: wrap the creation of a temporary output together with the
    recording of its name for cleanup, inside the `try` that removes it. A SIGTERM that lands
    meanwhile is delivered at the end of the block, when the name is already recorded."""
    state = block_sigterm()
    try:
        yield
    finally:
        restore_sigterm(state)


def restore_sigterm(state) -> None:
    """Undo `block_sigterm`: a SIGTERM that arrived meanwhile is delivered now, to the handler
    that was in place before."""
    if state is None:
        return
    old, pending = state
    signal.signal(signal.SIGTERM, old)
    if pending:
        signal.raise_signal(signal.SIGTERM)
