"""Logical axis names -> mesh axes (data, fsdp, tensor).

Parameters and activations carry logical names (`vocab`, `embed`, `heads`, …); one table maps
them to the three mesh axes. Outside an active `logical_rules(mesh)` context every helper here is
the identity, so the model runs unchanged on one device.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

#: logical name -> mesh axis (or tuple of mesh axes, or None = replicated)
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("head_dim", None),
    ("qkv", None),
    ("mlp", "tensor"),
    ("layers", None),
    ("norm", None),
    # activations
    ("batch", ("data", "fsdp")),
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


def logical_to_spec(axes: Sequence[str | None], rules=None) -> PartitionSpec:
    """Map a tuple of logical names to a PartitionSpec with the given (or active) rules."""
    if rules is None:
        active = _ACTIVE.get()
        rules = active[1] if active else rules_dict()
    elif not isinstance(rules, dict):
        rules = dict(rules)
    used: set[str] = set()
    out = []
    for name in axes:
        if name is None:
            out.append(None)
            continue
        if name not in rules:
            raise KeyError(f"logical axis {name!r} has no sharding rule; known: {sorted(rules)}")
        target = rules[name]
        targets = (target,) if isinstance(target, str) else tuple(target or ())
        # A mesh axis may shard only one dimension of an array.
        targets = tuple(t for t in targets if t not in used)
        used.update(targets)
        out.append(targets[0] if len(targets) == 1 else (targets or None))
    return PartitionSpec(*out)


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
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(axes, rules)))
