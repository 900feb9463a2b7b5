"""Compile reports: the real training step compiled for a TPU slice on a CPU-only host.

    from pythia_jax import aot
    r = aot.report("pythia-1b", "v5p:2x4x4", {"data": 1, "fsdp": -1}, microbatch=16, remat="full")
    print(aot.format_report(r))

`scripts/aot_report.py` is the command line over this module. Needs `libtpu` (the TPU compiler;
`pip install 'pythia-jax[tpu]'`), no TPU; the process's own backend should be CPU
(`JAX_PLATFORMS=cpu`, as the script sets). The train state is built abstractly with the
shardings `train.create_train_state` gives it, `train.make_train_step` (the jitted step that
training runs, donation included) is lowered for the topology's devices
(`jax.experimental.topologies`) inside `attention.target_platform("tpu")`, so the attention
dispatch and the Pallas kernels are traced for the TPU (Mosaic kernels, not interpret mode), and
compiled by libtpu. A report holds:

- per-device memory from the compiler's buffer assignment: arguments (train state + batch),
  temporaries, and the total against the chip's HBM (fits or not);
- FLOPs per step and two estimated step times. The cost analysis counts a loop body once, so
  the scanned layers, the gradient-accumulation loop and the loops XLA makes of collectives on
  large slices hide most of the work. The costs therefore come from separate compiles without
  loops: one device's share of one microbatch (loss and gradients; on a single chip, or one
  `tensor` group) for 1 and 2 unrolled layers, whose difference is a layer's cost, plus the
  optimizer update on the full mesh: `accum x (cost(1) + (L - 1) x per_layer) + update`.
  *roofline*: XLA's `optimal_seconds`, a per-op roofline (each op max(FLOPs / peak, bytes /
  HBM bandwidth); our Pallas kernels are priced from their `pl.CostEstimate`, a kernel
  without one, e.g. splash, at zero). *cycles*: the `estimated_cycles` libtpu attaches to every
  scheduled op, summed (loop bodies times their trip counts) at the chip's clock (`CLOCK_GHZ`),
  plus each Pallas kernel at the roofline of its `pl.CostEstimate` (Mosaic calls carry no
  cycle estimate); kernels without an estimate are named as unpriced. Communication on the
  data / fsdp axes is in neither (assumed overlapped with compute), so both times are lower
  bounds and the MFUs upper bounds. `cost="full"` costs the whole unrolled step on the full
  mesh instead (reliable on small slices only), `cost="check"` does both;
- the collectives of the real step (all-reduce, reduce-scatter, all-gather, all-to-all,
  collective-permute) read from its optimized HLO with the trip counts of the loops they sit
  in: bytes per step per device and an ICI lower bound on their time (ring traffic over the
  per-chip ICI bandwidth `ICI_GBPS`);
- the MFU each time implies: model FLOPs per step / (chips x peak x time), model FLOPs = 6 N
  per token plus attention counted causally (QK^T and PV halved, `flops_convention` "causal",
  as MaxText counts), and with PaLM's full attention count as a second field; remat
  recomputation is not model FLOPs.

Without a microbatch (`microbatch=None`, no `grad_accum`) the report searches the largest
power-of-two microbatch whose step fits in HBM (compiling each candidate tried) and says so.
"""

from __future__ import annotations

import functools
import json
import math
import re
import time

import jax
import ml_collections
import optax
from jax.sharding import NamedSharding, PartitionSpec

from pythia_jax import sharding as shd
from pythia_jax import train
from pythia_jax.attention import target_platform
from pythia_jax.attention.tpu_compile import CHIPS, libtpu_error, topology_desc
from pythia_jax.configs import pythia as pythia_configs

__all__ = ["ReportError", "COST_METHODS", "ATTENTION_IMPLS", "REMAT_POLICIES", "CLOCK_GHZ",
           "ICI_GBPS", "ICI_SOURCE", "chip_of", "parse_mesh", "topology_devices",
           "apply_overrides", "build_config", "model_flops_per_token", "compile_step",
           "compile_grads", "compile_update", "parse_hlo", "hlo_instruction", "hlo_costs", "collectives_of",
           "cost_of", "step_cost", "report", "format_report"]

#: How FLOPs and time are measured (see the module doc); "none": memory only.
COST_METHODS = ("extrapolate", "full", "check", "none")
#: Attention implementations a report can compile into the step.
ATTENTION_IMPLS = ("pallas", "splash", "xla")
#: Remat policies a report can choose (`ModelConfig.remat`).
REMAT_POLICIES = ("none", "full", "dots_saveable", "save_attn_out")

#: custom calls that libtpu's cost model prices at -1 s ("unknown"): counted and added back.
_UNPRICED_CUSTOM_CALLS = ("ConcatBitcast",)

#: TensorCore clock in GHz, turning libtpu's `estimated_cycles` into seconds: bf16 peak /
#: (MXUs x MXU cells x 2 FLOPs): v4 and v5p 2 TensorCores x 4 MXUs of 128x128, v5e 1 x 4 of
#: 128x128, v6e 1 x 4 of 256x256 (Cloud TPU system-architecture pages; v4's 1050 MHz is the
#: published clock). A v5p device is one megacore chip; its cycles are the chip's.
CLOCK_GHZ = {"v4": 1.05, "v5e": 1.5, "v5p": 1.75, "v6e": 1.75}
#: Per-chip ICI bandwidth in GB/s, one direction (all links together): half the documented
#: bidirectional figure (v5e 400 GB/s, v5p 1200 GB/s), or the older "Interchip Interconnect BW"
#: figure (v4 2400 Gbit/s, v6e 3584 Gbit/s).
ICI_GBPS = {"v4": 300.0, "v5e": 200.0, "v5p": 600.0, "v6e": 448.0}
ICI_SOURCE = ("Cloud TPU system architecture pages (cloud.google.com/tpu/docs/v5e, /v5p, /v4, "
              "/v6e): per-chip ICI bandwidth, one direction, all links")


class ReportError(ValueError):
    """A report request that cannot work (unknown chip, bad mesh spec, unknown config field)."""


# ------------------------------------------------------------------------------------------------
# Inputs
def chip_of(topology: str) -> str:
    """The chip of a topology name "CHIP:SHAPE" (a key of `tpu_compile.CHIPS`)."""
    chip = topology.split(":", 1)[0].lower()
    if chip not in CHIPS:
        raise ReportError(f"--topology={topology}: unknown chip {chip!r}; expected one of "
                          f"{sorted(CHIPS)} (e.g. v5e:2x4, v5p:2x2x1)")
    return chip


def parse_mesh(spec: str) -> dict:
    """"data:-1,fsdp:8,tensor:1" -> {"data": -1, "fsdp": 8, "tensor": 1}."""
    out = {}
    for part in spec.split(","):
        if not part.strip():
            continue
        name, _, size = part.partition(":")
        name = name.strip()
        if name not in shd.MESH_AXES:
            raise ReportError(f"--mesh={spec}: unknown axis {name!r}; expected axes of "
                              f"{shd.MESH_AXES}, e.g. data:-1,fsdp:4")
        try:
            out[name] = int(size)
        except ValueError:
            raise ReportError(f"--mesh={spec}: expected axis:size pairs with integer sizes, "
                              f"e.g. data:-1,fsdp:4") from None
    return out


def topology_devices(topology: str):
    """The devices of a TPU slice, from libtpu's topology description (no TPU needed)."""
    error = libtpu_error()
    if error:
        raise RuntimeError(error)
    return topology_desc(topology).devices


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return {"True": True, "False": False}.get(text, text)


def apply_overrides(config, overrides=()) -> None:
    """Set "a.b=value" strings on `config` (values parsed as JSON, True/False, else strings);
    an unknown field or a value of the wrong type raises ReportError naming the field."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ReportError(f"config override {item!r}: expected FIELD=VALUE, e.g. "
                              f"model.num_layers=4")
        *parents, leaf = key.strip().split(".")
        node = config
        for i, part in enumerate(parents):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                raise ReportError(f"config override {item!r}: the training config has no "
                                  f"field {'.'.join(parents[:i + 1])!r}")
            node = node[part]
        if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
            raise ReportError(f"config override {item!r}: the training config has no field "
                              f"{key.strip()!r}")
        try:
            node[leaf] = _parse_value(value.strip())
        except (TypeError, ValueError) as e:
            raise ReportError(f"config override {item!r}: {e}") from None


def build_config(model: str, *, mesh: dict, batch: int, seq_len: int, microbatch: int = 0,
                 grad_accum: int = 0, remat: str | None = None, scan_layers: bool = True,
                 attention: str = "pallas", dtype: str = "bfloat16", overrides=()):
    """`pythia_jax.configs.pythia.get_config(size)` with the report's choices; `overrides`:
    "a.b=value" strings (`apply_overrides`), applied first."""
    try:
        c = pythia_configs.get_config(model.lower().removeprefix("pythia-"))
    except ValueError as e:
        raise ReportError(f"--model={model}: {e}") from None
    apply_overrides(c, overrides)
    c.train.batch_size = batch
    c.train.seq_len = seq_len
    c.train.microbatch_per_device = microbatch
    c.train.grad_accum_steps = grad_accum
    c.model.scan_layers = scan_layers
    c.model.attention_impl = attention
    c.model.dtype = dtype
    if remat is not None:
        c.model.remat = remat
    c.mesh.shape = ml_collections.ConfigDict({**dict.fromkeys(shd.MESH_AXES, 1), **mesh})
    return c


def model_flops_per_token(mcfg, seq_len: int) -> dict:
    """Training FLOPs per token (multiply-add = 2): "palm" counts attention's QK^T and PV in full
    (`ModelConfig.flops_per_token`, the PaLM / Megatron convention: 12 L T d per token for the
    forward and backward), "causal" counts half of them (the unmasked half of a causal
    attention matrix, as MaxText does); "attention_palm" is the full attention part."""
    palm = int(mcfg.flops_per_token(seq_len)["training"])
    attention = 3 * 4 * int(mcfg.num_layers) * int(seq_len) * int(mcfg.hidden_size)
    return {"causal": palm - attention // 2, "palm": palm, "attention_palm": attention}


def _unrolled_config(config, *, batch: int, layers: int | None = None,
                     tensor: int | None = None):
    """`config` with its layers unrolled (`layers` of them, default all) and `batch` sequences in
    one microbatch; on a mesh of one `tensor` group of `tensor` devices (default: the same
    mesh)."""
    c = config.copy_and_resolve_references()
    if layers is not None:
        c.model.num_layers = layers
    c.model.scan_layers = False
    c.train.batch_size = batch
    c.train.grad_accum_steps = 1
    c.train.microbatch_per_device = 0
    if tensor is not None:
        c.mesh.shape = ml_collections.ConfigDict(
            {**dict.fromkeys(shd.MESH_AXES, 1), "tensor": tensor})
    return c


# ------------------------------------------------------------------------------------------------
# Compiles (attention traced for the TPU: Mosaic kernels, the TPU choice of `auto`)
def _abstract_batch(config, setup):
    B, T = int(config.train.batch_size), int(config.train.seq_len)
    return jax.ShapeDtypeStruct((B, T), jax.numpy.int32, sharding=setup.batch_sharding)


def compile_step(config, devices):
    """(compiled, setup, seconds): the jitted train step compiled for `devices`."""
    mesh = train.make_mesh(config, devices=devices)
    _, setup = train.create_train_state(config, mesh, init=False)
    tok = _abstract_batch(config, setup)
    step = train.make_train_step(setup)
    t0 = time.perf_counter()
    with target_platform("tpu"):
        compiled = step.lower(setup.abstract_state, {"inputs": tok, "targets": tok}).compile()
    return compiled, setup, time.perf_counter() - t0


def compile_grads(config, devices):
    """(compiled, seconds): loss and gradients of one batch (no optimizer), as the train step
    computes them (`train.loss_fn` under the logical rules, fused as `train.fused_loss*` say),
    for `devices`."""
    mesh = train.make_mesh(config, devices=devices)
    _, setup = train.create_train_state(config, mesh, init=False)
    tok = _abstract_batch(config, setup)
    p_sh = setup.state_shardings.params

    def loss_and_grads(params, inputs, targets):
        with shd.logical_rules(mesh):
            loss = functools.partial(train.loss_fn, **train.loss_options(setup))
            return jax.value_and_grad(loss)(params, setup.graphdef, inputs, targets)

    fn = jax.jit(loss_and_grads, in_shardings=(p_sh, setup.batch_sharding, setup.batch_sharding),
                 out_shardings=(NamedSharding(mesh, PartitionSpec()), p_sh))
    t0 = time.perf_counter()
    with target_platform("tpu"):
        compiled = fn.lower(setup.abstract_state.params, tok, tok).compile()
    return compiled, time.perf_counter() - t0


def compile_update(setup):
    """(compiled, seconds): the optimizer update of the train step on the full mesh."""
    sh = setup.state_shardings

    def update(state, grads):
        updates, opt_state = setup.tx.update(grads, state.opt_state, state.params)
        return train.TrainState(state.step + 1, optax.apply_updates(state.params, updates),
                                opt_state)

    fn = jax.jit(update, in_shardings=(sh, sh.params), out_shardings=sh, donate_argnums=(0,))
    t0 = time.perf_counter()
    with target_platform("tpu"):
        compiled = fn.lower(setup.abstract_state, setup.abstract_state.params).compile()
    return compiled, time.perf_counter() - t0


# ------------------------------------------------------------------------------------------------
# Costs
def _hlo_text(compiled) -> str | None:
    """The optimized HLO as text, or None where jaxlib cannot read libtpu's module back
    (libtpu 0.0.52 emits async-update instructions that jaxlib 0.10.2's HLO parser rejects,
    seen on v5p). The cycles time, the collectives and the kernel names depend on it; the
    report says "not available" where it is missing, and the roofline does not."""
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


_COMP_HEADER = re.compile(r"^(ENTRY )?%?([\w.\-]+) \(.*\) -> .*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.*?) ([a-z][a-z0-9\-]*)\(")
_CALLEES = re.compile(r"\b(body|condition|calls|to_apply|true_computation|false_computation)"
                      r"=%([\w.\-]+)")
_CALLEE_LISTS = re.compile(r"\b(?:branch_computations|called_computations)=\{([^}]*)\}")
_ARRAY = re.compile(r"\b(pred|[suf]\d+|bf16|f8e\w+)\[([\d,]*)\]")
_DTYPE_BYTES = {"pred": 1, "bf16": 2}
_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


def parse_hlo(text: str) -> tuple[dict, str | None]:
    """({computation: [instruction lines]}, entry name) of an optimized HLO module's text."""
    comps, cur, entry = {}, None, None
    for line in text.splitlines():
        m = _COMP_HEADER.match(line)
        if m:
            cur = m.group(2)
            comps[cur] = []
            if m.group(1):
                entry = cur
        elif line.startswith("}"):
            cur = None
        elif cur is not None and _INSTR.match(line):
            comps[cur].append(line)
    return comps, entry


def hlo_instruction(line: str) -> tuple[str, str] | None:
    """(name, opcode) of one instruction line of `parse_hlo`'s output, None for other lines."""
    m = _INSTR.match(line)
    return (m.group(1), m.group(3)) if m else None


def _trip_count(cond: list[str]) -> int | None:
    """N of a `while` condition `counter < N` (jax's scan / fori_loop), None if not that form."""
    consts = {}
    for line in cond:
        m = re.match(r"^\s*(?:ROOT )?%([\w.\-]+) = s32\[\][^ ]* constant\((-?\d+)\)", line)
        if m:
            consts[m.group(1)] = int(m.group(2))
    for line in cond:
        m = re.search(r"compare\(%([\w.\-]+), %([\w.\-]+)\), direction=LT", line)
        if m and m.group(2) in consts:
            return consts[m.group(2)]
    return None


def _multipliers(comps: dict, entry: str) -> tuple[dict, list]:
    """How many times each computation runs per execution of `entry` (while bodies times their
    trip count; both branches of a conditional once), the loops whose count is unknown, and the
    computations called as fusions."""
    mult, unknown = {}, []
    fused = set()  # computations called as fusions (calls=): pieces of their caller's work

    def visit(name, m, depth=0):
        if name not in comps or depth > 64:
            return
        mult[name] = mult.get(name, 0) + m
        for line in comps[name]:
            trips = 1
            if " while(" in line:
                cond = re.search(r"condition=%([\w.\-]+)", line)
                trips = _trip_count(comps.get(cond.group(1), [])) if cond else None
                if trips is None:
                    unknown.append(_INSTR.match(line).group(1))
                    trips = 1
            for kind, callee in _CALLEES.findall(line):
                if kind == "calls":
                    fused.add(callee)
                visit(callee, m * (trips if kind in ("body", "condition") else 1), depth + 1)
            for group in _CALLEE_LISTS.findall(line):
                for callee in re.findall(r"%([\w.\-]+)", group):
                    visit(callee, m, depth + 1)

    visit(entry, 1)
    return mult, unknown, fused


def _array_bytes(type_text: str) -> list[int]:
    out = []
    for dtype, dims in _ARRAY.findall(type_text):
        size = _DTYPE_BYTES.get(dtype) or max(1, int(re.sub(r"\D", "", dtype) or 8) // 8)
        out.append(size * math.prod(int(d) for d in dims.split(",") if d))
    return out


def _group_size(line: str, n_devices: int) -> int:
    m = re.search(r"replica_groups=\{\{([\d,]*)\}", line)
    if m:
        return len([x for x in m.group(1).split(",") if x])
    m = re.search(r"replica_groups=mesh\[([^\]]*)\] \{([^}]*)\}", line)
    if m:
        sizes = dict(re.findall(r"'(\w+)'=(\d+)", m.group(1)))
        return math.prod(int(sizes[a]) for a in re.findall(r"'(\w+)'", m.group(2)) if a in sizes)
    m = re.search(r"replica_groups=\[([\d,]+)\]<=", line)
    if m:
        return int(m.group(1).split(",")[-1])
    return n_devices


#: `estimated_cycles` at or above this is libtpu's marker for "no estimate" (seen: INT64_MAX on
#: v5p `gather_offload_custom_fusion`s, read with jax 0.12): left out of the sum and named.
_NO_CYCLES = 1 << 62


def hlo_costs(text: str, chip: str) -> dict:
    """From an optimized HLO module: `cycles` (the summed `estimated_cycles` of its scheduled ops,
    loop bodies times their trip counts), `cycle_seconds` (at `CLOCK_GHZ[chip]`, plus the
    Pallas kernels at the roofline of their `pl.CostEstimate`), the kernels priced that way and
    the ones without an estimate (`unpriced_kernels`: name -> count), and the ops libtpu gives no
    cycle estimate (`uncycled_ops`: kind -> count; not in `cycles`, which is then a lower
    bound)."""
    comps, entry = parse_hlo(text)
    mult, unknown, _ = _multipliers(comps, entry)
    c = CHIPS[chip]
    cycles, kernel_s, priced, unpriced, uncycled = 0.0, 0.0, {}, {}, {}
    for name, lines in comps.items():
        m = mult.get(name, 0)
        for line in lines:
            for v in re.findall(r'"estimated_cycles":"(\d+)"', line):
                if int(v) >= _NO_CYCLES:  # libtpu's "no estimate" (INT64_MAX), not a cost
                    op = _INSTR.match(line)
                    kind = re.sub(r"\.\d+$", "", op.group(1)) if op else "?"
                    uncycled[kind] = uncycled.get(kind, 0) + m
                else:
                    cycles += m * int(v)
            if 'custom_call_target="tpu_custom_call"' not in line:
                continue
            op = re.search(r'op_name="([^"]*)"', line)
            parts = [p for p in (op.group(1) if op else "").split("/") if p != "pallas_call"]
            kname = parts[-1] if parts else _INSTR.match(line).group(1)
            est = re.search(r'"cost_estimate":\{"flops":"(\d+)"[^}]*?"bytes_accessed":"(\d+)"',
                            line)
            if est is None:
                unpriced[kname] = unpriced.get(kname, 0) + m
                continue
            secs = max(int(est.group(1)) / (c.peak_tflops * 1e12),
                       int(est.group(2)) / (c.hbm_gbps * 1e9))
            kernel_s += m * secs
            priced[kname] = priced.get(kname, 0.0) + m * secs
    return {"cycles": cycles, "clock_ghz": CLOCK_GHZ[chip],
            "cycle_seconds": cycles / (CLOCK_GHZ[chip] * 1e9) + kernel_s,
            "kernel_seconds": kernel_s, "priced_kernels": priced,
            "unpriced_kernels": unpriced, "uncycled_ops": uncycled,
            "unknown_trip_loops": unknown}


def collectives_of(text: str, chip: str, n_devices: int) -> dict:
    """The collectives of an optimized HLO module per execution: per kind, the count, the bytes of
    the buffers they reduce / gather per device (all-reduce: the buffer; all-gather: the
    gathered result; reduce-scatter: the input; all-to-all / collective-permute: the buffer) and
    the ring traffic each device sends (all-reduce 2 (g-1)/g, the others (g-1)/g of the bytes,
    a permute all of them, g the group size), with loops' trip counts; the ICI lower bound is
    that traffic over `ICI_GBPS[chip]`. The pieces of one decomposed async collective (one
    channel id and shape in several fusions) count once; `largest`: the 20 largest, with the
    times each runs per step and its group size."""
    comps, entry = parse_hlo(text)
    mult, unknown, fused = _multipliers(comps, entry)
    seen = {}
    for name, lines in comps.items():
        m = mult.get(name, 0)
        if not m:
            continue
        for line in lines:
            im = _INSTR.match(line)
            op = im.group(3)
            kind = op.removesuffix("-start")
            if kind not in _COLLECTIVES:
                continue
            sizes = _array_bytes(im.group(2))
            if not sizes:
                continue
            g = _group_size(line, n_devices)
            if kind == "all-reduce":
                nbytes = sum(sizes)
                traffic = 2 * (g - 1) / g * nbytes
            elif kind == "reduce-scatter":
                nbytes = sum(sizes) * g
                traffic = (g - 1) / g * nbytes
            elif kind == "collective-permute":
                nbytes = max(sizes) if op.endswith("-start") else sum(sizes)
                traffic = nbytes
            else:  # all-gather (result: the gathered buffer), all-to-all
                nbytes = max(sizes) if op.endswith("-start") else sum(sizes)
                traffic = (g - 1) / g * nbytes
            ch = re.search(r"channel_id=(\d+)", line)
            if name in fused and ch:  # a piece of an async collective split over fusions
                key = (kind, ch.group(1), im.group(2))
            else:  # a collective of its own (channel ids are not unique across them)
                key = (kind, name, im.group(1))
            prev = seen.get(key)
            if prev is None or m > prev[0]:
                seen[key] = (m, nbytes, traffic, im.group(1), g)
    by_kind, items = {}, []
    for (kind, *_), (m, nbytes, traffic, iname, g) in seen.items():
        items.append({"kind": kind, "instruction": iname, "times": m, "group": g,
                      "bytes_per_time": nbytes, "bytes": m * nbytes})
        k = by_kind.setdefault(kind, {"count": 0, "bytes": 0.0, "traffic_bytes": 0.0})
        k["count"] += m
        k["bytes"] += m * nbytes
        k["traffic_bytes"] += m * traffic
    traffic = sum(k["traffic_bytes"] for k in by_kind.values())
    items.sort(key=lambda x: -x["bytes"])
    return {"by_kind": by_kind, "bytes": sum(k["bytes"] for k in by_kind.values()),
            "largest": items[:20],
            "traffic_bytes": traffic, "ici_gbps": ICI_GBPS[chip], "ici_source": ICI_SOURCE,
            "ici_lower_bound_s": traffic / (ICI_GBPS[chip] * 1e9),
            "unknown_trip_loops": unknown}


def cost_of(compiled, chip: str) -> dict:
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
    out = {"flops": float(ca.get("flops", 0.0)), "seconds": raw + unpriced,
           "bytes": float(ca.get("bytes accessed", 0.0)), "raw_seconds": raw,
           "unpriced": unpriced, "unpriced_how": how}
    if text is not None:
        out.update(hlo_costs(text, chip))
    else:
        out.update({"cycles": None, "cycle_seconds": float("nan"), "unpriced_kernels": None,
                    "priced_kernels": None, "uncycled_ops": None})  # not known without the text
    return out


def _union_uncycled(parts) -> list | None:
    """The op kinds without a cycle estimate in any of the cost compiles (None: not known)."""
    if any(p.get("uncycled_ops") is None for p in parts):
        return None
    return sorted(set().union(*(p["uncycled_ops"] for p in parts)))


def _union_unpriced(parts) -> list | None:
    """The kernels without a cost estimate in any of the cost compiles; None if one of them
    could not be read (then it is not known)."""
    if any(p["unpriced_kernels"] is None for p in parts):
        return None
    return sorted(set().union(*(p["unpriced_kernels"] for p in parts)))


def step_cost(config, devices, setup, mode: str, chip: str) -> dict:
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
    if mode not in ("extrapolate", "full"):
        raise ReportError(f"step_cost: mode must be 'extrapolate' or 'full', got {mode!r}")
    L = int(config.model.num_layers)
    A = setup.grad_accum
    mesh = setup.mesh
    keys = ("flops", "seconds", "bytes", "cycle_seconds")
    if mode == "full":
        c = _unrolled_config(config, batch=int(config.train.batch_size) // A, tensor=None)
        compiled, _, secs = compile_step(c, devices)
        part = cost_of(compiled, chip)
        return {k: part[k] * A for k in keys} | {
            "compile_s": secs, "parts": {"full": part},
            "unpriced_kernels": _union_unpriced([part]),
            "uncycled_ops": _union_uncycled([part])}

    t = mesh.shape["tensor"]
    per_device = int(config.train.batch_size) // A // math.prod(
        mesh.shape[a] for a in shd.BATCH_AXES)
    group = list(mesh.devices.reshape(-1, t)[0])  # one tensor group (contiguous)

    def grads_cost(layers):
        compiled, secs = compile_grads(
            _unrolled_config(config, layers=layers, batch=per_device, tensor=t), group)
        return cost_of(compiled, chip), secs

    g1, s1 = grads_cost(1)
    g2, s2 = grads_cost(2)
    up_compiled, s3 = compile_update(setup)
    up = cost_of(up_compiled, chip)
    out = {k: A * (g1[k] + (L - 1) * (g2[k] - g1[k])) + up[k] for k in keys}
    out["compile_s"] = s1 + s2 + s3
    out["unpriced_kernels"] = _union_unpriced([g1, g2, up])
    out["uncycled_ops"] = _union_uncycled([g1, g2, up])
    out["parts"] = {"grads_1_layer": g1, "grads_2_layers": g2, "update": up}
    return out


# ------------------------------------------------------------------------------------------------
# The report
def _try_step(config, devices):
    """(compiled or None, setup, compile seconds, compiler error or None): None when the compiler
    refuses the program for HBM (RESOURCE_EXHAUSTED)."""
    try:
        compiled, setup, secs = compile_step(config, devices)
        return compiled, setup, secs, None
    except Exception as e:  # the compiler refuses programs that cannot fit in HBM
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        _, setup = train.create_train_state(config, train.make_mesh(config, devices=devices),
                                            init=False)
        return None, setup, float("nan"), str(e).strip().splitlines()[0]


def _memory(compiled, error, chip) -> dict:
    if compiled is None:
        need = re.search(r"HLO temporaries \(([\d.]+)G\)", error)
        return {"fits": False, "hbm_gib": chip.hbm_gib, "compiler_error": error,
                "temporaries_gib": float(need.group(1)) if need else None}
    mem = compiled.memory_analysis()
    args = mem.argument_size_in_bytes
    temp = mem.temp_size_in_bytes
    total = args + mem.output_size_in_bytes - mem.alias_size_in_bytes + temp
    return {"arguments_gib": args / 2**30, "temporaries_gib": temp / 2**30,
            "output_gib": mem.output_size_in_bytes / 2**30,
            "aliased_gib": mem.alias_size_in_bytes / 2**30,
            "total_gib": total / 2**30, "hbm_gib": chip.hbm_gib,
            "fits": total <= chip.hbm_gib * 2**30}


def _search_microbatch(make_config, devices, chip, rows: int):
    """The largest power-of-two microbatch (dividing `rows`, the sequences per device) whose step
    fits: (microbatch, (compiled, setup, secs, error), tried). Starts at `rows`; after a refusal
    jumps to the candidate the compiler's temporaries figure predicts, then walks down (or up
    to the next candidate below a refused one)."""
    cands = [m for m in (2**k for k in range(rows.bit_length(), -1, -1)) if rows % m == 0]
    tried, results, steps = [], {}, {}  # results: index -> fits; steps: microbatch -> step

    def attempt(m):
        res = _try_step(make_config(m), devices)
        mem = _memory(res[0], res[3], chip)
        steps[m] = (res, mem["fits"])
        tried.append({"microbatch": m, "fits": mem["fits"],
                      "total_gib": mem.get("total_gib"),
                      "temporaries_gib": mem.get("temporaries_gib")})
        return mem

    i = 0  # index into cands (descending)
    while i not in results:
        mem = attempt(cands[i])
        results[i] = mem["fits"]
        if mem["fits"]:  # the next bigger candidate, unless it was refused or this is the top
            if i > 0 and i - 1 not in results:
                i -= 1
            continue
        if i + 1 == len(cands) or results.get(i + 1):
            break
        nxt = i + 1
        temp = mem.get("temporaries_gib")
        if temp:  # the activations scale with the microbatch: jump to the predicted size
            limit = cands[i] * 0.9 * chip.hbm_gib / temp
            nxt = next((j for j in range(i + 1, len(cands)) if cands[j] <= limit),
                       len(cands) - 1)
        i = nxt
    fitting = [c for c, (_, fits) in steps.items() if fits]
    best = max(fitting) if fitting else min(steps)
    return best, steps[best][0], tried


def _finite(x):
    """JSON-safe: NaN / inf -> None, recursively."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def report(model: str, topology: str, mesh: dict, batch: int = 1024, seq_len: int = 2048,
           microbatch: int | None = 0, grad_accum: int = 0, remat: str | None = None,
           scan_layers: bool = True, attention: str = "pallas", dtype: str = "bfloat16",
           cost: str = "extrapolate", overrides=()) -> dict:
    """The compile report (a JSON-able dict) of Pythia `model`'s train step on `topology`.
    `microbatch=None` (and no `grad_accum`): the largest power-of-two microbatch that fits;
    `remat=None`: the training config's."""
    if cost not in COST_METHODS:
        raise ReportError(f"--cost={cost}: expected one of {COST_METHODS}")
    if attention not in ATTENTION_IMPLS:
        raise ReportError(f"--attention={attention}: expected one of {ATTENTION_IMPLS}")
    if remat is not None and remat not in REMAT_POLICIES:
        raise ReportError(f"--remat={remat}: expected one of {REMAT_POLICIES}")
    if microbatch is not None and microbatch < 0:
        raise ReportError(f"--microbatch={microbatch}: must be >= 0 (0: no accumulation)")
    if grad_accum < 0:
        raise ReportError(f"--grad_accum={grad_accum}: must be >= 0")
    for name, value in (("batch", batch), ("seq_len", seq_len)):
        if value <= 0:
            raise ReportError(f"--{name}={value}: must be positive")
    chip_name = chip_of(topology)
    chip = CHIPS[chip_name]

    def make_config(m):
        return build_config(model, mesh=mesh, batch=batch, seq_len=seq_len, microbatch=m,
                            grad_accum=grad_accum, remat=remat, scan_layers=scan_layers,
                            attention=attention, dtype=dtype, overrides=overrides)

    config = make_config(microbatch or 0)  # bad model / override: fails before any compile
    devices = topology_devices(topology)
    n = len(devices)
    search = microbatch is None and grad_accum == 0
    if search:
        rows = batch // math.prod(train.make_mesh(config, devices=devices).shape[a]
                                  for a in shd.BATCH_AXES)
        if rows < 1:
            raise ReportError(f"--batch={batch}: fewer sequences than the batch axes of the "
                              f"mesh ({n} chips)")
        chosen, (compiled, setup, compile_s, error), tried = _search_microbatch(
            make_config, devices, chip, rows)
        config = make_config(chosen)
    else:
        compiled, setup, compile_s, error = _try_step(config, devices)
        tried = None
    mcfg = setup.model_cfg
    fpt = model_flops_per_token(mcfg, seq_len)
    tokens = batch * seq_len
    model_flops = fpt["causal"] * tokens
    row = {
        "model": f"pythia-{model.lower().removeprefix('pythia-')}",
        "topology": topology, "chips": n, "mesh": dict(setup.mesh.shape),
        "batch": batch, "seq_len": seq_len, "grad_accum": setup.grad_accum,
        "microbatch_per_device": batch // setup.grad_accum // math.prod(
            setup.mesh.shape[a] for a in shd.BATCH_AXES),
        "microbatch_choice": ("searched: the largest power of two that fits" if search else
                              "given"),
        "microbatch_tried": tried,
        "remat": mcfg.remat, "remat_choice": "the training config's" if remat is None else "given",
        "scan_layers": mcfg.scan_layers, "attention": mcfg.attention_impl,
        "dtype": mcfg.dtype, "params": mcfg.param_counts()["total"],
        "compile_s": compile_s,
        "flops_convention": "causal",
        "model_flops_per_step": model_flops,
        "model_flops_per_step_palm": fpt["palm"] * tokens,
        "attention_flops_per_step_palm": fpt["attention_palm"] * tokens,
        "peak_tflops_per_chip": chip.peak_tflops,
        "clock_ghz": CLOCK_GHZ[chip_name],
        "mfu": {"roofline": None, "cycles": None, "roofline_palm": None, "cycles_palm": None},
    }
    row["memory"] = _memory(compiled, error, chip)
    row["fits"] = bool(row["memory"]["fits"])
    if compiled is None:
        return _finite(row)
    # Pallas kernels compiled by Mosaic (not interpret mode), as the TPU will run them
    hlo = _hlo_text(compiled)
    row["mosaic_kernels"] = (None if hlo is None else
                             len(re.findall(r'custom_call_target="tpu_custom_call"', hlo)))
    row["collectives"] = (None if hlo is None else collectives_of(hlo, chip_name, n))
    if cost != "none":
        c = step_cost(config, devices, setup, "extrapolate" if cost == "check" else cost,
                      chip_name)
        if cost == "check":
            f = step_cost(config, devices, setup, "full", chip_name)
            row["cost_check"] = {"full_flops": f["flops"] * n, "full_seconds": f["seconds"],
                                 "full_cycle_seconds": f["cycle_seconds"],
                                 "flops_ratio": c["flops"] / f["flops"],
                                 "seconds_ratio": c["seconds"] / f["seconds"],
                                 "cycle_seconds_ratio": c["cycle_seconds"] / f["cycle_seconds"]}
        est, cyc = c["seconds"], c["cycle_seconds"]

        def mfu(flops, secs):
            return flops / (n * chip.peak_tflops * 1e12 * secs) if secs > 0 else float("nan")

        row.update({
            "cost_method": cost,
            "compiler_flops_per_step": c["flops"] * n,
            "estimated_step_s": est,
            "estimated_step_s_cycles": cyc,
            "mfu": {"roofline": mfu(model_flops, est), "cycles": mfu(model_flops, cyc),
                    "roofline_palm": mfu(fpt["palm"] * tokens, est),
                    "cycles_palm": mfu(fpt["palm"] * tokens, cyc)},
            "unpriced_kernels": c["unpriced_kernels"],
            "uncycled_ops": c["uncycled_ops"],
            "cost_compile_s": c["compile_s"],
            "cost_parts": c["parts"],
        })
    return _finite(row)


def _pct(x):
    return "n/a" if x is None else f"{100 * x:.1f} %"


def format_report(r: dict) -> str:
    """The report as the lines the command line prints."""
    m = r["memory"]
    mesh = ", ".join(f"{k}={v}" for k, v in r["mesh"].items())
    micro = f"{r['microbatch_per_device']} sequences per device per microbatch"
    if r.get("microbatch_tried"):
        tried = ", ".join(f"{t['microbatch']} {'fits' if t['fits'] else 'does not fit'}"
                          for t in r["microbatch_tried"])
        micro += f", chosen: the largest power of two that fits (tried {tried})"
    lines = [
        f"{r['model']} ({r['params'] / 1e9:.2f}B params) on {r['topology']} ({r['chips']} chips), "
        f"mesh {mesh}",
        f"  batch {r['batch']} x {r['seq_len']} tokens, grad accumulation {r['grad_accum']} "
        f"({micro}), remat {r['remat']} ({r['remat_choice']}), scan_layers "
        f"{r['scan_layers']}, attention {r['attention']}, {r['dtype']}",
    ]
    if "compiler_error" in m:
        return "\n".join(lines + [f"  memory per device: DOES NOT FIT in {m['hbm_gib']} GiB HBM: "
                                  f"the compiler refused it: {m['compiler_error']}"])
    lines += [
        f"  compile: {r['compile_s']:.1f} s",
        f"  memory per device: arguments {m['arguments_gib']:.2f} GiB, temporaries "
        f"{m['temporaries_gib']:.2f} GiB, total {m['total_gib']:.2f} GiB of {m['hbm_gib']} GiB "
        f"HBM -> {'fits' if m['fits'] else 'DOES NOT FIT'}",
        f"  model FLOPs per step: {r['model_flops_per_step']:.3e} (attention counted causally; "
        f"PaLM's full count: {r['model_flops_per_step_palm']:.3e})",
    ]
    col = r.get("collectives")
    if col is None:
        lines.append("  collectives: not read (jaxlib cannot parse this module's HLO text)")
    else:
        kinds = ", ".join(f"{k} {v['count']:g}x {v['bytes'] / 1e9:.3f} GB"
                          for k, v in sorted(col["by_kind"].items())) or "none"
        lines.append(
            f"  collectives per step per device: {kinds}; ring traffic "
            f"{col['traffic_bytes'] / 1e9:.3f} GB -> at least {col['ici_lower_bound_s']:.4g} s "
            f"on ICI ({col['ici_gbps']:.0f} GB/s per chip one way; not in the times below)")
    if "estimated_step_s" in r:
        mfu = r["mfu"]
        names = r["unpriced_kernels"]
        unpriced = ("not known (the cost compiles' HLO text is not readable)" if names is None
                    else ", ".join(names) or "none")
        lines += [
            f"  compiler FLOPs per step: {r['compiler_flops_per_step']:.3e} "
            f"(includes remat recomputation; method: {r['cost_method']}, "
            f"{r['cost_compile_s']:.1f} s of compiles)",
            f"  estimated step time, roofline (optimal_seconds): {r['estimated_step_s']:.4g} s "
            f"-> MFU {_pct(mfu['roofline'])} (PaLM counting {_pct(mfu['roofline_palm'])})",
            (f"  estimated step time, summed op cycles at {r['clock_ghz']} GHz: "
             f"{r['estimated_step_s_cycles']:.4g} s -> MFU {_pct(mfu['cycles'])} (PaLM counting "
             f"{_pct(mfu['cycles_palm'])}); peak {r['peak_tflops_per_chip']:.0f} TFLOP/s per chip"
             if r.get("estimated_step_s_cycles") is not None else
             "  estimated step time, summed op cycles: not available (jaxlib cannot read the "
             "cost compiles' HLO text back, see aot._hlo_text); MFU cycles: n/a"),
            f"  Pallas kernels without a cost estimate (priced at zero): {unpriced}",
        ]
        if r.get("uncycled_ops"):
            lines.append("  ops libtpu gives no cycle estimate (left out of the cycles time, "
                         "which is then a lower bound): " + ", ".join(r["uncycled_ops"]))
    return "\n".join(lines)
