"""Tokenize documents into indexed datasets, as GPT-NeoX's `tools/preprocess_data.py` does.

Inputs: `.jsonl` / `.json` (one JSON object per line), `.jsonl.zst` / `.zst` (zstandard),
`.jsonl.gz` / `.gz`, and `.txt` (the whole file is one document). For each JSON key, every
non-empty document becomes one item of its token ids, followed by EOD (`<|endoftext|>` = 0) with
`append_eod`, then `end_document()`. Empty documents are skipped (NeoX's reader drops them).
Outputs are NeoX's names: `{output_prefix}_{key}_document.{bin,idx}`, uint16 when the tokenizer
has fewer than 65,500 ids (the 20B tokenizer: 50,277), else int32.

A malformed JSON line, a line that is not an object, or a missing / non-string key raises
`PreprocessError` naming the file and line; outputs are only renamed into place at the very end,
so a failed run leaves no output files.
"""

from __future__ import annotations

import collections
import ctypes
import gzip
import io
import json
import multiprocessing
import os
import signal
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Iterable, Iterator, Sequence

import numpy as np

from pythia_jax.data.indexed import MMapIndexedDatasetBuilder, best_dtype
from pythia_jax.tokenizer import EOD_ID, load_tokenizer

__all__ = ["PreprocessError", "tokenize_to_indexed", "iter_documents", "output_prefix_for"]

_CHUNK_DOCS = 64
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class PreprocessError(ValueError):
    """Bad input for tokenization (names the file and line)."""


def output_prefix_for(output_prefix: str, key: str) -> str:
    return f"{output_prefix}_{key}_document"


def _open_text_lines(path: str) -> io.TextIOBase:
    if path.endswith(".zst"):
        import zstandard

        raw = open(path, "rb")
        stream = zstandard.ZstdDecompressor().stream_reader(raw, closefd=True)
        return io.TextIOWrapper(stream, encoding="utf-8", newline="")
    if path.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return open(path, "r", encoding="utf-8", newline="")


def _kind(path: str) -> str:
    if path.endswith(".txt"):
        return "txt"
    for ext in (".jsonl", ".json", ".jsonl.zst", ".json.zst", ".zst", ".jsonl.gz", ".json.gz",
                ".gz"):
        if path.endswith(ext):
            return "jsonl"
    raise PreprocessError(f"{path}: unsupported input type: expected .jsonl, .json, .jsonl.zst, "
                          ".jsonl.gz or .txt")


def iter_documents(paths: Sequence[str], json_keys: Sequence[str]) -> Iterator[dict[str, str]]:
    """Yield {key: text} per document, in file order; raise `PreprocessError` on bad input."""
    for path in paths:
        path = os.fspath(path)
        kind = _kind(path)
        if not os.path.isfile(path):
            raise PreprocessError(f"{path}: no such input file")
        if kind == "txt":
            if len(json_keys) != 1:
                raise PreprocessError(f"{path}: a .txt input is one document of plain text; "
                                      f"expected one json key, found {list(json_keys)}")
            try:
                with open(path, "r", encoding="utf-8", newline="") as f:
                    text = f.read()
            except UnicodeDecodeError as e:
                raise PreprocessError(f"{path}: not UTF-8 text ({e})") from None
            yield {json_keys[0]: text}
            continue
        with _open_text_lines(path) as f:
            lineno = 0
            while True:
                try:
                    line = f.readline()
                except UnicodeDecodeError as e:
                    raise PreprocessError(f"{path}:{lineno + 1}: not UTF-8 text ({e})") from None
                except Exception as e:  # zstd / gzip stream errors
                    raise PreprocessError(f"{path}: cannot decompress after line {lineno} ({e})"
                                          ) from None
                if not line:
                    break
                lineno += 1
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line.rstrip("\r\n"))
                except json.JSONDecodeError as e:
                    raise PreprocessError(f"{path}:{lineno}: malformed JSON: {e.msg} at column "
                                          f"{e.colno}") from None
                if not isinstance(obj, dict):
                    raise PreprocessError(f"{path}:{lineno}: expected a JSON object, found "
                                          f"{type(obj).__name__}")
                doc = {}
                for key in json_keys:
                    if key not in obj:
                        raise PreprocessError(f"{path}:{lineno}: missing key {key!r} (found keys "
                                              f"{sorted(obj)[:10]})")
                    if not isinstance(obj[key], str):
                        raise PreprocessError(f"{path}:{lineno}: key {key!r}: expected a string, "
                                              f"found {type(obj[key]).__name__}")
                    doc[key] = obj[key]
                yield doc


# -- tokenization (in-process or in a worker pool) ----------------------------------------------
_WORKER_TOKENIZER = None
_WORKER_EOD: int | None = None


def _die_with_parent(parent_pid: int) -> None:
    """Linux: have the kernel SIGKILL this worker when the process that started it dies (even by
    SIGKILL), so no tokenizer process outlives the run holding its stderr open."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the pool's own shutdown is all there is
        return
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def _init_worker(tokenizer_json: str, eod: int | None, parent_pid: int) -> None:
    global _WORKER_TOKENIZER, _WORKER_EOD
    _die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the parent stops the pool
    from tokenizers import Tokenizer

    _WORKER_TOKENIZER = Tokenizer.from_str(tokenizer_json)
    _WORKER_EOD = eod


def _encode_texts(tokenizer, texts: list[str], eod: int | None) -> list[np.ndarray]:
    out = []
    for text in texts:
        ids = tokenizer.encode(text).ids
        if eod is not None:
            ids.append(eod)
        out.append(np.asarray(ids, dtype=np.int64))
    return out


def _worker_encode(texts: list[str]) -> list[np.ndarray]:
    return _encode_texts(_WORKER_TOKENIZER, texts, _WORKER_EOD)


def _chunks(docs: Iterable[dict[str, str]]):
    batch = []
    for doc in docs:
        batch.append(doc)
        if len(batch) == _CHUNK_DOCS:
            yield batch
            batch = []
    if batch:
        yield batch


def tokenize_to_indexed(inputs: str | os.PathLike | Sequence[str | os.PathLike],
                        output_prefix: str | os.PathLike, tokenizer=None,
                        json_keys: Sequence[str] = ("text",), append_eod: bool = True,
                        workers: int = 1, progress: bool = False) -> dict[str, str]:
    """Tokenize `inputs` into `{output_prefix}_{key}_document.{bin,idx}` for each json key.

    `tokenizer`: a `tokenizers.Tokenizer`, a path accepted by `load_tokenizer`, or None for the
    bundled GPT-NeoX-20B tokenizer. `workers > 1` tokenizes in a process pool (order kept).
    Returns {key: dataset prefix}.
    """

    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    paths = [os.fspath(p) for p in inputs]
    if not paths:
        raise PreprocessError("no input files given")
    json_keys = [json_keys] if isinstance(json_keys, str) else list(json_keys)
    if not json_keys or len(set(json_keys)) != len(json_keys):
        raise PreprocessError(f"expected distinct json keys, found {json_keys}")
    for p in paths:  # fail fast, before any output exists
        _kind(p)
        if not os.path.isfile(p):
            raise PreprocessError(f"{p}: no such input file")
    if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(tokenizer)
    eod_id = tokenizer.token_to_id("<|endoftext|>")
    eod = (EOD_ID if eod_id is None else eod_id) if append_eod else None
    dtype = best_dtype(tokenizer.get_vocab_size())
    output_prefix = os.fspath(output_prefix)
    out_dir = os.path.dirname(os.path.abspath(output_prefix))
    os.makedirs(out_dir, exist_ok=True)

    prefixes = {k: output_prefix_for(output_prefix, k) for k in json_keys}
    builders: dict[str, MMapIndexedDatasetBuilder] = {}
    pool = None
    bar = None
    try:
        for k in json_keys:
            builders[k] = MMapIndexedDatasetBuilder(prefixes[k], dtype)
        if workers > 1:
            # spawn: safe with jax / tokenizers threads; a dead worker raises, never hangs.
            pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                       initializer=_init_worker,
                                       initargs=(tokenizer.to_str(), eod, os.getpid()))
        if progress:
            from tqdm import tqdm

            bar = tqdm(unit=" docs", desc="tokenizing", dynamic_ncols=True)
        n_docs = n_tokens = 0
        t0 = time.time()

        def encode(texts):
            if pool is None:
                return _encode_texts(tokenizer, texts, eod)
            return pool.submit(_worker_encode, texts)

        pending: collections.deque = collections.deque()
        max_pending = 4 * max(workers, 1)
        for chunk in _chunks(iter_documents(paths, json_keys)):
            jobs = []
            for key in json_keys:
                texts = [d[key] for d in chunk if d[key]]
                jobs.append((key, encode(texts), len(chunk)))
            pending.append(jobs)
            while len(pending) > (max_pending if pool is not None else 0):
                n_docs, n_tokens = _drain(pending.popleft(), builders, pool, n_docs, n_tokens)
                _tick(bar, n_docs, n_tokens, t0)
        while pending:
            n_docs, n_tokens = _drain(pending.popleft(), builders, pool, n_docs, n_tokens)
            _tick(bar, n_docs, n_tokens, t0)
        if pool is not None:
            pool.shutdown(wait=True)
            pool = None
        for k in json_keys:
            builders[k].finalize()
    except BaseException:
        for b in builders.values():
            b.abort()
        raise
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        if bar is not None:
            bar.close()
    return prefixes


def _drain(jobs, builders, pool, n_docs: int, n_tokens: int) -> tuple[int, int]:
    for key, res, _ in jobs:
        arrays = res if pool is None else res.result()
        for ids in arrays:
            builders[key].add_document(ids)
            n_tokens += ids.size
    return n_docs + jobs[0][2], n_tokens


def _tick(bar, n_docs: int, n_tokens: int, t0: float) -> None:
    if bar is None:
        return
    bar.update(n_docs - bar.n)
    dt = max(time.time() - t0, 1e-9)
    bar.set_postfix_str(f"{n_tokens / dt:,.0f} tokens/s, {n_tokens:,} tokens", refresh=False)
