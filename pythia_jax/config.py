"""Model configuration: `ModelConfig`, the Pythia presets, HF `config.json` <-> `ModelConfig`.

Facts (shapes, padded vocab, rotary fraction, init methods) come from
`docs/pythia_reference.md` sections 1 and 2; every preset's parameter count is checked in tests
against the model card.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping

__all__ = [
    "ModelConfig",
    "PRESETS",
    "ConfigError",
    "get_preset",
    "preset_names",
    "param_counts_formula",
]


class ConfigError(ValueError):
    """A configuration that cannot describe a Pythia / GPT-NeoX model."""


_ATTENTION_IMPLS = ("xla", "pallas", "splash", "cudnn", "auto")
#: The impls that may run our Pallas kernel, the only one rotary is fused into.
_FUSED_ROTARY_IMPLS = ("pallas", "auto")
_REMAT_POLICIES = ("none", "full", "dots_saveable", "save_attn_out")
_INIT_METHODS = ("small_init", "wang_init", "normal", "scaled_normal")
_DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Every architectural field of a GPT-NeoX model, plus numerics and execution options.

    The architectural fields mirror the HF `GPTNeoXConfig` names where one exists.
    """

    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    vocab_size: int = 50304
    rotary_pct: float = 0.25
    rotary_emb_base: float = 10000.0
    max_position_embeddings: int = 2048
    layer_norm_eps: float = 1e-5
    use_parallel_residual: bool = True
    # False: exact erf GELU (HF `hidden_act="gelu"`, what HF inference computes).
    # True: tanh approximation (what NeoX v1.0 trained with via `bias-gelu-fusion`).
    gelu_approximate: bool = False
    # Numerics.
    param_dtype: str = "float32"
    dtype: str = "float32"  # compute dtype; logits are always returned in float32.
    # Execution.
    attention_impl: str = "xla"
    # The partial rotary inside our Pallas kernel (q, k go in raw; docs/attention.md).
    # None (default): fused wherever the kernel runs, i.e. attention_impl="pallas", or "auto"
    #   when it picks the kernel (on TPU); elsewhere rotary runs in XLA before attention.
    # True: asked for; refused (ConfigError) with "xla" / "splash" / "cudnn", which never run the
    #   kernel; with "auto" a warning on the `pythia_jax` logger each time auto picks another
    #   kernel (CPU, GPU, a shape fallback), which then rotates in XLA.
    # False: never fused (rotary in XLA before every kernel).
    # Everywhere: KV-cache decoding (xla with a mask) and taps of the rotated q / k or of the
    # pattern see rotary applied outside any kernel.
    fused_rotary: bool | None = None
    # True: one compiled layer body scanned over the stacked weights (compile time independent
    # of depth; on XLA:CPU also faster, since unrolled layers copy every weight slice).
    # False: a Python loop over the layers (numerically the same up to float rounding).
    scan_layers: bool = True
    remat: str = "none"
    # Initialization (Pythia: small_init + wang_init; 6.9b and 12b: normal + scaled_normal).
    init_method: str = "small_init"
    output_init_method: str = "wang_init"
    init_std: float = 0.02
    # Tokenizer facts carried into exports.
    bos_token_id: int = 0
    eos_token_id: int = 0

    def __post_init__(self):
        self.validate()

    # ----------------------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def rotary_dim(self) -> int:
        # NeoX / HF: int(head_dim * rotary_pct)
        return int(self.head_dim * self.rotary_pct)

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def validate(self) -> None:
        def need(cond, field, expected, got):
            if not cond:
                raise ConfigError(f"ModelConfig.{field}: expected {expected}, got {got!r}")

        for f in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "vocab_size",
                  "max_position_embeddings"):
            v = getattr(self, f)
            need(isinstance(v, int) and not isinstance(v, bool) and v > 0, f, "a positive integer", v)
        need(self.hidden_size % self.num_heads == 0, "hidden_size",
             f"a multiple of num_heads={self.num_heads}", self.hidden_size)
        need(0.0 <= self.rotary_pct <= 1.0, "rotary_pct", "a fraction in [0, 1]", self.rotary_pct)
        need(self.rotary_dim % 2 == 0, "rotary_pct",
             f"a fraction giving an even rotary dim (head_dim={self.head_dim})", self.rotary_pct)
        need(self.rotary_emb_base > 0, "rotary_emb_base", "a positive number", self.rotary_emb_base)
        need(self.layer_norm_eps > 0, "layer_norm_eps", "a positive number", self.layer_norm_eps)
        need(self.param_dtype in _DTYPES, "param_dtype", f"one of {_DTYPES}", self.param_dtype)
        need(self.dtype in _DTYPES, "dtype", f"one of {_DTYPES}", self.dtype)
        need(self.attention_impl in _ATTENTION_IMPLS, "attention_impl",
             f"one of {_ATTENTION_IMPLS}", self.attention_impl)
        need(self.fused_rotary is None or isinstance(self.fused_rotary, bool), "fused_rotary",
             "None, True or False", self.fused_rotary)
        if self.fused_rotary is True and self.attention_impl not in _FUSED_ROTARY_IMPLS:
            raise ConfigError(
                f"ModelConfig.fused_rotary: True asks for rotary fused into our Pallas kernel, "
                f"which attention_impl={self.attention_impl!r} never runs; use attention_impl "
                f"'pallas' (or 'auto', which picks it on TPU), or leave fused_rotary=None "
                f"(fused wherever the kernel runs)")
        need(self.remat in _REMAT_POLICIES, "remat", f"one of {_REMAT_POLICIES}", self.remat)
        need(self.init_method in _INIT_METHODS, "init_method", f"one of {_INIT_METHODS}",
             self.init_method)
        need(self.output_init_method in _INIT_METHODS, "output_init_method",
             f"one of {_INIT_METHODS}", self.output_init_method)

    # ----------------------------------------------------------------------------------------
    # Parameter and FLOP counts (closed forms; model_info cross-checks them against the real tree)
    def param_counts(self) -> dict:
        return param_counts_formula(self.vocab_size, self.hidden_size, self.num_layers,
                                    self.intermediate_size)

    def flops_per_token(self, seq_len: int | None = None) -> dict:
        """Matmul FLOPs per token (multiply-add = 2 FLOPs).

        forward = 2 * (matmul weights incl. embed_out) + attention (QK^T and PV: 4 * L * T * d,
        causal not discounted, as in the PaLM / Megatron MFU convention); training = 3 * forward.
        The input embedding is a gather and costs no matmul FLOPs.
        """
        T = seq_len or self.max_position_embeddings
        d, L, f, V = self.hidden_size, self.num_layers, self.intermediate_size, self.vocab_size
        matmul_weights = L * (4 * d * d + 2 * d * f) + V * d
        fwd = 2 * matmul_weights + 4 * L * T * d
        return {"seq_len": T, "forward": fwd, "training": 3 * fwd}

    # ----------------------------------------------------------------------------------------
    # HF config.json
    def to_hf_dict(self, torch_dtype: str | None = None) -> dict:
        """The hub's Pythia schema (`rotary_pct` / `rotary_emb_base`)."""
        return {
            "architectures": ["GPTNeoXForCausalLM"],
            "model_type": "gpt_neox",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "intermediate_size": self.intermediate_size,
            "hidden_act": "gelu_new" if self.gelu_approximate else "gelu",
            "rotary_pct": self.rotary_pct,
            "rotary_emb_base": self.rotary_emb_base,
            "max_position_embeddings": self.max_position_embeddings,
            "layer_norm_eps": self.layer_norm_eps,
            "use_parallel_residual": self.use_parallel_residual,
            "tie_word_embeddings": False,
            "attention_bias": True,
            "attention_dropout": 0.0,
            "hidden_dropout": 0.0,
            "initializer_range": self.init_std,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "use_cache": True,
            "torch_dtype": torch_dtype or self.param_dtype,
        }

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any], *, source: str = "config.json",
                     **overrides) -> "ModelConfig":
        """Read an HF GPT-NeoX config (hub schema or transformers 5 `rope_parameters`).

        Unknown or contradictory fields raise `ConfigError` naming `source` and the field.
        """
        def err(field, msg):
            return ConfigError(f"{source}: field {field!r}: {msg}")

        if not isinstance(d, Mapping):
            raise ConfigError(f"{source}: expected a JSON object, got {type(d).__name__}")
        unknown = sorted(k for k in d if k not in _HF_KNOWN_KEYS)
        if unknown:
            raise err(unknown[0], f"unknown field (all unknown: {unknown}); expected only "
                                  "GPT-NeoX / PretrainedConfig fields")
        mt = d.get("model_type")
        if mt != "gpt_neox":
            raise err("model_type", f"expected 'gpt_neox', got {mt!r}")
        archs = d.get("architectures")
        if archs is not None and not any(a.startswith("GPTNeoX") for a in archs):
            raise err("architectures", f"expected GPTNeoXForCausalLM, got {archs!r}")

        required = {"vocab_size": "vocab_size", "hidden_size": "hidden_size",
                    "num_hidden_layers": "num_layers", "num_attention_heads": "num_heads",
                    "intermediate_size": "intermediate_size"}
        kw: dict[str, Any] = {}
        for hf_key, our_key in required.items():
            if hf_key not in d:
                raise err(hf_key, "missing (HF class defaults are GPT-NeoX-20B's; never relied on)")
            v = d[hf_key]
            if not isinstance(v, int) or isinstance(v, bool):
                raise err(hf_key, f"expected an integer, got {v!r}")
            kw[our_key] = v

        rope = d.get("rope_parameters")
        if rope is None:
            rope = d.get("rope_scaling")  # a null `rope_scaling` is common in 4.x files
            if rope is not None:
                raise err("rope_scaling", f"rope scaling is not supported, got {rope!r}")
            rope = {}
        if not isinstance(rope, Mapping):
            raise err("rope_parameters", f"expected an object, got {rope!r}")
        rope_type = rope.get("rope_type", "default")
        if rope_type != "default":
            raise err("rope_parameters.rope_type", f"only 'default' rotary is supported, got "
                                                   f"{rope_type!r}")
        extra_rope = sorted(set(rope) - {"rope_type", "partial_rotary_factor", "rope_theta"})
        if extra_rope:
            raise err(f"rope_parameters.{extra_rope[0]}", "unsupported rotary parameter")

        def pick(legacy_key, rope_key, default):
            a, b = d.get(legacy_key), rope.get(rope_key)
            if a is not None and b is not None and not math.isclose(float(a), float(b)):
                raise err(legacy_key, f"contradicts rope_parameters.{rope_key}: {a!r} vs {b!r}")
            v = a if a is not None else b
            return default if v is None else float(v)

        kw["rotary_pct"] = pick("rotary_pct", "partial_rotary_factor", 1.0)
        kw["rotary_emb_base"] = pick("rotary_emb_base", "rope_theta", 10000.0)
        if "max_position_embeddings" in d:
            kw["max_position_embeddings"] = int(d["max_position_embeddings"])
        if "layer_norm_eps" in d:
            kw["layer_norm_eps"] = float(d["layer_norm_eps"])
        if "use_parallel_residual" in d:
            kw["use_parallel_residual"] = bool(d["use_parallel_residual"])
        act = d.get("hidden_act", "gelu")
        if act in _EXACT_GELU:
            kw["gelu_approximate"] = False
        elif act in _TANH_GELU:
            kw["gelu_approximate"] = True
        else:
            raise err("hidden_act", f"expected one of {_EXACT_GELU + _TANH_GELU}, got {act!r}")
        if d.get("tie_word_embeddings", False):
            raise err("tie_word_embeddings", "Pythia's embeddings are untied; expected false")
        if d.get("attention_bias", True) is not True:
            raise err("attention_bias", "expected true (GPT-NeoX attention has biases)")
        for k in ("hidden_dropout", "attention_dropout"):
            if float(d.get(k, 0.0) or 0.0) != 0.0:
                raise err(k, f"dropout is not supported; expected 0.0, got {d[k]!r}")
        if "initializer_range" in d:
            kw["init_std"] = float(d["initializer_range"])
        for k in ("bos_token_id", "eos_token_id"):
            v = d.get(k)
            if isinstance(v, int) and not isinstance(v, bool):
                kw[k] = v
        kw.update(overrides)
        try:
            return cls(**kw)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_hf_json(cls, path: str | os.PathLike, **overrides) -> "ModelConfig":
        path = os.fspath(path)
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except FileNotFoundError:
            raise ConfigError(f"{path}: file not found (expected an HF config.json)") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: "
                              f"{e.msg}") from None
        return cls.from_hf_dict(d, source=path, **overrides)


_EXACT_GELU = ("gelu",)
_TANH_GELU = ("gelu_new", "gelu_fast", "gelu_pytorch_tanh")

# Fields an HF GPT-NeoX config.json may legitimately contain (GPTNeoXConfig across transformers
# 4.24 … 5.x plus the generic PretrainedConfig keys). Anything else is an error, never ignored.
_HF_KNOWN_KEYS = frozenset("""
architectures model_type vocab_size hidden_size num_hidden_layers num_attention_heads
intermediate_size hidden_act rotary_pct rotary_emb_base rope_parameters rope_scaling rope_theta
partial_rotary_factor max_position_embeddings layer_norm_eps use_parallel_residual
tie_word_embeddings attention_bias attention_dropout hidden_dropout classifier_dropout
initializer_range bos_token_id eos_token_id pad_token_id use_cache torch_dtype dtype
transformers_version _name_or_path _attn_implementation_autoset return_dict output_hidden_states
output_attentions torchscript use_bfloat16 tf_legacy_loss pruned_heads chunk_size_feed_forward
is_encoder_decoder is_decoder cross_attention_hidden_size add_cross_attention tie_encoder_decoder
problem_type id2label label2id num_labels task_specific_params finetuning_task tokenizer_class
prefix sep_token_id decoder_start_token_id max_length min_length do_sample early_stopping
num_beams num_beam_groups diversity_penalty temperature top_k top_p typical_p
repetition_penalty length_penalty no_repeat_ngram_size encoder_no_repeat_ngram_size bad_words_ids
num_return_sequences output_scores return_dict_in_generate forced_bos_token_id
forced_eos_token_id remove_invalid_values exponential_decay_length_penalty suppress_tokens
begin_suppress_tokens
""".split())


def param_counts_formula(vocab_size: int, d: int, L: int, ff: int) -> dict:
    """Closed form (reference doc 2.3): layer = qkv + dense + mlp + 2 LN."""
    per_layer = (3 * d * d + 3 * d) + (d * d + d) + (d * ff + ff) + (ff * d + d) + 4 * d
    non_embedding = L * per_layer + 2 * d
    return {"total": non_embedding + 2 * vocab_size * d, "non_embedding": non_embedding}


def _preset(d, L, nh, V=50304, init=("small_init", "wang_init")) -> ModelConfig:
    return ModelConfig(hidden_size=d, num_layers=L, num_heads=nh, intermediate_size=4 * d,
                       vocab_size=V, init_method=init[0], output_init_method=init[1])


#: The Pythia suite (reference doc 2.1). 6.9b/12b: MP=2/4 vocab padding and NeoX default init.
PRESETS: dict[str, ModelConfig] = {
    "pythia-14m": _preset(128, 6, 4),
    "pythia-31m": _preset(256, 6, 8),
    "pythia-70m": _preset(512, 6, 8),
    "pythia-160m": _preset(768, 12, 12),
    "pythia-410m": _preset(1024, 24, 16),
    "pythia-1b": _preset(2048, 16, 8),
    "pythia-1.4b": _preset(2048, 24, 16),
    "pythia-2.8b": _preset(2560, 32, 32),
    "pythia-6.9b": _preset(4096, 32, 32, V=50432, init=("normal", "scaled_normal")),
    "pythia-12b": _preset(5120, 36, 40, V=50688, init=("normal", "scaled_normal")),
}


def preset_names() -> list[str]:
    return list(PRESETS)


def get_preset(name: str, **overrides) -> ModelConfig:
    """`get_preset("70m")`, `get_preset("pythia-70m-deduped")`, `get_preset("EleutherAI/pythia-1b")`."""
    key = name.split("/")[-1].lower()
    if key.endswith("-deduped"):
        key = key[: -len("-deduped")]
    if not key.startswith("pythia-"):
        key = "pythia-" + key
    if key not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; expected one of {preset_names()}")
    return PRESETS[key].replace(**overrides)
