"""Memorization throughput (rows/s): pythia_jax.research.memorization vs transformers'
`generate` as the Pythia paper's `predictable-memorization/eval_memorization.py` runs it.

    JAX_PLATFORMS=cpu python bench/memorization.py [--preset=pythia-70m] [--rows=16] \
        [--batch=16] [--repeats=3]

Random weights of the preset's shape (ours saved with `save_pretrained`, loaded by
`GPTNeoXForCausalLM`), random rows of 64 tokens. The paper's call: the model loaded with
`use_cache=False`, `generate(prompt[:, :32], max_length=64, min_length=64)` greedy, score =
matches of the 32 new tokens with tokens[32:64]. Ours additionally computes the teacher-forced
log-probability of the true continuation. Also reported: HF with its KV cache (`use_cache=True`,
not how the paper ran it). Same process, rounds alternate ours / HF (paper) / HF (cache), after
one warm-up call each (our compile); the token agreement is reported. Median seconds per round.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from forward import build_pair, machine_info  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="pythia-70m")
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import torch

    import pythia_jax
    from pythia_jax.research import memorization as mem

    with tempfile.TemporaryDirectory() as tmp:
        _, hf, d = build_pair(args.preset, tmp)
        ours = pythia_jax.from_pretrained(d)
    V = ours.config.vocab_size
    windows = np.random.default_rng(0).integers(2, 50277, (args.rows, 64)) % V
    prompts = torch.as_tensor(windows[:, :32])

    def run_ours():
        gen, _ = mem.memorize_tokens(ours, windows, batch_size=args.batch)
        return gen

    def run_hf(use_cache):
        hf.config.use_cache = use_cache
        outs = []
        with torch.no_grad():
            for a in range(0, args.rows, args.batch):
                g = hf.generate(prompts[a: a + args.batch], do_sample=False, max_length=64,
                                min_length=64, pad_token_id=1, use_cache=use_cache)
                outs.append(g[:, 32:64].numpy())
        return np.concatenate(outs)

    cases = {"ours": run_ours, "hf_paper_no_cache": lambda: run_hf(False),
             "hf_kv_cache": lambda: run_hf(True)}
    outs = {k: f() for k, f in cases.items()}  # warm-up (our compile)
    times = {k: [] for k in cases}
    for _ in range(args.repeats):
        for k, f in cases.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    res = {
        "preset": args.preset, "rows": args.rows, "batch": args.batch, "repeats": args.repeats,
        "machine": machine_info(),
        "seconds_median": med,
        "rows_per_s": {k: args.rows / v for k, v in med.items()},
        "speedup_vs_paper_hf": med["hf_paper_no_cache"] / med["ours"],
        "speedup_vs_hf_kv_cache": med["hf_kv_cache"] / med["ours"],
        "token_agreement_vs_hf": float(np.mean(outs["ours"] == outs["hf_paper_no_cache"])),
    }
    text = json.dumps(res, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as fh:
            fh.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
