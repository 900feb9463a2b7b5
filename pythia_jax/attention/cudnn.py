"""cuDNN flash attention via the public `jax.nn.dot_product_attention(implementation="cudnn")`."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pythia_jax.attention.pallas_tpu import UnsupportedShapeError
from pythia_jax.attention.target import current_platform

__all__ = ["cudnn_attention", "check_supported"]

#: cuDNN flash attention: head_dim a multiple of 8, at most 256 (Hopper+; 128 on Ampere).
MAX_HEAD_DIM = 256


def check_supported(q_shape, k_shape, dtype, *, causal: bool = True) -> None:
    H = q_shape[-1]
    T, S = q_shape[1], k_shape[1]
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise UnsupportedShapeError(
            f"cudnn attention: inputs must be bfloat16 or float16, got {jnp.dtype(dtype).name}")
    if H % 8 or not 0 < H <= MAX_HEAD_DIM:
        raise UnsupportedShapeError(
            f"cudnn attention: head_dim must be a multiple of 8 in [8, {MAX_HEAD_DIM}], got {H}")
    if causal and S != T:
        # jax.nn's is_causal aligns the mask top-left; our convention puts the queries last.
        raise UnsupportedShapeError(
            f"cudnn attention: causal needs key length == query length, got T={T}, S={S}")


def cudnn_attention(q_BTNH, k_BSNH, v_BSNH, *, causal: bool = True):
    """Causal (or full) attention with scale head_dim**-0.5 on a CUDA GPU -> [B, T, N, H]."""
    platform = current_platform()
    if platform != "gpu":
        raise ValueError(f"attention_impl='cudnn' needs a CUDA GPU with cuDNN; the target "
                         f"platform is {platform!r}")
    check_supported(q_BTNH.shape, k_BSNH.shape, q_BTNH.dtype, causal=causal)
    H = q_BTNH.shape[-1]
    dtype = q_BTNH.dtype
    return jax.nn.dot_product_attention(q_BTNH, k_BSNH.astype(dtype), v_BSNH.astype(dtype),
                                        scale=H ** -0.5, is_causal=causal,
                                        implementation="cudnn")
