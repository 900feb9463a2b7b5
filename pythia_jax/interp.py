"""Interpretability on the compiled model: capture by name, interventions as data, patching
grids, attribution patching, logit and tuned lenses (docs/research.md).

Everything here is built on the layer's seam (`layers.Taps`): a capture or an edit at a site
is part of the one jitted forward, with `scan_layers` too, and only the layers a site is
asked at run it (`Taps.layers`: an attention pattern at layer 3 leaves the fused kernels at
the other layers). Names are TransformerLens': `blocks.{l}.{site}` for the sites of
`layers.SITES` and `ln_final.hook_normalized`.

Shapes (B batch, T positions, D width, N heads, H head dim, F MLP width, S key positions):

    blocks.{l}.hook_resid_pre / hook_attn_out / hook_mlp_out / hook_resid_post   [B, T, D]
    blocks.{l}.attn.hook_q / hook_k / hook_v / hook_rot_q / hook_rot_k / hook_z   [B, T, N, H]
    blocks.{l}.attn.hook_pattern                                                  [B, N, T, S]
    blocks.{l}.mlp.hook_pre / hook_post                                           [B, T, F]
    ln_final.hook_normalized                                                      [B, T, D]

One compiled program per (model structure, names / interventions structure, reducers, input
shape, active mesh): arrays (patch values, masks, directions, the weights) are arguments.
Under `sharding.logical_rules(mesh)` every capture is constrained to its activation
sharding, so it stays on the devices that computed it. Nothing in the package imports this
module.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import os
import re
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from pythia_jax.data.indexed import MMapIndexedDataset
from pythia_jax.layers import MODEL_SITES, SITES, Taps, layer_norm
from pythia_jax.model import GPTNeoX, checked_input_ids
from pythia_jax.paths import atomic_dir
from pythia_jax.sharding import active_mesh, constrain

__all__ = ["site_names", "parse_name", "Positions", "BatchMean", "Project", "run_with_cache",
           "Intervention", "OPS", "run_with_interventions", "patch_grid",
           "attribution_patching", "LensResult", "logit_lens", "TunedLens", "train_tuned_lens",
           "kl_to_final", "read_token_rows"]

_RESID = ("batch", "length", "act_embed")
_HEADS = ("batch", "length", "act_heads", None)
_MLP = ("batch", "length", "act_mlp")
#: logical axes of every site (the activation sharding a capture keeps)
SITE_AXES = {
    "hook_resid_pre": _RESID, "hook_attn_out": _RESID, "hook_resid_mid": _RESID,
    "hook_mlp_out": _RESID, "hook_resid_post": _RESID, "ln_final.hook_normalized": _RESID,
    "attn.hook_q": _HEADS, "attn.hook_k": _HEADS, "attn.hook_v": _HEADS,
    "attn.hook_rot_q": _HEADS, "attn.hook_rot_k": _HEADS, "attn.hook_z": _HEADS,
    "attn.hook_pattern": ("batch", "act_heads", "length", None),
    "mlp.hook_pre": _MLP, "mlp.hook_post": _MLP,
}
_NAME = re.compile(r"blocks\.(-?\d+)\.(.+)")


# ------------------------------------------------------------------------------------------------
# Names
def site_names(cfg) -> list[str]:
    """Every capture name of a model config, in the order the forward meets them."""
    sites = [s for s in SITES if s != "hook_resid_mid" or not cfg.use_parallel_residual]
    return [f"blocks.{l}.{s}" for l in range(cfg.num_layers) for s in sites] + list(MODEL_SITES)


def _unknown(name, cfg, what="site name") -> ValueError:
    close = difflib.get_close_matches(str(name), site_names(cfg), n=5, cutoff=0.6)
    hint = (f"; close matches: {', '.join(close)}" if close else
            f"; names look like blocks.0.hook_resid_pre, blocks.0.attn.hook_z, "
            f"ln_final.hook_normalized")
    return ValueError(f"interp: unknown {what} {name!r}{hint}")


def parse_name(name: str, cfg) -> tuple[str, int | None]:
    """`blocks.3.attn.hook_z` -> ("attn.hook_z", 3); `ln_final.hook_normalized` -> (.., None)."""
    if not isinstance(name, str):
        raise TypeError(f"interp: a site name must be a str, got {type(name).__name__}")
    if name in MODEL_SITES:
        return name, None
    m = _NAME.fullmatch(name)
    if m is None or m.group(2) not in SITES:
        raise _unknown(name, cfg)
    layer, site = int(m.group(1)), m.group(2)
    if not 0 <= layer < cfg.num_layers:
        raise ValueError(f"interp: {name}: layer {layer} is out of range: the model has "
                         f"{cfg.num_layers} layers (0..{cfg.num_layers - 1})")
    if site == "hook_resid_mid" and cfg.use_parallel_residual:
        raise ValueError(f"interp: {name}: hook_resid_mid does not exist with the parallel "
                         "residual (use_parallel_residual=True)")
    return site, layer


def _select(cfg, names) -> list[str]:
    if names is None:
        return site_names(cfg)
    if callable(names):
        chosen = [n for n in site_names(cfg) if names(n)]
        if not chosen:
            raise ValueError("interp: the names predicate matched no site")
        return chosen
    if isinstance(names, str):
        names = [names]
    out = list(dict.fromkeys(names))
    for n in out:
        parse_name(n, cfg)
    if not out:
        raise ValueError("interp: names is empty")
    return out


def _site_shape(cfg, site: str, B: int, T: int) -> tuple[int, ...]:
    N, H = cfg.num_heads, cfg.head_dim
    axes = SITE_AXES[site]
    if site == "attn.hook_pattern":
        return (B, N, T, T)
    size = {"act_embed": cfg.hidden_size, "act_mlp": cfg.intermediate_size}
    return (B, T, N, H) if axes == _HEADS else (B, T, size[axes[2]])


# ------------------------------------------------------------------------------------------------
# Reducers (applied on the device, inside the compiled program)
def _hashable_index(index):
    if isinstance(index, slice):
        return ("slice", index.start, index.stop, index.step)
    if isinstance(index, (int, np.integer)):
        return int(index)
    return tuple(int(i) for i in index)


@dataclasses.dataclass(frozen=True)
class Positions:
    """Keep some positions (the query positions of a pattern): an int drops the axis, a
    sequence of ints or a slice keeps it."""
    index: Any

    def __post_init__(self):
        object.__setattr__(self, "index", _hashable_index(self.index))

    def __call__(self, x, site):
        axis = 2 if site == "attn.hook_pattern" else 1
        ix = self.index
        ix = slice(*ix[1:]) if isinstance(ix, tuple) and ix and ix[0] == "slice" else (
            jnp.asarray(ix) if isinstance(ix, tuple) else ix)
        return x[(slice(None),) * axis + (ix,)]


@dataclasses.dataclass(frozen=True)
class BatchMean:
    """Mean over the batch axis."""

    def __call__(self, x, site):
        return jnp.mean(x.astype(jnp.float32), axis=0).astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class Project:
    """Projection of the last axis onto `directions` [K, X] (-> [..., K]) or [X] (-> [...])."""
    directions: Any

    def __call__(self, x, site):
        d = jnp.asarray(self.directions)
        if d.shape[-1] != x.shape[-1] or d.ndim not in (1, 2):
            raise ValueError(f"interp: Project: directions of shape {tuple(d.shape)} do not "
                             f"match the last axis ({x.shape[-1]}) of {site} {tuple(x.shape)}; "
                             "expected [X] or [K, X]")
        return jnp.einsum("...x,kx->...k" if d.ndim == 2 else "...x,x->...", x,
                          d.astype(x.dtype), preferred_element_type=jnp.float32)


jax.tree_util.register_dataclass(Positions, data_fields=[], meta_fields=["index"])
jax.tree_util.register_dataclass(BatchMean, data_fields=[], meta_fields=[])
jax.tree_util.register_dataclass(Project, data_fields=["directions"], meta_fields=[])
_REDUCERS = (Positions, BatchMean, Project)


def _reducer_plan(cfg, reducers, chosen: list[str]) -> dict:
    """{name: (reducer, ...)} for the names that have reducers."""
    if reducers is None:
        return {}

    def chain(r, key):
        rs = (r,) if isinstance(r, _REDUCERS) else tuple(r)
        for x in rs:
            if not isinstance(x, _REDUCERS):
                raise TypeError(f"interp: reducers[{key!r}]: expected Positions, BatchMean or "
                                f"Project, got {type(x).__name__}")
        return rs

    if not isinstance(reducers, dict):
        rs = chain(reducers, "*")
        return {n: rs for n in chosen}
    out: dict = {}
    for key, r in reducers.items():
        if key in SITES:
            hit = [n for n in chosen if parse_name(n, cfg)[0] == key]
        else:
            parse_name(key, cfg)
            hit = [key] if key in chosen else []
        if not hit:
            raise ValueError(f"interp: reducers: {key!r} is not among the captured names")
        for n in hit:
            out[n] = chain(r, key)
    return out


# ------------------------------------------------------------------------------------------------
# The compiled program
@dataclasses.dataclass(frozen=True)
class _Plan:
    """Static: which captured stack entry each returned name is (site, index or None)."""
    outputs: tuple = ()
    logits: bool = True


def _taps_for(sites: dict) -> Taps:
    """A Taps capturing `sites` ({site: set of layers; empty for model sites}) only there."""
    return Taps(capture=set(sites),
                layers={s: sorted(ls) for s, ls in sites.items() if s in SITES})


def _outputs(cfg, chosen: list[str], sites: dict) -> tuple:
    out = []
    for n in chosen:
        site, layer = parse_name(n, cfg)
        out.append((n, site, None if layer is None else sorted(sites[site]).index(layer)))
    return tuple(sorted(out))  # the order names were given in is not part of the program


def _gather(captured: dict, plan: _Plan, reducers: dict) -> dict:
    cache = {}
    for name, site, idx in plan.outputs:
        v = captured[site] if idx is None else captured[site][idx]
        v = constrain(v, SITE_AXES[site])
        for r in reducers.get(name, ()):
            v = r(v, site)
        cache[name] = v
    return cache


@functools.partial(jax.jit, static_argnames=("graphdef", "plan", "mesh"))
def _run(graphdef, state, ids_BT, taps, reducers, plan: _Plan, mesh):
    del mesh  # part of the cache key only: the constraints were traced under it
    model = nnx.merge(graphdef, state)
    logits, captured = model(ids_BT, taps=taps)
    return logits, _gather(captured, plan, reducers)


def _capture_sites(cfg, chosen) -> dict:
    sites: dict = {}
    for n in chosen:
        site, layer = parse_name(n, cfg)
        sites.setdefault(site, set())
        if layer is not None:
            sites[site].add(layer)
    return sites


def run_with_cache(model: GPTNeoX, input_ids, names=None, *, reducers=None):
    """(logits [B, T, V] float32, cache {name: array}) for the names asked (a list, one name,
    a predicate over names, or None = every site of every layer).

    reducers: applied on the device before anything is returned: a reducer or a sequence of
    them (`Positions(i)`, `BatchMean()`, `Project(directions)`, applied in order) for every
    name, or a dict from a name, or a site (`"hook_resid_post"` = at every layer), to them.
    """
    cfg = model.config
    ids = checked_input_ids(model, input_ids)
    chosen = _select(cfg, names)
    sites = _capture_sites(cfg, chosen)
    plan = _Plan(outputs=_outputs(cfg, chosen, sites))
    graphdef, state = nnx.split(model)
    return _run(graphdef, state, ids, _taps_for(sites), _reducer_plan(cfg, reducers, chosen),
                plan=plan, mesh=active_mesh())


# ------------------------------------------------------------------------------------------------
# Interventions
OPS = ("set", "add", "scale", "zero", "mean", "patch")


@dataclasses.dataclass(frozen=True)
class Intervention:
    """A change of the value at one named site, as data.

    op: "set" (the value becomes `value`, broadcast numpy-style: a direction [D], a scalar,
      a full array), "add" (+ value), "scale" (* value), "zero", "mean" (the mean over the
      batch of this run's value, or `value` when given: e.g. a dataset mean), "patch"
      (`value` is the site's value from another run, exactly the site's shape: e.g.
      `cache[name]` of `run_with_cache` on the clean input).
    mask: where to change (True / 1) and where to keep: its axes are the site's leading axes
      (batch, position, head: [B, T] or [B, T, N] for the head sites, [B, N, T, S] for the
      pattern; trailing axes may be left out, size-1 axes broadcast). None = everywhere.
    """
    name: str
    op: str = "set"
    value: Any = None
    mask: Any = None


@dataclasses.dataclass(frozen=True)
class _Edit:
    """The edit function of one intervention (value-compared: equal structure, one compile)."""
    op: str
    layer: int | None
    key: int

    def __call__(self, x, at, data):
        d = data[self.key]
        v = d.get("value")
        if self.op in ("set", "patch"):
            new = jnp.broadcast_to(v.astype(x.dtype), x.shape)
        elif self.op == "add":
            new = x + v.astype(x.dtype)
        elif self.op == "scale":
            new = x * v.astype(x.dtype)
        elif self.op == "zero":
            new = jnp.zeros_like(x)
        else:  # mean
            mean = (jnp.mean(x.astype(jnp.float32), axis=0, keepdims=True) if v is None
                    else v)
            new = jnp.broadcast_to(mean.astype(x.dtype), x.shape)
        where = True
        if "mask" in d:
            m = d["mask"]
            where = m.reshape(m.shape + (1,) * (x.ndim - m.ndim)).astype(bool)
        if self.layer is not None:
            where = jnp.logical_and(where, at == self.layer)
        return jnp.where(where, new, x)


def _check_intervention(cfg, iv, B: int, T: int) -> tuple[str, int | None, dict]:
    if not isinstance(iv, Intervention):
        raise TypeError(f"interp: expected an Intervention, got {type(iv).__name__}")
    site, layer = parse_name(iv.name, cfg)
    if iv.op not in OPS:
        raise ValueError(f"interp: {iv.name}: unknown op {iv.op!r}; expected one of {OPS}")
    shape = _site_shape(cfg, site, B, T)
    data: dict = {}
    if iv.op in ("set", "add", "scale", "patch") and iv.value is None:
        raise ValueError(f"interp: {iv.name}: op {iv.op!r} needs a value")
    if iv.op == "zero" and iv.value is not None:
        raise ValueError(f"interp: {iv.name}: op 'zero' takes no value")
    if iv.value is not None:
        value = jnp.asarray(iv.value)
        if iv.op == "patch" and tuple(value.shape) != shape:
            raise ValueError(f"interp: {iv.name}: a patch value must have the site's shape "
                             f"{shape}, got {tuple(value.shape)}")
        try:
            np.broadcast_shapes(tuple(value.shape), shape)
        except ValueError:
            raise ValueError(f"interp: {iv.name}: value of shape {tuple(value.shape)} does not "
                             f"broadcast to the site's shape {shape}") from None
        data["value"] = value
    if iv.mask is not None:
        mask = jnp.asarray(iv.mask)
        ok = mask.ndim <= len(shape)
        if ok:
            try:
                padded = tuple(mask.shape) + (1,) * (len(shape) - mask.ndim)
                ok = np.broadcast_shapes(padded, shape) == shape
            except ValueError:
                ok = False
        if not ok:
            raise ValueError(f"interp: {iv.name}: mask of shape {tuple(mask.shape)} does not "
                             f"broadcast over the site's leading axes {shape} "
                             f"({', '.join(a or 'features' for a in SITE_AXES[site])}; "
                             "trailing axes may be left out)")
        data["mask"] = mask
    return site, layer, data


def _intervention_edits(cfg, interventions, B, T, sites: dict) -> tuple[list, list]:
    """(edits, data) for `Taps`; adds each intervention's site and layer to `sites`."""
    edits, data = [], []
    for key, iv in enumerate(interventions):
        site, layer, d = _check_intervention(cfg, iv, B, T)
        sites.setdefault(site, set())
        if layer is not None:
            sites[site].add(layer)
        edits.append((site, _Edit(iv.op, layer, key)))
        data.append(d)
    return edits, data


def run_with_interventions(model: GPTNeoX, input_ids, interventions: Sequence[Intervention],
                           *, return_cache=False, reducers=None):
    """Logits [B, T, V] of the forward with `interventions` applied (in order), and
    `(logits, cache)` when `return_cache` is True (every site) or names / a predicate (as
    `run_with_cache`; a captured site shows the value after the interventions)."""
    cfg = model.config
    ids = checked_input_ids(model, input_ids)
    B, T = ids.shape
    if isinstance(interventions, Intervention):
        interventions = [interventions]
    chosen = [] if return_cache is False else _select(cfg, None if return_cache is True
                                                      else return_cache)
    capture_sites = _capture_sites(cfg, chosen)
    sites = {s: set(ls) for s, ls in capture_sites.items()}
    edits, data = _intervention_edits(cfg, list(interventions), B, T, sites)
    taps = Taps(capture=set(capture_sites), edits=edits, data=data,
                layers={s: sorted(ls) for s, ls in sites.items() if s in SITES})
    plan = _Plan(outputs=_outputs(cfg, chosen, sites))
    graphdef, state = nnx.split(model)
    logits, cache = _run(graphdef, state, ids, taps, _reducer_plan(cfg, reducers, chosen),
                         plan=plan, mesh=active_mesh())
    return (logits, cache) if return_cache is not False else logits


# ------------------------------------------------------------------------------------------------
# Patching grids and attribution patching
def _grid_site(cfg, site: str, layers) -> tuple[str, list[int], bool]:
    if site.startswith("blocks."):
        raise ValueError(f"interp: site {site!r}: give the site without the layer "
                         "(e.g. 'attn.hook_z'); choose layers with layers=")
    if site not in SITES or site == "attn.hook_pattern":
        grid = [s for s in SITES if s != "attn.hook_pattern"]
        close = difflib.get_close_matches(site, grid, n=3, cutoff=0.6)
        raise ValueError(f"interp: site {site!r} cannot be patched over a grid; expected one "
                         f"of {grid}" + (f" (close: {', '.join(close)})" if close else ""))
    if site == "hook_resid_mid" and cfg.use_parallel_residual:
        raise ValueError("interp: hook_resid_mid does not exist with the parallel residual")
    layers = list(range(cfg.num_layers)) if layers is None else sorted(set(layers))
    for l in layers:
        if not 0 <= l < cfg.num_layers:
            raise ValueError(f"interp: layer {l} is out of range: the model has "
                             f"{cfg.num_layers} layers (0..{cfg.num_layers - 1})")
    return site, layers, SITE_AXES[site] == _HEADS


def _grid_patch(x, at, data):
    """The clean value at the grid point (data["layer"], data["pos"], data["head"])."""
    clean = data["clean"][data["lut"][at]]
    pos = jnp.arange(x.shape[1]) == data["pos"]
    where = pos[None, :, None] if x.ndim == 3 else (
        pos[None, :, None, None] & (jnp.arange(x.shape[2]) == data["head"])[None, None, :, None])
    return jnp.where(where & (at == data["layer"]), clean, x)


def _attribution_add(x, at, data):
    return x + data["eps"][data["lut"][at]].astype(x.dtype)


def _lut(cfg, layers) -> jax.Array:
    lut = np.zeros(cfg.num_layers, np.int32)
    lut[layers] = np.arange(len(layers))
    return jnp.asarray(lut)


@functools.partial(jax.jit, static_argnames=("graphdef", "site", "layers", "metric",
                                             "batch_size", "mesh"))
def _patch_grid(graphdef, state, clean_BT, corrupt_BT, grid, site, layers, metric, batch_size,
                mesh):
    del mesh
    model = nnx.merge(graphdef, state)
    cfg = model.config
    lut = _lut(cfg, list(layers))
    _, cap = model(clean_BT, taps=Taps(capture={site}, layers={site: layers}))

    def one(point):
        layer, pos, head = point
        taps = Taps(edits=[(site, _grid_patch)], layers={site: layers},
                    data={"clean": cap[site], "lut": lut, "layer": layer, "pos": pos,
                          "head": head})
        logits, _ = model(corrupt_BT, taps=taps)
        return metric(logits)

    return jax.lax.map(one, grid, batch_size=batch_size)


def patch_grid(model: GPTNeoX, clean_ids, corrupt_ids, site: str = "attn.hook_z", *,
               metric: Callable, layers=None, positions=None, heads=None,
               batch_size: int = 16) -> jax.Array:
    """Activation patching over a grid, as one compiled program: for every layer x position
    (x head, for the head sites) the corrupt run with the clean run's value at that one point
    (all batch rows), scored by `metric(logits_BTV) -> scalar`. Returns [layers, positions,
    heads] (or [layers, positions] for the residual and MLP sites) in the order given.

    The grid points are run `batch_size` at a time (`lax.map` over vmapped chunks), so
    memory is `batch_size` forwards whatever the grid's size.
    """
    cfg = model.config
    clean, corrupt = checked_input_ids(model, clean_ids), checked_input_ids(model, corrupt_ids)
    if clean.shape != corrupt.shape:
        raise ValueError(f"interp: clean ids {tuple(clean.shape)} and corrupt ids "
                         f"{tuple(corrupt.shape)} must have the same shape")
    site, layers, has_heads = _grid_site(cfg, site, layers)
    T = clean.shape[1]
    positions = list(range(T)) if positions is None else [int(p) for p in positions]
    for p in positions:
        if not 0 <= p < T:
            raise ValueError(f"interp: position {p} is out of range [0, {T})")
    if has_heads:
        heads = list(range(cfg.num_heads)) if heads is None else [int(h) for h in heads]
        for h in heads:
            if not 0 <= h < cfg.num_heads:
                raise ValueError(f"interp: head {h} is out of range [0, {cfg.num_heads})")
    elif heads is not None:
        raise ValueError(f"interp: site {site!r} has no heads; heads= is for the attention "
                         "head sites")
    axes = [layers, positions] + ([heads] if has_heads else [[0]])
    mesh_grid = np.meshgrid(*[np.asarray(a, np.int32) for a in axes], indexing="ij")
    grid = tuple(jnp.asarray(g.reshape(-1)) for g in mesh_grid)
    if not callable(metric):
        raise TypeError("interp: metric must be a function logits_BTV -> scalar")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"interp: batch_size (grid points per step) must be an int >= 1, got "
                         f"{batch_size!r}")
    graphdef, state = nnx.split(model)
    out = _patch_grid(graphdef, state, clean, corrupt, grid, site=site, layers=tuple(layers),
                      metric=metric, batch_size=batch_size,
                      mesh=active_mesh())
    shape = (len(layers), len(positions)) + ((len(heads),) if has_heads else ())
    return out.reshape(shape)


@functools.partial(jax.jit, static_argnames=("graphdef", "site", "layers", "metric", "mesh"))
def _attribution(graphdef, state, clean_BT, corrupt_BT, site, layers, metric, mesh):
    del mesh
    model = nnx.merge(graphdef, state)
    cfg = model.config
    lut = _lut(cfg, list(layers))
    only = {site: layers}
    _, clean = model(clean_BT, taps=Taps(capture={site}, layers=only))

    def run(eps):
        taps = Taps(capture={site}, edits=[(site, _attribution_add)], layers=only,
                    data={"eps": eps, "lut": lut})
        logits, cap = model(corrupt_BT, taps=taps)
        return metric(logits), cap[site]

    eps = jnp.zeros(clean[site].shape, jnp.float32)
    grad, corrupt = jax.grad(run, has_aux=True)(eps)
    contrib = (clean[site] - corrupt).astype(jnp.float32) * grad  # [L', B, T, ...]
    return jnp.sum(contrib, axis=(1,) + tuple(range(4 if contrib.ndim == 5 else 3,
                                                    contrib.ndim)))


def attribution_patching(model: GPTNeoX, clean_ids, corrupt_ids, site: str = "attn.hook_z", *,
                         metric: Callable, layers=None) -> jax.Array:
    """The first-order estimate of `patch_grid` from one forward and one backward pass:
    (clean - corrupt) . d metric / d value, the gradient taken at the corrupt run with
    respect to a zero perturbation added at the site, summed over the batch and the features
    of a point. [layers, T, N] for the head sites, [layers, T] otherwise."""
    cfg = model.config
    clean, corrupt = checked_input_ids(model, clean_ids), checked_input_ids(model, corrupt_ids)
    if clean.shape != corrupt.shape:
        raise ValueError(f"interp: clean ids {tuple(clean.shape)} and corrupt ids "
                         f"{tuple(corrupt.shape)} must have the same shape")
    site, layers, _ = _grid_site(cfg, site, layers)
    if not callable(metric):
        raise TypeError("interp: metric must be a function logits_BTV -> scalar")
    graphdef, state = nnx.split(model)
    return _attribution(graphdef, state, clean, corrupt, site=site, layers=tuple(layers),
                        metric=metric, mesh=active_mesh())


# ------------------------------------------------------------------------------------------------
# Lenses
@dataclasses.dataclass
class LensResult:
    """Per lens layer (the residual stream after layer `layers[i]`, `hook_resid_post`):
    top_ids / top_logprobs [len(layers), B, T, k] (log-softmax over the padded vocabulary,
    as the model's own logits), target_logprobs [len(layers), B, T] when targets were given."""
    layers: tuple
    top_ids: jax.Array | None
    top_logprobs: jax.Array | None
    target_logprobs: jax.Array | None


def _lens_logprobs(model, h_BTD):
    cfg = model.config
    x = layer_norm(h_BTD, model.final_layer_norm.scale[...], model.final_layer_norm.bias[...],
                   cfg.layer_norm_eps)
    logits = jnp.einsum("btd,vd->btv", x, model.embed_out.embedding[...].astype(x.dtype),
                        preferred_element_type=jnp.float32)
    return jax.nn.log_softmax(logits, axis=-1)


def _lens_outputs(logp_BTV, top_k, targets_BT):
    top = jax.lax.top_k(logp_BTV, top_k) if top_k else (None, None)
    tgt = (None if targets_BT is None else
           jnp.take_along_axis(logp_BTV, targets_BT[..., None], axis=-1)[..., 0])
    return top[1], top[0], tgt


@functools.partial(jax.jit, static_argnames=("graphdef", "layers", "top_k", "mesh"))
def _lens(graphdef, state, ids_BT, targets_BT, translators, layers, top_k, mesh):
    del mesh
    model = nnx.merge(graphdef, state)
    _, cap = model(ids_BT, taps=Taps(capture={"hook_resid_post"},
                                     layers={"hook_resid_post": layers}))
    resid = cap["hook_resid_post"]

    def one(xs):
        h, tr = xs
        if tr is not None:
            h = _translate(h, *tr)
        return _lens_outputs(_lens_logprobs(model, h), top_k, targets_BT)

    return jax.lax.map(one, (resid, translators))


def _translate(h_BTD, w_DD, b_D):
    """The tuned lens' translator: h + h W + b (W = 0, b = 0 is the identity)."""
    hf = h_BTD.astype(jnp.float32)
    return (hf + hf @ w_DD + b_D).astype(h_BTD.dtype)


def _lens_args(model, input_ids, layers, top_k, targets):
    cfg = model.config
    ids = checked_input_ids(model, input_ids)
    layers = list(range(cfg.num_layers)) if layers is None else (
        [layers] if isinstance(layers, int) else list(layers))
    for l in layers:
        if not -cfg.num_layers <= l < cfg.num_layers:
            raise ValueError(f"interp: layer {l} is out of range: the model has "
                             f"{cfg.num_layers} layers (0..{cfg.num_layers - 1})")
    layers = tuple(sorted({l % cfg.num_layers for l in layers}))
    if top_k is not None and not (isinstance(top_k, int) and 0 <= top_k <= cfg.vocab_size):
        raise ValueError(f"interp: top_k must be an int in [0, {cfg.vocab_size}], got {top_k!r}")
    if targets is not None:
        targets = checked_input_ids(model, targets)
        if targets.shape != ids.shape:
            raise ValueError(f"interp: targets {tuple(targets.shape)} must have the shape of "
                             f"the input ids {tuple(ids.shape)}")
    if not top_k and targets is None:
        raise ValueError("interp: ask for top_k > 0 or targets (or both)")
    return ids, layers, int(top_k or 0), targets


def logit_lens(model: GPTNeoX, input_ids, layers=None, top_k: int | None = 10, targets=None
               ) -> LensResult:
    """The logit lens on the device: the final LayerNorm and unembedding applied to the
    residual stream after each layer asked (`hook_resid_post`; the last layer's is the model's
    own output). Only the top-k (ids, log-probs) and / or the log-probs of `targets` [B, T]
    leave the program, one layer at a time inside it ([B, T, V] per step, never [L, B, T, V])."""
    ids, layers, top_k, targets = _lens_args(model, input_ids, layers, top_k, targets)
    graphdef, state = nnx.split(model)
    out = _lens(graphdef, state, ids, targets, None, layers=layers, top_k=top_k,
                mesh=active_mesh())
    return LensResult(layers, *out)


def kl_to_final(logp_final_BTV, logp_lens_BTV):
    """Mean over tokens of KL(final || lens) in nats."""
    p = jnp.exp(logp_final_BTV)
    return jnp.mean(jnp.sum(p * (logp_final_BTV - logp_lens_BTV), axis=-1))


_LENS_FORMAT = "pythia-jax-tuned-lens"
_LENS_JSON, _LENS_NPZ = "tuned_lens.json", "tuned_lens.npz"


@dataclasses.dataclass
class TunedLens:
    """One affine translator per layer (Belrose et al. 2023, "Eliciting latent predictions
    with the tuned lens"): the lens of layer l reads `h + h W_l + b_l` (h = `hook_resid_post`
    of layer l) through the model's final LayerNorm and unembedding. W, b = 0 (the identity,
    i.e. the logit lens) at initialisation. weight [L, D, D], bias [L, D], float32."""
    weight: Any
    bias: Any
    info: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def identity(cls, model: GPTNeoX) -> "TunedLens":
        L, D = model.config.num_layers, model.config.hidden_size
        return cls(jnp.zeros((L, D, D), jnp.float32), jnp.zeros((L, D), jnp.float32))

    def _check(self, model):
        L, D = model.config.num_layers, model.config.hidden_size
        if tuple(self.weight.shape) != (L, D, D) or tuple(self.bias.shape) != (L, D):
            raise ValueError(f"interp: this tuned lens has weight {tuple(self.weight.shape)}, "
                             f"bias {tuple(self.bias.shape)}; the model needs ({L}, {D}, {D}) "
                             f"and ({L}, {D})")

    def __call__(self, model: GPTNeoX, input_ids, layers=None, top_k: int | None = 10,
                 targets=None) -> LensResult:
        """As `logit_lens`, through the translators."""
        self._check(model)
        ids, layers, top_k, targets = _lens_args(model, input_ids, layers, top_k, targets)
        sel = np.asarray(layers)
        graphdef, state = nnx.split(model)
        out = _lens(graphdef, state, ids, targets,
                    (jnp.asarray(self.weight)[sel], jnp.asarray(self.bias)[sel]),
                    layers=layers, top_k=top_k, mesh=active_mesh())
        return LensResult(layers, *out)

    def kl(self, model: GPTNeoX, input_ids) -> np.ndarray:
        """[L] mean KL(final || lens of layer l) on `input_ids`, in nats."""
        self._check(model)
        graphdef, state = nnx.split(model)
        ids = checked_input_ids(model, input_ids)
        return np.asarray(_lens_kl(graphdef, state, ids, self.params()))

    def params(self) -> dict:
        return {"weight": jnp.asarray(self.weight), "bias": jnp.asarray(self.bias)}

    def save(self, path, *, overwrite: bool = False) -> str:
        """`path/tuned_lens.npz` (weight, bias) + `path/tuned_lens.json`, written under a
        temporary name and renamed at the end."""
        meta = {"format": _LENS_FORMAT, "version": 1, "site": "hook_resid_post",
                "num_layers": int(self.weight.shape[0]), "hidden_size": int(self.weight.shape[1]),
                "info": self.info}
        with atomic_dir(path, overwrite=overwrite) as tmp:
            np.savez(os.path.join(tmp, _LENS_NPZ), weight=np.asarray(self.weight, np.float32),
                     bias=np.asarray(self.bias, np.float32))
            with open(os.path.join(tmp, _LENS_JSON), "w") as f:
                json.dump(meta, f, indent=2, sort_keys=True)
        return os.fspath(path)

    @classmethod
    def load(cls, path) -> "TunedLens":
        path = os.fspath(path)
        meta_path, npz_path = os.path.join(path, _LENS_JSON), os.path.join(path, _LENS_NPZ)
        for p in (meta_path, npz_path):
            if not os.path.isfile(p):
                raise FileNotFoundError(f"{p}: no such file (a tuned lens directory holds "
                                        f"{_LENS_JSON} and {_LENS_NPZ})")
        try:
            with open(meta_path) as f:
                meta = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{meta_path}: not JSON ({e})") from None
        if not isinstance(meta, dict) or meta.get("format") != _LENS_FORMAT:
            raise ValueError(f"{meta_path}: field 'format': expected {_LENS_FORMAT!r}, got "
                             f"{meta.get('format') if isinstance(meta, dict) else meta!r}")
        with np.load(npz_path) as z:
            if set(z.files) != {"weight", "bias"}:
                raise ValueError(f"{npz_path}: expected arrays weight and bias, got {z.files}")
            w, b = z["weight"], z["bias"]
        L, D = meta.get("num_layers"), meta.get("hidden_size")
        if w.shape != (L, D, D) or b.shape != (L, D):
            raise ValueError(f"{npz_path}: weight {w.shape} / bias {b.shape} do not match "
                             f"num_layers={L}, hidden_size={D} of {meta_path}")
        return cls(jnp.asarray(w), jnp.asarray(b), meta.get("info", {}))


def _all_layer_kl(model, ids_BT, params):
    logits, cap = model(ids_BT, taps=Taps(capture={"hook_resid_post"}))
    logp_final = jax.lax.stop_gradient(jax.nn.log_softmax(logits, axis=-1))
    resid = jax.lax.stop_gradient(cap["hook_resid_post"])

    @jax.checkpoint
    def one(xs):
        h, w, b = xs
        return kl_to_final(logp_final, _lens_logprobs(model, _translate(h, w, b)))

    return jax.lax.map(one, (resid, params["weight"], params["bias"]))


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _lens_kl(graphdef, state, ids_BT, params):
    return _all_layer_kl(nnx.merge(graphdef, state), ids_BT, params)


@functools.partial(jax.jit, static_argnames=("graphdef", "tx"), donate_argnums=(3, 4))
def _lens_step(graphdef, state, ids_BT, params, opt_state, tx):
    model = nnx.merge(graphdef, state)

    def loss(p):
        return jnp.mean(_all_layer_kl(model, ids_BT, p))

    value, grads = jax.value_and_grad(loss)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value


def train_tuned_lens(model: GPTNeoX, batches: Iterable, *, steps: int, lr: float = 1e-3,
                     lens: TunedLens | None = None, log: Callable | None = None
                     ) -> tuple[TunedLens, list[float]]:
    """Train one translator per layer with the tuned-lens objective, the mean over layers
    and tokens of KL(final logits || lens logits), Adam (optax) with a linear warm-up over
    the first tenth of the steps. `batches` yields token ids [B, T] (the same shape each
    time: one compile). Returns (lens, the loss of every step)."""
    if steps < 1:
        raise ValueError(f"interp: steps must be >= 1, got {steps}")
    lens = TunedLens.identity(model) if lens is None else lens
    lens._check(model)
    tx = optax.adam(optax.linear_schedule(0.0, lr, max(1, steps // 10)))
    params = {k: jnp.array(v) for k, v in lens.params().items()}
    opt_state = tx.init(params)
    graphdef, state = nnx.split(model)
    losses: list[float] = []
    it = iter(batches)
    for step in range(steps):
        try:
            ids = next(it)
        except StopIteration:
            raise ValueError(f"interp: the batches ran out after {step} of {steps} steps") \
                from None
        params, opt_state, value = _lens_step(graphdef, state, checked_input_ids(model, ids),
                                              params, opt_state, tx=tx)
        losses.append(float(value))
        if log is not None:
            log(step, losses[-1])
    info = dict(lens.info, steps=len(losses) + int(lens.info.get("steps", 0)),
                final_train_kl=losses[-1])
    return TunedLens(params["weight"], params["bias"], info), losses


def read_token_rows(prefix, start: int, count: int, seq_len: int) -> np.ndarray:
    """Items start..start+count-1 of an indexed dataset (`.bin/.idx` prefix), the first
    `seq_len` tokens of each: [count, seq_len] int32. Rows shorter than seq_len are refused."""
    ds = MMapIndexedDataset(prefix)
    if start < 0 or count < 1 or start + count > len(ds):
        raise ValueError(f"{prefix}: rows [{start}, {start + count}) are outside the dataset's "
                         f"{len(ds)} items")
    out = np.empty((count, seq_len), np.int32)
    for i in range(count):
        row = ds[start + i]
        if len(row) < seq_len:
            raise ValueError(f"{prefix}: item {start + i} has {len(row)} tokens, fewer than "
                             f"seq_len={seq_len}")
        out[i] = row[:seq_len]
    return out
