"""Our parameter tree <-> HF-named tensors, format-neutral (used by `hf` and `gguf` alike).

Each HF tensor kind is one `WeightRecord` in `RECORDS`: its HF name (with `{layer}` for the
per-layer tensors), the path of our parameter, its HF shape for a config, and the re-orientation
both ways. Our parameters stay stacked over layers (`[L, ...]`) with `[in, out]` kernels; HF
stores one `[out, in]` tensor per layer. Every re-orientation HF -> ours is a *view* (reshape of
the contiguous source, then transpose), so a loader reads each source tensor once and, with a
mesh, only the slices each device owns.

`load_hf_state_dict(cfg, source, ...)` builds a `GPTNeoX` from any source of HF-named arrays
(safetensors / .bin files in `hf`, dequantized GGUF tensors in `gguf`); `hf_state_dict(model)`
yields the HF tensors of a model lazily, one at a time.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import math
import os
import re
from typing import Callable, Iterator, Mapping, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pythia_jax import sharding as shd
from pythia_jax.config import ModelConfig
from pythia_jax.model import GPTNeoX, abstract_model
from pythia_jax.progress import progress_bar

__all__ = ["WeightRecord", "RECORDS", "CheckpointError", "HF_LEGACY_BUFFERS", "HF_ALIASES",
           "PARAM_DTYPES", "dtype_name", "TensorSource", "hf_names", "hf_shapes", "match_names",
           "load_hf_state_dict", "hf_state_dict"]


class CheckpointError(ValueError):
    """A checkpoint that does not match the model it claims to be."""


#: The parameter dtypes a model can be loaded in: name -> numpy dtype.
PARAM_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(jnp.bfloat16),
                "float16": np.dtype(np.float16)}


def dtype_name(dtype) -> str | None:
    """The `PARAM_DTYPES` name of `dtype` (a name, numpy or jax dtype), None if it is none."""
    try:
        dt = np.dtype(jnp.dtype(dtype))
    except TypeError:
        return None
    return next((name for name, d in PARAM_DTYPES.items() if d == dt), None)


# ------------------------------------------------------------------------------------------------
# The direct copies of the fast loader: HF tensor -> one (layer slice of a) final host buffer,
# cast to the buffer's dtype on the way.
#: Source rows per block of a transposing copy (measured best for fp16/bf16/fp32 sources).
_COPY_BLOCK_ROWS = 16


def _copy_reshaped(dst: np.ndarray, a: np.ndarray) -> None:
    """dst[...] = a.reshape(dst.shape) (cast)."""
    np.copyto(dst, a.reshape(dst.shape), casting="unsafe")


def _copy_transposed(dst: np.ndarray, a: np.ndarray) -> None:
    """dst[...] = a.T reshaped to dst's shape (cast), for an HF matrix `a` [rows, cols].

    Written as `dst.reshape(cols, rows)[:, i..i+k] = a[i..i+k].T` in blocks of a few source
    rows: sequential reads, cache-sized writes.
    """
    d2 = dst.reshape(a.shape[1], a.shape[0])
    step = _COPY_BLOCK_ROWS
    for i in range(0, a.shape[0], step):
        np.copyto(d2[:, i:i + step], a[i:i + step].T, casting="unsafe")


# ------------------------------------------------------------------------------------------------
# The records. Shape letters: d model width, N heads, H head dim, F MLP width, V vocab.
@dataclasses.dataclass(frozen=True)
class WeightRecord:
    """One HF tensor kind and how it maps onto (one layer slice of) our parameter."""

    hf_name: str                                           # "{layer}" marks a per-layer tensor
    path: tuple[str, ...]                                  # our parameter, nnx state path
    hf_shape: Callable[[ModelConfig], tuple[int, ...]]     # torch orientation ([out, in])
    to_ours: Callable[[np.ndarray, ModelConfig], np.ndarray]  # a view of the HF tensor
    to_hf: Callable[[np.ndarray], np.ndarray]              # our slice -> HF tensor
    copy_into: Callable[[np.ndarray, np.ndarray], None]    # dst[...] = to_ours(a) (cast)

    @property
    def layered(self) -> bool:
        return "{layer}" in self.hf_name

    def hf_key(self, layer: int | None) -> str:
        return self.hf_name.format(layer=layer) if self.layered else self.hf_name


def _same(a, cfg=None):
    return a


def _transposed(a, cfg=None):
    return a.T


def _qkv_w_to_ours(a, cfg):   # hf [N*3*H, d] (rows head-interleaved) -> ours [d, 3, N, H]
    return a.reshape(cfg.num_heads, 3, cfg.head_dim, cfg.hidden_size).transpose(3, 1, 0, 2)


def _qkv_w_to_hf(a):
    d, _, N, H = a.shape
    return a.transpose(2, 1, 3, 0).reshape(N * 3 * H, d)


def _qkv_b_to_ours(a, cfg):   # hf [N*3*H] -> ours [3, N, H]
    return a.reshape(cfg.num_heads, 3, cfg.head_dim).transpose(1, 0, 2)


def _qkv_b_to_hf(a):
    return a.transpose(1, 0, 2).reshape(-1)


def _copy_qkv_w(dst: np.ndarray, a: np.ndarray) -> None:
    """dst [d, 3, N, H] = `_qkv_w_to_ours(a)` (cast): one transposing copy per (q/k/v, head)
    block of HF rows [H, d] (contiguous reads; `dst` slices are written in place, never through
    a reshape, which would copy a non-contiguous view)."""
    d, three, N, H = dst.shape
    a4 = a.reshape(N, three, H, d)
    for n in range(N):
        for s in range(three):
            np.copyto(dst[:, s, n, :], a4[n, s].T, casting="unsafe")


def _copy_qkv_b(dst: np.ndarray, a: np.ndarray) -> None:
    three, N, H = dst.shape
    np.copyto(dst, a.reshape(N, three, H).transpose(1, 0, 2), casting="unsafe")


def _attn_out_w_to_ours(a, cfg):  # hf [d, N*H] -> ours [N, H, d]
    return a.reshape(cfg.hidden_size, cfg.num_heads, cfg.head_dim).transpose(1, 2, 0)


def _attn_out_w_to_hf(a):
    N, H, d = a.shape
    return a.transpose(2, 0, 1).reshape(d, N * H)


def _d(c):
    return (c.hidden_size,)


def _f(c):
    return (c.intermediate_size,)


def _vd(c):
    return (c.vocab_size, c.hidden_size)


def _same_record(hf_name, path, hf_shape):
    return WeightRecord(hf_name, path, hf_shape, _same, _same, _copy_reshaped)


def _layer(suffix: str) -> str:
    return "gpt_neox.layers.{layer}." + suffix


#: Every HF tensor of a GPT-NeoX model, in llama.cpp's converter order (embedding, per layer,
#: final norm, output), which is also the order `save_pretrained` writes.
RECORDS: tuple[WeightRecord, ...] = (
    _same_record("gpt_neox.embed_in.weight", ("embed_in", "embedding"), _vd),
    _same_record(_layer("input_layernorm.weight"), ("layers", "input_layernorm", "scale"), _d),
    _same_record(_layer("input_layernorm.bias"), ("layers", "input_layernorm", "bias"), _d),
    WeightRecord(_layer("attention.query_key_value.weight"),
                 ("layers", "attention", "query_key_value", "kernel"),
                 lambda c: (3 * c.num_heads * c.head_dim, c.hidden_size),
                 _qkv_w_to_ours, _qkv_w_to_hf, _copy_qkv_w),
    WeightRecord(_layer("attention.query_key_value.bias"),
                 ("layers", "attention", "query_key_value", "bias"),
                 lambda c: (3 * c.num_heads * c.head_dim,),
                 _qkv_b_to_ours, _qkv_b_to_hf, _copy_qkv_b),
    WeightRecord(_layer("attention.dense.weight"), ("layers", "attention", "dense", "kernel"),
                 lambda c: (c.hidden_size, c.num_heads * c.head_dim),
                 _attn_out_w_to_ours, _attn_out_w_to_hf, _copy_transposed),
    _same_record(_layer("attention.dense.bias"), ("layers", "attention", "dense", "bias"), _d),
    _same_record(_layer("post_attention_layernorm.weight"),
                 ("layers", "post_attention_layernorm", "scale"), _d),
    _same_record(_layer("post_attention_layernorm.bias"),
                 ("layers", "post_attention_layernorm", "bias"), _d),
    WeightRecord(_layer("mlp.dense_h_to_4h.weight"), ("layers", "mlp", "dense_h_to_4h", "kernel"),
                 lambda c: (c.intermediate_size, c.hidden_size),
                 _transposed, _transposed, _copy_transposed),
    _same_record(_layer("mlp.dense_h_to_4h.bias"), ("layers", "mlp", "dense_h_to_4h", "bias"), _f),
    WeightRecord(_layer("mlp.dense_4h_to_h.weight"), ("layers", "mlp", "dense_4h_to_h", "kernel"),
                 lambda c: (c.hidden_size, c.intermediate_size),
                 _transposed, _transposed, _copy_transposed),
    _same_record(_layer("mlp.dense_4h_to_h.bias"), ("layers", "mlp", "dense_4h_to_h", "bias"), _d),
    _same_record("gpt_neox.final_layer_norm.weight", ("final_layer_norm", "scale"), _d),
    _same_record("gpt_neox.final_layer_norm.bias", ("final_layer_norm", "bias"), _d),
    _same_record("embed_out.weight", ("embed_out", "embedding"), _vd),
)

#: Buffers older transformers versions saved; they carry no parameters and are skipped.
HF_LEGACY_BUFFERS = re.compile(
    r"^gpt_neox\.layers\.\d+\.attention\.(bias|masked_bias|rotary_emb\.inv_freq)$"
    r"|^gpt_neox\.rotary_emb\.inv_freq$")
#: Other names for the same tensor (transformers >= 5 may call embed_out `lm_head`).
HF_ALIASES = {"lm_head.weight": "embed_out.weight"}


def _entries(cfg: ModelConfig) -> Iterator[tuple[str, WeightRecord, int | None]]:
    """(HF name, record, layer or None) for every HF tensor of `cfg`, in `RECORDS` order with
    the per-layer records expanded layer by layer where they stand."""
    per_layer = [r for r in RECORDS if r.layered]
    for r in RECORDS:
        if not r.layered:
            yield r.hf_key(None), r, None
        elif r is per_layer[0]:
            for i in range(cfg.num_layers):
                for lr in per_layer:
                    yield lr.hf_key(i), lr, i


def hf_names(cfg: ModelConfig) -> list[str]:
    """Every HF tensor name of a model of `cfg`, in llama.cpp's converter order."""
    return [n for n, _, _ in _entries(cfg)]


def hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF name -> torch-orientation shape, for every tensor of a model of `cfg` (in order)."""
    return {n: tuple(r.hf_shape(cfg)) for n, r, _ in _entries(cfg)}


# ------------------------------------------------------------------------------------------------
# Loading
class TensorSource(Protocol):
    """HF-named arrays, read lazily: what `load_hf_state_dict` needs from a format."""

    shapes: Mapping[str, tuple[int, ...]]   # key -> shape, without reading the data
    origin: Mapping[str, str]               # key -> the file it lives in (for error messages)

    def keys(self): ...

    def get(self, key: str) -> np.ndarray: ...


def match_names(cfg: ModelConfig, src: TensorSource, where: str) -> dict[str, str]:
    """HF name -> the source's key for it; missing, unexpected or mis-shaped tensors are a
    `CheckpointError` naming the tensor (legacy buffers are skipped, aliases accepted)."""
    want = hf_shapes(cfg)
    names: dict[str, str] = {}
    for k in sorted(k for k in src.keys() if not HF_LEGACY_BUFFERS.match(k)):
        ours = HF_ALIASES.get(k, k)
        if ours not in want:
            raise CheckpointError(f"{src.origin[k]}: unexpected tensor {k!r} (not part of a "
                                  f"GPT-NeoX model with {cfg.num_layers} layers)")
        if ours in names:
            raise CheckpointError(f"{src.origin[k]}: both {names[ours]!r} and {k!r} present")
        names[ours] = k
    missing = [k for k in want if k not in names]
    if missing:
        raise CheckpointError(f"{where}: missing tensor {missing[0]!r}"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    for ours, k in names.items():
        if tuple(src.shapes[k]) != want[ours]:
            raise CheckpointError(f"{src.origin[k]}: tensor {k!r} has shape "
                                  f"{tuple(src.shapes[k])}, expected {want[ours]} for this config")
    return names


#: Host buffers handed to JAX are aligned so that the CPU client can adopt them without a copy.
_HOST_ALIGN = 64


def _aligned_empty(shape: tuple[int, ...], dtype) -> np.ndarray:
    dtype = np.dtype(dtype)
    n = math.prod(shape) * dtype.itemsize
    raw = np.empty(n + _HOST_ALIGN, np.uint8)
    off = (-raw.ctypes.data) % _HOST_ALIGN
    return raw[off:off + n].view(dtype).reshape(shape)


def load_hf_state_dict(cfg: ModelConfig, src: TensorSource, *, where: str, param_dtype,
                       mesh=None, progress: bool = False) -> GPTNeoX:
    """Build a GPTNeoX whose parameters come from `src` (HF names), sharded over `mesh` if given.

    Without a mesh every tensor is copied once, straight into the final host buffer; with one,
    each device's block is read from the source views (`jax.make_array_from_callback`).
    """
    names = match_names(cfg, src, where)
    param_dtype = np.dtype(param_dtype)
    # our parameter path -> [(layer or None, record, source key)]
    feeds: dict[tuple[str, ...], list] = {}
    for hf_name, rec, layer in _entries(cfg):
        feeds.setdefault(rec.path, []).append((layer, rec, names[hf_name]))

    graphdef, state = nnx.split(abstract_model(cfg))
    flat = dict(nnx.to_flat_state(state))
    params = []
    for path, var in flat.items():
        spath = tuple(str(p) for p in path)
        if spath not in feeds:
            raise AssertionError(f"no checkpoint tensor feeds parameter {'.'.join(spath)}")
        params.append((var, feeds[spath]))
    if mesh is None:
        bar = progress_bar(len(names), "loading", progress, unit="tensor")  # per source tensor
        _fill_unsharded(params, src, param_dtype, bar)
    else:
        bar = progress_bar(len(params), "loading", progress, unit="tensor")
        for var, entries in params:
            _place_sharded(var, entries, src, cfg, param_dtype, mesh)
            bar.update(1)
    bar.close()
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _place_sharded(var, entries, src: TensorSource, cfg: ModelConfig, param_dtype, mesh) -> None:
    """One parameter as a jax array sharded by its logical axes, each device reading only the
    block its index selects (through the views of `to_ours`)."""
    shape = tuple(var.get_value().shape)

    def read(index):
        index = tuple(index) + (slice(None),) * (len(shape) - len(index))
        if entries[0][0] is None:
            _, rec, k = entries[0]
            return np.asarray(rec.to_ours(src.get(k), cfg)[index], dtype=param_dtype)
        by_layer = {layer: (rec, k) for layer, rec, k in entries}
        parts = [np.asarray(by_layer[l][0].to_ours(src.get(by_layer[l][1]), cfg)[index[1:]],
                            dtype=param_dtype) for l in range(shape[0])[index[0]]]
        return np.stack(parts) if parts else np.zeros((0,) + shape[1:], param_dtype)

    spec = shd.logical_to_spec(var.logical_axes, shape=shape, mesh=mesh)
    var.set_value(jax.make_array_from_callback(shape, jax.sharding.NamedSharding(mesh, spec), read))


def _fill_unsharded(params, src: TensorSource, param_dtype, bar) -> None:
    """Every parameter in one pass: each source tensor is converted and re-oriented straight
    into an aligned host buffer of the final (stacked) array, tensors in parallel threads (numpy
    releases the GIL while copying), and the buffers become jax arrays without another copy."""
    bufs, jobs = [], []
    for var, entries in params:
        buf = _aligned_empty(tuple(var.get_value().shape), param_dtype)
        bufs.append((var, buf))
        for layer, rec, k in entries:
            jobs.append((buf if layer is None else buf[layer], rec, k))

    def run(job):
        dst, rec, k = job
        rec.copy_into(dst, src.get(k))

    with cf.ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        futures = [pool.submit(run, j) for j in jobs]
        try:
            for f in cf.as_completed(futures):
                f.result()
                bar.update(1)
        except BaseException:
            for f in futures:
                f.cancel()
            raise
    cpu = jax.devices("cpu")[0] if jax.default_backend() == "cpu" else None
    for var, buf in bufs:
        # On the CPU backend an aligned buffer is adopted as is (no copy); elsewhere this is the
        # one host-to-device transfer.
        var.set_value(jax.device_put(buf, cpu, may_alias=True) if cpu is not None
                      else jnp.asarray(buf))


# ------------------------------------------------------------------------------------------------
# Saving
def hf_state_dict(model: GPTNeoX, dtype=None) -> Iterator[tuple[str, tuple, np.dtype, Callable]]:
    """(HF name, shape, dtype, thunk) for every HF tensor of `model`, computed lazily one at a
    time by the thunk. dtype: the tensors' dtype (default: the parameters')."""
    cfg = model.config
    flat = {tuple(str(p) for p in path): v
            for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    for hf_name, rec, layer in _entries(cfg):
        arr = flat[rec.path].get_value()
        out_dt = np.dtype(jnp.dtype(dtype)) if dtype is not None else np.dtype(arr.dtype)

        def thunk(arr=arr, layer=layer, rec=rec, out_dt=out_dt):
            a = np.asarray(arr[layer] if layer is not None else arr)
            return np.ascontiguousarray(rec.to_hf(a)).astype(out_dt, copy=False)
        yield hf_name, tuple(rec.hf_shape(cfg)), out_dt, thunk
