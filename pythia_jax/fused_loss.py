"""The output layer fused with the cross-entropy: Pallas TPU (Mosaic) kernels, forward, backward.

    loss = fused_cross_entropy(hidden_TD, embed_VD, targets_T)        # mean over tokens
    per_token = fused_cross_entropy(..., reduction="none")

equals `train.cross_entropy(einsum("td,vd->tv", hidden, embed, preferred_element_type=f32),
targets)` without ever writing the [tokens, vocab] float32 logits to HBM (6.6 GB for one
16 x 2048-token microbatch at Pythia's padded vocabulary of 50304).

Algorithm (tiles of `block_t` tokens x `block_v` vocabulary rows; matmuls on the MXU in the
inputs' dtype with float32 accumulation, everything elementwise in float32). The target's logit
is one gathered embedding row per token, dotted with its hidden state in XLA (T x D work).

* Forward, grid (token tiles, vocab tiles): the hidden tile stays resident while the last
  ("arbitrary") grid axis walks the vocabulary. Each step computes the logits tile
  h @ E_tile^T (bt, bv) in VMEM and folds it into an online logsumexp (running max m and sum l,
  lane-replicated (bt, 128) float32 scratch, as in our flash attention). The last vocab step
  writes lse = m + log(l) as a (1, bt) row of a [1, T] float32 array. Under differentiation
  (`dh_in_forward`, the default) the same walk accumulates softmax @ E flash style (E is keys
  and values: acc = acc * exp(m_old - m_new) + exp(s - m_new) @ E_tile), so that
  dhidden_t = g_t (softmax_t @ E - E[target_t]) needs no second pass over the vocabulary.
* Backward (`jax.custom_vjp`; residuals: hidden, embed, targets, lse, softmax @ E). With g the
  per-token cotangent and P = exp(logits - lse), dlogits = g (P - onehot(target)):
  - dembed kernel, grid (vocab tiles, token tiles): dE += dlogits_tile^T @ h_tile on transposed
    (bv, bt) tiles (E_tile @ h_tile^T recomputed), so the lse, g and target rows broadcast along
    sublanes; the (bv, D) float32 accumulator is resident across the token walk;
  - `dh_in_forward=False`: a dhidden kernel, grid (token tiles, vocab tiles), dh += dlogits_tile
    @ E_tile with the logits recomputed once more, instead of the forward's softmax @ E.
  FLOPs: 4 + 4 T V D (2 + 4 + 4 with the dhidden kernel) against XLA's 6 for the plain einsum +
  cross-entropy, which instead writes and re-reads [T, V] float32 arrays.
* `store_probs=True`: the forward also writes exp(logits - running max) [T, V] in the inputs'
  dtype and the running max of each vocab tile; the dembed kernel reads them (softmax =
  stored * exp(m_j - lse); the target's entry from the float32 target logit) instead of
  recomputing the logits: 4 + 2 T V D FLOPs, a [T, V] bf16 residual.
* Sizes: tokens and vocabulary are zero-padded to multiples of the blocks (padded vocabulary
  columns are masked to a finite -0.7 * f32max before the logsumexp, padded tokens get a zero
  cotangent); the blocks must be positive multiples of 128 (the (8, 128) tile rule: tokens are
  the lane axis of the [1, T] rows). The hidden width D is taken whole.
* Every `pallas_call` carries a `pl.CostEstimate` (FLOPs of its matmuls, one exp per logit, the
  HBM bytes its BlockSpecs move), so XLA's TPU cost model prices it.

With `interpret=None` the kernels run in Pallas interpret mode when traced for CPU and as Mosaic
kernels when traced for TPU (`pythia_jax.attention.target.current_platform`);
`interpret_mode()` forces interpret mode wherever traced (tests of the train step on CPU).
`sharded_cross_entropy` is the training loss's entry point: under an active mesh it runs the
kernel inside `jax.shard_map`, tokens split over the batch axes, the embedding whole.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import PartitionSpec

from pythia_jax.attention.target import current_platform

__all__ = ["fused_cross_entropy", "sharded_cross_entropy", "FusedLossError", "default_blocks",
           "vmem_bytes", "interpret_mode", "kernel_available", "BLOCK_MULTIPLE",
           "VMEM_BUDGET_BYTES", "DEFAULT_BLOCK_T", "DEFAULT_BLOCK_V"]

logger = logging.getLogger("pythia_jax")

#: Finite mask value for padded vocabulary columns: exp(MASK - m) underflows to 0, no NaN.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
NUM_LANES = 128
#: Both blocks must be positive multiples of this.
BLOCK_MULTIPLE = 128
#: The largest default blocks; halved (tokens first) until a kernel's VMEM estimate fits.
DEFAULT_BLOCK_T = 1024
DEFAULT_BLOCK_V = 512
#: Budget for the default blocks: v5e's (and v4's) default scoped VMEM is 16 MiB per kernel;
#: `vmem_bytes` is an estimate, so leave a quarter for Mosaic's own temporaries.
VMEM_BUDGET_BYTES = 12 * 1024 * 1024

_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_NN = (((1,), (0,)), ((), ()))  # a @ b


class FusedLossError(ValueError):
    """Shapes or block sizes the fused kernel cannot take (the message names them)."""


# ------------------------------------------------------------------------------------------------
# Interpret mode / availability
_INTERPRET = jax.make_user_context(default_value=None)


@contextlib.contextmanager
def interpret_mode(interpret: Any = True) -> Iterator[None]:
    """Run the fused kernels with Pallas `interpret` (True or `pltpu.InterpretParams`) wherever
    they are traced inside the block, and let the training loss use them on CPU. In JAX's trace
    cache key (a user context), so a step traced without it is not reused."""
    with _INTERPRET(interpret):
        yield


def kernel_available() -> bool:
    """Whether the training loss can use the kernel here: traced for TPU (Mosaic), or inside
    `interpret_mode()`."""
    return _INTERPRET.value is not None or current_platform() == "tpu"


def _resolve_interpret(interpret):
    if interpret is not None:
        return interpret
    if _INTERPRET.value is not None:
        return _INTERPRET.value
    platform = current_platform()
    if platform == "cpu":
        return True
    if platform != "tpu":
        raise FusedLossError(f"fused_cross_entropy is a TPU (Mosaic) kernel; the target platform "
                             f"is {platform!r}. Use the plain loss there, or interpret=True.")
    return False


# ------------------------------------------------------------------------------------------------
# Blocks and VMEM
def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def vmem_bytes(block_t: int, block_v: int, D: int, itemsize: int) -> dict:
    """Estimated VMEM bytes of each kernel at these blocks: its double-buffered BlockSpec tiles,
    its scratch and 1.5 float32 (bt, bv) tiles of temporaries (logits, exp; Mosaic streams
    much of the elementwise work), plus for float32 inputs the bf16 splits of HIGHEST-precision
    matmuls. Checked against the VMEM the v5e compiler allocated (bench/RESULTS.md,
    tests/test_fused_loss.py): at or above it for every kernel measured."""
    bt, bv = block_t, block_v
    tile = 3 * bt * bv * 2  # 1.5 float32 tiles
    if itemsize == 4:  # float32 matmuls at HIGHEST precision: bf16 splits of the operands
        tile += (bt + bv) * D * 4 + 2 * bt * bv * 4
    rows = 2 * 8 * bt * 4   # a double-buffered (1, bt) float32 row pads to 8 sublanes
    lanes = bt * NUM_LANES * 4  # one lane-replicated (bt, 128) float32 scratch
    return {
        "fwd": 2 * (bt + bv) * D * itemsize + 2 * lanes + tile + rows,
        "fwd_pe": (2 * (bt + bv) * D * itemsize + 2 * bt * D * 4 + bt * D * 4 + 2 * lanes
                   + tile + rows),
        "dh": 2 * (2 * bt + bv) * D * itemsize + bt * D * 4 + tile + 3 * rows,
        "de": 2 * (bt + 2 * bv) * D * itemsize + bv * D * 4 + tile + 3 * rows,
        # store_probs: the forward also writes a (bt, bv) probability tile and a (1, bt) row
        # per step; the dembed kernel reads them instead of the embedding tile
        "fwd_store": 2 * (bt + bv) * D * itemsize + 2 * lanes + tile + 2 * rows
        + 2 * bt * bv * itemsize,
        "fwd_pe_store": (2 * (bt + bv) * D * itemsize + 2 * bt * D * 4 + bt * D * 4 + 2 * lanes
                         + tile + 2 * rows + 2 * bt * bv * itemsize),
        "de_stored": (2 * (bt + bv) * D * itemsize + 2 * bt * bv * itemsize + bv * D * 4 + tile
                      + 6 * rows),
    }


def _kernels(dh_in_forward: bool, store_probs: bool = False) -> tuple[str, ...]:
    fwd = ("fwd_pe" if dh_in_forward else "fwd") + ("_store" if store_probs else "")
    return (("fwd", fwd, "de_stored" if store_probs else "de")
            + (() if dh_in_forward else ("dh",)))


def default_blocks(T: int, V: int, D: int, dtype, dh_in_forward: bool = True,
                   store_probs: bool = False) -> tuple[int, int]:
    """(block_t, block_v): DEFAULT_BLOCK_T and DEFAULT_BLOCK_V clipped to the padded sizes (for the
    vocabulary: the largest multiple of 128 up to DEFAULT_BLOCK_V that divides V, if it is at
    least half of it, so no padding: 384 for Pythia's 50304 = 131 x 384), then halved (the
    larger first, not below 128) until the `vmem_bytes` of every kernel that runs fits
    VMEM_BUDGET_BYTES."""
    isz = jnp.dtype(dtype).itemsize
    bt = min(DEFAULT_BLOCK_T, _round_up(T, BLOCK_MULTIPLE))
    bv = min(DEFAULT_BLOCK_V, _round_up(V, BLOCK_MULTIPLE))
    divisors = [b for b in range(BLOCK_MULTIPLE, bv + 1, BLOCK_MULTIPLE) if V % b == 0]
    if divisors and 2 * divisors[-1] >= bv:
        bv = divisors[-1]

    def need(bt, bv):
        used = vmem_bytes(bt, bv, D, isz)
        return max(used[k] for k in _kernels(dh_in_forward, store_probs))

    while need(bt, bv) > VMEM_BUDGET_BYTES:
        if bt > BLOCK_MULTIPLE and bt >= bv:
            bt //= 2
        elif bv > BLOCK_MULTIPLE:
            bv //= 2
        elif bt > BLOCK_MULTIPLE:
            bt //= 2
        else:
            break
    return _round_up(bt, BLOCK_MULTIPLE), _round_up(bv, BLOCK_MULTIPLE)


def _check_block(name: str, value, size_name: str, size: int) -> None:
    if (not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0
            or value % BLOCK_MULTIPLE):
        raise FusedLossError(f"fused_cross_entropy: {name}={value!r} must be a positive multiple "
                             f"of {BLOCK_MULTIPLE} ({size_name}={size}; sizes that are not a "
                             f"multiple of the block are padded)")


# ------------------------------------------------------------------------------------------------
# Static configuration
@dataclasses.dataclass(frozen=True)
class _Static:
    T: int        # tokens, padded to a multiple of bt
    V: int        # the real vocabulary size
    Vp: int       # padded to a multiple of bv
    D: int
    bt: int
    bv: int
    interpret: Any
    dh_in_forward: bool = True
    store_probs: bool = False

    @property
    def nt(self) -> int:
        return self.T // self.bt

    @property
    def nv(self) -> int:
        return self.Vp // self.bv


def _precision(dtype):
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _params():
    return pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary"))


def _column(row_ref):
    """A (1, n) row block as an (n, 1) float32 column (for tiles with tokens on sublanes)."""
    return jnp.expand_dims(row_ref[0].astype(jnp.float32), -1)


def _cost(flops, transcendentals, bytes_accessed):
    return pl.CostEstimate(flops=int(flops), transcendentals=int(transcendentals),
                           bytes_accessed=int(bytes_accessed))


# ------------------------------------------------------------------------------------------------
# Forward: online logsumexp over the vocabulary tiles (and, for the backward, softmax @ E)
def _fwd_kernel(*refs, st: _Static, with_pe: bool, store: bool, prec):
    refs = list(refs)
    h_ref, e_ref, lse_ref = refs[:3]
    pe_ref = refs.pop(3) if with_pe else None
    q_ref, mj_ref = (refs.pop(3), refs.pop(3)) if store else (None, None)
    m_sc, l_sc = refs[3:5]
    acc_sc = refs[5] if with_pe else None
    j = pl.program_id(1)

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, MASK_VALUE, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        if with_pe:
            acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    e = e_ref[...]
    s = lax.dot_general(h_ref[...], e, _NT, preferred_element_type=jnp.float32,
                        precision=prec)  # (bt, bv) logits
    if st.Vp != st.V:
        col = j * st.bv + lax.broadcasted_iota(jnp.int32, s.shape, 1)
        s = jnp.where(col < st.V, s, MASK_VALUE)
    m_prev = m_sc[...]
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))  # (bt, 128)
    p = jnp.exp(s - m_new[:, :1])
    alpha = jnp.exp(m_prev - m_new)
    l_sc[...] = alpha * l_sc[...] + jnp.sum(p, axis=1, keepdims=True)
    m_sc[...] = m_new
    if store:  # exp(logits - running max) and that max: softmax = q * exp(m_j - lse)
        q_ref[...] = p.astype(q_ref.dtype)
        mj_ref[...] = jnp.transpose(m_new)[:1, :]
    if with_pe:  # flash-attention style: E is both the keys and the values
        acc_sc[...] = acc_sc[...] * alpha[:, :1] + lax.dot_general(
            p.astype(e.dtype), e, _NN, preferred_element_type=jnp.float32, precision=prec)

    @pl.when(j == pl.num_programs(1) - 1)
    def _finish():
        l = l_sc[...]
        lse = m_sc[...] + jnp.log(l)  # (bt, 128), lane-replicated
        lse_ref[...] = jnp.transpose(lse)[:1, :]
        if with_pe:
            pe_ref[...] = acc_sc[...] * (1.0 / l)[:, :1]


def _fwd_call(h, e, st: _Static, with_pe: bool, store: bool = False):
    """(lse [1, T] float32, softmax(logits) @ E [T, D] float32 or None, stored probabilities or
    None). `store`: also exp(logits - running max) [T, Vp] in h's dtype and the running max of
    each (vocab tile, token) [nv, 1, T] float32."""
    isz = jnp.dtype(h.dtype).itemsize
    row = pl.BlockSpec((1, st.bt), lambda i, j: (0, i))
    h_spec = pl.BlockSpec((st.bt, st.D), lambda i, j: (i, 0))
    TVD = st.T * st.Vp * st.D
    cost = _cost((4 if with_pe else 2) * TVD, st.T * st.Vp + st.T * st.nv + st.T,
                 isz * (st.T * st.D + st.nt * st.Vp * st.D) + 4 * st.T
                 + (4 * st.T * st.D if with_pe else 0)
                 + ((isz * st.Vp + 4 * st.nv) * st.T if store else 0))
    kernel = functools.partial(_fwd_kernel, st=st, with_pe=with_pe, store=store,
                               prec=_precision(h.dtype))
    out_shape = [jax.ShapeDtypeStruct((1, st.T), jnp.float32)]
    out_specs = [row]
    scratch = [pltpu.VMEM((st.bt, NUM_LANES), jnp.float32) for _ in range(2)]
    if with_pe:
        out_shape.append(jax.ShapeDtypeStruct((st.T, st.D), jnp.float32))
        out_specs.append(h_spec)
        scratch.append(pltpu.VMEM((st.bt, st.D), jnp.float32))
    if store:
        out_shape += [jax.ShapeDtypeStruct((st.T, st.Vp), h.dtype),
                      jax.ShapeDtypeStruct((st.nv, 1, st.T), jnp.float32)]
        out_specs += [pl.BlockSpec((st.bt, st.bv), lambda i, j: (i, j)),
                      pl.BlockSpec((pl.squeezed, 1, st.bt), lambda i, j: (j, 0, i))]
    name = "pythia_fused_ce_fwd" + ("_pe" if with_pe else "") + ("_store" if store else "")
    out = pl.pallas_call(
        kernel, out_shape=out_shape, grid=(st.nt, st.nv),
        in_specs=[h_spec, pl.BlockSpec((st.bv, st.D), lambda i, j: (j, 0))],
        out_specs=out_specs, scratch_shapes=scratch,
        compiler_params=_params(), interpret=st.interpret, cost_estimate=cost, name=name,
    )(h, e)
    out = list(out)
    lse = out.pop(0)
    pe = out.pop(0) if with_pe else None
    stored = (out[0], out[1]) if store else None
    return lse, pe, stored


def _target_logits(h, e, t):
    """logits[target] per token, [1, T] float32: one gathered embedding row per token (XLA);
    bf16 products are exact in float32, so this is the kernel's logit up to summation order."""
    et = jnp.take(e, t[0], axis=0)
    return jnp.sum(h.astype(jnp.float32) * et.astype(jnp.float32), axis=1)[None, :]


# ------------------------------------------------------------------------------------------------
# Backward: dhidden (resident token tile, walks the vocabulary)
def _dh_kernel(h_ref, e_ref, t_ref, lse_ref, g_ref, dh_ref, acc_sc, *, st: _Static, prec):
    j = pl.program_id(1)

    @pl.when(j == 0)
    def _init():
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    e = e_ref[...]
    s = lax.dot_general(h_ref[...], e, _NT, preferred_element_type=jnp.float32,
                        precision=prec)  # (bt, bv)
    col = j * st.bv + lax.broadcasted_iota(jnp.int32, s.shape, 1)
    p = jnp.exp(s - _column(lse_ref))
    if st.Vp != st.V:
        p = jnp.where(col < st.V, p, 0.0)
    onehot = (col.astype(jnp.float32) == _column(t_ref)).astype(jnp.float32)
    ds = _column(g_ref) * (p - onehot)
    acc_sc[...] += lax.dot_general(ds.astype(e.dtype), e, _NN,
                                   preferred_element_type=jnp.float32, precision=prec)

    @pl.when(j == pl.num_programs(1) - 1)
    def _finish():
        dh_ref[...] = acc_sc[...].astype(dh_ref.dtype)


def _dh_call(h, e, t, lse, g, st: _Static):
    isz = jnp.dtype(h.dtype).itemsize
    row = pl.BlockSpec((1, st.bt), lambda i, j: (0, i))
    h_spec = pl.BlockSpec((st.bt, st.D), lambda i, j: (i, 0))
    cost = _cost(4 * st.T * st.Vp * st.D, st.T * st.Vp,
                 isz * (2 * st.T * st.D + st.nt * st.Vp * st.D) + 12 * st.T)
    kernel = functools.partial(_dh_kernel, st=st, prec=_precision(h.dtype))
    return pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct(h.shape, h.dtype), grid=(st.nt, st.nv),
        in_specs=[h_spec, pl.BlockSpec((st.bv, st.D), lambda i, j: (j, 0)), row, row, row],
        out_specs=h_spec, scratch_shapes=[pltpu.VMEM((st.bt, st.D), jnp.float32)],
        compiler_params=_params(), interpret=st.interpret, cost_estimate=cost,
        name="pythia_fused_ce_dh",
    )(h, e, t, lse, g)


# ------------------------------------------------------------------------------------------------
# Backward: dembed (resident vocab tile, walks the tokens; transposed (bv, bt) tiles)
def _de_kernel(h_ref, e_ref, t_ref, lse_ref, g_ref, de_ref, acc_sc, *, st: _Static, prec):
    j, i = pl.program_id(0), pl.program_id(1)

    @pl.when(i == 0)
    def _init():
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    h = h_ref[...]
    s = lax.dot_general(e_ref[...], h, _NT, preferred_element_type=jnp.float32,
                        precision=prec)  # (bv, bt): rows vocabulary, columns tokens
    vocab = j * st.bv + lax.broadcasted_iota(jnp.int32, s.shape, 0)
    p = jnp.exp(s - lse_ref[...])  # padded vocab rows: their dE rows are dropped
    onehot = (vocab.astype(jnp.float32) == t_ref[...].astype(jnp.float32)).astype(jnp.float32)
    ds = g_ref[...] * (p - onehot)
    acc_sc[...] += lax.dot_general(ds.astype(h.dtype), h, _NN,
                                   preferred_element_type=jnp.float32, precision=prec)

    @pl.when(i == pl.num_programs(1) - 1)
    def _finish():
        de_ref[...] = acc_sc[...].astype(de_ref.dtype)


def _de_call(h, e, t, lse, g, st: _Static):
    isz = jnp.dtype(h.dtype).itemsize
    row = pl.BlockSpec((1, st.bt), lambda j, i: (0, i))
    e_spec = pl.BlockSpec((st.bv, st.D), lambda j, i: (j, 0))
    cost = _cost(4 * st.T * st.Vp * st.D, st.T * st.Vp,
                 isz * (2 * st.Vp * st.D + st.nv * st.T * st.D) + 12 * st.T * st.nv)
    kernel = functools.partial(_de_kernel, st=st, prec=_precision(h.dtype))
    return pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct(e.shape, e.dtype), grid=(st.nv, st.nt),
        in_specs=[pl.BlockSpec((st.bt, st.D), lambda j, i: (i, 0)), e_spec, row, row, row],
        out_specs=e_spec, scratch_shapes=[pltpu.VMEM((st.bv, st.D), jnp.float32)],
        compiler_params=_params(), interpret=st.interpret, cost_estimate=cost,
        name="pythia_fused_ce_de",
    )(h, e, t, lse, g)


# ------------------------------------------------------------------------------------------------
# Backward: dembed from the stored probabilities (resident vocab tile, walks the tokens)
def _de_stored_kernel(h_ref, q_ref, mj_ref, lse_ref, g_ref, t_ref, pt_ref, de_ref, acc_sc, *,
                      st: _Static, prec):
    j, i = pl.program_id(0), pl.program_id(1)

    @pl.when(i == 0)
    def _init():
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    h = h_ref[...]
    scale = jnp.exp(_column(mj_ref) - _column(lse_ref))  # (bt, 1)
    p = q_ref[...].astype(jnp.float32) * scale  # (bt, bv) softmax
    col = j * st.bv + lax.broadcasted_iota(jnp.int32, p.shape, 1)
    # the target's entry exactly (p_t - 1 from the float32 target logit), not from q's rounding
    ds = _column(g_ref) * jnp.where(col.astype(jnp.float32) == _column(t_ref),
                                    _column(pt_ref) - 1.0, p)
    acc_sc[...] += lax.dot_general(ds.astype(h.dtype), h, (((0,), (0,)), ((), ())),
                                   preferred_element_type=jnp.float32, precision=prec)

    @pl.when(i == pl.num_programs(1) - 1)
    def _finish():
        de_ref[...] = acc_sc[...].astype(de_ref.dtype)


def _de_stored_call(h, e, t, lse, g, stored, pt, st: _Static):
    q, mj = stored
    isz = jnp.dtype(h.dtype).itemsize
    row = pl.BlockSpec((1, st.bt), lambda j, i: (0, i))
    e_spec = pl.BlockSpec((st.bv, st.D), lambda j, i: (j, 0))
    cost = _cost(2 * st.T * st.Vp * st.D, st.T * st.nv,
                 isz * (st.T * st.Vp + st.Vp * st.D + st.nv * st.T * st.D)
                 + 20 * st.T * st.nv)
    kernel = functools.partial(_de_stored_kernel, st=st, prec=_precision(h.dtype))
    return pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct(e.shape, e.dtype), grid=(st.nv, st.nt),
        in_specs=[pl.BlockSpec((st.bt, st.D), lambda j, i: (i, 0)),
                  pl.BlockSpec((st.bt, st.bv), lambda j, i: (i, j)),
                  pl.BlockSpec((pl.squeezed, 1, st.bt), lambda j, i: (j, 0, i)),
                  row, row, row, row],
        out_specs=e_spec, scratch_shapes=[pltpu.VMEM((st.bv, st.D), jnp.float32)],
        compiler_params=_params(), interpret=st.interpret, cost_estimate=cost,
        name="pythia_fused_ce_de_stored",
    )(h, q, mj, lse, g, t, pt)


# ------------------------------------------------------------------------------------------------
# custom_vjp wiring (padded operands: h [T, D], e [Vp, D], t [1, T] int32 -> loss [1, T] f32)
@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _fused(h, e, t, st: _Static):
    lse, _, _ = _fwd_call(h, e, st, with_pe=False)
    return lse - _target_logits(h, e, t)


def _fused_fwd(h, e, t, st: _Static):
    lse, pe, stored = _fwd_call(h, e, st, with_pe=st.dh_in_forward, store=st.store_probs)
    tgt = _target_logits(h, e, t)
    return lse - tgt, (h, e, t, lse, pe, stored, tgt)


def _fused_bwd(st: _Static, res, g):
    h, e, t, lse, pe, stored, tgt = res
    g = g.astype(jnp.float32)
    if pe is None:
        dh = _dh_call(h, e, t, lse, g, st)
    else:  # d loss_t / d h_t = softmax_t @ E - E[target_t], computed in the forward
        et = jnp.take(e, t[0], axis=0).astype(jnp.float32)
        dh = (g[0][:, None] * (pe - et)).astype(h.dtype)
    if stored is None:
        de = _de_call(h, e, t, lse, g, st)
    else:
        de = _de_stored_call(h, e, t, lse, g, stored, jnp.exp(tgt - lse), st)
    return dh, de, np.zeros(t.shape, jax.dtypes.float0)


_fused.defvjp(_fused_fwd, _fused_bwd)


def fused_cross_entropy(hidden, embed_VD, targets, *, block_t: int | None = None,
                        block_v: int | None = None, reduction: str = "mean", interpret=None,
                        dh_in_forward: bool = True, store_probs: bool = False):
    """Cross-entropy of the logits `hidden @ embed_VD.T` (float32 accumulation) against
    `targets`, without materialising the logits: `reduction="mean"` (a float32 scalar, the mean
    over all tokens, as `train.cross_entropy`) or "none" (float32 per-token losses, targets'
    shape).

    hidden [..., D] (bf16 or float32; `embed_VD` is cast to its dtype), embed_VD [V, D],
    targets [...] integer ids in [0, V). Blocks default to `default_blocks`; explicit ones
    must be positive multiples of 128; tokens and vocabulary that are not multiples of them are
    padded. Differentiable in hidden and embed_VD (`jax.custom_vjp`: reverse mode only).

    `dh_in_forward` (default True): under differentiation the forward kernel also accumulates
    softmax(logits) @ E (flash-attention style; a [T, D] float32 residual), so dhidden =
    g (softmax @ E - E[target]) needs no second pass over the vocabulary: 4 + 4 T V D FLOPs in
    all instead of 2 + 4 + 4 with the separate dhidden kernel (False).

    `store_probs` (default False): the forward also writes exp(logits - running max) in the
    inputs' dtype ([T, V]: half the plain path's fp32 logits for bf16) with the running max per
    vocabulary tile, and the dembed kernel reads them instead of recomputing the logits
    (4 + 2 T V D FLOPs, the plain path's 6; the target's entry is taken exactly from the
    float32 target logit)."""
    if reduction not in ("mean", "none"):
        raise FusedLossError(f"fused_cross_entropy: reduction must be 'mean' or 'none', got "
                             f"{reduction!r}")
    if embed_VD.ndim != 2 or hidden.ndim < 1 or hidden.shape[-1] != embed_VD.shape[1]:
        raise FusedLossError(f"fused_cross_entropy: expected hidden [..., D] and embed [V, D], "
                             f"got {tuple(hidden.shape)} and {tuple(embed_VD.shape)}")
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise FusedLossError(f"fused_cross_entropy: targets {tuple(targets.shape)} must be "
                             f"hidden's leading shape {tuple(hidden.shape[:-1])}")
    if not jnp.issubdtype(targets.dtype, jnp.integer):
        raise FusedLossError(f"fused_cross_entropy: targets must be integer ids, got "
                             f"{targets.dtype}")
    V, D = embed_VD.shape
    if V >= 2**24:
        raise FusedLossError(f"fused_cross_entropy: vocabulary size V={V} must be < 2**24 "
                             f"(ids are compared in float32)")
    lead = tuple(hidden.shape[:-1])
    N = int(np.prod(lead)) if lead else 1
    if N == 0:
        raise FusedLossError("fused_cross_entropy: no tokens")
    bt_d, bv_d = default_blocks(N, V, D, hidden.dtype, dh_in_forward, store_probs)
    if block_t is None:
        block_t = bt_d
    else:
        _check_block("block_t", block_t, "tokens", N)
    if block_v is None:
        block_v = bv_d
    else:
        _check_block("block_v", block_v, "V", V)
    bt, bv = int(block_t), int(block_v)
    T, Vp = _round_up(N, bt), _round_up(V, bv)
    st = _Static(T=T, V=V, Vp=Vp, D=D, bt=bt, bv=bv, interpret=_resolve_interpret(interpret),
                 dh_in_forward=bool(dh_in_forward), store_probs=bool(store_probs))

    h = hidden.reshape(N, D)
    e = embed_VD.astype(hidden.dtype)
    t = targets.reshape(1, N).astype(jnp.int32)
    if T != N:
        h = jnp.pad(h, ((0, T - N), (0, 0)))
        t = jnp.pad(t, ((0, 0), (0, T - N)))
    if Vp != V:
        e = jnp.pad(e, ((0, Vp - V), (0, 0)))
    loss = _fused(h, e, t, st)[0, :N]
    if reduction == "mean":
        return jnp.mean(loss)
    return loss.reshape(lead)


# ------------------------------------------------------------------------------------------------
# The training loss's entry point (mesh-aware)
def sharded_cross_entropy(hidden_BTD, embed_VD, targets_BT, **kwargs):
    """Mean `fused_cross_entropy` of [B, T, D] hidden states. Under an active mesh
    (`sharding.logical_rules`) the kernel runs per shard inside `jax.shard_map`: tokens split
    as the `batch` rule says, the embedding whole (gathered), the mean taken over the per-token
    losses of all shards. Returns None where the mesh splits the vocabulary (`tensor` > 1: a
    vocab-parallel variant is not written) so the caller uses the plain loss."""
    from pythia_jax.sharding import active_mesh, logical_to_spec

    fn = functools.partial(fused_cross_entropy, reduction="none", **kwargs)
    mesh = active_mesh()
    if mesh is None:
        return jnp.mean(fn(hidden_BTD, embed_VD, targets_BT))
    if mesh.shape.get("tensor", 1) > 1:
        logger.warning("train.fused_loss: the mesh splits the vocabulary over tensor=%d "
                       "devices, which the fused kernel does not handle; using the plain loss",
                       mesh.shape["tensor"])
        return None
    batch = logical_to_spec(("batch", "length", "act_embed"))[0]
    x_spec, t_spec = PartitionSpec(batch, None, None), PartitionSpec(batch, None)
    per_token = jax.shard_map(fn, mesh=mesh, in_specs=(x_spec, PartitionSpec(), t_spec),
                              out_specs=t_spec, check_vma=False)(hidden_BTD, embed_VD,
                                                                 targets_BT)
    return jnp.mean(per_token)
