"""Autoregressive generation: a preallocated KV cache, one compiled prefill, one compiled decode loop.

    tokens = generate(model, [[12092, 13], [309, 717, 12092]], max_new_tokens=20, eos_token_id=0)

Prompts of different lengths are left-padded to a common bucket length (extra left padding is
masked out and does not change any result); positions count real tokens only, so every prompt
sees positions 0, 1, 2, ... exactly as if it ran alone. The cache holds `bucket + max_new` slots
and is allocated once per call. The prompt runs through the model's own cached forward (one
compiled prefill); all further tokens come from one `lax.while_loop` (one compiled program) that
stops when every sequence has produced an EOS token or `max_new_tokens` tokens. Shapes depend
only on the batch size and the length buckets, so calls with similar lengths do not recompile.

The loop body runs the model's own layer (`layers.decoder_layer`, the same function as
training and prefill) for one token per row, with an attention step that writes the new key
and value into a per-layer cache stored as keys [B, N, H, S] / values [B, N, S, H]; per-layer
weights are sliced once before the loop, because slicing the stacked [L, ...] parameters inside
the loop made XLA:CPU copy every layer's weights (and transpose the cache) on every step. On
the CPU backend the loop runs the layer in its feature-major layout (`layers.FEATURE_MAJOR`:
activations [D, B], kernels transposed once per call to [out, in]): XLA:CPU's small-batch
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
import threading
from typing import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import io_callback

from pythia_jax.attention.xla import MASK_VALUE
from pythia_jax.layers import FEATURE_MAJOR, ROW, decoder_layer, dtype_of, rotary_tables
from pythia_jax.model import GPTNeoX, KVCache
from pythia_jax.tokenizer import PAD_ID

__all__ = ["generate", "stream_generate", "generate_arrays", "GenerationOutput",
           "prepare_prompts", "filter_logits", "sample_logits", "bucket_length"]

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
    """The static part of the decoding choice (one compiled program per combination)."""
    greedy: bool
    top_k: int | None
    use_top_p: bool
    penalty: bool = False   # repetition_penalty != 1: track the tokens each row holds
    min_new: bool = False   # min_new_tokens > 0: mask the EOS ids for the first steps


def _check_sampling(temperature, top_k, top_p, vocab_size, do_sample=None
                    ) -> tuple[_Sampling, float]:
    """(static sampling choice, temperature) from the user's arguments.

    do_sample=None: the temperature decides (None or 0 = greedy, > 0 = sampling);
    do_sample=False: greedy whatever the temperature (HF); do_sample=True: sampling with
    `temperature` (default 1.0, HF), which must then be > 0."""
    if do_sample is not None and not isinstance(do_sample, (bool, np.bool_)):
        raise ValueError(f"do_sample: expected True, False or None, got {do_sample!r}")
    if temperature is None:
        temperature = 1.0 if do_sample else 0.0
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float, np.number)) \
            or not np.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature: expected a number >= 0 (0 = greedy), got {temperature!r}")
    if do_sample and float(temperature) == 0.0:
        raise ValueError("temperature=0 conflicts with do_sample=True: sampling needs a "
                         "temperature > 0 (or pass do_sample=False for greedy decoding)")
    if top_k is not None and (not isinstance(top_k, (int, np.integer)) or isinstance(top_k, bool)
                              or top_k < 1):
        raise ValueError(f"top_k: expected a positive integer or None, got {top_k!r}")
    if top_p is not None and not (0.0 < float(top_p) <= 1.0):
        raise ValueError(f"top_p: expected a probability in (0, 1] or None, got {top_p!r}")
    greedy = (do_sample is False) or float(temperature) == 0.0
    k = None if (greedy or top_k is None or top_k >= vocab_size) else int(top_k)
    use_p = (not greedy) and top_p is not None and float(top_p) < 1.0
    return _Sampling(greedy, k, use_p), float(temperature)


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
    seen: jax.Array | None    # [B, V] bool: tokens in each row so far (only with a penalty)


jax.tree_util.register_dataclass(
    _State, data_fields=["ks", "vs", "valid", "index", "last", "pos", "done", "tokens", "step",
                         "n_gen", "scores", "seen"], meta_fields=[])


@dataclasses.dataclass
class _Knobs:
    """The traced decoding numbers (changing them does not recompile)."""
    temperature: jax.Array  # float32
    top_p: jax.Array        # float32
    eos: jax.Array          # [8k] int32, padded with -1
    min_new: jax.Array      # int32: EOS masked while fewer tokens than this were produced
    penalty: jax.Array      # float32: HF repetition penalty (1 = none)


jax.tree_util.register_dataclass(
    _Knobs, data_fields=["temperature", "top_p", "eos", "min_new", "penalty"], meta_fields=[])


def _process_logits(st: _State, logits_BV, kn: _Knobs, samp: _Sampling):
    """HF's logits processors that apply before the sampling warpers: the repetition penalty
    (a token already in the row: positive logits divided by the penalty, negative ones
    multiplied) and min_new_tokens (the EOS ids at -inf until that many tokens exist)."""
    if samp.penalty:
        penalized = jnp.where(logits_BV < 0, logits_BV * kn.penalty, logits_BV / kn.penalty)
        logits_BV = jnp.where(st.seen, penalized, logits_BV)
    if samp.min_new:
        V = logits_BV.shape[-1]
        is_eos_V = jnp.any(jnp.arange(V, dtype=jnp.int32)[:, None] == kn.eos[None, :], axis=-1)
        logits_BV = jnp.where((st.step < kn.min_new) & is_eos_V[None, :], _NEG_INF, logits_BV)
    return logits_BV


def _emit(st: _State, logits, key, kn: _Knobs, samp: _Sampling, vocab_axis: int = -1) -> _State:
    """Choose the next tokens from `logits` ([B, V], or [V, B] with vocab_axis=0)."""
    k = jax.random.fold_in(key, st.step)
    processed = samp.penalty or samp.min_new
    if samp.greedy and not processed:
        nxt = jnp.argmax(logits, axis=vocab_axis).astype(jnp.int32)
    if vocab_axis == 0:
        logits = logits.T
    logits_BV = logits
    chosen_from = _process_logits(st, logits_BV, kn, samp) if processed else logits_BV
    if samp.greedy and processed:
        nxt = jnp.argmax(chosen_from, axis=-1).astype(jnp.int32)
    if not samp.greedy:
        nxt = sample_logits(chosen_from, k, temperature=kn.temperature, top_k=samp.top_k,
                            top_p=kn.top_p if samp.use_top_p else None, greedy=False)
    nxt = jnp.where(st.done, PAD_ID, nxt)
    tokens = jax.lax.dynamic_update_slice_in_dim(st.tokens, nxt[:, None], st.step, axis=1)
    scores = st.scores
    if scores is not None:
        scores = jax.lax.dynamic_update_slice_in_dim(scores, logits_BV[:, None], st.step, axis=1)
    seen = st.seen
    if seen is not None:
        seen = seen.at[jnp.arange(nxt.shape[0]), nxt].set(True)
    done = st.done | jnp.any(nxt[:, None] == kn.eos[None, :], axis=-1)
    return dataclasses.replace(st, last=nxt, done=done, tokens=tokens, step=st.step + 1,
                               n_gen=st.n_gen + (~st.done).astype(jnp.int32), scores=scores,
                               seen=seen)


def _logits(cfg, x_BD, embed_out_VD):
    """Output layer, as GPTNeoX computes it (float32 logits over the padded vocabulary)."""
    cdt = dtype_of(cfg.dtype)
    return jnp.einsum("bd,vd->bv", x_BD.astype(cdt), embed_out_VD.astype(cdt),
                      preferred_element_type=jnp.float32)


def _materialize(tree):
    """Identity that XLA may not move into the loop (keeps the slices as their own buffers)."""
    return jax.lax.optimization_barrier(tree)


def _decode_attention(slot, valid_BS, cdt):
    """The attention step (`layers.decoder_layer`) for one new query per sequence: write its
    key / value at cache `slot` of the layer's cache (keys [B, N, H, S], values [B, N, S, H]),
    attend over the valid slots."""
    def step(q_B1NH, k_B1NH, v_B1NH, kv, *, rotary, pattern):
        k_BNHS, v_BNSH = kv
        q_BNH, k_BNH, v_BNH = q_B1NH[:, 0], k_B1NH[:, 0], v_B1NH[:, 0]
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
        if pattern is not None:
            probs = pattern(probs[:, :, None])[:, :, 0]
        o = jnp.einsum("bns,bnsh->bnh", probs.astype(cdt), v_BNSH.astype(cdt),
                       preferred_element_type=jnp.float32).astype(cdt)
        return o[:, None], (k_BNHS, v_BNSH)
    return step


@functools.partial(jax.jit, static_argnames=("graphdef", "samp", "n_out", "cache_len",
                                             "want_scores"))
def _prefill(graphdef, params, ids, mask, key, kn: _Knobs, *, samp, n_out, cache_len,
             want_scores):
    model = nnx.merge(graphdef, params)
    cfg = model.config
    B, P = ids.shape
    positions = jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=1) - 1, 0)
    cache = KVCache.empty(cfg, B, cache_len)
    hidden, cache = model(ids, positions_BT=positions, cache=cache, attention_mask_BT=mask,
                          return_hidden=True)
    logits = _logits(cfg, hidden[:, -1], model.embed_out.embedding[...])
    V = logits.shape[-1]
    scores = (jnp.zeros((B, n_out, V), jnp.float32) if want_scores else None)
    # the prompt's tokens count for the repetition penalty (HF); padding does not
    seen = (jnp.zeros((B, V), bool).at[jnp.arange(B)[:, None], jnp.where(mask, ids, V)]
            .set(True, mode="drop") if samp.penalty else None)
    st = _State(ks=tuple(cache.k[i].transpose(0, 2, 3, 1) for i in range(cfg.num_layers)),
                vs=tuple(cache.v[i].transpose(0, 2, 1, 3) for i in range(cfg.num_layers)),
                valid=cache.key_valid, index=cache.index, last=jnp.zeros((B,), jnp.int32),
                pos=jnp.sum(mask, axis=1).astype(jnp.int32), done=jnp.zeros((B,), bool),
                tokens=jnp.full((B, n_out), PAD_ID, jnp.int32), step=jnp.zeros((), jnp.int32),
                n_gen=jnp.zeros((B,), jnp.int32), scores=scores, seen=seen)
    return _emit(st, logits, key, kn, samp)


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
def _decode(graphdef, params, st: _State, stop, key, kn: _Knobs, sid, *, samp, stream,
            feature_major):
    """Run decode steps while `step < stop` and some sequence is unfinished."""
    model = nnx.merge(graphdef, params)
    cfg = model.config
    B = st.last.shape[0]
    # Per-layer weights sliced once, before the loop (slicing the stacked [L, ...] arrays
    # inside the loop body makes XLA:CPU copy every layer's weights on every step), and put in
    # the layout's orientation (feature-major: transposed once per call).
    layout = FEATURE_MAJOR if feature_major else ROW
    lp = model.layer_params()
    layers = [layout.prepare({k: v[i] for k, v in lp.items()}) for i in range(cfg.num_layers)]
    layers, embed_in, embed_out, lnf = _materialize(
        (layers, model.embed_in.embedding[...], model.embed_out.embedding[...],
         (model.final_layer_norm.scale[...], model.final_layer_norm.bias[...])))
    cdt = dtype_of(cfg.dtype)

    def cond(s):
        return (s.step < stop) & ~jnp.all(s.done)

    def body(s):
        valid = jax.lax.dynamic_update_slice_in_dim(s.valid, jnp.ones((B, 1), bool), s.index,
                                                    axis=1)
        x = jnp.take(embed_in, s.last, axis=0).astype(cdt)  # [B, D]
        x = x.T if feature_major else x[:, None]  # [D, B] or [B, 1, D]
        rope = rotary_tables(s.pos[:, None], cfg.rotary_dim, cfg.rotary_emb_base)
        attention = _decode_attention(s.index, valid, cdt)
        ks, vs = [], []
        for p, kc, vc in zip(layers, s.ks, s.vs):
            x, (kc, vc), _ = decoder_layer(cfg, p, x, rope, attention, layout=layout,
                                           state=(kc, vc))
            ks.append(kc)
            vs.append(vc)
        x = layout.norm(x, lnf[0], lnf[1], cfg.layer_norm_eps)
        if feature_major:
            logits = jnp.einsum("vd,db->vb", embed_out.astype(cdt), x,
                                preferred_element_type=jnp.float32)  # [V, B]
        else:
            logits = _logits(cfg, x[:, 0], embed_out)
        s = dataclasses.replace(s, ks=tuple(ks), vs=tuple(vs), valid=valid, index=s.index + 1,
                                pos=s.pos + 1)
        s = _emit(s, logits, key, kn, samp, vocab_axis=0 if feature_major else -1)
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


def _positive_int(name, v, minimum=1):
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{name}: expected {what}, got {v!r}")
    return int(v)


def _eos_list(eos_token_id, model: GPTNeoX) -> list[int]:
    """None: the model's EOS (`config.eos_token_id`, Pythia's <|endoftext|> = 0); an id or a
    list of ids; an empty list: no EOS (always the full number of new tokens)."""
    if eos_token_id is None:
        return [int(model.config.eos_token_id)]
    if isinstance(eos_token_id, (int, np.integer)) and not isinstance(eos_token_id, bool):
        return [int(eos_token_id)]
    try:
        ids = list(eos_token_id)
    except TypeError:
        ids = None
    if ids is None or not all(isinstance(e, (int, np.integer)) and not isinstance(e, bool)
                              for e in ids):
        raise ValueError(f"eos_token_id: expected None (the model's, "
                         f"{model.config.eos_token_id}), a token id, a list of ids or [] (no "
                         f"EOS), got {eos_token_id!r}")
    return [int(e) for e in ids]


class _Run:
    """Shared setup of generate / stream_generate: the HF-style arguments resolved once."""

    def __init__(self, model: GPTNeoX, input_ids, max_new_tokens=None, temperature=None,
                 top_k=None, top_p=None, seed=0, eos_token_id=None, attention_mask=None,
                 output_scores=False, *, do_sample=None, max_length=None, min_new_tokens=0,
                 repetition_penalty=1.0):
        if not isinstance(model, GPTNeoX):
            raise TypeError(f"model: expected a pythia_jax GPTNeoX, got {type(model).__name__}")
        cfg = model.config
        self.samp, temperature = _check_sampling(temperature, top_k, top_p, cfg.vocab_size,
                                                 do_sample)
        ids, mask, lengths = prepare_prompts(input_ids, attention_mask, vocab_size=cfg.vocab_size)
        longest = int(lengths.max())
        if max_length is not None and max_new_tokens is not None:
            raise ValueError(f"max_length={max_length!r} and max_new_tokens={max_new_tokens!r} "
                             "both given: pass one (max_length counts the prompt too)")
        if max_length is not None:
            max_length = _positive_int("max_length", max_length)
            # HF: the prompt length is the input's width (an array's padding included)
            width = (np.shape(input_ids)[-1] if isinstance(input_ids, (jax.Array, np.ndarray))
                     else longest)
            if max_length <= width:
                raise ValueError(f"max_length={max_length} leaves no room for new tokens after "
                                 f"the {width}-token prompt (max_length counts prompt + new "
                                 "tokens; or pass max_new_tokens)")
            max_new_tokens = max_length - width
        elif max_new_tokens is None:
            raise ValueError("generate: expected max_new_tokens (new tokens per prompt) or "
                             "max_length (prompt + new tokens)")
        max_new_tokens = _positive_int("max_new_tokens", max_new_tokens)
        if longest + max_new_tokens > cfg.max_position_embeddings:
            raise ValueError(
                f"prompt too long: {longest} prompt tokens + max_new_tokens={max_new_tokens} "
                f"exceeds the model's context of {cfg.max_position_embeddings} positions "
                "(shorten the prompt or ask for fewer new tokens)")
        min_new = _positive_int("min_new_tokens", min_new_tokens, minimum=0)
        if min_new > max_new_tokens:
            raise ValueError(f"min_new_tokens={min_new} exceeds max_new_tokens={max_new_tokens}")
        if isinstance(repetition_penalty, bool) or not isinstance(
                repetition_penalty, (int, float, np.number)) or not np.isfinite(
                repetition_penalty) or repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty: expected a number > 0 (1 = none, > 1 "
                             f"discourages repeats), got {repetition_penalty!r}")
        eos = _eos_list(eos_token_id, model)
        self.samp = dataclasses.replace(self.samp, penalty=float(repetition_penalty) != 1.0,
                                        min_new=min_new > 0 and bool(eos))
        eos += [-1] * (-len(eos) % 8 or (8 if not eos else 0))  # fixed size: no recompiles
        P = bucket_length(longest)
        self.ids, self.mask = _left_pad_to(ids, mask, P)
        self.lengths = lengths
        self.max_new = max_new_tokens
        self.n_out = bucket_length(self.max_new, minimum=8)
        self.cache_len = P + self.n_out
        self.graphdef, self.params = nnx.split(model)
        self.key = jax.random.key(int(seed))
        self.knobs = _Knobs(temperature=jnp.float32(max(temperature, 1e-6)),
                            top_p=jnp.float32(1.0 if top_p is None else top_p),
                            eos=jnp.asarray(eos, jnp.int32), min_new=jnp.int32(min_new),
                            penalty=jnp.float32(repetition_penalty))
        self.want_scores = bool(output_scores)
        self.feature_major = (FEATURE_MAJOR_DECODE if FEATURE_MAJOR_DECODE is not None
                              else jax.default_backend() == "cpu")

    def prefill(self) -> _State:
        return _prefill(self.graphdef, self.params, self.ids, self.mask, self.key, self.knobs,
                        samp=self.samp, n_out=self.n_out, cache_len=self.cache_len,
                        want_scores=self.want_scores)

    def decode(self, st: _State, stop: int, sink: Callable | None = None) -> _State:
        if sink is None:
            return _decode(self.graphdef, self.params, st, jnp.int32(stop), self.key, self.knobs,
                           jnp.int32(0), samp=self.samp, stream=False,
                           feature_major=self.feature_major)
        sid = next(_SINK_IDS)
        _SINKS[sid] = sink
        try:
            st = _decode(self.graphdef, self.params, st, jnp.int32(stop), self.key, self.knobs,
                         jnp.int32(sid), samp=self.samp, stream=True,
                         feature_major=self.feature_major)
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


def _check_streamer(streamer, run: _Run):
    if streamer is None:
        return
    if not (callable(getattr(streamer, "put", None)) and callable(getattr(streamer, "end", None))):
        raise TypeError(f"streamer: expected an object with put(ids) and end() (like "
                        f"transformers.TextStreamer), got {type(streamer).__name__}")
    if len(run.lengths) != 1:
        raise ValueError(f"streamer: supports one prompt (as transformers' TextStreamer), got "
                         f"{len(run.lengths)}; use callback= for a batch")


def generate_arrays(model: GPTNeoX, input_ids, max_new_tokens: int | None = None,
                    temperature: float | None = None, top_k: int | None = None,
                    top_p: float | None = None, seed: int = 0,
                    eos_token_id: int | Sequence[int] | None = None, *, attention_mask=None,
                    output_scores: bool = False, callback=None, streamer=None,
                    do_sample: bool | None = None, max_length: int | None = None,
                    min_new_tokens: int = 0, repetition_penalty: float = 1.0
                    ) -> GenerationOutput:
    """Like `generate` but returns padded arrays (and optionally `scores`: the raw logits of
    each step, before the repetition penalty / min_new_tokens masking: HF's `output_logits`)."""
    run = _Run(model, input_ids, max_new_tokens, temperature, top_k, top_p, seed, eos_token_id,
               attention_mask, output_scores, do_sample=do_sample, max_length=max_length,
               min_new_tokens=min_new_tokens, repetition_penalty=repetition_penalty)
    _check_streamer(streamer, run)
    return _execute(run, callback, streamer)


def generate(model: GPTNeoX, input_ids, max_new_tokens: int | None = None,
             temperature: float | None = None, top_k: int | None = None,
             top_p: float | None = None, seed: int = 0,
             eos_token_id: int | Sequence[int] | None = None, *, attention_mask=None,
             callback: Callable[[np.ndarray, np.ndarray], object] | None = None,
             streamer=None, do_sample: bool | None = None, max_length: int | None = None,
             min_new_tokens: int = 0, repetition_penalty: float = 1.0) -> list[list[int]]:
    """Generate new tokens for each prompt (HF `generate`'s common arguments); returns the new
    tokens per prompt (the EOS included when one ended it).

    input_ids: a list of token lists (different lengths allowed), one token list, or an array
      [B, T] with `attention_mask` [B, T] (1 = real token; left or right padding).
    max_new_tokens: new tokens per prompt; or max_length: prompt + new tokens (the prompt
      counted as the input's width, as HF does); exactly one of the two.
    do_sample: False = greedy whatever the temperature; True = sampling from
      softmax(logits / temperature) (temperature default 1.0) after the top-k / top-p filters;
      None (default) = the temperature decides (None or 0 greedy, > 0 sampling).
      seed: the sampling seed (same seed + same inputs = same tokens).
    eos_token_id: None (default) = the model's (`model.config.eos_token_id`: Pythia's
      <|endoftext|>, `pythia_jax.tokenizer.EOD_ID` = 0); an id or a list of ids; `[]` = no EOS
      (always `max_new_tokens` tokens). A sequence stops after emitting one.
    min_new_tokens: the EOS ids are masked (-inf) until each row has this many new tokens.
    repetition_penalty: HF's: the logit of every token already in the row (prompt included)
      is divided by it when positive, multiplied when negative (1.0 = off).
    callback(tokens_B, done_B): called as soon as each step's tokens exist (np.int32 [B];
      PAD_ID for sequences already finished) with the done flags [B]. It may return None
      (continue), True (stop every sequence now) or a bool array [B] (stop those sequences,
      e.g. on a stop string); the tokens produced so far are returned either way.
    streamer: an object with `put(ids)` / `end()` (transformers' `TextStreamer` /
      `TextIteratorStreamer` work, given our tokenizer): `put` gets the prompt [1, P] first,
      then each new token [1]; `end()` when generation ends. One prompt only.
    """
    return generate_arrays(model, input_ids, max_new_tokens, temperature, top_k, top_p, seed,
                           eos_token_id, attention_mask=attention_mask, callback=callback,
                           streamer=streamer, do_sample=do_sample, max_length=max_length,
                           min_new_tokens=min_new_tokens,
                           repetition_penalty=repetition_penalty).to_lists()


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


def _with_streamer(run: _Run, callback, streamer):
    """A callback that feeds `streamer` (the prompt first, as HF does) then calls `callback`."""
    P = run.ids.shape[1]
    streamer.put(run.ids[:, P - int(run.lengths[0]):].copy())

    def both(toks, done):  # one row, unfinished before this step: toks[0] is a real token
        streamer.put(np.asarray(toks[:1]).copy())
        return None if callback is None else callback(toks, done)
    return both


def _execute(run: _Run, callback=None, streamer=None) -> GenerationOutput:
    if streamer is not None:
        callback = _with_streamer(run, callback, streamer)
        try:
            return _execute(run, callback)
        finally:
            streamer.end()
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


def stream_generate(model: GPTNeoX, input_ids, max_new_tokens: int | None = None,
                    temperature: float | None = None, top_k: int | None = None,
                    top_p: float | None = None, seed: int = 0,
                    eos_token_id: int | Sequence[int] | None = None, *, attention_mask=None,
                    do_sample: bool | None = None, max_length: int | None = None,
                    min_new_tokens: int = 0, repetition_penalty: float = 1.0
                    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield `(tokens_B, done_B)` as each step's tokens are produced (the same tokens as
    `generate` with the same arguments; PAD_ID for sequences already finished). Closing the
    generator early stops the computation at the next step."""
    run = _Run(model, input_ids, max_new_tokens, temperature, top_k, top_p, seed, eos_token_id,
               attention_mask, False, do_sample=do_sample, max_length=max_length,
               min_new_tokens=min_new_tokens, repetition_penalty=repetition_penalty)
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
