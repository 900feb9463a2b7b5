"""One dispatch point for causal attention.

`attend(q_BTNH, k_BSNH, v_BSNH, impl=…)` -> o_BTNH. Implementations:
  xla    reference einsum (any backend; materializes the T x S scores)
  pallas our Pallas TPU flash kernel (forward + backward), optional fused rotary; on CPU it runs
         in Pallas interpret mode automatically
  splash JAX's shipped TPU splash kernel
  cudnn  `jax.nn.dot_product_attention(implementation="cudnn")` (GPU)
  auto   TPU: pallas (or splash where it won the benchmark), GPU: cudnn, CPU: xla; falls back to
         xla, with a log line, for shapes/dtypes the chosen kernel cannot handle

The platform is the one attention is traced for (`target_platform` / `current_platform`, in
`pythia_jax.attention.target`): this process's backend unless a block says otherwise, e.g.
`with target_platform("tpu"):` around a deviceless TPU compile on a CPU host, which then picks
the TPU kernels and compiles them as Mosaic kernels instead of Pallas interpret mode.

Kernels are opaque custom calls that XLA's partitioner cannot split, so under an active mesh
(`pythia_jax.sharding.logical_rules(mesh)`) they run inside `jax.shard_map`: batch over the mesh
axes of the `batch` rule (data, fsdp), heads over those of `act_heads` (tensor); the sequence
and head_dim stay whole.
"""

from __future__ import annotations

import functools
import logging
import os

import jax
from jax.sharding import PartitionSpec

from pythia_jax.attention import cudnn, splash
from pythia_jax.attention.pallas_tpu import (BlockSizes, UnsupportedShapeError, check_supported,
                                             heads_per_block, pallas_attention,
                                             pallas_attention_packed)
from pythia_jax.attention.target import current_platform, target_platform
from pythia_jax.attention.xla import xla_attention
from pythia_jax.layers import apply_rotary
from pythia_jax.sharding import active_mesh, logical_to_spec

__all__ = ["attend", "attend_packed", "packed_supported", "resolve_impl",
           "xla_attention", "pallas_attention", "BlockSizes", "UnsupportedShapeError", "IMPLS",
           "AUTO_TPU_PREFERENCE", "AUTO_TPU_ENV", "target_platform", "current_platform"]

IMPLS = ("xla", "pallas", "splash", "cudnn", "auto")

logger = logging.getLogger("pythia_jax")

#: Environment override of the TPU choice of `auto` ("pallas" or "splash").
AUTO_TPU_ENV = "PYTHIA_JAX_AUTO_TPU_ATTENTION"
#: TPU device_kind substring -> impl for `auto`, filled from bench/attention.py results where
#: splash beat our kernel. Kinds not listed use "pallas".
AUTO_TPU_PREFERENCE: dict[str, str] = {}


def _tpu_choice() -> str:
    env = os.environ.get(AUTO_TPU_ENV)
    if env:
        if env not in ("pallas", "splash"):
            raise ValueError(f"{AUTO_TPU_ENV}: expected 'pallas' or 'splash', got {env!r}")
        return env
    try:
        kind = jax.devices()[0].device_kind
    except RuntimeError:  # pragma: no cover - no devices
        kind = ""
    for sub, impl in AUTO_TPU_PREFERENCE.items():
        if sub in kind:
            return impl
    return "pallas"


def _check(impl, q_shape, k_shape, dtype, *, causal, rotary_dim):
    """Raise UnsupportedShapeError if `impl` cannot run these shapes."""
    if impl == "pallas":
        check_supported(q_shape, k_shape, rotary_dim=rotary_dim, causal=causal)
    elif impl == "splash":
        splash.check_supported(q_shape, k_shape, causal=causal)
    elif impl == "cudnn":
        cudnn.check_supported(q_shape, k_shape, dtype, causal=causal)


def resolve_impl(impl: str, q_shape, k_shape, dtype, *, causal: bool = True, mask=None,
                 rotary_dim: int | None = None, backend: str | None = None) -> str:
    """The concrete implementation `attend` runs for `impl` on `backend` (default: the platform
    attention is traced for, `current_platform()`).

    Explicit impls are returned unchanged (their own checks raise clear errors). `auto` picks
    per backend and falls back to "xla", logging why, when the pick cannot take the shapes.
    """
    if impl not in IMPLS:
        raise ValueError(f"attention_impl: expected one of {IMPLS}, got {impl!r}")
    if impl != "auto":
        return impl
    if mask is not None:
        return "xla"  # explicit masks (KV-cache decoding) are an xla-only feature
    backend = backend or current_platform()
    if backend == "tpu":
        choice = _tpu_choice()
    elif backend in ("gpu", "cuda"):
        choice = "cudnn"
    else:
        return "xla"
    try:
        _check(choice, q_shape, k_shape, dtype, causal=causal,
               rotary_dim=rotary_dim if choice == "pallas" else None)
    except UnsupportedShapeError as e:
        logger.warning("attention_impl='auto': %s kernel cannot run q %s, k %s (%s); falling back "
                       "to 'xla'", choice, tuple(q_shape), tuple(k_shape), e)
        return "xla"
    return choice


def _apply_rotary(q, k, rotary):
    cos, sin = rotary
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)


def _shard_mapped(fn, q, k, v, rotary):
    """Run fn(q, k, v, rotary) per shard under the active mesh (or directly without one)."""
    mesh = active_mesh()
    if mesh is None:
        return fn(q, k, v, rotary)
    full = logical_to_spec(("batch", "length", "act_heads", None))
    spec = PartitionSpec(full[0], None, full[2], None)  # keep the sequence whole
    if rotary is None:
        return jax.shard_map(lambda q, k, v: fn(q, k, v, None), mesh=mesh,
                             in_specs=(spec, spec, spec), out_specs=spec,
                             check_vma=False)(q, k, v)
    tspec = PartitionSpec(full[0], None, None)
    return jax.shard_map(lambda q, k, v, c, s: fn(q, k, v, (c, s)), mesh=mesh,
                         in_specs=(spec, spec, spec, tspec, tspec), out_specs=spec,
                         check_vma=False)(q, k, v, *rotary)


def attend(q, k, v, *, impl: str = "xla", causal: bool = True, mask=None, rotary=None,
           fused_rotary: bool | None = None, block_sizes: BlockSizes | None = None,
           interpret=None):
    """Scaled dot-product attention with scale head_dim**-0.5 and softmax in float32.

    q [B, T, N, H]; k, v [B, S, N, H]. `mask` [B, T, S] bool (True = attend) is only supported
    by `xla` (and `auto`, which then uses xla). `rotary=(cos_BTR, sin_BTR)`: q and k come in
    un-rotated and are rotated here, where the impl is resolved: inside the kernel when it is
    `pallas` (explicit, or picked by `auto`), else in XLA before the chosen impl.
    `fused_rotary` (`ModelConfig.fused_rotary`): None fuses wherever possible; False always
    rotates in XLA; True is a request, and a chosen impl that cannot honour it (`auto` picking
    xla / splash / cudnn) logs a warning on the `pythia_jax` logger and rotates in XLA.
    `block_sizes` / `interpret` are passed to the pallas kernel.
    """
    if impl not in IMPLS:
        raise ValueError(f"attention_impl: expected one of {IMPLS}, got {impl!r}")
    if not (fused_rotary is None or isinstance(fused_rotary, bool)):
        raise ValueError(f"fused_rotary: expected None, True or False, got {fused_rotary!r}")
    if mask is not None and impl not in ("xla", "auto"):
        raise ValueError(f"attention_impl={impl!r}: an explicit attention mask is only supported "
                         f"by 'xla'")
    if rotary is not None and fused_rotary is False:
        q, k = _apply_rotary(q, k, rotary)
        rotary = None
    rotary_dim = None if rotary is None else rotary[0].shape[-1]
    chosen = resolve_impl(impl, q.shape, k.shape, q.dtype, causal=causal, mask=mask,
                          rotary_dim=rotary_dim)
    if rotary is not None and chosen != "pallas":
        if fused_rotary:
            logger.warning("fused_rotary=True: attention_impl=%r runs %r here, not our Pallas "
                           "kernel; rotary is applied in XLA instead", impl, chosen)
        q, k = _apply_rotary(q, k, rotary)
        rotary = None
    if chosen == "xla":
        return xla_attention(q, k, v, causal=causal, mask=mask)
    # Check on the global shapes (sequence and head_dim are never sharded) for a clear error.
    _check(chosen, q.shape, k.shape, q.dtype, causal=causal, rotary_dim=rotary_dim)
    if chosen == "pallas":
        fn = functools.partial(_pallas, causal=causal, block_sizes=block_sizes,
                               interpret=interpret)
    elif chosen == "splash":
        fn = functools.partial(_splash, causal=causal, interpret=interpret)
    else:
        fn = functools.partial(_cudnn, causal=causal)
    return _shard_mapped(fn, q, k, v, rotary)


def _heads_split(mesh) -> bool:
    """Whether the active rules split the heads over mesh axes of more than one device."""
    axes = logical_to_spec(("act_heads",))[0]
    if mesh is None or axes is None:
        return False
    axes = axes if isinstance(axes, tuple) else (axes,)
    size = 1
    for a in axes:
        size *= mesh.shape[a]
    return size > 1


def packed_supported(impl: str, B: int, T: int, N: int, H: int, dtype, *,
                     rotary_dim: int | None) -> bool:
    """Whether `attend_packed` runs for these shapes: `impl` is our Pallas kernel ("pallas", or
    "auto" where it picks it; never a fallback), a head count that `heads_per_block(H, N)`
    accepts (every Pythia size: head_dim 64, 128, 256 and 2.8b's 80, 8 heads per 640-lane
    block), and no mesh axis splits the heads (the flat [B, T, 3*N*H] array would not split
    along them). Else the layer splits q, k, v and calls `attend` as always."""
    if impl == "auto":
        if current_platform() != "tpu" or _tpu_choice() != "pallas":
            return False
    elif impl != "pallas":
        return False
    G = heads_per_block(H, N)
    # Measured (bench/RESULTS.md, one layer by the cycles model), packed against split: 1.4b
    # (width 2048) 0.88x on v5e; 6.9b (4096) 0.99x and 12b (5120) 0.97x on v5p, where they
    # train (1.03x each before the QKV bias moved into the kernels, when the packed path
    # stopped at width 2048); the whole-step compiles of both agree in both cost models.
    # 2.8b (head_dim 80, sliced heads) 0.79x on v5p.
    if G is None or _heads_split(active_mesh()):
        return False
    try:
        check_supported((B, T, N, H), (B, T, N, H), rotary_dim=rotary_dim, causal=True)
    except UnsupportedShapeError:
        return False
    return True


def attend_packed(qkv, *, num_heads: int, bias=None, rotary=None,
                  block_sizes: BlockSizes | None = None, interpret=None):
    """Causal self-attention of our Pallas kernel on the QKV projection's output as it is:
    qkv [B, T, 3*N*H] (q, k, v thirds, heads interleaved [N, H]) -> o [B, T, N*H]; rotary
    fused (`rotary=(cos_BTR, sin_BTR)`, q and k un-rotated); `bias` [3*N*H]: the projection's
    bias when qkv is its matmul alone (the kernels add it and return its gradient). Only where
    `packed_supported` says so (the caller checks). Under an active mesh it runs per batch
    shard in `jax.shard_map` (the heads are whole there; the bias is replicated, and its
    gradient summed over the shards by the shard_map's transpose)."""
    fn = functools.partial(pallas_attention_packed, num_heads=num_heads, causal=True,
                           block_sizes=block_sizes, interpret=interpret)
    mesh = active_mesh()
    if mesh is None:
        return fn(qkv, bias=bias, rotary=rotary)
    spec = PartitionSpec(logical_to_spec(("batch",))[0], None, None)
    args, specs = [qkv], [spec]
    for extra, extra_spec in ((bias, PartitionSpec(None)), *((t, spec) for t in rotary or ())):
        if extra is not None:
            args.append(extra)
            specs.append(extra_spec)

    def local(x, *rest):
        rest = list(rest)
        b = rest.pop(0) if bias is not None else None
        return fn(x, bias=b, rotary=tuple(rest) if rotary is not None else None)
    return jax.shard_map(local, mesh=mesh, in_specs=tuple(specs), out_specs=spec,
                         check_vma=False)(*args)


def _pallas(q, k, v, rotary, *, causal, block_sizes, interpret):
    return pallas_attention(q, k, v, causal=causal, rotary=rotary, block_sizes=block_sizes,
                            interpret=interpret)


def _splash(q, k, v, rotary, *, causal, interpret):
    assert rotary is None
    return splash.splash_attention(q, k, v, causal=causal, interpret=interpret)


def _cudnn(q, k, v, rotary, *, causal):
    assert rotary is None
    return cudnn.cudnn_attention(q, k, v, causal=causal)
