"""Where one layer's training time goes, by libtpu's cost model (a deviceless TPU compile).

Compiles loss + gradients of one microbatch on one chip for 1 and 2 unrolled layers (as
`scripts/aot_report.py` does for its cycles column) and prints, for the 2-layer module minus the
1-layer one (= one layer's forward and backward), the summed `estimated_cycles` per kind of op
(the fusion's kind and its first fused op, custom calls by target, Pallas kernels priced at the
roofline of their `pl.CostEstimate` as in `pythia_jax.aot.hlo_costs`). Estimates from the
compiler's cost model, not timings.

    ALLOW_MULTIPLE_LIBTPU_LOAD=1 JAX_PLATFORMS=cpu python bench/layer_cycles.py \
        --model=pythia-70m --microbatch=16 --topology=v5e:2x2 [--set=model.FIELD=VALUE ...]
"""

from __future__ import annotations

import argparse
import collections
import re

from pythia_jax import aot

_NAME = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*")


def _opcode(line: str) -> str | None:
    """The opcode of an HLO instruction line (its result type may be a tuple with spaces)."""
    m = _NAME.match(line)
    if not m:
        return None
    rest = line[m.end():]
    if rest.startswith("("):  # tuple type: skip to its matching parenthesis
        depth = 0
        for i, ch in enumerate(rest):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                rest = rest[i + 1:]
                break
    else:
        rest = rest.split(" ", 1)[1] if " " in rest else ""
    op = re.match(r"\s*([\w\-]+)\(", rest)
    return op.group(1) if op else None


def _kind(line: str, comps: dict) -> str:
    opcode = _opcode(line)
    if opcode is None:
        return "?"
    if opcode == "fusion":
        kind = re.search(r"kind=(\w+)", line)
        called = re.search(r"calls=%?([\w.\-]+)", line)
        first = "?"
        if called and called.group(1) in comps:
            body = [_opcode(x) for x in comps[called.group(1)]]
            ops = [b for b in body if b and b not in ("parameter", "constant", "bitcast",
                                                      "tuple", "get-tuple-element")]
            # the op that names the fusion: a dot/convolution if any, else the root's
            heavy = [o for o in ops if o in ("convolution", "dot", "reduce", "transpose",
                                             "copy", "concatenate", "dynamic-update-slice")]
            first = heavy[0] if heavy else (ops[-1] if ops else "?")
        return f"fusion:{kind.group(1) if kind else '?'}:{first}"
    if opcode == "custom-call":
        t = re.search(r'custom_call_target="([^"]+)"', line)
        return f"custom-call:{t.group(1) if t else '?'}"
    return opcode


def _source(line: str) -> str:
    """The jax-level name of an instruction (`op_name` metadata, without the jit/transpose
    wrappers), e.g. `jvp(GPTNeoX)/.../dot_general`."""
    op = re.search(r'op_name="([^"]*)"', line)
    if not op:
        return "?"
    parts = [p for p in op.group(1).split("/") if not p.startswith("jit(")]
    return "/".join(parts[-3:])


#: op kind -> count of the instructions libtpu gave no cycle estimate (left out of the sums)
UNCYCLED: collections.Counter = collections.Counter()


def breakdown(compiled, chip: str, by: str = "kind") -> collections.Counter:
    text = aot._hlo_text(compiled)
    comps, entry = aot.parse_hlo(text)
    mult, _, _ = aot._multipliers(comps, entry)
    c = aot.CHIPS[chip]
    clock = aot.CLOCK_GHZ[chip] * 1e9
    out = collections.Counter()
    for name, lines in comps.items():
        m = mult.get(name, 0)
        if not m:
            continue
        for line in lines:
            # libtpu's "no estimate" marker (INT64_MAX, v5p's gather_offload fusions) is left
            # out, as `aot.hlo_costs` does, so the totals are not 1e13 ms
            found = [int(v) for v in re.findall(r'"estimated_cycles":"(\d+)"', line)]
            cyc = sum(v for v in found if v < aot._NO_CYCLES)
            if any(v >= aot._NO_CYCLES for v in found):
                UNCYCLED[_kind(line, comps)] += 1
            secs = m * cyc / clock
            if 'custom_call_target="tpu_custom_call"' in line:
                est = re.search(r'"cost_estimate":\{"flops":"(\d+)"[^}]*?"bytes_accessed":'
                                r'"(\d+)"', line)
                op = re.search(r'op_name="([^"]*)"', line)
                kname = [p for p in (op.group(1) if op else "").split("/")
                         if p != "pallas_call"][-1:] or ["?"]
                if est:
                    secs += m * max(int(est.group(1)) / (c.peak_tflops * 1e12),
                                    int(est.group(2)) / (c.hbm_gbps * 1e9))
                out[f"pallas:{kname[0]}"] += secs
                continue
            if cyc:
                key = _kind(line, comps)
                out[key if by == "kind" else f"{key}  {_source(line)}"] += secs
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="pythia-70m")
    p.add_argument("--topology", default="v5e:2x2")
    p.add_argument("--microbatch", type=int, default=16)
    p.add_argument("--seq_len", type=int, default=2048)
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--by", choices=("kind", "source"), default="kind",
                   help="group by op kind, or by kind and the jax op that made it")
    a = p.parse_args()
    chip = aot.chip_of(a.topology)
    devices = aot.topology_devices(a.topology)[:1]
    config = aot.build_config(a.model, mesh={"data": 1}, batch=a.microbatch, seq_len=a.seq_len,
                              overrides=a.set)
    per = {}
    for layers in (1, 2):
        compiled, secs = aot.compile_grads(
            aot._unrolled_config(config, layers=layers, batch=a.microbatch, tensor=1), devices)
        per[layers] = breakdown(compiled, chip, a.by)
        total = sum(per[layers].values())
        print(f"{layers} layer(s): {total * 1e3:.3f} ms estimated (compile {secs:.0f} s)")
    # every key of either module: a source name the 1-layer module has and the 2-layer one
    # lacks (a fusion XLA formed differently) still counts, so the sum is the totals' difference
    layer = collections.Counter({k: per[2].get(k, 0.0) - per[1].get(k, 0.0)
                                 for k in per[1].keys() | per[2].keys()})
    total = sum(layer.values())
    print(f"\none layer (2 - 1), fwd + bwd, microbatch {a.microbatch} x {a.seq_len}: "
          f"{total * 1e3:.3f} ms")
    for k, v in layer.most_common(a.top):
        print(f"  {v * 1e3:9.3f} ms {100 * v / total:5.1f} %  {k}")
    rest = per[1]
    print(f"\noutside the layers (the 1-layer module minus one layer): "
          f"{(sum(rest.values()) - total) * 1e3:.3f} ms")
    if UNCYCLED:
        print("ops libtpu gave no cycle estimate in the two modules, left out (the figures "
              "are lower bounds): "
              + ", ".join(f"{k} x{n}" for k, n in sorted(UNCYCLED.items())))


if __name__ == "__main__":
    main()
