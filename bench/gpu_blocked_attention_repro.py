"""Repro: XLA:GPU miscompiles the query-blocked XLA attention followed by a bf16 projection.

    python bench/gpu_blocked_attention_repro.py

Forces the causal query blocks (`pythia_jax.attention.xla.BLOCKED_BACKENDS`, CPU-only by
default) and compares, in bfloat16 against a float32 "highest" reference (error = max |diff|
/ max |reference|):

  A. attention of q, k, v sliced from a fused [B, T, N, 3, H] tensor (as the model does);
  B. the same with separate q, k, v arrays;
  C. A followed by the output projection einsum("btnh,nhd->btd");
  D. one whole pythia-160m layer (`layers.decoder_layer` with the model's causal attention).

On CPU all four are ~0.3-0.6 %. On one H100 with jax 0.11.2 (CUDA 13 plugins), A and B were
0.29 % but C was 122 % and D 8.9 %; with one query block (the library's setting off CPU) the
whole model is correct there (bench/RESULTS.md, GPU). Run it on a newer jax to see whether the
blocks can be enabled on GPUs again.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from pythia_jax.attention import xla as X
from pythia_jax.config import get_preset
from pythia_jax.layers import decoder_layer, rotary_tables
from pythia_jax.model import GPTNeoX, causal_attention


def _rel(got, ref) -> float:
    return float(jnp.abs(got.astype(jnp.float32) - ref).max() / jnp.abs(ref).max())


def main() -> None:
    X.BLOCKED_BACKENDS = (jax.default_backend(),)  # force the query blocks here
    B, T, N, H, D = 2, 256, 12, 64, 768
    assert len(X._query_blocks(T, True, False)) == 4
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}")
    qkv = jax.random.normal(jax.random.PRNGKey(0), (B, T, N, 3, H), jnp.float32)
    w = jax.random.normal(jax.random.PRNGKey(1), (N, H, D), jnp.float32) * 0.05

    def attn(t):
        return X.xla_attention(t[:, :, :, 0], t[:, :, :, 1], t[:, :, :, 2])

    def attn_proj(t, w):
        return jnp.einsum("btnh,nhd->btd", attn(t), w.astype(t.dtype),
                          preferred_element_type=jnp.float32)

    with jax.default_matmul_precision("highest"):
        ref_a = jax.jit(attn)(qkv)
        ref_c = jax.jit(attn_proj)(qkv, w)
    q16 = qkv.astype(jnp.bfloat16)
    print(f"A  attention, q/k/v sliced from qkv: {_rel(jax.jit(attn)(q16), ref_a):.4f}")
    sep = [q16[:, :, :, i] for i in range(3)]
    print(f"B  attention, separate q/k/v:        "
          f"{_rel(jax.jit(X.xla_attention)(*sep), ref_a):.4f}")
    print(f"C  attention + output projection:    {_rel(jax.jit(attn_proj)(q16, w), ref_c):.4f}")

    cfg = get_preset("pythia-160m")
    p = jax.tree.map(lambda a: a[0], GPTNeoX(cfg, rngs=nnx.Rngs(0)).layer_params())
    x = jax.random.normal(jax.random.PRNGKey(2), (B, T, D), jnp.float32)
    cos, sin = rotary_tables(jnp.broadcast_to(jnp.arange(T), (B, T)), cfg.rotary_dim,
                             cfg.rotary_emb_base)
    with jax.default_matmul_precision("highest"):
        ref_d = jax.jit(lambda p, x: decoder_layer(cfg, p, x, (cos, sin),
                                                   causal_attention(cfg.attention_impl))[0])(p, x)
    c16 = dataclasses.replace(cfg, dtype="bfloat16", attention_impl="xla")
    got_d = jax.jit(lambda p, x: decoder_layer(c16, p, x.astype(jnp.bfloat16), (cos, sin),
                                               causal_attention("xla"))[0])(p, x)
    print(f"D  one pythia-160m layer:            {_rel(got_d, ref_d):.4f}")


if __name__ == "__main__":
    main()
