"""One dispatch point for causal attention.

`attend(q_BTNH, k_BSNH, v_BSNH, impl=…)` -> o_BTNH. Implementations:
  xla    reference einsum (any backend; materializes the T x S scores)
  pallas our Pallas TPU flash kernel (forward + backward), optional fused rotary
  splash JAX's shipped TPU splash kernel
  cudnn  `jax.nn.dot_product_attention(implementation="cudnn")` (GPU)
  auto   TPU: pallas (or splash), GPU: cudnn, CPU: xla
"""

from __future__ import annotations

from pythia_jax.attention.xla import xla_attention

__all__ = ["attend", "xla_attention", "IMPLS"]

IMPLS = ("xla", "pallas", "splash", "cudnn", "auto")


def attend(q, k, v, *, impl: str = "xla", causal: bool = True, mask=None, rotary=None):
    """Scaled dot-product attention with scale head_dim**-0.5 and softmax in float32.

    q [B, T, N, H]; k, v [B, S, N, H]. `mask` [B, T, S] bool (True = attend) is only supported
    by `xla`. `rotary=(cos_BTR, sin_BTR)` asks a fused-rotary kernel to rotate q and k itself.
    """
    if impl not in IMPLS:
        raise ValueError(f"attention_impl: expected one of {IMPLS}, got {impl!r}")
    if rotary is not None and impl != "pallas":
        raise ValueError("fused rotary is only available with attention_impl='pallas'")
    if impl == "xla" or (impl == "auto" and mask is not None):
        return xla_attention(q, k, v, causal=causal, mask=mask)
    raise NotImplementedError(f"attention_impl={impl!r} is not available yet")
