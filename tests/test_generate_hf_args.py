"""generate's HF arguments against transformers' generate on a tiny random GPT-NeoX: do_sample,
max_length, min_new_tokens, repetition_penalty, the model's EOS as the default, a streamer;
conflicting arguments are refused."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import pythia_jax  # noqa: E402
from pythia_jax import generation as gen  # noqa: E402
from hf_utils import tiny_hf_model  # noqa: E402

PROMPT = [5, 6, 7, 8, 9]
PAIR = [[5, 6, 7, 8, 9], [20, 21, 22, 23, 24]]  # equal lengths: no padding for HF to penalize
NEW = 10


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    hf = tiny_hf_model(seed=3, init_scale=0.15, vocab_size=96, max_position_embeddings=64)
    d = tmp_path_factory.mktemp("tiny_hf_args")
    hf.save_pretrained(d)
    return hf, pythia_jax.from_pretrained(d), d


def _hf(hf, prompts, **kw):
    ids = torch.tensor(prompts)
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), pad_token_id=1, **kw)
    return out[:, ids.shape[1]:].tolist()


def _cut(rows, eos):
    return [r[: r.index(eos) + 1] if eos in r else r for r in rows]


def test_greedy_with_repetition_penalty_matches_transformers(tiny):
    hf, model, _ = tiny
    for penalty in (1.8, 0.7):
        ref = _hf(hf, PAIR, max_new_tokens=NEW, do_sample=False, repetition_penalty=penalty,
                  eos_token_id=None)
        out = gen.generate(model, PAIR, NEW, repetition_penalty=penalty, eos_token_id=[])
        assert out == ref
        # the penalty changes the result (the comparison is not that of plain greedy)
        assert out != gen.generate(model, PAIR, NEW, eos_token_id=[])
    # prompt tokens count: with a strong penalty no prompt token is repeated
    out = gen.generate(model, [PROMPT], NEW, repetition_penalty=1e4, eos_token_id=[])[0]
    assert not set(out) & set(PROMPT) and len(set(out)) == len(out)


def test_min_new_tokens_masks_a_forced_eos(tiny):
    hf, model, _ = tiny
    free = gen.generate(model, [PROMPT], NEW, eos_token_id=[])[0]
    eos = free[1]  # emitted at the second step
    assert gen.generate(model, [PROMPT], NEW, eos_token_id=eos)[0] == free[:2]
    out = gen.generate(model, [PROMPT], NEW, eos_token_id=eos, min_new_tokens=6)[0]
    ref = _cut(_hf(hf, [PROMPT], max_new_tokens=NEW, do_sample=False, eos_token_id=eos,
                   min_new_tokens=6), eos)[0]
    assert out == ref
    assert len(out) >= 6 and eos not in out[:6]


def test_max_length_counts_the_prompt(tiny):
    hf, model, _ = tiny
    out = gen.generate(model, [PROMPT], max_length=len(PROMPT) + 7, eos_token_id=[])
    assert out == _hf(hf, [PROMPT], max_length=len(PROMPT) + 7, do_sample=False,
                      eos_token_id=None)
    assert len(out[0]) == 7
    # an array's width (padding included) is the prompt length, as in HF
    ids = np.array([[1, 1] + PROMPT[:3], PROMPT])
    mask = np.array([[0, 0, 1, 1, 1], [1] * 5])
    out = gen.generate(model, ids, attention_mask=mask, max_length=9, eos_token_id=[])
    assert [len(r) for r in out] == [4, 4]


def test_do_sample_false_is_greedy_whatever_the_temperature(tiny):
    _, model, _ = tiny
    greedy = gen.generate(model, PAIR, NEW)
    assert gen.generate(model, PAIR, NEW, do_sample=False, temperature=1.7, seed=5) == greedy
    assert gen.generate(model, PAIR, NEW, do_sample=False, top_k=3, seed=9) == greedy


def test_do_sample_true_with_a_seed_is_reproducible(tiny):
    _, model, _ = tiny
    a = gen.generate(model, PAIR, NEW, do_sample=True, seed=11, eos_token_id=[])
    assert a == gen.generate(model, PAIR, NEW, do_sample=True, seed=11, eos_token_id=[])
    # temperature defaults to 1.0 with do_sample=True (HF), the legacy temperature= path agrees
    assert a == gen.generate(model, PAIR, NEW, temperature=1.0, seed=11, eos_token_id=[])
    assert a != gen.generate(model, PAIR, NEW, do_sample=True, seed=12, eos_token_id=[])
    assert a != gen.generate(model, PAIR, NEW, do_sample=False, eos_token_id=[])


def test_eos_defaults_to_the_models(tiny, tmp_path):
    hf, model, _ = tiny
    free = gen.generate(model, [PROMPT], NEW, eos_token_id=[])[0]
    eos = free[2]
    hf.config.eos_token_id = eos
    hf.generation_config.eos_token_id = eos
    try:
        hf.save_pretrained(tmp_path / "eos")
        ref = _cut(_hf(hf, [PROMPT], max_new_tokens=NEW, do_sample=False), eos)[0]
    finally:
        hf.config.eos_token_id = hf.generation_config.eos_token_id = 0
    m2 = pythia_jax.from_pretrained(tmp_path / "eos")
    assert m2.config.eos_token_id == eos
    out = gen.generate(m2, [PROMPT], NEW)[0]
    assert out == ref == free[:3]
    assert gen.generate(m2, [PROMPT], NEW, eos_token_id=[])[0] == free  # [] = no EOS


class _Recorder:
    def __init__(self):
        self.calls = []

    def put(self, value):
        self.calls.append(("put", np.asarray(value).tolist()))

    def end(self):
        self.calls.append(("end",))


def test_streamer_gets_prompt_then_tokens_then_end(tiny):
    _, model, _ = tiny
    rec = _Recorder()
    out = gen.generate(model, [PROMPT], NEW, streamer=rec, eos_token_id=[])[0]
    assert rec.calls[0] == ("put", [PROMPT])
    assert rec.calls[-1] == ("end",)
    assert [c[1] for c in rec.calls[1:-1]] == [[t] for t in out]
    # transformers' own TextStreamer, given our tokenizer, prints the generated text
    tok = pythia_jax.load_tokenizer()
    texts = []

    class Capture(transformers.TextStreamer):
        def on_finalized_text(self, text, stream_end=False):
            texts.append(text)

    gen.generate(model, [PROMPT], NEW, streamer=Capture(tok, skip_prompt=True), eos_token_id=[])
    assert "".join(texts).rstrip("\n") == tok.decode(out)
    # end() is called even when generation fails (here: in the callback)
    rec = _Recorder()

    def boom(t, d):
        raise RuntimeError("stop")
    with pytest.raises(RuntimeError, match="stop"):
        gen.generate(model, [PROMPT], NEW, streamer=rec, callback=boom)
    assert rec.calls[-1] == ("end",)


def test_conflicting_and_bad_arguments(tiny):
    _, model, _ = tiny
    cases = [
        (dict(max_new_tokens=4, max_length=12), "both given"),
        (dict(), "expected max_new_tokens .* or max_length"),
        (dict(max_length=5), "max_length=5 leaves no room"),
        (dict(max_new_tokens=4, do_sample=True, temperature=0.0), "conflicts with do_sample"),
        (dict(max_new_tokens=4, do_sample="yes"), "do_sample: expected"),
        (dict(max_new_tokens=4, min_new_tokens=5), "min_new_tokens=5 exceeds max_new_tokens=4"),
        (dict(max_new_tokens=4, min_new_tokens=-1), "min_new_tokens"),
        (dict(max_new_tokens=4, repetition_penalty=0.0), "repetition_penalty: expected"),
        (dict(max_new_tokens=4, eos_token_id="eos"), "eos_token_id: expected"),
    ]
    for kw, msg in cases:
        with pytest.raises(ValueError, match=msg):
            gen.generate(model, [PROMPT], **kw)
    with pytest.raises(ValueError, match="streamer: supports one prompt"):
        gen.generate(model, PAIR, 4, streamer=_Recorder())
    with pytest.raises(TypeError, match=r"put\(ids\) and end\(\)"):
        gen.generate(model, [PROMPT], 4, streamer=object())
