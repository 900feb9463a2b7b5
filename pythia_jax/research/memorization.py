"""Memorization of training rows as in the Pythia paper (Biderman et al. 2023,
`predictable-memorization/eval_memorization.py` in EleutherAI/pythia).

For row i of the pre-shuffled training stream (item i of Pythia's `document.bin`):

    prompt        = tokens[0:32]
    continuation  = 32 greedy tokens after the prompt
    matches       = number of positions j in 0..31 with continuation[j] == tokens[32 + j]
    score         = matches / 32            (memorized: score == 1, i.e. 32 of 32)

The paper generates with `model.generate(prompt, max_length=64, min_length=64)` (greedy),
and `min_length` makes HF suppress the end-of-text token until 64 tokens exist, so the model
can never emit it: `suppress_eos=True` (the default) does the same. We additionally return
`first_mismatch` (the first j where the greedy token differs, 32 when none) and
`true_logprob`, the teacher-forced log-probability of the true continuation,
sum_j log p(tokens[32 + j] | tokens[:32 + j]).

One compiled program per (model structure, batch size): a teacher-forced forward over the 64
tokens (which also fills the KV cache of the prompt), then 31 single-token greedy steps from
that cache. Batches of a fixed size (the last one padded) keep the shapes fixed.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import pythia_jax
from pythia_jax.data.indexed import MMapIndexedDataset
from pythia_jax.data.source import missing_file

__all__ = ["PROMPT_LEN", "CONT_LEN", "CSV_COLUMNS", "MemorizationResult",
           "MemorizationDataError", "memorize_tokens", "read_rows", "memorize_rows", "host_rows",
           "run_memorization", "read_done_rows", "host_output_path", "summarize", "score"]

PROMPT_LEN = 32
CONT_LEN = 32
WINDOW = PROMPT_LEN + CONT_LEN


class MemorizationDataError(ValueError):
    """Rows that cannot be scored (missing data, rows out of range, too short, bad ids)."""


@dataclasses.dataclass
class MemorizationResult:
    """Per row: matches [R] int, score [R], first_mismatch [R] (32 = none), true_logprob [R],
    generated [R, 32] (the greedy continuation)."""
    rows: np.ndarray
    matches: np.ndarray
    score: np.ndarray
    first_mismatch: np.ndarray
    true_logprob: np.ndarray
    generated: np.ndarray

    @property
    def memorized(self) -> np.ndarray:
        return self.matches == CONT_LEN


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _memorize_batch(graphdef, state, tokens_BW, banned_V):
    """(greedy [B, 32] int32, true-continuation log-prob [B] float32) for windows [B, 64]."""
    model = nnx.merge(graphdef, state)
    cfg = model.config
    B = tokens_BW.shape[0]
    cache = pythia_jax.KVCache.empty(cfg, B, WINDOW)
    # Teacher forcing over all 64 tokens: logits at 31..62 score tokens 32..63, and slots 0..31
    # of the cache hold the prompt exactly as a 32-token prefill would (causal attention).
    hidden, cache = model(tokens_BW, cache=cache, return_hidden=True)
    h_BCD = hidden[:, PROMPT_LEN - 1: WINDOW - 1]
    cdt = h_BCD.dtype
    logits = jnp.einsum("bcd,vd->bcv", h_BCD, model.embed_out.embedding[...].astype(cdt),
                        preferred_element_type=jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    tgt = jnp.take_along_axis(logits, tokens_BW[:, PROMPT_LEN:, None], axis=-1)[..., 0]
    true_lp = jnp.sum(tgt - lse, axis=-1)

    def pick(lg_BV):
        return jnp.argmax(jnp.where(banned_V[None], -jnp.inf, lg_BV), axis=-1).astype(jnp.int32)

    first = pick(logits[:, 0])
    valid = cache.key_valid.at[:, PROMPT_LEN:].set(False)
    cache = dataclasses.replace(cache, key_valid=valid, index=jnp.int32(PROMPT_LEN))
    out = jnp.zeros((B, CONT_LEN), jnp.int32).at[:, 0].set(first)

    def body(j, carry):
        cache, out, last = carry
        lg, cache = model(last[:, None], cache=cache)
        nxt = pick(lg[:, 0])
        return cache, out.at[:, j].set(nxt), nxt

    _, out, _ = jax.lax.fori_loop(1, CONT_LEN, body, (cache, out, first))
    return out, true_lp


def memorize_tokens(model, windows, *, batch_size: int = 64,
                    suppress_eos: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Greedy continuations [R, 32] and true-continuation log-probs [R] for windows [R, >=64]
    (tokens[:32] prompt, tokens[32:64] truth). Fixed-size batches (last one padded)."""
    if not isinstance(model, pythia_jax.GPTNeoX):
        raise TypeError(f"model: expected a pythia_jax GPTNeoX, got {type(model).__name__}")
    w = np.asarray(windows)
    if w.ndim != 2 or w.shape[1] < WINDOW:
        raise ValueError(f"windows: expected [rows, >= {WINDOW}] tokens, got shape {w.shape}")
    w = w[:, :WINDOW].astype(np.int64)
    cfg = model.config
    if cfg.max_position_embeddings < WINDOW:
        raise ValueError(f"model context {cfg.max_position_embeddings} < {WINDOW} tokens")
    if w.size and (w.min() < 0 or w.max() >= cfg.vocab_size):
        r = int(np.nonzero((w < 0) | (w >= cfg.vocab_size))[0][0])
        raise ValueError(f"windows: row {r} holds a token id outside the vocabulary "
                         f"[0, {cfg.vocab_size})")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
    B = int(batch_size)
    banned = np.zeros((cfg.vocab_size,), bool)
    if suppress_eos and cfg.eos_token_id is not None:
        banned[int(cfg.eos_token_id)] = True
    graphdef, state = nnx.split(model)
    R = len(w)
    gen = np.zeros((R, CONT_LEN), np.int32)
    lp = np.zeros((R,), np.float64)
    for a in range(0, R, B):
        chunk = w[a: a + B]
        n = len(chunk)
        if n < B:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], B - n, axis=0)])
        g, l = _memorize_batch(graphdef, state, jnp.asarray(chunk, jnp.int32), banned)
        gen[a: a + n] = np.asarray(g)[:n]
        lp[a: a + n] = np.asarray(l)[:n]
    return gen, lp


def score(rows, windows, generated, true_logprob) -> MemorizationResult:
    """Paper scores from greedy continuations."""
    truth = np.asarray(windows)[:, PROMPT_LEN:WINDOW]
    eq = np.asarray(generated) == truth
    matches = eq.sum(-1).astype(np.int64)
    miss = ~eq
    first = np.where(miss.any(-1), miss.argmax(-1), CONT_LEN).astype(np.int64)
    return MemorizationResult(rows=np.asarray(rows, np.int64), matches=matches,
                              score=matches / CONT_LEN, first_mismatch=first,
                              true_logprob=np.asarray(true_logprob, np.float64),
                              generated=np.asarray(generated, np.int32))


def open_rows(data) -> MMapIndexedDataset:
    """The dataset of a `.bin/.idx` prefix (or an open MMapIndexedDataset)."""
    if isinstance(data, MMapIndexedDataset):
        return data
    prefix = os.fspath(data)
    for suffix in (".bin", ".idx"):
        if prefix.endswith(suffix):
            prefix = prefix[: -len(suffix)]
    missing = missing_file(prefix)  # local or gs://, one .bin or Pythia's shards in place
    if missing is not None:
        raise MemorizationDataError(f"{prefix}: no such dataset ({missing}; expected the "
                                    ".bin/.idx prefix of a pre-shuffled stream, e.g. "
                                    ".../document)")
    return MMapIndexedDataset(prefix)


def check_row_range(ds: MMapIndexedDataset, start: int, end: int) -> None:
    n = len(ds)
    if not (0 <= int(start) < int(end) <= n):
        raise MemorizationDataError(
            f"{ds.prefix}: rows [{start}, {end}) out of range: expected 0 <= start_row < "
            f"end_row <= {n} (the dataset holds {n} rows)")


def read_rows(data, rows: Iterable[int]) -> np.ndarray:
    """Tokens [R, 64] (prompt + true continuation) of the given dataset rows (items)."""
    ds = open_rows(data)
    rows = np.asarray(list(rows), np.int64)
    if rows.size == 0:
        return np.zeros((0, WINDOW), np.int64)
    n = len(ds)
    if rows.min() < 0 or rows.max() >= n:
        bad = int(rows[(rows < 0) | (rows >= n)][0])
        raise MemorizationDataError(f"{ds.prefix}: row {bad} out of range (the dataset holds "
                                    f"{n} rows, 0..{n - 1})")
    sizes = np.asarray(ds.sizes)[rows]
    if (sizes < WINDOW).any():
        bad = int(rows[sizes < WINDOW][0])
        raise MemorizationDataError(f"{ds.prefix}: row {bad} has {int(ds.sizes[bad])} tokens, "
                                    f"expected at least {WINDOW} (prompt {PROMPT_LEN} + "
                                    f"continuation {CONT_LEN})")
    out = np.empty((len(rows), WINDOW), np.int64)
    a, b = int(rows.min()), int(rows.max()) + 1
    if len(rows) == b - a and np.all(np.diff(rows) == 1) and np.all(ds.sizes[a:b] == sizes[0]):
        out[:] = ds.get_range(a, b).reshape(b - a, int(sizes[0]))[:, :WINDOW]
    else:
        for k, r in enumerate(rows):
            out[k] = ds.get(int(r), 0, WINDOW)
    return out


def host_rows(start: int, end: int, process_index: int | None = None,
              process_count: int | None = None) -> range:
    """This host's contiguous share of rows [start, end) (the last host takes the remainder,
    as the paper's script splits ranks)."""
    p = jax.process_index() if process_index is None else int(process_index)
    n = jax.process_count() if process_count is None else int(process_count)
    if n < 1 or not 0 <= p < n:
        raise ValueError(f"expected 0 <= process_index < process_count, got {p} of {n}")
    per = (int(end) - int(start)) // n
    a = int(start) + per * p
    b = int(end) if p == n - 1 else a + per
    return range(a, b)


def memorize_rows(model, data, rows: Iterable[int], *, batch_size: int = 64,
                  suppress_eos: bool = True) -> MemorizationResult:
    """Memorization scores of dataset rows (see the module docstring)."""
    rows = list(rows)
    windows = read_rows(data, rows)
    gen, lp = memorize_tokens(model, windows, batch_size=batch_size, suppress_eos=suppress_eos)
    return score(rows, windows, gen, lp)


# ------------------------------------------------------------------------------------------------
# Resumable CSV runs
CSV_COLUMNS = ("row", "matches", "score", "first_mismatch", "true_logprob")


def read_done_rows(path: str) -> set[int]:
    """Rows already in a memorization CSV. A torn last line (a kill mid-write) is dropped from
    the file; any other malformed line raises MemorizationDataError naming the line."""
    path = os.fspath(path)
    if not os.path.exists(path):
        return set()
    with open(path, "rb") as fh:
        data = fh.read()
    if data and not data.endswith(b"\n"):
        data = data[: data.rfind(b"\n") + 1]
        with open(path, "rb+") as fh:
            fh.truncate(len(data))
    lines = data.decode("utf-8", errors="replace").splitlines()
    if not lines:
        return set()
    if tuple(lines[0].split(",")) != CSV_COLUMNS:
        raise MemorizationDataError(f"{path}: line 1: expected the header "
                                    f"{','.join(CSV_COLUMNS)!r}, got {lines[0][:80]!r} (not a "
                                    "memorization results file? use a new --out)")
    done = set()
    for k, line in enumerate(lines[1:], start=2):
        f = line.split(",")
        try:
            if len(f) != len(CSV_COLUMNS):
                raise ValueError(f"{len(f)} fields")
            row, matches = int(f[0]), int(f[1])
            float(f[2]), int(f[3]), float(f[4])
            if row < 0 or not 0 <= matches <= CONT_LEN:
                raise ValueError("values out of range")
        except ValueError as e:
            raise MemorizationDataError(
                f"{path}: line {k}: expected {len(CSV_COLUMNS)} fields "
                f"{','.join(CSV_COLUMNS)} (ints, floats), got {line[:80]!r} ({e})") from None
        done.add(row)
    return done


def _append_lines(path: str, res: MemorizationResult, header: bool) -> None:
    text = ",".join(CSV_COLUMNS) + "\n" if header else ""
    text += "".join(f"{r},{m},{s!r},{f},{lp!r}\n" for r, m, s, f, lp in zip(
        res.rows.tolist(), res.matches.tolist(), res.score.tolist(),
        res.first_mismatch.tolist(), res.true_logprob.tolist()))
    with open(path, "a") as fh:  # one write per batch, then fsync
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def host_output_path(out: str, process_index: int | None = None,
                     process_count: int | None = None) -> str:
    """`out` on a single host; `out` with `.process{P}-of-{N}` before the extension on a pod
    (each host appends to its own file; concatenate them afterwards)."""
    n = jax.process_count() if process_count is None else int(process_count)
    p = jax.process_index() if process_index is None else int(process_index)
    if n == 1:
        return os.fspath(out)
    stem, ext = os.path.splitext(os.fspath(out))
    return f"{stem}.process{p}-of-{n}{ext or '.csv'}"


def run_memorization(model, data, start_row: int, end_row: int, out: str, *,
                     batch_size: int = 64, suppress_eos: bool = True,
                     process_index: int | None = None, process_count: int | None = None,
                     log=None) -> dict:
    """Score rows [start_row, end_row) (this host's share of them) into a CSV, resumably:
    rows already in the file are skipped; each batch is appended and fsync'ed.
    Returns {"path", "rows", "computed", "skipped"}."""
    ds = open_rows(data)
    check_row_range(ds, start_row, end_row)
    mine = host_rows(start_row, end_row, process_index, process_count)
    path = host_output_path(out, process_index, process_count)
    done = read_done_rows(path)
    todo = [r for r in mine if r not in done]
    read_rows(ds, todo[:1] + todo[-1:])  # fail on short rows / bad ids before any compute
    header = not os.path.exists(path) or os.path.getsize(path) == 0
    B = int(batch_size)
    for a in range(0, len(todo), B):
        chunk = todo[a: a + B]
        res = memorize_rows(model, ds, chunk, batch_size=B, suppress_eos=suppress_eos)
        _append_lines(path, res, header)
        header = False
        if log:
            log(f"memorization: rows {chunk[0]}..{chunk[-1]}: {int(res.memorized.sum())} of "
                f"{len(chunk)} memorized ({a + len(chunk)}/{len(todo)})")
    if header:  # nothing to do and no file yet: still leave a valid (empty) results file
        with open(path, "w") as fh:
            fh.write(",".join(CSV_COLUMNS) + "\n")
    return {"path": path, "rows": len(mine), "computed": len(todo),
            "skipped": len(mine) - len(todo)}


def summarize(results_or_path) -> dict:
    """memorized_fraction, mean_score, mean_true_logprob, rows (from a result or a CSV)."""
    if isinstance(results_or_path, MemorizationResult):
        m = results_or_path.matches
        lp = results_or_path.true_logprob
    else:
        arr = np.loadtxt(os.fspath(results_or_path), delimiter=",", skiprows=1, ndmin=2)
        m, lp = arr[:, 1], arr[:, 4]
    n = len(m)
    return {"rows": n, "memorized_fraction": float(np.mean(m == CONT_LEN)) if n else float("nan"),
            "mean_score": float(np.mean(m) / CONT_LEN) if n else float("nan"),
            "mean_true_logprob": float(np.mean(lp)) if n else float("nan")}
