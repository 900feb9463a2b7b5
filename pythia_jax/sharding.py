"""Mesh (data, fsdp, tensor), logical axis names -> mesh axes, sharded creation helpers.

Parameters and activations carry logical names (`vocab`, `embed`, `heads`, …); one table maps
them to the three mesh axes:

    data    pure data parallelism: the batch is split, parameters are replicated
    fsdp    the batch is split *and* parameters / optimizer state are split on `embed`
            (ZeRO-3 style; XLA all-gathers each layer's weights when it needs them)
    tensor  Megatron-style model parallelism over heads, the MLP width and the vocabulary

Optimizer state (AdamW mu / nu) mirrors the parameter tree, so it gets the parameters' logical
axes and the same table. Outside an active `logical_rules(mesh)` context `constrain` is the
identity, so the model runs unchanged on one device.

A mesh axis that does not divide a dimension is dropped for that dimension (the dimension is
replicated over it), e.g. 4 heads on `tensor=8` leaves the heads replicated while the MLP and
vocabulary dimensions are still split 8 ways. `sharding_report` lists where that happened.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import re
from typing import Any, Iterator, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = ["MESH_AXES", "DEFAULT_RULES", "BATCH_AXES", "mesh_shape", "make_mesh",
           "logical_to_spec", "named_sharding", "logical_rules", "active_mesh", "constrain",
           "tree_shardings", "sharded_init", "sharding_report", "manual_rules",
           "hlo_collectives", "COLLECTIVE_OPS"]

MESH_AXES = ("data", "fsdp", "tensor")

#: the mesh axes the batch dimension of every input / activation is split over (each process
#: feeds its own rows: `pythia_jax.data.pipeline`)
BATCH_AXES = ("data", "fsdp")

#: logical name -> mesh axis (or tuple of mesh axes, or None = replicated)
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # parameters (and the optimizer state, which has the parameters' axes)
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("head_dim", None),
    ("qkv", None),
    ("mlp", "tensor"),
    ("layers", None),
    ("norm", None),
    # activations
    ("batch", BATCH_AXES),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)

_ACTIVE: contextvars.ContextVar[tuple[Mesh, dict] | None] = contextvars.ContextVar(
    "pythia_jax_logical_rules", default=None)


def rules_dict(rules=DEFAULT_RULES) -> dict:
    return dict(rules)


# ------------------------------------------------------------------------------------------------
# Mesh
def mesh_shape(shape: Mapping[str, int] | Sequence[int] | None, num_devices: int) -> tuple[int, ...]:
    """Resolve `{data: -1, fsdp: 4, tensor: 1}` (or `(-1, 4, 1)`) against `num_devices`.

    At most one axis may be -1; it takes whatever the others leave. Missing axes are 1
    (`None` means all devices on `data`).
    """
    if shape is None:
        shape = {"data": -1}
    if hasattr(shape, "to_dict"):  # ml_collections.ConfigDict
        shape = shape.to_dict()
    if isinstance(shape, Mapping):
        unknown = sorted(set(shape) - set(MESH_AXES))
        if unknown:
            raise ValueError(f"mesh shape: unknown axis {unknown[0]!r}; expected {MESH_AXES}")
        sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
    else:
        sizes = [int(s) for s in shape]
        if len(sizes) != len(MESH_AXES):
            raise ValueError(f"mesh shape: expected {len(MESH_AXES)} sizes {MESH_AXES}, got {sizes}")
    if sum(s == -1 for s in sizes) > 1:
        raise ValueError(f"mesh shape: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh shape: sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(f"mesh shape {dict(zip(MESH_AXES, sizes))}: {num_devices} devices are "
                             f"not divisible by {known}")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(f"mesh shape {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} "
                         f"devices, have {num_devices}")
    return tuple(sizes)


def make_mesh(shape: Mapping[str, int] | Sequence[int] | None = None,
              devices: Sequence[Any] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all devices of all processes).

    On TPU the devices are laid out along the physical torus (`mesh_utils.create_device_mesh`),
    `tensor` innermost so that its collectives stay on the nearest links. The axes are `Auto`
    (sharding by `with_sharding_constraint` and jit shardings, not explicit-sharding types).
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_shape(shape, len(devices))
    try:
        from jax.experimental import mesh_utils
        arr = mesh_utils.create_device_mesh(sizes, devices, allow_split_physical_axes=True)
    except Exception:  # CPU, or a device set the topology-aware layout cannot handle
        arr = np.asarray(devices, dtype=object).reshape(sizes)
    return Mesh(arr, MESH_AXES)


# ------------------------------------------------------------------------------------------------
# Logical names -> PartitionSpec
def logical_to_spec(axes: Sequence[str | None], rules=None, *, shape: Sequence[int] | None = None,
                    mesh: Mesh | None = None) -> PartitionSpec:
    """Map a tuple of logical names to a PartitionSpec with the given (or active) rules.

    With `shape` and `mesh`, a mesh axis (or the remainder of a tuple of axes) that does not
    divide its dimension is dropped, so the spec is always valid for that array.
    """
    active = _ACTIVE.get()
    if rules is None:
        rules = active[1] if active else rules_dict()
    elif not isinstance(rules, dict):
        rules = dict(rules)
    if mesh is None and shape is not None and active is not None:
        mesh = active[0]
    if shape is not None and len(shape) != len(axes):
        raise ValueError(f"logical axes {tuple(axes)} do not match an array of shape {tuple(shape)}")
    used: set[str] = set()
    out = []
    for i, name in enumerate(axes):
        if name is None:
            out.append(None)
            continue
        if name not in rules:
            raise KeyError(f"logical axis {name!r} has no sharding rule; known: {sorted(rules)}")
        target = rules[name]
        targets = (target,) if isinstance(target, str) else tuple(target or ())
        # A mesh axis may shard only one dimension of an array.
        targets = tuple(t for t in targets if t not in used)
        if shape is not None and mesh is not None:
            keep, n = [], 1
            for t in targets:
                size = mesh.shape[t]
                if shape[i] % (n * size) == 0:
                    keep.append(t)
                    n *= size
            targets = tuple(keep)
        # size-1 mesh axes are kept: they are harmless and keep the spec readable
        used.update(targets)
        out.append(targets[0] if len(targets) == 1 else (targets or None))
    return PartitionSpec(*out)


def named_sharding(mesh: Mesh, axes: Sequence[str | None], shape: Sequence[int] | None = None,
                   rules=None) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(axes, rules, shape=shape, mesh=mesh))


@contextlib.contextmanager
def logical_rules(mesh: Mesh, rules=DEFAULT_RULES) -> Iterator[None]:
    """Activate activation-sharding constraints for code traced inside this context."""
    token = _ACTIVE.set((mesh, rules_dict(rules)))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active_mesh() -> Mesh | None:
    active = _ACTIVE.get()
    return active[0] if active else None


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """`with_sharding_constraint` by logical names; identity when no rules are active."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    spec = logical_to_spec(axes, rules, shape=x.shape, mesh=mesh)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


# ------------------------------------------------------------------------------------------------
# Trees: parameters, optimizer state, whole train states
def _is_variable(x) -> bool:
    from flax import nnx
    return isinstance(x, nnx.Variable)


def _leaf_shape(x):
    if _is_variable(x):
        x = x.get_value()
    return tuple(getattr(x, "shape", ()))


def tree_shardings(tree: Any, mesh: Mesh, rules=None) -> Any:
    """A NamedSharding for every leaf of `tree` (arrays, ShapeDtypeStructs or nnx Variables).

    Variables carrying `logical_axes` (every model parameter, and every optimizer-state entry
    that mirrors one, e.g. AdamW's mu and nu) are sharded by the rules; anything else (step
    counters, scalars, RNG keys) is replicated. The result has the structure of `tree` with
    each Variable / array replaced by its sharding, which `jax.jit(out_shardings=…)` accepts.
    """
    replicated = NamedSharding(mesh, PartitionSpec())

    def one(x):
        if _is_variable(x):
            axes = x.get_metadata().get("logical_axes") if hasattr(x, "get_metadata") else None
            if axes is not None:
                return NamedSharding(mesh, logical_to_spec(axes, rules, shape=_leaf_shape(x),
                                                           mesh=mesh))
        return replicated

    return jax.tree.map(one, tree, is_leaf=_is_variable)


def sharded_init(fn, mesh: Mesh, *args, rules=None, **kwargs):
    """Run `fn(*args, **kwargs)` under jit with every output created directly sharded.

    The output tree is found with `jax.eval_shape` (nothing allocated), its shardings with
    `tree_shardings`; no device (and no host) ever holds an unsharded copy.
    """
    abstract = jax.eval_shape(lambda: fn(*args, **kwargs))
    shardings = tree_shardings(abstract, mesh, rules)
    with logical_rules(mesh, rules or DEFAULT_RULES):
        return jax.jit(lambda: fn(*args, **kwargs), out_shardings=shardings)()


def sharding_report(tree: Any, mesh: Mesh, rules=None) -> list[str]:
    """'path: shape logical -> spec' lines; marks dims whose rule was dropped (not divisible)."""
    from flax import nnx
    lines = []
    rules_d = rules_dict() if rules is None else (rules if isinstance(rules, dict) else dict(rules))
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_variable)[0]
    for path, x in flat:
        name = jax.tree_util.keystr(path)
        shape = _leaf_shape(x)
        axes = x.get_metadata().get("logical_axes") if isinstance(x, nnx.Variable) else None
        if axes is None:
            lines.append(f"{name}: {shape} replicated")
            continue
        spec = logical_to_spec(axes, rules_d, shape=shape, mesh=mesh)
        want = logical_to_spec(axes, rules_d)
        note = ""
        if spec != want:
            note = f"  (rule {want} not divisible; using {spec})"
        lines.append(f"{name}: {shape} {tuple(axes)} -> {spec}{note}")
    return lines


# ------------------------------------------------------------------------------------------------
# Inside a shard_map that is manual over some mesh axes
@contextlib.contextmanager
def manual_rules(axes: Sequence[str] = BATCH_AXES, rules=DEFAULT_RULES) -> Iterator[None]:
    """The logical rules for code traced inside `jax.shard_map(..., axis_names=axes)`: arrays
    there are per-shard along `axes`, so those axes are removed from every rule; the other
    axes (e.g. `tensor`) stay automatic, on the context's abstract mesh (which a nested
    shard_map, such as attention's, must be given)."""
    manual = set(axes)

    def strip(target):
        targets = (target,) if isinstance(target, str) else tuple(target or ())
        kept = tuple(t for t in targets if t not in manual)
        return kept[0] if len(kept) == 1 else (kept or None)

    stripped = tuple((name, strip(target)) for name, target in rules_dict(rules).items())
    token = _ACTIVE.set((jax.sharding.get_abstract_mesh(), rules_dict(stripped)))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


# ------------------------------------------------------------------------------------------------
# Collectives of a compiled program (optimized HLO text)
COLLECTIVE_OPS = ("all-reduce", "reduce-scatter", "all-gather", "all-to-all",
                  "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
                "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
                "f8e4m3fn": 1, "f8e5m2": 1}
_COMP_RE = re.compile(r"^(?:ENTRY )?%([\w.\-]+) .*\{\s*$")
_INSTR_RE = re.compile(r"^\s*(?:ROOT )?%[\w.\-]+ = (.*?) ([\w\-]+)\((.*)$")
_CALLEE_RE = re.compile(r"\b(calls|to_apply|body|condition|branch_computations|"
                        r"called_computations)=(\{[^}]*\}|%[\w.\-]+)")
_SHAPE_RE = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]")


def _shapes(type_text: str) -> list[tuple[str, tuple[int, ...]]]:
    out = []
    for dtype, dims in _SHAPE_RE.findall(type_text):
        if dtype in _DTYPE_BYTES:
            out.append((dtype, tuple(int(d) for d in dims.split(",") if d)))
    return out


def _group_size(line: str) -> int:
    """Devices in one replica group of a collective (1 when unknown)."""
    m = re.search(r"replica_groups=mesh\[([^\]]*)\][^{]*\{([^}]*)\}", line)
    if m:
        sizes = dict((k.strip("'"), int(v)) for k, v in
                     (kv.split("=") for kv in m.group(1).split(",") if "=" in kv))
        return math.prod(sizes.get(a.strip().strip("'"), 1) for a in m.group(2).split(",") if a.strip())
    m = re.search(r"replica_groups=\{\{([0-9,]*)\}", line)
    if m:
        return len(m.group(1).split(","))
    m = re.search(r"replica_groups=\[([0-9,]+)\]<=", line)
    if m:
        return int(m.group(1).split(",")[-1])
    return 1


def _trip_from_condition(lines: list[str]) -> int | None:
    """N of a scan-shaped loop condition `ROOT compare(counter, constant(N)), direction=LT`
    (libtpu does not record known_trip_count); None for any other condition."""
    consts = dict(re.findall(r"%([\w.\-]+) = s32\[\]\S* constant\((\d+)\)", "\n".join(lines)))
    for line in lines:
        m = re.match(r"\s*ROOT %\S+ = pred\[\]\S* compare\(%[\w.\-]+, %([\w.\-]+)\), "
                     r"direction=LT", line)
        if m and m.group(1) in consts:
            return int(consts[m.group(1)])
    return None


def hlo_collectives(hlo_text: str) -> list[dict]:
    """Every collective of an optimized HLO module, with where it runs.

    Each entry: `op` (all-reduce, reduce-scatter, all-gather, all-to-all, collective-permute;
    async `-start` forms counted under the same name, `-done` not), `shapes` [(dtype, dims)] of
    its result, `bytes` (the buffer on the full side: the result of an all-reduce or
    all-gather, the operand, result x group, of a reduce-scatter), `group` (devices per replica
    group; 1 moves nothing), `computation`, and `loops`:
    the trip counts of the while loops around it, outermost first (XLA's known_trip_count, or
    N of a `counter < N` condition; None when neither), so that `math.prod(loops)` is how often
    it runs per call.
    """
    comps: dict[str, list[str]] = {}
    entry = None
    cur = None
    for line in hlo_text.splitlines():
        if not line.startswith((" ", "}")):
            m = _COMP_RE.match(line)
            if m:
                cur = m.group(1)
                comps[cur] = []
                if line.startswith("ENTRY "):
                    entry = cur
                continue
        if cur is not None and line.startswith(" "):
            comps[cur].append(line)
    if entry is None:
        raise ValueError("hlo_collectives: no ENTRY computation in the HLO text")
    # callers: computation -> [(caller, trip count or "call")]
    edges: dict[str, list[tuple[str, Any]]] = {}
    for name, lines in comps.items():
        for line in lines:
            m = _INSTR_RE.match(line)
            if not m:
                continue
            trip = None
            if m.group(2) == "while":
                t = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', line)
                cond = re.search(r"condition=%([\w.\-]+)", line)
                trip = (int(t.group(1)) if t else
                        _trip_from_condition(comps.get(cond.group(1), [])) if cond else None)
            for kind, callees in _CALLEE_RE.findall(line):
                for callee in re.findall(r"%([\w.\-]+)", callees):
                    edges.setdefault(callee, []).append(
                        (name, trip if (m.group(2) == "while" and kind == "body") else "call"))
    contexts: dict[str, list[tuple]] = {}

    def loops_of(name: str, seen=()) -> list[tuple]:
        if name == entry:
            return [()]
        if name in contexts:
            return contexts[name]
        out = []
        for caller, how in edges.get(name, []):
            if caller in seen:
                continue
            for ctx in loops_of(caller, seen + (name,)):
                out.append(ctx if how == "call" else ctx + (how,))
        contexts[name] = out = sorted(set(out), key=len) or [()]
        return out

    found = []
    for name, lines in comps.items():
        for line in lines:
            m = _INSTR_RE.match(line)
            if not m:
                continue
            op = m.group(2).removesuffix("-start")
            if op not in COLLECTIVE_OPS or m.group(2).endswith("-done"):
                continue
            shapes = _shapes(m.group(1))
            if m.group(2).endswith("-start") and op != "all-reduce" and len(shapes) > 1:
                shapes = shapes[len(shapes) // 2:]  # (operands, results) tuple: the results
            group = _group_size(line)
            nbytes = sum(_DTYPE_BYTES[d] * math.prod(s) for d, s in shapes)
            if op == "reduce-scatter":
                nbytes *= group
            for ctx in loops_of(name):
                found.append({"op": op, "shapes": shapes, "bytes": nbytes, "group": group,
                              "computation": name, "loops": list(ctx)})
    return found
