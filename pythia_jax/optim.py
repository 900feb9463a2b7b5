"""Pythia's optimizer: the GPT-NeoX v1.0 LR schedule, AdamW with a weight-decay mask, clipping.

Reference doc section 3:

- Schedule (`AnnealingLR`, NeoX v1.0): with scheduler count n, warmup W and decay length E,
  ``lr = peak * n / W`` while ``n <= W`` (the first update uses lr 0), then
  ``n' = min(n, E - W) - W`` and ``lr = max(min_lr, peak * 0.5 * (1 + cos(pi * n' / E)))``.
  The cosine's period is E (not E - W), so it hits the floor before the end of the run.
- Adam(0.9, 0.95, eps 1e-8) in AdamW mode (decoupled decay, bias-corrected moments); weight
  decay 0.1 on weights only: kernels and both embeddings, not biases or LayerNorm parameters.
- Global-norm gradient clipping at 1.0.
- A step whose gradients are not finite is skipped (parameters and optimizer state unchanged,
  so, as with DeepSpeed's fp16 overflow handling, the LR schedule does not advance) and counted.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

__all__ = ["pythia_schedule", "pythia_lr", "make_optimizer", "weight_decay_mask",
           "current_lr", "nonfinite_counts", "OptimConfigError"]

#: Parameter leaf names that receive weight decay (Dense kernels, embed_in / embed_out tables).
DECAYED_LEAVES = ("kernel", "embedding")


class OptimConfigError(ValueError):
    """An optimizer / schedule setting that cannot work."""


def pythia_lr(n: float, peak_lr: float, min_lr: float, warmup_steps: int,
              decay_steps: int) -> float:
    """The NeoX v1.0 formula in plain Python floats (the test oracle; also used for logging)."""
    W, E = warmup_steps, decay_steps
    if W > 0 and n <= W:
        return peak_lr * n / W
    n_ = min(n, E - W) - W
    return max(min_lr, peak_lr * 0.5 * (1.0 + math.cos(math.pi * n_ / E)))


def pythia_schedule(peak_lr: float, min_lr: float, warmup_steps: int,
                    decay_steps: int) -> optax.Schedule:
    """An optax schedule reproducing GPT-NeoX v1.0's `AnnealingLR` (cosine style) exactly.

    `count` is the number of optimizer updates applied so far (0 for the first update).
    """
    if not (peak_lr >= 0 and min_lr >= 0 and math.isfinite(peak_lr) and math.isfinite(min_lr)):
        raise OptimConfigError(f"optim.peak_lr / optim.min_lr: expected finite numbers >= 0, "
                               f"got {peak_lr}, {min_lr}")
    if warmup_steps < 0 or decay_steps <= 0:
        raise OptimConfigError(f"optim.warmup_steps >= 0 and optim.decay_steps > 0 expected, got "
                               f"{warmup_steps}, {decay_steps}")
    if warmup_steps >= decay_steps:
        raise OptimConfigError(f"optim.warmup_steps ({warmup_steps}) must be smaller than "
                               f"optim.decay_steps ({decay_steps})")
    W, E = int(warmup_steps), int(decay_steps)

    def schedule(count):
        # Integer arithmetic for the step bookkeeping; float32 only for the final ratio.
        n = jnp.asarray(count, jnp.int32)
        warm = peak_lr * (n.astype(jnp.float32) / max(W, 1))
        n_ = jnp.minimum(n, E - W) - W
        cos = peak_lr * 0.5 * (1.0 + jnp.cos(jnp.pi * (n_.astype(jnp.float32) / E)))
        decayed = jnp.maximum(jnp.float32(min_lr), cos)
        if W == 0:
            return decayed.astype(jnp.float32)
        return jnp.where(n <= W, warm, decayed).astype(jnp.float32)

    return schedule


def _leaf_name(path) -> str:
    last = path[-1]
    for attr in ("key", "name", "idx"):
        if hasattr(last, attr):
            return str(getattr(last, attr))
    return str(last)


def weight_decay_mask(params) -> Any:
    """True for kernels and embeddings, False for biases and LayerNorm scale / bias.

    Works on a pure dict of arrays (what the train state holds); the leaf names are the ones
    `GPTNeoX` uses (`kernel`, `embedding`, `bias`, `scale`).
    """
    def decide(path, _):
        name = _leaf_name(path)
        if name in DECAYED_LEAVES:
            return True
        if name in ("bias", "scale"):
            return False
        raise OptimConfigError(f"weight-decay mask: unexpected parameter "
                               f"{jax.tree_util.keystr(path)}; expected leaves named "
                               f"{DECAYED_LEAVES + ('bias', 'scale')}")
    return jax.tree_util.tree_map_with_path(decide, params)


def make_optimizer(optim_cfg) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """`(tx, schedule)` from the `config.optim` section.

    tx = apply_if_finite(chain(clip_by_global_norm, scale_by_adam, add_decayed_weights[mask],
    scale_by_learning_rate[schedule])). Equal to torch.optim.AdamW (decoupled decay multiplied
    by the LR) after torch's `clip_grad_norm_`.
    """
    c = optim_cfg
    schedule = pythia_schedule(float(c.peak_lr), float(c.min_lr), int(c.warmup_steps),
                               int(c.decay_steps))
    parts = []
    if c.grad_clip and c.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(float(c.grad_clip)))
    parts += [
        optax.scale_by_adam(b1=float(c.b1), b2=float(c.b2), eps=float(c.eps)),
        optax.add_decayed_weights(float(c.weight_decay), mask=weight_decay_mask),
        optax.scale_by_learning_rate(schedule),
    ]
    tx = optax.chain(*parts)
    if c.get("skip_nonfinite", True):
        tx = optax.apply_if_finite(tx, max_consecutive_errors=int(
            c.get("max_consecutive_nonfinite", 2**30)))
    return tx, schedule


def _find(state, cls):
    found = []

    def visit(x):
        if isinstance(x, cls):
            found.append(x)
            return True
        return False
    jax.tree_util.tree_flatten(state, is_leaf=visit)
    return found


def current_lr(opt_state, schedule: Callable) -> jax.Array:
    """The LR the *next* update will use (from the schedule's own update counter)."""
    st = _find(opt_state, optax.ScaleByScheduleState)
    if not st:
        raise ValueError("optimizer state has no ScaleByScheduleState")
    return schedule(st[0].count)


def nonfinite_counts(opt_state) -> dict:
    """{'total': skipped updates so far, 'consecutive': current streak, 'last_finite': bool}."""
    st = _find(opt_state, optax.ApplyIfFiniteState)
    if not st:
        z = jnp.zeros([], jnp.int32)
        return {"total": z, "consecutive": z, "last_finite": jnp.array(True)}
    s = st[0]
    return {"total": s.total_notfinite, "consecutive": s.notfinite_count,
            "last_finite": s.last_finite}
