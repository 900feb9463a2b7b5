"""Reference attention in plain XLA ops (the correctness oracle for every kernel)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

MASK_VALUE = float(jnp.finfo(jnp.float32).min)


def xla_attention(q_BTNH, k_BSNH, v_BSNH, *, causal: bool = True, mask=None, return_lse=False):
    """softmax(q k^T * H**-0.5 [masked]) v with float32 scores; returns o in q's dtype."""
    T, S, H = q_BTNH.shape[1], k_BSNH.shape[1], q_BTNH.shape[-1]
    scores = jnp.einsum("btnh,bsnh->bnts", q_BTNH, k_BSNH, preferred_element_type=jnp.float32)
    scores = scores * (H ** -0.5)
    if causal:
        # Queries are the last T positions of the S keys.
        allowed = jnp.arange(S)[None, :] <= (S - T + jnp.arange(T))[:, None]
        scores = jnp.where(allowed[None, None], scores, MASK_VALUE)
    if mask is not None:
        scores = jnp.where(mask[:, None, :, :], scores, MASK_VALUE)
    lse = jax.nn.logsumexp(scores, axis=-1)  # [B, N, T]
    probs = jnp.exp(scores - lse[..., None])
    o = jnp.einsum("bnts,bsnh->btnh", probs.astype(v_BSNH.dtype), v_BSNH,
                   preferred_element_type=jnp.float32).astype(q_BTNH.dtype)
    return (o, lse) if return_lse else o
