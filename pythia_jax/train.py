"""Training: train state, the jitted train step, the loop, orbax checkpoints, metrics.

    from pythia_jax import train
    train.train(config, workdir)          # config: configs/pythia.py or configs/smoke.py

- The state (`TrainState`: step, fp32 params, optimizer state) is created directly sharded on a
  (data, fsdp, tensor) mesh: `jax.jit(init, out_shardings=…)` with each parameter's sharding
  from its logical axes.
- `train_step` is a pure function under `jax.jit` (state donated): bf16 (or fp32) compute, loss
  = mean cross-entropy in fp32 over the full padded vocab, gradient accumulation over
  microbatches so the global batch is the same on any device count (each device sums its own
  rows' gradients and the devices reduce once per step: `train.grad_reduce`), Pythia's optimizer
  (`optim.make_optimizer`), non-finite gradients skip the update and are counted.
- Data: step k reads rows [k B, (k + 1) B) of the pre-shuffled `.bin/.idx` (`data.order`), so
  the position in the stream is the step; resuming needs nothing else.
- Checkpoints (`WORKDIR/checkpoints/<step>/`, orbax, async; the layout is `checkpoint`'s):
  Pythia's 154 steps by default plus a rolling recent one; SIGTERM saves and returns
  (`summary["preempted"]`; all processes of a multi-process run stop at the same step). Each
  step directory is also a pythia-jax model directory (`pythia_jax_config.json` + `params/`),
  so `pythia_jax.from_pretrained` (and `scripts/convert.py --to=hf`) accept a step directory
  or the workdir (latest step).
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import json
import logging
import math
import os
import signal
import socket
import sys
import threading
import time
import uuid
import warnings
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from pythia_jax import checkpoint as ckpt_lib
from pythia_jax import fused_loss as fused_loss_lib
from pythia_jax import optim as optim_lib
from pythia_jax import paths
from pythia_jax import progress
from pythia_jax import sharding as shd
from pythia_jax.config import ConfigError, ModelConfig
from pythia_jax.data.indexed import (IndexedDatasetError, MMapIndexedDataset,
                                     write_indexed_dataset)
from pythia_jax.data.order import PythiaOrder
from pythia_jax.data.pipeline import BatchIterator, make_global_batch
from pythia_jax.data.preprocess import tokenize_to_indexed
from pythia_jax.data.source import missing_file
from pythia_jax.generation import generate
from pythia_jax.metrics import MetricsWriter, peak_flops_per_device, throughput
from pythia_jax.model import GPTNeoX, abstract_model
from pythia_jax.sharding import BATCH_AXES, MESH_AXES
from pythia_jax.tokenizer import EOD_ID, load_tokenizer

__all__ = [
    "TrainState", "TrainSetup", "TrainConfigError", "TrainError", "model_config_from",
    "make_mesh", "grad_accum_steps", "create_train_state", "make_train_step", "make_eval_step",
    "cross_entropy", "loss_fn", "checkpoint_steps", "should_save", "Checkpoints",
    "open_data", "build_rows_from_text", "train", "METRICS_FILE", "PREEMPTED_EXIT_STATUS",
    "WorkdirLock", "LOCK_FILE",
]

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
#: The run's full config (JSON), written into the workdir at each start or resume. Not named
#: config.json: a folder with a config.json reads as an HF checkpoint directory.
CONFIG_COPY = "train_config.json"


class TrainConfigError(ValueError):
    """A training config field (or the data it names) that cannot work. Names the field."""


class TrainError(RuntimeError):
    """A training run that cannot continue (corrupt checkpoint, diverged, mismatched workdir)."""


# ------------------------------------------------------------------------------------------------
# State
@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    step: jax.Array       # int32 scalar: updates applied so far (= the checkpoint name)
    params: Any           # pure dict of fp32 arrays (nnx.to_pure_dict of the model's Params)
    opt_state: Any


@dataclasses.dataclass
class TrainSetup:
    """Everything static about a run: model config, mesh, optimizer, shardings."""
    model_cfg: ModelConfig
    mesh: Mesh
    graphdef: Any
    tx: optax.GradientTransformation
    schedule: Callable
    state_shardings: TrainState
    abstract_state: TrainState          # ShapeDtypeStructs carrying the shardings
    batch_sharding: NamedSharding
    grad_accum: int
    grad_reduce: str = "microbatch"     # "step" / "microbatch": `resolve_grad_reduce`
    fused_loss: bool = False            # `train.fused_loss`: see `loss_fn`
    fused_loss_store_probs: bool = False  # `train.fused_loss_store_probs`: see `loss_fn`
    init_fn: Callable | None = None     # jitted, creates the state directly sharded
    key: tuple = dataclasses.field(default=(), repr=False, compare=False)  # `_setup_key`
    _jitted: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)


def model_config_from(config) -> ModelConfig:
    """`config.model` (every ModelConfig field) -> ModelConfig, errors naming the field."""
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    d = config.model.to_dict() if hasattr(config.model, "to_dict") else dict(config.model)
    unknown = sorted(set(d) - fields)
    if unknown:
        raise TrainConfigError(f"config.model.{unknown[0]}: unknown field; expected ModelConfig "
                               f"fields {sorted(fields)}")
    try:
        return ModelConfig(**d)
    except (ConfigError, TypeError) as e:
        raise TrainConfigError(f"config.model: {e}") from None


def _positive_int(config, dotted: str, allow_zero: bool = False) -> int:
    node = config
    for part in dotted.split("."):
        node = node[part]
    ok = isinstance(node, (int, np.integer)) and not isinstance(node, bool)
    ok = ok and (node >= 0 if allow_zero else node > 0)
    if not ok:
        raise TrainConfigError(f"config.{dotted}: expected a {'non-negative' if allow_zero else 'positive'}"
                               f" integer, got {node!r}")
    return int(node)


def validate_config(config) -> ModelConfig:
    mcfg = model_config_from(config)
    _positive_int(config, "train.num_steps", allow_zero=True)
    _positive_int(config, "train.batch_size")
    _positive_int(config, "train.seq_len")
    _positive_int(config, "train.log_every")
    if "preemption_check_every" in config.train:
        _positive_int(config, "train.preemption_check_every")
    _positive_int(config, "train.grad_accum_steps", allow_zero=True)
    _positive_int(config, "train.microbatch_per_device", allow_zero=True)
    if _grad_reduce_field(config) not in GRAD_REDUCE:
        raise TrainConfigError(f"config.train.grad_reduce: expected one of {GRAD_REDUCE}, got "
                               f"{_grad_reduce_field(config)!r}")
    for field in ("fused_loss", "fused_loss_store_probs"):
        if not isinstance(config.train.get(field, False), bool):
            raise TrainConfigError(f"config.train.{field}: expected True or False, got "
                                   f"{config.train.get(field)!r}")
    _positive_int(config, "optim.decay_steps")
    _positive_int(config, "optim.warmup_steps", allow_zero=True)
    _positive_int(config, "checkpoint.every", allow_zero=True)
    _positive_int(config, "checkpoint.rolling_every", allow_zero=True)
    if mcfg.param_dtype != "float32":
        raise TrainConfigError(f"config.model.param_dtype: training keeps fp32 master weights; "
                               f"expected 'float32', got {mcfg.param_dtype!r}")
    try:
        optim_lib.pythia_schedule(float(config.optim.peak_lr), float(config.optim.min_lr),
                                  int(config.optim.warmup_steps), int(config.optim.decay_steps))
    except optim_lib.OptimConfigError as e:
        raise TrainConfigError(f"config.{e}") from None
    return mcfg


# ------------------------------------------------------------------------------------------------
# Mesh and sharding
def make_mesh(config, devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh over all devices from `config.mesh.shape` (-1 = the rest);
    TPU devices laid out along the torus (`sharding.make_mesh`), axis types Auto."""
    shape = config.mesh.shape
    shape = shape.to_dict() if hasattr(shape, "to_dict") else dict(shape)
    if set(shape) - set(MESH_AXES):
        raise TrainConfigError(f"config.mesh.shape: expected the axes {MESH_AXES}, got "
                               f"{sorted(shape)}")
    try:
        return shd.make_mesh(shape, devices)
    except ValueError as e:
        raise TrainConfigError(f"config.mesh.shape={shape}: {e}") from None


def _batch_shards(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def grad_accum_steps(config, mesh: Mesh) -> int:
    """Microbatches per step so that the global batch is `train.batch_size` on any mesh."""
    B = int(config.train.batch_size)
    shards = _batch_shards(mesh)
    if B % shards:
        raise TrainConfigError(f"config.train.batch_size={B}: must be divisible by the "
                               f"{shards} data x fsdp devices of the mesh")
    per_shard = B // shards
    if config.train.grad_accum_steps > 0:
        A = int(config.train.grad_accum_steps)
    elif config.train.microbatch_per_device > 0:  # at most this many rows per microbatch
        mpd = int(config.train.microbatch_per_device)
        if per_shard <= mpd:  # the shard's rows fit in one microbatch (e.g. a large pod)
            mpd = per_shard
        if per_shard % mpd:
            raise TrainConfigError(f"config.train.microbatch_per_device={mpd}: must divide the "
                                   f"{per_shard} rows each data shard holds (batch {B} over "
                                   f"{shards} shards)")
        A = per_shard // mpd
    else:
        A = 1
    if per_shard % A:
        raise TrainConfigError(f"config.train.grad_accum_steps={A}: must divide the {per_shard} "
                               f"rows each of the {shards} data shards holds (batch {B})")
    return A


def _nest(pairs: Iterable[tuple[tuple, Any]]) -> dict:
    out: dict = {}
    for path, value in pairs:
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = value
    return out


def param_shardings(model_cfg: ModelConfig, mesh: Mesh) -> dict:
    """Pure-dict tree of NamedShardings from each Param's logical axes."""
    abstract = abstract_model(model_cfg)
    pairs = []
    for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        spec = shd.logical_to_spec(var.logical_axes, shape=var.get_value().shape, mesh=mesh)
        pairs.append((tuple(path), NamedSharding(mesh, spec)))
    return _nest(pairs)


def _params_as_state(graphdef, params):
    """The pure-dict params as an `nnx.State` of Params (what `checkpoint.save_model` writes)."""
    return nnx.state(nnx.merge(graphdef, params), nnx.Param)


# ------------------------------------------------------------------------------------------------
# Loss and steps
def cross_entropy(logits_BTV, targets_BT):
    """Mean token cross-entropy in fp32 over the full (padded) vocabulary."""
    logits = logits_BTV.astype(jnp.float32)
    logz = jax.nn.logsumexp(logits, axis=-1)
    tgt = jnp.take_along_axis(logits, targets_BT[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return jnp.mean(logz - tgt)


def loss_fn(params, graphdef, inputs_BT, targets_BT, fused: bool = False,
            store_probs: bool = False):
    """Mean token cross-entropy of the model on a batch.

    `fused` (`train.fused_loss`): where the fused output-layer + cross-entropy kernel can run
    (`fused_loss.kernel_available()`: traced for TPU, or inside `fused_loss.interpret_mode()`)
    the model returns its final hidden states and `fused_loss.sharded_cross_entropy` computes
    the loss from them and `embed_out` (cast to the compute dtype, as the model's einsum does)
    without materialising the fp32 logits; elsewhere (CPU, GPU, a vocab-splitting mesh) the
    plain loss. `store_probs` (`train.fused_loss_store_probs`): the kernel's `store_probs`
    (bf16 probabilities kept for the backward instead of recomputing the logits)."""
    model = nnx.merge(graphdef, params)
    if fused and fused_loss_lib.kernel_available():
        cdt = jnp.dtype(model.config.dtype)
        hidden = model(inputs_BT, return_hidden=True)
        loss = fused_loss_lib.sharded_cross_entropy(
            hidden, model.embed_out.embedding[...].astype(cdt), targets_BT,
            store_probs=store_probs)
        if loss is not None:
            return loss
        return cross_entropy(jnp.einsum("btd,vd->btv", hidden,
                                        model.embed_out.embedding[...].astype(cdt),
                                        preferred_element_type=jnp.float32), targets_BT)
    return cross_entropy(model(inputs_BT), targets_BT)


GRAD_REDUCE = ("auto", "step", "microbatch")


def resolve_grad_reduce(mode: str, mesh: Mesh) -> str:
    """`train.grad_reduce` -> "step" or "microbatch".

    "step": each device sums the gradients of its own rows over the microbatches and the
    devices reduce once per step, after the accumulation loop (one all-reduce over `data`, one
    reduce-scatter over `fsdp`). Every device then holds a full-size fp32 gradient accumulator
    (and, with fsdp, the full gathered parameters) for the step. "microbatch": the sharded
    accumulator of ZeRO-3; XLA reduces (reduce-scatters) each microbatch's gradients. "auto":
    "step" unless the mesh has an fsdp axis (whose point is not holding the full tree)."""
    if mode not in GRAD_REDUCE:
        raise TrainConfigError(f"config.train.grad_reduce: expected one of {GRAD_REDUCE}, got "
                               f"{mode!r}")
    if mode == "auto":
        return "microbatch" if mesh.shape["fsdp"] > 1 else "step"
    return mode


def _grad_reduce_field(config) -> str:
    """`train.grad_reduce` ("auto" where the config has no such field)."""
    return config.train.get("grad_reduce", "auto")


def _fused_loss_field(config):
    """`train.fused_loss` (False where the config has no such field)."""
    return config.train.get("fused_loss", False)


def loss_options(setup: TrainSetup) -> dict:
    """The keyword arguments of `loss_fn` for this setup (`train.fused_loss*`)."""
    return {"fused": setup.fused_loss, "store_probs": setup.fused_loss_store_probs}


def _grads(setup: TrainSetup, params, inputs, targets, reduce: str | None = None):
    """(loss, grads) of the whole global batch, accumulated over `setup.grad_accum` pieces;
    `reduce` ("step" / "microbatch", default the setup's): where the gradients are reduced
    across devices (`resolve_grad_reduce`). Without accumulation XLA reduces each layer's
    gradients once, overlapped with the backward pass, either way."""
    A = setup.grad_accum
    reduce = setup.grad_reduce if reduce is None else reduce
    vg = jax.value_and_grad(functools.partial(loss_fn, **loss_options(setup)))
    if A == 1:
        return vg(params, setup.graphdef, inputs, targets)
    if reduce == "step":
        return _grads_reduced_per_step(setup, params, inputs, targets)
    B, T = inputs.shape
    # Row i*A + j goes to microbatch j: every microbatch keeps the batch sharding of the rows
    # each device already holds (no data movement), and all microbatches have equal size, so
    # the mean of the microbatch means is the global mean.
    mb_sharding = NamedSharding(setup.mesh, P(None, BATCH_AXES, None))

    def split(x):
        x = x.reshape(B // A, A, T).swapaxes(0, 1)
        return jax.lax.with_sharding_constraint(x, mb_sharding)

    p_sh = setup.state_shardings.params

    def body(carry, xy):
        loss_sum, g_sum = carry
        loss, g = vg(params, setup.graphdef, *xy)
        g_sum = jax.tree.map(jnp.add, g_sum, g)
        g_sum = jax.lax.with_sharding_constraint(g_sum, p_sh)
        return (loss_sum + loss, g_sum), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    zeros = jax.lax.with_sharding_constraint(zeros, p_sh)
    (loss_sum, g_sum), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros),
                                        (split(inputs), split(targets)))
    return loss_sum / A, jax.tree.map(lambda g: g / A, g_sum)


def _manual_part(spec: P, manual: tuple[str, ...]) -> P:
    """`spec` with only the `manual` mesh axes (what a shard_map manual over them sees)."""
    def keep(entry):
        names = (entry,) if isinstance(entry, str) else tuple(entry or ())
        kept = tuple(n for n in names if n in manual)
        return kept[0] if len(kept) == 1 else (kept or None)
    return P(*(keep(e) for e in spec))


def _grads_reduced_per_step(setup: TrainSetup, params, inputs, targets):
    """`_grads` with one cross-device reduction per step: a shard_map manual over the batch
    axes (tensor stays automatic) in which each device accumulates the gradients of its own
    rows, then one psum_scatter (the dimension a parameter is split on over fsdp) / psum (the
    batch axes it is replicated over) per parameter after the loop."""
    A, mesh = setup.grad_accum, setup.mesh
    # the batch axes that split the batch (a size-1 manual axis trips XLA's partitioner)
    manual = tuple(a for a in BATCH_AXES if mesh.shape[a] > 1)
    if not manual:  # one batch shard: nothing to reduce across devices
        return _grads(setup, params, inputs, targets, reduce="microbatch")
    shards = _batch_shards(mesh)
    specs = jax.tree.map(lambda s: _manual_part(s.spec, manual), setup.state_shardings.params)
    batch_spec = P(manual, None)
    vg = jax.value_and_grad(functools.partial(loss_fn, **loss_options(setup)))

    def axes_of(spec):  # (dim, batch axis) pairs this parameter is split on
        out = []
        for dim, entry in enumerate(spec):
            for name in ((entry,) if isinstance(entry, str) else tuple(entry or ())):
                out.append((dim, name))
        return out

    def gather(p, spec):
        for dim, name in reversed(axes_of(spec)):
            p = jax.lax.all_gather(p, name, axis=dim, tiled=True)
        return p

    def reduce(g, spec):
        split = axes_of(spec)
        for dim, name in split:
            g = jax.lax.psum_scatter(g, name, scatter_dimension=dim, tiled=True)
        rest = tuple(a for a in manual if a not in {n for _, n in split})
        return jax.lax.psum(g, rest) if rest else g

    def local(params, inputs, targets):
        Bl, T = inputs.shape
        # the same microbatches as the "microbatch" path: each shard's rows start at a
        # multiple of A, so local row r goes to microbatch r mod A
        xs = tuple(x.reshape(Bl // A, A, T).swapaxes(0, 1) for x in (inputs, targets))
        with shd.manual_rules(manual):
            def body(carry, xy):
                loss_sum, g_sum = carry
                full = jax.tree.map(gather, params, specs)
                loss, g = vg(full, setup.graphdef, *xy)
                return (loss_sum + loss, jax.tree.map(jnp.add, g_sum, g)), None

            zeros = jax.tree.map(lambda p, s: jnp.zeros(gather(p, s).shape, jnp.float32),
                                 params, specs)
            (loss_sum, g_sum), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros), xs)
        n = A * shards   # equal-sized pieces: the global mean is the mean of their means
        loss = jax.lax.psum(loss_sum, manual) / n
        grads = jax.tree.map(lambda g, s: reduce(g / n, s), g_sum, specs)
        return loss, grads

    fn = jax.shard_map(local, mesh=mesh, in_specs=(specs, batch_spec, batch_spec),
                       out_specs=(P(), specs), axis_names=set(manual), check_vma=False)
    return fn(params, inputs, targets)


def make_train_step(setup: TrainSetup, *, jit: bool = True, donate: bool = True):
    """`train_step(state, batch) -> (state, metrics)`; batch = {"inputs", "targets"} [B, T]."""

    def train_step(state: TrainState, batch: dict):
        with shd.logical_rules(setup.mesh):
            loss, grads = _grads(setup, state.params, batch["inputs"], batch["targets"])
        grad_norm = optax.global_norm(grads)
        lr = optim_lib.current_lr(state.opt_state, setup.schedule)
        updates, opt_state = setup.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        nf = optim_lib.nonfinite_counts(opt_state)
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "lr": lr,
            "skipped": jnp.logical_not(nf["last_finite"]).astype(jnp.int32),
            "nonfinite_total": nf["total"],
            "nonfinite_consecutive": nf["consecutive"],
        }
        return TrainState(state.step + 1, params, opt_state), metrics

    if not jit:
        return train_step
    key = ("train_step", donate)
    if key not in setup._jitted:  # one compiled step per setup
        replicated = NamedSharding(setup.mesh, P())
        batch_sh = {"inputs": setup.batch_sharding, "targets": setup.batch_sharding}
        setup._jitted[key] = jax.jit(train_step, in_shardings=(setup.state_shardings, batch_sh),
                                     out_shardings=(setup.state_shardings, replicated),
                                     donate_argnums=(0,) if donate else ())
    return setup._jitted[key]


def make_eval_step(setup: TrainSetup):
    """`eval_step(params, batch) -> mean loss` (no accumulation: the eval batch fits)."""

    def eval_step(params, batch):
        with shd.logical_rules(setup.mesh):
            return loss_fn(params, setup.graphdef, batch["inputs"], batch["targets"],
                           **loss_options(setup))

    if "eval_step" not in setup._jitted:
        batch_sh = {"inputs": setup.batch_sharding, "targets": setup.batch_sharding}
        setup._jitted["eval_step"] = jax.jit(
            eval_step, in_shardings=(setup.state_shardings.params, batch_sh),
            out_shardings=NamedSharding(setup.mesh, P()))
    return setup._jitted["eval_step"]


def _setup_key(config, mesh: Mesh, mcfg: ModelConfig):
    """Everything a TrainSetup depends on, hashable: a setup passed back in (`setup=`) must have
    been built for the same key."""
    optim_cfg = config.optim.to_dict() if hasattr(config.optim, "to_dict") else dict(config.optim)
    t = config.train
    return (mcfg, json.dumps(optim_cfg, sort_keys=True, default=str), int(t.seed), mesh,
            int(t.batch_size), int(t.grad_accum_steps), int(t.microbatch_per_device),
            _grad_reduce_field(config), _fused_loss_field(config),
            config.train.get("fused_loss_store_probs", False))


def create_train_state(config, mesh: Mesh, *, init: bool = True,
                       setup: TrainSetup | None = None) -> tuple[TrainState | None, TrainSetup]:
    """(state, setup). The state is initialized directly sharded (Pythia init, `train.seed`);
    with `init=False` only the setup (with abstract, sharded shapes) is built.

    Each call builds a new setup (and so compiles its init and step anew) unless `setup` is one
    built earlier for the same model, optimizer, seed, mesh and batch layout: pass it to reuse
    its compiled functions (e.g. `train(..., setup=summary["setup"])` in a notebook). A setup
    built for anything else raises TrainConfigError."""
    mcfg = validate_config(config)
    key = _setup_key(config, mesh, mcfg)
    if setup is None:
        setup = _build_setup(config, mesh, mcfg, key)
    elif setup.key != key:
        raise TrainConfigError("setup: built for another model, optimizer, seed, mesh or batch "
                               "layout than this config; pass setup=None to build one")
    if not init:
        return None, setup
    return setup.init_fn(), setup


def _build_setup(config, mesh: Mesh, mcfg: ModelConfig, key) -> TrainSetup:
    tx, schedule = optim_lib.make_optimizer(config.optim)
    graphdef = nnx.graphdef(abstract_model(mcfg))
    seed = int(config.train.seed)

    def init_fn():
        model = GPTNeoX(mcfg, rngs=nnx.Rngs(params=seed))
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))

    abstract = jax.eval_shape(init_fn)
    replicated = NamedSharding(mesh, P())
    p_sh = param_shardings(mcfg, mesh)
    opt_sh = optax.tree_map_params(tx, lambda _, s: s, abstract.opt_state, p_sh,
                                   transform_non_params=lambda _: replicated)
    state_sh = TrainState(replicated, p_sh, opt_sh)
    abstract_sharded = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_sh)
    return TrainSetup(
        model_cfg=mcfg, mesh=mesh, graphdef=graphdef, tx=tx, schedule=schedule,
        state_shardings=state_sh, abstract_state=abstract_sharded,
        batch_sharding=NamedSharding(mesh, P(BATCH_AXES, None)),
        grad_accum=grad_accum_steps(config, mesh),
        grad_reduce=resolve_grad_reduce(_grad_reduce_field(config), mesh),
        fused_loss=_fused_loss_field(config),
        fused_loss_store_probs=config.train.get("fused_loss_store_probs", False),
        init_fn=jax.jit(init_fn, out_shardings=state_sh), key=key)


# ------------------------------------------------------------------------------------------------
# Checkpoint policy
def checkpoint_steps(num_steps: int, extra_steps=(), every: int = 0,
                     save_final: bool = True) -> list[int]:
    """Every step a run of `num_steps` saves permanently (Pythia: 154 steps for 143,000)."""
    steps = {int(s) for s in extra_steps if 0 <= int(s) <= num_steps}
    if every and every > 0:
        steps.update(range(every, num_steps + 1, every))
    if save_final:
        steps.add(int(num_steps))
    return sorted(steps)


def should_save(step: int, num_steps: int, ckpt_cfg) -> tuple[bool, bool]:
    """(permanent, rolling) decisions for the state after `step` updates."""
    permanent = (step in {int(s) for s in ckpt_cfg.extra_steps}
                 or (ckpt_cfg.every > 0 and step > 0 and step % ckpt_cfg.every == 0)
                 or (bool(ckpt_cfg.save_final) and step == num_steps))
    rolling = bool(ckpt_cfg.rolling_every > 0 and step > 0 and step % ckpt_cfg.rolling_every == 0)
    return permanent, rolling


class Checkpoints:
    """`WORKDIR/checkpoints` (`checkpoint.WorkdirCheckpoints`, which owns the layout) with
    Pythia's save policy from `config.checkpoint`, saving and restoring `TrainState`s."""

    def __init__(self, workdir: str, config, setup: TrainSetup):
        self.config = config
        self.setup = setup
        ck = config.checkpoint
        self.store = ckpt_lib.WorkdirCheckpoints(
            workdir,
            keep_steps=checkpoint_steps(int(config.train.num_steps), ck.extra_steps,
                                        int(ck.every), bool(ck.save_final)),
            keep_latest=int(ck.keep_rolling), async_save=bool(ck.async_save))
        self.dir = self.store.dir

    def latest_step(self) -> int | None:
        return self.store.latest_step()

    def save(self, state: TrainState, meta: dict) -> bool:
        try:
            return self.store.save(int(jax.device_get(state.step)),
                                   params=_params_as_state(self.setup.graphdef, state.params),
                                   opt_state=state.opt_state, meta=meta,
                                   model_config=self.setup.model_cfg)
        except ckpt_lib.CheckpointDirError as e:  # NaN/inf parameters: refused, nothing written
            latest = self.store.latest_step()
            raise TrainError(f"{e}. The last good checkpoint is "
                             + (self.store.step_dir(latest) if latest is not None else "none")
                             + ".") from None

    def restore(self, step: int) -> tuple[TrainState, dict]:
        abstract = self.setup.abstract_state
        try:
            meta = self.store.read_meta(step)
            self._check_compatible(self.store.step_dir(step), meta)
            params, opt_state = self.store.restore(
                step, params=_params_as_state(self.setup.graphdef, abstract.params),
                opt_state=abstract.opt_state,
                param_layout=ckpt_lib.layout_of(meta.get("model") or {},
                                                self.store.step_dir(step)))
        except ckpt_lib.CheckpointDirError as e:
            raise TrainError(str(e)) from None
        step_arr = jax.device_put(jnp.asarray(step, jnp.int32),
                                  self.setup.state_shardings.step)
        return TrainState(step_arr, nnx.to_pure_dict(params), opt_state), meta

    def _check_compatible(self, where: str, meta: dict) -> None:
        saved = meta.get("model") or {}
        ours = ckpt_lib.config_to_json(self.setup.model_cfg)
        diff = sorted(k for k in ours if k in saved and saved[k] != ours[k])
        if diff:
            k = diff[0]
            raise TrainError(f"{where}: this workdir was trained with model.{k}={saved[k]!r}, "
                             f"the config says {ours[k]!r}. Use a new --workdir (nothing was "
                             "changed).")
        for k in ("batch_size", "seq_len"):
            if k in meta and meta[k] != int(self.config.train[k]):
                raise TrainError(f"{where}: this workdir was trained with train.{k}={meta[k]}, "
                                 f"the config says {self.config.train[k]}. Use a new --workdir "
                                 "(nothing was changed).")

    def wait(self) -> None:
        self.store.wait()

    def close(self) -> None:
        self.store.close()


# ------------------------------------------------------------------------------------------------
# One run per workdir
#: `WORKDIR/train.lock`: JSON {host, pid, time, token} of the run that holds the workdir.
LOCK_FILE = "train.lock"
#: A lock whose holder has not refreshed it for this long counts as stale (its holder died on
#: another host, or the lock sits in a bucket); a holder refreshes it every LOCK_REFRESH_SECS.
LOCK_STALE_SECS = 15 * 60
LOCK_REFRESH_SECS = 60


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


class WorkdirLock:
    """One training run per workdir: `WORKDIR/train.lock` holds the host, pid and time of the
    run that holds it. A second run is refused (`TrainError` naming the holder). A stale lock
    is taken over, saying so: its pid is not running on this host, or it was not refreshed for
    `LOCK_STALE_SECS` (the only test possible for another host or a gs:// workdir). Locally
    the lock is created exclusively (O_EXCL); in a bucket it is written and read back (a race
    of two runs starting within the same second is not excluded there)."""

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.path = paths.join(workdir, LOCK_FILE)
        self.host = socket.gethostname()
        self.token = uuid.uuid4().hex
        self._written = 0.0
        self.held = False

    def _record(self) -> str:
        return json.dumps({"host": self.host, "pid": os.getpid(), "time": time.time(),
                           "token": self.token}) + "\n"

    def _read(self) -> dict | None:
        try:
            out = json.loads(paths.read_text(self.path))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # unreadable: a lock all the same (stale by its file's age only)
        return out if isinstance(out, dict) else {}

    def _stale(self, info: dict) -> str | None:
        pid, host = info.get("pid"), info.get("host")
        if host == self.host and isinstance(pid, int):
            return None if _pid_alive(pid) else f"pid {pid} is not running on this host"
        t = info.get("time")
        age = time.time() - t if isinstance(t, (int, float)) else math.inf
        if age > LOCK_STALE_SECS:
            return (f"not refreshed for {age / 60:.0f} min (limit {LOCK_STALE_SECS // 60} min)"
                    if math.isfinite(age) else "it holds no time")
        return None

    def _create(self) -> bool:
        if paths.is_remote(self.path):
            if paths.exists(self.path):
                return False
            paths.write_text(self.path, self._record())
        else:
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as fh:
                fh.write(self._record())
        return True

    def acquire(self) -> None:
        if not self._create():
            info = self._read()
            if info is not None:
                why = self._stale(info)
                if why is None:
                    when = info.get("time")
                    since = (time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when))
                             if isinstance(when, (int, float)) else "?")
                    raise TrainError(
                        f"{self.workdir}: another training run holds this workdir (host "
                        f"{info.get('host', '?')}, pid {info.get('pid', '?')}, lock {self.path} "
                        f"refreshed {since}); stop it or use another --workdir. If no run is "
                        f"using it, remove {self.path}.")
                _log(f"{self.path}: taking over a stale lock of host {info.get('host', '?')}, "
                     f"pid {info.get('pid', '?')} ({why})")
            paths.write_text(self.path, self._record())
        self._written = time.monotonic()
        if (self._read() or {}).get("token") != self.token:
            raise TrainError(f"{self.workdir}: another training run took the lock {self.path} "
                             "at the same time; use another --workdir")
        self.held = True

    def refresh(self) -> None:
        """Rewrite the lock's time (at most every LOCK_REFRESH_SECS)."""
        if self.held and time.monotonic() - self._written >= LOCK_REFRESH_SECS:
            paths.write_text(self.path, self._record())
            self._written = time.monotonic()

    def release(self) -> None:
        if self.held:
            self.held = False
            if (self._read() or {}).get("token") == self.token:
                paths.remove(self.path)


_DISK_FULL_TEXTS = ("No space left on device", "File too large", "Disk quota exceeded")


class _DiskFullLogFilter(logging.Filter):
    """Drops the log records of writes that failed for lack of space: orbax's writer threads
    (and asyncio, for their unretrieved futures, as late as interpreter exit) log each one with
    a traceback, while `train` reports the full disk in one line. Installed on the root
    logger's handlers by `train`; left in place after a full disk (those late records)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and _disk_full(exc):
            return False
        try:
            text = record.getMessage()
        except Exception:
            return True
        return not any(t in text for t in _DISK_FULL_TEXTS)


_DISK_FULL_LOG_FILTER = _DiskFullLogFilter()


def _late_callback_on_closed_loop(unraisable) -> bool:
    """`RuntimeError('Event loop is closed')` raised in asyncio's `call_soon_threadsafe`: a
    tensorstore write finishing after the orbax save that owned the loop failed and closed it.
    tensorstore reports each one from its own threads through `sys.unraisablehook`, one per
    outstanding write, at any time up to interpreter exit. The save's own error has been raised
    already, so they carry nothing for the user."""
    exc, tb = unraisable.exc_value, unraisable.exc_traceback
    if type(exc) is not RuntimeError or str(exc) != "Event loop is closed":
        return False
    names = []
    while tb is not None:
        names.append(tb.tb_frame.f_code.co_name)
        tb = tb.tb_next
    return "call_soon_threadsafe" in names


class _QuietClosedLoopHook:
    """`sys.unraisablehook` while training: drops `_late_callback_on_closed_loop` reports and
    passes every other one to the hook it replaced. Left in place after a full disk (those
    reports come as late as interpreter exit)."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, unraisable):
        if not _late_callback_on_closed_loop(unraisable):
            self.inner(unraisable)


def _install_closed_loop_hook():
    """Installs `_QuietClosedLoopHook` (once); returns a function that restores the old hook."""
    if isinstance(sys.unraisablehook, _QuietClosedLoopHook):
        return lambda: None
    hook = _QuietClosedLoopHook(sys.unraisablehook)
    sys.unraisablehook = hook

    def restore():
        if sys.unraisablehook is hook:
            sys.unraisablehook = hook.inner
    return restore


# The serialization coroutines a failed orbax save leaves unawaited (orbax's
# `async_serialize_from_host.<locals>.write_fragment` and its kin). Python warns for each one
# when it is collected ("RuntimeWarning: coroutine ... was never awaited"), as late as interpreter
# exit ("sys:1: ..."), after the one-line full-disk error; at exit the warnings filters no longer
# apply, so those still alive then are closed first (closing an unstarted coroutine is silent).
_ABANDONED_WRITE_PREFIX = "async_serialize"
_ABANDONED_WRITE_WARNING = rf"coroutine '{_ABANDONED_WRITE_PREFIX}[^']*' was never awaited"


def _close_abandoned_writes() -> int:
    """Closes every live, never-started coroutine named `_ABANDONED_WRITE_PREFIX`...; returns
    how many."""
    import gc
    import inspect
    import types
    n = 0
    for obj in gc.get_objects():  # type(), not isinstance(): no object's __class__ is asked
        if (type(obj) is types.CoroutineType
                and obj.__qualname__.startswith(_ABANDONED_WRITE_PREFIX)
                and inspect.getcoroutinestate(obj) == inspect.CORO_CREATED):
            obj.close()
            n += 1
    return n


def _quiet_abandoned_writes():
    """After a full disk: ignores `_ABANDONED_WRITE_WARNING` from now on and closes the
    coroutines still alive at exit (once per process; left in place, like the hook)."""
    warnings.filterwarnings("ignore", message=_ABANDONED_WRITE_WARNING, category=RuntimeWarning)
    global _ABANDONED_WRITES_AT_EXIT
    if not _ABANDONED_WRITES_AT_EXIT:
        import atexit
        atexit.register(_close_abandoned_writes)
        _ABANDONED_WRITES_AT_EXIT = True


_ABANDONED_WRITES_AT_EXIT = False


def _disk_full(e: BaseException) -> bool:
    """A write failed for lack of space (ENOSPC, EDQUOT, EFBIG) somewhere in `e`'s chain
    (orbax re-raises its writer threads' errors as other types; their text names the cause)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            return True
        if any(t in str(e) for t in _DISK_FULL_TEXTS):
            return True
        e = e.__cause__ or e.__context__
    return False


# ------------------------------------------------------------------------------------------------
# Data
def _resolve_path(path: str, workdir: str) -> str:
    path = path.replace("{workdir}", paths.abspath(workdir))
    return path if paths.is_remote(path) else os.path.expanduser(path)


def build_rows_from_text(text_path: str, prefix: str, seq_len: int, *, seed: int = 1234,
                         eval_rows: int = 0, tokenizer=None) -> dict:
    """Tokenize a text file with the project's preprocessing, cut the token stream into rows
    of seq_len + 1 tokens (consecutive rows overlap by one token, as NeoX's samples do), shuffle
    the rows with `seed` and write them as a pre-shuffled-style `.bin/.idx` at `prefix` (the
    last `eval_rows` rows, unshuffled, at `prefix + "_eval"`). Returns {"train", "eval"} prefixes.
    """
    import tempfile

    folder = os.path.dirname(os.path.abspath(prefix))
    os.makedirs(folder, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".tokenize-") as tmp:
        docs_prefix = tokenize_to_indexed(text_path, os.path.join(tmp, "corpus"),
                                          tokenizer=tokenizer)["text"]
        ds = MMapIndexedDataset(docs_prefix)
        stream = np.array(ds.get_range(0, len(ds)))
        vocab = None
        del ds
    n_rows = (stream.size - 1) // seq_len
    if n_rows - eval_rows < 1:
        raise TrainConfigError(f"{text_path}: {stream.size} tokens make only {n_rows} rows of "
                               f"seq_len + 1 = {seq_len + 1} tokens; expected more than "
                               f"{eval_rows} (eval rows)")
    starts = np.arange(n_rows) * seq_len
    rows = np.stack([stream[s:s + seq_len + 1] for s in starts])
    train_rows, held = rows[: n_rows - eval_rows], rows[n_rows - eval_rows:]
    train_rows = train_rows[np.random.RandomState(seed).permutation(len(train_rows))]
    out = {"train": prefix, "eval": None}
    write_indexed_dataset(prefix, train_rows, vocab_size=vocab, dtype=stream.dtype)
    if eval_rows:
        write_indexed_dataset(prefix + "_eval", held, vocab_size=vocab, dtype=stream.dtype)
        out["eval"] = prefix + "_eval"
    return out


def _data_exists(prefix: str) -> bool:
    """`prefix.idx` plus `prefix.bin` or its shards, on disk or in a bucket."""

    return MMapIndexedDataset.exists(prefix)


def open_data(config, workdir: str, *, build: bool = True):
    """(train PythiaOrder, eval PythiaOrder or None) for `config.data`; clear errors naming
    `config.data.path` when the files are missing or their rows are not seq_len + 1 long. The
    orders check each batch's token ids against `model.vocab_size` as it is read
    (`IndexedDatasetError` naming the file, item, row and id)."""

    d = config.data
    if not d.path:
        raise TrainConfigError("config.data.path: empty; expected the prefix of a pre-shuffled "
                               ".bin/.idx pair (e.g. .../document for document.bin + "
                               "document.idx)")
    prefix = _resolve_path(str(d.path), workdir)
    if prefix.endswith((".bin", ".idx")):
        prefix = prefix[:-4]
    seq_len = int(config.train.seq_len)
    vocab_size = model_config_from(config).vocab_size  # every batch's ids are checked against it
    text = str(d.get("build_from_text", "") or "")
    if not _data_exists(prefix):
        if text and build:
            if not os.path.isfile(text):
                raise TrainConfigError(f"config.data.build_from_text: {text}: no such file")
            eval_rows = int(d.get("build_eval_rows", 0))
            build_rows_from_text(text, prefix, seq_len, seed=int(d.get("build_shuffle_seed", 1234)),
                                 eval_rows=eval_rows)
        else:
            missing = missing_file(prefix)
            if missing is not None:
                raise TrainConfigError(f"config.data.path={d.path!r}: {missing} (expected a "
                                       "pre-shuffled .bin/.idx pair, or the .idx and Pythia's "
                                       "shards, whose items are seq_len + 1 = "
                                       f"{seq_len + 1} tokens)")

    def order(p, field):
        try:
            # PythiaOrder opens MMapIndexedDataset(p): the one opener of token data (local or
            # gs://, one .bin or Pythia's shards in place)
            return PythiaOrder(p, batch_size=int(config.train.batch_size), seq_len=seq_len,
                               vocab_size=vocab_size)
        except (IndexedDatasetError, FileNotFoundError, ValueError) as e:
            raise TrainConfigError(f"config.{field}={p!r} (train.seq_len={seq_len}): {e}") from None

    train_order = order(prefix, "data.path")
    eval_path = str(d.get("eval_path", "") or "")
    eval_order = None
    if eval_path:
        ep = _resolve_path(eval_path, workdir)
        if _data_exists(ep):
            eval_order = order(ep, "data.eval_path")
        elif not text:
            raise TrainConfigError(f"config.data.eval_path={eval_path!r}: {ep}.bin/.idx: "
                                   "no such file")
    return train_order, eval_order


def check_item_lengths(order, num_steps: int, field: str = "data.path") -> None:
    """Every item the run will read must be seq_len + 1 tokens (O(items) over the index only;
    a few seconds for the whole Pile). Raises TrainConfigError naming the first bad item."""
    sizes = getattr(order.dataset, "sizes", None)
    if sizes is None:
        return
    want = order.item_len
    stop = min(num_steps * order.batch_size, len(sizes))
    chunk = 1 << 24
    for a in range(0, stop, chunk):
        bad = np.nonzero(np.asarray(sizes[a:min(a + chunk, stop)]) != want)[0]
        if bad.size:
            k = a + int(bad[0])
            raise TrainConfigError(
                f"config.{field}: {order.name}: item {k} (step {k // order.batch_size}) has "
                f"{int(sizes[k])} tokens, expected seq_len + 1 = {want} (train.seq_len="
                f"{order.seq_len}); a raw one-document-per-item file needs the NeoX sample "
                "index, or set train.seq_len to match the file")


# ------------------------------------------------------------------------------------------------
# Preemption
#: scripts/train.py's exit status after a preemption save ("try again": EX_TEMPFAIL of
#: sysexits.h); tpu/watch.sh relaunches on it (tpu/common.sh repeats the number for bash).
PREEMPTED_EXIT_STATUS = 75
#: How often (in steps) a multi-process run asks whether any process got SIGTERM
#: (train.preemption_check_every); bench/RESULTS.md "preemption check" for the measurement.
PREEMPTION_CHECK_EVERY = 10


class _Preemption:
    """SIGTERM (and SIGINT) set a flag; the loop saves at a step boundary and returns.

    One process: the flag is read at every step. Several processes must stop at the same step
    (the save is collective) without a blocking collective per step: every `check_every` steps
    each process dispatches an all-reduce (max) of its flag over all devices, asynchronously,
    and reads the result of the previous check's all-reduce, which the devices finished long
    ago (it was queued `check_every` steps earlier). Every process reads the same value at the
    same step, so they agree on the stop step; the stop comes `check_every` to
    2 * `check_every` steps after the signal. (JAX's own preemption sync manager is not used:
    `distributed.initialize` gives SIGTERM back to Python, one mechanism on every platform.)
    """

    def __init__(self, check_every: int = PREEMPTION_CHECK_EVERY):
        self.flag = threading.Event()
        self.check_every = int(check_every)
        self._old = {}
        self._pending = None  # the all-reduce dispatched at the previous check
        self._multi = jax.process_count() > 1
        if self._multi:
            devices = np.asarray(jax.devices())
            mesh = Mesh(devices, ("all",))
            self._sharding = NamedSharding(mesh, P("all"))
            self._shape = (devices.size,)
            self._any = jax.jit(jnp.max, out_shardings=NamedSharding(mesh, P()))

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                try:
                    self._old[sig] = signal.signal(sig, self._handler)
                except (ValueError, OSError):
                    pass
        return self

    def _handler(self, signum, frame):
        if self.flag.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.flag.set()

    def _dispatch(self) -> jax.Array:
        """max over all processes of their flags, dispatched without waiting for it."""
        local = np.int32(1 if self.flag.is_set() else 0)
        shards = [jax.device_put(np.full((1,), local, np.int32), d)
                  for d in self._sharding.addressable_devices_indices_map(self._shape)]
        flags = jax.make_array_from_single_device_arrays(self._shape, self._sharding, shards)
        return self._any(flags)

    def requested(self, step: int) -> bool:
        """Whether to save and stop after `step` (the same answer on every process)."""
        if not self._multi:
            return self.flag.is_set()
        if step % self.check_every:
            return False
        previous, self._pending = self._pending, self._dispatch()
        return previous is not None and bool(np.asarray(previous.addressable_data(0)))

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


# ------------------------------------------------------------------------------------------------
# Generation of the final sample
def sample_text(model: GPTNeoX, prompt: str, max_new_tokens: int, temperature: float = 0.0,
                seed: int = 0, top_k: int | None = None) -> str:
    """Greedy / temperature sampling of a continuation of `prompt` (`pythia_jax.generate`)."""
    tok = load_tokenizer()
    ids = tok.encode(prompt).ids or [EOD_ID]
    new = generate(model, [ids], max_new_tokens, temperature=temperature, top_k=top_k or None,
                   seed=seed)[0]
    return prompt + tok.decode(new)


# ------------------------------------------------------------------------------------------------
# The loop
def _config_json(config) -> dict:
    try:
        return json.loads(config.to_json_best_effort())
    except Exception:
        return {}


_LOG = progress.logger("train")


def _log(msg: str) -> None:
    """A status line of the run (process 0 only): the `pythia_jax.train` logger, at INFO."""
    if jax.process_index() == 0:
        _LOG.info(msg)


def train(config, workdir: str, *, setup: TrainSetup | None = None) -> dict:
    """Train (or resume) in `workdir`. Returns a summary dict (steps run, last metrics, the
    state and the setup, …). `setup`: the "setup" of an earlier summary (same model, optimizer,
    seed, mesh and batch layout) to reuse its compiled step; default: a new one.

    One run at a time per workdir (`WorkdirLock`); a full disk is one `TrainError` naming the
    workdir and the last good checkpoint. Status and step lines go to the `pythia_jax.train`
    logger (on stdout unless you configured that logger: `pythia_jax.progress.console`)."""
    progress.console()
    workdir = paths.abspath(workdir)
    try:
        paths.check_available(workdir)
    except paths.MissingCloudDependency as e:
        raise TrainConfigError(f"--workdir={workdir}: {e}") from None
    mcfg = validate_config(config)
    num_steps = int(config.train.num_steps)
    B, T = int(config.train.batch_size), int(config.train.seq_len)
    mesh = make_mesh(config)
    grad_accum_steps(config, mesh)  # fail on an impossible batch layout before touching disk

    # Data before anything is written: a bad path or row length fails with the workdir intact.
    if paths.exists(workdir) and not paths.isdir(workdir):
        raise TrainConfigError(f"--workdir={workdir}: exists and is not a directory")
    train_order, eval_order = open_data(config, workdir)
    if num_steps > train_order.num_steps:
        raise TrainConfigError(
            f"config.train.num_steps={num_steps}: the data ({train_order.name}) holds only "
            f"{train_order.num_steps} steps of train.batch_size={B} rows")
    check_item_lengths(train_order, num_steps)
    if eval_order is not None:
        check_item_lengths(eval_order, min(eval_order.num_steps,
                                           int(config.train.get("eval_steps", 1) or 1)),
                           "data.eval_path")

    _, setup = create_train_state(config, mesh, init=False, setup=setup)
    paths.makedirs(workdir)
    lock = WorkdirLock(workdir)
    if jax.process_index() == 0:
        lock.acquire()
    handlers = logging.getLogger().handlers
    for h in handlers:
        h.addFilter(_DISK_FULL_LOG_FILTER)
    restore_excepthook = _install_closed_loop_hook()
    disk_full = False
    try:
        return _train_locked(config, workdir, setup, lock, mesh, mcfg, train_order, eval_order)
    except Exception as e:
        disk_full = _disk_full(e)
        if not disk_full:
            raise
        _quiet_abandoned_writes()
        latest = ckpt_lib.latest_step(paths.join(workdir, ckpt_lib.CHECKPOINT_DIR))
        last = (paths.join(workdir, ckpt_lib.CHECKPOINT_DIR, str(latest)) if latest is not None
                else "none")
        raise TrainError(f"{workdir}: no space left on the device (while writing checkpoints "
                         f"or metrics); the last good checkpoint is {last}. Free space and run "
                         "again to resume from it.") from None
    finally:
        try:
            lock.release()
        except OSError:
            pass
        if not disk_full:
            for h in handlers:
                h.removeFilter(_DISK_FULL_LOG_FILTER)
            restore_excepthook()


def _train_locked(config, workdir, setup, lock, mesh, mcfg, train_order, eval_order) -> dict:
    """`train` once the workdir is locked."""

    num_steps = int(config.train.num_steps)
    B, T = int(config.train.batch_size), int(config.train.seq_len)
    ckpts = Checkpoints(workdir, config, setup)
    unfinished = ckpts.store.unfinished_steps()
    if unfinished:
        latest = ckpts.latest_step()
        raise TrainError(
            f"{ckpts.store.step_dir(unfinished[0])}: not a finished checkpoint (no "
            f"{ckpt_lib.CONFIG_NAME} or no {ckpt_lib.PARAMS_DIR}/), newer than the latest "
            f"finished step " + (str(latest) if latest is not None else "(none)")
            + "; move it aside to resume from that step (nothing was changed)")
    start = ckpts.latest_step()
    if start is not None:
        if start > num_steps:
            raise TrainError(f"{ckpts.dir}: latest checkpoint is step {start}, past "
                             f"config.train.num_steps={num_steps}; nothing to do (use a larger "
                             "num_steps or another --workdir)")
        state, meta = ckpts.restore(start)
        _log(f"resumed from {paths.join(ckpts.dir, str(start))} (step {start}) on "
             f"{mesh.devices.size} device(s), mesh {dict(mesh.shape)}")
    else:
        state = setup.init_fn()
        start = 0
        _log(f"initialized {config.get('name', 'model')}: "
             f"{mcfg.param_counts()['total']:,} parameters on {mesh.devices.size} device(s), "
             f"mesh {dict(mesh.shape)}")

    meta_base = {"model": ckpt_lib.config_to_json(mcfg), "batch_size": B, "seq_len": T,
                 "data_path": str(config.data.path), "config": _config_json(config)}
    flops_per_token = mcfg.flops_per_token(T)["training"]
    peak = peak_flops_per_device(float(config.train.get("peak_flops_per_device", 0.0)))
    n_dev = mesh.devices.size
    # metrics.jsonl, TensorBoard events and the config copy: in the workdir (local or a
    # bucket) unless train.log_dir names another folder
    log_dir = str(config.train.get("log_dir", "") or "")
    log_dir = paths.abspath(_resolve_path(log_dir, workdir)) if log_dir else workdir
    if jax.process_index() == 0:
        paths.makedirs(log_dir)
        if log_dir != workdir:
            _log(f"metrics.jsonl and TensorBoard events: {log_dir}")
        paths.write_text(paths.join(workdir, CONFIG_COPY),
                         json.dumps(meta_base["config"], indent=2, sort_keys=True) + "\n")
    writer = MetricsWriter(log_dir, total_steps=num_steps, initial_step=start,
                           progress_bar=bool(config.train.get("progress_bar", True)),
                           jsonl_name=METRICS_FILE, tensorboard_dir=TENSORBOARD_DIR,
                           resume_step=start if start > 0 else None,
                           wandb_project=str(config.train.get("wandb_project", "") or ""),
                           wandb_config=meta_base["config"])
    if writer.enabled and writer.dropped_lines:
        _log(f"{writer.jsonl_path}: dropped {writer.dropped_lines} line(s) for steps after "
             f"{start}, logged by the earlier run after its last checkpoint (this run logs "
             "them again)")
    train_step = make_train_step(setup)
    eval_step = make_eval_step(setup) if eval_order is not None else None
    eval_every = int(config.train.get("eval_every", 0) or 0)
    eval_steps = int(config.train.get("eval_steps", 1) or 1)
    log_every = int(config.train.log_every)
    max_nonfinite = int(config.train.get("max_consecutive_nonfinite", 100))
    ck = config.checkpoint
    summary = {"start_step": start, "end_step": start, "preempted": False, "history": []}

    def save(state, why):
        if ckpts.save(state, {**meta_base, "reason": why}):
            return True
        return False

    def run_eval(state, step):
        n = min(eval_steps, eval_order.num_steps)
        losses = [eval_step(state.params, make_global_batch(eval_order, k, mesh, BATCH_AXES))
                  for k in range(n)]
        loss = float(np.mean(jax.device_get(losses)))
        writer.write(step, {"loss": loss, "ppl": float(math.exp(min(loss, 50.0)))},
                     prefix="eval")
        summary["eval_loss"] = loss
        return loss

    try:
        with _Preemption(int(config.train.get("preemption_check_every",
                                              PREEMPTION_CHECK_EVERY))) as preempt:
            if start == 0 and should_save(0, num_steps, ck)[0]:
                save(state, "schedule")
            step = start
            pending: list[dict] = []
            t_last, step_last = time.perf_counter(), step
            batches = BatchIterator(train_order, start, mesh, end_step=num_steps,
                                    batch_axes=BATCH_AXES, prefetch=int(config.data.prefetch))
            with batches:
                for data_step, batch in batches:
                    assert data_step == step, (data_step, step)
                    state, metrics = train_step(state, batch)
                    step += 1
                    if step == start + 1 and num_steps - start > 1:
                        # the first step includes compilation: time the interval from here
                        jax.block_until_ready(metrics)
                        t_last, step_last = time.perf_counter(), step
                    pending.append(metrics)
                    if step % log_every == 0 or step == num_steps:
                        fetched = jax.device_get(pending)
                        now = time.perf_counter()
                        m = {
                            "loss": float(np.mean([f["loss"] for f in fetched])),
                            "lr": float(fetched[-1]["lr"]),
                            "grad_norm": float(fetched[-1]["grad_norm"]),
                            "nonfinite_total": int(fetched[-1]["nonfinite_total"]),
                            "skipped_in_interval": int(sum(int(f["skipped"]) for f in fetched)),
                        }
                        if step > step_last:  # (an interval of only the compiling step
                            # is not timed: no throughput rather than tok/s=0)
                            m.update(throughput(step - step_last, now - t_last, B * T,
                                                flops_per_token, n_dev, peak))
                        writer.write(step, m)
                        summary["history"].append({"step": step, **m})
                        if m["skipped_in_interval"]:
                            writer.print(f"step {step}: skipped {m['skipped_in_interval']} "
                                         f"update(s) with non-finite gradients "
                                         f"({m['nonfinite_total']} so far)")
                        consecutive = int(fetched[-1]["nonfinite_consecutive"])
                        if consecutive >= max_nonfinite:
                            raise TrainError(
                                f"{consecutive} consecutive updates had non-finite gradients "
                                f"(limit train.max_consecutive_nonfinite={max_nonfinite}); "
                                f"stopping at step {step}. The last good checkpoint is in "
                                f"{ckpts.dir}.")
                        if step == num_steps and consecutive >= step - start:
                            # a run shorter than the limit must not "finish" having learned
                            # nothing: every one of its updates was skipped
                            raise TrainError(
                                f"all {step - start} updates of this run (steps {start}.."
                                f"{step - 1}) had non-finite gradients and were skipped; "
                                f"not saving step {step}. The last good checkpoint is in "
                                f"{ckpts.dir}.")
                        pending.clear()
                        t_last, step_last = time.perf_counter(), step
                    writer.advance(step)
                    if lock.held:
                        lock.refresh()
                    permanent, rolling = should_save(step, num_steps, ck)
                    if permanent or rolling:
                        save(state, "schedule" if permanent else "rolling")
                    if eval_step is not None and eval_every and step % eval_every == 0:
                        run_eval(state, step)
                    if step < num_steps and preempt.requested(step):
                        save(state, "preemption")
                        summary["preempted"] = True
                        msg = f"step {step}: termination requested; checkpoint saved, exiting"
                        if jax.process_count() > 1:  # each worker's log says where it stopped
                            _LOG.info(f"[process {jax.process_index()}] {msg}")
                        else:
                            writer.print(msg)
                        break
            if step == num_steps and ck.save_final:
                save(state, "final")
            summary["end_step"] = step
            if eval_step is not None and not summary["preempted"] and not (
                    step == start and start > 0):  # a resume with nothing to do: logged before
                if not (eval_every and step % eval_every == 0 and step > start):
                    summary["eval_loss"] = run_eval(state, step)
    finally:
        try:
            ckpts.close()
        finally:  # closed even when the checkpoint close fails (a full disk)
            writer.close()

    summary["state"] = state
    summary["setup"] = setup
    n_new = int(config.sample.max_new_tokens or 0) if "sample" in config else 0
    if n_new > 0 and not summary["preempted"] and jax.process_count() == 1:
        model = nnx.merge(setup.graphdef, jax.device_get(state.params))
        text = sample_text(model, str(config.sample.prompt), n_new,
                           float(config.sample.temperature), int(config.sample.seed),
                           int(config.sample.get("top_k", 0) or 0))
        summary["sample"] = text
        _LOG.info(f"\n--- sample after {summary['end_step']} steps "
                  f"(prompt {config.sample.prompt!r}) ---\n{text}\n---")
    return summary
