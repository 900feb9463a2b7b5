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

HF's float16 parameters are views of the memory-mapped file (the script counts how many lie
inside the file's mapping), so its load moves no bytes: they are read on first use. The
second figure of each pairing, "load + read", therefore times the load followed by one pass
over every parameter's bytes on both sides (an integer max of the bits: torch's
`p.view(int).max()`, numpy's on our host arrays), which is the cost up to the first use of the
weights.
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
    import numpy as np
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

    # one pass over every parameter's bytes: an integer max of the bits, by numpy on our
    # (host-resident, zero-copy viewed) arrays and by torch on HF's; both vectorized
    ints = {2: (np.int16, torch.int16), 4: (np.int32, torch.int32)}

    def then_read(load, side):
        def f():
            m = load()
            if side == "ours":
                for x in jax.tree.leaves(nnx.state(m)):
                    a = np.asarray(x)
                    a.view(ints[a.itemsize][0]).max()
            else:
                with torch.no_grad():
                    [p.view(ints[p.element_size()][1]).max() for p in m.parameters()]
            return m
        return f

    def in_file_mapping(m) -> str:
        spans = []
        with open("/proc/self/maps") as fh:
            for line in fh:
                if line.rstrip().endswith(".safetensors") and args.dir in line:
                    a, b = line.split()[0].split("-")
                    spans.append((int(a, 16), int(b, 16)))
        ps = list(m.parameters())
        n = sum(any(a <= p.data_ptr() < b for a, b in spans) for p in ps)
        return f"{n}/{len(ps)}"

    pairings = [("fp32 both", ours("float32"), theirs(torch.float32)),
                ("fp16 both", ours("float16"), theirs(torch.float16)),
                ("defaults", ours(None), theirs(None))]
    # one untimed pass each: page cache, imports, first-call costs 
    for _, a, b in pairings:
        then_read(a, "ours")(), then_read(b, "hf")()
        gc.collect()
    med = statistics.median
    rows = []
    for name, a, b in pairings:
        ta, tb, gbps, ra, rb = [], [], [], [], []
        for _ in range(args.repeats):
            gbps.append(measure_read_gbps(nbytes=512 << 20, repeats=2)["best"])
            ta += _timeit(a, 1)
            gc.collect()
            tb += _timeit(b, 1)
            gc.collect()
            ra += _timeit(then_read(a, "ours"), 1)
            gc.collect()
            rb += _timeit(then_read(b, "hf"), 1)
            gc.collect()
        row = {"pairing": name, "ours_best_s": min(ta), "ours_median_s": med(ta),
               "hf_best_s": min(tb), "hf_median_s": med(tb),
               "speedup_median_of_rounds": med([y / x for x, y in zip(ta, tb)]),
               "speedup_best": min(tb) / min(ta), "read_bound_s": size / (max(gbps) * 1e9)}
        row.update({"read_ours_best_s": min(ra), "read_ours_median_s": med(ra),
                    "read_hf_best_s": min(rb), "read_hf_median_s": med(rb),
                    "read_speedup_median_of_rounds": med([y / x for x, y in zip(ra, rb)])})
        hf_model = b()
        dt_ours = str(jax.tree.leaves(nnx.state(a()))[0].dtype)
        dt_hf = str(next(hf_model.parameters()).dtype)
        row["dtypes"] = f"ours {dt_ours}, HF {dt_hf}"
        row["hf_params_in_file_mapping"] = in_file_mapping(hf_model)
        del hf_model
        rows.append(row)
        print(f"{name} ({row['dtypes']}): ours best {min(ta):.2f}s / median {med(ta):.2f}s | HF "
              f"best {min(tb):.2f}s / median {med(tb):.2f}s | HF/ours time: median of rounds "
              f"{row['speedup_median_of_rounds']:.2f}x, best/best {row['speedup_best']:.2f}x | "
              f"file read at {max(gbps):.1f} GB/s: {row['read_bound_s']:.2f}s | HF parameters "
              f"inside the file mapping: {row['hf_params_in_file_mapping']}\n"
              f"    load + read every parameter: ours best {min(ra):.2f}s / median {med(ra):.2f}s"
              f" | HF best {min(rb):.2f}s / median {med(rb):.2f}s | HF/ours time: median of "
              f"rounds {row['read_speedup_median_of_rounds']:.2f}x")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"machine": info, "checkpoint_bytes": size, "rows": rows}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
