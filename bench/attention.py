"""Attention kernels at Pythia shapes: ours (pallas), splash, cudnn and xla.

    python bench/attention.py                       # whatever accelerator JAX sees
    python bench/attention.py --chips v5e,v5p       # on CPU: deviceless TPU compile report

On a TPU or GPU it times forward and forward+backward (bf16, causal, batch x heads x 2048 x
head_dim with each head_dim's Pythia head count) and reports TFLOP/s. FLOPs count the causal
half only: forward 2 matmuls = 4*B*N*T*T*H/2, forward+backward 7 matmuls = 3.5x that (the
FlashAttention convention; our backward recomputes the scores once more, which is not counted).
On TPU it also says whether `auto` should prefer splash (see
`pythia_jax.attention.AUTO_TPU_PREFERENCE`).

On CPU there is nothing to time: it compiles every TPU kernel for each chip in `--chips` with
libtpu (no TPU needed) and reports the compiler's results: scoped VMEM per Mosaic kernel, HBM
temp, the compiler's time estimate where it gives one (XLA ops; none for Mosaic custom calls),
the summed estimated cycles of the XLA ops around the kernels, and a roofline floor derived
from FLOPs/bytes and the chip's peak (ours, not the compiler's).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from pythia_jax.attention import attend  # noqa: E402
from pythia_jax.attention.tpu_compile import PYTHIA_SHAPES, compile_report  # noqa: E402

IMPLS_BY_BACKEND = {"tpu": ("pallas", "pallas+rope", "splash", "xla"),
                    "gpu": ("cudnn", "xla"),
                    "cpu": ("pallas", "pallas+rope", "splash", "xla")}


def causal_flops(B, N, T, H, backward):
    fwd = 4 * B * N * T * T * H / 2
    return fwd * (3.5 if backward else 1.0)


def _fn(impl, rotary_tables):
    base = impl.split("+")[0]
    rope = impl.endswith("+rope")

    def fwd(q, k, v):
        return attend(q, k, v, impl=base, causal=True, rotary=rotary_tables if rope else None)

    def fwd_bwd(q, k, v, do):
        o, vjp = jax.vjp(fwd, q, k, v)
        return vjp(do)
    return jax.jit(fwd), jax.jit(fwd_bwd)


def _time(f, args, iters):
    out = f(*args)
    jax.block_until_ready(out)  # compile + warm up
    jax.block_until_ready(f(*args))
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def run_timing(impls, head_dims, B, T, iters, dtype=jnp.bfloat16):
    from pythia_jax.layers import rotary_tables
    rows = []
    for H in head_dims:
        model, N = PYTHIA_SHAPES[H]
        ks = jax.random.split(jax.random.PRNGKey(0), 4)
        q, k, v, do = (jax.random.normal(kk, (B, T, N, H), jnp.float32).astype(dtype) for kk in ks)
        pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        tables = rotary_tables(pos, H // 4, 10000.0)
        for impl in impls:
            fwd, fwd_bwd = _fn(impl, tables)
            row = {"impl": impl, "H": H, "model": model, "shape": [B, N, T, H]}
            for name, f, args, bwd in (("fwd", fwd, (q, k, v), False),
                                       ("fwd+bwd", fwd_bwd, (q, k, v, do), True)):
                try:
                    s = _time(f, args, iters)
                    row[name + "_ms"] = s * 1e3
                    row[name + "_tflops"] = causal_flops(B, N, T, H, bwd) / s / 1e12
                except Exception as e:  # noqa: BLE001  - an impl the device cannot run
                    row[name + "_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def timing_table(rows, device):
    out = [f"Device: {device}", "",
           "| impl | head_dim (model) | B x N x T | fwd ms | fwd TFLOP/s | fwd+bwd ms | "
           "fwd+bwd TFLOP/s |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        B, N, T, H = r["shape"]

        def cell(k):
            if k + "_ms" in r:
                return f"{r[k + '_ms']:.3f}", f"{r[k + '_tflops']:.1f}"
            return "n/a", r.get(k + "_error", "")[:40]
        f_ms, f_tf = cell("fwd")
        b_ms, b_tf = cell("fwd+bwd")
        out.append(f"| {r['impl']} | {H} ({r['model']}) | {B}x{N}x{T} | {f_ms} | {f_tf} | {b_ms} "
                   f"| {b_tf} |")
    return "\n".join(out)


def auto_recommendation(rows):
    """On TPU: does splash beat ours (fwd+bwd time, summed over head dims)?"""
    tot = {}
    for r in rows:
        if "fwd+bwd_ms" in r and r["impl"] in ("pallas", "splash"):
            tot[r["impl"]] = tot.get(r["impl"], 0.0) + r["fwd+bwd_ms"]
    if len(tot) < 2:
        return "auto: not enough results to compare pallas and splash"
    kind = jax.devices()[0].device_kind
    if tot["splash"] < tot["pallas"]:
        return (f"auto: splash wins on {kind!r} ({tot['splash']:.2f} ms vs {tot['pallas']:.2f} ms "
                f"summed fwd+bwd); add {{{kind!r}: 'splash'}} to AUTO_TPU_PREFERENCE")
    return (f"auto: ours wins on {kind!r} ({tot['pallas']:.2f} ms vs {tot['splash']:.2f} ms "
            f"summed fwd+bwd); keep 'pallas'")


def run_compile(chips, impls, head_dims, B, T):
    rows = []
    for chip in chips:
        for H in head_dims:
            model, N = PYTHIA_SHAPES[H]
            for impl in impls:
                base = impl.split("+")[0]
                if base == "cudnn":
                    continue
                for bwd in (False, True):
                    rep = compile_report(chip, base, B, N, T, H, rotary=impl.endswith("+rope"),
                                         backward=bwd)
                    row = {"chip": chip, "impl": impl, "H": H, "model": model,
                           "shape": [B, N, T, H], "pass": "fwd+bwd" if bwd else "fwd",
                           "ok": rep.ok, "error": (rep.error or "")[:200] or None,
                           "kernel_vmem": rep.vmem_bytes, "max_vmem": rep.max_vmem,
                           "temp_bytes": rep.temp_bytes, "xla_seconds": rep.xla_seconds,
                           "glue_cycles": rep.xla_glue_cycles,
                           # From the program's own FLOPs/bytes (our kernels declare a
                           # pl.CostEstimate; splash declares none, so it has no floor).
                           "roofline_s": None if base == "splash" else rep.roofline_seconds(),
                           "compile_s": rep.compile_s}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    return rows


def compile_table(rows):
    mib = 1024 * 1024
    out = ["| chip | impl | head_dim (model) | pass | compiles | max kernel VMEM MiB | "
           "HBM temp MiB | compiler est. ms | XLA-op est. cycles | program roofline ms |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if not r["ok"]:
            out.append(f"| {r['chip']} | {r['impl']} | {r['H']} ({r['model']}) | {r['pass']} | "
                       f"NO: {r['error'][:60]} | | | | | |")
            continue
        vm = f"{r['max_vmem'] / mib:.2f}" if r["kernel_vmem"] else "-"
        est = f"{r['xla_seconds'] * 1e3:.2f}" if r["xla_seconds"] else "none (Mosaic)"
        roof = f"{r['roofline_s'] * 1e3:.2f}" if r["roofline_s"] else "n/a"
        out.append(f"| {r['chip']} | {r['impl']} | {r['H']} ({r['model']}) | {r['pass']} | yes | "
                   f"{vm} | {r['temp_bytes'] / mib:.0f} | {est} | {r['glue_cycles']:,} | "
                   f"{roof} |")
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--impls", default=None, help="comma list (default: all for the backend)")
    p.add_argument("--head-dims", default="64,80,128,256")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--chips", default="v5e,v5p", help="CPU mode: TPU chips to compile for")
    p.add_argument("--time-on-cpu", action="store_true",
                   help="smoke-test the timing path on CPU (interpret mode; tiny shapes)")
    p.add_argument("--json", default=None, help="write the raw rows here")
    p.add_argument("--table-from", default=None, help="only re-render the table of a --json file")
    a = p.parse_args(argv)
    if a.table_from:
        with open(a.table_from) as f:
            rows = json.load(f)
        print(compile_table(rows) if rows and "chip" in rows[0] else
              timing_table(rows, "(from json)"))
        return
    backend = jax.default_backend()
    backend = "gpu" if backend in ("cuda", "rocm") else backend
    impls = tuple(a.impls.split(",")) if a.impls else IMPLS_BY_BACKEND.get(backend, ("xla",))
    head_dims = [int(h) for h in a.head_dims.split(",")]
    if backend in ("tpu", "gpu") or a.time_on_cpu:
        device = jax.devices()[0].device_kind
        rows = run_timing(impls, head_dims, a.batch, a.seq, a.iters)
        print()
        print(timing_table(rows, device))
        if backend == "tpu":
            print()
            print(auto_recommendation(rows))
    else:
        print(f"backend {backend!r}: no accelerator; deviceless TPU compile for {a.chips}",
              flush=True)
        rows = run_compile(a.chips.split(","), impls, head_dims, a.batch, a.seq)
        print()
        print(compile_table(rows))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
