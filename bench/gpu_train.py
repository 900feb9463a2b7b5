"""The training step on one accelerator: variants side by side, and where the step's time goes.

    python bench/gpu_train.py [--sizes=410m,1b] [--batch=16,8]
        [--variants="default;model.remat=none;model.scan_layers=false"] [--profile=3]
        [--experiments=bf16_logits] [--json=FILE]

For each size and variant: `train.make_train_step` on `configs/pythia.py:<size>` (bf16 compute,
fp32 master weights and AdamW state, the config's remat, `auto` attention: cuDNN on a GPU, XLA
on a CPU), one device, no accumulation, `--batch` sequences of `--seq` tokens (default the
config's 2048). A variant is `default` or comma-separated `section.field=value` config
overrides. Reported per variant: the compile time, the compiler's memory analysis (temporaries,
arguments), seconds per step (median of `--steps` steps each waited for, and the mean of
`--steps` steps queued back to back, which is what a training loop sees), tokens/s and MFU with
the model FLOPs of `aot.model_flops_per_token` counted both ways ("causal": attention's
unmasked half, the issue's convention; "palm": attention in full, the convention of the
figures recorded before) against the device's nominal dense bf16 peak.

`--profile=N`: the first variant of each size is traced for N steps (`jax.profiler`) and the
device time of every XLA kernel is summed by the HLO instruction it ran for (the `hlo_op` stat
the profiler attaches); each instruction is classed from the optimized HLO (cuBLAS / Triton
matmul, cuDNN attention, reductions, elementwise fusions, copies and transposes, dynamic
slices) and tied to the source line of our code that made it. Printed: time per class, the top
instructions, the top source lines, and the device-idle share of the traced span.

`--experiments`: loss variants patched over `train.loss_fn` for this run only (a way to try a
change on a lent machine before it goes into the package): `bf16_logits` (the output layer's
matmul writes bf16 logits, as NeoX does, and the cross-entropy is computed in fp32 from them).
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import pathlib
import re
import statistics
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from pythia_jax import aot, train  # noqa: E402
from pythia_jax.configs import pythia as pythia_configs  # noqa: E402

#: Nominal dense bf16 TFLOP/s (no sparsity) by device_kind substring.
PEAK_BF16 = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def _log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_variant(spec: str) -> list[str]:
    """`default` -> []; `model.remat=none,model.scan_layers=false` -> its "a.b=value" items
    (`aot.apply_overrides` sets them)."""
    spec = spec.strip()
    return [] if spec in ("", "default") else [part.strip() for part in spec.split(",")]


def build_config(size: str, batch: int, seq: int | None, overrides: list[str]):
    """`configs/pythia.py:<size>` at `batch` sequences in one microbatch on one device, with
    the variant's overrides (an unknown field or a bad value raises `aot.ReportError`)."""
    c = pythia_configs.get_config(size)
    aot.apply_overrides(c, overrides)
    c.train.batch_size = batch
    c.train.grad_accum_steps = 1
    c.train.microbatch_per_device = 0
    if seq:
        c.train.seq_len = seq
    train.model_config_from(c)  # the model fields' own checks, before any compile
    return c


# ------------------------------------------------------------------------------------------------
# Loss experiments (patched over train.loss_fn; `_grads` looks it up at trace time)
def _bf16_logits_loss(params, graphdef, inputs_BT, targets_BT, fused=False, store_probs=False):
    from flax import nnx
    model = nnx.merge(graphdef, params)
    cdt = jnp.dtype(model.config.dtype)
    hidden = model(inputs_BT, return_hidden=True)
    logits = jnp.einsum("btd,vd->btv", hidden, model.embed_out.embedding[...].astype(cdt))
    return train.cross_entropy(logits, targets_BT)


EXPERIMENTS = {"bf16_logits": _bf16_logits_loss}


# ------------------------------------------------------------------------------------------------
# HLO classes and the profile
def _stack_tables(hlo_text: str) -> dict:
    """{stack_frame_id: (file, function, line, parent id)} from the FileNames / FunctionNames /
    FileLocations / StackFrames tables at the top of an HLO module's text."""
    tables: dict[str, dict[int, str]] = {}
    current = None
    for line in hlo_text.splitlines():
        if line.strip() in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            current = tables.setdefault(line.strip(), {})
            continue
        if current is None:
            continue
        m = re.match(r"^(\d+)\s+(.*)$", line.strip())
        if not m:
            if line.startswith("%") or line.startswith("HloModule") or "{" in line[:2]:
                current = None
            continue
        current[int(m.group(1))] = m.group(2)
    files = {k: v.strip('"') for k, v in tables.get("FileNames", {}).items()}
    funcs = {k: v.strip('"') for k, v in tables.get("FunctionNames", {}).items()}
    locs = {}
    for k, v in tables.get("FileLocations", {}).items():
        f = re.search(r"file_name_id=(\d+)", v)
        fn = re.search(r"function_name_id=(\d+)", v)
        ln = re.search(r"\bline=(\d+)", v)
        locs[k] = (files.get(int(f.group(1)), "?") if f else "?",
                   funcs.get(int(fn.group(1)), "?") if fn else "?", int(ln.group(1)) if ln else 0)
    frames = {}
    for k, v in tables.get("StackFrames", {}).items():
        loc = re.search(r"file_location_id=(\d+)", v)
        par = re.search(r"parent_frame_id=(\d+)", v)
        where = locs.get(int(loc.group(1)), ("?", "?", 0)) if loc else ("?", "?", 0)
        frames[k] = (*where, int(par.group(1)) if par else 0)
    return frames


def _our_frame(frames: dict, frame_id: int | None) -> str:
    """The innermost frame of the stack that lies in pythia_jax (else the innermost), as
    `file.py:line (function)`."""
    seen, first = set(), None
    while frame_id and frame_id in frames and frame_id not in seen:
        seen.add(frame_id)
        path, func, line, parent = frames[frame_id]
        where = f"{os.path.basename(path)}:{line} ({func})"
        first = first or where
        if "pythia_jax" in path:
            return where
        frame_id = parent
    return first or ""


def hlo_index(hlo_text: str) -> dict:
    """{instruction name: {"opcode", "calls", "target", "op_name", "source", "body", ...}} from
    an optimized HLO module's text (`aot.parse_hlo`); "body" is the called computation's
    instruction opcodes and "source" the line of our code the instruction (or its called
    computation's root) came from."""
    frames = _stack_tables(hlo_text)
    comps, _ = aot.parse_hlo(hlo_text)
    bodies: dict[str, list[str]] = {}
    roots: dict[str, int] = {}
    instrs: dict[str, dict] = {}
    for comp, lines in comps.items():
        bodies[comp] = []
        for line in lines:
            name, opcode = aot.hlo_instruction(line)
            bodies[comp].append(opcode)
            frame = re.search(r"stack_frame_id=(\d+)", line)
            frame = int(frame.group(1)) if frame else None
            if frame and (line.lstrip().startswith("ROOT") or comp not in roots):
                roots[comp] = frame
            calls = re.search(r"calls=%?([\w.\-]+)", line)
            target = re.search(r'custom_call_target="([^"]+)"', line)
            op_name = re.search(r'op_name="([^"]*)"', line)
            instrs[name] = {
                "opcode": opcode,
                "calls": calls.group(1) if calls else None,
                "target": target.group(1) if target else None,
                "op_name": op_name.group(1) if op_name else "",
                "frame": frame,
                "triton_gemm": "__triton_gemm" in line or '"kind":"__triton' in line,
                "cublas_fusion": "__cublas" in line,
            }
    for info in instrs.values():
        info["body"] = bodies.get(info["calls"], []) if info["calls"] else []
        frame = info.pop("frame") or (roots.get(info["calls"]) if info["calls"] else None)
        info["source"] = _our_frame(frames, frame)
    return instrs


def classify(name: str, info: dict | None) -> str:
    if info is None:
        low = name.lower()
        if "gemm" in low or "matmul" in low:
            return "matmul"
        if "fmha" in low or "cudnn" in low:
            return "attention (cuDNN)"
        return "unmatched"
    op, target, body = info["opcode"], info["target"] or "", info["body"]
    if op == "custom-call":
        if "cudnn" in target and ("fmha" in target or "attention" in target or "sdpa" in target):
            return "attention (cuDNN)"
        if "cublas" in target or "gemm" in target.lower():
            return "matmul (cuBLAS)"
        return f"custom-call {target}"
    if op == "fusion":
        if info["triton_gemm"] or "gemm" in name:
            return "matmul (Triton)"
        if info["cublas_fusion"] or "dot" in body or "convolution" in body:
            return "matmul (fusion)"
        if "custom-call" in body and "cudnn" in name:
            return "attention (cuDNN)"
        if "dynamic-update-slice" in body or "dynamic-slice" in body:
            return "dynamic slice / update"
        if "reduce" in body or "reduce-window" in body:
            return "reduction fusion"
        if set(body) <= {"parameter", "copy", "transpose", "bitcast", "reshape", "tuple",
                         "get-tuple-element", "slice", "concatenate", "broadcast", "constant"}:
            return "layout (copy / transpose / slice)"
        return "elementwise fusion"
    if op in ("copy", "transpose", "copy-start", "copy-done"):
        return "layout (copy / transpose / slice)"
    if op in ("dynamic-update-slice", "dynamic-slice"):
        return "dynamic slice / update"
    if op in ("dot", "convolution"):
        return "matmul (cuBLAS)"
    if op in ("reduce", "all-reduce", "sort", "scatter", "gather"):
        return op
    return f"other ({op})"


def kernel_times(trace_dir: str, module_substr: str) -> tuple[dict, dict]:
    """({hlo_op: [total ns, count]}, span info) from the device plane(s) of a trace (the host
    plane's XLA thunks on a CPU), for the HLO module whose name contains `module_substr`."""
    from jax.profiler import ProfileData
    paths = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
    if not paths:
        raise RuntimeError(f"no .xplane.pb under {trace_dir}")
    data = ProfileData.from_file(sorted(paths)[-1])
    planes = list(data.planes)
    device_planes = [p for p in planes if p.name.startswith("/device:")]
    use = device_planes or [p for p in planes if p.name.startswith("/host:CPU")]
    per_op: dict = collections.defaultdict(lambda: [0.0, 0])
    lines_seen = collections.Counter()
    busy = []
    for plane in use:
        for line in plane.lines:
            for ev in line.events:
                stats = dict(ev.stats)
                op = stats.get("hlo_op")
                mod = str(stats.get("hlo_module", ""))
                if op is None or module_substr not in mod:
                    continue
                lines_seen[f"{plane.name} | {line.name}"] += 1
                per_op[str(op)][0] += ev.duration_ns
                per_op[str(op)][1] += 1
                busy.append((ev.start_ns, ev.start_ns + ev.duration_ns))
    span = {"lines": dict(lines_seen.most_common(12))}
    if busy:
        busy.sort()
        covered, cur_s, cur_e = 0.0, *busy[0]
        for s, e in busy[1:]:
            if s > cur_e:
                covered += cur_e - cur_s
                cur_s, cur_e = s, e
            else:
                cur_e = max(cur_e, e)
        covered += cur_e - cur_s
        span.update(span_ns=max(e for _, e in busy) - busy[0][0], busy_ns=covered)
    return dict(per_op), span


def profile_summary(per_op: dict, index: dict, steps: int, top: int = 25) -> dict:
    by_class = collections.defaultdict(float)
    by_source = collections.defaultdict(float)
    rows = []
    for op, (ns, count) in per_op.items():
        info = index.get(op)
        cls = classify(op, info)
        by_class[cls] += ns
        src = (info or {}).get("source") or "?"
        by_source[src] += ns
        rows.append({"hlo_op": op, "ms_per_step": ns / steps / 1e6, "calls_per_step": count / steps,
                     "class": cls, "source": src,
                     "op_name": ((info or {}).get("op_name") or "")[-110:]})
    total = sum(by_class.values()) or 1.0
    rows.sort(key=lambda r: -r["ms_per_step"])
    return {
        "kernel_ms_per_step": total / steps / 1e6,
        "by_class": {k: {"ms_per_step": v / steps / 1e6, "share": v / total}
                     for k, v in sorted(by_class.items(), key=lambda kv: -kv[1])},
        "by_source": {k: {"ms_per_step": v / steps / 1e6, "share": v / total}
                      for k, v in sorted(by_source.items(), key=lambda kv: -kv[1])[:top]},
        "top_ops": rows[:top],
    }


# ------------------------------------------------------------------------------------------------
def run_variant(size, batch, seq, overrides, steps, peak, profile_steps=0, module_tag="train_step"):
    c = build_config(size, batch, seq, overrides)
    mcfg = train.model_config_from(c)
    mesh = train.make_mesh(c)
    state, setup = train.create_train_state(c, mesh)
    step = train.make_train_step(setup)
    T = c.train.seq_len
    tok = np.random.default_rng(0).integers(0, 50277, (batch, T + 1)).astype(np.int32)
    b = {"inputs": jax.device_put(tok[:, :-1], setup.batch_sharding),
         "targets": jax.device_put(tok[:, 1:], setup.batch_sharding)}
    t = time.perf_counter()
    compiled = step.lower(state, b).compile()
    compile_s = time.perf_counter() - t
    mem = compiled.memory_analysis()
    for _ in range(2):  # warm-up
        state, m = compiled(state, b)
    jax.block_until_ready(m)
    ts = []
    for _ in range(steps):
        t = time.perf_counter()
        state, m = compiled(state, b)
        jax.block_until_ready(m)
        ts.append(time.perf_counter() - t)
    t = time.perf_counter()
    for _ in range(steps):
        state, m = compiled(state, b)
    jax.block_until_ready(m)
    queued = (time.perf_counter() - t) / steps
    fpt = aot.model_flops_per_token(mcfg, T)
    s = min(queued, statistics.median(ts))
    row = {"size": size, "batch": batch, "seq": T, "overrides": overrides,
           "remat": mcfg.remat, "scan_layers": mcfg.scan_layers,
           "attention_impl": mcfg.attention_impl,
           "compile_s": round(compile_s, 2),
           "temp_gib": getattr(mem, "temp_size_in_bytes", 0) / 2**30 if mem else None,
           "argument_gib": getattr(mem, "argument_size_in_bytes", 0) / 2**30 if mem else None,
           "s_per_step_waited": statistics.median(ts), "s_per_step_queued": queued,
           "tokens_per_s": batch * T / s,
           "tflops_causal": fpt["causal"] * batch * T / s / 1e12,
           "tflops_palm": fpt["palm"] * batch * T / s / 1e12,
           "loss": float(m["loss"])}
    if peak:
        row["mfu_causal"] = row["tflops_causal"] / peak
        row["mfu_palm"] = row["tflops_palm"] / peak
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        row["device_peak_gib_so_far"] = stats["peak_bytes_in_use"] / 2**30
    if profile_steps:
        jax.block_until_ready(state)
        with tempfile.TemporaryDirectory() as d:
            with jax.profiler.trace(d):
                for _ in range(profile_steps):
                    state, m = compiled(state, b)
                jax.block_until_ready(m)
            per_op, span = kernel_times(d, module_tag)
        prof = profile_summary(per_op, hlo_index(compiled.as_text()), profile_steps)
        prof["device_busy_share"] = (span.get("busy_ns", 0) / span["span_ns"]
                                     if span.get("span_ns") else None)
        prof["lines"] = span["lines"]
        row["profile"] = prof
    del state, compiled
    return row


def _print_row(r):
    if "error" in r:
        print(f"  {r['size']:>5} b{r['batch']:<3} {r['overrides'] or 'default'}: {r['error']}")
        return
    mfu = (f"MFU causal {100 * r['mfu_causal']:.1f} % (palm {100 * r['mfu_palm']:.1f} %)"
           if "mfu_causal" in r else f"{r['tflops_causal']:.2f} TFLOP/s causal")
    print(f"  {r['size']:>5} b{r['batch']:<3} {str(r['overrides'] or 'default'):<45} "
          f"{r['s_per_step_queued']:.4f} s/step queued ({r['s_per_step_waited']:.4f} waited) "
          f"{r['tokens_per_s']:,.0f} tok/s {mfu}; temp {r['temp_gib']:.1f} GiB, "
          f"compile {r['compile_s']:.0f} s", flush=True)


def _print_profile(r):
    p = r.get("profile")
    if not p:
        return
    print(f"  profile {r['size']} b{r['batch']}: kernels {p['kernel_ms_per_step']:.1f} ms/step, "
          f"device busy {100 * (p['device_busy_share'] or 0):.0f} % of the traced span")
    for k, v in p["by_class"].items():
        print(f"    {v['ms_per_step']:8.2f} ms {100 * v['share']:5.1f} %  {k}")
    print("    top source lines:")
    for k, v in list(p["by_source"].items())[:16]:
        print(f"    {v['ms_per_step']:8.2f} ms {100 * v['share']:5.1f} %  {k}")
    print("    top instructions:")
    for o in p["top_ops"][:20]:
        print(f"    {o['ms_per_step']:8.2f} ms x{o['calls_per_step']:<5.0f} {o['class']:<28} "
              f"{o['source'][:44]:<44} {o['hlo_op'][:36]}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="410m,1b")
    ap.add_argument("--batch", default="16,8", help="sequences per step, one per size")
    ap.add_argument("--seq", type=int, default=0, help="tokens per sequence (0: the config's)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--variants", default="default",
                    help="';'-separated: 'default' or comma lists of section.field=value")
    ap.add_argument("--experiments", default="", help=f"one of {sorted(EXPERIMENTS)}")
    ap.add_argument("--profile", type=int, default=0, help="trace N steps of the first variant")
    ap.add_argument("--json", default=None, help="append one JSON line per variant here")
    args = ap.parse_args(argv)
    sizes = args.sizes.split(",")
    try:
        batches = [int(x) for x in args.batch.split(",")]
    except ValueError:
        raise SystemExit(f"--batch={args.batch}: expected comma-separated integers") from None
    if len(batches) != len(sizes):
        raise SystemExit(f"--batch: {len(batches)} values for {len(sizes)} sizes")
    if args.steps < 1 or args.profile < 0:
        raise SystemExit(f"--steps={args.steps} / --profile={args.profile}: expected >= 1 / >= 0")
    variants = [parse_variant(v) for v in args.variants.split(";")]
    for size, batch in zip(sizes, batches):  # every config checked before anything compiles
        for ov in variants:
            try:
                build_config(size, batch, args.seq or None, ov)
            except ValueError as e:  # aot.ReportError, TrainConfigError, an unknown size
                raise SystemExit(f"--sizes={size} --variants={','.join(ov) or 'default'}: "
                                 f"{e}") from None
    experiments = [e for e in args.experiments.split(",") if e]
    for e in experiments:
        if e not in EXPERIMENTS:
            raise SystemExit(f"--experiments: unknown {e!r}; expected one of {sorted(EXPERIMENTS)}")
    if len(experiments) > 1:
        raise SystemExit(f"--experiments: one at a time (each replaces the loss), got {experiments}")
    dev = jax.devices()[0]
    peak = next((v for k, v in PEAK_BF16.items() if k in dev.device_kind), None)
    head = {"device": dev.device_kind, "platform": dev.platform, "jax": jax.__version__,
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "experiments": experiments}
    print(json.dumps(head), flush=True)
    if experiments:
        train.loss_fn = EXPERIMENTS[experiments[0]]
    rows = []
    for size, batch in zip(sizes, batches):
        for i, ov in enumerate(variants):
            _log(f"{size} batch {batch} {ov or 'default'}")
            try:
                r = run_variant(size, batch, args.seq or None, ov, args.steps, peak,
                                profile_steps=args.profile if i == 0 else 0)
            except Exception as e:  # noqa: BLE001 - report (e.g. out of memory) and go on
                r = {"size": size, "batch": batch, "overrides": ov,
                     "error": f"{type(e).__name__}: {e}"[:400]}
            r.update(head)
            rows.append(r)
            _print_row(r)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(r) + "\n")
    print("\nsummary")
    for r in rows:
        _print_row(r)
    for r in rows:
        _print_profile(r)
    failed = [r for r in rows if "error" in r]
    if failed:
        print(f"{len(failed)} of {len(rows)} variants failed (see 'error' above)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
