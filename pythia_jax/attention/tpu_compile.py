"""Deviceless TPU compilation of the attention impls (needs `libtpu`, no TPU).

`compile_report(chip, impl, B, N, T, H, ...)` lowers and compiles `attend` (forward, or forward +
backward) for a TPU topology with the real XLA:TPU + Mosaic compiler running on the CPU, inside
`jax.shard_map(..., check_vma=False)` over a mesh built from the topology's devices (the path
`attend` takes under `pythia_jax.sharding.logical_rules`), traced inside
`target_platform("tpu")` (Mosaic kernels, not interpret mode). It returns what the compiler
tells:

* `vmem_bytes`: per Mosaic kernel, the scoped VMEM the compiler allocated for it
  (`used_scoped_memory_configs` of each `tpu_custom_call`, memory space 1 = VMEM);
* `temp_bytes`: HBM scratch of the whole program (`memory_analysis()`);
* `xla_seconds`: the compiler's own cost-model time for the program (`cost_analysis()` key
  `optimal_seconds`, a per-op roofline: max(FLOPs / peak, bytes / HBM bandwidth) per op). A
  Mosaic call is priced from its `pl.CostEstimate` (ours declare one, so a kernel counts at
  100 % of MXU peak); a kernel without an estimate (splash) is priced at zero. Because that
  makes the figure a statement about our declared estimates rather than the kernels, it is
  `None` for programs containing kernels, and `xla_glue_cycles` (the summed
  `estimated_cycles` of the XLA ops around the kernels: transposes, scaling, di; Mosaic
  calls carry no cycle estimate) is reported instead;
* `flops` / `bytes_accessed`: from `cost_analysis()` (for our kernels these are our
  `pl.CostEstimate`s; splash declares none, so it adds nothing).

Used by tests/test_attention_tpu_compile.py (the compile gate) and bench/attention.py; `CHIPS`
(the per-chip figures) and `topology_desc` by the train-step reports of `pythia_jax.aot`.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import topologies
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from pythia_jax.attention import attend, attend_packed
from pythia_jax.attention.target import target_platform
from pythia_jax.sharding import BATCH_AXES, MESH_AXES, logical_rules

__all__ = ["Chip", "CHIPS", "TOPOLOGIES", "PYTHIA_SHAPES", "CompileReport",
           "compile_report", "libtpu_error", "topology_desc", "VMEM_BUDGET_BYTES"]


@dataclasses.dataclass(frozen=True)
class Chip:
    """Per-chip figures of a TPU generation (Cloud TPU docs). v4 and v5p are one JAX device per
    chip (megacore); v5e and v6e have one TensorCore per chip."""
    peak_tflops: float   # bf16 dense TFLOP/s
    hbm_gbps: float      # HBM bandwidth, GB/s
    hbm_gib: int         # HBM capacity, GiB


CHIPS = {
    "v4": Chip(peak_tflops=275.0, hbm_gbps=1200.0, hbm_gib=32),
    "v5e": Chip(peak_tflops=197.0, hbm_gbps=819.0, hbm_gib=16),
    "v5p": Chip(peak_tflops=459.0, hbm_gbps=2765.0, hbm_gib=95),
    "v6e": Chip(peak_tflops=918.0, hbm_gbps=1640.0, hbm_gib=32),
}
#: chip -> deviceless topology name of one chip.
TOPOLOGIES = {"v4": "v4:1x1x1", "v5e": "v5e:1x1", "v5p": "v5p:1x1x1", "v6e": "v6e:1x1"}
#: The smallest default scoped-VMEM limit of these chips (v4: 16 MiB); every kernel must fit.
VMEM_BUDGET_BYTES = 16 * 1024 * 1024
#: head_dim -> (Pythia model, heads) at batch 8, length 2048.
PYTHIA_SHAPES = {64: ("pythia-410m", 16), 80: ("pythia-2.8b", 32), 128: ("pythia-1.4b", 16),
                 256: ("pythia-1b", 8)}


def libtpu_error() -> str | None:
    """None if libtpu can be imported, else a message saying how to get it."""
    try:
        import libtpu  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return (f"libtpu cannot be imported ({type(e).__name__}: {e}); deviceless TPU "
                f"compiles need it (it is the TPU compiler): pip install 'pythia-jax[tpu]' "
                f"(libtpu==0.0.52)")
    return None


@functools.lru_cache(maxsize=None)
def topology_desc(name: str):
    """libtpu's description of the TPU topology `name` (e.g. "v5e:2x2"), no TPU needed."""
    return topologies.get_topology_desc(name, platform="tpu")


@dataclasses.dataclass
class CompileReport:
    chip: str
    impl: str
    backward: bool
    shape: tuple
    rotary: bool
    ok: bool
    error: str | None = None
    vmem_bytes: dict = dataclasses.field(default_factory=dict)  # kernel name -> bytes
    temp_bytes: int | None = None
    flops: float | None = None
    bytes_accessed: float | None = None
    xla_seconds: float | None = None
    xla_glue_cycles: int | None = None
    compile_s: float | None = None
    hlo: str | None = dataclasses.field(default=None, repr=False)

    @property
    def max_vmem(self) -> int:
        return max(self.vmem_bytes.values(), default=0)

    def roofline_seconds(self) -> float | None:
        """max(flops / peak, bytes / HBM bandwidth): a derived floor, not the compiler's."""
        if not self.flops or self.flops <= 0:
            return None
        c = CHIPS[self.chip]
        return max(self.flops / (c.peak_tflops * 1e12),
                   (self.bytes_accessed or 0) / (c.hbm_gbps * 1e9))


_INSTR_START = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+) = ")


def _instructions(hlo: str):
    """(name, text) of each HLO instruction; an instruction's attributes may span lines."""
    name, buf = None, []
    for line in hlo.splitlines():
        m = _INSTR_START.match(line)
        if m:
            if name is not None:
                yield name, "\n".join(buf)
            name, buf = m.group(1), [line]
        elif name is not None:
            buf.append(line)
    if name is not None:
        yield name, "\n".join(buf)


def _kernel_vmem(hlo: str) -> dict:
    """Mosaic kernel -> scoped VMEM bytes the compiler allocated for it."""
    out = {}
    for name, text in _instructions(hlo):
        if 'custom_call_target="tpu_custom_call"' not in text:
            continue
        used = re.search(r'"used_scoped_memory_configs":\[(.*?)\]', text)
        size = 0
        if used:
            for m in re.finditer(r'"memory_space":"1","offset":"\d+","size":"(\d+)"',
                                 used.group(1)):
                size += int(m.group(1))
        out[name] = size
    return out


def compile_report(chip: str, impl: str, B: int, N: int, T: int, H: int, *,
                   dtype=jnp.bfloat16, rotary: bool = False, backward: bool = True,
                   mesh_shape: tuple[int, int, int] = (1, 1, 1), block_sizes=None,
                   keep_hlo: bool = False, packed: bool = False) -> CompileReport:
    """Compile `attend(impl=...)` (forward, or forward + vjp) for one TPU chip, deviceless.
    `packed`: `attend_packed` on one [B, T, 3*N*H] array and the [3*N*H] QKV bias instead
    (impl "pallas", no mesh axis over the heads; as the model's layer calls it)."""
    topo = topology_desc(TOPOLOGIES[chip] if ":" not in chip else chip)
    chip_key = chip.split(":")[0]
    n = int(np.prod(mesh_shape))
    mesh = Mesh(np.array(topo.devices[:n]).reshape(mesh_shape), MESH_AXES)
    rep = CompileReport(chip_key, impl, backward, (B, T, N, H), rotary, ok=False)
    R = H // 4
    kwargs = {"block_sizes": block_sizes} if impl == "pallas" and block_sizes is not None else {}

    def fwd(q, k, v, cos, sin):
        with logical_rules(mesh):
            return attend(q, k, v, impl=impl, causal=True,
                          rotary=(cos, sin) if rotary else None, **kwargs)

    def fwd_bwd(q, k, v, cos, sin):
        o, vjp = jax.vjp(lambda q, k, v: fwd(q, k, v, cos, sin), q, k, v)
        return (o,) + tuple(vjp(o))

    def fwd_packed(qkv, bias, cos, sin):
        with logical_rules(mesh):
            return attend_packed(qkv, num_heads=N, bias=bias,
                                 rotary=(cos, sin) if rotary else None, **kwargs)

    def fwd_bwd_packed(qkv, bias, cos, sin):
        o, vjp = jax.vjp(lambda x, b: fwd_packed(x, b, cos, sin), qkv, bias)
        return (o,) + tuple(vjp(o))

    x_sh = NamedSharding(mesh, P(BATCH_AXES, None, "tensor", None))
    t_sh = NamedSharding(mesh, P(BATCH_AXES, None, None))
    x = jax.ShapeDtypeStruct((B, T, N, H), dtype, sharding=x_sh)
    tab = jax.ShapeDtypeStruct((B, T, R), jnp.float32, sharding=t_sh)
    if packed:
        fn = fwd_bwd_packed if backward else fwd_packed
        args = (jax.ShapeDtypeStruct((B, T, 3 * N * H), dtype, sharding=t_sh),
                jax.ShapeDtypeStruct((3 * N * H,), jnp.float32,
                                     sharding=NamedSharding(mesh, P(None))), tab, tab)
    else:
        fn = fwd_bwd if backward else fwd
        args = (x, x, x, tab, tab)
    t0 = time.perf_counter()
    try:
        with target_platform("tpu"):
            compiled = jax.jit(fn).lower(*args).compile()
    except Exception as e:  # noqa: BLE001  - reported, the caller decides
        rep.error = f"{type(e).__name__}: {e}"
        rep.compile_s = time.perf_counter() - t0
        return rep
    rep.compile_s = time.perf_counter() - t0
    rep.ok = True
    hlo = compiled.as_text()
    rep.vmem_bytes = _kernel_vmem(hlo)
    mem = compiled.memory_analysis()
    rep.temp_bytes = int(mem.temp_size_in_bytes) if mem is not None else None
    ca = compiled.cost_analysis() or {}
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else {}
    rep.flops = ca.get("flops")
    rep.bytes_accessed = ca.get("bytes accessed")
    secs = ca.get("optimal_seconds")
    rep.xla_seconds = secs if (secs is not None and secs > 0 and not rep.vmem_bytes) else None
    rep.xla_glue_cycles = sum(int(c) for c in re.findall(r'"estimated_cycles":"(\d+)"', hlo))
    if keep_hlo:
        rep.hlo = hlo
    return rep
