"""lm-evaluation-harness model `pythia_jax`: every harness task with a pythia-jax model.

lm-eval 0.4.x resolves `--model NAME` through `lm_eval.api.registry.model_registry`, which is
filled only by lm-eval's own model list and by modules that register themselves when imported
(0.4.13 does not scan any entry-point group for models). So:

* command line (same arguments as `lm_eval`; this module registers the model, then runs
  lm-eval's own CLI)::

      python -m pythia_jax.lm_eval_adapter --model pythia_jax \\
          --model_args pretrained=EleutherAI/pythia-70m,revision=step143000 \\
          --tasks lambada_openai --batch_size 16

* Python::

      import lm_eval, pythia_jax.lm_eval_adapter   # the import registers "pythia_jax"
      lm_eval.simple_evaluate(model="pythia_jax", model_args="pretrained=/path/to/hf_dir",
                              tasks=["lambada_openai"])
      # or pass an instance: lm_eval.simple_evaluate(model=PythiaJaxLM(model_obj), ...)

model_args: pretrained (HF dir / hub id / pythia-jax checkpoint, or a GPTNeoX object),
revision, dtype (parameter dtype: float32 | bfloat16 | float16), tokenizer (tokenizer.json
path / directory / hub id; default: the model's own tokenizer.json, else the bundled
GPT-NeoX-20B one), batch_size (rows per scoring call; "auto" / "auto:N": the largest of
max_batch_size (default 64), half of it, ... that scores rows of the full window without running
out of device memory, as lm-eval's HF model searches), max_batch_tokens,
max_length (default: max_position_embeddings), max_gen_toks (default 256).

Scoring follows the harness' HF model exactly (see `pythia_jax.evaluate.TokenScorer`);
`generate_until` runs the compiled KV-cache decoder and ends each sequence when one of its stop
strings appears in its decoded text (or at <|endoftext|> / `max_gen_toks`).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Callable

import jax
import numpy as np

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import model_registry

from pythia_jax.evaluate import TokenScorer, tokenizer_for
from pythia_jax.generation import generate_arrays
from pythia_jax.model import GPTNeoX, count_params
from pythia_jax.pretrained import from_pretrained
from pythia_jax.tokenizer import EOD_ID, load_tokenizer

__all__ = ["PythiaJaxLM", "register", "main", "MODEL_NAME", "find_batch_size",
           "is_out_of_memory", "AUTO_MAX_BATCH_SIZE"]

log = logging.getLogger("pythia_jax")
MODEL_NAME = "pythia_jax"
_TARGET = "pythia_jax.lm_eval_adapter:PythiaJaxLM"


def register() -> None:
    """Register `pythia_jax` (and `pythia-jax`) with lm-eval's model registry (idempotent).

    Registered as a lazy "module:Class" placeholder, so running this file as `__main__` and
    importing it as a module never register two different classes under one name."""
    # lm-eval fills in its own models only when the registry is still empty at lookup time,
    # so load that list first or registering ours would hide `hf`, `vllm`, ...
    import lm_eval.models  # noqa: F401
    for alias in (MODEL_NAME, "pythia-jax"):
        if alias not in model_registry:
            model_registry.register(alias, target=_TARGET)


#: Where `batch_size=auto` starts its search when no max_batch_size is given (lm-eval's HF
#: model uses the same default).
AUTO_MAX_BATCH_SIZE = 64


def _parse_batch_size(bs) -> int | str:
    """A positive int, or "auto" (also lm-eval's "auto:N": the search runs once here)."""
    if bs is None:
        return 16
    if isinstance(bs, str):
        if bs == "auto" or bs.startswith("auto:"):
            return "auto"
        try:
            bs = int(bs)
        except ValueError:
            raise ValueError(f"batch_size: expected an integer or 'auto', got {bs!r}") from None
    if isinstance(bs, bool) or int(bs) < 1:
        raise ValueError(f"batch_size: expected a positive integer or 'auto', got {bs!r}")
    return int(bs)


def is_out_of_memory(e: BaseException) -> bool:
    """An XLA allocation failure (RESOURCE_EXHAUSTED / out of memory) on the device."""
    text = str(e)
    return isinstance(e, jax.errors.JaxRuntimeError) and (
        "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower())


def find_batch_size(trial: Callable[[int], object], start: int) -> int:
    """The largest of start, start // 2, ..., 1 for which `trial(batch)` runs without running out
    of device memory (HF's search: try large, halve on a resource-exhausted error). Other errors
    propagate; out of memory at batch 1 is a RuntimeError saying so."""
    if isinstance(start, bool) or not isinstance(start, int) or start < 1:
        raise ValueError(f"max_batch_size: expected a positive integer, got {start!r}")
    b = start
    while True:
        try:
            trial(b)
            return b
        except Exception as e:  # noqa: BLE001 - only out-of-memory errors are handled
            if not is_out_of_memory(e):
                raise
            if b == 1:
                raise RuntimeError(f"batch_size=auto: even one row of the model window runs out "
                                   f"of device memory ({str(e).splitlines()[0]}); lower "
                                   "max_length or use a smaller dtype") from None
            log.info("pythia_jax: batch_size %d ran out of memory; trying %d", b, b // 2)
            b //= 2


class PythiaJaxLM(TemplateLM):
    """A pythia-jax GPT-NeoX behind lm-eval's `LM` interface."""

    backend = "causal"

    def __init__(self, pretrained: str | GPTNeoX | None = None, revision: str | None = None,
                 dtype: str | None = None, tokenizer: Any = None, batch_size=16,
                 max_batch_tokens: int = 2048, max_length: int | None = None,
                 max_gen_toks: int = 256, seed: int = 1234, device: str | None = None,
                 max_batch_size: int | None = None, **kwargs):
        super().__init__()
        if pretrained is None:
            raise ValueError("pythia_jax: model_args needs pretrained=<HF dir | hub id | "
                             "pythia-jax checkpoint>")
        if kwargs:
            log.warning("pythia_jax: ignoring unsupported model_args %s", sorted(kwargs))
        if device not in (None, "cpu") and not str(device).startswith(("cuda", "tpu", "gpu")):
            log.warning("pythia_jax: device=%r ignored (JAX places the model on its default "
                        "backend; set JAX_PLATFORMS to choose)", device)
        if isinstance(pretrained, GPTNeoX):
            self._model = pretrained
            self._name = "GPTNeoX(in-memory)"
            src = None
        else:
            src = os.fspath(pretrained)
            if dtype in ("auto", "None", ""):
                dtype = None  # from_pretrained's default: float32 parameters
            self._model = from_pretrained(src, revision=revision, dtype=dtype)
            self._name = src
        if tokenizer is None:
            self.tokenizer = tokenizer_for(src, revision)
        elif isinstance(tokenizer, (str, os.PathLike)):
            self.tokenizer = load_tokenizer(tokenizer)
        else:
            self.tokenizer = tokenizer
        cfg = self._model.config
        self._max_length = int(max_length or cfg.max_position_embeddings)
        self._max_gen_toks = int(max_gen_toks)
        self._batch_size = _parse_batch_size(batch_size)
        self._seed = int(seed)
        if self._batch_size == "auto":
            # HF's way: the most rows of the full window that fit, from max_batch_size down
            start = AUTO_MAX_BATCH_SIZE if max_batch_size is None else max_batch_size
            if isinstance(start, str) and start.isdigit():
                start = int(start)
            self._batch_size = find_batch_size(self._trial_batch, start)
            max_batch_tokens = max(max_batch_tokens, self._batch_size * self._max_length)
            log.info("pythia_jax: batch_size=auto chose %d", self._batch_size)
        self.scorer = TokenScorer(self._model, max_length=self._max_length,
                                  batch_size=self._batch_size, max_batch_tokens=max_batch_tokens)

    def _trial_batch(self, rows: int) -> None:
        """Score `rows` rows of the full window once (what batch_size=auto tries)."""
        T = self._max_length
        scorer = TokenScorer(self._model, max_length=T, batch_size=rows,
                             max_batch_tokens=rows * T)
        row = ([EOD_ID] * T, [EOD_ID] * T, [True] * T)
        scorer.score_rows([row] * rows)

    # -- properties lm-eval reads ---------------------------------------------------------------
    @property
    def model(self) -> GPTNeoX:
        return self._model

    @property
    def eot_token_id(self) -> int:
        return EOD_ID

    @property
    def prefix_token_id(self) -> int:
        return EOD_ID

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return "EleutherAI/gpt-neox-20b"

    def get_model_info(self) -> dict:
        return {"model_num_parameters": count_params(self._model)["total"],
                "model_dtype": self._model.config.param_dtype, "model_source": self._name}

    # -- tokenization ---------------------------------------------------------------------------
    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   left_truncate_len: int | None = None, **kwargs) -> list[int]:
        # The GPT-NeoX tokenizer adds no special tokens either way.
        ids = self.tokenizer.encode(string).ids
        if left_truncate_len:
            ids = ids[-left_truncate_len:]
        return ids

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        if isinstance(tokens, (int, np.integer)):
            tokens = [int(tokens)]
        return self.tokenizer.decode(list(tokens), skip_special_tokens=skip_special_tokens)

    # -- loglikelihood --------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        if not requests:
            return []
        res = self.scorer.loglikelihood_tokens([(c, k) for _, c, k in requests],
                                               progress=not disable_tqdm)
        for (req_str, _, _), ans in zip(requests, res):
            if req_str is not None:
                self.cache_hook.add_partial("loglikelihood", req_str, ans)
        return res

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval import utils as lm_utils

        windows, owner = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            for ctx, cont in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(i)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for i, (lp, _) in zip(owner, scores):
            totals[i] += lp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # -- generation -----------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from lm_eval.models.utils import (handle_stop_sequences, normalize_gen_kwargs,
                                          postprocess_generated_text)

        if not requests:
            return []
        eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        results: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            key = json.dumps(req.args[1], sort_keys=True, default=str)
            groups.setdefault(key, []).append(i)
        from tqdm import tqdm
        bar = tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm)
        for idxs in groups.values():
            gen_kwargs = requests[idxs[0]].args[1]
            if not isinstance(gen_kwargs, dict):
                raise TypeError(f"generate_until: expected gen_kwargs to be a dict, got "
                                f"{type(gen_kwargs).__name__}")
            kw = dict(normalize_gen_kwargs(gen_kwargs, self.max_gen_toks))
            until = handle_stop_sequences(kw.pop("until", None), eos=eos)
            max_gen = int(kw.pop("max_gen_toks"))
            do_sample = bool(kw.pop("do_sample", False))
            temperature = float(kw.pop("temperature", 0.0) or 0.0) if do_sample else 0.0
            top_k = kw.pop("top_k", None)
            top_p = kw.pop("top_p", None)
            seed = int(kw.pop("seed", self._seed))
            if kw:
                log.warning("pythia_jax: ignoring unsupported generation kwargs %s", sorted(kw))
            max_ctx = self.max_length - max_gen
            if max_ctx < 1:
                raise ValueError(f"generate_until: max_gen_toks={max_gen} leaves no room for a "
                                 f"prompt in the model window ({self.max_length})")
            ctxs = {i: self.tok_encode(requests[i].args[0], left_truncate_len=max_ctx) or
                    [self.eot_token_id] for i in idxs}
            order = sorted(idxs, key=lambda i: -len(ctxs[i]))
            for b in range(0, len(order), self.batch_size):
                batch = order[b: b + self.batch_size]
                texts = self._generate_batch([ctxs[i] for i in batch], max_gen, until,
                                             temperature, top_k, top_p, seed, generate_arrays)
                for i, text in zip(batch, texts):
                    text = postprocess_generated_text(text, until, None)
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(batch))
        bar.close()
        return results  # type: ignore[return-value]

    def _generate_batch(self, prompts, max_gen, until, temperature, top_k, top_p, seed,
                        generate_arrays) -> list[str]:
        B = len(prompts)
        toks: list[list[int]] = [[] for _ in range(B)]
        stops = [s for s in until if s]

        finished = np.zeros(B, bool)  # rows that ended before the current step

        def on_step(step_toks, done):
            halt = np.zeros(B, bool)
            for r in np.nonzero(~finished)[0]:
                toks[r].append(int(step_toks[r]))
                text = self.tok_decode(toks[r])
                halt[r] = any(s in text for s in stops)
            finished[:] = finished | done | halt
            return halt

        out = generate_arrays(self._model, prompts, max_gen, temperature=temperature,
                              top_k=top_k, top_p=top_p, seed=seed,
                              eos_token_id=self.eot_token_id,
                              callback=on_step if stops else None)
        return [self.tok_decode(row) for row in out.to_lists()]


register()


def main(argv: list[str] | None = None) -> None:
    """`python -m pythia_jax.lm_eval_adapter ARGS`: lm-eval's CLI with `pythia_jax` registered."""
    import sys

    register()
    from lm_eval.__main__ import cli_evaluate
    if argv is not None:
        sys.argv = [sys.argv[0]] + list(argv)
    cli_evaluate()


if __name__ == "__main__":
    main()
