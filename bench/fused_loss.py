"""The output layer + cross-entropy, plain XLA vs the fused Pallas kernel: TPU compiler estimates.

    ALLOW_MULTIPLE_LIBTPU_LOAD=1 JAX_PLATFORMS=cpu nice -n 10 /work/venv/bin/python \
        bench/fused_loss.py [--sizes=70m,160m,410m] [--tokens=32768] [--topology=v5e:2x2] \
        [--blocks=512x512,1024x512]

For each Pythia size (D = hidden size, V = 50304, bf16 compute as in training) this compiles,
deviceless for one chip of the topology (libtpu, no TPU), the loss of one microbatch and its
gradients with respect to the final hidden states h [16, 2048, D] and the output embedding
E [V, D] (fp32, cast to bf16 as the model does), both ways:

* plain: `train.cross_entropy(einsum("btd,vd->btv", h, E.astype(bf16),
  preferred_element_type=f32), targets)`: what `model(inputs)` + the loss compute today;
* fused: `fused_loss.fused_cross_entropy(h, E.astype(bf16), targets)` (default blocks, or each of
  `--blocks`), with dhidden computed in the forward kernel (the default, `dh_in_forward=True`);
  marked "recompute": by the separate dhidden kernel of the backward; marked "store": with
  `store_probs=True` (the forward writes bf16 probabilities that the dembed kernel reads).

Printed per variant: FLOPs and bytes from `cost_analysis()`, the compiler's estimated time two
ways (`pythia_jax.aot.cost_of`): *roofline* = XLA's `optimal_seconds` (per op max(FLOPs / peak,
bytes / HBM bandwidth); our Pallas calls are priced from their `pl.CostEstimate`, i.e. at 100 % of
MXU peak or of HBM bandwidth), *cycles* = libtpu's `estimated_cycles` of every XLA op summed at
the chip clock plus each Pallas call at its CostEstimate roofline; the HBM temporaries
(`memory_analysis()`), the VMEM each Mosaic kernel was given, and fused / plain ratios. These
are compiler cost-model estimates, not timings: the Pallas calls are priced at their declared
roofline, so the cycles figure favours the kernel; the roofline figure prices both sides at
their roofline.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from pythia_jax import aot, fused_loss, train  # noqa: E402
from pythia_jax.attention.target import target_platform  # noqa: E402
from pythia_jax.attention.tpu_compile import _kernel_vmem, topology_desc  # noqa: E402
from pythia_jax.config import get_preset  # noqa: E402

SEQ = 2048


def _compile(fn, args):
    with target_platform("tpu"):
        return jax.jit(jax.value_and_grad(fn, argnums=(0, 1))).lower(*args).compile()


#: variant tag -> fused_cross_entropy options ("": the defaults)
OPTIONS = {"": {}, "recompute": {"dh_in_forward": False}, "store": {"store_probs": True}}


def measure(size: str, tokens: int, topology: str, blocks=(None,),
            options=tuple(OPTIONS)) -> dict:
    preset = get_preset(size)
    D, V = preset.hidden_size, preset.vocab_size
    chip = topology.split(":")[0]
    dev = topology_desc(topology).devices[0]
    sh = jax.sharding.SingleDeviceSharding(dev)
    B = tokens // SEQ
    h = jax.ShapeDtypeStruct((B, SEQ, D), jnp.bfloat16, sharding=sh)
    e = jax.ShapeDtypeStruct((V, D), jnp.float32, sharding=sh)
    t = jax.ShapeDtypeStruct((B, SEQ), jnp.int32, sharding=sh)

    def plain(h, e, t):
        logits = jnp.einsum("btd,vd->btv", h, e.astype(jnp.bfloat16),
                            preferred_element_type=jnp.float32)
        return train.cross_entropy(logits, t)

    variants = {"plain": plain}
    for blk in blocks:
        bt, bv = blk or fused_loss.default_blocks(tokens, V, D, jnp.bfloat16)
        for tag in options:
            variants[f"fused {bt}x{bv}" + (f" {tag}" if tag else "")] = (
                lambda h, e, t, bt=bt, bv=bv, kw=OPTIONS[tag]: fused_loss.fused_cross_entropy(
                    h, e.astype(jnp.bfloat16), t, block_t=bt, block_v=bv, **kw))
    out = {"size": size, "D": D, "V": V, "tokens": tokens, "topology": topology, "variants": {}}
    for name, fn in variants.items():
        compiled = _compile(fn, (h, e, t))
        c = aot.cost_of(compiled, chip)
        text = aot._hlo_text(compiled)  # None where jaxlib cannot read libtpu's HLO (v6e, v5p)
        mem = compiled.memory_analysis()
        out["variants"][name] = {
            "flops": c["flops"], "bytes": c["bytes"], "roofline_s": c["seconds"],
            "cycles_s": c["cycle_seconds"], "kernel_s": c.get("kernel_seconds"),
            "temp_gib": mem.temp_size_in_bytes / 2**30,
            "vmem_mib": {k: v / 2**20 for k, v in _kernel_vmem(text).items()} if text else {},
            "unpriced_kernels": c.get("unpriced_kernels")}
    base = out["variants"]["plain"]
    for v in out["variants"].values():
        v["roofline_ratio"] = v["roofline_s"] / base["roofline_s"]
        v["cycles_ratio"] = v["cycles_s"] / base["cycles_s"]
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="70m,160m,410m")
    p.add_argument("--tokens", type=int, default=16 * SEQ, help="tokens per microbatch")
    p.add_argument("--topology", default="v5e:2x2")
    p.add_argument("--blocks", default="", help="BTxBV,... (default: fused_loss.default_blocks)")
    p.add_argument("--variants", default=",".join(OPTIONS),
                   help="fused variants: " + ", ".join(repr(k) for k in OPTIONS))
    p.add_argument("--json", default="", help="also write the results to this file")
    a = p.parse_args(argv)
    blocks = [tuple(int(x) for x in b.split("x")) for b in a.blocks.split(",") if b] or [None]
    results = []
    for size in a.sizes.split(","):
        r = measure(size, a.tokens, a.topology, blocks, tuple(a.variants.split(",")))
        results.append(r)
        print(f"pythia-{size}: {r['tokens']} tokens x D={r['D']} x V={r['V']}, bf16, loss + "
              f"grads (h, E), one {a.topology} chip")
        for name, v in r["variants"].items():
            vm = ", ".join(f"{k.split('.')[0]} {m:.1f}" for k, m in sorted(v["vmem_mib"].items()))
            print(f"  {name:24s} roofline {v['roofline_s'] * 1e3:8.2f} ms "
                  f"(x{v['roofline_ratio']:.3f})  cycles {v['cycles_s'] * 1e3:8.2f} ms "
                  f"(x{v['cycles_ratio']:.3f})"
                  f"  {v['flops'] / 1e12:6.2f} TFLOP  {v['bytes'] / 1e9:6.2f} GB"
                  f"  HBM temp {v['temp_gib']:.2f} GiB" + (f"  VMEM MiB: {vm}" if vm else ""))
        sys.stdout.flush()
    if a.json:
        pathlib.Path(a.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
