"""The GPT-NeoX decoder layer and its math, written once (reference doc section 1).

One function, `decoder_layer`, is the layer for training's forward, the cached prefill and
single-token decoding alike; what differs between those is passed in, not copied:

- the attention step (`attention(q, k, v, state, *, rotary, pattern) -> (o, state)`, all
  [B, T, N, H]): the causal kernels of `pythia_jax.attention` for training, a write into the
  KV cache plus masked attention for prefill and decode. The caller (`model`, `generation`)
  builds it; this module imports no attention code, so `attention/` can take its rotary math
  from here.
- the `Layout` of the activations: `ROW` = [B, T, D], features last, kernels as stored;
  `FEATURE_MAJOR` = [D, B] (one token per sequence, features first) with every kernel
  transposed once to [out..., in...] (`Layout.prepare`), the matmul's left operand. XLA:CPU
  streams a weight about twice as fast that way for a few columns (decoding on CPU).
  LayerNorm, the dense layers and the hand-over to attention follow the layout; rotary,
  attention and the q/k/v sites are always [B, T, N, H].
- `taps`: capture and intervention points at TransformerLens' sites (`Taps`, `SITES`).

Parameters of one layer (`p`, no leading layers axis, names as `GPTNeoX.layer_params`):
ln1/ln2 scale, bias [D]; qkv kernel [D, 3, N, H] (3 = q, k, v on a major axis, so each comes
out of the one matmul contiguous), bias [3, N, H]; out kernel [N, H, D], bias [D]; mlp_in
[D, F] / [F]; mlp_out [F, D] / [D].
Shape suffixes: B batch, T query length, S key length, D width, N heads, H head dim,
R rotary dims, F MLP width.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from pythia_jax.config import ModelConfig
from pythia_jax.sharding import constrain

__all__ = ["dtype_of", "layer_norm", "rotary_tables", "apply_rotary", "gelu", "Layout", "ROW",
           "FEATURE_MAJOR", "Taps", "SITES", "MODEL_SITES", "decoder_layer"]

_DT = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype_of(name: str):
    return _DT[name]


# ------------------------------------------------------------------------------------------------
# The math
def layer_norm(x, scale, bias, eps, axis: int = -1):
    """Two-pass LayerNorm in float32 over `axis` (torch semantics), returned in x's dtype."""
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=axis, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=axis, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + eps)
    shape = [1] * x.ndim
    shape[axis] = x.shape[axis]
    y = y * scale.astype(jnp.float32).reshape(shape) + bias.astype(jnp.float32).reshape(shape)
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


def gelu(x, approximate: bool):
    """GELU: exact (erf, HF "gelu") or the tanh approximation ("gelu_new"), by config."""
    return jax.nn.gelu(x, approximate=approximate)


# ------------------------------------------------------------------------------------------------
# Layouts
#: how many leading axes of each stored kernel are its input (contracted) axes
_KERNEL_IN_AXES = {"qkv_kernel": 1, "out_kernel": 2, "mlp_in_kernel": 1, "mlp_out_kernel": 1}


@dataclasses.dataclass(frozen=True)
class Layout:
    """Axis order of the layer's activations (static: a different layout is another program).

    Row-major ([B, T, D], kernels [in..., out...] as stored) or feature-major ([D, B], kernels
    [out..., in...] after `prepare`). Only LayerNorm's axis, the dense layers' orientation and
    the hand-over to and from attention ([B, T, N, H] in both) depend on it.
    """
    feature_major: bool

    def prepare(self, p: dict) -> dict:
        """One layer's stored parameters in this layout's kernel orientation."""
        if not self.feature_major:
            return p
        q = dict(p)
        for name, n_in in _KERNEL_IN_AXES.items():
            w = p[name]
            q[name] = w.transpose(tuple(range(n_in, w.ndim)) + tuple(range(n_in)))
        return q

    def norm(self, x, scale, bias, eps):
        return layer_norm(x, scale, bias, eps, axis=0 if self.feature_major else -1)

    def dense(self, h, kernel, bias, n_in: int, cdt):
        """h times kernel over the `n_in` feature axes, float32 accumulation, + bias (None:
        none), in cdt."""
        w = kernel.astype(cdt)
        if self.feature_major:  # w [out..., in...] . h [in..., B] -> [out..., B]
            dims = ((tuple(range(w.ndim - n_in, w.ndim)), tuple(range(n_in))), ((), ()))
            y = jax.lax.dot_general(w, h, dims, preferred_element_type=jnp.float32)
            if bias is None:
                return y.astype(cdt)
            b = bias.astype(jnp.float32).reshape(bias.shape + (1,) * (h.ndim - n_in))
        else:  # h [..., in...] . w [in..., out...] -> [..., out...]
            dims = ((tuple(range(h.ndim - n_in, h.ndim)), tuple(range(n_in))), ((), ()))
            y = jax.lax.dot_general(h, w, dims, preferred_element_type=jnp.float32)
            if bias is None:
                return y.astype(cdt)
            b = bias.astype(jnp.float32)
        return (y + b).astype(cdt)

    def split_heads(self, qkv):
        """The QKV projection's output -> (q, k, v), each [B, T, N, H]."""
        if self.feature_major:  # [3, N, H, B] -> 3 x [B, 1, N, H]
            return tuple(qkv[i].transpose(2, 0, 1)[:, None] for i in range(3))
        return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, T, 3, N, H]: major-axis slices

    def merge_heads(self, o_BTNH):
        """Attention's output -> the input of the output projection."""
        if self.feature_major:  # [B, 1, N, H] -> [N, H, B]
            return o_BTNH[:, 0].transpose(1, 2, 0)
        return o_BTNH

    def constrain(self, x, axes):
        """Activation sharding by logical names (row-major only; feature-major is CPU decoding)."""
        return x if self.feature_major else constrain(x, axes)


ROW = Layout(feature_major=False)
FEATURE_MAJOR = Layout(feature_major=True)


# ------------------------------------------------------------------------------------------------
# Capture and intervention points
#: the layer's sites (TransformerLens names inside `blocks.{l}.`), in the order they are met;
#: shapes in the row layout (q..z are [B, T, N, H] in every layout; the residual, attn_out and
#: mlp sites follow the layout: [D, B] / [F, B] feature-major). hook_resid_mid exists only with
#: the sequential residual (Pythia's block is parallel).
SITES = (
    "hook_resid_pre",     # [B, T, D] the layer's input
    "attn.hook_q",        # [B, T, N, H] before rotary
    "attn.hook_k",
    "attn.hook_v",
    "attn.hook_rot_q",    # after rotary
    "attn.hook_rot_k",
    "attn.hook_pattern",  # [B, N, T, S] softmax probabilities (computed only when tapped)
    "attn.hook_z",        # [B, T, N, H] attention output per head, before the projection
    "hook_attn_out",      # [B, T, D]
    "hook_resid_mid",     # [B, T, D] x + attn_out (sequential residual only)
    "mlp.hook_pre",       # [B, T, F] before GELU
    "mlp.hook_post",      # after GELU
    "hook_mlp_out",       # [B, T, D]
    "hook_resid_post",    # [B, T, D] the layer's output
)
#: sites outside the layers (applied by the model, `layer` = None)
MODEL_SITES = ("ln_final.hook_normalized",)  # [B, T, D] the final LayerNorm's output
_ROTARY_SITES = frozenset({"attn.hook_rot_q", "attn.hook_rot_k", "attn.hook_pattern"})
#: the sites between the QKV projection and the output projection (none of them exists on the
#: packed attention path, which hands the projection's output to the kernel as it is)
_ATTENTION_SITES = frozenset({"attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_z"}
                             | _ROTARY_SITES)


@dataclasses.dataclass(frozen=True)
class Taps:
    """What to capture and what to change at the sites of `SITES` / `MODEL_SITES`.

    capture: site names whose values are returned (the model stacks layer sites on a leading
      [L] axis, with `scan_layers` too). The value captured is the one after any edit.
    edits: (site, fn) pairs; at the site the value becomes `fn(value, layer, data)` (in
      order, when a site has several). `layer` is the layer index as an int32 scalar (traced
      under `scan_layers`: select with `jnp.where(layer == l, …)` or index `data[layer]`;
      None at model sites); `data` is this object's `data`.
    data: a pytree of arrays for the edits (patch values, directions, masks). It is traced:
      under `jax.jit` a Taps is an argument like any other, and only a change of `capture` /
      `edits` / `layers` (static, compared by value / function identity) compiles again.
    layers: {site: layer indices} (or (site, layers) pairs): a layer site listed here is
      captured and edited only at those layers; its capture is stacked over them, in
      increasing order ([len(layers), ...] instead of [L, ...]). The model runs the layers in
      segments of equal active sites (each scanned with `scan_layers`), so a layer where a
      site is off runs the program without it (e.g. the fused attention kernels instead of the
      explicit pattern).

    With `taps=None` (or an empty Taps) the layer's program is the same as without the seam.
    The attention pattern is computed (explicit softmax, instead of the fused kernels) only
    when `attn.hook_pattern` is captured or edited; tapping rotated q / k or the pattern also
    turns off rotary fused into the Pallas kernel.
    """
    capture: frozenset = frozenset()
    edits: tuple = ()
    data: Any = None
    layers: tuple = ()

    def __post_init__(self):
        capture = frozenset([self.capture] if isinstance(self.capture, str) else self.capture)
        edits = self.edits.items() if isinstance(self.edits, dict) else self.edits
        edits = tuple((name, fn) for name, fn in edits)
        known = SITES + MODEL_SITES
        for name in sorted(capture) + [n for n, _ in edits]:
            if name not in known:
                raise ValueError(f"taps: unknown site {name!r}; expected one of {known}")
        per_site = self.layers.items() if isinstance(self.layers, dict) else self.layers
        layers = []
        for name, ids in per_site:
            if name not in SITES:
                raise ValueError(f"taps: layers: {name!r} is not a layer site; expected one of "
                                 f"{SITES}")
            ids = (ids,) if isinstance(ids, int) else tuple(ids)
            if not ids or any(not isinstance(i, int) or isinstance(i, bool) or i < 0
                              for i in ids):
                raise ValueError(f"taps: layers of {name!r}: expected non-negative layer "
                                 f"indices, got {ids}")
            layers.append((name, tuple(sorted(set(ids)))))
        object.__setattr__(self, "layers", tuple(sorted(layers)))
        for name, fn in edits:
            if not callable(fn):
                raise TypeError(f"taps: the edit of {name!r} must be a function "
                                f"fn(value, layer, data) -> value, got {type(fn).__name__}")
        object.__setattr__(self, "capture", capture)
        object.__setattr__(self, "edits", edits)

    def touches(self, names) -> bool:
        """Whether any of `names` is captured or edited."""
        names = frozenset([names] if isinstance(names, str) else names)
        return bool(names & self.capture) or any(n in names for n, _ in self.edits)

    @property
    def needs_layer(self) -> bool:
        return bool(self.edits)

    def max_layer(self) -> int:
        """The highest layer index `layers` names (-1 when it names none)."""
        return max((ids[-1] for _, ids in self.layers), default=-1)

    def segments(self, num_layers: int) -> list:
        """[(start, stop, taps)]: maximal runs of layers with the same active sites, each with
        this Taps restricted to them (`layers` resolved, so `taps.layers == ()`)."""
        out: list = []
        for layer in range(num_layers):
            off = frozenset(s for s, ids in self.layers if layer not in ids)
            if out and out[-1][2] == off:
                out[-1][1] = layer + 1
            else:
                out.append([layer, layer + 1, off])
        return [(a, b, Taps(capture=self.capture - off,
                            edits=tuple((n, f) for n, f in self.edits if n not in off),
                            data=self.data)) for a, b, off in out]

    def at(self, name: str, value, layer, captured: dict):
        """Apply the edits of site `name` to `value`; record it in `captured` if asked."""
        for site, fn in self.edits:
            if site == name:
                value = fn(value, layer, self.data)
        if name in self.capture:
            captured[name] = value
        return value


jax.tree_util.register_dataclass(Taps, data_fields=["data"],
                                 meta_fields=["capture", "edits", "layers"])

AttentionStep = Callable[..., tuple]


# ------------------------------------------------------------------------------------------------
# The layer
def decoder_layer(cfg: ModelConfig, p: dict, x, rope, attention: AttentionStep, *,
                  layout: Layout = ROW, state=None, taps: Taps | None = None, layer=None,
                  fused_rotary: bool = False):
    """One GPT-NeoX layer: LN, fused QKV, partial rotary, attention, parallel (or sequential)
    residual MLP. Returns (x, state, captured).

    x: [B, T, D] (ROW) or [D, B] (FEATURE_MAJOR); p: this layer's parameters in
    `layout.prepare`'s orientation; rope: (cos_BTR, sin_BTR). `attention(q, k, v, state, *,
    rotary, pattern)` takes q, k, v [B, T, N, H] and returns (o [B, T, N, H], new state);
    `state` is whatever it carries between steps (a KV cache, or None). With
    `rotary=(cos, sin)` q and k come unrotated (`fused_rotary`: the step rotates them;
    `attend` does it inside our Pallas kernel where it runs, in XLA elsewhere);
    `pattern`, when not None, is a function the step must apply to the softmax probabilities
    [B, N, T, S] (and use its result), given only when the pattern site is tapped.
    `captured`: {site: value} for the sites `taps` captures ({} without taps).

    Packed attention: when `attention` has a `packed` step (`packed(qkv, *, bias, num_heads,
    rotary) -> o`, with `packed.supported(B, T, N, H, dtype, rotary_dim)`) and it supports the
    shapes, the rotary is fused and no site between the projections is tapped, the QKV
    projection's matmul [B, T, 3*N*H] goes to it as the matmul wrote it, with the QKV bias
    beside it (the kernel adds it, and returns its gradient), and its [B, T, N*H] output to
    the output projection: no split, transpose or stack of q, k, v on either side (the kernel
    reads them in place), no reduction of their gradient in XLA. Same math as the split path.
    """
    cdt = dtype_of(cfg.dtype)
    eps = cfg.layer_norm_eps
    captured: dict = {}

    def site(name, value):
        return value if taps is None else taps.at(name, value, layer, captured)

    x = site("hook_resid_pre", x)
    a = layout.norm(x, p["ln1_scale"], p["ln1_bias"], eps)
    fused = fused_rotary and not (taps is not None and taps.touches(_ROTARY_SITES))
    packed = getattr(attention, "packed", None)
    N, H = cfg.num_heads, cfg.head_dim
    if (packed is not None and fused and state is None and not layout.feature_major
            and not (taps is not None and taps.touches(_ATTENTION_SITES))
            and packed.supported(x.shape[0], x.shape[1], N, H, cdt, rope[0].shape[-1])):
        D3 = 3 * N * H
        qkv = layout.dense(a, p["qkv_kernel"].reshape(-1, D3), None, 1, cdt)  # bias: kernel's
        qkv = layout.constrain(qkv, ("batch", "length", None))
        o = checkpoint_name(packed(qkv, bias=p["qkv_bias"].reshape(D3), num_heads=N,
                                   rotary=rope), "attn_out")
        attn_out = site("hook_attn_out", layout.dense(o, p["out_kernel"].reshape(N * H, -1),
                                                      p["out_bias"], 1, cdt))
        return _mlp_and_residual(cfg, p, x, attn_out, layout, site, captured, state)
    q, k, v = layout.split_heads(layout.dense(a, p["qkv_kernel"], p["qkv_bias"], 1, cdt))
    q = site("attn.hook_q", q)  # [B, T, N, H]
    k = site("attn.hook_k", k)
    v = site("attn.hook_v", v)
    if not fused:
        q = site("attn.hook_rot_q", apply_rotary(q, *rope))
        k = site("attn.hook_rot_k", apply_rotary(k, *rope))
    heads = ("batch", "length", "act_heads", None)
    q, k, v = (layout.constrain(t, heads) for t in (q, k, v))
    pattern = None
    if taps is not None and taps.touches("attn.hook_pattern"):
        def pattern(probs_BNTS):
            return site("attn.hook_pattern", probs_BNTS)
    o, state = attention(q, k, v, state, rotary=rope if fused else None, pattern=pattern)
    o = site("attn.hook_z", checkpoint_name(o, "attn_out"))
    attn_out = site("hook_attn_out", layout.dense(layout.merge_heads(o), p["out_kernel"],
                                                  p["out_bias"], 2, cdt))
    return _mlp_and_residual(cfg, p, x, attn_out, layout, site, captured, state)


def _mlp_and_residual(cfg, p, x, attn_out, layout, site, captured, state):
    """The rest of `decoder_layer` after the attention output: the MLP on its own LayerNorm
    and the (parallel or sequential) residual."""
    cdt = dtype_of(cfg.dtype)
    eps = cfg.layer_norm_eps
    if cfg.use_parallel_residual:
        m = layout.norm(x, p["ln2_scale"], p["ln2_bias"], eps)
    else:
        x = site("hook_resid_mid", x + attn_out)
        m = layout.norm(x, p["ln2_scale"], p["ln2_bias"], eps)
    h = layout.dense(m, p["mlp_in_kernel"], p["mlp_in_bias"], 1, cdt)
    h = site("mlp.hook_pre", layout.constrain(h, ("batch", "length", "act_mlp")))
    h = site("mlp.hook_post", gelu(h, cfg.gelu_approximate))
    mlp_out = site("hook_mlp_out", layout.dense(h, p["mlp_out_kernel"], p["mlp_out_bias"], 1,
                                                cdt))
    x = x + attn_out + mlp_out if cfg.use_parallel_residual else x + mlp_out
    x = site("hook_resid_post", layout.constrain(x, ("batch", "length", "act_embed")))
    return x, state, captured
