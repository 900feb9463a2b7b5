"""Loading a pythia-410m-shaped fp16 safetensors checkpoint: from_pretrained vs transformers.

    JAX_PLATFORMS=cpu .venv/bin/python bench/load.py [--repeats=5] [--dir=/tmp/pythia410m_fp16]

The checkpoint (random weights, 811 MB of fp16 safetensors, written once by our
`save_pretrained`) stays in the page cache after the first read, so the figures are warm-cache
load times for both. Three pairings are timed, alternating sides every round:

* fp32 on both sides: `pythia_jax.from_pretrained(d)` (default: upcast to float32) vs
  `GPTNeoXForCausalLM.from_pretrained(d, dtype=torch.float32)`;
* fp16 kept: `from_pretrained(d, dtype="float16")` vs `..., dtype=torch.float16`;
* each library's default call (`from_pretrained(d)` vs `GPTNeoXForCausalLM.from_pretrained(d)`).

"Loaded" means every parameter is materialized (`jax.block_until_ready` on ours).
The bound shown is reading the file's bytes once at the measured memory read rate.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from forward import _timeit, machine_info, measure_read_gbps  # noqa: E402


def make_checkpoint(d: str, preset: str) -> None:
    if os.path.isfile(os.path.join(d, "model.safetensors")):
        return
    import jax
    from flax import nnx

    import pythia_jax
    from pythia_jax.config import get_preset
    from pythia_jax.model import GPTNeoX
    cfg = get_preset(preset, param_dtype="float16")
    with jax.default_device(jax.devices("cpu")[0]):
        m = GPTNeoX(cfg, rngs=nnx.Rngs(0))
    pythia_jax.save_pretrained(m, d, dtype="float16", overwrite=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="pythia-410m")
    ap.add_argument("--dir", default="/tmp/pythia_jax_bench_410m_fp16")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import jax
    import torch
    from flax import nnx
    from transformers import GPTNeoXForCausalLM

    import pythia_jax

    make_checkpoint(args.dir, args.preset)
    size = sum(os.path.getsize(os.path.join(args.dir, f)) for f in os.listdir(args.dir)
               if f.endswith(".safetensors"))
    info = machine_info()
    print(f"machine: {info}\ncheckpoint: {args.dir} ({size / 1e6:.0f} MB fp16 safetensors)")

    def ours(dtype=None):
        def f():
            m = pythia_jax.from_pretrained(args.dir, dtype=dtype)
            jax.block_until_ready(nnx.state(m))
            return m
        return f

    def theirs(dtype=None):
        def f():
            kw = {} if dtype is None else {"dtype": dtype}
            return GPTNeoXForCausalLM.from_pretrained(args.dir, **kw)
        return f

    pairings = [("fp32 both", ours("float32"), theirs(torch.float32)),
                ("fp16 both", ours("float16"), theirs(torch.float16)),
                ("defaults", ours(None), theirs(None))]
    # one untimed pass each: page cache, imports, first-call costs
    for _, a, b in pairings:
        a(), b()
        gc.collect()
    med = statistics.median
    rows = []
    for name, a, b in pairings:
        ta, tb, gbps = [], [], []
        for _ in range(args.repeats):
            gbps.append(measure_read_gbps(nbytes=512 << 20, repeats=2)["best"])
            ta += _timeit(a, 1)
            gc.collect()
            tb += _timeit(b, 1)
            gc.collect()
        row = {"pairing": name, "ours_best_s": min(ta), "ours_median_s": med(ta),
               "hf_best_s": min(tb), "hf_median_s": med(tb),
               "speedup_median_of_rounds": med([y / x for x, y in zip(ta, tb)]),
               "speedup_best": min(tb) / min(ta), "read_bound_s": size / (max(gbps) * 1e9)}
        dt_ours = str(jax.tree.leaves(nnx.state(a()))[0].dtype)
        dt_hf = str(next(b().parameters()).dtype)
        row["dtypes"] = f"ours {dt_ours}, HF {dt_hf}"
        rows.append(row)
        print(f"{name} ({row['dtypes']}): ours best {min(ta):.2f}s / median {med(ta):.2f}s | HF "
              f"best {min(tb):.2f}s / median {med(tb):.2f}s | HF/ours time: median of rounds "
              f"{row['speedup_median_of_rounds']:.2f}x, best/best {row['speedup_best']:.2f}x | "
              f"file read at {max(gbps):.1f} GB/s: {row['read_bound_s']:.2f}s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"machine": info, "checkpoint_bytes": size, "rows": rows}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
