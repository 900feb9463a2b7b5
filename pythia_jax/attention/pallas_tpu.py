"""Our Pallas TPU (Mosaic) flash attention: forward, dQ and dK/dV kernels, optional fused rotary.

Public entry points:

    pallas_attention(q_BTNH, k_BSNH, v_BSNH, *, causal=True, rotary=None, block_sizes=None,
                     interpret=None, return_lse=False)
    flash_attention(q_BNTH, k_BNSH, v_BNSH, ...)          # same, head-major layout
    check_supported(q_shape, k_shape, ...)                 # raises UnsupportedShapeError

Algorithm (FlashAttention-2 style, written for the TPU's (8, 128) tiling):

* Forward: grid (B, N, T/bq, S/bk). q, o and the f32 accumulators stay resident while the last
  ("arbitrary") grid axis walks the kv blocks. Online softmax with the running max m and sum l
  kept lane-replicated as (bq, 128) f32; p is cast to v's dtype for the PV matmul, accumulation
  is f32. The logsumexp m + log(l) is written once per q block as a (1, bq) row of a [B, N, 1, T]
  f32 array (one value per query, no 128x lane replication in HBM).
* Causal skipping: the kv index map clamps every block above the diagonal to the last block the
  q block needs, so the pipeline sees an unchanged block index and issues no DMA for it; compute
  is guarded with `pl.when`. Inside a kv block the work is split into compute chunks of
  `block_kv_compute` columns: chunks entirely above the diagonal are skipped, chunks entirely
  below it run without any mask arithmetic, and only chunks crossing the diagonal build the
  iota mask. Large DMA blocks thus do not cost large causal waste.
* Backward: residuals are q, k, v, o and the lse row. `di = rowsum(o * do)` is computed in XLA
  for the head-major layout and by a small kernel of its own for the flat ones (each o and do
  tile read once, one row per head out), minus the lse cotangent in XLA (so a differentiated
  lse is handled exactly). The dK/dV kernel walks
  q blocks for a resident kv block and works on transposed score tiles (bk, bq) so the lse and di
  rows broadcast along sublanes; its q-block index map clamps the blocks below the needed range
  (no DMA). The dQ kernel walks kv blocks for a resident q block (same clamp as the forward).
  All non-reduction grid axes are "parallel", so megacore chips (v4, v5p) split them over both
  TensorCores, the backward included. With the packed layout the gradient is one [B, T, 3D]
  array written in place: the dK/dV kernel copies each finished dk and dv tile by DMA into the
  k and v thirds of its HBM output (two column blocks a third of the row apart, which no one
  BlockSpec names), and the dQ kernel takes that array aliased and writes the q third through
  its ordinary output BlockSpec. No concatenation of dq, dk, dv reaches XLA. With the QKV bias
  as an operand (packed layout) every kernel adds its rows to the q, k, v tiles it loads, and
  the backward kernels also write the column sums of each finished dq, dk, dv block: the bias
  gradient is the sum of those few rows, not a reduction of the [B, T, 3D] gradient.
* Fused rotary (optional): `rotary=(cos_BTR, sin_BTR)` float32 tables (NeoX rotate-half over the
  first R channels of each head). q and k go in un-rotated; each kernel fetches the table rows of
  its q / kv block (positions = block offset + row) with the same index maps as q / k and rotates
  in f32 before the matmuls: q once per resident q block, k per chunk in the forward and dQ
  kernels, k once per resident kv block in the dK/dV kernel. The backward rotates the gradients
  back with the transposed rotation, so dq and dk are gradients with respect to the un-rotated
  inputs. The tables are treated as constants (`stop_gradient`; they are functions of integer
  positions).

With `interpret=None` the kernels run in Pallas interpret mode when traced for CPU and as Mosaic
kernels when traced for TPU (`pythia_jax.attention.target`: this process's backend, or the
platform of an enclosing `target_platform(...)`); pass `interpret=True` /
`pltpu.InterpretParams(...)` / `False` to override.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pythia_jax.attention.target import resolve_interpret

__all__ = [
    "BlockSizes",
    "UnsupportedShapeError",
    "check_supported",
    "flash_attention",
    "pallas_attention",
    "pallas_attention_packed",
    "heads_per_block",
    "SEQ_MULTIPLE",
    "MAX_HEAD_DIM",
]

#: Finite mask value: exp(MASK - m) underflows to 0 without inf - inf = NaN.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
NUM_LANES = 128
#: The most heads one lane block of the flat layouts holds (each is unrolled in the kernels;
#: every head_dim that is a multiple of HEAD_DIM_MULTIPLE needs at most 8).
MAX_HEADS_PER_BLOCK = 8
#: Every sequence length (q and kv) must be a multiple of this.
SEQ_MULTIPLE = 128
#: head_dim must be a multiple of HEAD_DIM_MULTIPLE and at most MAX_HEAD_DIM.
HEAD_DIM_MULTIPLE = 16
MAX_HEAD_DIM = 256

_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_NN = (((1,), (0,)), ((), ()))  # a @ b


class UnsupportedShapeError(ValueError):
    """The Pallas kernel cannot handle these shapes / block sizes (message names the rule)."""


# ------------------------------------------------------------------------------------------------
# Block sizes
@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes (all multiples of 128). `*_compute` split a DMA block into compute chunks.

    Defaults are clipped to the sequence length: a default that does not divide the length is
    halved until it does (every length here is a multiple of 128). Explicit values must divide
    the length, else `UnsupportedShapeError`.
    """

    block_q: int | None = None
    block_kv: int | None = None
    block_kv_compute: int | None = None
    block_q_dkv: int | None = None
    block_kv_dkv: int | None = None
    block_q_dkv_compute: int | None = None
    block_q_dq: int | None = None
    block_kv_dq: int | None = None
    block_kv_dq_compute: int | None = None

    #: The defaults (chosen for T = 2048; see docs/attention.md).
    DEFAULTS = dict(block_q=512, block_kv=1024, block_kv_compute=256,
                    block_q_dkv=512, block_kv_dkv=512, block_q_dkv_compute=256,
                    block_q_dq=512, block_kv_dq=1024, block_kv_dq_compute=256)

    @classmethod
    def uniform(cls, block: int, compute: int | None = None) -> "BlockSizes":
        """Every block = `block`, every compute chunk = `compute` (default: `block`)."""
        c = compute or block
        return cls(block, block, c, block, block, c, block, block, c)

    def resolve(self, T: int, S: int) -> "BlockSizes":
        """Concrete sizes for query length T and key length S (validated)."""
        seq_of = {"block_q": T, "block_kv": S, "block_kv_compute": S, "block_q_dkv": T,
                  "block_kv_dkv": S, "block_q_dkv_compute": T, "block_q_dq": T,
                  "block_kv_dq": S, "block_kv_dq_compute": S}
        parent = {"block_kv_compute": "block_kv", "block_q_dkv_compute": "block_q_dkv",
                  "block_kv_dq_compute": "block_kv_dq"}
        out = {}
        for f in ("block_q", "block_kv", "block_q_dkv", "block_kv_dkv", "block_q_dq",
                  "block_kv_dq", "block_kv_compute", "block_q_dkv_compute",
                  "block_kv_dq_compute"):
            length = seq_of[f]
            limit = out[parent[f]] if f in parent else length
            v = getattr(self, f)
            if v is None:
                v = min(self.DEFAULTS[f], limit)
                while limit % v:
                    v //= 2
            else:
                if not isinstance(v, int) or v <= 0 or v % SEQ_MULTIPLE:
                    raise UnsupportedShapeError(
                        f"BlockSizes.{f}: block sizes must be positive multiples of "
                        f"{SEQ_MULTIPLE}, got {v!r}")
                if limit % v:
                    what = f"BlockSizes.{parent[f]}={limit}" if f in parent else f"length {length}"
                    raise UnsupportedShapeError(
                        f"BlockSizes.{f}={v} must divide {what}")
            out[f] = v
        return BlockSizes(**out)


# ------------------------------------------------------------------------------------------------
# Validation
def check_supported(q_shape, k_shape, *, rotary_dim: int | None = None, causal: bool = True,
                    block_sizes: BlockSizes | None = None, layout: str = "BTNH") -> BlockSizes:
    """Raise `UnsupportedShapeError` naming the violated constraint; return resolved blocks."""
    if len(q_shape) != 4 or len(k_shape) != 4:
        raise UnsupportedShapeError(f"pallas attention: expected rank-4 q and k, got {q_shape} "
                                    f"and {k_shape}")
    if layout == "BTNH":
        B, T, N, H = q_shape
        Bk, S, Nk, Hk = k_shape
    else:
        B, N, T, H = q_shape
        Bk, Nk, S, Hk = k_shape
    if (B, N, H) != (Bk, Nk, Hk):
        raise UnsupportedShapeError(f"pallas attention: q {tuple(q_shape)} and k "
                                    f"{tuple(k_shape)} differ in batch, heads or head_dim")
    if T % SEQ_MULTIPLE or T == 0:
        raise UnsupportedShapeError(
            f"pallas attention: the query length must be a positive multiple of {SEQ_MULTIPLE}, "
            f"got {T}")
    if S % SEQ_MULTIPLE or S == 0:
        raise UnsupportedShapeError(
            f"pallas attention: the key length must be a positive multiple of {SEQ_MULTIPLE}, "
            f"got {S}")
    if causal and S < T:
        raise UnsupportedShapeError(f"pallas attention: causal needs key length >= query length "
                                    f"(queries are the last T keys), got T={T}, S={S}")
    if H % HEAD_DIM_MULTIPLE or not 0 < H <= MAX_HEAD_DIM:
        raise UnsupportedShapeError(
            f"pallas attention: head_dim must be a multiple of {HEAD_DIM_MULTIPLE} in "
            f"[{HEAD_DIM_MULTIPLE}, {MAX_HEAD_DIM}], got {H}")
    if rotary_dim is not None:
        if rotary_dim % 2 or not 0 < rotary_dim <= H:
            raise UnsupportedShapeError(
                f"pallas attention: fused rotary needs an even rotary dim in (0, head_dim={H}], "
                f"got {rotary_dim}")
        if causal and S != T:
            raise UnsupportedShapeError(
                f"pallas attention: fused rotary needs key length == query length, got T={T}, "
                f"S={S}")
    return (block_sizes or BlockSizes()).resolve(T, S)


# ------------------------------------------------------------------------------------------------
# Static configuration shared by the kernels
@dataclasses.dataclass(frozen=True)
class _Static:
    causal: bool
    scale: float
    blocks: BlockSizes
    interpret: Any
    rotary: bool
    T: int
    S: int
    N: int = 1
    H: int = 0
    #: "BNTH": arrays [B, N, T, H]; "BTNH": arrays [B, T, N*H] (the model's layout with the head
    #: axes merged, no transposes); "packed": q, k and v are the three thirds of one
    #: [B, T, 3*N*H] array (the QKV projection's output as it comes out of the matmul), indexed
    #: in place. The flat layouts take G heads per lane block of width G*H (`G` below).
    layout: str = "BNTH"
    #: heads per block: 1 for "BNTH"; for the flat layouts the block of the merged axis must
    #: be a multiple of 128 lanes, so lcm(H, 128) // H heads share one (`heads_per_block`):
    #: 128 // H when H divides 128 (head_dim 64: 2, each head masked to its lanes), else
    #: (head_dim 80: 8 heads in 640 lanes) each head is sliced out of the block (`sliced`).
    G: int = 1
    #: layout "packed" only: the QKV bias [1, 3*N*H] f32 is an operand; each kernel adds its
    #: rows to the q, k, v tiles it loads, and the backward kernels return its gradient as
    #: per-block column sums of dq, dk, dv (no reduction of the [B, T, 3D] gradient in XLA).
    bias: bool = False

    @property
    def offset(self) -> int:  # queries are the last T of the S keys
        return self.S - self.T

    @property
    def W(self) -> int:
        """Lane width of a q/k/v tile: G heads of H channels."""
        return self.G * self.H

    @property
    def groups(self) -> int:
        """The grid's head axis: head groups of G."""
        return self.N // self.G

    @property
    def sliced(self) -> bool:
        """Whether each head of a block is sliced out of it (its H lanes, an (n, H) tile for
        the matmuls) rather than masked to its lanes of the whole block: when a block holds
        several heads and H does not divide 128, masking would multiply the matmul passes
        (head_dim 80: a 640-lane contraction per head instead of one of 80)."""
        return self.G > 1 and NUM_LANES % self.H != 0

    @property
    def Wh(self) -> int:
        """Lane width of one head's share of a tile: H when sliced, else the block's W."""
        return self.H if self.sliced else self.W

    def x_spec(self, rows, index, part: int = 0):
        """BlockSpec of a (rows, W) tile of a q/k/v-like array; index(*grid) -> (b, h, block).
        `part` (layout "packed"): 0, 1, 2 for the q, k, v third of the QKV array."""
        sq = pl.squeezed
        if self.layout == "BNTH":
            def imap(*g):
                b, h, blk = index(*g)
                return b, h, blk, 0
            return pl.BlockSpec((sq, sq, rows, self.H), imap)
        lane0 = part * self.groups if self.layout == "packed" else 0

        def imap_flat(*g):
            b, h, blk = index(*g)
            return b, blk, lane0 + h
        return pl.BlockSpec((sq, rows, self.W), imap_flat)

    def bias_spec(self, index, part: int):
        """BlockSpec of the (1, W) row of the [1, 3D] bias that goes with the q, k or v tile
        (`part` 0, 1, 2) of head group h; index(*grid) -> (b, h, block) as for `x_spec`."""
        def imap(*g):
            return 0, part * self.groups + index(*g)[1]
        return pl.BlockSpec((1, self.W), imap)

    def row_spec(self, rows, index):
        """BlockSpec of the [B, N, 1, T] f32 rows (lse, di): the G heads of a block."""
        def imap(*g):
            b, h, blk = index(*g)
            return b, h, 0, blk
        return pl.BlockSpec((pl.squeezed, self.G, 1, rows), imap)

    def out_shape(self, B, dtype):
        """Shape of o and dq (dk and dv: the same with S for T)."""
        if self.layout == "BNTH":
            return jax.ShapeDtypeStruct((B, self.N, self.T, self.H), dtype)
        return jax.ShapeDtypeStruct((B, self.T, self.N * self.H), dtype)

    def lane_mask(self, g):
        """(1, W) bool: the lanes of head g of a block."""
        lane = lax.broadcasted_iota(jnp.int32, (1, self.W), 1)
        return (lane >= g * self.H) & (lane < (g + 1) * self.H)

    def only(self, g, x):
        """Head g's share of an (n, W) tile x: x itself when a block holds one head; its H
        lanes, (n, H), when `sliced`; else x with every lane outside head g zeroed."""
        if self.G == 1:
            return x
        if self.sliced:
            return x[:, g * self.H:(g + 1) * self.H]
        return jnp.where(self.lane_mask(g), x, jnp.zeros((), x.dtype))

    def share(self, g, x):
        """Head g's operand from a walked (n, W) tile, against a resident per-head copy: its
        slice when `sliced`; else the whole tile (the resident copy's lanes select the head)."""
        return self.only(g, x) if self.sliced else x

    def merge(self, parts):
        """One (n, W) tile from G per-head results (`only`'s shares: each valid on its own
        head's lanes, or each head's (n, H) slice when `sliced`)."""
        if self.G == 1:
            return parts[0]
        if self.sliced:
            return jnp.concatenate(parts, axis=1)
        out = parts[0]
        for g in range(1, self.G):
            out = jnp.where(self.lane_mask(g), parts[g], out)
        return out

    def prep(self, x, bias=None, cos=None, sin=None):
        """A q, k or v tile as the matmuls take it: plus its bias row (a (1, W) f32 ref) when
        given, then rotated when the (n, R) f32 tables are given; in x's dtype."""
        if bias is None and cos is None:
            return x
        y = x.astype(jnp.float32)
        if bias is not None:
            y = y + bias[...]
        if cos is not None:
            y = self.rotate(y, cos, sin)
        return y.astype(x.dtype)

    def fill_heads(self, sc, x, tables=None, bias=None) -> None:
        """Write the resident tile x (plus its `bias` row ref, then rotated when `tables` =
        (cos, sin) refs are given) into the per-head scratch `sc` (G, n, Wh): copy g is
        `only(g, ...)`, head g's share."""
        cos, sin = (None, None) if tables is None else (tables[0][...], tables[1][...])
        x = self.prep(x, bias, cos, sin)
        for g in range(self.G):
            sc[g] = self.only(g, x)

    def rotate(self, x, cos, sin):
        """`_rotate` on every head of an (n, W) f32 tile."""
        if self.G == 1:
            return _rotate(x, cos, sin)
        H = self.H
        return jnp.concatenate([_rotate(x[:, g * H:(g + 1) * H], cos, sin)
                                for g in range(self.G)], axis=1)

    def rotate_t(self, d, cos, sin):
        """`_rotate_t` on every head of an (n, W) f32 tile."""
        if self.G == 1:
            return _rotate_t(d, cos, sin)
        H = self.H
        return jnp.concatenate([_rotate_t(d[:, g * H:(g + 1) * H], cos, sin)
                                for g in range(self.G)], axis=1)


def _precision(dtype):
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _rotate(x, cos, sin):
    """NeoX rotate-half on the first R lanes of f32 x (n, H); cos/sin (n, R) f32."""
    R = cos.shape[-1]
    half = R // 2
    xr = x[:, :R]
    rot = jnp.concatenate([-xr[:, half:], xr[:, :half]], axis=1)
    out = xr * cos + rot * sin
    if R == x.shape[1]:
        return out
    return jnp.concatenate([out, x[:, R:]], axis=1)


def _rotate_t(d, cos, sin):
    """Transpose of `_rotate` applied to a cotangent d (n, H) f32."""
    R = cos.shape[-1]
    half = R // 2
    dr = d[:, :R]
    y = dr * sin
    out = dr * cos + jnp.concatenate([y[:, half:], -y[:, :half]], axis=1)
    if R == d.shape[1]:
        return out
    return jnp.concatenate([out, d[:, R:]], axis=1)


def _compiler_params(n_parallel: int):
    return pltpu.CompilerParams(
        dimension_semantics=("parallel",) * n_parallel + ("arbitrary",))


def _causal_kv_last(i, bq, bk, offset):
    """Index of the last kv block a q block i needs (causal)."""
    return lax.div(i * bq + (bq - 1 + offset), bk)


def _causal_q_first(j, bq, bk, offset):
    """Index of the first q block a kv block j needs (causal)."""
    return lax.div(jnp.maximum(j * bk - offset, 0), bq)


# ------------------------------------------------------------------------------------------------
# Forward kernel
def _lanes_to_row(x):
    """A lane-replicated (n, 128) column as the (1, n) row the [B, N, 1, T] arrays store."""
    return jnp.transpose(x)[:1, :]


def _causal_chunks(n: int, causal: bool, chunk, extent) -> None:
    """Run `chunk(c, masked)` for the n compute chunks of a block. Under causal masking a chunk
    whose keys all lie after its last query is skipped, one whose keys all lie at or before its
    first query runs unmasked, and one crossing the diagonal runs masked. `extent(c)` gives
    (first key column, key count, first query row, query count) of chunk c."""
    for c in range(n):
        if not causal:
            chunk(c, False)
            continue
        col0, ncols, row0, nrows = extent(c)
        needed = col0 <= row0 + (nrows - 1)
        unmasked = col0 + (ncols - 1) <= row0
        pl.when(needed & unmasked)(functools.partial(chunk, c, False))
        pl.when(needed & jnp.logical_not(unmasked))(functools.partial(chunk, c, True))


def _take(refs: list, n: int, present: bool = True) -> list:
    """The first n of a kernel's `refs`, removed from the list (n Nones when not `present`)."""
    if not present:
        return [None] * n
    out = refs[:n]
    del refs[:n]
    return out


def _fwd_kernel(*refs, st: _Static, bq: int, bk: int, bkc: int, prec):
    refs = list(refs)
    q_ref, k_ref, v_ref = _take(refs, 3)
    qc_ref, qs_ref, kc_ref, ks_ref = _take(refs, 4, st.rotary)
    qb_ref, kb_ref, vb_ref = _take(refs, 3, st.bias)
    o_ref, lse_ref, m_sc, l_sc, acc_sc = _take(refs, 5)
    q_sc = refs  # [] or the per-head copies of the resident q tile
    i, j = pl.program_id(2), pl.program_id(3)
    G = st.G

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, MASK_VALUE, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)
        if q_sc:  # q biased, rotated and/or cut to each head's lanes, once per q block
            st.fill_heads(q_sc[0], q_ref[...], (qc_ref, qs_ref) if st.rotary else None, qb_ref)

    row0 = i * bq + st.offset  # key position of the block's first query

    def chunk(c, masked):
        sl = pl.ds(c * bkc, bkc)
        k = st.prep(k_ref[sl, :], kb_ref, *((kc_ref[sl, :], ks_ref[sl, :]) if st.rotary else ()))
        v = st.prep(v_ref[sl, :], vb_ref)
        for g in range(G):  # the lanes of the other heads of q are zero: s is head g's
            q = q_sc[0][g] if q_sc else q_ref[...]
            s = lax.dot_general(q, st.share(g, k), _NT, preferred_element_type=jnp.float32,
                                precision=prec)
            s = s * st.scale
            if masked:
                row = row0 + lax.broadcasted_iota(jnp.int32, s.shape, 0)
                col = j * bk + c * bkc + lax.broadcasted_iota(jnp.int32, s.shape, 1)
                s = jnp.where(col <= row, s, MASK_VALUE)
            m_prev = m_sc[g]
            m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))  # (bq, 128)
            p = jnp.exp(s - m_new[:, :1])
            alpha = jnp.exp(m_prev - m_new)
            l_sc[g] = alpha * l_sc[g] + jnp.sum(p, axis=1, keepdims=True)
            m_sc[g] = m_new
            pv = lax.dot_general(p.astype(v.dtype), st.share(g, v), _NN,
                                 preferred_element_type=jnp.float32,
                                 precision=prec)  # (bq, Wh): head g's share
            acc_sc[g] = acc_sc[g] * alpha[:, :1] + pv

    # key chunk c covers columns col0..col0+bkc-1 against query rows row0..row0+bq-1
    _causal_chunks(bk // bkc, st.causal, chunk,
                   lambda c: (j * bk + c * bkc, bkc, row0, bq))

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        outs = []
        for g in range(G):
            l = l_sc[g]
            outs.append(acc_sc[g] * (1.0 / l)[:, :1])
            lse = m_sc[g] + jnp.log(l)  # (bq, 128), lane-replicated
            lse_ref[g] = _lanes_to_row(lse)
        o_ref[...] = st.merge(outs).astype(o_ref.dtype)


def _q_scratch(st: _Static, rows: int, dtype):
    """Per-head copies of a resident tile (biased and / or rotated when fused, cut to one
    head's lanes when a block holds several): none when the tile is used as it comes."""
    if st.G == 1 and not st.rotary and not st.bias:
        return []
    return [pltpu.VMEM((st.G, rows, st.Wh), dtype)]


def _fwd_call(q, k, v, rot, st: _Static, bias=None):
    B, N, T, S, H = q.shape[0], st.N, st.T, st.S, st.H
    NG = st.groups
    bl = st.blocks
    bq, bk, bkc = bl.block_q, bl.block_kv, bl.block_kv_compute
    nq, nk = T // bq, S // bk
    if st.causal:
        def kv_map(b, h, i, j):
            return b, h, jnp.minimum(j, _causal_kv_last(i, bq, bk, st.offset))
    else:
        def kv_map(b, h, i, j):
            return b, h, j
    sq = pl.squeezed
    q_spec = st.x_spec(bq, lambda b, h, i, j: (b, h, i))
    in_specs = [q_spec, st.x_spec(bk, kv_map, 1), st.x_spec(bk, kv_map, 2)]
    args = [q, k, v]
    G = st.G
    scratch = [pltpu.VMEM((G, bq, NUM_LANES), jnp.float32),
               pltpu.VMEM((G, bq, NUM_LANES), jnp.float32),
               pltpu.VMEM((G, bq, st.Wh), jnp.float32)] + _q_scratch(st, bq, q.dtype)
    if st.rotary:
        cos, sin = rot
        R = cos.shape[-1]
        q_tab = pl.BlockSpec((sq, bq, R), lambda b, h, i, j: (b, i, 0))
        k_tab = pl.BlockSpec((sq, bk, R), lambda b, h, i, j: (b, kv_map(b, h, i, j)[2], 0))
        in_specs += [q_tab, q_tab, k_tab, k_tab]
        args += [cos, sin, cos, sin]
    if st.bias:
        in_specs += [st.bias_spec(lambda b, h, i, j: (b, h, i), part) for part in range(3)]
        args += [bias] * 3
    out_shape = [st.out_shape(B, q.dtype), jax.ShapeDtypeStruct((B, N, 1, T), jnp.float32)]
    out_specs = [q_spec, st.row_spec(bq, lambda b, h, i, j: (b, h, i))]
    kernel = functools.partial(_fwd_kernel, st=st, bq=bq, bk=bk, bkc=bkc,
                               prec=_precision(q.dtype))
    frac = _causal_fraction(T, S) if st.causal else 1.0
    itemsize = jnp.dtype(q.dtype).itemsize
    rot_cost = bias_cost = (0, 0)
    kv_seq, ran = _grid_walk(nq, nk, lambda i, j: _kv_block(i, j, bq, bk, st),
                             lambda i, j: _chunks_run(i, j, bq, bk, bkc, st, kv_walk=True))
    if st.rotary:  # q once per q block; k per compute chunk that runs
        rot_cost = _rotary_cost(B, N, R, rotated_rows=T + ran * bkc, groups=NG,
                                tables=[(bq, [i for i in range(nq) for _ in range(nk)]),
                                        (bk, kv_seq)])
    if st.bias:  # q once per q block; k and v per compute chunk that runs
        bias_cost = _bias_cost(B, N, H, biased_rows=T + 2 * ran * bkc)
    cost = _cost(4 * B * N * T * S * H * frac, B * N * T * S * frac,
                 itemsize * B * N * H * (2 * T + 2 * S * max(1, nq * frac)) + 4 * B * N * T,
                 rot_cost, bias_cost)
    o, lse = pl.pallas_call(
        kernel, out_shape=out_shape, grid=(B, NG, nq, nk), in_specs=in_specs,
        out_specs=out_specs, scratch_shapes=scratch, compiler_params=_compiler_params(3),
        interpret=st.interpret, cost_estimate=cost, name="pythia_flash_fwd",
    )(*args)
    return o, lse


def _causal_fraction(T, S):
    """Fraction of the T x S score matrix on or below the (offset) diagonal."""
    off = S - T
    visible = T * off + T * (T + 1) / 2
    return visible / (T * S)


# ------------------------------------------------------------------------------------------------
# The fused rotary's share of each kernel's cost estimate
#: FLOPs per rotated element: x * cos + rotate_half(x) * sin is two multiplies and an add per
#: rotary channel (the half swap and its sign flip are moves); the transposed rotation of a
#: gradient (`_rotate_t`) counts the same.
ROTARY_FLOPS_PER_ELEMENT = 3
#: HBM bytes per fetched table row and rotary channel: the cos and the sin table, f32.
ROTARY_TABLE_BYTES = 8


def _kv_block(i: int, j: int, bq: int, bk: int, st: "_Static") -> int:
    """The kv block the forward / dQ index maps give at step (i, j), in Python ints."""
    return min(j, (i * bq + bq - 1 + st.offset) // bk) if st.causal else j


def _q_block(j: int, i: int, bq: int, bk: int, st: "_Static") -> int:
    """The q block the dK/dV index maps give at step (j, i), in Python ints."""
    return max(i, max(j * bk - st.offset, 0) // bq) if st.causal else i


def _chunks_run(r, w, b_res, b_walk, chunk, st: "_Static", *, kv_walk: bool) -> int:
    """How many compute chunks run at grid step (resident block r, walked block w), by the rule
    of `_causal_chunks`: all of them without causal masking, else those not entirely above the
    diagonal. kv_walk: resident q blocks walking kv blocks in key chunks (forward, dQ); else
    resident kv blocks walking q blocks in query chunks (dK/dV)."""
    n = b_walk // chunk
    if not st.causal:
        return n
    if kv_walk:  # chunk c: keys w*b_walk + c*chunk.. against queries up to row_last
        row_last = r * b_res + b_res - 1 + st.offset
        return sum(1 for c in range(n) if w * b_walk + c * chunk <= row_last)
    col0 = r * b_res  # first key of the resident block against the chunk's last query
    return sum(1 for c in range(n) if col0 <= w * b_walk + c * chunk + chunk - 1 + st.offset)


def _grid_walk(n_res: int, n_walk: int, walk_index, chunks):
    """One (batch, head) of a kernel whose last grid axis walks `n_walk` blocks for each of
    `n_res` resident blocks: the walked block's index in grid order (what its index map returns,
    clamped) and how many compute chunks run (`chunks(r, w)` at step (r, w))."""
    seq, ran = [], 0
    for r in range(n_res):
        for w in range(n_walk):
            seq.append(walk_index(r, w))
            ran += chunks(r, w)
    return seq, ran


def _table_fetches(seq, B: int, N: int) -> int:
    """Block fetches of a rotary table whose index follows `seq` in every (batch, head): the
    pipeline copies a block only when its index changes from one grid step to the next, and a
    table's index has no head component (a head's walk may start on the block the previous
    head's ended on; a new batch row always fetches)."""
    def changes(prev):
        n = 0
        for idx in seq:
            n += idx != prev
            prev = idx
        return n
    return B * (changes(None) + (N - 1) * changes(seq[-1]))


def _rotary_cost(B, N, R, *, rotated_rows, tables, groups):
    """(flops, bytes) of the fused rotary: `rotated_rows` rows of R channels rotated per (batch,
    head); `tables`: (block rows, index sequence) of each table BlockSpec pair (cos + sin),
    fetched once per grid head (`groups`: head groups of G heads sharing a block)."""
    flops = ROTARY_FLOPS_PER_ELEMENT * R * B * N * rotated_rows
    rows = sum(block * _table_fetches(seq, B, groups) for block, seq in tables)
    return flops, ROTARY_TABLE_BYTES * R * rows


def _bias_cost(B, N, H, *, biased_rows, summed_rows=0, partials=0):
    """(flops, bytes) of the fused QKV bias, per (batch, head): `biased_rows` rows of H channels
    get their bias row added (one add each), the three (1, H) f32 bias rows are read once (their
    block index changes only with the head), `summed_rows` gradient rows are summed (one add
    each) into `partials` f32 rows of column sums written back."""
    return B * N * H * (biased_rows + summed_rows), 4 * B * N * H * (3 + partials)


def _cost(flops, transcendentals, bytes_accessed, rotary=(0, 0), bias=(0, 0)):
    return pl.CostEstimate(flops=int(flops) + rotary[0] + bias[0],
                           transcendentals=int(transcendentals),
                           bytes_accessed=int(bytes_accessed) + rotary[1] + bias[1])


# ------------------------------------------------------------------------------------------------
# di = rowsum(o * do) per head, for the flat layouts: [B, T, N*H] tiles in, [B, N, 1, T] rows out.
def _di_kernel(o_ref, do_ref, di_ref, *, st: _Static):
    prod = o_ref[...].astype(jnp.float32) * do_ref[...].astype(jnp.float32)  # (bt, W)
    for g in range(st.G):  # head g's lanes summed, the column turned into a row
        col = jnp.sum(st.only(g, prod), axis=1, keepdims=True)  # (bt, 1)
        di_ref[g] = _lanes_to_row(jnp.broadcast_to(col, (col.shape[0], NUM_LANES)))


def _di_call(o, do, st: _Static):
    """rowsum(o * do) of each head as the backward kernels read it, [B, N, 1, T] f32. XLA's
    version of it, on a flat [B, T, N*H] layout at head_dim < 128, materialises the f32 product
    in a transposed layout to reduce 64-lane groups; here each tile is read once."""
    B, N, T, H = o.shape[0], st.N, st.T, st.H
    bt = st.blocks.block_q_dkv
    spec = st.x_spec(bt, lambda b, h, i: (b, h, i))
    return pl.pallas_call(
        functools.partial(_di_kernel, st=st),
        out_shape=jax.ShapeDtypeStruct((B, N, 1, T), jnp.float32),
        grid=(B, st.groups, T // bt), in_specs=[spec, spec],
        out_specs=st.row_spec(bt, lambda b, h, i: (b, h, i)),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",) * 3),
        interpret=st.interpret, name="pythia_flash_di",
        cost_estimate=_cost(2 * B * T * N * H, 0,
                            2 * jnp.dtype(o.dtype).itemsize * B * T * N * H + 4 * B * N * T),
    )(o, do)


# ------------------------------------------------------------------------------------------------
# dQ kernel: resident q block, walks kv blocks.
def _dq_kernel(*refs, st: _Static, bq: int, bk: int, bkc: int, prec):
    G = st.G
    refs = list(refs)
    q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref = _take(refs, 6)
    qc_ref, qs_ref, kc_ref, ks_ref = _take(refs, 4, st.rotary)
    qb_ref, kb_ref, vb_ref = _take(refs, 3, st.bias)
    # packed: the aliased [B, T, 3D] gradient buffer (dk and dv are in it already; dq_ref
    # is its q third)
    _take(refs, 1, st.layout == "packed")
    dq_ref, db_ref, dq_sc = _take(refs, 1) + _take(refs, 1, st.bias) + _take(refs, 1)
    q_sc, = _take(refs, 1, st.rotary or G > 1 or st.bias)
    do_sc, = _take(refs, 1, G > 1)
    i, j = pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)
        if q_sc is not None:
            st.fill_heads(q_sc, q_ref[...], (qc_ref, qs_ref) if st.rotary else None, qb_ref)
        if do_sc is not None:
            st.fill_heads(do_sc, do_ref[...])

    row0 = i * bq + st.offset

    def chunk(c, masked):
        sl = pl.ds(c * bkc, bkc)
        k = st.prep(k_ref[sl, :], kb_ref, *((kc_ref[sl, :], ks_ref[sl, :]) if st.rotary else ()))
        v = st.prep(v_ref[sl, :], vb_ref)
        for g in range(G):
            q = q_ref[...] if q_sc is None else q_sc[g]
            do = do_ref[...] if do_sc is None else do_sc[g]
            lse = jnp.expand_dims(lse_ref[g, 0], -1)  # (bq, 1)
            di = jnp.expand_dims(di_ref[g, 0], -1)
            kg, vg = st.share(g, k), st.share(g, v)
            s = lax.dot_general(q, kg, _NT, preferred_element_type=jnp.float32, precision=prec)
            s = s * st.scale
            if masked:
                row = row0 + lax.broadcasted_iota(jnp.int32, s.shape, 0)
                col = j * bk + c * bkc + lax.broadcasted_iota(jnp.int32, s.shape, 1)
                s = jnp.where(col <= row, s, MASK_VALUE)
            p = jnp.exp(s - lse)
            dp = lax.dot_general(do, vg, _NT, preferred_element_type=jnp.float32, precision=prec)
            ds = p * (dp - di)
            dq_sc[g] += lax.dot_general(ds.astype(k.dtype), kg, _NN,
                                        preferred_element_type=jnp.float32, precision=prec)

    # key chunk c covers columns col0..col0+bkc-1 against query rows row0..row0+bq-1
    _causal_chunks(bk // bkc, st.causal, chunk,
                   lambda c: (j * bk + c * bkc, bkc, row0, bq))

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        dq = st.merge([dq_sc[g] for g in range(G)]) * st.scale
        if st.rotary:
            dq = st.rotate_t(dq, qc_ref[...], qs_ref[...])
        dq_ref[...] = dq.astype(dq_ref.dtype)
        if st.bias:  # this q block's share of the q bias gradient
            db_ref[...] = jnp.sum(dq, axis=0, keepdims=True)


def _dq_call(q, k, v, do, lse, di, rot, st: _Static, into=None, bias=None):
    B, N, T, S, H = q.shape[0], st.N, st.T, st.S, st.H
    NG, G, W = st.groups, st.G, st.W
    bl = st.blocks
    bq, bk, bkc = bl.block_q_dq, bl.block_kv_dq, bl.block_kv_dq_compute
    nq, nk = T // bq, S // bk
    if st.causal:
        def kv_map(b, h, i, j):
            return b, h, jnp.minimum(j, _causal_kv_last(i, bq, bk, st.offset))
    else:
        def kv_map(b, h, i, j):
            return b, h, j
    sq = pl.squeezed
    q_spec = st.x_spec(bq, lambda b, h, i, j: (b, h, i))
    row_spec = st.row_spec(bq, lambda b, h, i, j: (b, h, i))
    # do (like o, dq) is an array of its own: part 0 of a packed layout is its plain index
    in_specs = [q_spec, st.x_spec(bk, kv_map, 1), st.x_spec(bk, kv_map, 2), q_spec, row_spec,
                row_spec]
    args = [q, k, v, do, lse, di]
    scratch = [pltpu.VMEM((G, bq, st.Wh), jnp.float32)] + _q_scratch(st, bq, q.dtype)
    if G > 1:  # do cut to each head's lanes
        scratch.append(pltpu.VMEM((G, bq, st.Wh), q.dtype))
    if st.rotary:
        cos, sin = rot
        R = cos.shape[-1]
        q_tab = pl.BlockSpec((sq, bq, R), lambda b, h, i, j: (b, i, 0))
        k_tab = pl.BlockSpec((sq, bk, R), lambda b, h, i, j: (b, kv_map(b, h, i, j)[2], 0))
        in_specs += [q_tab, q_tab, k_tab, k_tab]
        args += [cos, sin, cos, sin]
    if st.bias:
        in_specs += [st.bias_spec(lambda b, h, i, j: (b, h, i), part) for part in range(3)]
        args += [bias] * 3
    out_shape, aliases = st.out_shape(B, q.dtype), {}
    if into is not None:  # dq into the q third of the packed gradient buffer (q_spec's blocks)
        out_shape, aliases = jax.ShapeDtypeStruct(into.shape, into.dtype), {len(args): 0}
        in_specs.append(pl.BlockSpec(memory_space=pl.ANY))
        args.append(into)
    out_specs = q_spec
    if st.bias:  # column sums of each q block's dq: [B, T / bq, 1, D] f32
        out_shape = [out_shape, jax.ShapeDtypeStruct((B, nq, 1, N * H), jnp.float32)]
        out_specs = [q_spec, pl.BlockSpec((sq, sq, 1, W), lambda b, h, i, j: (b, i, 0, h))]
    kernel = functools.partial(_dq_kernel, st=st, bq=bq, bk=bk, bkc=bkc,
                               prec=_precision(q.dtype))
    frac = _causal_fraction(T, S) if st.causal else 1.0
    itemsize = jnp.dtype(q.dtype).itemsize
    rot_cost = bias_cost = (0, 0)
    kv_seq, ran = _grid_walk(nq, nk, lambda i, j: _kv_block(i, j, bq, bk, st),
                             lambda i, j: _chunks_run(i, j, bq, bk, bkc, st, kv_walk=True))
    if st.rotary:  # q once and dq back once per q block; k per compute chunk that runs
        rot_cost = _rotary_cost(B, N, R, rotated_rows=2 * T + ran * bkc, groups=NG,
                                tables=[(bq, [i for i in range(nq) for _ in range(nk)]),
                                        (bk, kv_seq)])
    if st.bias:  # q once per q block, k and v per chunk; dq summed once per q block
        bias_cost = _bias_cost(B, N, H, biased_rows=T + 2 * ran * bkc, summed_rows=T,
                               partials=nq)
    cost = _cost(6 * B * N * T * S * H * frac, B * N * T * S * frac,
                 itemsize * B * N * H * (3 * T + 2 * S * max(1, nq * frac)) + 8 * B * N * T,
                 rot_cost, bias_cost)
    return pl.pallas_call(
        kernel, out_shape=out_shape, grid=(B, NG, nq, nk), in_specs=in_specs,
        out_specs=out_specs, scratch_shapes=scratch, input_output_aliases=aliases,
        compiler_params=_compiler_params(3), interpret=st.interpret, cost_estimate=cost,
        name="pythia_flash_dq",
    )(*args)


# ------------------------------------------------------------------------------------------------
# dK/dV kernel: resident kv block, walks q blocks; transposed (bk, bq) score tiles.
def _dkv_kernel(*refs, st: _Static, bq: int, bk: int, bqc: int, prec):
    packed = st.layout == "packed"
    G = st.G
    refs = list(refs)
    q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref = _take(refs, 6)
    qc_ref, qs_ref, kc_ref, ks_ref = _take(refs, 4, st.rotary)
    qb_ref, kb_ref, vb_ref = _take(refs, 3, st.bias)
    # packed: one output in HBM, [B, S, 3D], which dk and dv are copied into
    dqkv_hbm, = _take(refs, 1, packed)
    dk_ref, dv_ref = _take(refs, 2, not packed)
    db_ref, = _take(refs, 1, st.bias)
    dk_sc, dv_sc = _take(refs, 2)
    k_sc, = _take(refs, 1, st.rotary or G > 1 or st.bias)
    v_sc, = _take(refs, 1, G > 1 or st.bias)
    stage, sems = _take(refs, 2, packed)  # the staging tile and the DMA semaphores
    b, h = pl.program_id(0), pl.program_id(1)  # (read here: interpret mode needs it)
    j, i = pl.program_id(2), pl.program_id(3)

    @pl.when(i == 0)
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)
        if k_sc is not None:
            st.fill_heads(k_sc, k_ref[...], (kc_ref, ks_ref) if st.rotary else None, kb_ref)
        if v_sc is not None:
            st.fill_heads(v_sc, v_ref[...], None, vb_ref)

    col0 = j * bk  # position of the block's first key

    def chunk(c, masked):
        sl = pl.ds(c * bqc, bqc)
        q = st.prep(q_ref[sl, :], qb_ref, *((qc_ref[sl, :], qs_ref[sl, :]) if st.rotary else ()))
        do = do_ref[sl, :]
        for g in range(G):
            k = k_ref[...] if k_sc is None else k_sc[g]
            v = v_ref[...] if v_sc is None else v_sc[g]
            lse = lse_ref[g, :, c * bqc:(c + 1) * bqc]  # (1, bqc)
            di = di_ref[g, :, c * bqc:(c + 1) * bqc]
            qg, dog = st.share(g, q), st.share(g, do)
            s = lax.dot_general(k, qg, _NT, preferred_element_type=jnp.float32, precision=prec)
            s = s * st.scale  # (bk, bqc): rows are keys, columns queries
            if masked:
                key = col0 + lax.broadcasted_iota(jnp.int32, s.shape, 0)
                qpos = i * bq + c * bqc + st.offset + lax.broadcasted_iota(jnp.int32, s.shape, 1)
                s = jnp.where(key <= qpos, s, MASK_VALUE)
            p = jnp.exp(s - lse)
            dv_sc[g] += lax.dot_general(p.astype(do.dtype), dog, _NN,
                                        preferred_element_type=jnp.float32, precision=prec)
            dp = lax.dot_general(v, dog, _NT, preferred_element_type=jnp.float32, precision=prec)
            ds = p * (dp - di)
            dk_sc[g] += lax.dot_general(ds.astype(q.dtype), qg, _NN,
                                        preferred_element_type=jnp.float32, precision=prec)

    # query chunk c covers rows q0..q0+bqc-1 against key columns col0..col0+bk-1
    _causal_chunks(bq // bqc, st.causal, chunk,
                   lambda c: (col0, bk, i * bq + c * bqc + st.offset, bqc))

    @pl.when(i == pl.num_programs(3) - 1)
    def _finish():
        dk = st.merge([dk_sc[g] for g in range(G)]) * st.scale
        if st.rotary:
            dk = st.rotate_t(dk, kc_ref[...], ks_ref[...])
        dv = st.merge([dv_sc[g] for g in range(G)])
        if st.bias:  # this kv block's share of the k and v bias gradients
            db_ref[pl.ds(0, 1), :] = jnp.sum(dk, axis=0, keepdims=True)
            db_ref[pl.ds(1, 1), :] = jnp.sum(dv, axis=0, keepdims=True)
        if not packed:
            dk_ref[...] = dk.astype(dk_ref.dtype)
            dv_ref[...] = dv.astype(dv_ref.dtype)
            return
        # dk and dv go to the k and v thirds of the one gradient array: two column blocks a
        # third of the row apart, which one BlockSpec cannot name, so they are copied out here
        # (dk's copy runs while dv is cast and staged).
        rows = pl.ds(j * bk, bk)
        copies = []
        for part, x in ((1, dk), (2, dv)):
            stage[part - 1] = x.astype(stage.dtype)
            cols = pl.ds((part * st.groups + h) * st.W, st.W)
            copies.append(pltpu.make_async_copy(stage.at[part - 1], dqkv_hbm.at[b, rows, cols],
                                                sems.at[part - 1]))
            copies[-1].start()
        for c in copies:
            c.wait()


def _dkv_call(q, k, v, do, lse, di, rot, st: _Static, bias=None):
    B, N, T, S, H = q.shape[0], st.N, st.T, st.S, st.H
    NG, G, W = st.groups, st.G, st.W
    bl = st.blocks
    bq, bk, bqc = bl.block_q_dkv, bl.block_kv_dkv, bl.block_q_dkv_compute
    nq, nk = T // bq, S // bk
    if st.causal:
        def q_index(j, i):
            return jnp.maximum(i, _causal_q_first(j, bq, bk, st.offset))
    else:
        def q_index(j, i):
            return i
    sq = pl.squeezed
    q_spec = st.x_spec(bq, lambda b, h, j, i: (b, h, q_index(j, i)))
    out_spec = st.x_spec(bk, lambda b, h, j, i: (b, h, j))  # dk, dv: arrays of their own
    row_spec = st.row_spec(bq, lambda b, h, j, i: (b, h, q_index(j, i)))
    in_specs = [q_spec, st.x_spec(bk, lambda b, h, j, i: (b, h, j), 1),
                st.x_spec(bk, lambda b, h, j, i: (b, h, j), 2), q_spec, row_spec, row_spec]
    args = [q, k, v, do, lse, di]
    Wh = st.Wh
    scratch = ([pltpu.VMEM((G, bk, Wh), jnp.float32), pltpu.VMEM((G, bk, Wh), jnp.float32)]
               + _q_scratch(st, bk, k.dtype))
    if G > 1 or st.bias:  # v biased and / or cut to each head's lanes
        scratch.append(pltpu.VMEM((G, bk, Wh), v.dtype))
    packed = st.layout == "packed"
    if packed:  # the staging tile of dk, dv and the semaphores of their copies to HBM
        scratch += [pltpu.VMEM((2, bk, W), k.dtype), pltpu.SemaphoreType.DMA((2,))]
    if st.rotary:
        cos, sin = rot
        R = cos.shape[-1]
        q_tab = pl.BlockSpec((sq, bq, R), lambda b, h, j, i: (b, q_index(j, i), 0))
        k_tab = pl.BlockSpec((sq, bk, R), lambda b, h, j, i: (b, j, 0))
        in_specs += [q_tab, q_tab, k_tab, k_tab]
        args += [cos, sin, cos, sin]
    if st.bias:
        in_specs += [st.bias_spec(lambda b, h, j, i: (b, h, j), part) for part in range(3)]
        args += [bias] * 3
    kernel = functools.partial(_dkv_kernel, st=st, bq=bq, bk=bk, bqc=bqc,
                               prec=_precision(q.dtype))
    frac = _causal_fraction(T, S) if st.causal else 1.0
    itemsize = jnp.dtype(q.dtype).itemsize
    rot_cost = bias_cost = (0, 0)
    q_seq, ran = _grid_walk(nk, nq, lambda j, i: _q_block(j, i, bq, bk, st),
                            lambda j, i: _chunks_run(j, i, bk, bq, bqc, st, kv_walk=False))
    if st.bias:  # k and v once per kv block, q per chunk; dk and dv summed once per kv block
        bias_cost = _bias_cost(B, N, H, biased_rows=2 * S + ran * bqc, summed_rows=2 * S,
                               partials=2 * nk)
    if st.rotary:  # k once and dk back once per kv block; q per compute chunk that runs
        rot_cost = _rotary_cost(B, N, R, rotated_rows=2 * S + ran * bqc, groups=NG,
                                tables=[(bk, [j for j in range(nk) for _ in range(nq)]),
                                        (bq, q_seq)])
    cost = _cost(8 * B * N * T * S * H * frac, B * N * T * S * frac,
                 itemsize * B * N * H * (4 * S + 2 * T * max(1, nk * frac))
                 + 8 * B * N * T * max(1, nk * frac), rot_cost, bias_cost)
    kv_shape = (jax.ShapeDtypeStruct((B, N, S, H), k.dtype) if st.layout == "BNTH"
                else jax.ShapeDtypeStruct((B, S, N * H), k.dtype))
    out_shapes, out_specs = [kv_shape, kv_shape], [out_spec, out_spec]
    if packed:  # one [B, S, 3D] array: dk and dv in their thirds (dq: `_dq_call(into=...)`)
        out_shapes = [jax.ShapeDtypeStruct((B, S, 3 * N * H), k.dtype)]
        out_specs = [pl.BlockSpec(memory_space=pl.ANY)]
    if st.bias:  # column sums of each kv block's dk (row 0) and dv (row 1): [B, S / bk, 2, D]
        out_shapes.append(jax.ShapeDtypeStruct((B, nk, 2, N * H), jnp.float32))
        out_specs.append(pl.BlockSpec((sq, sq, 2, W), lambda b, h, j, i: (b, j, 0, h)))
    if len(out_shapes) == 1:
        out_shapes, out_specs = out_shapes[0], out_specs[0]
    return pl.pallas_call(
        kernel, out_shape=out_shapes, grid=(B, NG, nk, nq), in_specs=in_specs,
        out_specs=out_specs, scratch_shapes=scratch,
        compiler_params=_compiler_params(3), interpret=st.interpret, cost_estimate=cost,
        name="pythia_flash_dkv",
    )(*args)


# ------------------------------------------------------------------------------------------------
# custom_vjp wiring
@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q, k, v, rot, st: _Static):
    o, lse = _fwd_call(q, k, v, rot, st)
    return o, lse


def _flash_fwd(q, k, v, rot, st: _Static):
    o, lse = _fwd_call(q, k, v, rot, st)
    return (o, lse), (q, k, v, rot, o, lse)


def _flash_bwd(st: _Static, res, cts):
    q, k, v, rot, o, lse = res
    do, dlse = cts
    dq, dk, dv = _backward(q, k, v, rot, o, lse, do, dlse, st)
    drot = None if rot is None else jax.tree.map(jnp.zeros_like, rot)
    return dq, dk, dv, drot


def _backward(q, k, v, rot, o, lse, do, dlse, st: _Static, bias=None):
    """(dq, dk, dv); for the packed layout (dqkv, dbias): one [B, T, 3D] array holding all
    three, and the [1, 3D] bias gradient (None without a bias operand)."""
    do = do.astype(q.dtype)
    if st.layout == "BNTH":
        di = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)[:, :, None, :]
    else:  # [B, T, N*H] -> [B, N, 1, T]
        di = _di_call(o, do, st)
    if dlse is not None and not isinstance(dlse, jax.custom_derivatives.SymbolicZero):
        di = di - dlse.astype(jnp.float32)
    if st.layout == "packed":  # one [B, T, 3D] gradient: dk, dv copied in, then dq in place
        if not st.bias:
            return _dq_call(q, k, v, do, lse, di, rot, st,
                            into=_dkv_call(q, k, v, do, lse, di, rot, st)), None
        buf, db_kv = _dkv_call(q, k, v, do, lse, di, rot, st, bias=bias)
        dqkv, db_q = _dq_call(q, k, v, do, lse, di, rot, st, into=buf, bias=bias)
        # the per-block column sums ([B, blocks, 1 or 2, D]) -> [1, 3D] (q, k, v thirds)
        db = jnp.concatenate([db_q.sum((0, 1)), db_kv.sum((0, 1))], axis=0)
        return dqkv, db.reshape(1, -1)
    dq = _dq_call(q, k, v, do, lse, di, rot, st)
    dk, dv = _dkv_call(q, k, v, do, lse, di, rot, st)
    return dq, dk, dv


_flash.defvjp(_flash_fwd, _flash_bwd)


# The packed layout: q, k and v are read in place from the QKV projection's [B, T, 3*N*H]
# output, and their gradients come back as one array of that shape.
# With a bias operand (`st.bias`, [1, 3D] f32) the kernels add it to the tiles they load, so
# the QKV projection hands over its matmul without the bias add, and its gradient comes back
# from the kernels' column sums.
@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _flash_packed(qkv, bias, rot, st: _Static):
    return _fwd_call(qkv, qkv, qkv, rot, st, bias)


def _flash_packed_fwd(qkv, bias, rot, st: _Static):
    o, lse = _fwd_call(qkv, qkv, qkv, rot, st, bias)
    return (o, lse), (qkv, bias, rot, o, lse)


def _flash_packed_bwd(st: _Static, res, cts):
    qkv, bias, rot, o, lse = res
    do, dlse = cts
    dqkv, dbias = _backward(qkv, qkv, qkv, rot, o, lse, do, dlse, st, bias)
    drot = None if rot is None else jax.tree.map(jnp.zeros_like, rot)
    return dqkv, dbias, drot


_flash_packed.defvjp(_flash_packed_fwd, _flash_packed_bwd)


#: Lane blocks wider than this (head_dim 80: 640 lanes) get `WIDE_BLOCK_DEFAULTS` when no
#: block sizes are given: the default 1024-row kv blocks of the forward and dQ kernels, double
#: buffered at that width, overflow v5e's 16 MiB of scoped VMEM (16.24 MiB at 2.8b's shapes).
WIDE_BLOCK_LANES = 512
WIDE_BLOCK_DEFAULTS = BlockSizes(block_q=256, block_kv=512, block_kv_dq=512, block_kv_dkv=256)


def heads_per_block(H: int, N: int) -> int | None:
    """How many heads share a lane block of the flat layouts ("BTNH", "packed"): the fewest
    whose width is a multiple of 128 lanes, lcm(H, 128) // H (1 when head_dim is a multiple of
    128; head_dim 64: 2; 80: 8, a 640-lane block), when N is a multiple of it and it is at most
    `MAX_HEADS_PER_BLOCK`; else None (the flat layouts cannot take this shape)."""
    if H <= 0:
        return None
    G = math.lcm(H, NUM_LANES) // H
    return G if G <= MAX_HEADS_PER_BLOCK and N % G == 0 else None


def _attention(q, k, v, *, layout, B, N, T, S, H, causal, scale, rotary, block_sizes,
               interpret, return_lse, bias=None):
    rotary_dim = None if rotary is None else rotary[0].shape[-1]
    G = 1 if layout == "BNTH" else heads_per_block(H, N)
    if block_sizes is None and G is not None and G * H > WIDE_BLOCK_LANES:
        block_sizes = WIDE_BLOCK_DEFAULTS
    blocks = check_supported((B, N, T, H), (B, N, S, H), rotary_dim=rotary_dim, causal=causal,
                             block_sizes=block_sizes, layout="BNTH")
    if layout != "packed" and v.shape != k.shape:
        raise UnsupportedShapeError(f"pallas attention: v {v.shape} must have k's shape "
                                    f"{k.shape}")
    dtype = q.dtype
    rot = None
    if rotary is not None:
        cos, sin = rotary
        want = (B, T, rotary_dim)
        if tuple(cos.shape) != want or tuple(sin.shape) != want:
            raise UnsupportedShapeError(f"pallas attention: rotary tables must be {want} (batch, "
                                        f"length, rotary_dim), got {cos.shape} and {sin.shape}")
        rot = (lax.stop_gradient(cos.astype(jnp.float32)),
               lax.stop_gradient(sin.astype(jnp.float32)))
    if G is None:
        g = math.lcm(H, NUM_LANES) // H
        raise UnsupportedShapeError(
            f"pallas attention: layout={layout!r} takes heads in lane blocks of a multiple of "
            f"{NUM_LANES} lanes, lcm(head_dim, {NUM_LANES}) // head_dim = {g} heads each (at "
            f"most {MAX_HEADS_PER_BLOCK}): heads must be a multiple of {g}, got head_dim={H}, "
            f"heads={N}")
    st = _Static(causal=bool(causal), scale=float(H ** -0.5 if scale is None else scale),
                 blocks=blocks, interpret=resolve_interpret(interpret, "pallas"),
                 rotary=rot is not None, T=T, S=S, N=N, H=H, layout=layout, G=G,
                 bias=bias is not None)
    if layout == "packed":
        o, lse = _flash_packed(q, bias, rot, st)
    else:
        o, lse = _flash(q, k.astype(dtype), v.astype(dtype), rot, st)
    return o, lse[:, :, 0, :]


def flash_attention(q_BNTH, k_BNSH, v_BNSH, *, causal: bool = True, scale: float | None = None,
                    rotary=None, block_sizes: BlockSizes | None = None, interpret=None,
                    return_lse: bool = False):
    """Flash attention on head-major arrays: q [B, N, T, H], k/v [B, N, S, H] -> o [B, N, T, H].

    `rotary=(cos, sin)`: [B, T, R] float32 tables; q and k are rotated in-kernel (NeoX
    rotate-half on the first R channels). `return_lse=True` also returns the f32 logsumexp of
    the scaled scores, [B, N, T]. Raises `UnsupportedShapeError` for shapes the kernel cannot
    handle.
    """
    check_supported(q_BNTH.shape, k_BNSH.shape, causal=causal, layout="BNTH")
    B, N, T, H = q_BNTH.shape
    o, lse = _attention(q_BNTH, k_BNSH, v_BNSH, layout="BNTH", B=B, N=N, T=T,
                        S=k_BNSH.shape[2], H=H, causal=causal, scale=scale, rotary=rotary,
                        block_sizes=block_sizes, interpret=interpret, return_lse=return_lse)
    return (o, lse) if return_lse else o


def pallas_attention(q_BTNH, k_BSNH, v_BSNH, *, causal: bool = True, scale: float | None = None,
                     rotary=None, block_sizes: BlockSizes | None = None, interpret=None,
                     return_lse: bool = False, layout: str | None = None):
    """Flash attention at the model's layout: q [B, T, N, H], k/v [B, S, N, H] -> [B, T, N, H].

    `layout`: "BNTH" (default) transposes to head-major around the kernels; XLA folds those
    transposes into the QKV / output projections. "BTNH" indexes a free [B, T, N*H] view
    instead, in lane blocks of 128 // head_dim heads (`heads_per_block`; head_dim 64: two heads
    per block, each masked to its lanes). The model's training path uses
    `pallas_attention_packed`, which also spares the split of q, k and v.
    """
    rotary_dim = None if rotary is None else rotary[0].shape[-1]
    check_supported(q_BTNH.shape, k_BSNH.shape, rotary_dim=rotary_dim, causal=causal,
                    block_sizes=block_sizes, layout="BTNH")
    B, T, N, H = q_BTNH.shape
    S = k_BSNH.shape[1]
    layout = layout or "BNTH"
    if layout == "BTNH":
        flat = lambda x: x.reshape(x.shape[0], x.shape[1], N * H)  # noqa: E731  free reshape
        o, lse = _attention(flat(q_BTNH), flat(k_BSNH), flat(v_BSNH), layout="BTNH", B=B, N=N,
                            T=T, S=S, H=H, causal=causal, scale=scale, rotary=rotary,
                            block_sizes=block_sizes, interpret=interpret, return_lse=return_lse)
        o = o.reshape(B, T, N, H)
    elif layout == "BNTH":
        t = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731
        o, lse = _attention(t(q_BTNH), t(k_BSNH), t(v_BSNH), layout="BNTH", B=B, N=N, T=T, S=S,
                            H=H, causal=causal, scale=scale, rotary=rotary,
                            block_sizes=block_sizes, interpret=interpret, return_lse=return_lse)
        o = t(o)
    else:
        raise ValueError(f"layout: expected 'BTNH', 'BNTH' or None, got {layout!r}")
    return (o, lse) if return_lse else o


def pallas_attention_packed(qkv_BTD3, *, num_heads: int, bias=None, causal: bool = True,
                            scale: float | None = None, rotary=None,
                            block_sizes: BlockSizes | None = None, interpret=None,
                            return_lse: bool = False):
    """Causal self-attention reading q, k and v in place from one [B, T, 3*N*H] array (the
    QKV projection's output as the matmul writes it: all of q, then k, then v, each
    head-interleaved [N, H]) -> o [B, T, N*H], ready for the output projection.

    No slice, transpose or copy of q, k, v around the kernels: each kernel's index maps pick
    the q, k or v third, `heads_per_block(H, N)` heads per 128-lane block. The gradient comes
    back as one [B, T, 3*N*H] array. Needs key length == query length and a head_dim that
    `heads_per_block` accepts (else `UnsupportedShapeError`); `rotary` as in `pallas_attention`.

    `bias` ([3*N*H], optional): the QKV projection's bias, when `qkv_BTD3` is the matmul
    without it. The kernels add it (in f32) to each q, k, v tile they load and return its
    gradient as column sums of dq, dk, dv, so XLA never reduces the [B, T, 3*N*H] gradient.
    Same result as passing `qkv_BTD3 + bias` (up to the rounding of the matmul's output before
    the add instead of after it, in bf16).
    """
    if qkv_BTD3.ndim != 3:
        raise UnsupportedShapeError(f"pallas attention (packed): expected qkv [B, T, 3*N*H], "
                                    f"got shape {tuple(qkv_BTD3.shape)}")
    B, T, D3 = qkv_BTD3.shape
    N = int(num_heads)
    if N <= 0 or D3 % (3 * N):
        raise UnsupportedShapeError(f"pallas attention (packed): the last axis ({D3}) must be "
                                    f"3 * num_heads ({N}) * head_dim")
    H = D3 // (3 * N)
    rotary_dim = None if rotary is None else rotary[0].shape[-1]
    check_supported((B, T, N, H), (B, T, N, H), rotary_dim=rotary_dim, causal=causal,
                    block_sizes=block_sizes, layout="BTNH")
    if bias is not None:
        if tuple(jnp.shape(bias)) != (D3,):
            raise UnsupportedShapeError(f"pallas attention (packed): bias must be [{D3}] (the "
                                        f"last axis of qkv), got shape {tuple(jnp.shape(bias))}")
        bias = jnp.asarray(bias).astype(jnp.float32).reshape(1, D3)
    o, lse = _attention(qkv_BTD3, None, None, layout="packed", B=B, N=N, T=T, S=T, H=H,
                        causal=causal, scale=scale, rotary=rotary, block_sizes=block_sizes,
                        interpret=interpret, return_lse=return_lse, bias=bias)
    return (o, lse) if return_lse else o
