"""HF PyTorch checkpoints <-> pythia-jax models (the HF format; names and orientation: `weights`).

`load_hf(dir)` reads a local HF directory (safetensors or pytorch_model.bin, single or sharded
with an index); `download(repo_id, revision, cache_dir=…, local_files_only=…, token=…,
force_download=…)` fetches a hub repo into the HF cache first (one `snapshot_download`).
`save_pretrained(model, dst)` writes `config.json` (the hub's Pythia schema),
`generation_config.json` (bos / eos ids, as the hub's Pythia repos), safetensors
(sharded with an index above `max_shard_size`) and the tokenizer, into a temporary directory that
is renamed into place only when complete. `pythia_jax.from_pretrained` (in `pretrained`) chooses
between this and the other formats.

The safetensors reader memory-maps the file, so every tensor is a view and the loader
(`weights.load_hf_state_dict`) reads each source tensor once, with a mesh only the slices each
device needs.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import struct
from typing import Any, Callable, Iterable

import ml_dtypes
import numpy as np

from pythia_jax import weights
from pythia_jax.config import ModelConfig
from pythia_jax.model import GPTNeoX
from pythia_jax import paths
from pythia_jax.paths import atomic_dir
from pythia_jax.progress import progress_bar
from pythia_jax.tokenizer import bundled_tokenizer_path
from pythia_jax.weights import HF_LEGACY_BUFFERS, CheckpointError, hf_state_dict

__all__ = ["load_hf", "save_pretrained", "CheckpointError", "hf_state_dict", "open_hf_checkpoint",
           "is_hub_id", "download", "HUB_PATTERNS", "HUB_WEIGHT_PATTERNS", "SafetensorsFile",
           "write_safetensors", "HF_LEGACY_BUFFERS", "generation_config_dict"]

log = logging.getLogger("pythia_jax")


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
    """Write tensors one at a time (only the header is built up front; needs shapes/dtypes),
    atomically: to a temporary name renamed onto `path` at the end (nothing left on an error).

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
    # under a temporary name beside `path`, renamed when complete: never a partial file at `path`
    with paths.atomic_write(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(hb)))
        fh.write(hb)
        for name, shape, dt, thunk, a, b in specs:
            arr = np.asarray(thunk(), dtype=dt, order="C")  # keeps 0-d tensors 0-d
            if arr.shape != shape:
                raise ValueError(f"{path}: tensor {name!r}: shape {arr.shape} != declared {shape}")
            fh.write(arr.tobytes() if arr.nbytes < (1 << 26) else memoryview(arr.reshape(-1).view(np.uint8)))


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


# ------------------------------------------------------------------------------------------------
def is_hub_id(src: str) -> bool:
    """`owner/name` that is not a local path."""
    return not os.path.exists(src) and re.fullmatch(r"[\w.-]+/[\w.-]+", src) is not None


#: What `download` fetches of a hub repo (one `snapshot_download` per weight format; the
#: safetensors first, the PyTorch .bin files only when the repo has no safetensors).
HUB_PATTERNS = ("config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "generation_config.json")
HUB_WEIGHT_PATTERNS = (("*.safetensors", "*.safetensors.index.json"),
                       ("pytorch_model*.bin", "pytorch_model*.bin.index.json"))


def download(src: str, revision: str | None = None, *, cache_dir: str | os.PathLike | None = None,
             local_files_only: bool = False, token: str | bool | None = None,
             force_download: bool = False) -> str:
    """Fetch config, tokenizer and weights of a hub repo into the HF cache (huggingface_hub's
    `snapshot_download`, with HF's keywords); returns the local snapshot directory."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    where = f"{src!r} (revision {revision or 'main'})"
    kw = dict(revision=revision, cache_dir=None if cache_dir is None else os.fspath(cache_dir),
              local_files_only=local_files_only, token=token, force_download=force_download)
    d = None
    for weights_patterns in HUB_WEIGHT_PATTERNS:
        try:
            d = snapshot_download(src, allow_patterns=list(HUB_PATTERNS + weights_patterns), **kw)
        except LocalEntryNotFoundError as e:
            how = ("local_files_only=True" if local_files_only
                   else "the hub cannot be reached (offline?)")
            raise OSError(f"{where} is not in the HF cache "
                          f"({kw['cache_dir'] or 'the default cache'}) and {how}; download it "
                          f"first or pass a local directory ({e})") from None
        except (RepositoryNotFoundError, GatedRepoError) as e:
            raise OSError(f"{where}: no such hub repository, or it needs a token= "
                          f"({type(e).__name__})") from None
        except RevisionNotFoundError:
            raise OSError(f"{where}: the repository has no such revision (Pythia's are "
                          "'main' and 'step0' ... 'step143000')") from None
        except Exception as e:
            raise OSError(f"could not fetch {where} from the HF hub: {e}") from None
        if not os.path.isfile(os.path.join(d, "config.json")):
            raise CheckpointError(f"{where}: no config.json on the hub / in the cache ({d})")
        try:
            _find_weight_files(d)
            return d
        except CheckpointError:
            continue
    raise CheckpointError(f"{where}: no weights on the hub / in the cache "
                          "(model.safetensors / pytorch_model.bin, or their shard indexes)")


def load_hf(d: str | os.PathLike, dtype: str = "float32", *, compute_dtype: str | None = None,
            mesh=None, progress: bool = False, **config_overrides) -> GPTNeoX:
    """Load a local HF directory (config.json + safetensors / pytorch_model.bin, maybe sharded).

    dtype: parameter dtype name ("float32", "bfloat16", "float16"), or "auto" for the dtype the
    checkpoint stores (float32 when that is none of these).
    """
    d = os.fspath(d)
    if dtype != "auto" and dtype not in weights.PARAM_DTYPES:
        raise ValueError(f"dtype: expected 'auto', {', '.join(weights.PARAM_DTYPES)}, "
                         f"got {dtype!r}")
    tensors = open_hf_checkpoint(d)
    if dtype == "auto":  # keep the dtype the checkpoint stores (e.g. fp16 for hub Pythia)
        first = next((k for k in tensors.keys() if not HF_LEGACY_BUFFERS.match(k)), None)
        dtype = (weights.dtype_name(tensors.get(first).dtype) if first else None) or "float32"
    if compute_dtype is not None:
        config_overrides["dtype"] = compute_dtype
    cfg = ModelConfig.from_hf_json(os.path.join(d, "config.json"), param_dtype=dtype,
                                   **config_overrides)
    return weights.load_hf_state_dict(cfg, tensors, where=d,
                                      param_dtype=weights.PARAM_DTYPES[dtype], mesh=mesh,
                                      progress=progress)


# ------------------------------------------------------------------------------------------------
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


def generation_config_dict(cfg: ModelConfig) -> dict:
    """`generation_config.json` (transformers' `GenerationConfig` fields): Pythia's hub files
    hold just the special token ids (bos = eos = <|endoftext|> = 0)."""
    return {"_from_model_config": True, "bos_token_id": cfg.bos_token_id,
            "eos_token_id": cfg.eos_token_id}


def save_pretrained(model: GPTNeoX, dst: str | os.PathLike, dtype=None, *,
                    max_shard_size: int | str = "5GB", tokenizer: str | None | bool = True,
                    overwrite: bool = False, progress: bool = False) -> str:
    """Write an HF checkpoint directory that `GPTNeoXForCausalLM.from_pretrained` loads cleanly
    (config.json, generation_config.json, safetensors, tokenizer).

    dtype: tensor dtype on disk (default: the model's parameter dtype). tokenizer: True = the
    bundled GPT-NeoX-20B tokenizer, a path = that tokenizer.json, False/None = none.
    The directory is assembled under a temporary name and renamed at the end (`dst` may be a
    URL: assembled locally and uploaded, `paths.atomic_dir`).
    """
    dst = paths.abspath(dst)
    paths.check_available(dst)
    cfg = model.config
    limit = _parse_size(max_shard_size)
    entries = list(hf_state_dict(model, dtype))
    torch_dtype = str(np.dtype(entries[0][2])) if entries else cfg.param_dtype
    with atomic_dir(dst, overwrite=overwrite) as tmp:
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
        bar = progress_bar(len(entries), "saving", progress, unit="tensor")
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
        with open(os.path.join(tmp, "generation_config.json"), "w") as fh:
            json.dump(generation_config_dict(cfg), fh, indent=2)
        if tokenizer:
            tok_src = bundled_tokenizer_path() if tokenizer is True else os.fspath(tokenizer)
            shutil.copyfile(tok_src, os.path.join(tmp, "tokenizer.json"))
            with open(os.path.join(tmp, "tokenizer_config.json"), "w") as fh:
                json.dump(_TOKENIZER_CONFIG, fh, indent=2)
    return dst

