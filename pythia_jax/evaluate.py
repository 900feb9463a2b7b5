"""Evaluation: LAMBADA (as lm-evaluation-harness scores it) and token-stream perplexity.

The core is `TokenScorer`: given token-level (context, continuation) pairs it returns
`(sum of log p(continuation | context), whether greedy decoding reproduces every continuation
token)`, exactly with lm-evaluation-harness' HF semantics:

* the model input is `(context + continuation)[-(max_length + 1):][:-1]` (left truncation),
* the continuation tokens are scored by the last `len(continuation)` logits,
* log-softmax over the full (padded) vocabulary in float32, greedy = per-token argmax.

Requests are sorted by length, right-padded to a few bucket lengths (powers of two) and run in
fixed-shape jitted batches (at most `max_batch_tokens` tokens per call), so a whole evaluation
compiles only a handful of programs. Right padding never changes a causal model's logits at the
real positions. The lm-eval adapter (`pythia_jax.lm_eval_adapter`) reuses this class.
"""

from __future__ import annotations

import functools
import json
import math
import os
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pythia_jax import paths
from pythia_jax.data.indexed import MMapIndexedDataset
from pythia_jax.model import GPTNeoX
from pythia_jax.progress import progress_bar
from pythia_jax.tokenizer import EOD_ID, load_tokenizer

__all__ = ["TokenScorer", "EvalDataError", "read_jsonl", "encode_pair", "lambada_requests",
           "evaluate_lambada", "evaluate_token_stream", "stream_windows", "TASKS",
           "tokenizer_for", "run_task"]

#: The tasks `run_task` (and scripts/evaluate.py) runs; every other lm-evaluation-harness task
#: goes through `pythia_jax.lm_eval_adapter`.
TASKS = ("lambada_openai", "perplexity")


class EvalDataError(ValueError):
    """An evaluation input that does not have the expected form (names file, line, field)."""


# ------------------------------------------------------------------------------------------------
def _pow2_bucket(n: int, minimum: int = 16) -> int:
    return max(minimum, 1 << (max(int(n), 1) - 1).bit_length())


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _score_rows(graphdef, params, ids, targets, weights):
    """Per row: sum of target log-probs, number of weighted positions where argmax == target."""
    model = nnx.merge(graphdef, params)
    logits = model(ids).astype(jnp.float32)  # [R, T, V]
    lse = jax.nn.logsumexp(logits, axis=-1)
    tgt = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    lp = jnp.where(weights, tgt - lse, 0.0)
    greedy = (jnp.argmax(logits, axis=-1) == targets) & weights
    return lp.sum(-1), greedy.sum(-1).astype(jnp.int32)


class TokenScorer:
    """Batched, bucketed log-likelihood scoring with a pythia_jax model.

    max_length: the model window (default: the config's max_position_embeddings).
    batch_size: most rows per call; max_batch_tokens: most rows x bucket-length tokens per
    call (bounds the [rows, length, vocab] float32 logits).
    """

    def __init__(self, model: GPTNeoX, *, max_length: int | None = None, batch_size: int = 16,
                 max_batch_tokens: int = 2048):
        if not isinstance(model, GPTNeoX):
            raise TypeError(f"model: expected a pythia_jax GPTNeoX, got {type(model).__name__}")
        self.model = model
        self.max_length = int(max_length or model.config.max_position_embeddings)
        if self.max_length < 1:
            raise ValueError(f"max_length: expected a positive integer, got {max_length!r}")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
        self.batch_size = int(batch_size)
        self.max_batch_tokens = int(max_batch_tokens)
        self.vocab_size = model.config.vocab_size
        self._graphdef, self._params = nnx.split(model)

    # -- rows: (input ids, target ids, scored mask) -------------------------------------------
    def score_rows(self, rows: Sequence[tuple[Sequence[int], Sequence[int], Sequence[bool]]],
                   progress: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(sum log-prob, greedy hits, scored count) per row; inputs up to max_length tokens."""
        n = len(rows)
        lp = np.zeros(n, np.float64)
        hits = np.zeros(n, np.int64)
        counts = np.zeros(n, np.int64)
        lens = np.array([len(r[0]) for r in rows], np.int64)
        if n and (lens.max() > self.max_length or lens.min() < 1):
            raise ValueError(f"score_rows: every row needs 1..{self.max_length} input tokens, "
                             f"got lengths {lens.min()}..{lens.max()}")
        order = np.argsort(-lens, kind="stable")
        bar = _bar(n, "scoring", progress)
        i = 0
        while i < n:
            T = min(_pow2_bucket(lens[order[i]]), _pow2_bucket(self.max_length))
            T = max(T, int(lens[order[i]]))
            R = max(1, min(self.batch_size, self.max_batch_tokens // T))
            idx = order[i: i + R]
            ids = np.full((R, T), 1, np.int32)
            tgt = np.zeros((R, T), np.int32)
            w = np.zeros((R, T), bool)
            for r, j in enumerate(idx):
                inp, t, m = rows[j]
                L = len(inp)
                ids[r, :L] = inp
                tgt[r, :L] = t
                w[r, :L] = m
            s, g = _score_rows(self._graphdef, self._params, ids, tgt, w)
            s, g = np.asarray(s), np.asarray(g)
            lp[idx] = s[: len(idx)]
            hits[idx] = g[: len(idx)]
            counts[idx] = w[: len(idx)].sum(-1)
            i += len(idx)
            bar.update(len(idx))
        bar.close()
        return lp, hits, counts

    # -- lm-eval style (context, continuation) pairs ------------------------------------------
    def loglikelihood_tokens(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
                             progress: bool = False) -> list[tuple[float, bool]]:
        """(log p(continuation | context), greedy reproduces the continuation) per pair."""
        rows = []
        for k, (ctx, cont) in enumerate(pairs):
            ctx, cont = list(ctx), list(cont)
            if not ctx:
                raise ValueError(f"request {k}: empty context tokens (lm-eval puts the "
                                 f"<|endoftext|> prefix there for an empty context)")
            if not cont:
                raise ValueError(f"request {k}: empty continuation tokens")
            if len(cont) > self.max_length:
                raise ValueError(f"request {k}: continuation of {len(cont)} tokens is longer "
                                 f"than the model window ({self.max_length})")
            self._check_ids(ctx + cont, f"request {k}")
            full = (ctx + cont)[-(self.max_length + 1):]
            inp, tgt = full[:-1], full[1:]
            mask = [False] * (len(inp) - len(cont)) + [True] * len(cont)
            rows.append((inp, tgt, mask))
        lp, hits, counts = self.score_rows(rows, progress)
        return [(float(a), bool(h == c)) for a, h, c in zip(lp, hits, counts)]

    def _check_ids(self, ids, what):
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            bad = next(t for t in ids if t < 0 or t >= self.vocab_size)
            raise ValueError(f"{what}: token id {bad} outside the model vocabulary "
                             f"[0, {self.vocab_size})")


def _bar(total, desc, enabled):
    return progress_bar(total, desc, enabled)


# ------------------------------------------------------------------------------------------------
# Text side (lm-evaluation-harness semantics)
def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's causal `_encode_pair`: trailing spaces of the context move to the continuation,
    the whole string is encoded once and split after the context's own token count. An empty
    context becomes the <|endoftext|> prefix token."""
    enc = (lambda s: tokenizer.encode(s).ids) if hasattr(tokenizer, "token_to_id") \
        else (lambda s: list(tokenizer(s)))
    if context == "":
        cont = enc(continuation)
        if cont and cont[0] == EOD_ID:  # lm-eval's prefix for an empty context: its eot token
            return cont[:1], cont[1:]
        return [EOD_ID], cont
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = enc(context + continuation)
    ctx = enc(context)
    return ctx, whole[len(ctx):]


def read_jsonl(path: str | os.PathLike, field: str = "text", limit: int | None = None) -> list[dict]:
    """Objects of a .jsonl file, each with a string `field`; errors name the file and line."""
    path = os.fspath(path)
    if not paths.isfile(path):
        raise FileNotFoundError(f"{path}: no such jsonl file")
    docs = []
    with paths.open(path, "r", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if limit is not None and len(docs) >= limit:
                break
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise EvalDataError(f"{path}:{lineno}: malformed JSON line ({e.msg} at column "
                                    f"{e.colno}); expected one object per line like "
                                    f'{{"{field}": "..."}}') from None
            if not isinstance(obj, dict) or not isinstance(obj.get(field), str):
                raise EvalDataError(f"{path}:{lineno}: expected a JSON object with a string "
                                    f"field {field!r}, got {type(obj).__name__}"
                                    + (f" with keys {sorted(obj)}" if isinstance(obj, dict) else ""))
            docs.append(obj)
    if not docs:
        raise EvalDataError(f"{path}: no documents (empty file)")
    return docs


def lambada_requests(docs: Iterable[dict], where: str = "lambada") -> list[tuple[str, str]]:
    """(context, target) like lm-eval's lambada_openai: all but the last word, " " + last word."""
    out = []
    for i, d in enumerate(docs):
        words = d["text"].split(" ")
        if len(words) < 2 or words[-1] == "":
            raise EvalDataError(f"{where}: document {i}: expected a text of at least two "
                                f"space-separated words ending in the target word, got "
                                f"{d['text'][-60:]!r}")
        out.append((" ".join(words[:-1]), " " + words[-1]))
    return out


def _mean_stderr(x: np.ndarray) -> float:
    return float(np.std(x, ddof=1) / math.sqrt(len(x))) if len(x) > 1 else float("nan")


def evaluate_lambada(model: GPTNeoX, tokenizer, path: str | os.PathLike, *,
                     limit: int | None = None, batch_size: int = 16, max_batch_tokens: int = 2048,
                     progress: bool = False) -> dict:
    """LAMBADA (OpenAI) zero-shot: perplexity = exp(-mean log p(target)), acc = mean(greedy)."""
    if limit is not None and int(limit) < 1:
        raise ValueError(f"limit: expected a positive integer, got {limit!r}")
    docs = read_jsonl(path, "text", limit)
    reqs = lambada_requests(docs, os.fspath(path))
    pairs = [encode_pair(tokenizer, c, t) for c, t in reqs]
    scorer = TokenScorer(model, batch_size=batch_size, max_batch_tokens=max_batch_tokens)
    res = scorer.loglikelihood_tokens(pairs, progress=progress)
    lls = np.array([r[0] for r in res], np.float64)
    acc = np.array([r[1] for r in res], np.float64)
    return {"task": "lambada_openai", "data": os.fspath(path), "num_examples": len(res),
            "perplexity": float(math.exp(-lls.mean())), "acc": float(acc.mean()),
            "acc_stderr": _mean_stderr(acc), "mean_loglikelihood": float(lls.mean())}


# ------------------------------------------------------------------------------------------------
def stream_windows(n_tokens: int, context_length: int, stride: int | None = None):
    """Windows over a stream of n tokens predicting tokens 1..n-1 exactly once each.

    Yields (start, end, first_scored): inputs are tokens[start:end], targets
    tokens[start+1:end+1], and targets with absolute index >= first_scored count. stride =
    context_length (default) gives non-overlapping windows; a smaller stride re-reads
    `context_length - stride` tokens of context at the start of each later window.
    """
    L = int(context_length)
    S = L if stride is None else int(stride)
    if L < 1:
        raise ValueError(f"context_length: expected a positive integer, got {context_length!r}")
    if not 1 <= S <= L:
        raise ValueError(f"stride: expected 1 <= stride <= context_length ({L}), got {stride!r}")
    done = 0  # targets with absolute index <= done are scored (index 0 has no context)
    start = 0
    while done < n_tokens - 1:
        end = min(start + L, n_tokens - 1)
        yield start, end, done + 1
        done = end
        start += S
    return


def evaluate_token_stream(model: GPTNeoX, prefix: str | os.PathLike, *,
                          context_length: int | None = None, stride: int | None = None,
                          max_tokens: int | None = None, batch_size: int = 16,
                          max_batch_tokens: int = 4096, progress: bool = False) -> dict:
    """Perplexity of the token stream of a Megatron `.bin/.idx` dataset (documents concatenated
    in order, as in training), with non-overlapping (`stride=None`) or strided windows."""

    prefix = os.fspath(prefix)
    for suffix in (".bin", ".idx"):
        if prefix.endswith(suffix):
            prefix = prefix[: -len(suffix)]
    ds = MMapIndexedDataset(prefix)  # local or gs://, one .bin or Pythia's shards in place
    if len(ds) == 0:
        raise EvalDataError(f"{prefix}: the dataset holds no items")
    sizes = np.asarray(ds.sizes, np.int64)
    if max_tokens is not None:
        if int(max_tokens) < 2:
            raise ValueError(f"max_tokens: expected at least 2, got {max_tokens!r}")
        k = int(np.searchsorted(np.cumsum(sizes), int(max_tokens))) + 1
        tokens = np.asarray(ds.get_range(0, min(k, len(ds))))[: int(max_tokens)]
    else:
        tokens = np.asarray(ds.get_range(0, len(ds)))
    tokens = tokens.astype(np.int64)
    V = model.config.vocab_size
    if tokens.size < 2:
        raise EvalDataError(f"{prefix}: only {tokens.size} token(s); perplexity needs at least 2")
    bad = np.nonzero((tokens < 0) | (tokens >= V))[0]
    if bad.size:
        raise EvalDataError(f"{prefix}: token {int(tokens[bad[0]])} at stream position "
                            f"{int(bad[0])} is outside the model vocabulary [0, {V}) (is this "
                            f"dataset tokenized with the GPT-NeoX-20B tokenizer?)")
    L = int(context_length or model.config.max_position_embeddings)
    if L > model.config.max_position_embeddings:
        raise ValueError(f"context_length: {L} exceeds the model's context "
                         f"({model.config.max_position_embeddings})")
    rows = []
    for start, end, first in stream_windows(len(tokens), L, stride):
        inp = tokens[start:end]
        tgt = tokens[start + 1: end + 1]
        mask = np.arange(start + 1, end + 1) >= first
        rows.append((inp, tgt, mask))
    scorer = TokenScorer(model, max_length=L, batch_size=batch_size,
                         max_batch_tokens=max(max_batch_tokens, _pow2_bucket(L)))
    lp, hits, counts = scorer.score_rows(rows, progress)
    n = int(counts.sum())
    nll = float(-lp.sum() / n)
    return {"task": "perplexity", "data": prefix, "tokens": int(tokens.size),
            "predicted_tokens": n, "windows": len(rows), "context_length": L,
            "stride": int(stride or L), "nll": nll, "perplexity": float(math.exp(nll)),
            "bits_per_token": nll / math.log(2), "token_accuracy": float(hits.sum() / n)}


# ------------------------------------------------------------------------------------------------
def tokenizer_for(src: str | os.PathLike | None, revision: str | None = None):
    """The tokenizer shipped with a model (its tokenizer.json), else the bundled NeoX-20B one."""
    if src is not None and os.path.isdir(os.fspath(src)) and \
            os.path.isfile(os.path.join(os.fspath(src), "tokenizer.json")):
        return load_tokenizer(src)
    if src is not None and not os.path.exists(os.fspath(src)):
        try:
            return load_tokenizer(src, revision=revision)
        except (OSError, FileNotFoundError):
            pass
    return load_tokenizer()


def run_task(task: str, model: GPTNeoX, *, data: str, tokenizer=None, limit: int | None = None,
             context_length: int | None = None, stride: int | None = None,
             batch_size: int = 16, progress: bool = False) -> dict:
    """Dispatch one of TASKS (the CLI's entry point)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {list(TASKS)} (for any "
                         "lm-evaluation-harness task use `python -m pythia_jax.lm_eval_adapter`)")
    if task == "lambada_openai":
        return evaluate_lambada(model, tokenizer, data, limit=limit, batch_size=batch_size,
                                progress=progress)
    return evaluate_token_stream(model, data, context_length=context_length, stride=stride,
                                 max_tokens=limit, batch_size=batch_size, progress=progress)
