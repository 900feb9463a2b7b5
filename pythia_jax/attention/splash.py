"""JAX's shipped TPU splash attention kernel, at the model's layout (used as a dependency).

`splash_attention(q_BTNH, k_BSNH, v_BSNH, *, causal=True, block_sizes=None, interpret=None)`.
Splash has no softmax-scale argument, so q is scaled by head_dim**-0.5 in float32 and cast back
to its dtype before the call (exact for head_dim 64 and 256, one bf16 rounding otherwise).
Splash has no batch axis: it is vmapped over the batch. The kernel object (and its block-sparse
mask metadata, built with numpy at trace time) is cached per shape.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

from pythia_jax.attention.pallas_tpu import SEQ_MULTIPLE, UnsupportedShapeError
from pythia_jax.attention.target import resolve_interpret

__all__ = ["splash_attention", "check_supported", "default_block_sizes"]

#: Splash head_dim limit we compile-checked (64, 80, 128, 256 all compile for v4/v5e/v5p/v6e).
MAX_HEAD_DIM = 256


def _fit(block: int, length: int) -> int:
    b = min(block, length)
    while length % b:
        b //= 2
    return b


def default_block_sizes(T: int, S: int, block: int = 512) -> sk.BlockSizes:
    """512 everywhere (MaxText / Levanter default), clipped so each block divides its length."""
    bq, bk = _fit(block, T), _fit(block, S)
    return sk.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq,
                         block_kv_dkv=bk, block_kv_dkv_compute=bk, block_q_dq=bq, block_kv_dq=bk)


def check_supported(q_shape, k_shape, *, causal: bool = True) -> None:
    B, T, N, H = q_shape
    S = k_shape[1]
    for what, n in (("query", T), ("key", S)):
        if n % SEQ_MULTIPLE or n == 0:
            raise UnsupportedShapeError(
                f"splash attention: the {what} length must be a positive multiple of "
                f"{SEQ_MULTIPLE}, got {n}")
    if not 0 < H <= MAX_HEAD_DIM:
        raise UnsupportedShapeError(
            f"splash attention: head_dim must be in [1, {MAX_HEAD_DIM}], got {H}")
    if causal and S < T:
        raise UnsupportedShapeError(f"splash attention: causal needs key length >= query length, "
                                    f"got T={T}, S={S}")


@functools.lru_cache(maxsize=64)
def _kernel(N: int, T: int, S: int, causal: bool, blocks: sk.BlockSizes, interpret):
    if causal:
        mask = sm.CausalMask((T, S), offset=S - T)
    else:
        mask = sm.FullMask((T, S))
    # Built concretely even when first called under a trace: the cached kernel must hold no
    # tracers (its mask metadata arrays are constants).
    with jax.ensure_compile_time_eval():
        return sk.make_splash_mha(sm.MultiHeadMask([mask] * N), block_sizes=blocks,
                                  head_shards=1, q_seq_shards=1, interpret=interpret)


def splash_attention(q_BTNH, k_BSNH, v_BSNH, *, causal: bool = True,
                     block_sizes: sk.BlockSizes | None = None, interpret=None):
    """Causal (or full) attention with scale head_dim**-0.5 -> [B, T, N, H] in q's dtype."""
    check_supported(q_BTNH.shape, k_BSNH.shape, causal=causal)
    B, T, N, H = q_BTNH.shape
    S = k_BSNH.shape[1]
    blocks = block_sizes or default_block_sizes(T, S)
    kernel = _kernel(N, T, S, bool(causal), blocks, resolve_interpret(interpret, "splash"))
    dtype = q_BTNH.dtype
    q = (q_BTNH.astype(jnp.float32) * (H ** -0.5)).astype(dtype)
    t = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731  BTNH <-> BNTH
    o = jax.vmap(kernel)(t(q), t(k_BSNH.astype(dtype)), t(v_BSNH.astype(dtype)))
    return t(o).astype(dtype)
