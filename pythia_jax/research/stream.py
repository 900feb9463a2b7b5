"""Pythia's training stream as a research object: which step read a row, a step's rows, and what
one update changed on its own batch.

Pre-shuffled stream (reference doc 4.3): item i is the i-th training sample; training iteration
k (0-indexed) read items [k B, (k + 1) B) with B = 1024, and checkpoint `stepN` is the state
after N updates, i.e. it has been trained on items [0, N B). So row r

    was read by iteration  batch_index(r) = r // B
    is first seen by       checkpoint step_of_row(r) = r // B + 1   (the update that used it)

and `step_loss_delta(before=ckpt N-1, after=ckpt N, data, step=N)` is the loss of update N's
batch (iteration N - 1: rows [(N-1) B, N B)) just before and just after that update.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

from pythia_jax.configs.pythia import PYTHIA_EXTRA_SAVE_STEPS
from pythia_jax.data.order import PYTHIA_BATCH_SIZE, PYTHIA_SEQ_LEN, PythiaOrder
from pythia_jax.evaluate import TokenScorer

__all__ = ["PYTHIA_CHECKPOINT_STEPS", "batch_index", "batch_rows", "step_of_row",
           "first_checkpoint_with", "StepLossDelta", "batch_loss", "step_loss_delta"]

#: The 154 steps every Pythia model has a hub branch `step{N}` for (reference doc 5.1).
PYTHIA_CHECKPOINT_STEPS: tuple[int, ...] = (
    tuple(PYTHIA_EXTRA_SAVE_STEPS) + tuple(range(1000, 143001, 1000)))


def _nonneg(x, what: str) -> int:
    if isinstance(x, bool) or not isinstance(x, (int, np.integer)) or x < 0:
        raise ValueError(f"{what}: expected a non-negative integer, got {x!r}")
    return int(x)


def _bs(batch_size) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
            or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
    return int(batch_size)


def batch_index(row: int, batch_size: int = PYTHIA_BATCH_SIZE) -> int:
    """The 0-indexed training iteration whose batch held `row` (`row // batch_size`)."""
    return _nonneg(row, "row") // _bs(batch_size)


def batch_rows(index: int, batch_size: int = PYTHIA_BATCH_SIZE) -> range:
    """Rows (dataset items) of iteration `index`'s batch."""
    b = _bs(batch_size)
    k = _nonneg(index, "index")
    return range(k * b, (k + 1) * b)


def step_of_row(row: int, batch_size: int = PYTHIA_BATCH_SIZE) -> int:
    """The update that trained on `row` = the first checkpoint step that has seen it."""
    return batch_index(row, batch_size) + 1


def first_checkpoint_with(row: int, steps: Sequence[int] = PYTHIA_CHECKPOINT_STEPS,
                          batch_size: int = PYTHIA_BATCH_SIZE) -> int | None:
    """The earliest saved checkpoint (of `steps`, default Pythia's 154) trained on `row`;
    None when every saved step precedes it."""
    need = step_of_row(row, batch_size)
    later = [int(s) for s in steps if int(s) >= need]
    return min(later) if later else None


@dataclasses.dataclass
class StepLossDelta:
    """Mean token cross-entropy (nats) of update `step`'s batch before and after it, and per
    row (`rows`: the dataset items)."""
    step: int
    rows: range
    loss_before: float
    loss_after: float
    row_loss_before: np.ndarray
    row_loss_after: np.ndarray

    @property
    def delta(self) -> float:
        """loss_after - loss_before (negative: the update lowered its own batch's loss)."""
        return self.loss_after - self.loss_before


def batch_loss(model, data, index: int, *, batch_size: int = PYTHIA_BATCH_SIZE,
               seq_len: int = PYTHIA_SEQ_LEN, rows_per_call: int = 4) -> tuple[float, np.ndarray]:
    """(mean token loss, per-row mean loss) of iteration `index`'s batch: inputs row[:-1],
    targets row[1:], float32 log-softmax over the full padded vocabulary (the training loss)."""
    order = data if isinstance(data, PythiaOrder) else PythiaOrder(data, batch_size, seq_len)
    batch = np.asarray(order.batch(_nonneg(index, "index")), np.int64)
    rows = [(r[:-1], r[1:], np.ones(len(r) - 1, bool)) for r in batch]
    T = order.seq_len
    scorer = TokenScorer(model, max_length=T, batch_size=rows_per_call,
                         max_batch_tokens=rows_per_call * max(16, 1 << (T - 1).bit_length()))
    lp, _, counts = scorer.score_rows(rows)
    return float(-lp.sum() / counts.sum()), -lp / counts


def step_loss_delta(before, after, data, step: int, *, batch_size: int = PYTHIA_BATCH_SIZE,
                    seq_len: int = PYTHIA_SEQ_LEN, rows_per_call: int = 4) -> StepLossDelta:
    """Loss of update `step`'s batch (rows [(step-1) B, step B)) under `before` (checkpoint
    step-1) and `after` (checkpoint step): what that one update changed on its own data.
    Both models must share a config, so the scoring program compiles once."""
    step = _nonneg(step, "step")
    if step < 1:
        raise ValueError("step: expected >= 1 (update `step` turns checkpoint step-1 into "
                         "checkpoint step; checkpoint 0 is the initialization)")
    if before.config != after.config:
        raise ValueError("before/after: the two checkpoints have different model configs")
    order = data if isinstance(data, PythiaOrder) else PythiaOrder(data, batch_size, seq_len)
    lb, rb = batch_loss(before, order, step - 1, rows_per_call=rows_per_call)
    la, ra = batch_loss(after, order, step - 1, rows_per_call=rows_per_call)
    if not (math.isfinite(lb) and math.isfinite(la)):
        raise FloatingPointError(f"step {step}: non-finite loss ({lb}, {la})")
    return StepLossDelta(step, batch_rows(step - 1, order.batch_size), lb, la, rb, ra)
