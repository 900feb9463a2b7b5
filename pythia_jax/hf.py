"""HF PyTorch checkpoints <-> pythia-jax models.

`from_pretrained(src)` reads a local HF directory, an HF hub id (with `revision="step3000"`), a
pythia-jax checkpoint directory (`convert.py --to=jax` output or a training workdir) or a GGUF
file. `save_pretrained(model, dst)` writes `config.json` (the hub's Pythia schema), safetensors
(sharded with an index above `max_shard_size`) and the tokenizer, into a temporary directory that
is renamed into place only when complete.

Every HF tensor maps to our stacked layout through views only (reshape of the contiguous source,
then transpose), so loading reads each source tensor once, and with a mesh reads only the slices
each device needs.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import shutil
import struct
import tempfile
from typing import Any, Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from pythia_jax.config import ConfigError, ModelConfig
from pythia_jax.model import GPTNeoX, abstract_model, dtype_of
from pythia_jax.progress import progress_bar

__all__ = ["from_pretrained", "save_pretrained", "CheckpointError", "hf_state_dict",
           "load_hf_state_dict", "SafetensorsFile", "write_safetensors", "HF_LEGACY_BUFFERS"]

log = logging.getLogger("pythia_jax")


class CheckpointError(ValueError):
    """A checkpoint that does not match the model it claims to be."""


# ------------------------------------------------------------------------------------------------
# safetensors: a zero-copy reader (memmap) and a streaming writer. numpy has no bfloat16, so we
# use ml_dtypes (a JAX dependency) and handle the format directly.
_ST_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


class SafetensorsFile:
    """Memory-mapped safetensors file: `f.keys()`, `f.shape(k)`, `f.get(k)` (a read-only view)."""

    def __init__(self, path: str):
        self.path = path
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: not a safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, 100 << 20):
                raise CheckpointError(f"{path}: not a safetensors file (header length {n} "
                                      f"exceeds the file size {size})")
            try:
                header = json.loads(fh.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{path}: malformed safetensors header: {e}") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self._entries = header
        self._base = 8 + n
        self._mm = np.memmap(path, dtype=np.uint8, mode="r") if size > self._base else None
        data_len = size - self._base
        for k, e in header.items():
            if e.get("dtype") not in _ST_DTYPES:
                raise CheckpointError(f"{path}: tensor {k!r} has unsupported dtype {e.get('dtype')!r}")
            start, end = e["data_offsets"]
            want = math.prod(e["shape"]) * _ST_DTYPES[e["dtype"]].itemsize
            if end - start != want or end > data_len:
                raise CheckpointError(f"{path}: tensor {k!r} data range [{start}, {end}) does not "
                                      f"fit shape {e['shape']} / file data length {data_len}")

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._entries[key]["shape"])

    def dtype(self, key: str) -> np.dtype:
        return _ST_DTYPES[self._entries[key]["dtype"]]

    def get(self, key: str) -> np.ndarray:
        e = self._entries[key]
        start, end = e["data_offsets"]
        dt = _ST_DTYPES[e["dtype"]]
        if end == start:
            return np.zeros(e["shape"], dt)
        buf = self._mm[self._base + start: self._base + end]
        return buf.view(dt).reshape(e["shape"])


def write_safetensors(path: str, tensors: Iterable[tuple[str, np.ndarray]] | dict,
                      metadata: dict | None = None) -> None:
    """Write tensors one at a time (only the header is built up front; needs shapes/dtypes).

    `tensors` may be a dict or a list of (name, array-or-thunk) where a thunk is a zero-argument
    callable returning the array; shapes/dtypes must then be given as (name, (shape, dtype, thunk)).
    """
    items = list(tensors.items()) if isinstance(tensors, dict) else list(tensors)
    specs = []
    offset = 0
    for name, t in items:
        if isinstance(t, tuple):
            shape, dt, thunk = t
        else:
            shape, dt, thunk = t.shape, t.dtype, (lambda t=t: t)
        dt = np.dtype(dt)
        if dt not in _ST_NAMES:
            raise TypeError(f"{path}: tensor {name!r}: unsupported dtype {dt}")
        nbytes = math.prod(shape) * dt.itemsize
        specs.append((name, tuple(int(s) for s in shape), dt, thunk, offset, offset + nbytes))
        offset += nbytes
    header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    for name, shape, dt, _, a, b in specs:
        header[name] = {"dtype": _ST_NAMES[dt], "shape": list(shape), "data_offsets": [a, b]}
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(hb)))
        fh.write(hb)
        for name, shape, dt, thunk, a, b in specs:
            arr = np.asarray(thunk(), dtype=dt, order="C")  # keeps 0-d tensors 0-d
            if arr.shape != shape:
                raise ValueError(f"{path}: tensor {name!r}: shape {arr.shape} != declared {shape}")
            fh.write(arr.tobytes() if arr.nbytes < (1 << 26) else memoryview(arr.reshape(-1).view(np.uint8)))


# ------------------------------------------------------------------------------------------------
# The key map: HF name -> (our param path, layer index or None, view transform HF -> ours)
HF_LEGACY_BUFFERS = re.compile(
    r"^gpt_neox\.layers\.\d+\.attention\.(bias|masked_bias|rotary_emb\.inv_freq)$"
    r"|^gpt_neox\.rotary_emb\.inv_freq$")

_LAYER_MAP = {
    # hf suffix: (our path, kind)
    "input_layernorm.weight": (("layers", "input_layernorm", "scale"), "id"),
    "input_layernorm.bias": (("layers", "input_layernorm", "bias"), "id"),
    "post_attention_layernorm.weight": (("layers", "post_attention_layernorm", "scale"), "id"),
    "post_attention_layernorm.bias": (("layers", "post_attention_layernorm", "bias"), "id"),
    "attention.query_key_value.weight": (("layers", "attention", "query_key_value", "kernel"), "qkv_w"),
    "attention.query_key_value.bias": (("layers", "attention", "query_key_value", "bias"), "qkv_b"),
    "attention.dense.weight": (("layers", "attention", "dense", "kernel"), "attn_out_w"),
    "attention.dense.bias": (("layers", "attention", "dense", "bias"), "id"),
    "mlp.dense_h_to_4h.weight": (("layers", "mlp", "dense_h_to_4h", "kernel"), "T"),
    "mlp.dense_h_to_4h.bias": (("layers", "mlp", "dense_h_to_4h", "bias"), "id"),
    "mlp.dense_4h_to_h.weight": (("layers", "mlp", "dense_4h_to_h", "kernel"), "T"),
    "mlp.dense_4h_to_h.bias": (("layers", "mlp", "dense_4h_to_h", "bias"), "id"),
}
_TOP_MAP = {
    "gpt_neox.embed_in.weight": (("embed_in", "embedding"), "id"),
    "gpt_neox.final_layer_norm.weight": (("final_layer_norm", "scale"), "id"),
    "gpt_neox.final_layer_norm.bias": (("final_layer_norm", "bias"), "id"),
    "embed_out.weight": (("embed_out", "embedding"), "id"),
}


def _hf_shape(kind: str, ours: tuple[int, ...]) -> tuple[int, ...]:
    """The HF tensor shape that maps onto one layer-slice of our parameter of shape `ours`."""
    if kind == "id":
        return ours
    if kind == "qkv_w":  # ours [d, N, 3, H]  <- hf [N*3*H, d]
        d, N, three, H = ours
        return (N * three * H, d)
    if kind == "qkv_b":  # ours [N, 3, H] <- hf [N*3*H]
        return (math.prod(ours),)
    if kind == "attn_out_w":  # ours [N, H, d] <- hf [d, N*H]
        N, H, d = ours
        return (d, N * H)
    if kind == "T":
        return ours[::-1]
    raise AssertionError(kind)


def _to_ours(kind: str, a: np.ndarray, ours: tuple[int, ...]) -> np.ndarray:
    """HF tensor -> our orientation, as a view whenever the source is contiguous."""
    if kind == "id":
        return a
    if kind == "qkv_w":
        d, N, three, H = ours
        return a.reshape(N, three, H, d).transpose(3, 0, 1, 2)
    if kind == "qkv_b":
        return a.reshape(ours)
    if kind == "attn_out_w":
        N, H, d = ours
        return a.reshape(d, N, H).transpose(1, 2, 0)
    if kind == "T":
        return a.T
    raise AssertionError(kind)


def _to_hf(kind: str, a: np.ndarray) -> np.ndarray:
    """Our orientation (one layer slice) -> HF tensor."""
    if kind == "id":
        return a
    if kind == "qkv_w":
        d = a.shape[0]
        return a.transpose(1, 2, 3, 0).reshape(-1, d)
    if kind == "qkv_b":
        return a.reshape(-1)
    if kind == "attn_out_w":
        N, H, d = a.shape
        return a.transpose(2, 0, 1).reshape(d, N * H)
    if kind == "T":
        return a.T
    raise AssertionError(kind)


def hf_key_map(cfg: ModelConfig) -> dict[str, tuple[tuple[str, ...], int | None, str]]:
    """HF key -> (our param path, layer index or None, transform kind)."""
    out = {k: (path, None, kind) for k, (path, kind) in _TOP_MAP.items()}
    for i in range(cfg.num_layers):
        for suffix, (path, kind) in _LAYER_MAP.items():
            out[f"gpt_neox.layers.{i}.{suffix}"] = (path, i, kind)
    return out


# ------------------------------------------------------------------------------------------------
# Reading a checkpoint's tensors (safetensors, sharded safetensors, .bin, sharded .bin)
class _TensorSource:
    """name -> lazily read numpy array, over one or many files."""

    def __init__(self, where: dict[str, Callable[[], np.ndarray]], shapes: dict[str, tuple],
                 origin: dict[str, str]):
        self._where, self.shapes, self.origin = where, shapes, origin

    def keys(self):
        return self._where.keys()

    def get(self, key: str) -> np.ndarray:
        return self._where[key]()


def _open_safetensors(files: list[str]) -> _TensorSource:
    where, shapes, origin = {}, {}, {}
    for path in files:
        f = SafetensorsFile(path)
        for k in f.keys():
            where[k] = (lambda f=f, k=k: f.get(k))
            shapes[k] = f.shape(k)
            origin[k] = path
    return _TensorSource(where, shapes, origin)


def _torch_to_numpy(t) -> np.ndarray:
    import torch
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def _open_torch_bins(files: list[str]) -> _TensorSource:
    try:
        import torch
    except ImportError:
        raise ImportError(f"{files[0]}: reading pytorch_model.bin needs PyTorch; install the "
                          "torch extra: pip install 'pythia-jax[torch]'") from None
    where, shapes, origin = {}, {}, {}
    for path in files:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            raise CheckpointError(f"{path}: cannot read PyTorch checkpoint: {e}") from None
        for k, t in sd.items():
            where[k] = (lambda t=t: _torch_to_numpy(t))
            shapes[k] = tuple(t.shape)
            origin[k] = path
    return _TensorSource(where, shapes, origin)


def _find_weight_files(d: str) -> tuple[str, list[str]]:
    """('safetensors' | 'bin', [files]) for an HF directory."""
    def from_index(index_name):
        p = os.path.join(d, index_name)
        try:
            with open(p) as fh:
                wm = json.load(fh)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{p}: malformed shard index (expected a 'weight_map'): {e}") from None
        files = sorted(set(wm.values()))
        missing = [f for f in files if not os.path.isfile(os.path.join(d, f))]
        if missing:
            raise CheckpointError(f"{p}: shard files listed but missing: {missing}")
        return [os.path.join(d, f) for f in files]

    if os.path.isfile(os.path.join(d, "model.safetensors")):
        return "safetensors", [os.path.join(d, "model.safetensors")]
    if os.path.isfile(os.path.join(d, "model.safetensors.index.json")):
        return "safetensors", from_index("model.safetensors.index.json")
    if os.path.isfile(os.path.join(d, "pytorch_model.bin")):
        return "bin", [os.path.join(d, "pytorch_model.bin")]
    if os.path.isfile(os.path.join(d, "pytorch_model.bin.index.json")):
        return "bin", from_index("pytorch_model.bin.index.json")
    raise CheckpointError(f"{d}: no model.safetensors, model.safetensors.index.json, "
                          "pytorch_model.bin or pytorch_model.bin.index.json")


def open_hf_checkpoint(d: str) -> _TensorSource:
    kind, files = _find_weight_files(d)
    return _open_safetensors(files) if kind == "safetensors" else _open_torch_bins(files)


def _check_keys(cfg: ModelConfig, src: _TensorSource, where: str) -> dict[str, str]:
    """Map our expected HF keys to the checkpoint's names; reject missing/unexpected/mis-shaped."""
    names = {}
    present = set(src.keys())
    for k in list(present):
        if HF_LEGACY_BUFFERS.match(k):
            present.discard(k)
    # transformers >= 5 may call embed_out `lm_head`
    rename = {"lm_head.weight": "embed_out.weight"}
    keymap = hf_key_map(cfg)
    abstract = _abstract_shapes(cfg)
    for k in sorted(present):
        ours = rename.get(k, k)
        if ours not in keymap:
            raise CheckpointError(f"{src.origin[k]}: unexpected tensor {k!r} (not part of a "
                                  f"GPT-NeoX model with {cfg.num_layers} layers)")
        if ours in names:
            raise CheckpointError(f"{src.origin[k]}: both {names[ours]!r} and {k!r} present")
        names[ours] = k
    missing = [k for k in keymap if k not in names]
    if missing:
        raise CheckpointError(f"{where}: missing tensor {missing[0]!r}"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    for ours, k in names.items():
        path, layer, kind = keymap[ours]
        full = abstract[path]
        want = _hf_shape(kind, full[1:] if layer is not None else full)
        if tuple(src.shapes[k]) != tuple(want):
            raise CheckpointError(f"{src.origin[k]}: tensor {k!r} has shape "
                                  f"{tuple(src.shapes[k])}, expected {tuple(want)} for this config")
    return names


def _abstract_shapes(cfg: ModelConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    m = abstract_model(cfg)
    out = {}
    for path, v in nnx.to_flat_state(nnx.state(m, nnx.Param)):
        out[tuple(str(p) for p in path)] = tuple(v.get_value().shape)
    return out


def load_hf_state_dict(cfg: ModelConfig, src: _TensorSource, *, where: str, param_dtype,
                       mesh=None, progress: bool = False) -> GPTNeoX:
    """Build a GPTNeoX whose parameters come from `src` (HF names), sharded over `mesh` if given."""
    names = _check_keys(cfg, src, where)
    keymap = hf_key_map(cfg)
    by_param: dict[tuple, list] = {}
    for ours, k in names.items():
        path, layer, kind = keymap[ours]
        by_param.setdefault(path, []).append((layer, kind, k))

    abstract = abstract_model(cfg)
    graphdef, state = nnx.split(abstract)
    flat = dict(nnx.to_flat_state(state))
    from pythia_jax import sharding as shd

    it = list(flat.items())
    for path, _ in it:
        if tuple(str(p) for p in path) not in by_param:
            raise AssertionError(f"no checkpoint tensor feeds parameter {'.'.join(map(str, path))}")
    if mesh is None:
        bar = _progress(len(names), "loading", progress)  # one tick per checkpoint tensor
        _fill_unsharded(it, by_param, src, param_dtype, bar)
        bar.close()
        return nnx.merge(graphdef, nnx.from_flat_state(flat))
    bar = _progress(len(it), "loading", progress)

    for path, var in it:
        spath = tuple(str(p) for p in path)
        shape = tuple(var.get_value().shape)
        entries = by_param[spath]

        def read(index, entries=entries, shape=shape):
            """Our stacked tensor [index], reading only what the index touches."""
            index = tuple(index) + (slice(None),) * (len(shape) - len(index))
            if entries[0][0] is None:
                layer, kind, k = entries[0]
                return np.asarray(_to_ours(kind, src.get(k), shape)[index], dtype=param_dtype)
            by_layer = {layer: (kind, k) for layer, kind, k in entries}
            layers = range(shape[0])[index[0]]
            parts = [np.asarray(_to_ours(by_layer[l][0], src.get(by_layer[l][1]), shape[1:])[index[1:]],
                                dtype=param_dtype) for l in layers]
            return np.stack(parts) if parts else np.zeros((0,) + shape[1:], param_dtype)

        spec = shd.logical_to_spec(var.logical_axes, shape=shape, mesh=mesh)
        sharding = jax.sharding.NamedSharding(mesh, spec)
        var.set_value(jax.make_array_from_callback(shape, sharding, read))
        bar.update(1)
    bar.close()
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


#: Host buffers handed to JAX are aligned so that the CPU client can adopt them without a copy.
_HOST_ALIGN = 64
#: Source rows per block of a transposing copy (measured best for fp16/bf16/fp32 sources).
_COPY_BLOCK_ROWS = 16


def _aligned_empty(shape: tuple[int, ...], dtype) -> np.ndarray:
    dtype = np.dtype(dtype)
    n = math.prod(shape) * dtype.itemsize
    raw = np.empty(n + _HOST_ALIGN, np.uint8)
    off = (-raw.ctypes.data) % _HOST_ALIGN
    return raw[off:off + n].view(dtype).reshape(shape)


def _copy_hf_into(dst: np.ndarray, kind: str, a: np.ndarray) -> None:
    """dst[...] = _to_ours(kind, a) cast to dst's dtype, written straight into `dst`.

    Every re-orientation in `_to_ours` is a 2-D transpose of the HF matrix followed by a
    reshape of the result, so it is copied as `dst.reshape(cols, rows)[:, rows i..i+k] =
    a[i..i+k].T` in blocks of a few source rows (sequential reads, cache-sized writes).
    """
    if kind in ("qkv_w", "attn_out_w", "T"):
        d2 = dst.reshape(a.shape[1], a.shape[0])
        step = _COPY_BLOCK_ROWS
        for i in range(0, a.shape[0], step):
            np.copyto(d2[:, i:i + step], a[i:i + step].T, casting="unsafe")
    else:
        np.copyto(dst, a.reshape(dst.shape), casting="unsafe")


def _fill_unsharded(items, by_param, src: _TensorSource, param_dtype, bar) -> None:
    """Every parameter in one pass: each checkpoint tensor is converted and re-oriented straight
    into an aligned host buffer of the final (stacked) array, tensors in parallel threads (numpy
    releases the GIL while copying), and the buffers become jax arrays without another copy."""
    import concurrent.futures as cf

    bufs, jobs = [], []
    for path, var in items:
        shape = tuple(var.get_value().shape)
        buf = _aligned_empty(shape, param_dtype)
        bufs.append((var, buf))
        for layer, kind, k in by_param[tuple(str(p) for p in path)]:
            jobs.append((buf if layer is None else buf[layer], kind, k))

    def run(job):
        dst, kind, k = job
        _copy_hf_into(dst, kind, src.get(k))

    workers = min(8, os.cpu_count() or 1)
    with cf.ThreadPoolExecutor(max_workers=workers) as pool:
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


def _progress(total, desc, enabled):
    return progress_bar(total, desc, enabled, unit="tensor")


# ------------------------------------------------------------------------------------------------
def _resolve_hub(src: str, revision: str | None) -> str:
    """Download config + weights (+ tokenizer) of a hub repo; returns the local snapshot dir."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    def get(name):
        return hf_hub_download(src, name, revision=revision)

    try:
        cfg_path = get("config.json")
    except LocalEntryNotFoundError as e:
        raise OSError(f"{src!r} (revision {revision or 'main'}) is not in the local HF cache and "
                      f"the hub cannot be reached (offline?); pass a local directory instead. "
                      f"({e})") from None
    except Exception as e:
        raise OSError(f"could not fetch config.json of {src!r} revision {revision or 'main'} "
                      f"from the HF hub: {e}") from None
    d = os.path.dirname(cfg_path)
    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        for name in (single, index):
            try:
                p = get(name)
            except EntryNotFoundError:
                continue
            except Exception as e:
                raise OSError(f"could not fetch {name} of {src!r}: {e}") from None
            if name == index:
                with open(p) as fh:
                    for shard in sorted(set(json.load(fh)["weight_map"].values())):
                        get(shard)
            for tok in ("tokenizer.json", "tokenizer_config.json"):
                try:
                    get(tok)
                except Exception:
                    pass
            return d
    raise CheckpointError(f"{src!r} revision {revision or 'main'}: no weights on the hub "
                          "(model.safetensors / pytorch_model.bin)")


_DTYPE_NAMES = {np.dtype(np.float32): "float32", np.dtype(ml_dtypes.bfloat16): "bfloat16",
                np.dtype(np.float16): "float16"}


def _is_hub_id(src: str) -> bool:
    return (not os.path.exists(src) and re.fullmatch(r"[\w.-]+/[\w.-]+", src) is not None)


def from_pretrained(src: str | os.PathLike, revision: str | None = None, dtype=None, *,
                    compute_dtype: str | None = None, mesh=None, progress: bool = False,
                    **config_overrides) -> GPTNeoX:
    """Load a model from an HF directory / hub id, a pythia-jax checkpoint, or a GGUF file.

    dtype: parameter dtype (default float32: checkpoints in fp16/bf16 are upcast exactly);
    "auto" keeps the dtype the checkpoint stores.
    compute_dtype: activation / matmul dtype ("float32" default, "bfloat16").
    config_overrides: execution options such as `attention_impl="pallas"`, `fused_rotary=True`,
    `scan_layers=True`, `remat="full"`.
    mesh: place each parameter directly sharded by the logical-axis rules.
    """
    src = os.fspath(src)
    auto = dtype == "auto"
    try:
        param_dtype = np.dtype(jnp.dtype("float32" if auto or dtype is None else dtype))
    except TypeError:
        param_dtype = None
    pd_name = _DTYPE_NAMES.get(param_dtype)
    if pd_name is None:
        raise ValueError(f"dtype: expected 'auto', float32, bfloat16 or float16, got {dtype!r}")
    if src.endswith(".gguf"):
        from pythia_jax import gguf as gguf_lib
        return gguf_lib.load_gguf(src, dtype="auto" if auto else pd_name, mesh=mesh,
                                  compute_dtype=compute_dtype, progress=progress,
                                  **config_overrides)
    if os.path.isdir(src) and not os.path.isfile(os.path.join(src, "config.json")):
        from pythia_jax import checkpoint as ckpt_lib
        return ckpt_lib.load_model(src, dtype=None if auto else pd_name, mesh=mesh,
                                   compute_dtype=compute_dtype, **config_overrides)
    if _is_hub_id(src):
        src = _resolve_hub(src, revision)
    elif not os.path.isdir(src):
        raise FileNotFoundError(f"{src}: no such directory (expected an HF checkpoint directory, "
                                "a pythia-jax checkpoint, a .gguf file or a hub id like "
                                "'EleutherAI/pythia-70m')")
    tensors = open_hf_checkpoint(src)
    if auto:  # keep the dtype the checkpoint stores (e.g. fp16 for hub Pythia checkpoints)
        first = next((k for k in tensors.keys() if not HF_LEGACY_BUFFERS.match(k)), None)
        stored = np.dtype(tensors.get(first).dtype) if first else param_dtype
        if stored in _DTYPE_NAMES:
            param_dtype, pd_name = stored, _DTYPE_NAMES[stored]
    if compute_dtype is not None:
        config_overrides["dtype"] = compute_dtype
    cfg = ModelConfig.from_hf_json(os.path.join(src, "config.json"),
                                   param_dtype=pd_name, **config_overrides)
    return load_hf_state_dict(cfg, tensors, where=src, param_dtype=param_dtype, mesh=mesh,
                              progress=progress)


# ------------------------------------------------------------------------------------------------
def hf_state_dict(model: GPTNeoX, dtype=None) -> Iterator[tuple[str, tuple, np.dtype, Callable]]:
    """(hf_name, shape, dtype, thunk) for every HF tensor, computed lazily one at a time."""
    cfg = model.config
    flat = {tuple(str(p) for p in path): v
            for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    for hf_name, (path, layer, kind) in hf_key_map(cfg).items():
        var = flat[path]
        arr = var.get_value()
        out_dt = np.dtype(jnp.dtype(dtype)) if dtype is not None else np.dtype(arr.dtype)
        if any(s in hf_name for s in ("layernorm", "final_layer_norm")) or hf_name.endswith(".bias"):
            pass  # same dtype as the weights, as HF stores them
        one = tuple(arr.shape[1:] if layer is not None else arr.shape)
        shape = _hf_shape(kind, one)

        def thunk(arr=arr, layer=layer, kind=kind, out_dt=out_dt):
            a = np.asarray(arr[layer] if layer is not None else arr)
            return np.ascontiguousarray(_to_hf(kind, a)).astype(out_dt, copy=False)
        yield hf_name, shape, out_dt, thunk


def _parse_size(s) -> int:
    if isinstance(s, int):
        return s
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B)?\s*", str(s), re.I)
    if not m:
        raise ValueError(f"max_shard_size: expected e.g. '5GB' or an int, got {s!r}")
    mult = {None: 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
    return int(float(m.group(1)) * mult[m.group(2).lower() if m.group(2) else None])


_TOKENIZER_CONFIG = {
    "tokenizer_class": "GPTNeoXTokenizer",
    "bos_token": "<|endoftext|>",
    "eos_token": "<|endoftext|>",
    "unk_token": "<|endoftext|>",
    "pad_token": "<|padding|>",
    "add_prefix_space": False,
    "add_bos_token": False,
    "add_eos_token": False,
    "model_max_length": 2048,
}


def save_pretrained(model: GPTNeoX, dst: str | os.PathLike, dtype=None, *,
                    max_shard_size: int | str = "5GB", tokenizer: str | None | bool = True,
                    overwrite: bool = False, progress: bool = False) -> str:
    """Write an HF checkpoint directory that `GPTNeoXForCausalLM.from_pretrained` loads cleanly.

    dtype: tensor dtype on disk (default: the model's parameter dtype). tokenizer: True = the
    bundled GPT-NeoX-20B tokenizer, a path = that tokenizer.json, False/None = none.
    The directory is assembled under a temporary name and renamed at the end.
    """
    dst = os.path.abspath(os.fspath(dst))
    if os.path.exists(dst) and not overwrite:
        if not os.path.isdir(dst) or os.listdir(dst):
            raise FileExistsError(f"{dst}: already exists; pass overwrite=True to replace it")
    cfg = model.config
    limit = _parse_size(max_shard_size)
    entries = list(hf_state_dict(model, dtype))
    torch_dtype = str(np.dtype(entries[0][2])) if entries else cfg.param_dtype
    parent = os.path.dirname(dst) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.tmp-", dir=parent)
    try:
        # shard by size, in HF key order
        shards, cur, cur_size = [], [], 0
        for e in entries:
            nbytes = math.prod(e[1]) * np.dtype(e[2]).itemsize
            if cur and cur_size + nbytes > limit:
                shards.append(cur)
                cur, cur_size = [], 0
            cur.append(e)
            cur_size += nbytes
        if cur:
            shards.append(cur)
        bar = _progress(len(entries), "saving", progress)
        weight_map = {}
        for i, shard in enumerate(shards):
            name = ("model.safetensors" if len(shards) == 1
                    else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors")
            write_safetensors(os.path.join(tmp, name),
                              [(n, (shape, dt, th)) for n, shape, dt, th in shard])
            for n, *_ in shard:
                weight_map[n] = name
            bar.update(len(shard))
        bar.close()
        if len(shards) > 1:
            total = sum(math.prod(e[1]) * np.dtype(e[2]).itemsize for e in entries)
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as fh:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh, indent=2)
        with open(os.path.join(tmp, "config.json"), "w") as fh:
            json.dump(cfg.to_hf_dict(torch_dtype=torch_dtype), fh, indent=2)
        if tokenizer:
            from pythia_jax.tokenizer import bundled_tokenizer_path
            tok_src = bundled_tokenizer_path() if tokenizer is True else os.fspath(tokenizer)
            shutil.copyfile(tok_src, os.path.join(tmp, "tokenizer.json"))
            with open(os.path.join(tmp, "tokenizer_config.json"), "w") as fh:
                json.dump(_TOKENIZER_CONFIG, fh, indent=2)
        _replace_dir(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def _replace_dir(tmp: str, dst: str) -> None:
    """Rename `tmp` to `dst`; an existing `dst` is moved aside first and removed only after."""
    if os.path.exists(dst):
        old = dst + ".old-" + os.path.basename(tmp)
        os.rename(dst, old)
        try:
            os.rename(tmp, dst)
        except BaseException:
            os.rename(old, dst)
            raise
        shutil.rmtree(old, ignore_errors=True) if os.path.isdir(old) else os.remove(old)
    else:
        os.rename(tmp, dst)
