"""Compile the real training step for a TPU slice on a CPU-only machine and report what it needs.

    pip install 'pythia-jax[tpu]'        # libtpu: the TPU compiler, no TPU needed
    python scripts/aot_report.py --model=pythia-1b --topology=v5p:2x4x4 \
        --mesh=data:-1,fsdp:32,tensor:1 --batch=1024 --microbatch=16 --remat=full

It builds the train state abstractly with the shardings `train.create_train_state` gives it,
lowers `train.make_train_step` (the jitted step that training runs, donation included) for the
topology's devices (`jax.experimental.topologies`), and compiles it with libtpu. Printed:

- per-device memory from the compiler's buffer assignment: arguments (train state + batch),
  temporaries, and the total against the chip's HBM (fits or not);
- FLOPs per step and the compiler's estimated step time (`optimal_seconds` of XLA's cost
  analysis). The cost analysis counts a loop body once, so the scanned layers, the
  gradient-accumulation loop and the loops XLA makes of collectives on large slices hide most
  of the work. The costs therefore come from separate compiles without loops: one device's
  share of one microbatch (loss and gradients; on a single chip, or one `tensor` group) for 1
  and 2 unrolled layers, whose difference is a layer's cost, plus the optimizer update on the
  full mesh: `accum x (cost(1) + (L - 1) x per_layer) + update`. Communication on the data /
  fsdp axes is left out (assumed overlapped with compute), so the time is a lower bound and
  the MFU an upper bound. `--cost=full` costs the whole unrolled step on the full mesh instead
  (reliable on small slices only), `--cost=check` does both;
- the MFU that the estimated time implies: model FLOPs (6 N per token plus attention, the
  PaLM convention, without the recomputation that remat adds) / (chips x peak x time).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import re
import sys
import time
from unittest import mock

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app, flags  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: chip -> (HBM GiB per chip, peak bf16 TFLOP/s per chip). v4 and v5p are one JAX device per
#: chip (megacore); v5e and v6e have one TensorCore per chip.
CHIPS = {
    "v4": (32, 275.0),
    "v5e": (16, 197.0),
    "v5p": (95, 459.0),
    "v6e": (32, 918.0),
}

_MODEL = flags.DEFINE_string("model", "pythia-1b", "Pythia size (pythia-70m … pythia-12b)")
_TOPOLOGY = flags.DEFINE_string("topology", "v5p:2x2x1",
                                "TPU topology, CHIP:SHAPE, e.g. v5e:2x4, v5p:4x4x4, v6e:4x4")
_MESH = flags.DEFINE_string("mesh", "data:-1,fsdp:1,tensor:1",
                            "mesh axis sizes, e.g. data:-1,fsdp:8,tensor:1 (-1: the rest)")
_BATCH = flags.DEFINE_integer("batch", 1024, "global batch in sequences (Pythia: 1024)")
_SEQ = flags.DEFINE_integer("seq_len", 2048, "sequence length (Pythia: 2048)")
_MICRO = flags.DEFINE_integer("microbatch", 0, "sequences per device per microbatch "
                              "(gradient accumulation = rows per device / this); 0 = none")
_ACCUM = flags.DEFINE_integer("grad_accum", 0, "gradient accumulation steps (overrides "
                              "--microbatch); 0 = from --microbatch")
_REMAT = flags.DEFINE_enum("remat", None, ["none", "full", "dots_saveable", "save_attn_out"],
                           "remat policy (default: the training config's)")
_SCAN = flags.DEFINE_bool("scan_layers", True, "scan over the stacked layers")
_ATTN = flags.DEFINE_enum("attention", "pallas", ["pallas", "splash", "xla"],
                          "attention implementation compiled into the step")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "compute dtype")
_COST = flags.DEFINE_enum("cost", "extrapolate", ["extrapolate", "full", "check", "none"],
                          "how FLOPs / estimated time are measured (see the module doc); "
                          "check: extrapolate, and also compile the full unrolled step to "
                          "compare")
_JSON = flags.DEFINE_string("json", None, "also write the report as JSON to this file")
_SET = flags.DEFINE_multi_string("set", [], "override a training-config field, e.g. "
                                 "--set=model.num_layers=4 --set=optim.skip_nonfinite=False")


# ------------------------------------------------------------------------------------------------
def chip_of(topology: str) -> str:
    chip = topology.split(":", 1)[0].lower()
    if chip not in CHIPS:
        raise app.UsageError(f"--topology={topology}: unknown chip {chip!r}; expected one of "
                             f"{sorted(CHIPS)} (e.g. v5e:2x4, v5p:2x2x1)")
    return chip


def parse_mesh(spec: str) -> dict:
    out = {}
    for part in spec.split(","):
        if not part.strip():
            continue
        name, _, size = part.partition(":")
        if not size:
            raise app.UsageError(f"--mesh={spec}: expected axis:size pairs, e.g. data:-1,fsdp:4")
        out[name.strip()] = int(size)
    return out


def topology_devices(topology: str):
    """The devices of a TPU slice, from libtpu's topology description (no TPU needed)."""
    try:
        import libtpu  # noqa: F401
    except ImportError:
        raise RuntimeError("libtpu is not installed: pip install 'pythia-jax[tpu]' (or "
                           "pip install libtpu); it provides the TPU compiler") from None
    from jax.experimental import topologies
    return topologies.get_topology_desc(platform="tpu", topology_name=topology).devices


def load_training_config(size: str):
    path = os.path.join(REPO, "configs", "pythia.py")
    spec = importlib.util.spec_from_file_location("_pythia_configs", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(size)


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return {"True": True, "False": False}.get(text, text)


def build_config(model: str, *, mesh: dict, batch: int, seq_len: int, microbatch: int = 0,
                 grad_accum: int = 0, remat: str | None = None, scan_layers: bool = True,
                 attention: str = "pallas", dtype: str = "bfloat16", overrides=()):
    """configs/pythia.py:<size> with the report's choices; `overrides`: "a.b=value" strings."""
    import ml_collections
    c = load_training_config(model.lower().removeprefix("pythia-"))
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise app.UsageError(f"--set={item}: expected FIELD=VALUE")
        *parents, leaf = key.strip().split(".")
        node = c
        for part in parents:
            node = node[part]
        if leaf not in node:
            raise app.UsageError(f"--set={item}: the training config has no field {key!r}")
        node[leaf] = _parse_value(value.strip())
    c.train.batch_size = batch
    c.train.seq_len = seq_len
    c.train.microbatch_per_device = microbatch
    c.train.grad_accum_steps = grad_accum
    c.model.scan_layers = scan_layers
    c.model.attention_impl = attention
    c.model.dtype = dtype
    if remat is not None:
        c.model.remat = remat
    c.mesh.shape = ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": 1, **mesh})
    return c


@contextlib.contextmanager
def compiling_for_tpu():
    """This process's backend is CPU; kernels that pick Pallas interpret mode from
    `jax.default_backend()` must emit real Mosaic kernels for the TPU target instead."""
    import jax
    with mock.patch.object(jax, "default_backend", lambda: "tpu"):
        yield


def compile_step(config, devices):
    """(compiled, setup, seconds): the jitted train step compiled for `devices`."""
    import jax

    from pythia_jax import train
    mesh = train.make_mesh(config, devices=devices)
    _, setup = train.create_train_state(config, mesh, init=False)
    B, T = int(config.train.batch_size), int(config.train.seq_len)
    tok = jax.ShapeDtypeStruct((B, T), jax.numpy.int32, sharding=setup.batch_sharding)
    step = train.make_train_step(setup)
    t0 = time.perf_counter()
    with compiling_for_tpu():
        compiled = step.lower(setup.abstract_state, {"inputs": tok, "targets": tok}).compile()
    return compiled, setup, time.perf_counter() - t0


#: custom calls that libtpu's cost model prices at -1 s ("unknown"): counted and added back.
_UNPRICED_CUSTOM_CALLS = ("ConcatBitcast",)


def _hlo_text(compiled) -> str | None:
    """The optimized HLO as text, or None where jaxlib cannot read libtpu's module back
    (libtpu 0.0.52 emits async-update instructions that jaxlib 0.10.2's HLO parser rejects,
    seen on larger v5p slices). Only diagnostics depend on it."""
    try:
        return compiled.as_text()
    except Exception:  # JaxRuntimeError: INTERNAL: RET_CHECK failure ... async-update
        return None


def _entry_computation(hlo_text: str) -> str:
    """The ENTRY computation's block of an HLO module's text."""
    start = hlo_text.find("\nENTRY ")
    if start < 0:
        return hlo_text
    end = hlo_text.find("\n}\n", start)
    return hlo_text[start:] if end < 0 else hlo_text[start:end]


def _cost(compiled) -> dict:
    """Per-device flops, bytes and estimated seconds from XLA's cost analysis.

    libtpu (0.0.52) adds -1 to `optimal_seconds` for every custom call it has no model for in
    the entry computation (seen: ConcatBitcast, which it inserts itself; the same calls inside
    called computations are not counted); those are counted in the optimized HLO and added
    back, so the estimate is that of the priced instructions. Where the HLO text is not
    available the count is inferred as the negative integer part, which is right while the
    real estimate is under 1 s (true of the 1- and 2-layer, one-microbatch cost compiles).
    """
    ca = compiled.cost_analysis()
    if isinstance(ca, (list, tuple)):
        ca = ca[0]
    raw = float(ca.get("optimal_seconds", float("nan")))
    text = _hlo_text(compiled)
    if text is not None:
        entry = _entry_computation(text)
        unpriced = sum(len(re.findall(r'custom-call\([^\n]*custom_call_target="' + t + '"',
                                      entry)) for t in _UNPRICED_CUSTOM_CALLS)
        how = "counted"
    else:  # see _hlo_text: infer the count, assuming the real estimate is under one second
        unpriced = max(0, -math.floor(raw))
        how = "inferred"
    return {"flops": float(ca.get("flops", 0.0)), "seconds": raw + unpriced,
            "bytes": float(ca.get("bytes accessed", 0.0)), "raw_seconds": raw,
            "unpriced": unpriced, "unpriced_how": how}


def compile_grads(config, devices):
    """(compiled, seconds): loss and gradients of one batch (no optimizer), as the train step
    computes them (`train.loss_fn` under the logical rules), for `devices`."""
    import jax

    from pythia_jax import sharding as shd
    from pythia_jax import train
    mesh = train.make_mesh(config, devices=devices)
    _, setup = train.create_train_state(config, mesh, init=False)
    B, T = int(config.train.batch_size), int(config.train.seq_len)
    tok = jax.ShapeDtypeStruct((B, T), jax.numpy.int32, sharding=setup.batch_sharding)
    p_sh = setup.state_shardings.params

    def loss_and_grads(params, inputs, targets):
        with shd.logical_rules(mesh):
            return jax.value_and_grad(train.loss_fn)(params, setup.graphdef, inputs, targets)

    fn = jax.jit(loss_and_grads, in_shardings=(p_sh, setup.batch_sharding, setup.batch_sharding),
                 out_shardings=(jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()),
                                p_sh))
    t0 = time.perf_counter()
    with compiling_for_tpu():
        compiled = fn.lower(setup.abstract_state.params, tok, tok).compile()
    return compiled, time.perf_counter() - t0


def compile_update(setup):
    """(compiled, seconds): the optimizer update of the train step on the full mesh."""
    import jax
    import optax

    from pythia_jax import train
    sh = setup.state_shardings

    def update(state, grads):
        updates, opt_state = setup.tx.update(grads, state.opt_state, state.params)
        return train.TrainState(state.step + 1, optax.apply_updates(state.params, updates),
                                opt_state)

    fn = jax.jit(update, in_shardings=(sh, sh.params), out_shardings=sh, donate_argnums=(0,))
    t0 = time.perf_counter()
    compiled = fn.lower(setup.abstract_state, setup.abstract_state.params).compile()
    return compiled, time.perf_counter() - t0


def step_cost(config, devices, setup, mode: str) -> dict:
    """Per-device FLOPs and estimated seconds of one whole step (see the module doc).

    extrapolate: one device's share of one microbatch (loss and gradients) compiled on the
      devices of one `tensor` group (a single chip when tensor=1) for 1 and 2 unrolled layers;
      cost = accum x (cost(1) + (L - 1) x (cost(2) - cost(1))) + the optimizer update compiled
      on the full mesh. Collectives of the data / fsdp axes are not in it (the estimate assumes
      XLA overlaps them with compute).
    full: the whole train step, layers unrolled, on the full mesh, once per microbatch. Its
      collectives are costed too, but on large slices XLA turns collectives into loops that
      the cost analysis counts once; use it on small slices (the test does, to check the
      extrapolation).
    """
    L = int(config.model.num_layers)
    A = setup.grad_accum
    mesh = setup.mesh
    keys = ("flops", "seconds", "bytes")
    if mode == "full":
        c = config.copy_and_resolve_references()
        c.model.scan_layers = False
        c.train.batch_size = int(config.train.batch_size) // A
        c.train.grad_accum_steps = 1
        c.train.microbatch_per_device = 0
        compiled, _, secs = compile_step(c, devices)
        part = _cost(compiled)
        return {k: part[k] * A for k in keys} | {"compile_s": secs, "parts": {"full": part}}

    t = mesh.shape["tensor"]
    per_device = int(config.train.batch_size) // A // (mesh.shape["data"] * mesh.shape["fsdp"])
    group = [d for d in mesh.devices.reshape(-1, t)[0]]  # one tensor group (contiguous)

    def grads_cost(layers):
        c = config.copy_and_resolve_references()
        c.model.num_layers = layers
        c.model.scan_layers = False
        c.train.batch_size = per_device
        c.train.grad_accum_steps = 1
        c.train.microbatch_per_device = 0
        import ml_collections
        c.mesh.shape = ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": t})
        compiled, secs = compile_grads(c, group)
        return _cost(compiled), secs

    g1, s1 = grads_cost(1)
    g2, s2 = grads_cost(2)
    up_compiled, s3 = compile_update(setup)
    up = _cost(up_compiled)
    out = {k: A * (g1[k] + (L - 1) * (g2[k] - g1[k])) + up[k] for k in keys}
    out["compile_s"] = s1 + s2 + s3
    out["parts"] = {"grads_1_layer": g1, "grads_2_layers": g2, "update": up}
    return out


def report(model: str, topology: str, mesh: dict, batch: int = 1024, seq_len: int = 2048,
           microbatch: int = 0, grad_accum: int = 0, remat: str | None = None,
           scan_layers: bool = True, attention: str = "pallas", dtype: str = "bfloat16",
           cost: str = "extrapolate", overrides=()) -> dict:
    chip = chip_of(topology)
    hbm_gib, peak_tflops = CHIPS[chip]
    devices = topology_devices(topology)
    config = build_config(model, mesh=mesh, batch=batch, seq_len=seq_len, microbatch=microbatch,
                          grad_accum=grad_accum, remat=remat, scan_layers=scan_layers,
                          attention=attention, dtype=dtype, overrides=overrides)
    n = len(devices)
    try:
        compiled, setup, compile_s = compile_step(config, devices)
    except Exception as e:  # the compiler refuses programs that cannot fit in HBM
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        compiled, compile_s = None, float("nan")
        from pythia_jax import train
        _, setup = train.create_train_state(config, train.make_mesh(config, devices=devices),
                                            init=False)
        error = str(e).strip().splitlines()[0]
    mcfg = setup.model_cfg
    model_flops = mcfg.flops_per_token(seq_len)["training"] * batch * seq_len
    row = {
        "model": f"pythia-{model.lower().removeprefix('pythia-')}",
        "topology": topology, "chips": n, "mesh": dict(setup.mesh.shape),
        "batch": batch, "seq_len": seq_len, "grad_accum": setup.grad_accum,
        "microbatch_per_device": batch // setup.grad_accum // math.prod(
            setup.mesh.shape[a] for a in ("data", "fsdp")),
        "remat": mcfg.remat, "scan_layers": mcfg.scan_layers, "attention": mcfg.attention_impl,
        "dtype": mcfg.dtype, "params": mcfg.param_counts()["total"],
        "compile_s": compile_s,
        "model_flops_per_step": model_flops,
        "peak_tflops_per_chip": peak_tflops,
    }
    if compiled is None:
        need = re.search(r"HLO temporaries \(([\d.]+)G\)", error)
        row["memory"] = {"fits": False, "hbm_gib": hbm_gib, "compiler_error": error,
                         "temporaries_gib": float(need.group(1)) if need else None}
        return row
    mem = compiled.memory_analysis()
    args = mem.argument_size_in_bytes
    temp = mem.temp_size_in_bytes
    total = args + mem.output_size_in_bytes - mem.alias_size_in_bytes + temp
    row["memory"] = {"arguments_gib": args / 2**30, "temporaries_gib": temp / 2**30,
                     "output_gib": mem.output_size_in_bytes / 2**30,
                     "aliased_gib": mem.alias_size_in_bytes / 2**30,
                     "total_gib": total / 2**30, "hbm_gib": hbm_gib,
                     "fits": total <= hbm_gib * 2**30}
    # Pallas kernels compiled by Mosaic (not interpret mode), as the TPU will run them
    hlo = _hlo_text(compiled)
    row["mosaic_kernels"] = (None if hlo is None else
                             len(re.findall(r'custom_call_target="tpu_custom_call"', hlo)))
    if cost != "none":
        c = step_cost(config, devices, setup, "extrapolate" if cost == "check" else cost)
        if cost == "check":
            f = step_cost(config, devices, setup, "full")
            row["cost_check"] = {"full_flops": f["flops"] * n, "full_seconds": f["seconds"],
                                 "flops_ratio": c["flops"] / f["flops"],
                                 "seconds_ratio": c["seconds"] / f["seconds"]}
        est = c["seconds"]
        row.update({
            "cost_method": cost,
            "compiler_flops_per_step": c["flops"] * n,
            "estimated_step_s": est,
            "mfu": model_flops / (n * peak_tflops * 1e12 * est) if est > 0 else float("nan"),
            "cost_compile_s": c["compile_s"],
            "cost_parts": c["parts"],
        })
    return row


def format_report(r: dict) -> str:
    m = r["memory"]
    mesh = ", ".join(f"{k}={v}" for k, v in r["mesh"].items())
    lines = [
        f"{r['model']} ({r['params'] / 1e9:.2f}B params) on {r['topology']} ({r['chips']} chips), "
        f"mesh {mesh}",
        f"  batch {r['batch']} x {r['seq_len']} tokens, grad accumulation {r['grad_accum']} "
        f"({r['microbatch_per_device']} sequences per device per microbatch), remat "
        f"{r['remat']}, scan_layers {r['scan_layers']}, attention {r['attention']}, {r['dtype']}",
    ]
    if "compiler_error" in m:
        return "\n".join(lines + [f"  memory per device: DOES NOT FIT in {m['hbm_gib']} GiB HBM: "
                                  f"the compiler refused it: {m['compiler_error']}"])
    lines += [
        f"  compile: {r['compile_s']:.1f} s",
        f"  memory per device: arguments {m['arguments_gib']:.2f} GiB, temporaries "
        f"{m['temporaries_gib']:.2f} GiB, total {m['total_gib']:.2f} GiB of {m['hbm_gib']} GiB "
        f"HBM -> {'fits' if m['fits'] else 'DOES NOT FIT'}",
        f"  model FLOPs per step: {r['model_flops_per_step']:.3e}",
    ]
    if "estimated_step_s" in r:
        lines += [
            f"  compiler FLOPs per step: {r['compiler_flops_per_step']:.3e} "
            f"(includes remat recomputation; method: {r['cost_method']}, "
            f"{r['cost_compile_s']:.1f} s of compiles)",
            f"  estimated step time: {r['estimated_step_s']:.4g} s -> MFU "
            f"{100 * r['mfu']:.1f} % (peak {r['peak_tflops_per_chip']:.0f} TFLOP/s per chip)",
        ]
    return "\n".join(lines)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        r = report(_MODEL.value, _TOPOLOGY.value, parse_mesh(_MESH.value), batch=_BATCH.value,
                   seq_len=_SEQ.value, microbatch=_MICRO.value, grad_accum=_ACCUM.value,
                   remat=_REMAT.value, scan_layers=_SCAN.value, attention=_ATTN.value,
                   dtype=_DTYPE.value, cost=_COST.value, overrides=_SET.value)
    except (RuntimeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_report(r), flush=True)
    if _JSON.value:
        with open(_JSON.value, "w") as fh:
            json.dump(r, fh, indent=2)
    return 0


if __name__ == "__main__":
    app.run(main)
