"""pythia-jax checkpoint directories (orbax).

A *model directory* (what `convert.py --to=jax` writes):

    DIR/pythia_jax_config.json   the ModelConfig (architecture fields)
    DIR/params/                  orbax PyTree checkpoint of `nnx.state(model, nnx.Param)`

`load_model(DIR)` restores it, optionally straight onto a mesh (each parameter restored with the
sharding its logical axes give). Training workdirs (`train.py`) are resolved by
`resolve_model_dir` to the directory of a checkpoint step.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from pythia_jax.config import ConfigError, ModelConfig
from pythia_jax.model import GPTNeoX, abstract_model

__all__ = ["save_model", "load_model", "CONFIG_NAME", "PARAMS_DIR", "config_to_json",
           "config_from_json", "resolve_model_dir", "CheckpointDirError"]

CONFIG_NAME = "pythia_jax_config.json"
PARAMS_DIR = "params"

# Fields that describe the architecture (saved); execution options are chosen at load time.
_ARCH_FIELDS = ("hidden_size", "num_layers", "num_heads", "intermediate_size", "vocab_size",
                "rotary_pct", "rotary_emb_base", "max_position_embeddings", "layer_norm_eps",
                "use_parallel_residual", "gelu_approximate", "param_dtype", "init_method",
                "output_init_method", "init_std", "bos_token_id", "eos_token_id")


class CheckpointDirError(ValueError):
    """A pythia-jax checkpoint directory that is missing pieces or is corrupt."""


def config_to_json(cfg: ModelConfig) -> dict:
    return {k: getattr(cfg, k) for k in _ARCH_FIELDS}


def config_from_json(path: str, **overrides) -> ModelConfig:
    try:
        with open(path, encoding="utf-8") as fh:
            d = json.load(fh)
    except FileNotFoundError:
        raise CheckpointDirError(f"{path}: missing (not a pythia-jax checkpoint directory)") from None
    except json.JSONDecodeError as e:
        raise CheckpointDirError(f"{path}: malformed JSON at line {e.lineno}: {e.msg}") from None
    if not isinstance(d, dict):
        raise CheckpointDirError(f"{path}: expected a JSON object")
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise CheckpointDirError(f"{path}: unknown field {unknown[0]!r}; expected ModelConfig fields")
    d.update(overrides)
    try:
        return ModelConfig(**d)
    except (ConfigError, TypeError) as e:
        raise CheckpointDirError(f"{path}: {e}") from None


def save_model(model: GPTNeoX, dst: str, *, overwrite: bool = False) -> str:
    """Write a model directory atomically (temporary name, renamed when complete)."""
    dst = os.path.abspath(os.fspath(dst))
    if os.path.exists(dst) and not overwrite and (not os.path.isdir(dst) or os.listdir(dst)):
        raise FileExistsError(f"{dst}: already exists; pass overwrite=True to replace it")
    parent = os.path.dirname(dst)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.tmp-", dir=parent)
    try:
        with open(os.path.join(tmp, CONFIG_NAME), "w") as fh:
            json.dump(config_to_json(model.config), fh, indent=2)
        params = nnx.state(model, nnx.Param)
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(os.path.join(tmp, PARAMS_DIR), params)
            ckptr.wait_until_finished()
        from pythia_jax.hf import _replace_dir
        _replace_dir(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def resolve_model_dir(src: str) -> str:
    """A model directory, or the newest checkpoint step of a training workdir."""
    if os.path.isfile(os.path.join(src, CONFIG_NAME)):
        return src
    try:  # training workdirs are resolved by the training module (if present)
        from pythia_jax import train as train_lib
    except ImportError:
        train_lib = None
    if train_lib is not None and hasattr(train_lib, "resolve_checkpoint_dir"):
        found = train_lib.resolve_checkpoint_dir(src)
        if found is not None:
            return found
    raise CheckpointDirError(
        f"{src}: not a checkpoint: expected {CONFIG_NAME} (pythia-jax model directory), "
        "config.json (HF directory) or a training workdir with checkpoints")


def load_model(src: str, *, dtype: str | None = None, compute_dtype: str | None = None,
               mesh=None, **config_overrides) -> GPTNeoX:
    """Restore a model directory (or a training workdir's latest step) as a GPTNeoX.

    dtype: parameter dtype (default: as saved); compute_dtype: activation dtype.
    """
    if compute_dtype is not None:
        config_overrides["dtype"] = compute_dtype
    d = resolve_model_dir(os.fspath(src))
    cfg = config_from_json(os.path.join(d, CONFIG_NAME), **config_overrides)
    if dtype is not None:
        cfg = cfg.replace(param_dtype=dtype)
    abstract = abstract_model(cfg)
    graphdef, abs_state = nnx.split(abstract)
    params_abs = nnx.state(abstract, nnx.Param)

    from pythia_jax import sharding as shd

    def target(v):
        x = v.get_value()
        if mesh is not None:
            spec = shd.logical_to_spec(v.logical_axes, shape=x.shape, mesh=mesh)
            sh = jax.sharding.NamedSharding(mesh, spec)
        else:
            sh = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh)

    restore_target = jax.tree.map(lambda v: v.replace(target(v)), params_abs,
                                  is_leaf=lambda x: isinstance(x, nnx.Variable))
    path = os.path.join(d, PARAMS_DIR)
    if not os.path.isdir(path):
        raise CheckpointDirError(f"{path}: missing parameter checkpoint")
    try:
        with ocp.StandardCheckpointer() as ckptr:
            restored = ckptr.restore(path, restore_target)
    except Exception as e:  # orbax raises many types; name the directory and the cause
        raise CheckpointDirError(f"{path}: cannot restore parameters ({type(e).__name__}: "
                                 f"{str(e).splitlines()[0] if str(e) else ''})") from None
    nnx.update(abstract, restored)
    return abstract
