"""`from_pretrained(src)`: one entry point over every checkpoint format; `save_pretrained`.

`src` may be

* a `.gguf` file (`gguf.load_gguf`),
* a pythia-jax model directory, a training workdir (its newest step) or a step directory: any
  directory without a `config.json` (`checkpoint.load_model`),
* a local HF directory, or an HF hub id such as `EleutherAI/pythia-70m` with
  `revision="step3000"` (`hf.load_hf`, after `hf.download` for a hub id: one
  `snapshot_download` with HF's `cache_dir` / `local_files_only` / `token` / `force_download`),
  or a Pythia name (`pythia-70m`, `pythia-160m-deduped`) standing for `EleutherAI/<name>`.

Each may also be a URL (`gs://bucket/…`, through `pythia_jax.paths`): orbax restores a
pythia-jax checkpoint from the bucket directly; an HF directory or a `.gguf` file there is
downloaded to a temporary folder first (their readers memory-map local files).

`save_pretrained(model, dst)` writes an HF directory (`hf.save_pretrained`); a pythia-jax model
directory is `checkpoint.save_model`, a GGUF file `gguf.export_gguf`.
"""

from __future__ import annotations

import os

from pythia_jax import checkpoint, gguf, hf, paths, weights
from pythia_jax.config import ConfigError, get_preset
from pythia_jax.hf import save_pretrained
from pythia_jax.model import GPTNeoX

__all__ = ["from_pretrained", "save_pretrained", "param_dtype_name", "resolve_source",
           "HUB_KEYWORDS", "EXECUTION_FIELDS", "NUMERICS_OVERRIDES", "KEYWORDS", "DTYPE_ALIASES"]


#: The keywords huggingface_hub takes for a hub id (HF's `from_pretrained` names).
HUB_KEYWORDS = ("revision", "cache_dir", "local_files_only", "token", "force_download")
#: The ModelConfig fields a load may override (how the model runs, not what it is).
EXECUTION_FIELDS = ("attention_impl", "fused_rotary", "scan_layers", "remat")
#: numerics a loader may be told to use instead of the file's (`gelu_approximate=True`: llama.cpp's
#: tanh GELU for a GGUF file, docs/gguf.md).
NUMERICS_OVERRIDES = ("gelu_approximate",)
#: from_pretrained's own keywords.
KEYWORDS = ("dtype", "compute_dtype", "mesh", "progress") + HUB_KEYWORDS
#: dtype spellings: HF / PyTorch shorthands, and "auto" (the dtype the checkpoint stores).
DTYPE_ALIASES = {"fp32": "float32", "f32": "float32", "float": "float32",
                 "bf16": "bfloat16", "fp16": "float16", "f16": "float16", "half": "float16"}


def param_dtype_name(dtype) -> str:
    """"auto", or the `weights.PARAM_DTYPES` name of a dtype given as a name, an alias
    (bf16, fp16, fp32), a numpy / jax dtype or a torch dtype; None is float32."""
    if dtype is None:
        return "float32"
    if isinstance(dtype, str):
        key = dtype.strip().lower().removeprefix("torch.")
        if key == "auto":
            return "auto"
        key = DTYPE_ALIASES.get(key, key)
        name = weights.dtype_name(key) if key in weights.PARAM_DTYPES else None
    else:
        name = weights.dtype_name(str(dtype).removeprefix("torch.")) if \
            type(dtype).__module__ == "torch" else weights.dtype_name(dtype)
    if name is None:
        raise ValueError(f"dtype: expected 'auto', {', '.join(weights.PARAM_DTYPES)} (or bf16, "
                         f"fp16, fp32, a numpy / jax dtype), got {dtype!r}")
    return name


def resolve_source(src: str) -> str:
    """A Pythia name (`pythia-70m`, `pythia-160m-deduped`) that is no local path is the hub id
    `EleutherAI/<name>`; anything else is returned unchanged."""
    if os.path.exists(src) or not src.lower().startswith("pythia-") or paths.is_remote(src):
        return src
    try:
        get_preset(src)
    except ConfigError:
        return src
    return "EleutherAI/" + src.lower()


def from_pretrained(src: str | os.PathLike, revision: str | None = None, dtype=None, *,
                    compute_dtype: str | None = None, mesh=None, progress: bool = False,
                    cache_dir: str | os.PathLike | None = None, local_files_only: bool = False,
                    token: str | bool | None = None, force_download: bool = False,
                    **config_overrides) -> GPTNeoX:
    """Load a model from an HF directory / hub id / Pythia name, a pythia-jax checkpoint, or a
    GGUF file.

    src: a local path or URL (module docstring), a hub id (`EleutherAI/pythia-70m`) or a Pythia
      name (`pythia-70m`, `pythia-160m-deduped`: `EleutherAI/<name>` unless such a local path
      exists).
    revision, cache_dir, local_files_only, token, force_download: as in transformers, passed
      to huggingface_hub for a hub id (`revision="step3000"`: Pythia's training checkpoints).
    dtype: parameter dtype: "float32" / "bfloat16" / "float16" (also bf16, fp16, fp32, numpy,
      jax or torch dtypes) or "auto" (the dtype the checkpoint stores). Default: float32
      (checkpoints in fp16 / bf16 are upcast exactly); note transformers 5 defaults to the
      stored dtype: pass dtype="auto" for that.
    compute_dtype: activation / matmul dtype ("float32" default, "bfloat16").
    config_overrides: execution options (`EXECUTION_FIELDS`) such as `attention_impl="pallas"`,
      `fused_rotary=True`, `scan_layers=False`, `remat="full"`, and `gelu_approximate`
      (`NUMERICS_OVERRIDES`: llama.cpp's tanh GELU for a GGUF file); any other keyword is an error
      naming the accepted ones.
    mesh: place each parameter directly sharded by the logical-axis rules.
    """
    unknown = sorted(k for k in config_overrides
                     if k not in EXECUTION_FIELDS + NUMERICS_OVERRIDES)
    if unknown:
        raise TypeError(f"from_pretrained: unknown keyword argument(s) {unknown}; accepted: "
                        f"{', '.join(KEYWORDS)} and the execution overrides "
                        f"{', '.join(EXECUTION_FIELDS)} and {', '.join(NUMERICS_OVERRIDES)}")
    name = param_dtype_name(dtype)
    src = paths.abspath(src) if paths.is_remote(src) else resolve_source(os.fspath(src))
    common = dict(compute_dtype=compute_dtype, mesh=mesh, **config_overrides)
    if paths.is_remote(src):
        return _from_url(src, name, progress, common)
    if src.endswith(".gguf"):
        return gguf.load_gguf(src, dtype=name, progress=progress, **common)
    if os.path.isdir(src) and not os.path.isfile(os.path.join(src, "config.json")):
        return checkpoint.load_model(src, dtype=None if name == "auto" else name, **common)
    if hf.is_hub_id(src):
        src = hf.download(src, revision, cache_dir=cache_dir, local_files_only=local_files_only,
                          token=token, force_download=force_download)
    elif not os.path.isdir(src):
        raise FileNotFoundError(f"{src}: no such directory (expected an HF checkpoint directory, "
                                "a pythia-jax checkpoint, a .gguf file, a hub id like "
                                "'EleutherAI/pythia-70m' or a Pythia name like 'pythia-70m')")
    return hf.load_hf(src, dtype=name, progress=progress, **common)


def _from_url(src: str, name: str, progress: bool, common: dict) -> GPTNeoX:
    paths.check_available(src)
    if src.endswith(".gguf"):
        if not paths.isfile(src):
            raise FileNotFoundError(f"{src}: no such file")
        with paths.local_copy(src) as local:
            return gguf.load_gguf(local, dtype=name, progress=progress, **common)
    if not paths.isdir(src):
        raise FileNotFoundError(f"{src}: no such directory (expected an HF checkpoint directory, "
                                "a pythia-jax checkpoint or a .gguf file)")
    if not paths.isfile(paths.join(src, "config.json")):
        return checkpoint.load_model(src, dtype=None if name == "auto" else name, **common)
    with paths.local_copy(src) as local:
        return hf.load_hf(local, dtype=name, progress=progress, **common)
