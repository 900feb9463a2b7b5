"""Reference attention in plain XLA ops (the correctness oracle for every kernel).

softmax(q k^T * H**-0.5 [masked]) v with float32 scores, computed head-major ([B, N, T, H]:
each head's matmuls are plain batched GEMMs) with the normalisation deferred to the output
(o = (e v) / sum(e), e = exp(s - max s): one exponential per score, as a flash kernel does).
Causal attention is split into query blocks that each see only the keys up to their last
position, skipping most of the masked upper triangle (up to 4 blocks: 10/16 of the full
score FLOPs); the result is the same up to float rounding. The blocks are used when tracing for
CPU only (`target.current_platform()`; elsewhere: one block; see `_query_blocks`). This is the `xla` impl of `attend`
and the path for CPU; on CPU it makes the 160m forward about 8% faster than the unblocked,
token-major form (bench/forward.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pythia_jax.attention.target import current_platform

MASK_VALUE = float(jnp.finfo(jnp.float32).min)

#: Causal attention with at least 2 * this many queries is split into query blocks.
MIN_QUERY_BLOCK = 64
#: At most this many query blocks (more blocks skip more of the triangle but add ops).
MAX_QUERY_BLOCKS = 4


#: Platforms for which causal attention is split into query blocks: CPU only, where it is
#: measured faster and checked by the tests. On an H100 (jax 0.11.2) XLA:GPU compiled the
#: blocked bf16 attention followed by the output projection to wrong values
#: (`bench/gpu_blocked_attention_repro.py`); TPUs never ran it.
BLOCKED_BACKENDS = ("cpu",)


def _query_blocks(T: int, causal: bool, has_mask: bool) -> list[tuple[int, int]]:
    if current_platform() not in BLOCKED_BACKENDS:
        return [(0, T)]
    if not causal or has_mask or T < 2 * MIN_QUERY_BLOCK:
        return [(0, T)]
    n = min(MAX_QUERY_BLOCKS, T // MIN_QUERY_BLOCK)
    size = -(-T // n)
    return [(s, min(T, s + size)) for s in range(0, T, size)]


def xla_attention(q_BTNH, k_BSNH, v_BSNH, *, causal: bool = True, mask=None, return_lse=False):
    """Attention [B, T, N, H] in q's dtype; the queries are the last T of the S key positions.

    mask: optional bool [B, T, S] (True = may attend). return_lse: also the float32
    logsumexp of the scaled, masked scores, [B, N, T].
    """
    T, S, H = q_BTNH.shape[1], k_BSNH.shape[1], q_BTNH.shape[-1]
    q = jnp.swapaxes(q_BTNH, 1, 2)  # [B, N, T, H]
    k = jnp.swapaxes(k_BSNH, 1, 2)
    v = jnp.swapaxes(v_BSNH, 1, 2)
    outs, lses = [], []
    for t0, t1 in _query_blocks(T, causal, mask is not None):
        # Keys a causal block can see: up to its last query's position.
        s1 = S - T + t1 if causal else S
        s = jnp.einsum("bnth,bnsh->bnts", q[:, :, t0:t1], k[:, :, :s1],
                       preferred_element_type=jnp.float32) * (H ** -0.5)
        if causal:
            allowed = jnp.arange(s1)[None, :] <= (S - T + t0 + jnp.arange(t1 - t0))[:, None]
            s = jnp.where(allowed[None, None], s, MASK_VALUE)
        if mask is not None:
            s = jnp.where(mask[:, None, t0:t1, :s1], s, MASK_VALUE)
        # Any constant per row gives the same result; no gradient through the max.
        m = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
        e = jnp.exp(s - m)
        denom = jnp.sum(e, axis=-1, keepdims=True)
        o = jnp.einsum("bnts,bnsh->bnth", e.astype(v.dtype), v[:, :, :s1],
                       preferred_element_type=jnp.float32) / denom
        outs.append(o)
        if return_lse:
            lses.append((m + jnp.log(denom))[..., 0])
    o = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=2)
    o = jnp.swapaxes(o, 1, 2).astype(q_BTNH.dtype)
    if return_lse:
        lse = lses[0] if len(lses) == 1 else jnp.concatenate(lses, axis=2)
        return o, lse
    return o
