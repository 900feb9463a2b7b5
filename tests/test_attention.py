"""Attention kernels on CPU: our Pallas kernel (interpret mode) against the f32 XLA reference,
fused rotary, the splash / cudnn wrappers, dispatch (`auto`, fallbacks, shard_map) and the model.

Tolerances follow docs/attention.md: f32 at atol = rtol = 1e-5; bf16 error against an f32
reference at most 2x the bf16 XLA reference's own error + 1e-3.
"""

import logging
import math
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pythia_jax import attention
from pythia_jax.attention import attend, resolve_impl
from pythia_jax.attention import pallas_tpu
from pythia_jax.attention.pallas_tpu import (BlockSizes, UnsupportedShapeError, pallas_attention,
                                             pallas_attention_packed)
from pythia_jax.attention.xla import xla_attention
from pythia_jax.config import ModelConfig
from pythia_jax.layers import apply_rotary, rotary_tables
from pythia_jax.model import GPTNeoX

HEAD_DIMS = (64, 80, 128, 256)

# Two sequence lengths x two block configurations. The second mixes rectangular blocks, compute
# chunks smaller than the DMA block and different blocks per kernel.
BLOCK_CASES = {
    "T256-b128": (256, BlockSizes.uniform(128)),
    "T512-mixed": (512, BlockSizes(block_q=256, block_kv=512, block_kv_compute=128,
                                   block_q_dkv=512, block_kv_dkv=256, block_q_dkv_compute=128,
                                   block_q_dq=128, block_kv_dq=256, block_kv_dq_compute=128)),
}


def _inputs(B, T, N, H, dtype=jnp.float32, S=None, seed=0):
    S = S or T
    kq, kk, kv, kd = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(kq, (B, T, N, H), jnp.float32).astype(dtype)
    k = jax.random.normal(kk, (B, S, N, H), jnp.float32).astype(dtype)
    v = jax.random.normal(kv, (B, S, N, H), jnp.float32).astype(dtype)
    do = jax.random.normal(kd, (B, T, N, H), jnp.float32).astype(dtype)
    return q, k, v, do


def _rotary(B, T, H):
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    return rotary_tables(pos, H // 4, 10000.0)


def _fwd_bwd(fn, q, k, v, do, dlse=None):
    """(o, dq, dk, dv) for cotangent do; with fn returning (o, lse): (o, lse, dq, dk, dv) for
    cotangents (do, dlse or 0). One jit, so each case compiles once."""
    def run(q, k, v, do, dlse):
        out, vjp = jax.vjp(fn, q, k, v)
        if isinstance(out, tuple):
            ct = jnp.zeros_like(out[1]) if dlse is None else dlse
            return out + tuple(vjp((do, ct)))
        return (out,) + tuple(vjp(do))
    return jax.jit(run)(q, k, v, do, dlse)


def _assert_close(got, want, names, tol=1e-5):
    for g, w, n in zip(got, want, names):
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32),
                                   atol=tol, rtol=tol, err_msg=n)


# ------------------------------------------------------------------------------------------------
# Kernel numerics (f32)
@pytest.mark.parametrize("case", list(BLOCK_CASES))
@pytest.mark.parametrize("H", HEAD_DIMS)
def test_f32_forward_lse_and_grads_match_reference(H, case):
    T, blocks = BLOCK_CASES[case]
    # The second case runs the no-transpose [B, T, N*H] layout where head_dim allows it.
    layout = "BTNH" if case == "T512-mixed" and H % 128 == 0 else "BNTH"
    q, k, v, do = _inputs(1, T, 2, H)
    got = _fwd_bwd(lambda q, k, v: pallas_attention(q, k, v, block_sizes=blocks, return_lse=True,
                                                    layout=layout), q, k, v, do)
    want = _fwd_bwd(lambda q, k, v: xla_attention(q, k, v, return_lse=True), q, k, v, do)
    _assert_close(got, want, ["o", "lse", "dq", "dk", "dv"])


@pytest.mark.parametrize("H", (64, 80, 256))  # 128 runs in the T=2048 case
def test_fused_rotary_equals_rotary_then_attention(H):
    T, blocks = BLOCK_CASES["T512-mixed"] if H == 64 else BLOCK_CASES["T256-b128"]
    B = 2
    q, k, v, do = _inputs(B, T, 2, H, seed=1)
    # Distinct positions per batch row (an offset), so the per-row table fetch is exercised.
    pos = jnp.arange(T, dtype=jnp.int32)[None, :] + jnp.array([[0], [37]], jnp.int32)
    cos, sin = rotary_tables(pos, H // 4, 10000.0)
    def fused(q, k, v):
        return pallas_attention(q, k, v, rotary=(cos, sin), block_sizes=blocks)

    def ref(q, k, v):
        return apply_rotary_attention(q, k, v, cos, sin)
    got = _fwd_bwd(fused, q, k, v, do)
    _assert_close(got, _fwd_bwd(ref, q, k, v, do), ["o", "dq", "dk", "dv"])
    # Not a no-op: without the rotary the output is different.
    assert float(jnp.max(jnp.abs(got[0] - xla_attention(q, k, v)))) > 1e-2


def _packed(q, k, v):
    """q, k, v [B, T, N, H] as the QKV projection's [B, T, 3*N*H] output."""
    B, T, N, H = q.shape
    return jnp.concatenate([x.reshape(B, T, N * H) for x in (q, k, v)], axis=-1)


@pytest.mark.parametrize("H,N,case", [(64, 4, "T512-mixed"), (64, 2, "T256-b128"),
                                      (32, 4, "T256-b128"), (128, 2, "T256-b128"),
                                      (80, 8, "T256-b128"), (96, 4, "T256-b128")])
def test_flat_layouts_put_several_heads_in_one_lane_block(H, N, case):
    """The flat layouts take lcm(H, 128) // H heads per lane block: 128 // H of 128 lanes when
    H divides 128 (each head's scores from its own lanes only), and when it does not (2.8b's
    head_dim 80: 8 heads in 640 lanes; 96: 4 in 384) each head sliced out of the block.
    'BTNH' on a [B, T, N*H] view, and the packed entry point, which reads q, k, v in place
    from one [B, T, 3*N*H] array and returns the gradient as one such array, equal the f32
    reference: o, lse and the gradients, fused rotary included."""
    T, blocks = BLOCK_CASES[case]
    B = 2
    q, k, v, do = _inputs(B, T, N, H, seed=2)
    assert pallas_tpu.heads_per_block(H, N) == math.lcm(H, 128) // H
    want = _fwd_bwd(lambda q, k, v: xla_attention(q, k, v, return_lse=True), q, k, v, do)
    got = _fwd_bwd(lambda q, k, v: pallas_attention(q, k, v, block_sizes=blocks,
                                                    return_lse=True, layout="BTNH"), q, k, v, do)
    _assert_close(got, want, ["o", "lse", "dq", "dk", "dv"])

    def packed(q, k, v):
        o, lse = pallas_attention_packed(_packed(q, k, v), num_heads=N, block_sizes=blocks,
                                         return_lse=True)
        return o.reshape(q.shape), lse
    _assert_close(_fwd_bwd(packed, q, k, v, do), want, ["o", "lse", "dq", "dk", "dv"])
    # the gradient with respect to the one array is the three gradients side by side
    qkv = _packed(q, k, v)
    g = jax.jit(jax.grad(lambda x: jnp.sum(pallas_attention_packed(
        x, num_heads=N, block_sizes=blocks) * do.reshape(B, T, N * H))))(qkv)
    np.testing.assert_allclose(g, _packed(*want[2:]), atol=1e-5, rtol=1e-5)

    pos = jnp.arange(T, dtype=jnp.int32)[None, :] + jnp.array([[0], [37]], jnp.int32)
    cos, sin = rotary_tables(pos, H // 4, 10000.0)
    want = _fwd_bwd(lambda q, k, v: apply_rotary_attention(q, k, v, cos, sin), q, k, v, do)
    got = _fwd_bwd(lambda q, k, v: pallas_attention_packed(
        _packed(q, k, v), num_heads=N, block_sizes=blocks, rotary=(cos, sin)).reshape(q.shape),
        q, k, v, do)
    _assert_close(got, want, ["o", "dq", "dk", "dv"])


def test_flat_layouts_name_the_shapes_they_cannot_take():
    q, k, v, _ = _inputs(1, 128, 3, 64)  # 3 heads of 64: two per block leaves one over
    with pytest.raises(UnsupportedShapeError, match="head_dim=64, heads=3"):
        pallas_attention(q, k, v, layout="BTNH")
    with pytest.raises(UnsupportedShapeError, match="head_dim=64, heads=3"):
        pallas_attention_packed(_packed(q, k, v), num_heads=3)
    q, k, v, _ = _inputs(1, 128, 2, 80)  # head_dim 80 takes 8 heads per 640-lane block
    with pytest.raises(UnsupportedShapeError, match="multiple of 8, got head_dim=80, heads=2"):
        pallas_attention_packed(_packed(q, k, v), num_heads=2)
    with pytest.raises(UnsupportedShapeError, match=r"3 \* num_heads \(7\)"):
        pallas_attention_packed(_packed(q, k, v), num_heads=7)  # 480 is not 3 * 7 * H
    with pytest.raises(UnsupportedShapeError, match=r"expected qkv \[B, T, 3\*N\*H\]"):
        pallas_attention_packed(q, num_heads=2)
    assert pallas_tpu.heads_per_block(80, 2) is None and pallas_tpu.heads_per_block(256, 3) == 1
    assert pallas_tpu.heads_per_block(80, 32) == 8  # pythia-2.8b: 4 blocks of 640 lanes


def _reduces_of_shape(fn, shape, *args):
    """The reduce_sum equations of fn's jaxpr (sub-jaxprs included) whose operand has `shape`."""
    found = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "reduce_sum" and tuple(eqn.invars[0].aval.shape) == shape:
                found.append(eqn)
            for value in eqn.params.values():
                for sub in (value if isinstance(value, (list, tuple)) else [value]):
                    if hasattr(sub, "jaxpr"):
                        walk(sub.jaxpr if hasattr(sub.jaxpr, "eqns") else sub.jaxpr.jaxpr)
                    elif hasattr(sub, "eqns"):
                        walk(sub)
    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return found


@pytest.mark.parametrize("H,N,case", [(64, 4, "T512-mixed"), (128, 2, "T256-b128"),
                                      (80, 8, "T256-b128")])
def test_packed_kernels_add_the_qkv_bias_and_return_its_gradient(H, N, case):
    """`bias=` hands the QKV bias to the kernels beside the bias-free matmul output: o and the
    gradients of qkv and of the bias equal the f32 reference on `qkv + bias` (fused rotary),
    and the bias gradient comes from the kernels' per-block column sums: nothing in the
    program reduces a [B, T, 3*N*H] array (nor o * do per head: the di kernel's rows)."""
    T, blocks = BLOCK_CASES[case]
    B = 2
    q, k, v, do = _inputs(B, T, N, H, seed=5)
    qkv = _packed(q, k, v)
    D3 = qkv.shape[-1]
    bias = jax.random.normal(jax.random.PRNGKey(9), (D3,), jnp.float32)
    cos, sin = _rotary(B, T, H)
    dflat = do.reshape(B, T, N * H)

    def split(x):
        return [t.reshape(B, T, N, H) for t in jnp.split(x, 3, axis=-1)]

    def ref(x, b):
        return apply_rotary_attention(*split(x + b), cos, sin).reshape(B, T, N * H)

    def got(x, b):
        return pallas_attention_packed(x, num_heads=N, bias=b, block_sizes=blocks,
                                       rotary=(cos, sin))

    def loss(f):
        return lambda x, b: jnp.sum(f(x, b) * dflat)
    np.testing.assert_allclose(jax.jit(got)(qkv, bias), ref(qkv, bias), atol=1e-5, rtol=1e-5)
    g = jax.jit(jax.grad(loss(got), argnums=(0, 1)))(qkv, bias)
    g_ref = jax.grad(loss(ref), argnums=(0, 1))(qkv, bias)
    np.testing.assert_allclose(g[0], g_ref[0], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(g[1], g_ref[1], atol=1e-4, rtol=1e-5)
    assert float(jnp.max(jnp.abs(g[1]))) > 1.0  # a gradient worth checking
    assert not _reduces_of_shape(jax.grad(loss(got), argnums=1), (B, T, D3), qkv, bias)
    assert _reduces_of_shape(jax.grad(loss(ref), argnums=1), (B, T, D3), qkv, bias)  # can fail
    # di = rowsum(o * do) is the di kernel's rows, not an XLA reduce of a [B, T, N, H] product
    assert not _reduces_of_shape(jax.grad(loss(got), argnums=1), (B, T, N, H), qkv, bias)
    names = {e.params["name"] for e in _pallas_calls(jax.grad(loss(got), argnums=1), qkv, bias)}
    assert "pythia_flash_di" in names, names
    for wrong in (bias[:-1], bias.reshape(3, -1)):
        with pytest.raises(UnsupportedShapeError, match=rf"bias must be \[{D3}\]"):
            pallas_attention_packed(qkv, num_heads=N, bias=wrong)


def test_cost_estimate_counts_the_fused_rotary():
    """Each kernel's `pl.CostEstimate` (what XLA's TPU cost model prices the call by) includes
    the rotary work inside it: 3 FLOPs per rotated element (x*cos + rotate_half(x)*sin, or the
    transposed rotation of a gradient) and 8 bytes per fetched table row and channel (cos and
    sin, f32). Counted by hand for T = S = 256 in 128-blocks (2 q blocks, 2 kv blocks), N = 2."""
    B, T, N, H = 1, 256, 2, 64
    R = H // 4
    q, k, v, do = _inputs(B, T, N, H)
    rotary = _rotary(B, T, H)
    assert (pallas_tpu.ROTARY_FLOPS_PER_ELEMENT, pallas_tpu.ROTARY_TABLE_BYTES) == (3, 8)

    def costs(rotary, causal=True):
        def fn(q, k, v):
            return pallas_attention(q, k, v, causal=causal, rotary=rotary,
                                    block_sizes=BlockSizes.uniform(128))
        calls = _pallas_calls(lambda q, k, v, do: jax.vjp(fn, q, k, v)[1](do), q, k, v, do)
        return {e.params["name"]: e.params["cost_estimate"] for e in calls}

    plain, fused = costs(None), costs(rotary)
    # Rows rotated per (batch, head). fwd: q once per q block (256) + k per key chunk that
    # runs (q block 0: kv block 0; q block 1: kv blocks 0, 1: 3 x 128). dq: also dq rotated
    # back (256). dkv: k once and dk back per kv block (2 x 256) + q per query chunk that runs
    # (kv block 0: q blocks 0, 1; kv block 1: q block 1: 3 x 128).
    rows = {"pythia_flash_fwd": 256 + 384, "pythia_flash_dq": 2 * 256 + 384,
            "pythia_flash_dkv": 2 * 256 + 384}
    # Table blocks fetched, both heads: the resident block's tables once per block and head
    # (2 x 2); the walked block's when its clamped index changes: fwd / dq walk kv blocks
    # 0, 0 | 0, 1, dkv walks q blocks 0, 1 | 1, 1: 2 fetches per head (2 x 2).
    blocks = 4 + 4
    assert set(plain) == set(fused) == set(rows)
    for name, want_rows in rows.items():
        assert fused[name].flops - plain[name].flops == 3 * R * B * N * want_rows, name
        assert fused[name].bytes_accessed - plain[name].bytes_accessed == \
            8 * R * blocks * 128, name
        assert fused[name].transcendentals == plain[name].transcendentals, name  # tables in
    # Without the causal mask every key chunk runs: fwd rotates k for both q blocks.
    full, full_plain = costs(rotary, causal=False), costs(None, causal=False)
    assert full["pythia_flash_fwd"].flops - full_plain["pythia_flash_fwd"].flops == \
        3 * R * B * N * (256 + 2 * 256)


def test_default_blocks_noncausal_and_offset_with_lse_gradient():
    H = 64
    # Default blocks at T=512 (block_q 512, block_kv 512 split into 256-wide compute chunks).
    q, k, v, do = _inputs(1, 512, 2, H, seed=2)
    _assert_close(_fwd_bwd(lambda q, k, v: pallas_attention(q, k, v), q, k, v, do),
                  _fwd_bwd(lambda q, k, v: xla_attention(q, k, v), q, k, v, do),
                  ["o", "dq", "dk", "dv"])
    # Non-causal, T != S.
    q, k, v, do = _inputs(1, 128, 2, H, S=256, seed=3)
    _assert_close(
        _fwd_bwd(lambda q, k, v: pallas_attention(
            q, k, v, causal=False, block_sizes=BlockSizes.uniform(128)), q, k, v, do),
        _fwd_bwd(lambda q, k, v: xla_attention(q, k, v, causal=False), q, k, v, do),
        ["o", "dq", "dk", "dv"])
    # Causal with the queries being the last T of S keys, and a differentiated logsumexp (its
    # cotangent enters the backward through di).
    dlse = jax.random.normal(jax.random.PRNGKey(9), (1, 2, 128))
    _assert_close(
        _fwd_bwd(lambda q, k, v: pallas_attention(q, k, v, return_lse=True,
                                                  block_sizes=BlockSizes.uniform(128)),
                 q, k, v, do, dlse),
        _fwd_bwd(lambda q, k, v: xla_attention(q, k, v, return_lse=True), q, k, v, do, dlse),
        ["o", "lse", "dq", "dk", "dv"])


# ------------------------------------------------------------------------------------------------
# bf16: error relative to the bf16 XLA reference's own error
@pytest.mark.parametrize("H", HEAD_DIMS)
def test_bf16_error_within_twice_xla_bf16_error(H):
    q, k, v, do = _inputs(1, 256, 2, H, dtype=jnp.bfloat16, seed=5)
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    ref32 = _fwd_bwd(lambda q, k, v: xla_attention(q, k, v), f32(q), f32(k), f32(v), f32(do))
    ref16 = _fwd_bwd(lambda q, k, v: xla_attention(q, k, v), q, k, v, do)
    ours = _fwd_bwd(lambda q, k, v: pallas_attention(q, k, v, block_sizes=BlockSizes.uniform(128)),
                    q, k, v, do)
    for name, a, r16, r32 in zip(["o", "dq", "dk", "dv"], ours, ref16, ref32):
        assert a.dtype == jnp.bfloat16, name
        err = float(jnp.max(jnp.abs(f32(a) - r32)))
        ref_err = float(jnp.max(jnp.abs(f32(r16) - r32)))
        assert err <= 2 * ref_err + 1e-3, (name, err, ref_err)


# ------------------------------------------------------------------------------------------------
# One production-length case
@pytest.mark.slow
def test_t2048_forward_and_grads_with_fused_rotary():
    q, k, v, do = _inputs(1, 2048, 1, 128, seed=6)
    cos, sin = _rotary(1, 2048, 128)
    def fused(q, k, v):
        return pallas_attention(q, k, v, rotary=(cos, sin))

    def ref(q, k, v):
        return apply_rotary_attention(q, k, v, cos, sin)
    _assert_close(_fwd_bwd(fused, q, k, v, do), _fwd_bwd(ref, q, k, v, do),
                  ["o", "dq", "dk", "dv"])


# ------------------------------------------------------------------------------------------------
# Race detection (TPU interpret mode simulating memory, DMAs and 2 megacore TensorCores)
def _run_detecting_races(fn):
    """(fn(), whether the TPU interpreter's race detector reported a race during it)."""
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call as ipc
    ipc.reset_tpu_interpret_mode_state()
    try:
        out = jax.block_until_ready(fn())
    except jax.errors.JaxRuntimeError as e:  # newer JAX (0.12) raises on a race instead of recording it
        if "RACE DETECTED" not in str(e):
            raise
        return None, True
    assert ipc.races is not None, "race detection did not run"
    return out, ipc.races.races_found


def test_no_races_under_tpu_interpret_mode():
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import tpu as pltpu
    params = pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2)

    # Positive control: two "parallel" grid steps on different cores write the same block.
    def racy(x_ref, o_ref):
        o_ref[...] = x_ref[...] + 1.0
    bad = pl.pallas_call(racy, out_shape=jax.ShapeDtypeStruct((8, 128), jnp.float32), grid=(2,),
                         in_specs=[pl.BlockSpec((8, 128), lambda i: (0, 0))],
                         out_specs=pl.BlockSpec((8, 128), lambda i: (0, 0)),
                         compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
                         interpret=params)
    assert _run_detecting_races(lambda: bad(jnp.zeros((8, 128), jnp.float32)))[1]

    H, T = 64, 256
    q, k, v, do = _inputs(1, T, 1, H, seed=7)
    cos, sin = _rotary(1, T, H)
    t = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731
    qh, kh, vh, doh = t(q), t(k), t(v), t(do)
    st = pallas_tpu._Static(causal=True, scale=H ** -0.5,
                            blocks=BlockSizes.uniform(128).resolve(T, T), interpret=params,
                            rotary=True, T=T, S=T, N=1, H=H)
    rot = (cos, sin)
    (o, lse), raced = _run_detecting_races(lambda: pallas_tpu._fwd_call(qh, kh, vh, rot, st))
    assert not raced
    di = jnp.sum(o * doh, axis=-1)[:, :, None, :]
    dq, raced = _run_detecting_races(lambda: pallas_tpu._dq_call(qh, kh, vh, doh, lse, di, rot, st))
    assert not raced
    (dk, dv), raced = _run_detecting_races(
        lambda: pallas_tpu._dkv_call(qh, kh, vh, doh, lse, di, rot, st))
    assert not raced
    # And the simulated runs compute the right thing.
    want = _fwd_bwd(lambda q, k, v: apply_rotary_attention(q, k, v, cos, sin), q, k, v, do)
    _assert_close([t(o), t(dq), t(dk), t(dv)], want, ["o", "dq", "dk", "dv"])


@pytest.mark.parametrize("H,N", [(64, 2), (128, 2)])
def test_packed_gradient_buffer_has_no_races_under_tpu_interpret_mode(H, N):
    """The packed backward writes dk and dv into the k and v thirds of one [B, T, 3*N*H]
    array by manual DMA from the dK/dV kernel, then dq into the q third in place (the dQ kernel
    aliases that array), and both write per-block column sums for the QKV bias: on 2 simulated
    TensorCores no two grid steps touch the same block, every third holds its own gradient,
    and the bias gradient is their column sum."""
    from jax.experimental.pallas import tpu as pltpu
    params = pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2)
    B, T = 1, 256
    q, k, v, do = _inputs(B, T, N, H, seed=11)
    cos, sin = _rotary(B, T, H)
    blocks = BlockSizes.uniform(128)
    qkv = _packed(q, k, v)
    dflat = do.reshape(B, T, N * H)

    bias = jax.random.normal(jax.random.PRNGKey(3), (qkv.shape[-1],), jnp.float32)

    def loss(x, b):
        return jnp.sum(pallas_attention_packed(x - bias, num_heads=N, bias=b, block_sizes=blocks,
                                               rotary=(cos, sin), interpret=params) * dflat)
    (g, g_bias), raced = _run_detecting_races(lambda: jax.grad(loss, argnums=(0, 1))(qkv, bias))
    assert not raced
    want = _fwd_bwd(lambda q, k, v: apply_rotary_attention(q, k, v, cos, sin), q, k, v, do)
    np.testing.assert_allclose(g, _packed(*want[1:]), atol=1e-5, rtol=1e-5)
    # the bias gradient: the per-block column sums of the three thirds, from both kernels
    np.testing.assert_allclose(g_bias, _packed(*want[1:]).sum((0, 1)), atol=1e-4, rtol=1e-5)


def apply_rotary_attention(q, k, v, cos, sin):
    return xla_attention(apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v)


# ------------------------------------------------------------------------------------------------
# Bad input
def _dense_softmax_attention(q, k, v, mask_BTS):
    """Independent oracle: float64 numpy softmax over the full score matrix."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    s = np.einsum("btnh,bsnh->bnts", q, k) * q.shape[-1] ** -0.5
    s = np.where(mask_BTS[:, None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bnts,bsnh->btnh", p, v), np.log(np.exp(s - s.max(-1, keepdims=True)).sum(-1)) + s.max(-1)


@pytest.mark.parametrize("T,S", [(256, 256), (200, 328), (96, 96)])
def test_xla_reference_blocked_causal_matches_dense_softmax(T, S):
    """The causal query blocks (T >= 128: 2-4 blocks, uneven last block, queries at the end of
    the keys) give the dense softmax, and the same gradients as the unblocked form."""
    from pythia_jax.attention import xla as xla_mod
    assert len(xla_mod._query_blocks(T, True, False)) == (1 if T < 128 else min(4, T // 64))
    q, k, v, do = _inputs(2, T, 3, 32, S=S, seed=5)
    causal = np.arange(S)[None, :] <= (S - T + np.arange(T))[:, None]
    mask = np.broadcast_to(causal, (2, T, S))
    o, lse = xla_attention(q, k, v, return_lse=True)
    want_o, want_lse = _dense_softmax_attention(q, k, v, mask)
    np.testing.assert_allclose(np.asarray(o), want_o, atol=2e-6, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(lse), want_lse, atol=2e-5, rtol=1e-5)
    # gradients: blocked causal == the same causal pattern given as an explicit mask (unblocked)
    got = _fwd_bwd(lambda q, k, v: xla_attention(q, k, v), q, k, v, do)
    ref = _fwd_bwd(lambda q, k, v: xla_attention(q, k, v, causal=False, mask=jnp.asarray(mask)),
                   q, k, v, do)
    for a, b in zip(got, ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)


def test_xla_reference_blocks_only_on_the_cpu_backend(monkeypatch):
    """Query blocks are a CPU optimisation: on other backends one block (XLA:GPU miscompiled
    the blocked bf16 model, bench/RESULTS.md), so the result there is the plain softmax."""
    from pythia_jax.attention import xla as xla_mod
    assert len(xla_mod._query_blocks(512, True, False)) == 4
    monkeypatch.setattr(xla_mod.jax, "default_backend", lambda: "gpu")
    assert xla_mod._query_blocks(512, True, False) == [(0, 512)]
    monkeypatch.setattr(xla_mod.jax, "default_backend", lambda: "tpu")
    assert xla_mod._query_blocks(256, True, False) == [(0, 256)]


def test_xla_reference_mask_and_fully_masked_rows():
    q, k, v, _ = _inputs(1, 8, 2, 16, seed=6)
    mask = np.random.default_rng(0).random((1, 8, 8)) < 0.6
    mask[0, 3] = True
    o = xla_attention(q, k, v, causal=False, mask=jnp.asarray(mask))
    want, _ = _dense_softmax_attention(q, k, v, mask | ~mask.any(-1, keepdims=True))
    rows = mask[0].any(-1)
    np.testing.assert_allclose(np.asarray(o)[0, rows], want[0, rows], atol=2e-6, rtol=1e-5)
    # a row that may attend to nothing averages v uniformly (finite, no NaN)
    mask[0, 5] = False
    o = np.asarray(xla_attention(q, k, v, causal=False, mask=jnp.asarray(mask)))
    np.testing.assert_allclose(o[0, 5], np.asarray(v)[0].mean(0), atol=1e-6)


def test_unsupported_shapes_raise_clear_errors():
    q, k, v, _ = _inputs(1, 200, 2, 64)
    with pytest.raises(UnsupportedShapeError,
                       match="query length must be a positive multiple of 128"):
        pallas_attention(q, k, v)
    with pytest.raises(UnsupportedShapeError, match="multiple of 128"):
        attend(q, k, v, impl="pallas")
    with pytest.raises(UnsupportedShapeError, match="multiple of 128"):
        attend(q, k, v, impl="splash")
    for H in (72, 512):
        q, k, v, _ = _inputs(1, 128, 1, H)
        with pytest.raises(UnsupportedShapeError,
                           match=r"head_dim must be a multiple of 16 in \[16, 256\]"):
            attend(q, k, v, impl="pallas")
    q, k, v, _ = _inputs(1, 256, 1, 64)
    with pytest.raises(UnsupportedShapeError,
                       match=r"BlockSizes.block_q: .* multiples of 128, got 192"):
        pallas_attention(q, k, v, block_sizes=BlockSizes(block_q=192))
    with pytest.raises(UnsupportedShapeError,
                       match=r"BlockSizes.block_q=512 must divide length 256"):
        pallas_attention(q, k, v, block_sizes=BlockSizes(block_q=512))
    with pytest.raises(UnsupportedShapeError,
                       match=r"block_kv_compute=256 must divide BlockSizes.block_kv=128"):
        pallas_attention(q, k, v, block_sizes=BlockSizes(block_kv=128, block_kv_compute=256))
    with pytest.raises(UnsupportedShapeError, match="rotary tables must be"):
        cos, sin = _rotary(1, 128, 64)
        pallas_attention(q, k, v, rotary=(cos, sin))
    with pytest.raises(ValueError, match="attention_impl: expected one of"):
        attend(q, k, v, impl="flash")
    with pytest.raises(ValueError, match="only supported by 'xla'"):
        attend(q, k, v, impl="pallas", mask=jnp.ones((1, 256, 256), bool))


def test_auto_falls_back_to_xla_with_a_log_line(caplog):
    shape_bad, shape_ok = (1, 200, 2, 64), (1, 256, 2, 64)
    with caplog.at_level(logging.WARNING, logger="pythia_jax"):
        assert resolve_impl("auto", shape_ok, shape_ok, jnp.bfloat16, backend="tpu") == "pallas"
        assert not caplog.records
        assert resolve_impl("auto", shape_bad, shape_bad, jnp.bfloat16, backend="tpu") == "xla"
    assert any("falling back to 'xla'" in r.getMessage() and "multiple of 128" in r.getMessage()
               for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pythia_jax"):
        assert resolve_impl("auto", shape_ok, shape_ok, jnp.bfloat16, backend="gpu") == "cudnn"
        assert resolve_impl("auto", shape_ok, shape_ok, jnp.float32, backend="gpu") == "xla"
    assert any("cudnn" in r.getMessage() and "bfloat16 or float16" in r.getMessage()
               for r in caplog.records)
    assert resolve_impl("auto", shape_ok, shape_ok, jnp.float32, backend="cpu") == "xla"
    assert resolve_impl("auto", shape_ok, shape_ok, jnp.float32, backend="tpu",
                        mask=jnp.ones(())) == "xla"
    # The environment override picks splash on TPU.
    os.environ[attention.AUTO_TPU_ENV] = "splash"
    try:
        assert resolve_impl("auto", shape_ok, shape_ok, jnp.bfloat16, backend="tpu") == "splash"
    finally:
        del os.environ[attention.AUTO_TPU_ENV]
    # On this CPU backend `auto` runs the reference, also for shapes no kernel takes.
    q, k, v, _ = _inputs(1, 200, 2, 64)
    np.testing.assert_allclose(attend(q, k, v, impl="auto"), xla_attention(q, k, v), atol=1e-6)


def test_cudnn_needs_a_gpu_and_rotary_is_applied_for_other_impls():
    q, k, v, do = _inputs(1, 256, 2, 64, dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        attend(q, k, v, impl="cudnn")
    with pytest.raises(UnsupportedShapeError, match="bfloat16 or float16"):
        attend(q.astype(jnp.float32), k, v, impl="cudnn")
    # rotary= with the xla impl: applied in XLA before attention.
    q, k, v, _ = _inputs(1, 256, 2, 64)
    cos, sin = _rotary(1, 256, 64)
    np.testing.assert_allclose(attend(q, k, v, impl="xla", rotary=(cos, sin)),
                               apply_rotary_attention(q, k, v, cos, sin), atol=1e-6)


def _pallas_calls(fn, *args):
    """Every pallas_call equation in fn's jaxpr (sub-jaxprs included)."""
    found = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "pallas_call":
                found.append(eqn)
            for value in eqn.params.values():
                for sub in value if isinstance(value, (tuple, list)) else (value,):
                    sub = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
                    if hasattr(sub, "eqns"):
                        walk(sub)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return found


def _pallas_interpret_params(fn, *args):
    """The `interpret` parameter of every pallas_call in fn's jaxpr (sub-jaxprs included)."""
    return [eqn.params["interpret"] for eqn in _pallas_calls(fn, *args)]


def test_target_platform_picks_the_tpu_paths_without_a_mock():
    """`target_platform("tpu")` (what the deviceless compile reports use) makes the dispatch and
    the kernels, read at trace time, take the TPU code paths on this CPU process: `auto` picks
    the Pallas kernel, which is traced as a Mosaic kernel, not in interpret mode. The same
    functions are traced anew per target (the target is in JAX's cache key)."""
    from pythia_jax.attention import target
    from pythia_jax.attention import xla as xla_mod
    shape = (1, 256, 2, 64)
    q, k, v, _ = _inputs(*shape, dtype=jnp.bfloat16)
    auto = lambda q, k, v: attend(q, k, v, impl="auto")  # noqa: E731
    pallas = lambda q, k, v: attend(q, k, v, impl="pallas")  # noqa: E731

    assert attention.current_platform() == "cpu"
    assert resolve_impl("auto", shape, shape, jnp.bfloat16) == "xla"
    assert target.resolve_interpret(None, "pallas") is True
    assert _pallas_interpret_params(auto, q, k, v) == []            # auto: the XLA reference
    assert set(_pallas_interpret_params(pallas, q, k, v)) == {True}  # interpret mode on CPU
    with attention.target_platform("tpu") as platform:
        assert platform == "tpu" == attention.current_platform()
        assert resolve_impl("auto", shape, shape, jnp.bfloat16) == "pallas"
        assert target.resolve_interpret(None, "pallas") is False
        assert target.resolve_interpret(True, "pallas") is True      # explicit values win
        assert xla_mod._query_blocks(512, True, False) == [(0, 512)]
        params = _pallas_interpret_params(auto, q, k, v)
        assert params and set(params) == {False}, params            # Mosaic kernels
        with attention.target_platform("gpu"):                       # nested: innermost wins
            assert resolve_impl("auto", shape, shape, jnp.bfloat16) == "cudnn"
            with pytest.raises(ValueError, match=r"attention_impl='splash' is a TPU .* target "
                                                 r"platform is 'gpu'"):
                target.resolve_interpret(None, "splash")
        assert attention.current_platform() == "tpu"
        with attention.target_platform(None):                         # None: this backend
            assert attention.current_platform() == "cpu"
    assert attention.current_platform() == "cpu"
    assert len(xla_mod._query_blocks(512, True, False)) == 4
    assert _pallas_interpret_params(auto, q, k, v) == []            # not the TPU trace again
    jitted = jax.jit(pallas)
    with attention.target_platform("tpu"):
        tpu_text = jitted.trace(q, k, v).jaxpr.pretty_print()
    assert "interpret=False" in tpu_text
    assert "interpret=True" in jitted.trace(q, k, v).jaxpr.pretty_print()
    with pytest.raises(ValueError, match=r"target_platform: expected one of \('cpu', 'gpu', "
                                         r"'tpu'\) or None, got 'tpx'"):
        with attention.target_platform("tpx"):
            pass


def test_splash_wrapper_matches_reference():
    q, k, v, do = _inputs(1, 256, 2, 64, seed=8)
    cos, sin = _rotary(1, 256, 64)
    got = _fwd_bwd(lambda q, k, v: attend(q, k, v, impl="splash", rotary=(cos, sin)), q, k, v, do)
    want = _fwd_bwd(lambda q, k, v: apply_rotary_attention(q, k, v, cos, sin), q, k, v, do)
    _assert_close(got, want, ["o", "dq", "dk", "dv"])


# ------------------------------------------------------------------------------------------------
# The whole model
_MODEL_CFG = ModelConfig(hidden_size=128, num_layers=2, num_heads=2, intermediate_size=256,
                         vocab_size=256, max_position_embeddings=256, scan_layers=True)


def _logits_and_grads(model, ids):
    """(loss, logits, gradients) of the next-token loss, in one jit."""
    graphdef, state = nnx.split(model)

    def loss(state):
        logits = nnx.merge(graphdef, state)(ids)
        logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)), logits
    (loss, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(state)
    return loss, logits, grads


@pytest.fixture(scope="module")
def model_reference():
    """The xla model's loss, logits and gradients."""
    ref = GPTNeoX(_MODEL_CFG, rngs=nnx.Rngs(0))
    ids = jax.random.randint(jax.random.PRNGKey(3), (2, 256), 0, 256)
    return ids, _logits_and_grads(ref, ids)


@pytest.fixture(scope="module")
def model_unfused_pallas(model_reference):
    """The pallas model with the reference's parameters and rotary outside the kernel
    (fused_rotary=False): loss, logits, gradients."""
    ref = GPTNeoX(_MODEL_CFG, rngs=nnx.Rngs(0))
    other = GPTNeoX(_MODEL_CFG.replace(attention_impl="pallas", fused_rotary=False),
                    rngs=nnx.Rngs(1))
    nnx.update(other, nnx.state(ref))  # identical parameters
    return _logits_and_grads(other, model_reference[0])


def _fwd_kernel_inputs(model, ids):
    """The operand count of every forward-kernel call in the model's program (scanned: one
    call): 3 (q, k, v) with rotary outside the kernel; 10 with it fused, where the layer takes
    the packed path (+ cos and sin for the q block and the kv block, + the q, k and v rows of
    the QKV bias, which the kernel adds)."""
    graphdef, state = nnx.split(model)
    calls = _pallas_calls(lambda state: nnx.merge(graphdef, state)(ids), state)
    return [len(e.invars) for e in calls
            if e.params["name"] == "pythia_flash_fwd"]


def test_model_pallas_matches_xla(model_reference, model_unfused_pallas):
    ids, (_, logits_ref, g_ref) = model_reference
    _, logits, g = model_unfused_pallas
    np.testing.assert_allclose(logits, logits_ref, atol=1e-4, rtol=1e-4)
    flat_ref = jax.tree.leaves(g_ref)
    flat = jax.tree.leaves(g)
    assert len(flat) == len(flat_ref) > 0
    for a, b in zip(flat, flat_ref):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-3)


def _assert_same_run(got, want, tol=1e-5):
    """Two (loss, logits, gradients) triples of `_logits_and_grads` agree (fp32, tol)."""
    (loss, logits, g), (loss_u, logits_u, g_u) = got, want
    np.testing.assert_allclose(loss, loss_u, atol=tol, rtol=tol)
    np.testing.assert_allclose(logits, logits_u, atol=tol, rtol=tol)
    flat, flat_u = jax.tree.leaves(g), jax.tree.leaves(g_u)
    assert len(flat) == len(flat_u) > 0
    for a, b in zip(flat, flat_u):
        np.testing.assert_allclose(a, b, atol=tol, rtol=tol)


def _fwd_kernel_qkv(model, ids, **kwargs):
    """(shape of the forward kernel's q operand, whether q, k and v are one array) per call."""
    graphdef, state = nnx.split(model)
    calls = _pallas_calls(lambda state: nnx.merge(graphdef, state)(ids, **kwargs), state)
    return [(tuple(e.invars[0].aval.shape), e.invars[0] is e.invars[1] is e.invars[2])
            for e in calls if e.params["name"] == "pythia_flash_fwd"]


def test_model_hands_the_qkv_projection_to_the_kernel_in_place(model_reference,
                                                               model_unfused_pallas):
    """With rotary fused, the layer gives the kernel the QKV matmul's [B, T, 3*D] output as it
    is (the same array for q, k and v: no split or transpose), and the kernel's [B, T, D]
    output goes straight to the output projection: same loss, logits and gradients as the
    split path (fp32, 1e-5). Rotary outside the kernel, or a tapped q/k/v/z site, keeps the
    split [B, N, T, H] operands."""
    from pythia_jax.layers import Taps
    ids = model_reference[0]
    B, T = ids.shape
    D = _MODEL_CFG.hidden_size
    model = GPTNeoX(_MODEL_CFG.replace(attention_impl="pallas"), rngs=nnx.Rngs(1))
    nnx.update(model, nnx.state(GPTNeoX(_MODEL_CFG, rngs=nnx.Rngs(0))))
    assert _fwd_kernel_qkv(model, ids) == [((B, T, 3 * D), True)]
    N, H = _MODEL_CFG.num_heads, _MODEL_CFG.head_dim
    split = [((B, N, T, H), False)]
    assert _fwd_kernel_qkv(model, ids, taps=Taps(capture={"attn.hook_z"})) == split
    assert _fwd_kernel_qkv(model, ids, taps=Taps(capture={"hook_attn_out"})) == \
        [((B, T, 3 * D), True)]  # a site outside the projections does not need the split
    unfused = GPTNeoX(_MODEL_CFG.replace(attention_impl="pallas", fused_rotary=False),
                      rngs=nnx.Rngs(0))
    assert _fwd_kernel_qkv(unfused, ids) == split
    _assert_same_run(_logits_and_grads(model, ids), model_unfused_pallas)


def test_model_packed_path_at_head_dim_128_matches_the_split_path():
    """head_dim 128 (as 1.4b, 6.9b, 12b; one head per lane block) takes the packed path too,
    its gradient written in place by the kernels: the same loss, logits and every gradient as
    the split path (rotary outside the kernel), fp32 1e-5."""
    cfg = _MODEL_CFG.replace(hidden_size=256, num_heads=2, num_layers=1, intermediate_size=512)
    assert cfg.head_dim == 128
    ids = jax.random.randint(jax.random.PRNGKey(4), (2, 256), 0, 256)
    base = GPTNeoX(cfg, rngs=nnx.Rngs(0))
    packed = GPTNeoX(cfg.replace(attention_impl="pallas"), rngs=nnx.Rngs(1))
    split = GPTNeoX(cfg.replace(attention_impl="pallas", fused_rotary=False), rngs=nnx.Rngs(2))
    nnx.update(packed, nnx.state(base))
    nnx.update(split, nnx.state(base))
    assert _fwd_kernel_qkv(packed, ids) == [((2, 256, 3 * 256), True)]
    assert _fwd_kernel_qkv(split, ids) == [((2, 2, 256, 128), False)]
    _assert_same_run(_logits_and_grads(packed, ids), _logits_and_grads(split, ids))
    # every Pythia size takes it: head_dim 128 / 256 (1b, 1.4b, 6.9b, 12b), 80 (2.8b: 8 heads
    # per 640-lane block); not 80 with a head count that is no multiple of 8
    from pythia_jax.attention import packed_supported
    assert packed_supported("pallas", 2, 256, 16, 128, jnp.bfloat16, rotary_dim=32)  # 1.4b
    assert packed_supported("pallas", 2, 256, 8, 256, jnp.bfloat16, rotary_dim=64)  # 1b
    assert packed_supported("pallas", 2, 256, 32, 128, jnp.bfloat16, rotary_dim=32)  # 6.9b
    assert packed_supported("pallas", 2, 256, 40, 128, jnp.bfloat16, rotary_dim=32)  # 12b
    assert packed_supported("pallas", 2, 256, 32, 80, jnp.bfloat16, rotary_dim=20)  # 2.8b
    assert not packed_supported("pallas", 2, 256, 12, 80, jnp.bfloat16, rotary_dim=20)


def test_model_fuses_rotary_wherever_the_kernel_runs(monkeypatch, caplog, model_reference):
    """The fusion is decided where `attend` resolves the impl: fused whenever that is our
    kernel (`pallas`, or `auto` picking it) unless fused_rotary=False. The TPU choice of `auto`
    is forced by making the dispatch see a TPU; the kernel itself stays in interpret mode."""
    ids = model_reference[0]

    def inputs(**changes):
        return _fwd_kernel_inputs(GPTNeoX(_MODEL_CFG.replace(**changes), rngs=nnx.Rngs(0)), ids)

    assert inputs(attention_impl="pallas") == [10]                       # the default
    assert inputs(attention_impl="pallas", fused_rotary=True) == [10]
    assert inputs(attention_impl="pallas", fused_rotary=False) == [3]
    assert inputs(attention_impl="pallas", rotary_pct=0.0) == [3]        # nothing to fuse
    assert inputs(attention_impl="auto") == []                           # CPU: auto runs xla
    with caplog.at_level(logging.WARNING, logger="pythia_jax"):
        assert inputs(attention_impl="auto", fused_rotary=False) == []
        assert not caplog.records
        assert inputs(attention_impl="auto", fused_rotary=True) == []    # asked, not possible
    assert any("fused_rotary=True: attention_impl='auto' runs 'xla' here" in r.getMessage()
               for r in caplog.records)
    monkeypatch.setattr(attention, "current_platform", lambda: "tpu")
    assert resolve_impl("auto", (2, 256, 2, 64), (2, 256, 2, 64), jnp.float32) == "pallas"
    assert inputs(attention_impl="auto") == [10]
    assert inputs(attention_impl="auto", fused_rotary=False) == [3]


def test_model_rotary_fused_under_auto_matches_unfused(monkeypatch, tmp_path, model_reference,
                                                       model_unfused_pallas):
    """`auto` picking our kernel (forced as above) fuses rotary by default, here for a model
    loaded with from_pretrained(..., attention_impl="auto"): the same loss, logits and
    gradients as the kernel with rotary outside it, fp32 at 1e-5."""
    import pythia_jax
    monkeypatch.setattr(attention, "current_platform", lambda: "tpu")
    pythia_jax.save_pretrained(GPTNeoX(_MODEL_CFG, rngs=nnx.Rngs(0)), tmp_path / "ckpt",
                               tokenizer=False)
    model = pythia_jax.from_pretrained(tmp_path / "ckpt", scan_layers=True, attention_impl="auto")
    assert model.config.attention_impl == "auto" and model.config.fused_rotary is None
    ids = model_reference[0]
    assert _fwd_kernel_inputs(model, ids) == [10]
    _assert_same_run(_logits_and_grads(model, ids), model_unfused_pallas)


# ------------------------------------------------------------------------------------------------
# Sharded: kernels inside shard_map on a 4-device CPU mesh (batch over data, heads over tensor)
_SHARDED = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from pythia_jax.attention import attend
    from pythia_jax.attention.xla import xla_attention
    from pythia_jax.layers import apply_rotary, rotary_tables
    from pythia_jax.sharding import logical_rules
    assert jax.device_count() == 4
    mesh = Mesh(np.array(jax.devices()).reshape(2, 1, 2), ("data", "fsdp", "tensor"))
    B, T, N, H = 2, 256, 4, 64
    ks = jax.random.split(jax.random.PRNGKey(0), 4)
    q, k, v, do = (jax.random.normal(kk, (B, T, N, H)) for kk in ks)
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    cos, sin = rotary_tables(pos, H // 4, 10000.0)
    spec = NamedSharding(mesh, P("data", None, "tensor", None))
    q, k, v, do = (jax.device_put(x, spec) for x in (q, k, v, do))

    def run(impl, rot):
        def f(q, k, v):
            with logical_rules(mesh):
                if rot:
                    return attend(q, k, v, impl=impl, rotary=(cos, sin))
                return attend(apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v, impl=impl)
        fn = jax.jit(lambda q, k, v, do: jax.vjp(f, q, k, v)[1](do) + (f(q, k, v),))
        text = fn.lower(q, k, v, do).as_text()
        return fn(q, k, v, do), text

    want, _ = run("xla", False)
    for impl, rot in (("pallas", False), ("pallas", True), ("splash", False)):
        got, text = run(impl, rot)
        assert "shard_map" in text or "sdy.manual_computation" in text, impl
        assert got[-1].sharding.spec == P("data", None, "tensor", None), got[-1].sharding
        for a, b in zip(got, want):
            np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)

    # The packed path (q, k, v in place in one [B, T, 3*N*H] array) runs per batch shard; a
    # mesh that splits the heads cannot split that array along them, so it is not offered.
    from pythia_jax.attention import attend_packed, packed_supported
    with logical_rules(mesh):
        assert not packed_supported("pallas", B, T, N, H, jnp.float32, rotary_dim=H // 4)
    mesh4 = Mesh(np.array(jax.devices()).reshape(4, 1, 1), ("data", "fsdp", "tensor"))
    B4 = 4
    q4, k4, v4, do4 = (jax.random.normal(kk, (B4, T, N, H)) for kk in ks)
    c4, s4 = rotary_tables(jnp.broadcast_to(jnp.arange(T), (B4, T)), H // 4, 10000.0)
    qkv = jax.device_put(jnp.concatenate([x.reshape(B4, T, N * H) for x in (q4, k4, v4)], -1),
                         NamedSharding(mesh4, P("data", None, None)))
    with logical_rules(mesh4):
        assert packed_supported("pallas", B4, T, N, H, jnp.float32, rotary_dim=H // 4)
    bias = jax.random.normal(jax.random.PRNGKey(8), (3 * N * H,))
    def fp(x, b):
        with logical_rules(mesh4):
            return attend_packed(x - bias, num_heads=N, bias=b, rotary=(c4, s4))
    def both(x, b):
        o, vjp = jax.vjp(fp, x, b)
        return (o,) + vjp(do4.reshape(B4, T, N * H))
    o4, g4, gb4 = jax.jit(both)(qkv, bias)
    assert o4.sharding.spec == P("data", None, None), o4.sharding
    ref = lambda q, k, v: xla_attention(apply_rotary(q, c4, s4), apply_rotary(k, c4, s4), v)
    o_ref, vjp = jax.vjp(ref, q4, k4, v4)
    np.testing.assert_allclose(o4.reshape(B4, T, N, H), o_ref, atol=1e-5, rtol=1e-5)
    g_ref = jnp.concatenate([x.reshape(B4, T, N * H) for x in vjp(do4)], -1)
    np.testing.assert_allclose(g4, g_ref, atol=1e-5, rtol=1e-5)
    # the replicated bias: its gradient summed over the 4 batch shards, not one shard's
    np.testing.assert_allclose(gb4, g_ref.sum((0, 1)), atol=1e-4, rtol=1e-5)
    print("SHARDED-OK")
""")


def test_kernels_run_inside_shard_map_on_a_4_device_mesh():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", _SHARDED], env=env, capture_output=True,
                         text=True, timeout=600)
    assert "SHARDED-OK" in out.stdout, out.stdout[-3000:] + out.stderr[-3000:]
