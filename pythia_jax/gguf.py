"""GGUF (llama.cpp) export and import for GPT-NeoX / Pythia models.

Export: `export_gguf(model, "model.gguf", type="q8_0")` writes a file that llama.cpp runs as
architecture `gptneox`:

* metadata: context / embedding / feed-forward length, block count, head count, rope dimension
  count (= rotary_pct * head_dim) and freq base, parallel-residual flag, LayerNorm eps, file type,
  quantization version; plus `pythia_jax.gelu_approximate` (ignored by llama.cpp, read back by
  `load_gguf`);
* the GPT-NeoX-20B tokenizer (`gpt2` BPE, pre-tokenizer `olmo`, token list padded with
  `[PAD{i}]` to the model's padded vocab, BOS/EOS/UNK = `<|endoftext|>`, no automatic BOS/EOS);
* tensors under llama.cpp's names in torch orientation ([out, in]); the fused QKV is reordered
  from HF's per-head [heads, 3, head_dim] rows to llama.cpp's [3, heads, head_dim]
  (all Q | all K | all V); 1-D tensors (norms, biases) are always F32.

Types written directly with the `gguf` package's numpy quantizers: f32, f16, bf16, q8_0, q4_0,
q4_1, q5_0, q5_1. K-quants (q2_k ... q6_k) are produced by llama.cpp's own quantizer through the
`llama_cpp` bindings from an intermediate F16 (or F32) GGUF. Tensors are converted and written
one at a time (the model plus one tensor in memory) into a temporary file that is renamed into
place at the end; on any error nothing is left behind.

Import: `load_gguf(path)` (also reached through `pythia_jax.from_pretrained("x.gguf")`) reads a
`gptneox` GGUF in F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 or the K-quants Q2_K..Q6_K
(dequantized to float) into our model. The config comes from the metadata; the vocabulary size
from the rows of `token_embd.weight`.

GELU: llama.cpp always runs the tanh approximation of GELU. HF Pythia checkpoints were
evaluated with exact (erf) GELU, so `load_gguf` defaults to exact GELU
(`gelu_approximate=False`) unless the file carries our `pythia_jax.gelu_approximate` key;
pass `gelu_approximate=True` to reproduce llama.cpp's numerics.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import struct
import tempfile
from typing import Any

import numpy as np

from pythia_jax import paths, weights
from pythia_jax.config import ConfigError, ModelConfig
from pythia_jax.progress import logger, progress_bar
from pythia_jax.tokenizer import bundled_tokenizer_path

__all__ = ["export_gguf", "load_gguf", "read_gguf_config", "GGUFError", "EXPORT_TYPES",
           "DIRECT_TYPES", "LLAMA_CPP_TYPES", "READ_TYPES", "ARCH", "gguf_tensor_name"]

log = logger("gguf")

ARCH = "gptneox"
GELU_KEY = "pythia_jax.gelu_approximate"


class GGUFError(ValueError):
    """A GGUF file, or an export request, that this module cannot handle."""


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ImportError("GGUF support needs the `gguf` package: "
                          "pip install 'pythia-jax[gguf]'") from None
    return gguf


# ------------------------------------------------------------------------------------------------
# Export types: name -> (llama file type, tensor type for 2-D weights or None = via llama.cpp)
@dataclasses.dataclass(frozen=True)
class _ExportType:
    name: str
    ftype: str  # gguf.LlamaFileType member name
    qtype: str | None  # gguf.GGMLQuantizationType member name for direct writes


DIRECT_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
LLAMA_CPP_TYPES = ("q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m",
                   "q6_k")
EXPORT_TYPES = DIRECT_TYPES + LLAMA_CPP_TYPES

_TYPES = {
    "f32": _ExportType("f32", "ALL_F32", "F32"),
    "f16": _ExportType("f16", "MOSTLY_F16", "F16"),
    "bf16": _ExportType("bf16", "MOSTLY_BF16", "BF16"),
    "q8_0": _ExportType("q8_0", "MOSTLY_Q8_0", "Q8_0"),
    "q4_0": _ExportType("q4_0", "MOSTLY_Q4_0", "Q4_0"),
    "q4_1": _ExportType("q4_1", "MOSTLY_Q4_1", "Q4_1"),
    "q5_0": _ExportType("q5_0", "MOSTLY_Q5_0", "Q5_0"),
    "q5_1": _ExportType("q5_1", "MOSTLY_Q5_1", "Q5_1"),
    **{t: _ExportType(t, "MOSTLY_" + t.upper(), None) for t in LLAMA_CPP_TYPES},
}

#: Tensor types `load_gguf` can read (dequantized with the gguf package).
READ_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K",
              "Q4_K", "Q5_K", "Q6_K")


def _export_type(type_: str) -> _ExportType:
    t = str(type_).lower()
    if t not in _TYPES:
        raise GGUFError(f"unknown GGUF type {type_!r}; expected one of: {', '.join(EXPORT_TYPES)}")
    return _TYPES[t]


# ------------------------------------------------------------------------------------------------
# Names: HF <-> GGUF
_LAYER_NAMES = {
    # HF suffix -> gguf MODEL_TENSOR member, weight/bias suffix
    "input_layernorm": "ATTN_NORM",
    "attention.query_key_value": "ATTN_QKV",
    "attention.dense": "ATTN_OUT",
    "post_attention_layernorm": "FFN_NORM",
    "mlp.dense_h_to_4h": "FFN_UP",
    "mlp.dense_4h_to_h": "FFN_DOWN",
}
_TOP_NAMES = {
    "gpt_neox.embed_in.weight": ("TOKEN_EMBD", "weight"),
    "gpt_neox.final_layer_norm.weight": ("OUTPUT_NORM", "weight"),
    "gpt_neox.final_layer_norm.bias": ("OUTPUT_NORM", "bias"),
    "embed_out.weight": ("OUTPUT", "weight"),
}


def gguf_tensor_name(hf_name: str) -> str:
    """`gpt_neox.layers.3.attention.query_key_value.weight` -> `blk.3.attn_qkv.weight`."""
    gguf = _gguf()
    if hf_name in _TOP_NAMES:
        member, suffix = _TOP_NAMES[hf_name]
        return f"{gguf.TENSOR_NAMES[gguf.MODEL_TENSOR[member]]}.{suffix}"
    parts = hf_name.split(".")
    if len(parts) >= 5 and parts[:2] == ["gpt_neox", "layers"] and parts[2].isdigit():
        module, suffix = ".".join(parts[3:-1]), parts[-1]
        if module in _LAYER_NAMES and suffix in ("weight", "bias"):
            base = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR[_LAYER_NAMES[module]]]
            return f"{base.format(bid=int(parts[2]))}.{suffix}"
    raise KeyError(f"no GGUF name for HF tensor {hf_name!r}")


def _qkv_to_gguf(a: np.ndarray, num_heads: int) -> np.ndarray:
    """HF rows [heads, 3, head_dim] -> llama.cpp rows [3, heads, head_dim] (weight or bias)."""
    rest = a.shape[1:]
    a = a.reshape((num_heads, 3, -1) + rest)
    return np.ascontiguousarray(np.swapaxes(a, 0, 1)).reshape((-1,) + rest)


def _qkv_from_gguf(a: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp rows [3, heads, head_dim] -> HF rows [heads, 3, head_dim]."""
    rest = a.shape[1:]
    a = a.reshape((3, num_heads, -1) + rest)
    return np.ascontiguousarray(np.swapaxes(a, 0, 1)).reshape((-1,) + rest)


# ------------------------------------------------------------------------------------------------
# Tokenizer arrays
@dataclasses.dataclass
class _Vocab:
    tokens: list[str]
    types: list[int]
    merges: list[str]
    eot_id: int
    pad_id: int | None


def _tokenizer_arrays(tokenizer_path: str, vocab_size: int) -> _Vocab:
    """Token list (padded to `vocab_size`), token types and merges of a byte-level BPE tokenizer."""
    gguf = _gguf()
    try:
        with open(tokenizer_path, encoding="utf-8") as fh:
            j = json.load(fh)
    except (OSError, json.JSONDecodeError) as e:
        raise GGUFError(f"{tokenizer_path}: cannot read tokenizer.json: {e}") from None
    model = j.get("model") or {}
    pre = j.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or pre.get("type") != "ByteLevel":
        raise GGUFError(f"{tokenizer_path}: expected a byte-level BPE tokenizer like GPT-NeoX-20B's "
                        f"(model.type 'BPE', pre_tokenizer.type 'ByteLevel'), got model.type "
                        f"{model.get('type')!r}, pre_tokenizer.type {pre.get('type')!r}")
    if pre.get("add_prefix_space") or pre.get("use_regex") is False:
        raise GGUFError(f"{tokenizer_path}: pre_tokenizer: add_prefix_space / use_regex=false are "
                        "not GPT-NeoX-20B's settings and llama.cpp's 'olmo' pre-tokenizer "
                        "cannot reproduce them")
    by_id: dict[int, str] = {}
    for tok, i in model["vocab"].items():
        by_id[int(i)] = tok
    added = {}
    for a in j.get("added_tokens") or []:
        by_id[int(a["id"])] = a["content"]
        added[int(a["id"])] = a
    n = max(by_id) + 1
    if n > vocab_size:
        raise GGUFError(f"{tokenizer_path}: the tokenizer has {n} tokens but the model's vocabulary "
                        f"(embedding rows) is only {vocab_size}; llama.cpp needs one embedding row "
                        "per token")
    tokens, types = [], []
    T = gguf.TokenType
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(int(T.UNUSED))
        elif i in added:
            tokens.append(by_id[i])
            types.append(int(T.CONTROL if added[i].get("special") else T.USER_DEFINED))
        else:
            tokens.append(by_id[i])
            types.append(int(T.NORMAL))
    merges = []
    for m in model.get("merges") or []:
        merges.append(" ".join(m) if isinstance(m, (list, tuple)) else m)

    def find(content):
        return next((i for i, a in added.items() if a["content"] == content), None)

    eot = find("<|endoftext|>")
    if eot is None:
        raise GGUFError(f"{tokenizer_path}: no '<|endoftext|>' added token (GPT-NeoX's BOS/EOS/UNK)")
    return _Vocab(tokens, types, merges, eot, find("<|padding|>"))


# ------------------------------------------------------------------------------------------------
# Export
def _tensor_type(gguf, hf_name: str, shape: tuple[int, ...], et: _ExportType, direct_qtype: str):
    """GGMLQuantizationType for one tensor under export type `et` (direct numpy path)."""
    Q = gguf.GGMLQuantizationType
    if len(shape) == 1:
        return Q.F32
    qt = direct_qtype
    if et.name in ("q4_0", "q4_1", "q5_0", "q5_1") and hf_name == "embed_out.weight":
        # llama.cpp's quantizer raises the output matrix to Q6_K for these mixes; numpy cannot
        # write Q6_K, so we keep it at Q8_0 (at least as accurate).
        qt = "Q8_0"
    q = Q[qt]
    block = gguf.GGML_QUANT_SIZES[q][0]
    if shape[-1] % block:
        log.warning("%s: row length %d is not a multiple of the %s block size %d; writing F16",
                    hf_name, shape[-1], qt, block)
        return Q.F16
    return q


def _convert(gguf, name: str, a: np.ndarray, q) -> np.ndarray:
    """float array -> the bytes/array written for type `q` (numpy order)."""
    Q = gguf.GGMLQuantizationType
    a32 = np.asarray(a, dtype=np.float32)
    if not np.all(np.isfinite(a32)):
        raise GGUFError(f"tensor {name}: contains NaN or Inf values; refusing to export")
    if q == Q.F32:
        return np.ascontiguousarray(a32)
    if q == Q.F16:
        out = a32.astype(np.float16)
        if not np.all(np.isfinite(out)):
            raise GGUFError(f"tensor {name}: values beyond the float16 range (max |x| = "
                            f"{float(np.max(np.abs(a32))):.4g}); export as bf16 or f32 instead")
        return out
    # quantize a few MiB of rows at a time (blocks never cross rows): bounded temporaries
    rows2d = a32.reshape(-1, a32.shape[-1])
    out = np.empty(gguf.quants.quant_shape_to_byte_shape(rows2d.shape, q), np.uint8)
    step = max(1, (1 << 22) // rows2d.shape[1])
    for i in range(0, rows2d.shape[0], step):
        out[i:i + step] = gguf.quants.quantize(np.ascontiguousarray(rows2d[i:i + step]), q)
    return out.reshape(gguf.quants.quant_shape_to_byte_shape(a32.shape, q))


def _nbytes(gguf, shape: tuple[int, ...], q) -> int:
    block, size = gguf.GGML_QUANT_SIZES[q]
    return math.prod(shape[:-1]) * (shape[-1] // block) * size


def _size_label(n: int) -> str:
    for div, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            v = n / div
            return f"{v:.0f}{suffix}" if v >= 10 else f"{v:.1f}{suffix}".replace(".0", "")
    return str(n)


def _write_direct(model, path: str, et: _ExportType, *, vocab: _Vocab, name: str,
                  progress: bool) -> None:
    """Stream `model` into a GGUF at `path` with every 2-D weight in `et.qtype`."""
    gguf = _gguf()
    cfg: ModelConfig = model.config
    entries = {n: (shape, thunk) for n, shape, _, thunk in weights.hf_state_dict(model)}
    want = weights.hf_shapes(cfg)  # in llama.cpp's converter order
    order = list(want)
    if set(order) != set(entries):
        raise AssertionError(f"HF tensor set mismatch: {sorted(set(order) ^ set(entries))[:4]}")

    with _quiet("gguf.gguf_writer"):  # INFO lines about endianness and our temporary file
        w = gguf.GGUFWriter(None, ARCH)
    w.add_type("model")
    w.add_name(name)
    n_params = sum(math.prod(entries[n][0]) for n in order)
    w.add_size_label(_size_label(n_params))
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_heads)
    w.add_rope_dimension_count(cfg.rotary_dim)
    w.add_rope_freq_base(float(cfg.rotary_emb_base))
    w.add_parallel_residual(bool(cfg.use_parallel_residual))
    w.add_layer_norm_eps(float(cfg.layer_norm_eps))
    w.add_file_type(int(gguf.LlamaFileType[et.ftype]))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_bool(GELU_KEY, bool(cfg.gelu_approximate))
    # tokenizer
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("olmo")
    w.add_token_list(vocab.tokens)
    w.add_token_types(vocab.types)
    w.add_token_merges(vocab.merges)
    bos = cfg.bos_token_id if 0 <= cfg.bos_token_id < cfg.vocab_size else vocab.eot_id
    eos = cfg.eos_token_id if 0 <= cfg.eos_token_id < cfg.vocab_size else vocab.eot_id
    w.add_bos_token_id(bos)
    w.add_eos_token_id(eos)
    w.add_unk_token_id(vocab.eot_id)
    if vocab.pad_id is not None:
        w.add_pad_token_id(vocab.pad_id)
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)

    plan = []
    for n in order:
        shape, thunk = entries[n]
        if tuple(shape) != want[n]:
            raise AssertionError(f"{n}: shape {shape} != {want[n]}")
        q = _tensor_type(gguf, n, tuple(shape), et, et.qtype)
        nb = _nbytes(gguf, tuple(shape), q)
        gname = gguf_tensor_name(n)
        w.add_tensor_info(gname, tuple(shape), np.dtype(np.float32), nb, raw_dtype=q)
        plan.append((n, gname, shape, thunk, q, nb))

    total = sum(p[-1] for p in plan)
    bar = _bar(total, f"gguf {et.name}", progress)
    with _quiet("gguf.gguf_writer"):
        w.write_header_to_file(path)
    try:
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for n, gname, shape, thunk, q, nb in plan:
            a = thunk()
            if ".query_key_value." in n:
                a = _qkv_to_gguf(np.asarray(a), cfg.num_heads)
            data = _convert(gguf, gname, a, q)
            del a
            if data.nbytes != nb:
                raise AssertionError(f"{gname}: {data.nbytes} bytes, planned {nb}")
            w.write_tensor_data(data)
            del data
            bar.update(nb)
    finally:
        w.close()
        bar.close()


@contextlib.contextmanager
def _quiet(logger_name: str, level=logging.WARNING):
    lg = logging.getLogger(logger_name)
    old = lg.level
    lg.setLevel(max(level, old))
    try:
        yield
    finally:
        lg.setLevel(old)


def _quantize_llama_cpp(src: str, dst: str, et: _ExportType, threads: int | None,
                        verbose: bool) -> None:
    try:
        import llama_cpp
    except ImportError as e:
        raise ImportError(f"--type={et.name} (a K-quant) is produced by llama.cpp's quantizer, which "
                          f"needs llama-cpp-python: pip install 'pythia-jax[gguf]' ({e})") from None
    gguf = _gguf()
    # llama-cpp-python routes llama.cpp's log through this logger (it prints every tensor)
    with _quiet("llama-cpp-python", logging.DEBUG if verbose else logging.ERROR):
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = int(gguf.LlamaFileType[et.ftype])
        params.nthread = int(threads or 0)
        rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), params)
    if rc != 0:
        raise GGUFError(f"llama.cpp's quantizer failed to produce {et.name} (return code {rc}); "
                        "rerun with verbose=True / --verbose to see its log")


def export_gguf(model, dst: str | os.PathLike, type: str = "f16", *,
                tokenizer: str | os.PathLike | None = None, name: str | None = None,
                overwrite: bool = False, progress: bool = False, intermediate: str = "f16",
                threads: int | None = None, verbose: bool = False) -> str:
    """Write `model` (a `GPTNeoX`) as a llama.cpp GGUF file of `type` (see `EXPORT_TYPES`).

    tokenizer: a byte-level BPE `tokenizer.json` (default: the bundled GPT-NeoX-20B tokenizer).
    intermediate: for K-quants, the type of the temporary file llama.cpp quantizes from
    ("f16", like llama.cpp's usual convert-then-quantize; "f32" is exact but twice the disk).
    The file is written under a temporary name in the destination directory and renamed into
    place when complete. Returns the absolute destination path.
    """
    et = _export_type(type)
    if intermediate not in ("f32", "f16", "bf16"):
        raise GGUFError(f"intermediate: expected 'f32', 'f16' or 'bf16', got {intermediate!r}")
    dst = os.path.abspath(os.fspath(dst))
    if os.path.isdir(dst):
        raise GGUFError(f"{dst}: is a directory; expected a .gguf file path")
    if os.path.exists(dst) and not overwrite:
        raise FileExistsError(f"{dst}: already exists; pass overwrite=True (--overwrite) to "
                              "replace it")
    cfg = getattr(model, "config", None)
    if not isinstance(cfg, ModelConfig):
        raise GGUFError(f"expected a pythia_jax GPTNeoX model, got {_type_name(model)}")
    if tokenizer is None:
        tokenizer = bundled_tokenizer_path()
    vocab = _tokenizer_arrays(os.fspath(tokenizer), cfg.vocab_size)
    name = name or os.path.splitext(os.path.basename(dst))[0]

    parent = os.path.dirname(dst)
    os.makedirs(parent, exist_ok=True)
    base = os.path.basename(dst)
    tmp = tmp_src = None
    try:
        with paths.sigterm_held():  # no SIGTERM between the creation and the cleanup block
            fd, tmp = tempfile.mkstemp(prefix=f".{base}.tmp-", suffix=".gguf", dir=parent)
        os.close(fd)
        if et.qtype is not None:
            _write_direct(model, tmp, et, vocab=vocab, name=name, progress=progress)
        else:
            with paths.sigterm_held():
                fd, tmp_src = tempfile.mkstemp(prefix=f".{base}.{intermediate}-",
                                               suffix=".gguf", dir=parent)
            os.close(fd)
            _write_direct(model, tmp_src, _TYPES[intermediate], vocab=vocab, name=name,
                          progress=progress)
            if progress:
                log.info(f"quantizing to {et.name} with llama.cpp ...")
            _quantize_llama_cpp(tmp_src, tmp, et, threads, verbose)
            os.remove(tmp_src)
            tmp_src = None
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the usual file mode
        os.replace(tmp, dst)
    except BaseException:
        for p in (tmp, tmp_src):
            if p is not None and os.path.exists(p):
                os.remove(p)
        raise
    return dst


def _type_name(x) -> str:
    return f"{type(x).__module__}.{type(x).__name__}"


def _bar(total, desc, enabled):
    return progress_bar(total, desc, enabled, unit="B", unit_scale=True, unit_divisor=1024)


# ------------------------------------------------------------------------------------------------
# Import
class _StringArray:
    """A string array from the header, skipped rather than decoded (only its length is kept)."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self):
        return self.n


@dataclasses.dataclass
class _TensorEntry:
    name: str
    ggml_shape: tuple[int, ...]  # innermost first, as ggml prints it
    tensor_type: Any  # gguf.GGMLQuantizationType
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def shape(self) -> tuple[int, ...]:  # numpy order
        return tuple(reversed(self.ggml_shape))


class _GGUFIndex:
    """Header of a little-endian GGUF v2/v3 file: metadata and tensor table, data memory-mapped.

    The gguf package's `GGUFReader` builds a numpy view per token string (seconds for a 50k
    vocabulary); this reader skips string arrays, which loading weights never needs.
    """

    def __init__(self, path: str):
        gguf = _gguf()
        VT = gguf.GGUFValueType
        self.path = path
        size = os.path.getsize(path)
        if size < 24:
            raise GGUFError(f"{path}: not a GGUF file (only {size} bytes)")
        self._mm = np.memmap(path, dtype=np.uint8, mode="r")
        buf = memoryview(self._mm)
        if bytes(buf[:4]) != b"GGUF":
            raise GGUFError(f"{path}: not a GGUF file (magic {bytes(buf[:4])!r}, expected b'GGUF')")
        (version,) = struct.unpack_from("<I", buf, 4)
        if version not in (2, 3):
            what = "a big-endian file (unsupported)" if version & 0xFFFF == 0 else f"version {version}"
            raise GGUFError(f"{path}: GGUF {what}; expected a little-endian GGUF version 2 or 3")
        n_tensors, n_kv = struct.unpack_from("<QQ", buf, 8)
        pos = 24
        scalar = {VT.UINT8: "B", VT.INT8: "b", VT.UINT16: "H", VT.INT16: "h", VT.UINT32: "I",
                  VT.INT32: "i", VT.FLOAT32: "f", VT.BOOL: "?", VT.UINT64: "Q", VT.INT64: "q",
                  VT.FLOAT64: "d"}

        def need(n):
            if pos + n > size:
                raise GGUFError(f"{path}: truncated GGUF header (needs byte {pos + n}, file has "
                                f"{size})")

        def read(fmt):
            nonlocal pos
            n = struct.calcsize(fmt)
            need(n)
            v = struct.unpack_from("<" + fmt, buf, pos)
            pos += n
            return v[0] if len(v) == 1 else v

        def read_str():
            nonlocal pos
            n = read("Q")
            need(n)
            s = bytes(buf[pos:pos + n])
            pos += n
            try:
                return s.decode("utf-8")
            except UnicodeDecodeError:
                raise GGUFError(f"{path}: malformed GGUF header (invalid UTF-8 string at byte "
                                f"{pos - n})") from None

        def read_value(vt):
            nonlocal pos
            if vt in scalar:
                return read(scalar[vt])
            if vt == VT.STRING:
                return read_str()
            if vt == VT.ARRAY:
                it, n = read("I"), read("Q")
                if it == VT.STRING:
                    for _ in range(n):
                        k = read("Q")
                        need(k)
                        pos += k
                    return _StringArray(n)
                if it in scalar:
                    dt = np.dtype("<" + scalar[it])
                    need(n * dt.itemsize)
                    a = np.frombuffer(buf, dt, n, pos).tolist()
                    pos += n * dt.itemsize
                    return a
                return [read_value(it) for _ in range(n)]
            raise GGUFError(f"{path}: malformed GGUF header (unknown value type {vt} at byte "
                            f"{pos})")

        self.fields: dict[str, Any] = {}
        for _ in range(n_kv):
            key = read_str()
            self.fields[key] = read_value(read("I"))
        entries = []
        for _ in range(n_tensors):
            name = read_str()
            nd = read("I")
            dims = tuple(int(read("Q")) for _ in range(nd))
            raw_type, off = read("I"), read("Q")
            try:
                qt = gguf.GGMLQuantizationType(raw_type)
            except ValueError:
                raise GGUFError(f"{path}: tensor {name!r} has unknown ggml type {raw_type}") from None
            entries.append((name, dims, qt, off))
        align = self.fields.get("general.alignment", 32)
        if not isinstance(align, int) or align <= 0 or align & (align - 1):
            raise GGUFError(f"{path}: general.alignment = {align!r}; expected a power of two")
        data_start = -(-pos // align) * align
        self.tensors: list[_TensorEntry] = []
        seen = set()
        for name, dims, qt, off in entries:
            if name in seen:
                raise GGUFError(f"{path}: duplicate tensor {name!r}")
            seen.add(name)
            block, tsize = gguf.GGML_QUANT_SIZES[qt]
            n = math.prod(dims)
            if dims and dims[0] % block:
                raise GGUFError(f"{path}: tensor {name!r}: row length {dims[0]} is not a "
                                f"multiple of the {qt.name} block size {block}")
            nbytes = n // block * tsize
            start = data_start + off
            if start + nbytes > size:
                raise GGUFError(f"{path}: tensor {name!r} data [{start}, {start + nbytes}) lies "
                                f"beyond the end of the file ({size} bytes); truncated file?")
            self.tensors.append(_TensorEntry(name, dims, qt, start, nbytes))

    def raw(self, t: _TensorEntry) -> np.ndarray:
        """The tensor's bytes (uint8 [rows, bytes_per_row]) or elements (F32/F16), zero-copy."""
        gguf = _gguf()
        Q = gguf.GGMLQuantizationType
        b = self._mm[t.offset:t.offset + t.nbytes]
        if t.tensor_type == Q.F32:
            return b.view(np.float32).reshape(t.shape)
        if t.tensor_type == Q.F16:
            return b.view(np.float16).reshape(t.shape)
        return b.reshape(gguf.quants.quant_shape_to_byte_shape(t.shape, t.tensor_type))


def _open_reader(path: str) -> _GGUFIndex:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such GGUF file")
    return _GGUFIndex(path)


def _field(reader: _GGUFIndex, key: str, default=None, *, path: str, required: bool = False):
    if key not in reader.fields:
        if required:
            raise GGUFError(f"{path}: missing metadata key {key!r}")
        return default
    return reader.fields[key]


def _f32_float(v) -> float:
    """The shortest decimal that round-trips the float32 `v` (1e-5 stays 1e-5)."""
    return float(str(np.float32(v)))


def read_gguf_config(path: str | os.PathLike, reader=None, **overrides) -> ModelConfig:
    """The ModelConfig a `gptneox` GGUF describes (vocab = rows of token_embd.weight)."""
    path = os.fspath(path)
    reader = reader if reader is not None else _open_reader(path)
    arch = _field(reader, "general.architecture", path=path)
    if arch != ARCH:
        raise GGUFError(f"{path}: general.architecture is {arch!r}; expected {ARCH!r} "
                        "(GPT-NeoX / Pythia). Other architectures cannot be loaded as GPT-NeoX")

    def req_int(suffix):
        key = f"{ARCH}.{suffix}"
        v = _field(reader, key, path=path, required=True)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise GGUFError(f"{path}: metadata {key!r}: expected a positive integer, got {v!r}")
        return v

    d = req_int("embedding_length")
    L = req_int("block_count")
    nh = req_int("attention.head_count")
    ff = req_int("feed_forward_length")
    if d % nh:
        raise GGUFError(f"{path}: {ARCH}.embedding_length {d} is not a multiple of "
                        f"{ARCH}.attention.head_count {nh}")
    hd = d // nh
    nkv = _field(reader, f"{ARCH}.attention.head_count_kv", path=path)
    if nkv is not None and nkv != nh:
        raise GGUFError(f"{path}: {ARCH}.attention.head_count_kv = {nkv} != head_count {nh}; "
                        "GPT-NeoX has no grouped-query attention")
    scaling = _field(reader, f"{ARCH}.rope.scaling.type", path=path)
    if scaling not in (None, "none"):
        raise GGUFError(f"{path}: {ARCH}.rope.scaling.type = {scaling!r}; rope scaling is not "
                        "supported")
    n_rot = _field(reader, f"{ARCH}.rope.dimension_count", hd, path=path)
    if not isinstance(n_rot, int) or not 0 <= n_rot <= hd or n_rot % 2:
        raise GGUFError(f"{path}: {ARCH}.rope.dimension_count: expected an even integer in "
                        f"[0, head_dim={hd}], got {n_rot!r}")
    rotary_pct = n_rot / hd
    if int(hd * rotary_pct) != n_rot:  # float rounding guard: int() truncates
        rotary_pct = math.nextafter(rotary_pct, 2.0)
    eps = _field(reader, f"{ARCH}.attention.layer_norm_epsilon", path=path, required=True)
    tensors = {t.name: t for t in reader.tensors}
    emb = tensors.get("token_embd.weight")
    if emb is None:
        raise GGUFError(f"{path}: missing tensor 'token_embd.weight'")
    if len(emb.ggml_shape) != 2 or emb.ggml_shape[0] != d:
        raise GGUFError(f"{path}: tensor 'token_embd.weight' has ggml shape "
                        f"{list(emb.ggml_shape)}; expected [{d}, n_vocab]")
    kw: dict[str, Any] = dict(
        hidden_size=d, num_layers=L, num_heads=nh, intermediate_size=ff,
        vocab_size=int(emb.ggml_shape[1]), rotary_pct=rotary_pct,
        rotary_emb_base=_f32_float(_field(reader, f"{ARCH}.rope.freq_base", 10000.0, path=path)),
        max_position_embeddings=int(_field(reader, f"{ARCH}.context_length", 2048, path=path)),
        layer_norm_eps=_f32_float(eps),
        use_parallel_residual=bool(_field(reader, f"{ARCH}.use_parallel_residual", True,
                                          path=path)),
        gelu_approximate=bool(_field(reader, GELU_KEY, False, path=path)),
    )
    for key, field in (("tokenizer.ggml.bos_token_id", "bos_token_id"),
                       ("tokenizer.ggml.eos_token_id", "eos_token_id")):
        v = _field(reader, key, path=path)
        if isinstance(v, int):
            kw[field] = v
    kw.update(overrides)
    try:
        return ModelConfig(**kw)
    except ConfigError as e:
        raise GGUFError(f"{path}: {e}") from None
    except TypeError as e:
        raise GGUFError(f"{path}: bad config override: {e}") from None


class _GGUFSource:
    """HF-named, HF-oriented float arrays read (and dequantized) from a GGUF, one at a time.

    A `weights.TensorSource`: keys(), shapes, origin, get().
    """

    def __init__(self, reader, cfg: ModelConfig, path: str):
        gguf = _gguf()
        self._gguf = gguf
        self._reader = reader
        self._cfg = cfg
        self._path = path
        want = weights.hf_shapes(cfg)
        by_gguf = {gguf_tensor_name(n): n for n in want}
        self._tensors = {}
        unknown = []
        readable = {gguf.GGMLQuantizationType[t] for t in READ_TYPES}
        for t in reader.tensors:
            if t.name not in by_gguf:
                unknown.append(t.name)
                continue
            hf = by_gguf[t.name]
            got = t.shape
            if got != want[hf]:
                raise GGUFError(f"{path}: tensor {t.name!r} has shape {list(got)} (numpy order); "
                                f"expected {list(want[hf])} for this config")
            if t.tensor_type not in readable:
                raise GGUFError(f"{path}: tensor {t.name!r} has type {t.tensor_type.name}, which "
                                f"cannot be loaded; supported: {', '.join(READ_TYPES)}")
            self._tensors[hf] = t
        if unknown:
            raise GGUFError(f"{path}: unexpected tensor(s) {unknown[:5]} for a {ARCH} model with "
                            f"{cfg.num_layers} layers")
        missing = [gguf_tensor_name(n) for n in want if n not in self._tensors]
        if missing:
            raise GGUFError(f"{path}: missing tensor {missing[0]!r}"
                            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        self.shapes = {n: want[n] for n in self._tensors}
        self.origin = {n: path for n in self._tensors}
        self._cache: tuple[str, np.ndarray] | None = None

    def keys(self):
        return self._tensors.keys()

    def get(self, key: str) -> np.ndarray:
        cached = self._cache  # one read: the loader calls get() from several threads
        if cached is not None and cached[0] == key:
            return cached[1]
        t = self._tensors[key]
        Q = self._gguf.GGMLQuantizationType
        if t.tensor_type in (Q.F32, Q.F16):
            a = self._reader.raw(t)
        else:
            a = self._gguf.quants.dequantize(self._reader.raw(t), t.tensor_type)
        a = a.reshape(self.shapes[key])
        if ".query_key_value." in key:
            a = _qkv_from_gguf(a, self._cfg.num_heads)
        self._cache = (key, a)
        return a


def load_gguf(path: str | os.PathLike, dtype: str = "float32", mesh=None, *,
              compute_dtype: str | None = None, progress: bool = False, **config_overrides):
    """Load a `gptneox` GGUF (F32/F16/BF16/Q8_0/Q4_0/... dequantized) as a `GPTNeoX`.

    dtype: parameter dtype ("float32", "bfloat16", "float16", or "auto": float16 / bfloat16 when
    every matrix in the file is stored in that type, else float32). compute_dtype: activation
    dtype (ModelConfig.dtype). config_overrides: ModelConfig fields, e.g.
    `gelu_approximate=True` (llama.cpp's tanh GELU) or execution options.
    """
    path = os.fspath(path)
    reader = _open_reader(path)
    if dtype == "auto":
        kinds = {t.tensor_type.name for t in reader.tensors if len(t.ggml_shape) > 1}
        dtype = {frozenset({"F16"}): "float16", frozenset({"BF16"}): "bfloat16"}.get(
            frozenset(kinds), "float32")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise GGUFError(f"dtype: expected 'float32', 'bfloat16', 'float16' or 'auto', got {dtype!r}")
    if compute_dtype is not None:
        config_overrides["dtype"] = compute_dtype
    cfg = read_gguf_config(path, reader, param_dtype=dtype, **config_overrides)
    src = _GGUFSource(reader, cfg, path)
    return weights.load_hf_state_dict(cfg, src, where=path,
                                      param_dtype=weights.PARAM_DTYPES[dtype], mesh=mesh,
                                      progress=progress)
