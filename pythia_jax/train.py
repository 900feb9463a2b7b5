"""Training: train state, the jitted train step, the loop, orbax checkpoints, metrics.

    from pythia_jax import train
    train.train(config, workdir)          # config: configs/pythia.py or configs/smoke.py

- The state (`TrainState`: step, fp32 params, optimizer state) is created directly sharded on a
  (data, fsdp, tensor) mesh: `jax.jit(init, out_shardings=…)` with each parameter's sharding
  from its logical axes.
- `train_step` is a pure function under `jax.jit` (state donated): bf16 (or fp32) compute, loss
  = mean cross-entropy in fp32 over the full padded vocab, gradient accumulation over
  microbatches so the global batch is the same on any device count, Pythia's optimizer
  (`optim.make_optimizer`), non-finite gradients skip the update and are counted.
- Data: step k reads rows [k B, (k + 1) B) of the pre-shuffled `.bin/.idx` (`data.order`), so
  the position in the stream is the step; resuming needs nothing else.
- Checkpoints (`WORKDIR/checkpoints/<step>/`, orbax, async): Pythia's 154 steps by default plus
  a rolling recent one; SIGTERM saves and returns. Each step directory is also a pythia-jax
  model directory (`pythia_jax_config.json` + `params/`), so `pythia_jax.from_pretrained` (and
  `scripts/convert.py --to=hf`) accept a step directory or the workdir (latest step).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import threading
import time
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from pythia_jax import checkpoint as ckpt_lib
from pythia_jax import optim as optim_lib
from pythia_jax import sharding as shd
from pythia_jax.config import ConfigError, ModelConfig
from pythia_jax.model import GPTNeoX, abstract_model

__all__ = [
    "TrainState", "TrainSetup", "TrainConfigError", "TrainError", "model_config_from",
    "make_mesh", "grad_accum_steps", "create_train_state", "make_train_step", "make_eval_step",
    "cross_entropy", "loss_fn", "checkpoint_steps", "should_save", "resolve_checkpoint_dir",
    "open_data", "build_rows_from_text", "train", "CHECKPOINT_DIR", "METRICS_FILE",
]

CHECKPOINT_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


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
    init_fn: Callable | None = None     # jitted, creates the state directly sharded
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
    _positive_int(config, "train.grad_accum_steps", allow_zero=True)
    _positive_int(config, "train.microbatch_per_device", allow_zero=True)
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
    elif config.train.microbatch_per_device > 0:
        mpd = int(config.train.microbatch_per_device)
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


def loss_fn(params, graphdef, inputs_BT, targets_BT):
    model = nnx.merge(graphdef, params)
    return cross_entropy(model(inputs_BT), targets_BT)


def _grads(setup: TrainSetup, params, inputs, targets):
    """(loss, grads) of the whole global batch, accumulated over `setup.grad_accum` pieces."""
    A = setup.grad_accum
    vg = jax.value_and_grad(loss_fn)
    if A == 1:
        return vg(params, setup.graphdef, inputs, targets)
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
    if key not in setup._jitted:  # one compiled step per setup (setups are cached per config)
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
            return loss_fn(params, setup.graphdef, batch["inputs"], batch["targets"])

    if "eval_step" not in setup._jitted:
        batch_sh = {"inputs": setup.batch_sharding, "targets": setup.batch_sharding}
        setup._jitted["eval_step"] = jax.jit(
            eval_step, in_shardings=(setup.state_shardings.params, batch_sh),
            out_shardings=NamedSharding(setup.mesh, P()))
    return setup._jitted["eval_step"]


_SETUP_CACHE: dict = {}


def _setup_key(config, mesh: Mesh, mcfg: ModelConfig):
    """Everything a TrainSetup depends on, hashable (so that repeated `train()` calls in one
    process, e.g. tests or notebooks, reuse the compiled init and step)."""
    optim_cfg = config.optim.to_dict() if hasattr(config.optim, "to_dict") else dict(config.optim)
    t = config.train
    return (mcfg, json.dumps(optim_cfg, sort_keys=True, default=str), int(t.seed), mesh,
            int(t.batch_size), int(t.grad_accum_steps), int(t.microbatch_per_device))


def create_train_state(config, mesh: Mesh, *, init: bool = True) -> tuple[TrainState | None,
                                                                          TrainSetup]:
    """(state, setup). The state is initialized directly sharded (Pythia init, `train.seed`);
    with `init=False` only the setup (with abstract, sharded shapes) is built."""
    mcfg = validate_config(config)
    key = _setup_key(config, mesh, mcfg)
    setup = _SETUP_CACHE.get(key)
    if setup is None:
        setup = _build_setup(config, mesh, mcfg)
        if len(_SETUP_CACHE) >= 8:
            _SETUP_CACHE.pop(next(iter(_SETUP_CACHE)))
        _SETUP_CACHE[key] = setup
    if not init:
        return None, setup
    return setup.init_fn(), setup


def _build_setup(config, mesh: Mesh, mcfg: ModelConfig) -> TrainSetup:
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
        init_fn=jax.jit(init_fn, out_shardings=state_sh))


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


class _ModelConfigHandler(ocp.JsonCheckpointHandler):
    """Saves the model config as an item *and* as `<step>/pythia_jax_config.json`, so that a
    finished step directory is a pythia-jax model directory (`checkpoint.load_model`)."""

    async def _save_fn(self, x, directory):
        # Runs in orbax's commit future, after the (temporary) step directory exists; the step
        # directory is renamed into place only when every item is written, so the config file
        # appears atomically with the parameters.
        await super()._save_fn(x, directory)
        if jax.process_index() == 0:
            (directory.parent / ckpt_lib.CONFIG_NAME).write_text(json.dumps(x, indent=2))


@ocp.checkpoint_args.register_with_handler(_ModelConfigHandler, for_save=True)
@dataclasses.dataclass
class _ModelConfigSave(ocp.checkpoint_args.CheckpointArgs):
    item: dict


@ocp.checkpoint_args.register_with_handler(_ModelConfigHandler, for_restore=True)
@dataclasses.dataclass
class _ModelConfigRestore(ocp.checkpoint_args.CheckpointArgs):
    item: dict | None = None


def _is_step_dir(path: str) -> bool:
    return (os.path.isfile(os.path.join(path, ckpt_lib.CONFIG_NAME))
            and os.path.isdir(os.path.join(path, ckpt_lib.PARAMS_DIR)))


def _numeric_subdirs(path: str) -> list[int]:
    try:
        names = os.listdir(path)
    except OSError:
        return []
    return sorted(int(n) for n in names if n.isdigit() and os.path.isdir(os.path.join(path, n)))


def resolve_checkpoint_dir(path) -> str | None:
    """A training workdir, its `checkpoints/` folder or one step directory -> the model
    directory of that step (the newest complete step for a workdir); None if there is none."""
    path = os.fspath(path)
    if _is_step_dir(path):
        return path
    for base in (os.path.join(path, CHECKPOINT_DIR), path):
        for step in reversed(_numeric_subdirs(base)):
            cand = os.path.join(base, str(step))
            if _is_step_dir(cand):
                return cand
    return None


class Checkpoints:
    """orbax CheckpointManager for `WORKDIR/checkpoints` with Pythia's save policy."""

    ITEMS = ("params", "opt_state", "meta", "model_config")

    def __init__(self, workdir: str, config, setup: TrainSetup):
        base = workdir if _is_remote(workdir) else os.path.abspath(workdir)
        self.dir = os.path.join(base, CHECKPOINT_DIR)
        self.config = config
        self.setup = setup
        ck = config.checkpoint
        keep = checkpoint_steps(int(config.train.num_steps), ck.extra_steps, int(ck.every),
                                bool(ck.save_final))
        from orbax.checkpoint._src.checkpoint_managers import preservation_policy as pp
        policy = pp.AnyPreservationPolicy([pp.CustomSteps(keep),
                                           pp.LatestN(max(1, int(ck.keep_rolling)))])
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=bool(ck.async_save),
            preservation_policy=policy,
            create=True,
            cleanup_tmp_directories=False,
        )
        handlers = {
            "params": ocp.StandardCheckpointHandler(),
            "opt_state": ocp.StandardCheckpointHandler(),
            "meta": ocp.JsonCheckpointHandler(),
            "model_config": _ModelConfigHandler(),
        }
        self.manager = ocp.CheckpointManager(self.dir, options=options, item_handlers=handlers)
        self._saved: set[int] = set(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, state: TrainState, meta: dict) -> bool:
        step = int(jax.device_get(state.step))
        if step in self._saved:
            return False
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(_params_as_state(self.setup.graphdef, state.params)),
            opt_state=ocp.args.StandardSave(state.opt_state),
            meta=ocp.args.JsonSave({**meta, "step": step}),
            model_config=_ModelConfigSave(ckpt_lib.config_to_json(self.setup.model_cfg)),
        )
        self.manager.save(step, args=args, force=True)
        self._saved.add(step)
        return True

    def restore(self, step: int) -> tuple[TrainState, dict]:
        where = os.path.join(self.dir, str(step))
        abstract = self.setup.abstract_state
        params_target = _params_as_state(self.setup.graphdef, abstract.params)
        try:
            meta = self.manager.restore(step, args=ocp.args.Composite(
                meta=ocp.args.JsonRestore()))["meta"]
        except Exception as e:
            raise TrainError(f"{where}: corrupt or incomplete checkpoint: cannot read its "
                             f"'meta' item ({type(e).__name__}: {_first_line(e)}). Nothing was "
                             "changed; move this step directory aside to resume from an earlier "
                             "step.") from None
        self._check_compatible(where, meta)
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(
                params=ocp.args.StandardRestore(params_target),
                opt_state=ocp.args.StandardRestore(abstract.opt_state)))
        except Exception as e:
            raise TrainError(f"{where}: corrupt or incomplete checkpoint: cannot restore "
                             f"params / optimizer state ({type(e).__name__}: {_first_line(e)}). "
                             "Nothing was changed; move this step directory aside to resume "
                             "from an earlier step.") from None
        params = nnx.to_pure_dict(out["params"])
        step_arr = jax.device_put(jnp.asarray(step, jnp.int32),
                                  self.setup.state_shardings.step)
        return TrainState(step_arr, params, out["opt_state"]), meta

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
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _first_line(e: BaseException) -> str:
    s = str(e)
    return s.splitlines()[0] if s else ""


# ------------------------------------------------------------------------------------------------
# Data
def _is_remote(path: str) -> bool:
    return "://" in str(path)


def _resolve_path(path: str, workdir: str) -> str:
    base = workdir if _is_remote(workdir) else os.path.abspath(workdir)
    return os.path.expanduser(path.replace("{workdir}", base))


def build_rows_from_text(text_path: str, prefix: str, seq_len: int, *, seed: int = 1234,
                         eval_rows: int = 0, tokenizer=None) -> dict:
    """Tokenize a text file with the project's preprocessing, cut the token stream into rows
    of seq_len + 1 tokens (consecutive rows overlap by one token, as NeoX's samples do), shuffle
    the rows with `seed` and write them as a pre-shuffled-style `.bin/.idx` at `prefix` (the
    last `eval_rows` rows, unshuffled, at `prefix + "_eval"`). Returns {"train", "eval"} prefixes.
    """
    import tempfile
    from pythia_jax.data.indexed import MMapIndexedDataset, write_indexed_dataset
    from pythia_jax.data.preprocess import tokenize_to_indexed

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
    return os.path.isfile(prefix + ".bin") and os.path.isfile(prefix + ".idx")


def open_data(config, workdir: str, *, build: bool = True):
    """(train PythiaOrder, eval PythiaOrder or None) for `config.data`; clear errors naming
    `config.data.path` when the files are missing or their rows are not seq_len + 1 long."""
    from pythia_jax.data.indexed import IndexedDatasetError
    from pythia_jax.data.order import PythiaOrder

    d = config.data
    if not d.path:
        raise TrainConfigError("config.data.path: empty; expected the prefix of a pre-shuffled "
                               ".bin/.idx pair (e.g. .../document for document.bin + "
                               "document.idx)")
    prefix = _resolve_path(str(d.path), workdir)
    if prefix.endswith((".bin", ".idx")):
        prefix = prefix[:-4]
    seq_len = int(config.train.seq_len)
    text = str(d.get("build_from_text", "") or "")
    if not _data_exists(prefix):
        if text and build:
            if not os.path.isfile(text):
                raise TrainConfigError(f"config.data.build_from_text: {text}: no such file")
            eval_rows = int(d.get("build_eval_rows", 0))
            build_rows_from_text(text, prefix, seq_len, seed=int(d.get("build_shuffle_seed", 1234)),
                                 eval_rows=eval_rows)
        else:
            missing = [p for p in (prefix + ".bin", prefix + ".idx") if not os.path.isfile(p)]
            raise TrainConfigError(f"config.data.path={d.path!r}: {missing[0]}: no such file "
                                   "(expected a pre-shuffled .bin/.idx pair whose items are "
                                   f"seq_len + 1 = {seq_len + 1} tokens)")

    def order(p, field):
        try:
            return PythiaOrder(p, batch_size=int(config.train.batch_size), seq_len=seq_len)
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
class _Preemption:
    """SIGTERM (and SIGINT) set a flag; the loop saves at the next step boundary and returns."""

    def __init__(self):
        self.flag = threading.Event()
        self._old = {}

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

    def requested(self, step: int) -> bool:
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            try:
                if multihost_utils.reached_preemption_sync_point(step):
                    return True
            except Exception:
                pass
            # Agree across hosts so that every process enters the collective save together.
            flag = np.array([1 if self.flag.is_set() else 0], np.int32)
            return bool(multihost_utils.process_allgather(flag).max())
        return self.flag.is_set()

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


# ------------------------------------------------------------------------------------------------
# Generation of the final sample
def sample_text(model: GPTNeoX, prompt: str, max_new_tokens: int, temperature: float = 0.0,
                seed: int = 0, top_k: int | None = None) -> str:
    """Greedy / temperature sampling with `pythia_jax.generate` when present, else a small loop."""
    from pythia_jax.tokenizer import load_tokenizer

    tok = load_tokenizer()
    ids = tok.encode(prompt).ids or [0]
    try:
        from pythia_jax.generate import generate
    except ImportError:
        generate = None
    if generate is not None:  # returns the new tokens of each prompt
        new = list(generate(model, [ids], max_new_tokens, temperature=temperature,
                            top_k=top_k or None, seed=seed)[0])
    else:
        new = _fallback_generate(model, ids, max_new_tokens, temperature, seed)
    return prompt + tok.decode(new)


def _fallback_generate(model, ids, max_new_tokens, temperature, seed):
    total = len(ids) + max_new_tokens
    buf = np.zeros((1, total), np.int32)
    buf[0, :len(ids)] = ids
    graphdef, params = nnx.split(model)

    @jax.jit
    def next_token(params, buf, pos, key):
        logits = nnx.merge(graphdef, params)(buf)[0, pos - 1]
        logits = logits[: 50277]  # never sample the padding rows of the vocab
        if temperature > 0:
            return jax.random.categorical(key, logits / temperature)
        return jnp.argmax(logits)

    key = jax.random.key(seed)
    for pos in range(len(ids), total):
        key, sub = jax.random.split(key)
        buf[0, pos] = int(next_token(params, jnp.asarray(buf), pos, sub))
    return buf[0, len(ids):].tolist()


# ------------------------------------------------------------------------------------------------
# The loop
def _config_json(config) -> dict:
    try:
        return json.loads(config.to_json_best_effort())
    except Exception:
        return {}


def _log(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, flush=True)


def train(config, workdir: str) -> dict:
    """Train (or resume) in `workdir`. Returns a summary dict (steps run, last metrics, …)."""
    from pythia_jax.data.pipeline import BatchIterator, make_global_batch
    from pythia_jax.metrics import MetricsWriter, peak_flops_per_device, throughput

    workdir = os.fspath(workdir)
    remote = _is_remote(workdir)
    if not remote:
        workdir = os.path.abspath(workdir)
    mcfg = validate_config(config)
    num_steps = int(config.train.num_steps)
    B, T = int(config.train.batch_size), int(config.train.seq_len)
    mesh = make_mesh(config)
    grad_accum_steps(config, mesh)  # fail on an impossible batch layout before touching disk

    # Data before anything is written: a bad path or row length fails with the workdir intact.
    if not remote and not os.path.isdir(workdir) and os.path.exists(workdir):
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

    if not remote:
        os.makedirs(workdir, exist_ok=True)
    _, setup = create_train_state(config, mesh, init=False)
    ckpts = Checkpoints(workdir, config, setup)
    start = ckpts.latest_step()
    if start is not None:
        if start > num_steps:
            raise TrainError(f"{ckpts.dir}: latest checkpoint is step {start}, past "
                             f"config.train.num_steps={num_steps}; nothing to do (use a larger "
                             "num_steps or another --workdir)")
        state, meta = ckpts.restore(start)
        _log(f"resumed from {os.path.join(ckpts.dir, str(start))} (step {start}) on "
             f"{mesh.devices.size} device(s), mesh {dict(mesh.shape)}")
    else:
        state, _ = create_train_state(config, mesh)
        start = 0
        _log(f"initialized {config.get('name', 'model')}: "
             f"{mcfg.param_counts()['total']:,} parameters on {mesh.devices.size} device(s), "
             f"mesh {dict(mesh.shape)}")

    meta_base = {"model": ckpt_lib.config_to_json(mcfg), "batch_size": B, "seq_len": T,
                 "data_path": str(config.data.path), "config": _config_json(config)}
    flops_per_token = mcfg.flops_per_token(T)["training"]
    peak = peak_flops_per_device(float(config.train.get("peak_flops_per_device", 0.0)))
    n_dev = mesh.devices.size
    log_dir = str(config.train.get("log_dir", "") or "")
    log_dir = _resolve_path(log_dir, workdir) if log_dir else (
        os.path.join("runs", str(config.get("name", "run"))) if remote else workdir)
    if jax.process_index() == 0:
        os.makedirs(log_dir, exist_ok=True)
        if log_dir != workdir:
            _log(f"metrics.jsonl and TensorBoard events: {os.path.abspath(log_dir)}")
    writer = MetricsWriter(log_dir, total_steps=num_steps, initial_step=start,
                           progress_bar=bool(config.train.get("progress_bar", True)))
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
        with _Preemption() as preempt:
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
                        m.update(throughput(step - step_last, now - t_last, B * T,
                                            flops_per_token, n_dev, peak))
                        writer.write(step, m)
                        summary["history"].append({"step": step, **m})
                        if m["skipped_in_interval"]:
                            writer.print(f"step {step}: skipped {m['skipped_in_interval']} "
                                         f"update(s) with non-finite gradients "
                                         f"({m['nonfinite_total']} so far)")
                        if int(fetched[-1]["nonfinite_consecutive"]) >= max_nonfinite:
                            raise TrainError(
                                f"{int(fetched[-1]['nonfinite_consecutive'])} consecutive "
                                f"updates had non-finite gradients (limit "
                                f"train.max_consecutive_nonfinite={max_nonfinite}); stopping "
                                f"at step {step}. The last good checkpoint is in {ckpts.dir}.")
                        pending.clear()
                        t_last, step_last = time.perf_counter(), step
                    writer.advance(step)
                    permanent, rolling = should_save(step, num_steps, ck)
                    if permanent or rolling:
                        save(state, "schedule" if permanent else "rolling")
                    if eval_step is not None and eval_every and step % eval_every == 0:
                        run_eval(state, step)
                    if step < num_steps and preempt.requested(step):
                        save(state, "preemption")
                        summary["preempted"] = True
                        writer.print(f"step {step}: termination requested; checkpoint saved, "
                                     "exiting")
                        break
            if step == num_steps and ck.save_final:
                save(state, "final")
            summary["end_step"] = step
            if eval_step is not None and not summary["preempted"]:
                if not (eval_every and step % eval_every == 0 and step > start):
                    summary["eval_loss"] = run_eval(state, step)
    finally:
        ckpts.close()
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
        print(f"\n--- sample after {summary['end_step']} steps "
              f"(prompt {config.sample.prompt!r}) ---\n{text}\n---", flush=True)
    return summary
