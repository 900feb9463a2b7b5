"""Flax NNX GPT-NeoX, exact to Pythia (reference doc section 1).

Layout of the parameters (all layer parameters are stacked on a leading `layers` axis, so the
same tree serves the unrolled loop and `scan_layers=True`):

    embed_in.embedding                         [V, d]           (vocab, embed)
    layers.input_layernorm.{scale,bias}        [L, d]           (layers, norm)
    layers.post_attention_layernorm.{…}        [L, d]
    layers.attention.query_key_value.kernel    [L, d, 3, nh, hd] (layers, embed, qkv, heads, head_dim)
    layers.attention.query_key_value.bias      [L, 3, nh, hd]
    layers.attention.dense.kernel              [L, nh, hd, d]
    layers.attention.dense.bias                [L, d]
    layers.mlp.dense_h_to_4h.{kernel,bias}     [L, d, ff] / [L, ff]
    layers.mlp.dense_4h_to_h.{kernel,bias}     [L, ff, d] / [L, d]
    final_layer_norm.{scale,bias}              [d]
    embed_out.embedding                        [V, d]           (untied, no bias)

The QKV kernel is `[.., 3, heads, head_dim]` with 3 = (q, k, v): the projection's output splits
into q, k and v along a major axis, each already [B, T, N, H]. HF's fused rows are
head-interleaved (`[heads, 3, head_dim]`); `weights` permutes them once on load and export
(round trips stay bit-exact). Checkpoints written before this order (no `param_layout` in their
config: `checkpoint.PARAM_LAYOUT`) are permuted when read. Shape suffixes in names: B batch, T query length, S key length, D model width,
N heads, H head dim, F MLP width, V vocab.

The layer itself is `layers.decoder_layer` (the one copy used by training, the cached prefill
and decoding); this module holds the parameter tree, the KV cache, the attention steps the
layer is given (causal kernels through `attention.attend`, or a write into the cache plus
masked attention), the layer loop (unrolled or `lax.scan`, with remat) and the embeddings.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pythia_jax import attention as attention_lib
from pythia_jax.attention.xla import MASK_VALUE
from pythia_jax.config import ModelConfig
from pythia_jax.layers import Taps, decoder_layer, dtype_of, layer_norm, rotary_tables
from pythia_jax.sharding import constrain, sharded_init

__all__ = ["GPTNeoX", "KVCache", "forward", "checked_input_ids", "causal_attention", "cached_attention",
           "param_logical_axes", "init_std", "abstract_model",
           "sharded_model", "count_params"]


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
            rngs, (L, d, 3, N, H), (L, 3, N, H), dtype,
            ("layers", "embed", "qkv", "heads", "head_dim"), ("layers", "qkv", "heads", "head_dim"),
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
# The attention steps the layer is given (`layers.decoder_layer`)
def _softmax_attention(q_BTNH, k_BSNH, v_BSNH, mask_BTS, pattern):
    """Attention with the probabilities explicit, passed through `pattern` (the tapped
    `attn.hook_pattern` site) before they weight the values."""
    H = q_BTNH.shape[-1]
    s = jnp.einsum("btnh,bsnh->bnts", q_BTNH, k_BSNH,
                   preferred_element_type=jnp.float32) * (H ** -0.5)
    s = jnp.where(mask_BTS[:, None], s, MASK_VALUE)
    probs = pattern(jax.nn.softmax(s, axis=-1))
    o = jnp.einsum("bnts,bsnh->btnh", probs.astype(v_BSNH.dtype), v_BSNH,
                   preferred_element_type=jnp.float32)
    return o.astype(q_BTNH.dtype)


def causal_attention(impl: str, fused_rotary: bool | None = None):
    """Causal self-attention over the T tokens (training, scoring), through `attend` (which,
    given the rotary tables, fuses them into our Pallas kernel when that is what `impl`
    resolves to, and otherwise rotates in XLA; `fused_rotary` as in `ModelConfig`)."""
    def step(q, k, v, state, *, rotary, pattern):
        if pattern is not None:
            T = q.shape[1]
            return _softmax_attention(q, k, v, jnp.tril(jnp.ones((T, T), bool))[None],
                                      pattern), state
        return attention_lib.attend(q, k, v, impl=impl, causal=True, rotary=rotary,
                                    fused_rotary=fused_rotary), state

    def packed(qkv, *, bias, num_heads, rotary):  # the layer's packed path (`decoder_layer`)
        return attention_lib.attend_packed(qkv, bias=bias, num_heads=num_heads, rotary=rotary)

    def supported(B, T, N, H, dtype, rotary_dim):
        return (fused_rotary is not False and rotary_dim > 0
                and attention_lib.packed_supported(impl, B, T, N, H, dtype,
                                                   rotary_dim=rotary_dim))
    packed.supported = supported
    step.packed = packed
    return step


def _hands_rotary_to_attention(cfg: ModelConfig) -> bool:
    """Whether the causal (cache-free) layers hand q, k un-rotated with the rotary tables to
    `attend`, which fuses them into our Pallas kernel where it resolves to it: with
    `attention_impl` "pallas" or "auto" unless `fused_rotary=False` (and there is a rotary).
    Other impls never run the kernel; their layers rotate before attention as always."""
    return (cfg.fused_rotary is not False and cfg.rotary_dim > 0
            and cfg.attention_impl in ("pallas", "auto"))


def cached_attention(index, key_valid_BS, cdt):
    """Write the T new keys / values into the layer's cache ([B, S, N, H] each) at slot
    `index`; the queries attend over the cache, masked by `key_valid_BS` and slot causality."""
    def step(q, k, v, kv, *, rotary, pattern):
        ck, cv = kv
        ck = jax.lax.dynamic_update_slice_in_dim(ck, k.astype(ck.dtype), index, axis=1)
        cv = jax.lax.dynamic_update_slice_in_dim(cv, v.astype(cv.dtype), index, axis=1)
        T, S = q.shape[1], ck.shape[1]
        q_slot = index + jnp.arange(T)
        mask_BTS = (jnp.arange(S)[None, None, :] <= q_slot[None, :, None]) & key_valid_BS[:, None, :]
        if pattern is not None:
            o = _softmax_attention(q, ck.astype(cdt), cv.astype(cdt), mask_BTS, pattern)
        else:
            o = attention_lib.attend(q, ck.astype(cdt), cv.astype(cdt), impl="xla",
                                     causal=False, mask=mask_BTS)
        return o, (ck, cv)
    return step


_REMAT = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_attn_out": jax.checkpoint_policies.save_only_these_names("attn_out"),
}


def _run_layers(cfg: ModelConfig, lp: dict, x, rope, attention, states, taps: Taps | None):
    """The layers in order (scanned with `scan_layers`), rematerialized by `cfg.remat` when
    no cache is carried. `states`: per-layer attention states stacked on [L] (or None).
    Returns (x, states, captured) with captured values stacked on [L] (on the layers a site
    is active at, with `taps.layers`: then the layers run in segments of equal active sites)."""
    if taps is not None and taps.layers:
        segments = taps.segments(cfg.num_layers)
    else:
        segments = [(0, cfg.num_layers, taps)]
    fused_rotary = states is None and _hands_rotary_to_attention(cfg)
    outs = []
    for start, stop, seg_taps in segments:
        def body(x, xs, seg_taps=seg_taps):
            p, state, layer = xs
            x, state, captured = decoder_layer(cfg, p, x, rope, attention, state=state,
                                               taps=seg_taps, layer=layer,
                                               fused_rotary=fused_rotary)
            return x, (state, captured)

        if states is None and _REMAT[cfg.remat] is not None:
            body = jax.checkpoint(body, policy=_REMAT[cfg.remat], prevent_cse=not cfg.scan_layers)
        layer_ids = (jnp.arange(start, stop, dtype=jnp.int32)
                     if seg_taps is not None and seg_taps.needs_layer else None)
        whole = start == 0 and stop == cfg.num_layers
        xs = ((lp, states) if whole else
              jax.tree.map(lambda a: a[start:stop], (lp, states))) + (layer_ids,)
        if cfg.scan_layers:
            x, out = jax.lax.scan(body, x, xs)
        else:
            per_layer = []
            for i in range(stop - start):
                x, o = body(x, jax.tree.map(lambda a: a[i], xs))
                per_layer.append(o)
            out = jax.tree.map(lambda *a: jnp.stack(a), *per_layer)
        outs.append(out)
    if len(outs) == 1:
        states, captured = outs[0]
        return x, states, captured
    states = jax.tree.map(lambda *a: jnp.concatenate(a), *[s for s, _ in outs])
    captured = {}
    for _, cap in outs:
        for name, value in cap.items():
            captured.setdefault(name, []).append(value)
    return x, states, {name: v[0] if len(v) == 1 else jnp.concatenate(v)
                       for name, v in captured.items()}


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
                 attention_mask_BT=None, return_hidden: bool = False, taps: Taps | None = None):
        """Logits [B, T, V] float32 (and the updated cache when `cache` is given, and the
        captured values when `taps` is given, in that order).

        `positions_BT` default to 0..T-1 (or, with a cache, continue from the cache index).
        `attention_mask_BT` (1 = real token) marks left padding; only used with a cache.
        `taps` (`layers.Taps`): capture / change values at the layer sites (`layers.SITES`,
        returned stacked on a leading [L] axis) and at `ln_final.hook_normalized`.
        """
        cfg = self.config
        cdt = dtype_of(cfg.dtype)
        input_ids_BT = jnp.asarray(input_ids_BT)
        if input_ids_BT.ndim != 2:
            raise ValueError(f"input_ids: expected shape [batch, length], got {input_ids_BT.shape}")
        if taps is not None and cfg.use_parallel_residual and taps.touches("hook_resid_mid"):
            raise ValueError("taps: hook_resid_mid does not exist with the parallel residual "
                             "(use_parallel_residual=True): attn and mlp both read resid_pre")
        if taps is not None and taps.max_layer() >= cfg.num_layers:
            raise ValueError(f"taps: layer {taps.max_layer()} is out of range: the model has "
                             f"{cfg.num_layers} layers (0..{cfg.num_layers - 1})")
        B, T = input_ids_BT.shape
        if positions_BT is None:
            start = 0 if cache is None else cache.index
            positions_BT = jnp.broadcast_to(start + jnp.arange(T, dtype=jnp.int32), (B, T))
        x = jnp.take(self.embed_in.embedding[...], input_ids_BT, axis=0).astype(cdt)
        x = constrain(x, ("batch", "length", "act_embed"))
        rope = rotary_tables(positions_BT, cfg.rotary_dim, cfg.rotary_emb_base)
        lp = self.layer_params()

        if cache is None:
            x, _, captured = _run_layers(cfg, lp, x, rope,
                                         causal_attention(cfg.attention_impl, cfg.fused_rotary),
                                         None, taps)
            new_cache = None
        else:
            if attention_mask_BT is None:
                attention_mask_BT = jnp.ones((B, T), bool)
            key_valid = jax.lax.dynamic_update_slice_in_dim(
                cache.key_valid, attention_mask_BT.astype(bool), cache.index, axis=1)
            attention = cached_attention(cache.index, key_valid, cdt)
            x, (ks, vs), captured = _run_layers(cfg, lp, x, rope, attention, (cache.k, cache.v),
                                                taps)
            new_cache = KVCache(ks, vs, key_valid, cache.index + T)

        x = layer_norm(x, self.final_layer_norm.scale[...], self.final_layer_norm.bias[...],
                       cfg.layer_norm_eps)
        if taps is not None:
            x = taps.at("ln_final.hook_normalized", x, None, captured)
        if return_hidden:
            out = x
        else:
            out = jnp.einsum("btd,vd->btv", x, self.embed_out.embedding[...].astype(cdt),
                             preferred_element_type=jnp.float32)
            out = constrain(out, ("batch", "length", "act_vocab"))
        extra = (() if new_cache is None else (new_cache,)) + (() if taps is None else (captured,))
        return (out,) + extra if extra else out


@functools.partial(jax.jit, static_argnames=("graphdef", "return_hidden"))
def _forward_jit(graphdef, state, input_ids_BT, positions_BT, return_hidden, taps):
    return nnx.merge(graphdef, state)(input_ids_BT, positions_BT=positions_BT,
                                      return_hidden=return_hidden, taps=taps)


def forward(model: GPTNeoX, input_ids_BT, *, positions_BT=None, return_hidden: bool = False,
            taps: Taps | None = None):
    """`model(input_ids_BT)` compiled: logits [B, T, V] float32 (or the final hidden states);
    with `taps`, `(logits, captured)` (`layers.Taps`: its data is traced, its sites and edit
    functions are part of the compiled program's key).

    One `jax.jit` per (model structure, input shape), reused across calls and across models
    of the same config. Calling `model(ids)` directly runs op by op (about 3x slower for
    pythia-160m on CPU), and `nnx.jit(lambda m, ids: m(ids))` returns a copy of every
    parameter on each call (about 1.6x slower); this splits the model into its structure
    (static) and arrays instead. Token ids are checked against the vocabulary (an
    out-of-range id would otherwise embed as NaN).
    """
    ids = checked_input_ids(model, input_ids_BT)
    if taps is not None and not isinstance(taps, Taps):
        raise TypeError(f"taps: expected a pythia_jax.layers.Taps, got {type(taps).__name__}")
    graphdef, state = nnx.split(model)
    return _forward_jit(graphdef, state, ids, positions_BT, return_hidden, taps)


def checked_input_ids(model: GPTNeoX, input_ids_BT) -> jax.Array:
    """`input_ids_BT` as int32 [B, T] after checking the model type, the shape, the dtype and
    (where the ids are addressable) that every id is inside the vocabulary."""
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
    return jnp.asarray(ids, jnp.int32)


def param_logical_axes(model: GPTNeoX) -> Any:
    """A pytree (matching `nnx.state(model, nnx.Param)`) of logical-axis tuples."""
    state = nnx.state(model, nnx.Param)
    return jax.tree.map(lambda v: v.logical_axes, state,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))


def sharded_model(cfg: ModelConfig, mesh, seed: int = 0, rules=None) -> GPTNeoX:
    """A GPTNeoX with Pythia's init, each parameter created directly on its shards of `mesh`
    (`sharding.sharded_init`: no device or host ever holds an unsharded copy)."""
    def init():
        return nnx.split(GPTNeoX(cfg, rngs=nnx.Rngs(seed)))[1]

    graphdef = nnx.graphdef(nnx.eval_shape(lambda: GPTNeoX(cfg, rngs=nnx.Rngs(seed))))
    return nnx.merge(graphdef, sharded_init(init, mesh, rules=rules))


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
