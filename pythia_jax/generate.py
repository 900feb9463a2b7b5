"""Autoregressive generation: a preallocated KV cache, one compiled prefill, one compiled decode loop.

    tokens = generate(model, [[12092, 13], [309, 717, 12092]], max_new_tokens=20, eos_token_id=0)

Prompts of different lengths are left-padded to a common bucket length (extra left padding is
masked out and does not change any result); positions count real tokens only, so every prompt
sees positions 0, 1, 2, ... exactly as if it ran alone. The cache holds `bucket + max_new` slots
and is allocated once per call. The prompt runs through the model's own cached forward (one
compiled prefill); all further tokens come from one `lax.while_loop` (one compiled program) that
stops when every sequence has produced an EOS token or `max_new_tokens` tokens. Shapes depend
only on the batch size and the length buckets, so calls with similar lengths do not recompile.

The loop body is a single-token specialization of the model's layer (`_decode_layer`, checked
against full recomputation in the tests): per-layer weights are sliced once before the loop and
the per-layer caches are stored as keys [B, N, H, S] / values [B, N, S, H], because slicing the
stacked [L, ...] parameters inside the loop made XLA:CPU copy every layer's weights (and
transpose the cache) on every step. On the CPU backend the loop also runs feature-major
(activations [D, B], kernels transposed once per call to [out, in]): XLA:CPU's small-batch
matmuls stream weights about twice as fast in that orientation (`FEATURE_MAJOR_DECODE`).

Sampling order (as in HF): temperature, then top-k, then top-p, then a categorical draw.
`temperature=0` is greedy (top-k / top-p are then irrelevant).

Streaming (`stream_generate`, or `generate(..., callback=fn)`) is the same compiled loop with an
ordered host callback per step, which receives the step's tokens and may stop rows.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import queue
import sys
import threading
import types
from typing import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import io_callback

from pythia_jax.attention.xla import MASK_VALUE
from pythia_jax.model import (GPTNeoX, KVCache, apply_rotary, dtype_of, layer_norm,
                              rotary_tables)

__all__ = ["generate", "stream_generate", "generate_arrays", "GenerationOutput",
           "prepare_prompts", "filter_logits", "sample_logits", "bucket_length"]

PAD_ID = 1  # <|padding|>
#: Decode loop layout: None = feature-major on the CPU backend (faster matmuls there, at the
#: cost of a transposed copy of the layer weights per call), row-major elsewhere.
FEATURE_MAJOR_DECODE: bool | None = None
_NEG_INF = -jnp.inf


# ------------------------------------------------------------------------------------------------
# Input handling
def bucket_length(n: int, minimum: int = 16) -> int:
    """Round a length up to one of a few sizes: 16, 32, 64, 128, then 160, 192, 224, 256, 320,
    384, 448, 512, 640, ... (powers of two up to 128, then eighths of the next power of two),
    so at most 1.25x padding above 128 and a handful of compiled shapes."""
    n = max(int(n), minimum)
    p = 1 << (n - 1).bit_length()  # next power of two >= n
    if p <= 128:
        return p
    for frac in (0.5, 0.625, 0.75, 0.875):
        c = int(p * frac)
        if c >= n:
            return c
    return p


def prepare_prompts(input_ids, attention_mask=None, *, vocab_size: int | None = None):
    """Normalize prompts to (ids [B, P] int32, mask [B, P] bool, lengths [B]) with left padding.

    `input_ids` may be a list of token lists (any lengths), a 1-D sequence (one prompt) or a 2-D
    array; with `attention_mask` (1 = real token) the real tokens of each row are kept in order
    and re-padded on the left, so right-padded batches are accepted too.
    """
    if isinstance(input_ids, (jax.Array, np.ndarray)):
        arr = np.asarray(input_ids)
        if arr.ndim == 1:
            arr = arr[None]
        if arr.ndim != 2:
            raise ValueError(f"input_ids: expected a list of token lists or an array [batch, length],"
                             f" got an array of shape {arr.shape}")
        if attention_mask is None:
            rows = [list(r) for r in arr]
        else:
            m = np.asarray(attention_mask)
            if m.ndim == 1:
                m = m[None]
            if m.shape != arr.shape:
                raise ValueError(f"attention_mask: expected shape {arr.shape} (that of input_ids), "
                                 f"got {m.shape}")
            rows = [list(r[mr.astype(bool)]) for r, mr in zip(arr, m)]
    else:
        if attention_mask is not None:
            raise ValueError("attention_mask: only meaningful with an array of input_ids; a list of "
                             "token lists is padded automatically")
        seq = list(input_ids)
        if seq and all(isinstance(t, (int, np.integer)) for t in seq):
            seq = [seq]  # a single prompt
        rows = []
        for i, r in enumerate(seq):
            if isinstance(r, (str, bytes)):
                raise TypeError(f"input_ids[{i}]: expected token ids, got text {r!r}; encode it "
                                "first (pythia_jax.load_tokenizer().encode(text).ids)")
            rows.append(list(r))
    if not rows:
        raise ValueError("input_ids: empty batch (expected at least one prompt)")
    for i, r in enumerate(rows):
        if len(r) == 0:
            raise ValueError(f"input_ids[{i}]: empty prompt; generation needs at least one token "
                             "(e.g. start from <|endoftext|> = 0)")
        bad = [t for t in r if not (0 <= int(t) < (vocab_size or np.iinfo(np.int32).max))]
        if bad:
            raise ValueError(f"input_ids[{i}]: token id {int(bad[0])} outside the vocabulary "
                             f"[0, {vocab_size})")
    lengths = np.array([len(r) for r in rows], np.int32)
    P = int(lengths.max())
    ids = np.full((len(rows), P), PAD_ID, np.int32)
    mask = np.zeros((len(rows), P), bool)
    for i, r in enumerate(rows):
        ids[i, P - len(r):] = np.asarray(r, np.int64)
        mask[i, P - len(r):] = True
    return ids, mask, lengths


def _left_pad_to(ids, mask, P: int):
    B, cur = ids.shape
    if cur == P:
        return ids, mask
    ids2 = np.full((B, P), PAD_ID, np.int32)
    mask2 = np.zeros((B, P), bool)
    ids2[:, P - cur:] = ids
    mask2[:, P - cur:] = mask
    return ids2, mask2


# ------------------------------------------------------------------------------------------------
# Sampling
def filter_logits(logits, top_k: int | None = None, top_p: float | None = None):
    """Set every logit outside the top-k / top-p (nucleus) set to -inf. logits: [..., V].

    top-k keeps the k largest (ties with the k-th are kept); top-p keeps the smallest set of the
    largest logits whose probability mass reaches `top_p` (at least one token).
    """
    logits = jnp.asarray(logits, jnp.float32)
    V = logits.shape[-1]
    if top_k is not None and top_k < V:
        kth = jax.lax.top_k(logits, int(top_k))[0][..., -1:]
        logits = jnp.where(logits < kth, _NEG_INF, logits)
    if top_p is not None:
        top_p = jnp.asarray(top_p, jnp.float32)
        srt = -jnp.sort(-logits, axis=-1)  # descending
        probs = jax.nn.softmax(srt, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        keep = (mass_before < top_p) | (top_p >= 1.0)
        keep = keep.at[..., 0].set(True)
        n_keep = jnp.sum(keep, axis=-1, keepdims=True)
        threshold = jnp.take_along_axis(srt, n_keep - 1, axis=-1)
        logits = jnp.where(logits < threshold, _NEG_INF, logits)
    return logits


def sample_logits(logits_BV, key, *, temperature, top_k=None, top_p=None, greedy: bool):
    """Next token ids [B] from the last-position logits."""
    if greedy:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    x = logits_BV.astype(jnp.float32) / temperature
    x = filter_logits(x, top_k, top_p)
    return jax.random.categorical(key, x, axis=-1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class _Sampling:
    greedy: bool
    top_k: int | None
    use_top_p: bool


def _check_sampling(temperature, top_k, top_p, vocab_size) -> _Sampling:
    if temperature is None or not np.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature: expected a number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, (int, np.integer)) or isinstance(top_k, bool)
                              or top_k < 1):
        raise ValueError(f"top_k: expected a positive integer or None, got {top_k!r}")
    if top_p is not None and not (0.0 < float(top_p) <= 1.0):
        raise ValueError(f"top_p: expected a probability in (0, 1] or None, got {top_p!r}")
    greedy = float(temperature) == 0.0
    k = None if (greedy or top_k is None or top_k >= vocab_size) else int(top_k)
    use_p = (not greedy) and top_p is not None and float(top_p) < 1.0
    return _Sampling(greedy, k, use_p)


# ------------------------------------------------------------------------------------------------
# The compiled pieces
@dataclasses.dataclass
class _State:
    """Decode-loop carry (a pytree).

    The cache is kept per layer (separate buffers, updated in place by the loop) in the layouts
    the decode attention reads without transposing: keys [B, N, H, S], values [B, N, S, H].
    """
    ks: tuple             # L x [B, N, H, S]
    vs: tuple             # L x [B, N, S, H]
    valid: jax.Array      # [B, S] bool: slots holding real tokens
    index: jax.Array      # int32: the slot the next token is written to
    last: jax.Array       # [B] int32: the token to feed next
    pos: jax.Array        # [B] int32: its position
    done: jax.Array       # [B] bool
    tokens: jax.Array     # [B, N] int32 output buffer (PAD after EOS)
    step: jax.Array       # int32: decode steps run so far
    n_gen: jax.Array      # [B] int32: tokens produced by each sequence (its EOS included)
    scores: jax.Array | None  # [B, N, V] float32 (only with output_scores)


jax.tree_util.register_dataclass(
    _State, data_fields=["ks", "vs", "valid", "index", "last", "pos", "done", "tokens", "step",
                         "n_gen", "scores"], meta_fields=[])


def _emit(st: _State, logits, key, temperature, top_p, eos_ids, samp: _Sampling,
          vocab_axis: int = -1) -> _State:
    """Choose the next tokens from `logits` ([B, V], or [V, B] with vocab_axis=0)."""
    k = jax.random.fold_in(key, st.step)
    if samp.greedy:
        nxt = jnp.argmax(logits, axis=vocab_axis).astype(jnp.int32)
    if vocab_axis == 0:
        logits = logits.T
    logits_BV = logits
    if not samp.greedy:
        nxt = sample_logits(logits_BV, k, temperature=temperature, top_k=samp.top_k,
                            top_p=top_p if samp.use_top_p else None, greedy=False)
    nxt = jnp.where(st.done, PAD_ID, nxt)
    tokens = jax.lax.dynamic_update_slice_in_dim(st.tokens, nxt[:, None], st.step, axis=1)
    scores = st.scores
    if scores is not None:
        scores = jax.lax.dynamic_update_slice_in_dim(scores, logits_BV[:, None], st.step, axis=1)
    done = st.done | jnp.any(nxt[:, None] == eos_ids[None, :], axis=-1)
    return dataclasses.replace(st, last=nxt, done=done, tokens=tokens, step=st.step + 1,
                               n_gen=st.n_gen + (~st.done).astype(jnp.int32), scores=scores)


def _logits(cfg, x_BD, embed_out_VD):
    """Output layer, as GPTNeoX computes it (float32 logits over the padded vocabulary)."""
    cdt = dtype_of(cfg.dtype)
    return jnp.einsum("bd,vd->bv", x_BD.astype(cdt), embed_out_VD.astype(cdt),
                      preferred_element_type=jnp.float32)


def _materialize(tree):
    """Identity that XLA may not move into the loop (keeps the slices as their own buffers)."""
    return jax.lax.optimization_barrier(tree)


def _decode_attention(q_BNH, k_BNH, v_BNH, k_BNHS, v_BNSH, slot, valid_BS, cdt):
    """One new query per sequence: write its key/value at cache `slot`, attend over the valid
    slots. Returns (o [B, N, H] in `cdt`, updated k_BNHS, updated v_BNSH)."""
    H = q_BNH.shape[-1]
    k_BNHS = jax.lax.dynamic_update_slice(k_BNHS, k_BNH[..., None].astype(k_BNHS.dtype),
                                          (0, 0, 0, slot))
    v_BNSH = jax.lax.dynamic_update_slice(v_BNSH, v_BNH[:, :, None].astype(v_BNSH.dtype),
                                          (0, 0, slot, 0))
    scores = jnp.einsum("bnh,bnhs->bns", q_BNH, k_BNHS.astype(cdt),
                        preferred_element_type=jnp.float32) * (H ** -0.5)
    scores = jnp.where(valid_BS[:, None, :], scores, MASK_VALUE)
    lse = jax.nn.logsumexp(scores, axis=-1, keepdims=True)
    probs = jnp.exp(scores - lse)
    o = jnp.einsum("bns,bnsh->bnh", probs.astype(cdt), v_BNSH.astype(cdt),
                   preferred_element_type=jnp.float32).astype(cdt)
    return o, k_BNHS, v_BNSH


def _decode_layer(cfg, p, x_B1D, cos, sin, k_BNHS, v_BNSH, slot, valid_BS):
    """One GPT-NeoX layer for one new token per row, with the per-layer cache.

    The same computation as `model.block_forward` with a cache (LN, fused QKV, partial rotary,
    masked softmax attention in float32, parallel residual MLP), written for a single query so
    that neither the weights nor the cache are copied or transposed per step.
    """
    cdt = dtype_of(cfg.dtype)
    eps = cfg.layer_norm_eps

    def dense(h, kernel, bias, eq):
        y = jnp.einsum(eq, h, kernel.astype(cdt), preferred_element_type=jnp.float32)
        return (y + bias.astype(jnp.float32)).astype(cdt)

    H = cfg.head_dim
    a = layer_norm(x_B1D, p["ln1_scale"], p["ln1_bias"], eps)
    qkv = dense(a, p["qkv_kernel"], p["qkv_bias"], "btd,dnkh->btnkh")  # [B,1,N,3,H]
    q = apply_rotary(qkv[:, :, :, 0], cos, sin)[:, 0]  # [B,N,H]
    k = apply_rotary(qkv[:, :, :, 1], cos, sin)[:, 0]
    v = qkv[:, 0, :, 2]
    o, k_BNHS, v_BNSH = _decode_attention(q, k, v, k_BNHS, v_BNSH, slot, valid_BS, cdt)
    B, N = o.shape[:2]
    attn_out = dense(o.reshape(B, 1, N * H), p["out_kernel"], p["out_bias"], "btk,kd->btd")
    if cfg.use_parallel_residual:
        m = layer_norm(x_B1D, p["ln2_scale"], p["ln2_bias"], eps)
    else:
        x_B1D = x_B1D + attn_out
        m = layer_norm(x_B1D, p["ln2_scale"], p["ln2_bias"], eps)
    h = jax.nn.gelu(dense(m, p["mlp_in_kernel"], p["mlp_in_bias"], "btd,df->btf"),
                    approximate=cfg.gelu_approximate)
    mlp_out = dense(h, p["mlp_out_kernel"], p["mlp_out_bias"], "btf,fd->btd")
    if cfg.use_parallel_residual:
        x_B1D = x_B1D + attn_out + mlp_out
    else:
        x_B1D = x_B1D + mlp_out
    return x_B1D, k_BNHS, v_BNSH


def _ln_fm(x_DB, scale, bias, eps):
    """`model.layer_norm` over axis 0 (feature-major activations)."""
    xf = x_DB.astype(jnp.float32)
    mean = jnp.mean(xf, axis=0, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=0, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + eps)
    y = y * scale.astype(jnp.float32)[:, None] + bias.astype(jnp.float32)[:, None]
    return y.astype(x_DB.dtype)


def _rotary_fm(x_NHB, cos_RB, sin_RB):
    """`model.apply_rotary` for [N, H, B] (rotate the first R channels of every head)."""
    R = cos_RB.shape[0]
    if R == 0:
        return x_NHB
    x_rot = x_NHB[:, :R].astype(jnp.float32)
    half = R // 2
    rotated = jnp.concatenate([-x_rot[:, half:], x_rot[:, :half]], axis=1)
    out = (x_rot * cos_RB[None] + rotated * sin_RB[None]).astype(x_NHB.dtype)
    return jnp.concatenate([out, x_NHB[:, R:]], axis=1)


def _fm_weights(cfg, p):
    """One layer's parameters with every kernel as [out, in] (the matmul LHS)."""
    N, H, D = cfg.num_heads, cfg.head_dim, cfg.hidden_size
    q = dict(p)
    q["qkv_kernel"] = p["qkv_kernel"].reshape(D, N * 3 * H).T
    q["qkv_bias"] = p["qkv_bias"].reshape(N * 3 * H)
    q["out_kernel"] = p["out_kernel"].reshape(N * H, D).T
    q["mlp_in_kernel"] = p["mlp_in_kernel"].T
    q["mlp_out_kernel"] = p["mlp_out_kernel"].T
    return q


def _decode_layer_fm(cfg, p, x_DB, cos_RB, sin_RB, k_BNHS, v_BNSH, slot, valid_BS):
    """`_decode_layer` with feature-major activations [D, B] and [out, in] kernels.

    XLA:CPU's matmul streams a [out, in] weight against a few columns about twice as fast as
    it does [B, in] x [in, out] for small B (measured 12.8 vs 5.5 GB/s at B = 8), so on CPU the
    loop uses this form; the kernels are transposed once per call, before the loop.
    """
    cdt = dtype_of(cfg.dtype)
    eps = cfg.layer_norm_eps
    N, H = cfg.num_heads, cfg.head_dim
    B = x_DB.shape[1]

    def dense(h_KB, w_FK, b_F):
        y = jnp.einsum("fk,kb->fb", w_FK.astype(cdt), h_KB, preferred_element_type=jnp.float32)
        return (y + b_F.astype(jnp.float32)[:, None]).astype(cdt)

    a = _ln_fm(x_DB, p["ln1_scale"], p["ln1_bias"], eps)
    qkv = dense(a, p["qkv_kernel"], p["qkv_bias"]).reshape(N, 3, H, B)
    q = _rotary_fm(qkv[:, 0], cos_RB, sin_RB).transpose(2, 0, 1)  # [B,N,H]
    k = _rotary_fm(qkv[:, 1], cos_RB, sin_RB).transpose(2, 0, 1)
    v = qkv[:, 2].transpose(2, 0, 1)
    o, k_BNHS, v_BNSH = _decode_attention(q, k, v, k_BNHS, v_BNSH, slot, valid_BS, cdt)
    attn_out = dense(o.reshape(B, N * H).T, p["out_kernel"], p["out_bias"])
    if cfg.use_parallel_residual:
        m = _ln_fm(x_DB, p["ln2_scale"], p["ln2_bias"], eps)
    else:
        x_DB = x_DB + attn_out
        m = _ln_fm(x_DB, p["ln2_scale"], p["ln2_bias"], eps)
    h = jax.nn.gelu(dense(m, p["mlp_in_kernel"], p["mlp_in_bias"]),
                    approximate=cfg.gelu_approximate)
    mlp_out = dense(h, p["mlp_out_kernel"], p["mlp_out_bias"])
    if cfg.use_parallel_residual:
        x_DB = x_DB + attn_out + mlp_out
    else:
        x_DB = x_DB + mlp_out
    return x_DB, k_BNHS, v_BNSH


@functools.partial(jax.jit, static_argnames=("graphdef", "samp", "n_out", "cache_len",
                                             "want_scores"))
def _prefill(graphdef, params, ids, mask, key, temperature, top_p, eos_ids, *, samp, n_out,
             cache_len, want_scores):
    model = nnx.merge(graphdef, params)
    cfg = model.config
    B, P = ids.shape
    positions = jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=1) - 1, 0)
    cache = KVCache.empty(cfg, B, cache_len)
    hidden, cache = model(ids, positions_BT=positions, cache=cache, attention_mask_BT=mask,
                          return_hidden=True)
    logits = _logits(cfg, hidden[:, -1], model.embed_out.embedding[...])
    scores = (jnp.zeros((B, n_out, logits.shape[-1]), jnp.float32) if want_scores else None)
    st = _State(ks=tuple(cache.k[i].transpose(0, 2, 3, 1) for i in range(cfg.num_layers)),
                vs=tuple(cache.v[i].transpose(0, 2, 1, 3) for i in range(cfg.num_layers)),
                valid=cache.key_valid, index=cache.index, last=jnp.zeros((B,), jnp.int32),
                pos=jnp.sum(mask, axis=1).astype(jnp.int32), done=jnp.zeros((B,), bool),
                tokens=jnp.full((B, n_out), PAD_ID, jnp.int32), step=jnp.zeros((), jnp.int32),
                n_gen=jnp.zeros((B,), jnp.int32), scores=scores)
    return _emit(st, logits, key, temperature, top_p, eos_ids, samp)


# Streaming: the decode loop hands every step's tokens to the host through an ordered
# io_callback; the host answers with per-row stop flags (so a callback can end sequences early,
# e.g. on a stop string). Sinks are looked up by an id passed as data, so one compiled loop
# serves every callback.
_SINKS: dict[int, Callable] = {}
_SINK_IDS = itertools.count(1)


def _deliver(sid, toks, done):
    out = _SINKS[int(sid)](np.asarray(toks), np.asarray(done))
    return np.asarray(out, bool)


@functools.partial(jax.jit, static_argnames=("graphdef", "samp", "stream", "feature_major"),
                   donate_argnames=("st",))
def _decode(graphdef, params, st: _State, stop, key, temperature, top_p, eos_ids, sid, *, samp,
            stream, feature_major):
    """Run decode steps while `step < stop` and some sequence is unfinished."""
    model = nnx.merge(graphdef, params)
    cfg = model.config
    B = st.last.shape[0]
    # Per-layer weights sliced once, before the loop. (Slicing the stacked [L, ...] arrays
    # inside the loop body makes XLA:CPU copy every layer's weights on every step.)
    lp = model.layer_params()
    N, H, D = cfg.num_heads, cfg.head_dim, cfg.hidden_size
    layers = [{k: v[i] for k, v in lp.items()} for i in range(cfg.num_layers)]
    if feature_major:
        layers = [_fm_weights(cfg, p) for p in layers]
    else:
        for p in layers:
            p["out_kernel"] = p["out_kernel"].reshape(N * H, D)
    layers, embed_in, embed_out, lnf = _materialize(
        (layers, model.embed_in.embedding[...], model.embed_out.embedding[...],
         (model.final_layer_norm.scale[...], model.final_layer_norm.bias[...])))

    def cond(s):
        return (s.step < stop) & ~jnp.all(s.done)

    def body(s):
        valid = jax.lax.dynamic_update_slice_in_dim(s.valid, jnp.ones((B, 1), bool), s.index,
                                                    axis=1)
        cdt = dtype_of(cfg.dtype)
        x = jnp.take(embed_in, s.last, axis=0).astype(cdt)  # [B, D]
        cos, sin = rotary_tables(s.pos[:, None], cfg.rotary_dim, cfg.rotary_emb_base)
        ks, vs = [], []
        if feature_major:
            x, cos, sin = x.T, cos[:, 0].T, sin[:, 0].T  # [D, B], [R, B]
            for p, kc, vc in zip(layers, s.ks, s.vs):
                x, kc, vc = _decode_layer_fm(cfg, p, x, cos, sin, kc, vc, s.index, valid)
                ks.append(kc)
                vs.append(vc)
            x = _ln_fm(x, lnf[0], lnf[1], cfg.layer_norm_eps)
            logits = jnp.einsum("vd,db->vb", embed_out.astype(cdt), x,
                                preferred_element_type=jnp.float32)  # [V, B]
        else:
            x = x[:, None]  # [B, 1, D]
            for p, kc, vc in zip(layers, s.ks, s.vs):
                x, kc, vc = _decode_layer(cfg, p, x, cos, sin, kc, vc, s.index, valid)
                ks.append(kc)
                vs.append(vc)
            x = layer_norm(x[:, 0], lnf[0], lnf[1], cfg.layer_norm_eps)
            logits = _logits(cfg, x, embed_out)
        s = dataclasses.replace(s, ks=tuple(ks), vs=tuple(vs), valid=valid, index=s.index + 1,
                                pos=s.pos + 1)
        s = _emit(s, logits, key, temperature, top_p, eos_ids, samp,
                  vocab_axis=0 if feature_major else -1)
        if stream:
            halt = io_callback(_deliver, jax.ShapeDtypeStruct((B,), jnp.bool_), sid,
                               s.last, s.done, ordered=True)
            s = dataclasses.replace(s, done=s.done | halt)
        return s

    return jax.lax.while_loop(cond, body, st)


# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class GenerationOutput:
    """tokens [B, N] (PAD_ID after a sequence stopped), lengths [B] (EOS included), and
    scores [B, N, V] float32 (the logits each token was chosen from) when requested."""
    tokens: np.ndarray
    lengths: np.ndarray
    scores: np.ndarray | None = None

    def to_lists(self) -> list[list[int]]:
        return [self.tokens[i, : self.lengths[i]].tolist() for i in range(len(self.lengths))]


class _Run:
    """Shared setup of generate / stream_generate."""

    def __init__(self, model: GPTNeoX, input_ids, max_new_tokens, temperature, top_k, top_p,
                 seed, eos_token_id, attention_mask, output_scores):
        if not isinstance(model, GPTNeoX):
            raise TypeError(f"model: expected a pythia_jax GPTNeoX, got {type(model).__name__}")
        cfg = model.config
        if (not isinstance(max_new_tokens, (int, np.integer)) or isinstance(max_new_tokens, bool)
                or max_new_tokens < 1):
            raise ValueError(f"max_new_tokens: expected a positive integer, got {max_new_tokens!r}")
        self.samp = _check_sampling(temperature, top_k, top_p, cfg.vocab_size)
        ids, mask, lengths = prepare_prompts(input_ids, attention_mask, vocab_size=cfg.vocab_size)
        longest = int(lengths.max())
        if longest + max_new_tokens > cfg.max_position_embeddings:
            raise ValueError(
                f"prompt too long: {longest} prompt tokens + max_new_tokens={max_new_tokens} "
                f"exceeds the model's context of {cfg.max_position_embeddings} positions "
                "(shorten the prompt or ask for fewer new tokens)")
        if eos_token_id is None:
            eos = []
        elif isinstance(eos_token_id, (int, np.integer)):
            eos = [int(eos_token_id)]
        else:
            eos = [int(e) for e in eos_token_id]
        eos += [-1] * (-len(eos) % 8 or (8 if not eos else 0))  # fixed size: no recompiles
        P = bucket_length(longest)
        self.ids, self.mask = _left_pad_to(ids, mask, P)
        self.lengths = lengths
        self.max_new = int(max_new_tokens)
        self.n_out = bucket_length(self.max_new, minimum=8)
        self.cache_len = P + self.n_out
        self.graphdef, self.params = nnx.split(model)
        self.key = jax.random.key(int(seed))
        self.temperature = jnp.float32(max(float(temperature), 1e-6))
        self.top_p = jnp.float32(1.0 if top_p is None else top_p)
        self.eos = jnp.asarray(eos, jnp.int32)
        self.want_scores = bool(output_scores)
        self.feature_major = (FEATURE_MAJOR_DECODE if FEATURE_MAJOR_DECODE is not None
                              else jax.default_backend() == "cpu")

    def prefill(self) -> _State:
        return _prefill(self.graphdef, self.params, self.ids, self.mask, self.key,
                        self.temperature, self.top_p, self.eos, samp=self.samp, n_out=self.n_out,
                        cache_len=self.cache_len, want_scores=self.want_scores)

    def decode(self, st: _State, stop: int, sink: Callable | None = None) -> _State:
        if sink is None:
            return _decode(self.graphdef, self.params, st, jnp.int32(stop), self.key,
                           self.temperature, self.top_p, self.eos, jnp.int32(0), samp=self.samp,
                           stream=False, feature_major=self.feature_major)
        sid = next(_SINK_IDS)
        _SINKS[sid] = sink
        try:
            st = _decode(self.graphdef, self.params, st, jnp.int32(stop), self.key,
                         self.temperature, self.top_p, self.eos, jnp.int32(sid), samp=self.samp,
                         stream=True, feature_major=self.feature_major)
            jax.block_until_ready(st)
        finally:
            del _SINKS[sid]
        return st

    def output(self, st: _State) -> GenerationOutput:
        tokens = np.asarray(st.tokens)[:, : self.max_new]
        lengths = np.asarray(st.n_gen).astype(np.int32)
        scores = None
        if st.scores is not None:
            scores = np.asarray(st.scores)[:, : self.max_new]
        return GenerationOutput(tokens=tokens, lengths=lengths, scores=scores)


def generate_arrays(model: GPTNeoX, input_ids, max_new_tokens: int, temperature: float = 0.0,
                    top_k: int | None = None, top_p: float | None = None, seed: int = 0,
                    eos_token_id: int | Sequence[int] | None = None, *, attention_mask=None,
                    output_scores: bool = False, callback=None) -> GenerationOutput:
    """Like `generate` but returns padded arrays (and optionally the per-step logits)."""
    run = _Run(model, input_ids, max_new_tokens, temperature, top_k, top_p, seed, eos_token_id,
               attention_mask, output_scores)
    return _execute(run, callback)


def generate(model: GPTNeoX, input_ids, max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, seed: int = 0,
             eos_token_id: int | Sequence[int] | None = None, *, attention_mask=None,
             callback: Callable[[np.ndarray, np.ndarray], object] | None = None
             ) -> list[list[int]]:
    """Generate up to `max_new_tokens` tokens for each prompt; returns the new tokens per prompt.

    input_ids: a list of token lists (different lengths allowed), one token list, or an array
      [B, T] with `attention_mask` [B, T] (1 = real token; left or right padding).
    temperature: 0 = greedy; > 0 samples from softmax(logits / temperature) after the top-k /
      top-p filters. seed: the sampling seed (same seed + same inputs = same tokens).
    eos_token_id: an id or a list of ids; a sequence stops after emitting one (the EOS is part
      of its output). None: always `max_new_tokens` tokens.
    callback(tokens_B, done_B): called as soon as each step's tokens exist (np.int32 [B];
      PAD_ID for sequences already finished) with the done flags [B]. It may return None
      (continue), True (stop every sequence now) or a bool array [B] (stop those sequences,
      e.g. on a stop string); the tokens produced so far are returned either way.
    """
    run = _Run(model, input_ids, max_new_tokens, temperature, top_k, top_p, seed, eos_token_id,
               attention_mask, False)
    return _execute(run, callback).to_lists()


def _as_halt(ret, B: int) -> np.ndarray:
    if ret is None or ret is False:
        return np.zeros((B,), bool)
    if ret is True:
        return np.ones((B,), bool)
    arr = np.asarray(ret, bool)
    if arr.shape != (B,):
        raise ValueError(f"generate callback: expected None, a bool or a bool array of shape "
                         f"({B},), got shape {arr.shape}")
    return arr


def _execute(run: _Run, callback=None) -> GenerationOutput:
    st = run.prefill()
    B = run.ids.shape[0]
    if callback is None:
        if run.max_new > 1:
            st = run.decode(st, run.max_new)
        return run.output(st)
    error: list[BaseException] = []

    def sink(toks, done):
        if error:
            return np.ones((B,), bool)
        try:
            return _as_halt(callback(toks, done), B)
        except BaseException as e:  # stop the loop; re-raised below
            error.append(e)
            return np.ones((B,), bool)

    halt = sink(np.asarray(st.tokens[:, 0]), np.asarray(st.done))
    if halt.any():
        st = dataclasses.replace(st, done=st.done | jnp.asarray(halt))
    if run.max_new > 1 and not bool(jnp.all(st.done)):
        st = run.decode(st, run.max_new, sink)
    if error:
        raise error[0]
    return run.output(st)


_DONE = object()


def stream_generate(model: GPTNeoX, input_ids, max_new_tokens: int, temperature: float = 0.0,
                    top_k: int | None = None, top_p: float | None = None, seed: int = 0,
                    eos_token_id: int | Sequence[int] | None = None, *,
                    attention_mask=None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield `(tokens_B, done_B)` as each step's tokens are produced (the same tokens as
    `generate` with the same arguments; PAD_ID for sequences already finished). Closing the
    generator early stops the computation at the next step."""
    run = _Run(model, input_ids, max_new_tokens, temperature, top_k, top_p, seed, eos_token_id,
               attention_mask, False)
    q: queue.Queue = queue.Queue()
    closed = threading.Event()

    def callback(toks, done):
        q.put((toks, done))
        return closed.is_set()

    def work():
        try:
            _execute(run, callback)
            q.put(_DONE)
        except BaseException as e:
            q.put(e)

    t = threading.Thread(target=work, name="pythia-jax-generate", daemon=True)
    t.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        closed.set()
        t.join()


# `pythia_jax.generate` is both this module and (lazily) the function; once the module has been
# imported, Python binds the package attribute to the module, so make the module callable too.
class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return generate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
