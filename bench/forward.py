"""Forward logits, pythia-160m shape, fp32 CPU: pythia-jax vs transformers, with the matmul bound.

    JAX_PLATFORMS=cpu .venv/bin/python bench/forward.py [--shapes=1x512,8x128] [--repeats=7]

Same random weights on both sides (our model saved with `save_pretrained`, loaded by
`GPTNeoXForCausalLM.from_pretrained`). Ours is `pythia_jax.forward(model, ids)`, one jitted
call returning [B, T, V] float32 logits; HF's is `model(ids).logits` under
`torch.inference_mode()`. Trials alternate ours/HF so load from other processes hits both alike; we report the best and the median.
The bound: the best GFLOP/s of a plain 4096^3 fp32 matmul (jax and torch, both measured in
this run). FLOPs per forward = `ModelConfig.flops_per_token(T)["forward"] * B * T`
(2 x weight matmuls incl. the output layer, plus QK^T and PV without the causal discount).
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


def _timeit(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def measure_matmul_gflops(n: int = 4096, repeats: int = 3) -> dict:
    """GFLOP/s of a plain fp32 n^3 matmul in jax and in torch (best of `repeats`)."""
    import jax
    import jax.numpy as jnp
    import torch
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n), np.float32))
    b = jnp.asarray(np.random.default_rng(1).standard_normal((n, n), np.float32))
    f = jax.jit(lambda x, y: x @ y)
    f(a, b).block_until_ready()
    tj = min(_timeit(lambda: f(a, b).block_until_ready(), repeats))
    ta_, tb_ = torch.from_numpy(np.array(a)), torch.from_numpy(np.array(b))
    ta_ @ tb_
    tt = min(_timeit(lambda: ta_ @ tb_, repeats))
    fl = 2 * n ** 3
    return {"jax": fl / tj / 1e9, "torch": fl / tt / 1e9, "best": fl / min(tj, tt) / 1e9}


def measure_read_gbps(nbytes: int = 1 << 30, repeats: int = 5) -> dict:
    """GB/s of reading a large float32 array (a sum) in jax, numpy and torch (best of each)."""
    import jax
    import jax.numpy as jnp
    import torch
    x = np.ones(nbytes // 4, np.float32)
    tn = min(_timeit(lambda: x.sum(), repeats))
    xt = torch.from_numpy(x)
    tt = min(_timeit(lambda: xt.sum(), repeats))
    xj = jnp.asarray(x)
    g = jax.jit(jnp.sum)
    g(xj).block_until_ready()
    tj = min(_timeit(lambda: g(xj).block_until_ready(), repeats))
    r = {"numpy": nbytes / tn / 1e9, "torch": nbytes / tt / 1e9, "jax": nbytes / tj / 1e9}
    r["best"] = max(r.values())
    return r


def machine_info() -> dict:
    import jax
    import torch
    return {"cpus": os.cpu_count(), "load_avg": os.getloadavg(), "jax": jax.__version__,
            "torch": torch.__version__, "torch_threads": torch.get_num_threads()}


def build_pair(preset: str, tmp: str):
    """Our random-weight model and transformers' model loaded from its export."""
    import torch
    from flax import nnx
    from transformers import GPTNeoXForCausalLM

    import pythia_jax
    from pythia_jax.config import get_preset
    from pythia_jax.model import GPTNeoX
    cfg = get_preset(preset)
    ours = GPTNeoX(cfg, rngs=nnx.Rngs(0))
    d = os.path.join(tmp, preset)
    pythia_jax.save_pretrained(ours, d, tokenizer=False)
    hf = GPTNeoXForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    return ours, hf, d


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="pythia-160m")
    ap.add_argument("--shapes", default="1x512,8x128")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)

    import torch

    import pythia_jax

    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    info = machine_info()
    bound = measure_matmul_gflops()
    print(f"machine: {info}")
    print(f"matmul bound 4096^3 fp32: jax {bound['jax']:.1f}, torch {bound['torch']:.1f} GFLOP/s")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ours, hf, _ = build_pair(args.preset, tmp)
        cfg = ours.config
        fwd = pythia_jax.forward  # the public jitted forward: model(ids), compiled once per shape

        for B, T in shapes:
            ids = np.random.default_rng(B * 1000 + T).integers(0, 50000, (B, T), dtype=np.int32)
            tids = torch.from_numpy(ids.astype(np.int64))
            logits = np.asarray(fwd(ours, ids))  # compile + warm up
            with torch.inference_mode():
                ref = hf(tids).logits.numpy()
            diff = float(np.abs(logits - ref).max())
            flops = cfg.flops_per_token(T)["forward"] * B * T
            # rounds: bound, ours, HF back to back, so each round sees the same machine load
            t_ours, t_hf, bounds = [], [], []
            for _ in range(args.repeats):
                bounds.append(measure_matmul_gflops(repeats=1)["best"])
                t_ours += _timeit(lambda: fwd(ours, ids).block_until_ready(), 1)
                with torch.inference_mode():
                    t_hf += _timeit(lambda: hf(tids).logits, 1)
            ours_g = [flops / t / 1e9 for t in t_ours]
            hf_g = [flops / t / 1e9 for t in t_hf]
            med = statistics.median
            row = {"shape": f"{B}x{T}", "gflop": flops / 1e9,
                   "ours_best_s": min(t_ours), "ours_median_s": med(t_ours),
                   "hf_best_s": min(t_hf), "hf_median_s": med(t_hf),
                   "bound_best_gflops": max(bounds), "bound_median_gflops": med(bounds),
                   "ours_gflops_best": max(ours_g), "hf_gflops_best": max(hf_g),
                   "speedup_median_of_rounds": med([h / o for o, h in zip(t_ours, t_hf)]),
                   "speedup_best": min(t_hf) / min(t_ours),
                   "ours_frac_of_bound_median": med([g / b for g, b in zip(ours_g, bounds)]),
                   "hf_frac_of_bound_median": med([g / b for g, b in zip(hf_g, bounds)]),
                   "ours_frac_best_vs_best": max(ours_g) / max(bounds),
                   "hf_frac_best_vs_best": max(hf_g) / max(bounds),
                   "max_abs_logit_diff": diff}
            rows.append(row)
            print(f"{B}x{T} ({flops / 1e9:.0f} GFLOP): ours best {min(t_ours):.3f}s / median "
                  f"{med(t_ours):.3f}s ({max(ours_g):.1f} GFLOP/s) | HF best {min(t_hf):.3f}s / "
                  f"median {med(t_hf):.3f}s ({max(hf_g):.1f} GFLOP/s) | bound best "
                  f"{max(bounds):.1f} median {med(bounds):.1f} GFLOP/s | ours/HF speed: median of "
                  f"rounds {row['speedup_median_of_rounds']:.2f}x, best/best "
                  f"{row['speedup_best']:.2f}x | fraction of bound (median of rounds): ours "
                  f"{100 * row['ours_frac_of_bound_median']:.0f}%, HF "
                  f"{100 * row['hf_frac_of_bound_median']:.0f}%; best/best: ours "
                  f"{100 * row['ours_frac_best_vs_best']:.0f}%, HF "
                  f"{100 * row['hf_frac_best_vs_best']:.0f}% | max |logit diff| {diff:.1e}")
    bound_after = measure_matmul_gflops()
    print(f"matmul bound again after the runs: jax {bound_after['jax']:.1f}, torch "
          f"{bound_after['torch']:.1f} GFLOP/s; load avg {os.getloadavg()}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"machine": info, "bound": bound, "bound_after": bound_after,
                       "rows": rows}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
