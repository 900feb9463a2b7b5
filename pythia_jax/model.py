"""Flax NNX GPT-NeoX, exact to Pythia (reference doc section 1).

Layout of the parameters (all layer parameters are stacked on a leading `layers` axis, so the
same tree serves the unrolled loop and `scan_layers=True`):

    embed_in.embedding                         [V, d]           (vocab, embed)
    layers.input_layernorm.{scale,bias}        [L, d]           (layers, norm)
    layers.post_attention_layernorm.{…}        [L, d]
    layers.attention.query_key_value.kernel    [L, d, nh, 3, hd] (layers, embed, heads, qkv, head_dim)
    layers.attention.query_key_value.bias      [L, nh, 3, hd]
    layers.attention.dense.kernel              [L, nh, hd, d]
    layers.attention.dense.bias                [L, d]
    layers.mlp.dense_h_to_4h.{kernel,bias}     [L, d, ff] / [L, ff]
    layers.mlp.dense_4h_to_h.{kernel,bias}     [L, ff, d] / [L, d]
    final_layer_norm.{scale,bias}              [d]
    embed_out.embedding                        [V, d]           (untied, no bias)

The QKV kernel keeps HF's head-interleaved order explicitly: `[.., heads, 3, head_dim]` with
3 = (q, k, v). Shape suffixes in names: B batch, T query length, S key length, D model width,
N heads, H head dim, F MLP width, V vocab.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from pythia_jax import attention as attention_lib
from pythia_jax.config import ModelConfig
from pythia_jax.sharding import constrain

__all__ = ["GPTNeoX", "KVCache", "forward", "block_forward", "rotary_tables", "apply_rotary",
           "layer_norm", "param_logical_axes", "init_std"]

_DT = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype_of(name: str):
    return _DT[name]


# ------------------------------------------------------------------------------------------------
# Initialization (reference doc 1.6)
def init_std(method: str, cfg: ModelConfig) -> float:
    d, L = cfg.hidden_size, cfg.num_layers
    if method == "small_init":
        return math.sqrt(2.0 / (5.0 * d))
    if method == "wang_init":
        return 2.0 / (L * math.sqrt(d))
    if method == "normal":
        return cfg.init_std
    if method == "scaled_normal":
        return cfg.init_std / math.sqrt(2.0 * L)
    raise ValueError(f"unknown init method {method!r}")


def _param(rngs: nnx.Rngs | None, shape, dtype, axes, std: float | None = None, fill=0.0):
    """A Param carrying its logical axis names; normal(std) when std is given, else `fill`."""
    if std is not None:
        value = std * jax.random.normal(rngs.params(), shape, jnp.float32)
        value = value.astype(dtype)
    else:
        value = jnp.full(shape, fill, dtype)
    return nnx.Param(value, logical_axes=tuple(axes))


class _LayerNorm(nnx.Module):
    def __init__(self, shape, dtype, axes):
        self.scale = _param(None, shape, dtype, axes, fill=1.0)
        self.bias = _param(None, shape, dtype, axes, fill=0.0)


class _Dense(nnx.Module):
    def __init__(self, rngs, kshape, bshape, dtype, kaxes, baxes, std):
        self.kernel = _param(rngs, kshape, dtype, kaxes, std=std)
        self.bias = _param(None, bshape, dtype, baxes, fill=0.0)


class _Embedding(nnx.Module):
    def __init__(self, rngs, V, d, dtype, std):
        self.embedding = _param(rngs, (V, d), dtype, ("vocab", "embed"), std=std)


class _Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs, dtype):
        L, d, N, H = cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.head_dim
        self.query_key_value = _Dense(
            rngs, (L, d, N, 3, H), (L, N, 3, H), dtype,
            ("layers", "embed", "heads", "qkv", "head_dim"), ("layers", "heads", "qkv", "head_dim"),
            init_std(cfg.init_method, cfg))
        self.dense = _Dense(
            rngs, (L, N, H, d), (L, d), dtype, ("layers", "heads", "head_dim", "embed"),
            ("layers", "norm"), init_std(cfg.output_init_method, cfg))


class _MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs, dtype):
        L, d, F = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size
        self.dense_h_to_4h = _Dense(rngs, (L, d, F), (L, F), dtype, ("layers", "embed", "mlp"),
                                    ("layers", "mlp"), init_std(cfg.init_method, cfg))
        self.dense_4h_to_h = _Dense(rngs, (L, F, d), (L, d), dtype, ("layers", "mlp", "embed"),
                                    ("layers", "norm"), init_std(cfg.output_init_method, cfg))


class _Layers(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs, dtype):
        L, d = cfg.num_layers, cfg.hidden_size
        self.input_layernorm = _LayerNorm((L, d), dtype, ("layers", "norm"))
        self.post_attention_layernorm = _LayerNorm((L, d), dtype, ("layers", "norm"))
        self.attention = _Attention(cfg, rngs, dtype)
        self.mlp = _MLP(cfg, rngs, dtype)


# ------------------------------------------------------------------------------------------------
# KV cache (generation)
@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Preallocated per-layer keys/values.

    k, v: [L, B, S, N, H] (post-rotary keys). key_valid: [B, S] bool, which slots hold real tokens
    (left padding stays False). index: int32 scalar, the next slot to write.
    """

    k: jax.Array
    v: jax.Array
    key_valid: jax.Array
    index: jax.Array

    @classmethod
    def empty(cls, cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> "KVCache":
        dt = dtype or dtype_of(cfg.dtype)
        shape = (cfg.num_layers, batch, max_len, cfg.num_heads, cfg.head_dim)
        return cls(jnp.zeros(shape, dt), jnp.zeros(shape, dt),
                   jnp.zeros((batch, max_len), bool), jnp.zeros((), jnp.int32))


# ------------------------------------------------------------------------------------------------
# Pure building blocks
def layer_norm(x, scale, bias, eps):
    """Two-pass LayerNorm in float32 (torch semantics), returned in x's dtype."""
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + eps)
    y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return y.astype(x.dtype)


def rotary_tables(positions_BT, rotary_dim: int, base: float):
    """cos, sin [B, T, rotary_dim] in float32 (HF / NeoX rotate-half convention)."""
    inv_freq = 1.0 / (base ** (jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim))
    angle = positions_BT.astype(jnp.float32)[..., None] * inv_freq  # [B, T, r/2]
    emb = jnp.concatenate([angle, angle], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rotary(x_BTNH, cos_BTR, sin_BTR):
    """Rotate the first R channels of every head (rotate_half), pass the rest through."""
    R = cos_BTR.shape[-1]
    if R == 0:
        return x_BTNH
    x_rot = x_BTNH[..., :R].astype(jnp.float32)
    x_pass = x_BTNH[..., R:]
    half = R // 2
    rotated = jnp.concatenate([-x_rot[..., half:], x_rot[..., :half]], axis=-1)
    cos, sin = cos_BTR[:, :, None, :], sin_BTR[:, :, None, :]
    out = (x_rot * cos + rotated * sin).astype(x_BTNH.dtype)
    return jnp.concatenate([out, x_pass], axis=-1)


def _gelu(x, approximate: bool):
    return jax.nn.gelu(x, approximate=approximate)


def block_forward(cfg: ModelConfig, p: dict, x_BTD, cos_BTR, sin_BTR, *, cache_kv=None,
                  cache_index=None, key_valid_BS=None):
    """One GPT-NeoX layer. `p` holds this layer's arrays (no leading layers axis).

    Without a cache: causal self-attention over the T tokens. With `cache_kv=(k, v)` of
    [B, S, N, H]: the new keys/values are written at `cache_index` and the queries attend over
    the cache, masked by `key_valid_BS` and slot causality. Returns (x, new_cache_kv or None).
    """
    cdt = dtype_of(cfg.dtype)
    eps = cfg.layer_norm_eps

    def dense(h, kernel, bias, eq):
        y = jnp.einsum(eq, h, kernel.astype(cdt), preferred_element_type=jnp.float32)
        return (y + bias.astype(jnp.float32)).astype(cdt)

    a = layer_norm(x_BTD, p["ln1_scale"], p["ln1_bias"], eps)
    qkv = dense(a, p["qkv_kernel"], p["qkv_bias"], "btd,dnkh->btnkh")  # [B,T,N,3,H]
    q, k, v = qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2]
    fused = cfg.attention_impl == "pallas" and getattr(cfg, "fused_rotary", False)
    if not fused:
        q = apply_rotary(q, cos_BTR, sin_BTR)
        k = apply_rotary(k, cos_BTR, sin_BTR)
    q = constrain(q, ("batch", "length", "act_heads", None))
    k = constrain(k, ("batch", "length", "act_heads", None))
    v = constrain(v, ("batch", "length", "act_heads", None))

    new_cache = None
    if cache_kv is None:
        o = attention_lib.attend(q, k, v, impl=cfg.attention_impl, causal=True,
                                 rotary=(cos_BTR, sin_BTR) if fused else None)
    else:
        ck, cv = cache_kv
        ck = jax.lax.dynamic_update_slice_in_dim(ck, k.astype(ck.dtype), cache_index, axis=1)
        cv = jax.lax.dynamic_update_slice_in_dim(cv, v.astype(cv.dtype), cache_index, axis=1)
        T, S = q.shape[1], ck.shape[1]
        q_slot = cache_index + jnp.arange(T)
        mask_BTS = (jnp.arange(S)[None, None, :] <= q_slot[None, :, None]) & key_valid_BS[:, None, :]
        o = attention_lib.attend(q, ck.astype(cdt), cv.astype(cdt), impl="xla", causal=False,
                                 mask=mask_BTS)
        new_cache = (ck, cv)
    o = checkpoint_name(o, "attn_out")
    attn_out = dense(o, p["out_kernel"], p["out_bias"], "btnh,nhd->btd")

    if cfg.use_parallel_residual:
        m = layer_norm(x_BTD, p["ln2_scale"], p["ln2_bias"], eps)
    else:
        x_BTD = x_BTD + attn_out
        m = layer_norm(x_BTD, p["ln2_scale"], p["ln2_bias"], eps)
    h = dense(m, p["mlp_in_kernel"], p["mlp_in_bias"], "btd,df->btf")
    h = constrain(h, ("batch", "length", "act_mlp"))
    h = _gelu(h, cfg.gelu_approximate)
    mlp_out = dense(h, p["mlp_out_kernel"], p["mlp_out_bias"], "btf,fd->btd")
    if cfg.use_parallel_residual:
        x_BTD = x_BTD + attn_out + mlp_out
    else:
        x_BTD = x_BTD + mlp_out
    x_BTD = constrain(x_BTD, ("batch", "length", "act_embed"))
    return x_BTD, new_cache


_REMAT = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_attn_out": jax.checkpoint_policies.save_only_these_names("attn_out"),
}


# ------------------------------------------------------------------------------------------------
class GPTNeoX(nnx.Module):
    """GPT-NeoX causal LM. `model(input_ids_BT) -> logits_BTV` (float32, padded vocab width)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config = cfg
        pdt = dtype_of(cfg.param_dtype)
        d, V = cfg.hidden_size, cfg.vocab_size
        self.embed_in = _Embedding(rngs, V, d, pdt, init_std(cfg.init_method, cfg))
        self.layers = _Layers(cfg, rngs, pdt)
        self.final_layer_norm = _LayerNorm((d,), pdt, ("norm",))
        self.embed_out = _Embedding(rngs, V, d, pdt, init_std(cfg.init_method, cfg))

    # -- per-layer parameter dict with a leading layers axis -------------------------------------
    def layer_params(self) -> dict:
        ly = self.layers
        return {
            "ln1_scale": ly.input_layernorm.scale[...],
            "ln1_bias": ly.input_layernorm.bias[...],
            "ln2_scale": ly.post_attention_layernorm.scale[...],
            "ln2_bias": ly.post_attention_layernorm.bias[...],
            "qkv_kernel": ly.attention.query_key_value.kernel[...],
            "qkv_bias": ly.attention.query_key_value.bias[...],
            "out_kernel": ly.attention.dense.kernel[...],
            "out_bias": ly.attention.dense.bias[...],
            "mlp_in_kernel": ly.mlp.dense_h_to_4h.kernel[...],
            "mlp_in_bias": ly.mlp.dense_h_to_4h.bias[...],
            "mlp_out_kernel": ly.mlp.dense_4h_to_h.kernel[...],
            "mlp_out_bias": ly.mlp.dense_4h_to_h.bias[...],
        }

    def __call__(self, input_ids_BT, *, positions_BT=None, cache: KVCache | None = None,
                 attention_mask_BT=None, return_hidden: bool = False):
        """Logits [B, T, V] float32 (and the updated cache when `cache` is given).

        `positions_BT` default to 0..T-1 (or, with a cache, continue from the cache index).
        `attention_mask_BT` (1 = real token) marks left padding; only used with a cache.
        """
        cfg = self.config
        cdt = dtype_of(cfg.dtype)
        input_ids_BT = jnp.asarray(input_ids_BT)
        if input_ids_BT.ndim != 2:
            raise ValueError(f"input_ids: expected shape [batch, length], got {input_ids_BT.shape}")
        B, T = input_ids_BT.shape
        if positions_BT is None:
            start = 0 if cache is None else cache.index
            positions_BT = jnp.broadcast_to(start + jnp.arange(T, dtype=jnp.int32), (B, T))
        x = jnp.take(self.embed_in.embedding[...], input_ids_BT, axis=0).astype(cdt)
        x = constrain(x, ("batch", "length", "act_embed"))
        cos, sin = rotary_tables(positions_BT, cfg.rotary_dim, cfg.rotary_emb_base)
        lp = self.layer_params()

        if cache is None:
            def body(x, p):
                return block_forward(cfg, p, x, cos, sin)[0], None
            if _REMAT[cfg.remat] is not None:
                body = jax.checkpoint(body, policy=_REMAT[cfg.remat], prevent_cse=not cfg.scan_layers)
            if cfg.scan_layers:
                x, _ = jax.lax.scan(body, x, lp)
            else:
                for i in range(cfg.num_layers):
                    x, _ = body(x, jax.tree.map(lambda a: a[i], lp))
            new_cache = None
        else:
            if attention_mask_BT is None:
                attention_mask_BT = jnp.ones((B, T), bool)
            key_valid = jax.lax.dynamic_update_slice_in_dim(
                cache.key_valid, attention_mask_BT.astype(bool), cache.index, axis=1)

            def body(x, xs):
                p, ck, cv = xs
                x, (ck, cv) = block_forward(cfg, p, x, cos, sin, cache_kv=(ck, cv),
                                            cache_index=cache.index, key_valid_BS=key_valid)
                return x, (ck, cv)
            if cfg.scan_layers:
                x, (ks, vs) = jax.lax.scan(body, x, (lp, cache.k, cache.v))
            else:
                ks, vs = [], []
                for i in range(cfg.num_layers):
                    x, (ck, cv) = body(x, (jax.tree.map(lambda a: a[i], lp), cache.k[i], cache.v[i]))
                    ks.append(ck)
                    vs.append(cv)
                ks, vs = jnp.stack(ks), jnp.stack(vs)
            new_cache = KVCache(ks, vs, key_valid, cache.index + T)

        x = layer_norm(x, self.final_layer_norm.scale[...], self.final_layer_norm.bias[...],
                       cfg.layer_norm_eps)
        if return_hidden:
            return x if new_cache is None else (x, new_cache)
        logits = jnp.einsum("btd,vd->btv", x, self.embed_out.embedding[...].astype(cdt),
                            preferred_element_type=jnp.float32)
        logits = constrain(logits, ("batch", "length", "act_vocab"))
        return logits if new_cache is None else (logits, new_cache)


@functools.partial(jax.jit, static_argnames=("graphdef", "return_hidden"))
def _forward_jit(graphdef, state, input_ids_BT, positions_BT, return_hidden):
    return nnx.merge(graphdef, state)(input_ids_BT, positions_BT=positions_BT,
                                      return_hidden=return_hidden)


def forward(model: GPTNeoX, input_ids_BT, *, positions_BT=None, return_hidden: bool = False):
    """`model(input_ids_BT)` compiled: logits [B, T, V] float32 (or the final hidden states).

    One `jax.jit` per (model structure, input shape), reused across calls and across models
    of the same config. Calling `model(ids)` directly runs op by op (about 3x slower for
    pythia-160m on CPU), and `nnx.jit(lambda m, ids: m(ids))` returns a copy of every
    parameter on each call (about 1.6x slower); this splits the model into its structure
    (static) and arrays instead. Token ids are checked against the vocabulary (an
    out-of-range id would otherwise embed as NaN).
    """
    if not isinstance(model, GPTNeoX):
        raise TypeError(f"model: expected a pythia_jax GPTNeoX, got {type(model).__name__}")
    ids = input_ids_BT
    if not isinstance(ids, jax.Array):
        ids = np.asarray(ids)
    if ids.ndim != 2:
        raise ValueError(f"input_ids: expected shape [batch, length], got {tuple(ids.shape)}")
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(f"input_ids: expected integer token ids, got dtype {ids.dtype}")
    if ids.size and (not isinstance(ids, jax.Array) or ids.is_fully_addressable):
        lo, hi = int(ids.min()), int(ids.max())
        V = model.config.vocab_size
        if lo < 0 or hi >= V:
            bad = lo if lo < 0 else hi
            raise ValueError(f"input_ids: token id {bad} is outside the vocabulary [0, {V})")
    graphdef, state = nnx.split(model)
    return _forward_jit(graphdef, state, jnp.asarray(ids, jnp.int32), positions_BT,
                        return_hidden)


def param_logical_axes(model: GPTNeoX) -> Any:
    """A pytree (matching `nnx.state(model, nnx.Param)`) of logical-axis tuples."""
    state = nnx.state(model, nnx.Param)
    return jax.tree.map(lambda v: v.logical_axes, state,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))


def abstract_model(cfg: ModelConfig) -> GPTNeoX:
    """The model with ShapeDtypeStruct leaves; allocates nothing (works for 12b)."""
    return nnx.eval_shape(lambda: GPTNeoX(cfg, rngs=nnx.Rngs(0)))


def count_params(model: GPTNeoX) -> dict:
    """Total and non-embedding counts from the real (possibly abstract) parameter tree."""
    total = 0
    embed = 0
    for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        n = math.prod(v.get_value().shape if isinstance(v, nnx.Variable) else v.shape)
        total += n
        if path[0] in ("embed_in", "embed_out"):
            embed += n
    return {"total": total, "non_embedding": total - embed}
