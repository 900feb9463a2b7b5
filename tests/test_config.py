import json

import pytest

from pythia_jax.config import PRESETS, ConfigError, ModelConfig, get_preset
from pythia_jax.model import abstract_model, count_params

# The model card's table (reference doc 2.3): total / non-embedding.
CARD = {
    "pythia-70m": (70_426_624, 18_915_328),
    "pythia-160m": (162_322_944, 85_056_000),
    "pythia-410m": (405_334_016, 302_311_424),
    "pythia-1b": (1_011_781_632, 805_736_448),
    "pythia-1.4b": (1_414_647_808, 1_208_602_624),
    "pythia-2.8b": (2_775_208_960, 2_517_652_480),
    "pythia-6.9b": (6_857_302_016, 6_444_163_072),
    "pythia-12b": (11_846_072_320, 11_327_027_200),
}


@pytest.mark.parametrize("name", list(CARD))
def test_param_counts_from_real_tree_match_model_card(name):
    counts = count_params(abstract_model(get_preset(name)))
    assert (counts["total"], counts["non_embedding"]) == CARD[name]


def test_padded_vocab_and_init_per_size():
    assert {n: c.vocab_size for n, c in PRESETS.items()} == {
        **{n: 50304 for n in PRESETS}, "pythia-6.9b": 50432, "pythia-12b": 50688}
    for n, c in PRESETS.items():
        big = n in ("pythia-6.9b", "pythia-12b")
        assert (c.init_method, c.output_init_method) == (
            ("normal", "scaled_normal") if big else ("small_init", "wang_init"))
        assert c.rotary_dim == c.head_dim // 4
    assert PRESETS["pythia-2.8b"].head_dim == 80 and PRESETS["pythia-1b"].head_dim == 256


def test_preset_name_forms():
    assert get_preset("70m") == get_preset("EleutherAI/pythia-70m-deduped") == PRESETS["pythia-70m"]
    with pytest.raises(ConfigError, match="unknown model preset"):
        get_preset("pythia-7b")


HUB_70M = {  # the hub's schema (rotary_pct / rotary_emb_base)
    "architectures": ["GPTNeoXForCausalLM"], "bos_token_id": 0, "eos_token_id": 0,
    "hidden_act": "gelu", "hidden_size": 512, "initializer_range": 0.02,
    "intermediate_size": 2048, "layer_norm_eps": 1e-05, "max_position_embeddings": 2048,
    "model_type": "gpt_neox", "num_attention_heads": 8, "num_hidden_layers": 6,
    "rotary_emb_base": 10000, "rotary_pct": 0.25, "tie_word_embeddings": False,
    "torch_dtype": "float16", "transformers_version": "4.24.0", "use_cache": True,
    "use_parallel_residual": True, "vocab_size": 50304,
}


def test_hub_schema_and_transformers5_schema_give_the_same_config():
    a = ModelConfig.from_hf_dict(HUB_70M)
    v5 = {k: v for k, v in HUB_70M.items() if k not in ("rotary_pct", "rotary_emb_base")}
    v5["rope_parameters"] = {"partial_rotary_factor": 0.25, "rope_theta": 10000.0,
                             "rope_type": "default"}
    b = ModelConfig.from_hf_dict(v5)
    assert a == b
    assert a.rotary_dim == 16 and a.num_layers == 6 and not a.gelu_approximate
    assert a.param_counts()["total"] == CARD["pythia-70m"][0]


def test_to_hf_dict_round_trips_and_transformers_reads_it():
    from transformers import GPTNeoXConfig
    cfg = get_preset("160m")
    d = cfg.to_hf_dict()
    assert ModelConfig.from_hf_dict(d) == cfg
    hf = GPTNeoXConfig(**d)
    rope = hf.rope_parameters
    assert rope["partial_rotary_factor"] == 0.25 and rope["rope_theta"] == 10000
    assert hf.num_hidden_layers == 12 and hf.vocab_size == 50304


@pytest.mark.parametrize("patch, field", [
    ({"rotary_pct": 0.5, "rope_parameters": {"partial_rotary_factor": 0.25}}, "rotary_pct"),
    ({"unknown_thing": 1}, "unknown_thing"),
    ({"model_type": "llama"}, "model_type"),
    ({"hidden_act": "relu"}, "hidden_act"),
    ({"tie_word_embeddings": True}, "tie_word_embeddings"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling"),
    ({"num_hidden_layers": "six"}, "num_hidden_layers"),
    ({"hidden_size": 500}, "hidden_size"),
])
def test_bad_hf_configs_name_the_field(patch, field):
    d = dict(HUB_70M, **patch)
    with pytest.raises(ConfigError, match=field) as e:
        ModelConfig.from_hf_dict(d, source="some/config.json")
    assert "some/config.json" in str(e.value)


def test_missing_field_and_malformed_json(tmp_path):
    d = dict(HUB_70M)
    del d["vocab_size"]
    with pytest.raises(ConfigError, match="'vocab_size'.*missing"):
        ModelConfig.from_hf_dict(d)
    p = tmp_path / "config.json"
    p.write_text('{"model_type": "gpt_neox",\n  "hidden_size": }')
    with pytest.raises(ConfigError, match=r"config.json: malformed JSON at line 2"):
        ModelConfig.from_hf_json(p)
    p.write_text(json.dumps(HUB_70M))
    assert ModelConfig.from_hf_json(p).hidden_size == 512


def test_model_config_validation():
    with pytest.raises(ConfigError, match="attention_impl"):
        get_preset("70m", attention_impl="flash")
    with pytest.raises(ConfigError, match="hidden_size"):
        ModelConfig(hidden_size=100, num_layers=1, num_heads=3, intermediate_size=4)


def test_fused_rotary_is_on_by_default_and_an_unhonourable_request_is_refused():
    # None (the default): fused wherever our Pallas kernel runs ("pallas", or "auto" picking it).
    assert ModelConfig.fused_rotary is None and get_preset("70m").fused_rotary is None
    for impl in ("pallas", "auto"):
        assert get_preset("70m", attention_impl=impl, fused_rotary=True).fused_rotary is True
    for impl in ("xla", "splash", "cudnn", "pallas", "auto"):  # off is always possible
        assert get_preset("70m", attention_impl=impl, fused_rotary=False).fused_rotary is False
    # True where the kernel never runs cannot be honoured: refused, naming the field.
    for impl in ("xla", "splash", "cudnn"):
        with pytest.raises(ConfigError, match=rf"ModelConfig.fused_rotary: True .* "
                                              rf"attention_impl='{impl}' never runs"):
            get_preset("70m", attention_impl=impl, fused_rotary=True)
    with pytest.raises(ConfigError, match=r"ModelConfig.fused_rotary: expected None, True or "
                                          r"False, got 1"):
        get_preset("70m", attention_impl="pallas", fused_rotary=1)
    # An execution field: not in the HF config, so HF round trips are unchanged.
    cfg = get_preset("70m", attention_impl="pallas", fused_rotary=False)
    assert ModelConfig.from_hf_dict(cfg.to_hf_dict()) == get_preset("70m")


def test_flops_per_token_formula():
    cfg = get_preset("70m")
    d, L, V, T = 512, 6, 50304, 2048
    fwd = 2 * (L * 12 * d * d + V * d) + 4 * L * T * d
    assert cfg.flops_per_token(T) == {"seq_len": T, "forward": fwd, "training": 3 * fwd}
