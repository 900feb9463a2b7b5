"""Greedy generation, pythia-160m shape, fp32 CPU: pythia_jax.generate vs transformers' generate.

    JAX_PLATFORMS=cpu .venv/bin/python bench/generate.py [--batches=1,8] [--prompt_len=32] \
        [--new_tokens=128] [--repeats=3]

Random weights (ours saved with `save_pretrained`, loaded by `GPTNeoXForCausalLM`), random
prompt ids, exactly `new_tokens` tokens per sequence (ours: no EOS; HF: `min_new_tokens` so
that it cannot stop early; the token agreement is reported). Timed: the whole call, prompt
prefill included, after one warm-up call (our compile). Rounds alternate bound / ours / HF.

The bound for decoding is the weight read: each decode step reads every parameter except the
input embedding (a gather) plus the KV cache; at the measured memory read rate (the best GB/s
of a large array sum, measured in each round) that gives a floor on the time per step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from forward import _timeit, build_pair, machine_info, measure_read_gbps  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="pythia-160m")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--prompt_len", type=int, default=32)
    ap.add_argument("--new_tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--hf_threads", default="",
                    help="also time HF with these torch thread counts, e.g. '1' (default: "
                         "torch's default only)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import torch

    from pythia_jax.generation import bucket_length, generate_arrays

    info = machine_info()
    print(f"machine: {info}")
    rows = []
    med = statistics.median
    with tempfile.TemporaryDirectory() as tmp:
        ours, hf, _ = build_pair(args.preset, tmp)
        cfg = ours.config
        P, N = args.prompt_len, args.new_tokens
        weight_bytes = 4 * (cfg.param_counts()["total"] - cfg.vocab_size * cfg.hidden_size)
        for B in [int(b) for b in args.batches.split(",")]:
            ids = np.random.default_rng(B).integers(2, 50000, (B, P), dtype=np.int32)
            tids = torch.from_numpy(ids.astype(np.int64))
            mask = torch.ones_like(tids)

            def run_ours():
                return generate_arrays(ours, ids, N)

            def run_hf():
                with torch.inference_mode():
                    return hf.generate(tids, attention_mask=mask, max_new_tokens=N,
                                       min_new_tokens=N, do_sample=False, pad_token_id=1)

            a = run_ours().tokens  # warm-up: compiles prefill + decode loop
            b = run_hf()[:, P:].numpy()
            agree = float((a == b).mean())
            # per decode step our loop reads the weights and the whole preallocated cache
            S = bucket_length(P) + bucket_length(N, minimum=8)
            cache_bytes = 2 * 4 * cfg.num_layers * B * S * cfg.hidden_size
            step_bytes = weight_bytes + cache_bytes
            t_ours, t_hf, gbps = [], [], []
            extra = {int(n): [] for n in args.hf_threads.split(",") if n}
            default_threads = torch.get_num_threads()
            for _ in range(args.repeats):
                gbps.append(measure_read_gbps(nbytes=512 << 20, repeats=2)["best"])
                t_ours += _timeit(run_ours, 1)
                t_hf += _timeit(run_hf, 1)
                for n, ts in extra.items():
                    torch.set_num_threads(n)
                    ts += _timeit(run_hf, 1)
                    torch.set_num_threads(default_threads)
            floor = [N * step_bytes / (g * 1e9) for g in gbps]  # s, weight-read floor
            row = {"batch": B, "prompt": P, "new_tokens": N, "token_agreement": agree,
                   "ours_best_s": min(t_ours), "ours_median_s": med(t_ours),
                   "hf_best_s": min(t_hf), "hf_median_s": med(t_hf),
                   "ours_tok_s": B * N / min(t_ours), "hf_tok_s": B * N / min(t_hf),
                   "speedup_median_of_rounds": med([h / o for o, h in zip(t_ours, t_hf)]),
                   "speedup_best": min(t_hf) / min(t_ours),
                   "read_gbps_best": max(gbps), "read_gbps_median": med(gbps),
                   "bytes_per_step": step_bytes,
                   "ours_frac_of_read_bound_median": med([f / t for f, t in zip(floor, t_ours)]),
                   "hf_frac_of_read_bound_median": med([f / t for f, t in zip(floor, t_hf)]),
                   "ours_effective_gbps_best": N * step_bytes / min(t_ours) / 1e9,
                   "hf_effective_gbps_best": N * step_bytes / min(t_hf) / 1e9}
            for n, ts in extra.items():
                row[f"hf_{n}thread_best_s"] = min(ts)
                row[f"hf_{n}thread_median_s"] = med(ts)
                row[f"speedup_vs_hf_{n}thread_best"] = min(ts) / min(t_ours)
                print(f"batch {B}: HF with {n} torch thread(s): best {min(ts):.2f}s / median "
                      f"{med(ts):.2f}s -> ours/HF best/best {min(ts) / min(t_ours):.2f}x")
            rows.append(row)
            print(f"batch {B}: ours best {min(t_ours):.2f}s / median {med(t_ours):.2f}s "
                  f"({row['ours_tok_s']:.1f} tok/s, {1e3 * min(t_ours) / N:.1f} ms/step) | HF best "
                  f"{min(t_hf):.2f}s / median {med(t_hf):.2f}s ({row['hf_tok_s']:.1f} tok/s) | "
                  f"ours/HF speed: median of rounds {row['speedup_median_of_rounds']:.2f}x, "
                  f"best/best {row['speedup_best']:.2f}x | read bound {max(gbps):.1f} GB/s best, "
                  f"{step_bytes / 1e6:.0f} MB/step -> weight-read fraction (median of rounds) "
                  f"ours {100 * row['ours_frac_of_read_bound_median']:.0f}%, HF "
                  f"{100 * row['hf_frac_of_read_bound_median']:.0f}% | token agreement "
                  f"{100 * agree:.1f}%")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"machine": info, "rows": rows}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
