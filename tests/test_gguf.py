"""GGUF export / import (pythia_jax.gguf, scripts/export_gguf.py), checked against llama.cpp itself.

llama.cpp (through llama-cpp-python, a test dependency from the `gguf` extra) must be importable:
these tests fail, not skip, without it.

Numerics: llama.cpp's gptneox graph always uses the tanh approximation of GELU (evaluated on CPU
through an fp16 lookup table), so every llama.cpp-vs-ours logit comparison runs OUR model in its
tanh-GELU setting (`gelu_approximate=True`). Tolerances are relative to the logit scale (the
standard deviation of our logits), with the KV cache in F32 (`type_k=type_v=0`).
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

try:
    import llama_cpp
except ImportError as e:  # a hard failure, never a skip: llama.cpp is how exports are verified
    raise ImportError("tests/test_gguf.py needs llama-cpp-python (pip install "
                      f"'pythia-jax[gguf]'); it could not be imported: {e}") from None
import gguf

_default_model_params = llama_cpp.llama_cpp.llama_model_default_params


def _plain_buffers():
    """llama.cpp's model parameters with `use_extra_bufts` off: its repacked (AMX) CPU buffers
    for quantized weights segfault in `decode` on AMX-capable VMs (checked on a Xeon with
    amx_tile: the same Q8_0 file runs with them off and crashes the process with them on). The
    kernels that compute the logits are still llama.cpp's own."""
    p = _default_model_params()
    p.use_extra_bufts = False
    return p


# `llama_cpp.Llama()` takes its defaults from the low-level module: every Llama of this file
llama_cpp.llama_cpp.llama_model_default_params = _plain_buffers
import jax
import jax.numpy as jnp
from flax import nnx

import pythia_jax
from pythia_jax import gguf as G
from pythia_jax import weights
from pythia_jax.tokenizer import load_tokenizer

REPO = pathlib.Path(__file__).resolve().parents[1]
PROMPT = ("The Pythia suite of language models was trained on the Pile, in the same order for "
          "every size. def f(x):\n    return x * 2  # twice\n")


# ------------------------------------------------------------------------------------------------
# helpers
def randomize(model, seed: int, out_std: float = 0.15):
    """Every parameter random (biases and LayerNorms too, so their layout is exercised).

    `out_std` sets the logit scale (std of the logits): 0.15 gives ~1.7 on the tiny model. Q8_0's
    KL grows with the square of that scale (measured: 4.4e-4 at 1.7, 1.2e-3 at 2.9); half of it
    is the weight rounding, half llama.cpp's Q8_0 rounding of the activations."""
    rng = np.random.default_rng(seed)
    for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        x = v.get_value()
        names = [str(p) for p in path]
        if names[-1] == "scale":
            val = 1.0 + 0.1 * rng.standard_normal(x.shape)
        elif names[-1] == "bias":
            val = 0.1 * rng.standard_normal(x.shape)
        elif names[0] == "embed_out":
            val = out_std * rng.standard_normal(x.shape)
        else:
            val = 0.08 * rng.standard_normal(x.shape)
        v.set_value(jnp.asarray(val, x.dtype))
    return model


def tiny_model(seed=0, **kw):
    """d=128, 4 heads (head_dim 32, rotary 8), 2 layers, the real padded vocab 50304, tanh GELU."""
    cfg = pythia_jax.get_preset("14m", num_layers=2, gelu_approximate=True, **kw)
    return randomize(pythia_jax.GPTNeoX(cfg, rngs=nnx.Rngs(seed)), seed + 100)


def flat_params(model) -> dict[str, np.ndarray]:
    return {".".join(str(p) for p in path): np.asarray(v.get_value())
            for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def our_logits(model, ids) -> np.ndarray:
    return np.asarray(model(jnp.asarray([ids]))[0], dtype=np.float64)


def our_greedy(model, prompt, n) -> list[int]:
    """Greedy continuation with one fixed-length (causal) forward per step: one compilation."""
    fwd = nnx.jit(lambda m, ids: m(ids))
    buf = np.zeros((1, len(prompt) + n), np.int32)
    buf[0, :len(prompt)] = prompt
    out = []
    for i in range(n):
        pos = len(prompt) + i
        nxt = int(np.argmax(np.asarray(fwd(model, jnp.asarray(buf)))[0, pos - 1]))
        buf[0, pos] = nxt
        out.append(nxt)
    return out


def open_llama(path, **kw):
    return llama_cpp.Llama(model_path=str(path), n_ctx=128, n_batch=128, n_ubatch=128,
                           logits_all=True, type_k=0, type_v=0, n_threads=2, n_threads_batch=2,
                           seed=0, verbose=False, **kw)


def llama_logits(llm, ids) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)], dtype=np.float64)


def llama_greedy(llm, prompt, n) -> list[int]:
    llm.reset()
    out = []
    for tok in llm.generate(prompt, temp=0.0, repeat_penalty=1.0, reset=True):
        out.append(int(tok))
        if len(out) == n:
            break
    return out


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def compare(ref, got) -> dict:
    """max |Δ| / scale, mean and max KL(ref || got) per position, top-1 agreement."""
    scale = float(np.std(ref))
    lp, lq = log_softmax(ref), log_softmax(got)
    kl = (np.exp(lp) * (lp - lq)).sum(-1)
    return {"scale": scale, "max_abs": float(np.abs(ref - got).max()),
            "rel": float(np.abs(ref - got).max() / scale), "mean_kl": float(kl.mean()),
            "max_kl": float(kl.max()), "top1": float((ref.argmax(-1) == got.argmax(-1)).mean())}


def report(label, m):
    print(f"\n[gguf] {label}: scale={m['scale']:.3f} max|d|={m['max_abs']:.3g} "
          f"rel={m['rel']:.3g} meanKL={m['mean_kl']:.3g} maxKL={m['max_kl']:.3g} "
          f"top1={m['top1']:.3f}")


def tensor_types(path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in G._open_reader(str(path)).tensors}


def write_minimal_gguf(path, arch="gptneox", d=32, L=1, nh=2, ff=64, V=64, dtypes=None,
                       drop=(), gelu_key=None):
    """A small GGUF written with the gguf package's writer (for reader edge cases)."""
    dtypes = dtypes or {}
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(128)
    w.add_embedding_length(d)
    w.add_block_count(L)
    w.add_feed_forward_length(ff)
    w.add_head_count(nh)
    w.add_rope_dimension_count((d // nh) // 4)
    w.add_parallel_residual(True)
    w.add_layer_norm_eps(1e-5)
    if gelu_key is not None:
        w.add_bool(G.GELU_KEY, gelu_key)
    cfg = pythia_jax.ModelConfig(hidden_size=d, num_layers=L, num_heads=nh, intermediate_size=ff,
                                 vocab_size=V)
    rng = np.random.default_rng(0)
    for n, shape in weights.hf_shapes(cfg).items():
        name = G.gguf_tensor_name(n)
        if name in drop:
            continue
        a = rng.standard_normal(shape).astype(dtypes.get(name, np.float32))
        w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# ------------------------------------------------------------------------------------------------
# fixtures
@pytest.fixture(scope="module")
def tiny():
    return tiny_model()


@pytest.fixture(scope="module")
def prompt_ids():
    ids = load_tokenizer().encode(PROMPT).ids
    assert 30 < len(ids) < 100
    return ids


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory):
    """type -> path of `tiny` exported in that type (exported once per module)."""
    d = tmp_path_factory.mktemp("gguf")
    cache = {}

    def get(t):
        if t not in cache:
            cache[t] = G.export_gguf(tiny, d / f"tiny-{t}.gguf", t)
        return cache[t]
    return get


# ------------------------------------------------------------------------------------------------
# file contents
def test_metadata_names_and_layout(tiny, exported):
    path = exported("f32")
    cfg = tiny.config
    r = gguf.GGUFReader(path)
    f = {k: v.contents() for k, v in r.fields.items() if not k.startswith("GGUF.")}
    assert f["general.architecture"] == "gptneox"
    expect = {
        "gptneox.context_length": 2048, "gptneox.embedding_length": 128,
        "gptneox.block_count": 2, "gptneox.feed_forward_length": 512,
        "gptneox.attention.head_count": 4, "gptneox.rope.dimension_count": 8,
        "gptneox.rope.freq_base": 10000.0, "gptneox.use_parallel_residual": True,
        "general.file_type": 0, "general.quantization_version": 2,
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "olmo",
        "tokenizer.ggml.bos_token_id": 0, "tokenizer.ggml.eos_token_id": 0,
        "tokenizer.ggml.unknown_token_id": 0, "tokenizer.ggml.add_bos_token": False,
        "tokenizer.ggml.add_eos_token": False, G.GELU_KEY: True,
    }
    for k, v in expect.items():
        assert f[k] == v, k
    assert f["gptneox.attention.layer_norm_epsilon"] == pytest.approx(1e-5, rel=1e-6)
    tokens, types = f["tokenizer.ggml.tokens"], f["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == 50304
    counts = {t: types.count(int(t)) for t in gguf.TokenType}
    assert counts[gguf.TokenType.NORMAL] == 50252
    assert counts[gguf.TokenType.CONTROL] == 2 and types[0] == types[1] == 3
    assert counts[gguf.TokenType.USER_DEFINED] == 23
    assert counts[gguf.TokenType.UNUSED] == 27 and tokens[50303] == "[PAD50303]"
    assert tokens[0] == "<|endoftext|>" and tokens[50276] == "  "
    assert len(f["tokenizer.ggml.merges"]) == 50009 and f["tokenizer.ggml.merges"][0] == "Ġ Ġ"

    # tensor names: exactly llama.cpp's gptneox set (as listed by the gguf package)
    allowed = set()
    for t in gguf.MODEL_TENSORS[gguf.MODEL_ARCH.GPTNEOX]:
        base = gguf.TENSOR_NAMES[t]
        for i in range(cfg.num_layers):
            allowed |= {base.format(bid=i) + ".weight", base.format(bid=i) + ".bias"}
    names = {t.name for t in r.tensors}
    assert names <= allowed and len(names) == 4 + 12 * cfg.num_layers
    for t in r.tensors:
        assert t.tensor_type == gguf.GGMLQuantizationType.F32

    # orientation: [out, in] in numpy order; QKV rows reordered to [3, heads, head_dim]
    p = flat_params(tiny)
    data = {t.name: np.asarray(t.data) for t in r.tensors}
    N, H, d = cfg.num_heads, cfg.head_dim, cfg.hidden_size
    qkv = p["layers.attention.query_key_value.kernel"][1]  # [d, 3, N, H]
    np.testing.assert_array_equal(data["blk.1.attn_qkv.weight"],
                                  qkv.transpose(1, 2, 3, 0).reshape(3 * d, d))
    np.testing.assert_array_equal(data["blk.1.attn_qkv.bias"],
                                  p["layers.attention.query_key_value.bias"][1].reshape(-1))
    np.testing.assert_array_equal(data["blk.0.ffn_up.weight"], p["layers.mlp.dense_h_to_4h.kernel"][0].T)
    np.testing.assert_array_equal(data["blk.0.attn_output.weight"],
                                  p["layers.attention.dense.kernel"][0].reshape(N * H, d).T)
    np.testing.assert_array_equal(data["token_embd.weight"], p["embed_in.embedding"])
    np.testing.assert_array_equal(data["output.weight"], p["embed_out.embedding"])
    assert r.tensors[0].shape.tolist() == [128, 50304]  # ggml order {d, V}


def test_quantized_types_per_tensor(exported):
    for t, main in (("f16", "F16"), ("bf16", "BF16"), ("q8_0", "Q8_0"), ("q4_0", "Q4_0")):
        types = tensor_types(exported(t))
        for name, qt in types.items():
            if name.endswith(".bias") or "norm" in name:
                assert qt == "F32", (t, name)
            elif t == "q4_0" and name == "output.weight":
                assert qt == "Q8_0"  # documented: numpy cannot write llama.cpp's Q6_K output
            else:
                assert qt == main, (t, name)
        ftype = G._open_reader(str(exported(t))).fields["general.file_type"]
        assert ftype == int(gguf.LlamaFileType["MOSTLY_" + t.upper()])


def test_q8_0_bytes_equal_llama_cpp_quantizer(exported, tmp_path):
    """Our numpy Q8_0 is bit-identical to llama.cpp's own quantizer run on our F32 file."""
    ours = G._open_reader(str(exported("q8_0")))
    dst = tmp_path / "llama-q8_0.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(gguf.LlamaFileType.MOSTLY_Q8_0)
    params.nthread = 2
    assert llama_cpp.llama_model_quantize(str(exported("f32")).encode(), str(dst).encode(),
                                          params) == 0
    theirs = G._open_reader(str(dst))
    tb = {t.name: t for t in theirs.tensors}
    for t in ours.tensors:
        u = tb[t.name]
        assert t.tensor_type == u.tensor_type, t.name
        np.testing.assert_array_equal(ours.raw(t), theirs.raw(u), err_msg=t.name)


# ------------------------------------------------------------------------------------------------
# round trips through our reader
def test_f32_round_trip_exact(tiny, exported):
    back = pythia_jax.from_pretrained(exported("f32"))
    assert back.config == tiny.config
    a, b = flat_params(tiny), flat_params(back)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k


@pytest.mark.parametrize("t,np_dtype", [("f16", np.float16), ("bf16", jnp.bfloat16)])
def test_half_round_trip(tiny, exported, t, np_dtype):
    back = G.load_gguf(exported(t))
    a, b = flat_params(tiny), flat_params(back)
    for k in a:
        stays_f32 = "norm" in k or k.endswith("bias")  # 1-D in the file
        want = a[k] if stays_f32 else a[k].astype(np_dtype).astype(np.float32)
        np.testing.assert_array_equal(b[k], want, err_msg=k)


def test_load_dtype_auto_and_compute_dtype(tiny, exported):
    m = G.load_gguf(exported("f16"), "auto", compute_dtype="bfloat16")
    assert m.config.param_dtype == "float16" and m.config.dtype == "bfloat16"
    want = tiny.layers.mlp.dense_h_to_4h.kernel.get_value().astype(jnp.float16)
    assert np.array_equal(np.asarray(m.layers.mlp.dense_h_to_4h.kernel.get_value()), want)
    assert G.load_gguf(exported("q8_0"), "auto").config.param_dtype == "float32"
    with pytest.raises(G.GGUFError, match="dtype: expected"):
        G.load_gguf(exported("f16"), "int8")


def test_load_onto_mesh_matches_plain_load(exported):
    """With a mesh every parameter is assembled from per-device slices of the file's tensors."""
    from pythia_jax.sharding import make_mesh
    plain = flat_params(G.load_gguf(exported("q8_0")))
    meshed = pythia_jax.from_pretrained(exported("q8_0"), mesh=make_mesh())
    for k, v in flat_params(meshed).items():
        np.testing.assert_array_equal(v, plain[k], err_msg=k)
    assert meshed.embed_in.embedding.get_value().sharding.mesh.axis_names == \
        ("data", "fsdp", "tensor")


def _hf_rows(model) -> dict[str, np.ndarray]:
    """HF-orientation weights ([out, in]: quantization blocks run along the last axis)."""
    return {n: np.asarray(th(), np.float32) for n, _, _, th in weights.hf_state_dict(model)}


@pytest.mark.parametrize("t,steps,bound", [("q8_0", 127, 0.6), ("q4_0", 8, 1.05)])
def test_quantized_round_trip_within_step(tiny, exported, t, steps, bound):
    """Each weight comes back within one quantization step of its 32-block (step = max|x|/127
    for Q8_0, max|x|/8 for Q4_0). Q8_0 rounds to nearest: half a step plus the fp16 rounding of
    the scale; Q4_0 clips the value opposite the block's extreme to 7 steps: up to one step."""
    back = G.load_gguf(exported(t))
    a, b = _hf_rows(tiny), _hf_rows(back)
    for k in a:
        x, y = a[k], b[k]
        if x.ndim == 1:
            assert np.array_equal(x, y), k  # biases / norms stay F32
            continue
        # (the QKV reorder permutes whole rows, so blocks along a row are the same either way)
        per_step, fac = (steps, bound) if not (t == "q4_0" and k == "embed_out.weight") \
            else (127, 0.6)  # the output matrix of a q4_0 export is Q8_0
        step = np.abs(x).reshape(x.shape[0], -1, 32).max(-1, keepdims=True) / per_step
        err = np.abs(x - y).reshape(x.shape[0], -1, 32)
        assert np.all(err <= fac * step + 1e-12), (k, float((err / (step + 1e-30)).max()))
        assert np.abs(x - y).max() > 0  # it really was quantized


# ------------------------------------------------------------------------------------------------
# llama.cpp runs the exports
def test_llama_cpp_f32_matches_ours(tiny, exported, prompt_ids):
    """F32: max |Δlogit| ≤ 1e-2 × logit scale, mean KL ≤ 1e-5, identical greedy tokens.
    Ours in tanh-GELU (llama.cpp's activation)."""
    assert tiny.config.gelu_approximate
    ref = our_logits(tiny, prompt_ids)
    llm = open_llama(exported("f32"))
    try:
        assert llm.n_vocab() == 50304
        got = llama_logits(llm, prompt_ids)
        m = compare(ref, got)
        report("f32", m)
        assert m["scale"] > 1.0  # a meaningful logit scale
        assert m["rel"] <= 1e-2 and m["mean_kl"] <= 1e-5
        n = 16
        ours = our_greedy(tiny, prompt_ids[:12], n)
        theirs = llama_greedy(llm, prompt_ids[:12], n)
        print(f"[gguf] greedy ours {ours}\n[gguf] greedy llama {theirs}")
        assert ours == theirs
    finally:
        llm.close()


def test_llama_cpp_sequential_residual_and_full_rotary(tmp_path, prompt_ids):
    """The other GPT-NeoX variants llama.cpp's metadata can express: sequential residual and a
    different rotary fraction (here 1/2 of head_dim = 16 of 32)."""
    model = tiny_model(seed=1, use_parallel_residual=False, rotary_pct=0.5)
    path = G.export_gguf(model, tmp_path / "seq.gguf", "f32")
    cfg = G.read_gguf_config(path)
    assert cfg == model.config and cfg.rotary_dim == 16
    llm = open_llama(path)
    try:
        m = compare(our_logits(model, prompt_ids), llama_logits(llm, prompt_ids))
    finally:
        llm.close()
    report("f32 sequential residual, rotary 1/2", m)
    assert m["rel"] <= 1e-2 and m["mean_kl"] <= 1e-5


def test_llama_cpp_f16_matches_ours(tiny, exported, prompt_ids):
    ref = our_logits(tiny, prompt_ids)
    llm = open_llama(exported("f16"))
    try:
        m = compare(ref, llama_logits(llm, prompt_ids))
    finally:
        llm.close()
    report("f16", m)
    assert m["rel"] <= 2e-2 and m["mean_kl"] <= 1e-4


def test_llama_cpp_q8_0(tiny, exported, prompt_ids):
    ref = our_logits(tiny, prompt_ids)
    llm = open_llama(exported("q8_0"))
    try:
        m = compare(ref, llama_logits(llm, prompt_ids))
    finally:
        llm.close()
    report("q8_0", m)
    assert m["mean_kl"] <= 1e-3 and m["top1"] >= 0.9


# Every directly written type: llama.cpp must run the very weights our reader dequantizes (KL
# between llama.cpp and our model on the dequantized file is llama.cpp's own numerics: activations
# rounded to Q8_0/F16/BF16 for the matmuls, measured 2e-4), and the loss against the original
# weights is bounded loosely (random weights: the ordering matters, not the values).
@pytest.mark.parametrize("t,max_kl", [("f16", 1e-5), ("bf16", 1e-3), ("q8_0", 1e-3),
                                      ("q5_1", 0.05), ("q5_0", 0.05), ("q4_1", 0.1),
                                      ("q4_0", 0.1)])
def test_llama_cpp_runs_each_direct_type(tiny, exported, prompt_ids, t, max_kl):
    ref = our_logits(tiny, prompt_ids)
    llm = open_llama(exported(t))
    try:
        got = llama_logits(llm, prompt_ids)
        assert llm.metadata["general.file_type"] == str(int(gguf.LlamaFileType["MOSTLY_" + t.upper()]))
    finally:
        llm.close()
    assert np.all(np.isfinite(got))
    m = compare(ref, got)
    report(t, m)
    assert m["mean_kl"] <= max_kl
    deq = compare(our_logits(G.load_gguf(exported(t), gelu_approximate=True), prompt_ids), got)
    report(f"{t}: ours on the dequantized file vs llama.cpp", deq)
    assert deq["mean_kl"] <= 1e-3 and deq["rel"] <= 0.15


@pytest.mark.slow
def test_k_quants_via_llama_cpp(tmp_path, prompt_ids):
    """K-quants come from llama.cpp's quantizer (rows of 256: d=256). llama.cpp loads them, KL to
    ours grows as bits drop, and our importer dequantizes them to the weights llama.cpp runs."""
    cfg = pythia_jax.get_preset("14m", num_layers=1, hidden_size=256, num_heads=4,
                                intermediate_size=1024, gelu_approximate=True)
    model = randomize(pythia_jax.GPTNeoX(cfg, rngs=nnx.Rngs(3)), 7, out_std=0.15)
    ref = our_logits(model, prompt_ids)
    kls = {}
    for t in ("q8_0", "q6_k", "q4_k_m"):
        path = G.export_gguf(model, tmp_path / f"k-{t}.gguf", t, threads=2)
        types = set(tensor_types(path).values())
        if t == "q6_k":
            assert "Q6_K" in types
        if t == "q4_k_m":
            assert "Q4_K" in types and "Q6_K" in types
        assert {"F32"} < types and "F16" not in types
        llm = open_llama(path)
        try:
            got = llama_logits(llm, prompt_ids)
            assert llm.metadata["general.file_type"] == str(int(gguf.LlamaFileType["MOSTLY_" + t.upper()]))
        finally:
            llm.close()
        m = compare(ref, got)
        report(f"{t} (d=256)", m)
        kls[t] = m["mean_kl"]
        if t == "q4_k_m":
            back = G.load_gguf(path)
            assert back.config.gelu_approximate
            mb = compare(our_logits(back, prompt_ids), got)
            report("q4_k_m: ours(dequantized file) vs llama.cpp", mb)
            assert mb["mean_kl"] <= 1e-3 < m["mean_kl"]  # same weights, up to llama.cpp numerics
    assert kls["q8_0"] < kls["q6_k"] < kls["q4_k_m"] < 0.2
    assert sorted(os.listdir(tmp_path)) == ["k-q4_k_m.gguf", "k-q6_k.gguf", "k-q8_0.gguf"]


def test_llama_cpp_tokenizer_matches_ours(exported):
    tok = load_tokenizer()
    llm = llama_cpp.Llama(model_path=str(exported("f32")), vocab_only=True, verbose=False)
    texts = [
        "Hello, I am",
        " Hello world\n\n    x",
        "The quick brown fox jumps over the lazy dog.",
        "def f(x):\n\treturn x**2  # comment\r\n",
        "It's 3.14159, and I'll've 1,000,000 items; they're 'quoted'!",
        "Ünïcödé café naïve — 日本語のテキスト 😀🚀",
        "a  b   c    d" + " " * 30 + "e\n\n\n",
        "  leading and trailing spaces  ",
        "<div class=\"x\">HTML &amp; entities</div>",
        "import numpy as np\nfor i in range(10):\n        print(i)\n",
        "1234567890 + 987654321 = 1111111111",
        "",
    ]
    try:
        assert llm.n_vocab() == 50304
        for s in texts:
            assert llm.tokenize(s.encode(), add_bos=False, special=False) == tok.encode(s).ids, s
            ids = tok.encode(s).ids
            assert llm.detokenize(ids).decode() == tok.decode(ids), s
        # special tokens are parsed when asked to (HF parses them by default)
        s = "<|endoftext|>Next document"
        assert llm.tokenize(s.encode(), add_bos=False, special=True) == tok.encode(s).ids
        assert llm.token_bos() == 0 and llm.token_eos() == 0
    finally:
        llm.close()


# ------------------------------------------------------------------------------------------------
# import edge cases
def test_gelu_default_and_override(tmp_path):
    p = write_minimal_gguf(tmp_path / "plain.gguf")  # a file without our GELU key
    assert G.read_gguf_config(p).gelu_approximate is False  # exact GELU: HF Pythia's
    assert G.read_gguf_config(p, gelu_approximate=True).gelu_approximate is True
    m = pythia_jax.from_pretrained(p, gelu_approximate=True)
    assert m.config.gelu_approximate and m.config.vocab_size == 64 and m.config.rotary_dim == 4
    p2 = write_minimal_gguf(tmp_path / "tanh.gguf", gelu_key=True)
    assert G.read_gguf_config(p2).gelu_approximate is True
    assert G.read_gguf_config(p2, gelu_approximate=False).gelu_approximate is False


def test_import_errors(tmp_path):
    p = write_minimal_gguf(tmp_path / "llama.gguf", arch="llama")
    with pytest.raises(G.GGUFError, match="architecture is 'llama'; expected 'gptneox'"):
        pythia_jax.from_pretrained(p)
    p = write_minimal_gguf(tmp_path / "f64.gguf", dtypes={"blk.0.ffn_up.weight": np.float64})
    with pytest.raises(G.GGUFError, match=r"'blk.0.ffn_up.weight' has type F64.*supported: F32"):
        G.load_gguf(p)
    p = write_minimal_gguf(tmp_path / "missing.gguf", drop={"output.weight"})
    with pytest.raises(G.GGUFError, match="missing tensor 'output.weight'"):
        G.load_gguf(p)
    bad = tmp_path / "junk.gguf"
    bad.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    with pytest.raises(G.GGUFError, match="not a GGUF file"):
        G.load_gguf(bad)
    good = write_minimal_gguf(tmp_path / "ok.gguf")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(good.read_bytes()[:-1000])
    with pytest.raises(G.GGUFError, match="beyond the end of the file"):
        G.load_gguf(cut)
    with pytest.raises(FileNotFoundError):
        G.load_gguf(tmp_path / "nope.gguf")


# ------------------------------------------------------------------------------------------------
# export errors: clear messages, nothing left behind
def test_export_errors(tiny, tmp_path):
    with pytest.raises(G.GGUFError, match="unknown GGUF type 'q3'.*q4_k_m"):
        G.export_gguf(tiny, tmp_path / "x.gguf", "q3")
    (tmp_path / "exists.gguf").write_bytes(b"old")
    with pytest.raises(FileExistsError, match="already exists; pass overwrite=True"):
        G.export_gguf(tiny, tmp_path / "exists.gguf", "f16")
    assert (tmp_path / "exists.gguf").read_bytes() == b"old"
    small = pythia_jax.GPTNeoX(pythia_jax.ModelConfig(hidden_size=32, num_layers=1, num_heads=2,
                                                      intermediate_size=64, vocab_size=1000),
                               rngs=nnx.Rngs(0))
    with pytest.raises(G.GGUFError, match="tokenizer has 50277 tokens but the model's vocabulary"):
        G.export_gguf(small, tmp_path / "small.gguf", "f32")
    # a failure mid-stream (a NaN in the last layer's MLP) removes the partial file
    bad = tiny_model(seed=5)
    k = bad.layers.mlp.dense_4h_to_h.kernel
    k.set_value(k.get_value().at[1, 0, 0].set(jnp.nan))
    with pytest.raises(G.GGUFError, match=r"blk.1.ffn_down.weight: contains NaN"):
        G.export_gguf(bad, tmp_path / "nan.gguf", "q8_0")
    assert sorted(os.listdir(tmp_path)) == ["exists.gguf"]
    # overwrite replaces
    G.export_gguf(tiny, tmp_path / "exists.gguf", "f16", overwrite=True)
    assert G.read_gguf_config(tmp_path / "exists.gguf").hidden_size == 128
    assert sorted(os.listdir(tmp_path)) == ["exists.gguf"]


# ------------------------------------------------------------------------------------------------
# the script
def _script(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1")
    return subprocess.run([sys.executable, str(REPO / "scripts" / "export_gguf.py"), *args],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=300)


def test_script_hf_dir_to_gguf(tiny, tmp_path, prompt_ids):
    hf_dir = pythia_jax.save_pretrained(tiny, tmp_path / "hf")
    dst = tmp_path / "out.gguf"
    r = _script(f"--src={hf_dir}", f"--dst={dst}", "--type=Q8_0", "--noprogress")
    assert r.returncode == 0, r.stderr
    assert "wrote q8_0 GGUF" in r.stdout
    assert G.read_gguf_config(dst) == tiny.config
    assert oct(os.stat(dst).st_mode & 0o777) != oct(0o600)  # not the temp file's private mode
    r = _script(f"--src={hf_dir}", f"--dst={dst}", "--type=f16", "--noprogress")
    assert r.returncode == 2 and "already exists; pass --overwrite" in r.stderr
    r = _script(f"--src={hf_dir}", f"--dst={dst}", "--type=q3", "--noprogress")
    assert r.returncode != 0 and "--type=q3: value should be one of" in r.stderr
    # a non-NeoX source
    llama_dir = tmp_path / "llama"
    llama_dir.mkdir()
    (llama_dir / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    from pythia_jax.hf import write_safetensors
    write_safetensors(str(llama_dir / "model.safetensors"),
                      {"model.embed_tokens.weight": np.zeros((8, 64), np.float32)})
    r = _script(f"--src={llama_dir}", f"--dst={tmp_path / 'l.gguf'}", "--type=f16", "--noprogress")
    assert r.returncode == 2 and "model_type" in r.stderr and "gpt_neox" in r.stderr, r.stderr
    assert sorted(os.listdir(tmp_path)) == ["hf", "llama", "out.gguf"]  # no temporaries left
    # the written file runs in llama.cpp
    llm = open_llama(dst)
    try:
        got = llama_logits(llm, prompt_ids)
    finally:
        llm.close()
    assert compare(our_logits(tiny, prompt_ids), got)["mean_kl"] <= 1e-3
