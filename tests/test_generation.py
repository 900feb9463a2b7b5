"""pythia_jax.generation against transformers' greedy generate, cache vs full recompute, sampling."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import pythia_jax  # noqa: E402
from pythia_jax import generation as gen  # noqa: E402

PROMPTS = [[5, 6, 7, 8], [9, 10, 11, 12, 13, 14, 15, 16, 17], [3]]
NEW = 12
# eos_token_id=None is the model's EOS (0 here, as Pythia's); [] turns EOS off, as these
# comparisons with transformers' generate(eos_token_id=None) and fixed lengths need
NO_EOS = []


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random GPT-NeoX (fp32) saved by transformers and loaded by pythia_jax."""
    torch.manual_seed(0)
    cfg = transformers.GPTNeoXConfig(
        vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=256, rotary_pct=0.25, max_position_embeddings=64,
        initializer_range=0.2, bos_token_id=0, eos_token_id=0)
    hf = transformers.GPTNeoXForCausalLM(cfg).eval()
    d = tmp_path_factory.mktemp("tiny_neox")
    hf.save_pretrained(d)
    return hf, pythia_jax.from_pretrained(d)


def _hf_greedy(hf, prompts, new, eos=None):
    P = max(map(len, prompts))
    ids = torch.tensor([[1] * (P - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                          pad_token_id=1, eos_token_id=eos, output_logits=True,
                          return_dict_in_generate=True)
    toks = out.sequences[:, P:].numpy()
    logits = torch.stack(out.logits, 1).numpy()  # [B, steps, V]
    rows = []
    for i, r in enumerate(toks):
        r = r.tolist()
        if eos is not None and eos in r:
            r = r[: r.index(eos) + 1]
        rows.append(r)
    return rows, logits


def test_greedy_matches_transformers_single_prompts(tiny):
    hf, model = tiny
    for p in PROMPTS[:2]:
        ref, ref_logits = _hf_greedy(hf, [p], NEW)
        out = gen.generate_arrays(model, [p], NEW, output_scores=True, eos_token_id=NO_EOS)
        assert out.to_lists() == ref
        np.testing.assert_allclose(out.scores[0], ref_logits[0], atol=1e-4, rtol=1e-4)
        # the top-1 choice is not a near-tie at any step (the token comparison is meaningful)
        top2 = np.sort(ref_logits[0], axis=-1)[:, -2:]
        assert (top2[:, 1] - top2[:, 0]).min() > 1e-3


def test_greedy_matches_transformers_batch_of_different_lengths(tiny):
    hf, model = tiny
    ref, ref_logits = _hf_greedy(hf, PROMPTS, NEW)
    out = gen.generate_arrays(model, PROMPTS, NEW, output_scores=True, eos_token_id=NO_EOS)
    assert out.to_lists() == ref
    np.testing.assert_allclose(out.scores, ref_logits, atol=1e-4, rtol=1e-4)
    # and each row equals the same prompt generated alone
    for i, p in enumerate(PROMPTS):
        assert gen.generate(model, [p], NEW, eos_token_id=NO_EOS)[0] == ref[i]


@pytest.mark.parametrize("feature_major", [True, False])
def test_cache_logits_equal_full_recompute_every_step(tiny, monkeypatch, feature_major):
    """Both decode-loop layouts (feature-major: the CPU default; row-major: other backends)."""
    _, model = tiny
    monkeypatch.setattr(gen, "FEATURE_MAJOR_DECODE", feature_major)
    out = gen.generate_arrays(model, PROMPTS, NEW, output_scores=True, eos_token_id=NO_EOS)
    seqs = [p + out.to_lists()[i] for i, p in enumerate(PROMPTS)]
    T = max(map(len, seqs))
    # one full causal forward without a cache; right padding cannot affect earlier positions
    full = np.asarray(jax.jit(lambda x: model(x))(
        jnp.asarray([s + [1] * (T - len(s)) for s in seqs])))
    for i, p in enumerate(PROMPTS):
        want = full[i, len(p) - 1: len(p) - 1 + NEW]
        np.testing.assert_allclose(out.scores[i], want, atol=1e-5, rtol=1e-5)


def test_eos_stops_each_sequence(tiny):
    hf, model = tiny
    free = gen.generate(model, PROMPTS, NEW, eos_token_id=NO_EOS)
    eos = free[0][3]  # a token the first sequence emits at step 4
    out = gen.generate(model, PROMPTS, NEW, eos_token_id=eos)
    for row, f in zip(out, free):
        want = f[: f.index(eos) + 1] if eos in f else f
        assert row == want
    assert len(out[0]) <= 4 and out[0][-1] == eos
    ref, _ = _hf_greedy(hf, PROMPTS, NEW, eos=eos)
    assert out == ref
    # a list of EOS ids works too, and [] (no EOS) never stops early
    assert gen.generate(model, PROMPTS, NEW, eos_token_id=[eos, 95]) == \
        gen.generate(model, PROMPTS, NEW, eos_token_id=(eos, 95))
    assert [len(r) for r in free] == [NEW] * 3


def test_array_input_with_attention_mask(tiny):
    _, model = tiny
    ref = gen.generate(model, PROMPTS, NEW)
    P = max(map(len, PROMPTS))
    # right padding with an explicit mask; pad ids are arbitrary
    ids = np.full((3, P), 7, np.int32)
    mask = np.zeros((3, P), np.int32)
    for i, p in enumerate(PROMPTS):
        ids[i, : len(p)] = p
        mask[i, : len(p)] = 1
    assert gen.generate(model, ids, NEW, attention_mask=mask) == ref
    # a single 1-D prompt
    assert gen.generate(model, np.asarray(PROMPTS[1]), NEW) == [ref[1]]
    assert pythia_jax.generate(model, PROMPTS[1], NEW) == [ref[1]]


def test_one_compiled_decode_loop_no_recompile_per_token(tiny):
    _, model = tiny
    gen.generate(model, PROMPTS, NEW)
    n_prefill, n_decode = gen._prefill._cache_size(), gen._decode._cache_size()
    # other lengths inside the same buckets reuse the compiled prefill and decode loop
    gen.generate(model, [[4, 5], [6], [7, 8, 9, 10, 11]], 9)
    gen.generate(model, PROMPTS, NEW + 3)
    assert gen._prefill._cache_size() == n_prefill
    assert gen._decode._cache_size() == n_decode
    assert gen.bucket_length(5) == 16 and gen.bucket_length(17) == 32
    assert gen.bucket_length(129) == 160 and gen.bucket_length(2048) == 2048


def test_streaming_and_callback(tiny):
    _, model = tiny
    ref = gen.generate(model, PROMPTS, NEW, eos_token_id=NO_EOS)
    steps = list(gen.stream_generate(model, PROMPTS, NEW, eos_token_id=NO_EOS))
    assert len(steps) == NEW
    assert np.stack([t for t, _ in steps], 1).tolist() == ref
    seen = []
    out = gen.generate(model, PROMPTS, NEW, eos_token_id=NO_EOS, callback=lambda t, d: seen.append(t.copy()))
    assert out == ref and len(seen) == NEW

    # a callback can stop single rows (as the lm-eval adapter does for stop strings)
    def stop_row1_after_3(toks, done):
        seen2.append(toks)
        return np.array([False, len(seen2) >= 3, False])
    seen2 = []
    out = gen.generate(model, PROMPTS, NEW, eos_token_id=NO_EOS, callback=stop_row1_after_3)
    assert out[1] == ref[1][:3] and out[0] == ref[0] and out[2] == ref[2]
    # closing the stream early is fine
    it = gen.stream_generate(model, PROMPTS, NEW)
    next(it)
    it.close()

    def boom(toks, done):
        raise RuntimeError("callback failed")
    with pytest.raises(RuntimeError, match="callback failed"):
        gen.generate(model, PROMPTS, NEW, callback=boom)


def test_sampling_is_reproducible_and_stays_in_the_top_k_set(tiny):
    _, model = tiny
    a = gen.generate(model, PROMPTS, NEW, temperature=1.0, seed=3)
    b = gen.generate(model, PROMPTS, NEW, temperature=1.0, seed=3)
    c = gen.generate(model, PROMPTS, NEW, temperature=1.0, seed=4)
    assert a == b
    assert a != c
    kw = dict(temperature=2.0, top_k=3, top_p=0.95, output_scores=True)
    out = gen.generate_arrays(model, PROMPTS, NEW, seed=3, **kw)
    again = gen.generate_arrays(model, PROMPTS, NEW, seed=3, **kw)
    assert out.to_lists() == again.to_lists()
    for i in range(3):
        for t, tok in enumerate(out.to_lists()[i]):
            assert tok in np.argsort(out.scores[i, t])[-3:]


def test_filter_top_k_and_top_p_directly():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(8, 200)).astype(np.float32) * 3
    for k in (1, 5, 50):
        f = np.asarray(gen.filter_logits(logits, top_k=k))
        for row, frow in zip(logits, f):
            assert set(np.nonzero(np.isfinite(frow))[0]) == set(np.argsort(row)[-k:])
            np.testing.assert_array_equal(frow[np.isfinite(frow)], row[np.isfinite(frow)])
    for p in (0.05, 0.5, 0.9, 0.999):
        f = np.asarray(gen.filter_logits(logits, top_p=p))
        for row, frow in zip(logits, f):
            order = np.argsort(-row)
            probs = np.exp(row[order] - row.max())
            probs /= probs.sum()
            n = int(np.searchsorted(np.cumsum(probs), p) + 1)  # smallest prefix with mass >= p
            assert set(np.nonzero(np.isfinite(frow))[0]) == set(order[:n])
    # top_p = 1 keeps everything; with both, top-p renormalizes over the top-k survivors (HF order)
    assert np.isfinite(np.asarray(gen.filter_logits(logits, top_p=1.0))).all()
    both = np.isfinite(np.asarray(gen.filter_logits(logits, top_k=10, top_p=0.5)))
    only_k = np.asarray(gen.filter_logits(logits, top_k=10))
    np.testing.assert_array_equal(both, np.isfinite(np.asarray(gen.filter_logits(only_k, top_p=0.5))))
    assert (both <= np.isfinite(only_k)).all() and (both.sum(-1) >= 1).all()


def test_sampling_never_leaves_the_allowed_set():
    rng = np.random.default_rng(1)
    logits = jnp.asarray(np.tile(rng.normal(size=(1, 64)).astype(np.float32), (512, 1)))
    allowed_k = set(np.argsort(np.asarray(logits[0]))[-4:])
    toks = gen.sample_logits(logits, jax.random.key(0), temperature=1.5, top_k=4, greedy=False)
    assert set(np.asarray(toks).tolist()) <= allowed_k
    assert len(set(np.asarray(toks).tolist())) > 1  # it does sample
    f = np.isfinite(np.asarray(gen.filter_logits(logits[:1] / 1.5, top_p=0.6)))[0]
    toks = gen.sample_logits(logits, jax.random.key(1), temperature=1.5, top_p=0.6, greedy=False)
    assert set(np.asarray(toks).tolist()) <= set(np.nonzero(f)[0])


def test_bad_inputs_give_clear_errors(tiny):
    _, model = tiny
    with pytest.raises(ValueError, match=r"input_ids\[1\]: empty prompt"):
        gen.generate(model, [[1, 2], []], 4)
    with pytest.raises(ValueError, match="empty batch"):
        gen.generate(model, [], 4)
    with pytest.raises(ValueError, match="prompt too long: 60 prompt tokens"):
        gen.generate(model, [[2] * 60], 10)  # the tiny model's context is 64
    with pytest.raises(ValueError, match="outside the vocabulary"):
        gen.generate(model, [[2, 96]], 4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        gen.generate(model, [[2]], 0)
    with pytest.raises(ValueError, match="temperature"):
        gen.generate(model, [[2]], 4, temperature=-1)
    with pytest.raises(ValueError, match="top_k"):
        gen.generate(model, [[2]], 4, temperature=1.0, top_k=0)
    with pytest.raises(ValueError, match="top_p"):
        gen.generate(model, [[2]], 4, temperature=1.0, top_p=1.5)
    with pytest.raises(ValueError, match="attention_mask: expected shape"):
        gen.generate(model, np.ones((2, 3), np.int32), 4, attention_mask=np.ones((2, 4)))
    with pytest.raises(TypeError, match="encode it first"):
        gen.generate(model, ["hello"], 4)
