"""HF checkpoint loading / saving: formats, naming variants, bit-exact round trips, bad input."""

import json
import os

import numpy as np
import pytest
import torch

import pythia_jax
from hf_utils import hf_logits, tiny_hf_model
from pythia_jax.hf import CheckpointError, SafetensorsFile, write_safetensors


def _sd(model):
    return {k.replace("lm_head.", "embed_out."): v for k, v in model.state_dict().items()}


def _export(tmp_path, hf, name="hf", dtype=None):
    d = tmp_path / name
    if dtype is not None:
        hf = hf.to(dtype)
    hf.save_pretrained(d)
    return d


def _rewrite(d, fn):
    """Rewrite d/model.safetensors with `fn(dict) -> dict`."""
    f = SafetensorsFile(str(d / "model.safetensors"))
    tensors = {k: np.array(f.get(k)) for k in f.keys()}
    del f
    write_safetensors(str(d / "model.safetensors"), fn(tensors))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_round_trip_hf_jax_hf_is_bit_exact(tmp_path, dtype):
    from transformers import GPTNeoXForCausalLM
    hf = tiny_hf_model(seed=4, init_scale=0.1).to(dtype)
    d = _export(tmp_path, hf)
    model = pythia_jax.from_pretrained(d, dtype="auto")
    assert model.config.param_dtype == {torch.float32: "float32", torch.float16: "float16"}[dtype]
    out = tmp_path / "back"
    pythia_jax.save_pretrained(model, out)
    back, info = GPTNeoXForCausalLM.from_pretrained(out, output_loading_info=True, dtype=dtype)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    a, b = _sd(hf), _sd(back)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype == dtype, k
        assert torch.equal(a[k], b[k]), k
    cfg = json.load(open(out / "config.json"))
    assert cfg["rotary_pct"] == 0.25 and cfg["rotary_emb_base"] == 10000
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()


def test_fp16_and_bf16_checkpoints_load_and_upcast(tmp_path):
    hf = tiny_hf_model(seed=5, init_scale=0.1)
    ids = np.arange(40).reshape(2, 20) % 128
    ref = hf_logits(hf, ids)
    for dt, tol in ((torch.float16, 2e-2), (torch.bfloat16, 1e-1)):
        d = _export(tmp_path, tiny_hf_model(seed=5, init_scale=0.1), name=str(dt), dtype=dt)
        model = pythia_jax.from_pretrained(d)  # default: float32 parameters
        assert model.config.param_dtype == "float32"
        assert np.abs(np.asarray(model(ids)) - ref).max() < tol
        # upcast is exact: the stored values survive
        f = SafetensorsFile(str(d / "model.safetensors"))
        stored = f.get("gpt_neox.embed_in.weight").astype(np.float32)
        assert np.array_equal(np.asarray(model.embed_in.embedding[...]), stored)


def test_legacy_buffers_are_ignored_and_lm_head_name_accepted(tmp_path):
    hf = tiny_hf_model(seed=6, init_scale=0.1)
    d = _export(tmp_path, hf)
    ids = np.arange(30).reshape(1, 30) % 128
    ref = np.asarray(pythia_jax.from_pretrained(d)(ids))

    def add_legacy(t):
        for i in range(2):
            t[f"gpt_neox.layers.{i}.attention.bias"] = np.tril(np.ones((1, 1, 8, 8), bool))
            t[f"gpt_neox.layers.{i}.attention.masked_bias"] = np.array(-1e9, np.float32)
            t[f"gpt_neox.layers.{i}.attention.rotary_emb.inv_freq"] = np.ones(2, np.float16)
        t["lm_head.weight"] = t.pop("embed_out.weight")
        return t
    _rewrite(d, add_legacy)
    assert "lm_head.weight" in SafetensorsFile(str(d / "model.safetensors")).keys()
    assert np.array_equal(np.asarray(pythia_jax.from_pretrained(d)(ids)), ref)


def test_sharded_safetensors_both_ways(tmp_path):
    from transformers import GPTNeoXForCausalLM
    hf = tiny_hf_model(seed=7, init_scale=0.1)
    model = pythia_jax.from_pretrained(_export(tmp_path, hf))
    out = pythia_jax.save_pretrained(model, tmp_path / "sharded", max_shard_size="60KB")
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all(os.path.isfile(os.path.join(out, s)) for s in shards)
    back = GPTNeoXForCausalLM.from_pretrained(out)
    for k, v in _sd(hf).items():
        assert torch.equal(v, _sd(back)[k]), k
    again = pythia_jax.from_pretrained(out)
    ids = np.arange(20).reshape(1, 20)
    assert np.array_equal(np.asarray(again(ids)), np.asarray(model(ids)))


def test_pytorch_bin_single_and_sharded(tmp_path):
    hf = tiny_hf_model(seed=8, init_scale=0.1)
    ids = np.arange(24).reshape(2, 12)
    ref = hf_logits(hf, ids)
    sd = _sd(hf)
    single = tmp_path / "bin"
    single.mkdir()
    hf.config.to_json_file(single / "config.json")
    torch.save(sd, single / "pytorch_model.bin")
    assert np.abs(np.asarray(pythia_jax.from_pretrained(single)(ids)) - ref).max() < 1e-4

    sharded = tmp_path / "bin_sharded"
    sharded.mkdir()
    hf.config.to_json_file(sharded / "config.json")
    keys = list(sd)
    parts = {"pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2],
             "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2:]}
    wm = {}
    for fname, ks in parts.items():
        torch.save({k: sd[k] for k in ks}, sharded / fname)
        wm.update({k: fname for k in ks})
    json.dump({"metadata": {}, "weight_map": wm}, open(sharded / "pytorch_model.bin.index.json", "w"))
    assert np.abs(np.asarray(pythia_jax.from_pretrained(sharded)(ids)) - ref).max() < 1e-4


@pytest.mark.parametrize("mutate, message", [
    (lambda t: {k: v for k, v in t.items() if k != "gpt_neox.layers.1.mlp.dense_4h_to_h.bias"},
     "missing tensor 'gpt_neox.layers.1.mlp.dense_4h_to_h.bias'"),
    (lambda t: t.update({"gpt_neox.layers.0.attention.extra.weight": np.zeros(3, np.float32)}) or t,
     "unexpected tensor 'gpt_neox.layers.0.attention.extra.weight'"),
    (lambda t: t.update({"gpt_neox.layers.2.input_layernorm.weight": np.zeros(64, np.float32)}) or t,
     "unexpected tensor 'gpt_neox.layers.2.input_layernorm.weight'"),
    (lambda t: t.update({"gpt_neox.layers.0.attention.query_key_value.weight":
                         np.zeros((64, 192), np.float32)}) or t,
     r"'gpt_neox.layers.0.attention.query_key_value.weight' has shape \(64, 192\), "
     r"expected \(192, 64\)"),
])
def test_bad_checkpoints_name_the_key(tmp_path, mutate, message):
    d = _export(tmp_path, tiny_hf_model(seed=9))
    _rewrite(d, mutate)
    with pytest.raises(CheckpointError, match=message):
        pythia_jax.from_pretrained(d)


def test_bad_config_and_missing_weights(tmp_path):
    d = _export(tmp_path, tiny_hf_model(seed=10))
    cfg = json.load(open(d / "config.json"))
    cfg["hidden_act"] = "swish"
    json.dump(cfg, open(d / "config.json", "w"))
    with pytest.raises(pythia_jax.ConfigError, match=r"config.json: field 'hidden_act'"):
        pythia_jax.from_pretrained(d)
    os.remove(d / "model.safetensors")
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        pythia_jax.from_pretrained(d)
    (tmp_path / "trunc").mkdir()
    with open(tmp_path / "trunc" / "model.safetensors", "wb") as fh:
        fh.write(b"\x10\x00")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        SafetensorsFile(str(tmp_path / "trunc" / "model.safetensors"))
    with pytest.raises(FileNotFoundError, match="no such directory"):
        pythia_jax.from_pretrained(tmp_path / "nope" / "x")


def test_save_pretrained_is_atomic_and_refuses_to_clobber(tmp_path, monkeypatch):
    model = pythia_jax.from_pretrained(_export(tmp_path, tiny_hf_model(seed=11)))
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="already exists"):
        pythia_jax.save_pretrained(model, dst)
    assert (dst / "precious.txt").read_text() == "keep me"

    from pythia_jax import hf as hf_lib
    calls = {"n": 0}
    real = hf_lib.write_safetensors

    def failing(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full")
        return real(*a, **k)
    monkeypatch.setattr(hf_lib, "write_safetensors", failing)
    with pytest.raises(OSError, match="disk full"):
        pythia_jax.save_pretrained(model, tmp_path / "new", max_shard_size="60KB")
    assert not (tmp_path / "new").exists()
    assert [p for p in os.listdir(tmp_path) if ".tmp-" in p] == []
    with pytest.raises(OSError, match="disk full"):
        calls["n"] = 0
        pythia_jax.save_pretrained(model, dst, overwrite=True, max_shard_size="60KB")
    assert (dst / "precious.txt").read_text() == "keep me"  # old content intact after a failure


def test_offline_hub_id_gives_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    with pytest.raises(OSError, match="offline|cannot be reached|could not fetch"):
        pythia_jax.from_pretrained("EleutherAI/pythia-70m", revision="step3000")


def test_orbax_model_directory_round_trip(tmp_path):
    from pythia_jax.checkpoint import CheckpointDirError, save_model
    hf = tiny_hf_model(seed=12, init_scale=0.1)
    model = pythia_jax.from_pretrained(_export(tmp_path, hf))
    d = save_model(model, tmp_path / "jax")
    assert model.config.scan_layers  # the default
    again = pythia_jax.from_pretrained(d, attention_impl="xla", scan_layers=False)
    assert not again.config.scan_layers
    ids = np.arange(16).reshape(1, 16)
    # scanned vs unrolled layers: same parameters, fp32 rounding differs only in fusion order
    np.testing.assert_allclose(np.asarray(again(ids)), np.asarray(model(ids)), atol=1e-5)
    exact = pythia_jax.from_pretrained(d)
    assert np.array_equal(np.asarray(exact(ids)), np.asarray(model(ids)))
    (tmp_path / "jax" / "pythia_jax_config.json").write_text("{ bad")
    with pytest.raises(CheckpointDirError, match="pythia_jax_config.json: malformed JSON"):
        pythia_jax.from_pretrained(d)


def test_compute_dtype_reaches_every_source_kind(tmp_path):
    from pythia_jax.checkpoint import save_model
    hf_dir = _export(tmp_path, tiny_hf_model(seed=13))
    jax_dir = save_model(pythia_jax.from_pretrained(hf_dir), tmp_path / "jax")
    for src in (hf_dir, jax_dir):
        m = pythia_jax.from_pretrained(src, compute_dtype="bfloat16")
        assert (m.config.param_dtype, m.config.dtype) == ("float32", "bfloat16")
        assert np.asarray(m(np.zeros((1, 4), np.int32))).dtype == np.float32

