"""pythia-jax checkpoint directories (orbax): model directories and training step directories.

A *model directory* (what `convert.py --to=jax` writes):

    DIR/pythia_jax_config.json   the ModelConfig (architecture fields)
    DIR/params/                  orbax PyTree checkpoint of `nnx.state(model, nnx.Param)`

A *training workdir* keeps one step directory per saved step, written by an orbax
`CheckpointManager` (`WorkdirCheckpoints`):

    WORKDIR/checkpoints/<step>/params/              as in a model directory
    WORKDIR/checkpoints/<step>/opt_state/           the optimizer state
    WORKDIR/checkpoints/<step>/meta/                JSON bookkeeping (step, data, config, ...)
    WORKDIR/checkpoints/<step>/model_config/        the architecture, as an orbax JSON item
    WORKDIR/checkpoints/<step>/pythia_jax_config.json   the same, written with the item
    WORKDIR/checkpoints/<step>/checksums/           per-array checksums of params and opt_state
    WORKDIR/checkpoints/<step>/pythia_jax_checksums.json   the same, written with the item

so every finished step directory is also a model directory (`save_model` writes
`pythia_jax_checksums.json` too). Restoring verifies every array against its checksum
(`array_checksums`): a damaged file is an error naming the directory, never trained on or
served. *The latest step* of a workdir (`latest_step`) is its highest-numbered finished step
directory (config file and parameters present); training resumes from it and `load_model`
loads it. `load_model(src)` restores a model
directory, a step directory or a workdir's newest step (`resolve_model_dir`), optionally straight
onto a mesh (each parameter restored with the sharding its logical axes give).

Every path may be local or a URL (`gs://…`, through `pythia_jax.paths`; orbax reads and writes
buckets itself).
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx
from orbax.checkpoint.checkpoint_managers import preservation_policy

from pythia_jax import sharding as shd
from pythia_jax.config import ConfigError, ModelConfig
from pythia_jax.model import GPTNeoX, abstract_model
from pythia_jax import paths

__all__ = ["save_model", "load_model", "CONFIG_NAME", "PARAMS_DIR", "CHECKPOINT_DIR",
           "CHECKSUMS_NAME", "config_to_json", "config_from_json", "resolve_model_dir",
           "resolve_checkpoint_dir", "is_step_dir", "step_numbers", "latest_step",
           "array_checksums", "verify_checksums", "WorkdirCheckpoints", "CheckpointDirError",
           "ROLLING_REASONS", "PARAM_LAYOUT", "layout_of", "param_layout_of"]

CONFIG_NAME = "pythia_jax_config.json"
#: Per-array checksums ({"params": {path: hex}, "opt_state": {...}}) beside the config file.
CHECKSUMS_NAME = "pythia_jax_checksums.json"
#: `meta["reason"]` of a step that a newer one replaces (`WorkdirCheckpoints`); every other
#: step that exists when a run starts is kept by that run.
ROLLING_REASONS = ("rolling", "preemption")
PARAMS_DIR = "params"
#: The folder of a training workdir that holds the step directories.
CHECKPOINT_DIR = "checkpoints"

# Fields that describe the architecture (saved); execution options are chosen at load time.
_ARCH_FIELDS = ("hidden_size", "num_layers", "num_heads", "intermediate_size", "vocab_size",
                "rotary_pct", "rotary_emb_base", "max_position_embeddings", "layer_norm_eps",
                "use_parallel_residual", "gelu_approximate", "param_dtype", "init_method",
                "output_init_method", "init_std", "bos_token_id", "eos_token_id")

#: The order of the stored arrays, saved as `param_layout` beside the architecture fields.
#: 2: QKV kernel [.., d, 3, N, H], bias [.., 3, N, H] (q, k, v on a major axis).
#: 1: [.., d, N, 3, H] / [.., N, 3, H] (HF's head-interleaved order), checkpoints written before
#:    2026-12-02; their configs have no `param_layout`. They are permuted on restore (params and
#:    optimizer moments alike). The field, not the shapes, decides: they agree when N == 3.
PARAM_LAYOUT = 2
LAYOUT_FIELD = "param_layout"
_LAYOUTS = (1, 2)


class CheckpointDirError(ValueError):
    """A pythia-jax checkpoint directory that is missing pieces or is corrupt."""


# ------------------------------------------------------------------------------------------------
# Per-array checksums
def _fmix32(h):
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _words(x):
    """The bytes of `x` as uint32 words, flattened (exact: a bitcast)."""
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    n = jnp.dtype(x.dtype).itemsize
    if n in (1, 2):
        u = jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16}[n])
        return u.astype(jnp.uint32).reshape(-1)
    return jax.lax.bitcast_convert_type(x, jnp.uint32).reshape(-1)  # 8 bytes: 2 words each


@jax.jit
def _fingerprints(leaves):
    """Per array: two 32-bit sums over its words (one weighted by odd position multipliers, one
    of a mixed hash of word and position: any change of any word or order shows) and whether it
    is all finite. Exact integer arithmetic on the device, so sharding does not matter."""
    out = []
    for x in leaves:
        w = _words(x)
        i = jax.lax.iota(jnp.uint32, w.size)
        a = jnp.sum(w * (i * jnp.uint32(2) + jnp.uint32(1)), dtype=jnp.uint32)
        b = jnp.sum(_fmix32(w ^ (i * jnp.uint32(0x9E3779B9))), dtype=jnp.uint32)
        finite = (jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact)
                  else jnp.bool_(True))
        out.append((a, b, finite))
    return out


def _pure(tree):
    return nnx.to_pure_dict(tree) if isinstance(tree, nnx.State) else tree


def array_checksums(tree) -> tuple[dict[str, str], list[str]]:
    """({path: checksum}, [paths of arrays holding NaN/inf]) of a pytree of arrays (an
    `nnx.State` is taken as its pure dict). Paths are `jax.tree_util.keystr` strings."""
    flat = jax.tree_util.tree_flatten_with_path(_pure(tree))[0]
    flat = [(jax.tree_util.keystr(p), x) for p, x in flat
            if hasattr(x, "dtype") and not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)]
    res = jax.device_get(_fingerprints([jnp.asarray(x) for _, x in flat]))
    sums = {k: f"{int(a):08x}{int(b):08x}" for (k, _), (a, b, _f) in zip(flat, res)}
    nonfinite = [k for (k, _), (_a, _b, f) in zip(flat, res) if not bool(f)]
    return sums, nonfinite


def _read_checksums(d: str) -> dict | None:
    path = paths.join(d, CHECKSUMS_NAME)
    if not paths.isfile(path):
        return None  # written before checksums existed: nothing to verify against
    try:
        out = json.loads(paths.read_text(path))
    except (OSError, ValueError) as e:
        raise CheckpointDirError(f"{path}: unreadable checksums ({type(e).__name__}: {e})") from None
    if not isinstance(out, dict):
        raise CheckpointDirError(f"{path}: expected a JSON object")
    return out


def verify_checksums(d: str, items: dict, hint: str = "") -> None:
    """Check each restored item (name -> pytree) of directory `d` against the checksums saved
    with it; a missing checksums file passes (older directories). CheckpointDirError names the
    directory and the first array that differs."""
    saved = _read_checksums(d)
    if saved is None:
        return
    for name, tree in items.items():
        want = saved.get(name)
        if want is None:
            continue
        got, _ = array_checksums(tree)
        for k in sorted(set(want) | set(got)):
            if want.get(k) != got.get(k):
                raise CheckpointDirError(
                    f"{d}: damaged checkpoint: {name}{k} does not match the checksum saved "
                    f"with it (saved {want.get(k)}, read {got.get(k)}); a file under "
                    f"{paths.join(d, name)} was changed after it was written. {hint}".rstrip())


def config_to_json(cfg: ModelConfig) -> dict:
    return {**{k: getattr(cfg, k) for k in _ARCH_FIELDS}, LAYOUT_FIELD: PARAM_LAYOUT}


def layout_of(saved: dict, where: str) -> int:
    """The `param_layout` of a saved config / meta["model"] dict (1 where it has none)."""
    layout = saved.get(LAYOUT_FIELD, 1)
    if isinstance(layout, bool) or layout not in _LAYOUTS:
        raise CheckpointDirError(f"{where}: field {LAYOUT_FIELD!r} is {layout!r}; expected one "
                                 f"of {list(_LAYOUTS)} (a checkpoint from a newer pythia-jax?)")
    return int(layout)


def param_layout_of(path: str) -> int:
    """The `param_layout` of a config file (`CONFIG_NAME`)."""
    return layout_of(_read_json(path), path)


def _read_json(path: str) -> dict:
    try:
        with paths.open(path, "r", encoding="utf-8") as fh:
            d = json.load(fh)
    except FileNotFoundError:
        raise CheckpointDirError(f"{path}: missing (not a pythia-jax checkpoint directory)") from None
    except json.JSONDecodeError as e:
        raise CheckpointDirError(f"{path}: malformed JSON at line {e.lineno}: {e.msg}") from None
    if not isinstance(d, dict):
        raise CheckpointDirError(f"{path}: expected a JSON object")
    return d


def config_from_json(path: str, **overrides) -> ModelConfig:
    d = _read_json(path)
    layout_of(d, path)
    d.pop(LAYOUT_FIELD, None)
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise CheckpointDirError(f"{path}: unknown field {unknown[0]!r}; expected ModelConfig fields")
    d.update(overrides)
    try:
        return ModelConfig(**d)
    except (ConfigError, TypeError) as e:
        raise CheckpointDirError(f"{path}: {e}") from None


# ------------------------------------------------------------------------------------------------
# Layout 1 -> 2 (see PARAM_LAYOUT)
def _key_name(k) -> str | None:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return None


def _is_qkv(path) -> bool:
    names = [n for n in map(_key_name, path) if n is not None]
    while names and names[-1] in ("value", "raw_value"):
        names.pop()
    return "query_key_value" in names and names[-1:] in (["kernel"], ["bias"])


def _swap_spec(sharding, ndim):
    if not isinstance(sharding, jax.sharding.NamedSharding):
        return sharding
    spec = list(sharding.spec) + [None] * (ndim - len(sharding.spec))
    spec[-3], spec[-2] = spec[-2], spec[-3]
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec))


def _layout1_target(tree):
    """A restore target (ShapeDtypeStruct leaves) for a layout-1 checkpoint of `tree`'s arrays:
    the QKV leaves with their (3, N) axes swapped back, shardings along."""
    def f(path, x):
        if not _is_qkv(path) or not isinstance(x, jax.ShapeDtypeStruct):
            return x
        shape = list(x.shape)
        shape[-3], shape[-2] = shape[-2], shape[-3]
        return jax.ShapeDtypeStruct(tuple(shape), x.dtype,
                                    sharding=_swap_spec(x.sharding, len(shape)))
    return jax.tree_util.tree_map_with_path(f, tree)


def _from_layout1(tree, target):
    """Restored layout-1 arrays -> layout 2, placed as `target` (the current layout) says."""
    def f(path, x, t):
        if not _is_qkv(path):
            return x
        y = jnp.swapaxes(x, -3, -2)
        sh = getattr(t, "sharding", None)
        return jax.device_put(y, sh) if sh is not None else y
    return jax.tree_util.tree_map_with_path(f, tree, target)


# ------------------------------------------------------------------------------------------------
# Model directories
def save_model(model: GPTNeoX, dst: str, *, overwrite: bool = False) -> str:
    """Write a model directory atomically (temporary name, renamed when complete)."""
    dst = paths.abspath(dst)
    paths.check_available(dst)
    with paths.atomic_dir(dst, overwrite=overwrite) as tmp:
        with open(os.path.join(tmp, CONFIG_NAME), "w") as fh:
            json.dump(config_to_json(model.config), fh, indent=2)
        params = nnx.state(model, nnx.Param)
        sums, _ = array_checksums(params)
        with open(os.path.join(tmp, CHECKSUMS_NAME), "w") as fh:
            json.dump({"params": sums}, fh, indent=0)
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(os.path.join(tmp, PARAMS_DIR), params)
            ckptr.wait_until_finished()
    return dst


def resolve_model_dir(src: str) -> str:
    """A model directory, or the newest checkpoint step of a training workdir."""
    src = paths.abspath(src)
    paths.check_available(src)
    if paths.isfile(paths.join(src, CONFIG_NAME)):
        return src
    found = resolve_checkpoint_dir(src)
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
    d = resolve_model_dir(src)
    cfg = config_from_json(paths.join(d, CONFIG_NAME), **config_overrides)
    layout = param_layout_of(paths.join(d, CONFIG_NAME))
    # restored as saved (the checksums are of the saved bits), cast to `dtype` afterwards
    abstract = abstract_model(cfg)
    params_abs = nnx.state(abstract, nnx.Param)

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
    path = paths.join(d, PARAMS_DIR)
    if not paths.isdir(path):
        raise CheckpointDirError(f"{path}: missing parameter checkpoint")
    try:
        with ocp.StandardCheckpointer() as ckptr:
            restored = ckptr.restore(path, restore_target if layout == PARAM_LAYOUT
                                     else _layout1_target(restore_target))
    except Exception as e:  # orbax raises many types; name the directory and the cause
        raise CheckpointDirError(f"{path}: cannot restore parameters ({type(e).__name__}: "
                                 f"{_first_line(e)})") from None
    verify_checksums(d, {"params": restored})  # of the bits as saved
    if layout != PARAM_LAYOUT:
        restored = _from_layout1(restored, restore_target)
    if dtype is not None and jnp.dtype(dtype) != jnp.dtype(cfg.param_dtype):
        abstract = abstract_model(cfg.replace(param_dtype=dtype))
        restored = jax.tree.map(lambda x: x.astype(dtype), restored)
    nnx.update(abstract, restored)
    return abstract


def _first_line(e: BaseException) -> str:
    s = str(e)
    return s.splitlines()[0] if s else ""


# ------------------------------------------------------------------------------------------------
# Training workdirs: WORKDIR/checkpoints/<step>/
def is_step_dir(path) -> bool:
    """A finished step directory (or a model directory): config file and parameters present."""
    return (paths.isfile(paths.join(path, CONFIG_NAME))
            and paths.isdir(paths.join(path, PARAMS_DIR)))


def step_numbers(path) -> list[int]:
    """The numeric sub-directories of `path`, ascending (none if it is not a directory)."""
    try:
        names = paths.listdir(path)
    except OSError:
        return []
    return sorted(int(n) for n in names if n.isdigit() and paths.isdir(paths.join(path, n)))


def latest_step(checkpoints_dir) -> int | None:
    """The latest step of a `checkpoints/` folder: its highest-numbered finished step directory
    (`is_step_dir`); None if there is none. Training resumes from this step and `load_model`
    of the workdir loads it (`WorkdirCheckpoints.latest_step`, `resolve_checkpoint_dir`)."""
    for step in reversed(step_numbers(checkpoints_dir)):
        if is_step_dir(paths.join(checkpoints_dir, str(step))):
            return step
    return None


def resolve_checkpoint_dir(path) -> str | None:
    """A training workdir, its `checkpoints/` folder or one step directory -> the model
    directory of that step (`latest_step` for a workdir); None if there is none."""
    path = paths.abspath(path)
    if is_step_dir(path):
        return path
    for base in (paths.join(path, CHECKPOINT_DIR), path):
        step = latest_step(base)
        if step is not None:
            return paths.join(base, str(step))
    return None


class _SideFileHandler(ocp.JsonCheckpointHandler):
    """Saves a JSON item *and* the same JSON as `<step>/SIDE_FILE`."""

    SIDE_FILE = ""

    async def _save_fn(self, x, directory):
        # Runs in orbax's commit future, after the (temporary) step directory exists; the step
        # directory is renamed into place only when every item is written, so the file
        # appears atomically with the parameters.
        await super()._save_fn(x, directory)
        if jax.process_index() == 0:
            (directory.parent / self.SIDE_FILE).write_text(json.dumps(x, indent=2))


class _ModelConfigHandler(_SideFileHandler):
    """The model config, also as `<step>/pythia_jax_config.json`: a finished step directory is
    a model directory (`load_model`)."""

    SIDE_FILE = CONFIG_NAME


class _ChecksumsHandler(_SideFileHandler):
    """The per-array checksums, also as `<step>/pythia_jax_checksums.json` (`load_model`)."""

    SIDE_FILE = CHECKSUMS_NAME


@ocp.checkpoint_args.register_with_handler(_ModelConfigHandler, for_save=True)
@dataclasses.dataclass
class _ModelConfigSave(ocp.checkpoint_args.CheckpointArgs):
    item: dict


@ocp.checkpoint_args.register_with_handler(_ModelConfigHandler, for_restore=True)
@dataclasses.dataclass
class _ModelConfigRestore(ocp.checkpoint_args.CheckpointArgs):
    item: dict | None = None


@ocp.checkpoint_args.register_with_handler(_ChecksumsHandler, for_save=True)
@dataclasses.dataclass
class _ChecksumsSave(ocp.checkpoint_args.CheckpointArgs):
    item: dict


@ocp.checkpoint_args.register_with_handler(_ChecksumsHandler, for_restore=True)
@dataclasses.dataclass
class _ChecksumsRestore(ocp.checkpoint_args.CheckpointArgs):
    item: dict | None = None


_CORRUPT_HINT = ("Nothing was changed; move this step directory aside to resume from an "
                 "earlier step.")


class WorkdirCheckpoints:
    """The step directories of `WORKDIR/checkpoints` (an orbax CheckpointManager).

    keep_steps: steps kept for good; keep_latest: how many of the newest steps are kept besides;
    async_save: write in the background (`wait()` / `close()` to finish).

    A step directory that exists when this object is made is kept too, whatever `keep_steps`
    says now (a resumed run with another schedule deletes none of the earlier run's permanent
    checkpoints), unless its `meta["reason"]` is one of `ROLLING_REASONS`: those are replaced
    by newer steps as `keep_latest` says. A step whose meta cannot be read is kept.
    Saving refuses parameters holding NaN/inf (`CheckpointDirError` naming the step) and
    stores per-array checksums, which `restore` verifies.
    """

    ITEMS = ("params", "opt_state", "meta", "model_config", "checksums")

    def __init__(self, workdir, *, keep_steps=(), keep_latest: int = 1, async_save: bool = True):
        workdir = paths.abspath(workdir)
        paths.check_available(workdir)
        self.dir = paths.join(workdir, CHECKPOINT_DIR)
        keep = {int(s) for s in keep_steps}
        #: steps kept only because they existed before (not in `keep_steps`)
        self.kept_from_before = self._permanent_existing(keep)
        policy = preservation_policy.AnyPreservationPolicy([
            preservation_policy.CustomSteps(sorted(keep | set(self.kept_from_before))),
            preservation_policy.LatestN(max(1, int(keep_latest)))])
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=bool(async_save),
            preservation_policy=policy,
            create=True,
            cleanup_tmp_directories=False,
        )
        handlers = {
            "params": ocp.StandardCheckpointHandler(),
            "opt_state": ocp.StandardCheckpointHandler(),
            "meta": ocp.JsonCheckpointHandler(),
            "model_config": _ModelConfigHandler(),
            "checksums": _ChecksumsHandler(),
        }
        self.manager = ocp.CheckpointManager(self.dir, options=options, item_handlers=handlers)
        self._saved: set[int] = set(self.manager.all_steps())

    def _permanent_existing(self, keep: set[int]) -> list[int]:
        steps = [s for s in step_numbers(self.dir) if s not in keep]
        if not steps:
            return []
        reader = ocp.CheckpointManager(
            self.dir, options=ocp.CheckpointManagerOptions(read_only=True),
            item_handlers={"meta": ocp.JsonCheckpointHandler()})
        out = []
        try:
            for step in steps:
                try:
                    meta = reader.restore(step, args=ocp.args.Composite(
                        meta=ocp.args.JsonRestore()))["meta"]
                    reason = meta.get("reason") if isinstance(meta, dict) else None
                except Exception:  # unreadable: never delete what cannot be classified
                    reason = None
                if reason not in ROLLING_REASONS:
                    out.append(step)
        finally:
            reader.close()
        return out

    def step_dir(self, step: int) -> str:
        return paths.join(self.dir, str(step))

    def latest_step(self) -> int | None:
        """The step training resumes from (`latest_step`, the same rule as `load_model`)."""
        return latest_step(self.dir)

    def unfinished_steps(self) -> list[int]:
        """Numbered directories above `latest_step()` that are not finished step directories
        (no config file or no parameters: damaged, or written by something else)."""
        latest = self.latest_step()
        return [s for s in step_numbers(self.dir)
                if (latest is None or s > latest) and not is_step_dir(self.step_dir(s))]

    def save(self, step: int, *, params: nnx.State, opt_state, meta: dict,
             model_config: ModelConfig) -> bool:
        """Write step `step` (in the background when async); False if it is already saved.
        Parameters holding NaN/inf are refused (CheckpointDirError), nothing written."""
        step = int(step)
        if step in self._saved:
            return False
        param_sums, nonfinite = array_checksums(params)
        if nonfinite:
            raise CheckpointDirError(
                f"{self.step_dir(step)}: not saving step {step}: the parameters hold NaN or "
                f"inf (params{nonfinite[0]}" + (f" and {len(nonfinite) - 1} more" if
                                                 len(nonfinite) > 1 else "") + ")")
        opt_sums, _ = array_checksums(opt_state)
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            opt_state=ocp.args.StandardSave(opt_state),
            meta=ocp.args.JsonSave({**meta, "step": step}),
            model_config=_ModelConfigSave(config_to_json(model_config)),
            checksums=_ChecksumsSave({"params": param_sums, "opt_state": opt_sums}),
        )
        self.manager.save(step, args=args, force=True)
        self._saved.add(step)
        return True

    def read_meta(self, step: int) -> dict:
        try:
            return self.manager.restore(step, args=ocp.args.Composite(
                meta=ocp.args.JsonRestore()))["meta"]
        except Exception as e:
            raise CheckpointDirError(
                f"{self.step_dir(step)}: corrupt or incomplete checkpoint: cannot read its 'meta' "
                f"item ({type(e).__name__}: {_first_line(e)}). {_CORRUPT_HINT}") from None

    def restore(self, step: int, *, params, opt_state, param_layout: int = PARAM_LAYOUT):
        """(params, opt_state) of `step`, restored onto the shapes, dtypes and shardings of the
        targets (abstract trees: `jax.ShapeDtypeStruct` leaves with shardings, in the current
        layout); `param_layout`: the layout the step was saved in (`layout_of(meta["model"])`),
        permuted to the current one after the checksums are verified."""
        old = param_layout != PARAM_LAYOUT
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(
                params=ocp.args.StandardRestore(_layout1_target(params) if old else params),
                opt_state=ocp.args.StandardRestore(_layout1_target(opt_state) if old
                                                   else opt_state)))
        except Exception as e:
            raise CheckpointDirError(
                f"{self.step_dir(step)}: corrupt or incomplete checkpoint: cannot restore params "
                f"/ optimizer state ({type(e).__name__}: {_first_line(e)}). {_CORRUPT_HINT}"
            ) from None
        earlier = [s for s in step_numbers(self.dir) if s < step and is_step_dir(self.step_dir(s))]
        verify_checksums(self.step_dir(step),
                         {"params": out["params"], "opt_state": out["opt_state"]},
                         hint="Nothing was changed; move this step directory aside to resume "
                              + (f"from step {earlier[-1]}." if earlier else "from scratch."))
        if old:
            return _from_layout1(out["params"], params), _from_layout1(out["opt_state"], opt_state)
        return out["params"], out["opt_state"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
