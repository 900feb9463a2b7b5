"""pythia_jax.evaluate: LAMBADA as lm-eval scores it, token-stream perplexity, tokenizer exports."""

import json
import math

import numpy as np
import pytest

import jax.numpy as jnp
from flax import nnx

import pythia_jax
from pythia_jax import evaluate as ev
from pythia_jax.config import ModelConfig
from pythia_jax.model import GPTNeoX
from pythia_jax.tokenizer import load_tokenizer


def lambada_path(shared_data):
    return shared_data / "eval_data" / "lambada_test.jsonl"


def build_lambada_model(shared_data, n_examples: int = 50) -> GPTNeoX:
    """A tiny random GPT-NeoX with the real 50304-row vocabulary, plus a planted bigram table.

    Random weights alone get LAMBADA accuracy 0, which would make "same accuracy" vacuous. So
    for every second one of the first `n_examples` examples, `embed_out[b]` gets a push towards
    `embed_in[a]` for each consecutive pair (a, b) of (last context token, target tokens), and
    the input embeddings are scaled up so the residual stream is mostly the current token:
    those targets become the greedy choice (accuracy ~0.25) while everything stays a plain
    GPT-NeoX checkpoint."""
    cfg = ModelConfig(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=256,
                      vocab_size=50304)
    m = GPTNeoX(cfg, rngs=nnx.Rngs(0))
    tok = load_tokenizer()
    reqs = ev.lambada_requests(ev.read_jsonl(lambada_path(shared_data), limit=n_examples))
    pairs = [ev.encode_pair(tok, c, t) for c, t in reqs]
    e_in = np.asarray(m.embed_in.embedding[...]) * 10
    e_out = np.array(m.embed_out.embedding[...])
    for ctx, cont in pairs[::2]:
        seq = [ctx[-1]] + cont
        for a, b in zip(seq[:-1], seq[1:]):
            e_out[b] += e_in[a] / np.linalg.norm(e_in[a])
    m.embed_in.embedding.set_value(jnp.asarray(e_in))
    m.embed_out.embedding.set_value(jnp.asarray(e_out))
    return m


@pytest.fixture(scope="module")
def export(tmp_path_factory, shared_data):
    m = build_lambada_model(shared_data)
    d = tmp_path_factory.mktemp("lambada_model") / "hf"
    pythia_jax.save_pretrained(m, d)
    return d, m


def test_autotokenizer_on_export_encodes_like_ours(export, shared_data):
    transformers = pytest.importorskip("transformers")
    d, _ = export
    hf_tok = transformers.AutoTokenizer.from_pretrained(d)
    ours = load_tokenizer(d)
    texts = [x["text"] for x in ev.read_jsonl(lambada_path(shared_data), limit=300)]
    texts += ["Hello, I am", " Hello world\n\n    x", "<|endoftext|>after", "a<|padding|>b",
              "  runs   of    spaces\t\ttabs\r\n", "café ✓ 日本語 🙂", ""]
    for t in texts:
        ids = ours.encode(t).ids
        assert hf_tok(t)["input_ids"] == ids, t
        assert hf_tok.decode(ids) == ours.decode(ids, skip_special_tokens=False)
    assert hf_tok("Hello, I am")["input_ids"] == [12092, 13, 309, 717]
    assert hf_tok.eos_token_id == 0 and hf_tok.bos_token_id == 0 and hf_tok.pad_token_id == 1
    assert len(hf_tok) == 50277


def _torch_lambada(hf_model, hf_tok, reqs):
    """Independent reference: lm-eval's rule written directly with torch."""
    import torch
    lls, greedy = [], []
    for ctx, tgt in reqs:
        whole = hf_tok(ctx + tgt)["input_ids"]
        c = hf_tok(ctx)["input_ids"]
        cont = whole[len(c):]
        inp = torch.tensor([whole[:-1]])
        with torch.no_grad():
            logp = torch.log_softmax(hf_model(inp).logits[0].float(), -1)
        sl = logp[-len(cont):]
        target = torch.tensor(cont)
        lls.append(float(sl.gather(1, target[:, None]).sum()))
        greedy.append(bool((sl.argmax(-1) == target).all()))
    return np.array(lls), np.array(greedy)


def test_lambada_matches_an_independent_torch_computation(export, shared_data):
    transformers = pytest.importorskip("transformers")
    import torch
    d, model = export
    path = lambada_path(shared_data)
    res = ev.evaluate_lambada(model, load_tokenizer(d), path, limit=30, batch_size=8)
    hf_model = transformers.GPTNeoXForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(d)
    lls, greedy = _torch_lambada(hf_model, hf_tok,
                                 ev.lambada_requests(ev.read_jsonl(path, limit=30)))
    assert res["num_examples"] == 30
    assert res["acc"] == pytest.approx(greedy.mean(), abs=0)
    assert res["acc"] > 0.1  # the planted bigrams make accuracy non-trivial
    assert res["perplexity"] == pytest.approx(math.exp(-lls.mean()), rel=1e-4)
    assert res["acc_stderr"] == pytest.approx(np.std(greedy, ddof=1) / math.sqrt(30))


def test_encode_pair_follows_lm_eval():
    tok = load_tokenizer()
    # trailing spaces of the context move into the continuation
    c, k = ev.encode_pair(tok, "The cat sat on the ", "mat")
    assert c == tok.encode("The cat sat on the").ids
    assert k == tok.encode("The cat sat on the mat").ids[len(c):]
    # an empty context becomes the <|endoftext|> prefix
    c, k = ev.encode_pair(tok, "", " hello")
    assert c == [0] and k == tok.encode(" hello").ids
    assert ev.lambada_requests([{"text": "a b c word"}]) == [("a b c", " word")]


def test_stream_windows_cover_every_target_once():
    for n, L, S in [(10, 4, None), (10, 4, 2), (11, 4, 3), (100, 16, 5), (5, 16, None), (2, 1, 1)]:
        seen = []
        prev_start = -1
        for start, end, first in ev.stream_windows(n, L, S):
            assert end - start <= L and start > prev_start
            scored = list(range(max(first, start + 1), end + 1))
            assert scored and scored[0] == first
            if S is not None and start > 0:
                assert first - 1 - start >= L - S  # every scored target keeps L - S context
            seen += scored
            prev_start = start
        assert seen == list(range(1, n))
    with pytest.raises(ValueError, match="stride"):
        list(ev.stream_windows(10, 4, 5))


def _torch_stream_nll(hf_model, tokens, windows):
    """Reference: each window scored by transformers' model with a plain forward."""
    import torch
    total, count = 0.0, 0
    for start, end, first in windows:
        with torch.no_grad():
            logits = hf_model(torch.tensor(tokens[start:end][None])).logits[0]
        logp = torch.log_softmax(logits.double(), -1)
        for j, t in enumerate(range(start + 1, end + 1)):
            if t >= first:
                total += float(logp[j, int(tokens[t])])
                count += 1
    return -total / count, count


def test_token_stream_perplexity(export, tmp_path):
    transformers = pytest.importorskip("transformers")
    import torch
    from pythia_jax.data.indexed import write_indexed_dataset
    d, model = export
    hf_model = transformers.GPTNeoXForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    rng = np.random.default_rng(0)
    docs = [rng.integers(2, 50277, size=int(rng.integers(5, 40))) for _ in range(12)]
    prefix = tmp_path / "val_text_document"
    write_indexed_dataset(prefix, docs, vocab_size=50304)
    tokens = np.concatenate(docs)
    n = len(tokens)
    res = ev.evaluate_token_stream(model, prefix, context_length=64)
    assert res["predicted_tokens"] == n - 1 and res["tokens"] == n
    nll, count = _torch_stream_nll(hf_model, tokens, ev.stream_windows(n, 64))
    assert res["nll"] == pytest.approx(nll, rel=1e-5)
    assert res["perplexity"] == pytest.approx(math.exp(nll), rel=1e-5)
    # strided windows: same tokens predicted, each with more context
    res_s = ev.evaluate_token_stream(model, str(prefix) + ".bin", context_length=64, stride=16)
    nll_s, count_s = _torch_stream_nll(hf_model, tokens, ev.stream_windows(n, 64, 16))
    assert res_s["predicted_tokens"] == count_s == n - 1
    assert res_s["nll"] == pytest.approx(nll_s, rel=1e-5)
    assert res_s["windows"] > res["windows"]
    # --limit counts tokens
    res_l = ev.evaluate_token_stream(model, prefix, context_length=64, max_tokens=50)
    assert res_l["tokens"] == 50 and res_l["predicted_tokens"] == 49


def test_bad_inputs_give_clear_errors(export, tmp_path, shared_data):
    _, model = export
    tok = load_tokenizer()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "one two"}\n{"text": "three four"}\n{"text": "five six\n')
    with pytest.raises(ev.EvalDataError, match=r"bad.jsonl:3: malformed JSON"):
        ev.evaluate_lambada(model, tok, bad)
    bad.write_text('{"text": "one two"}\n{"sentence": "three four"}\n')
    with pytest.raises(ev.EvalDataError, match=r"bad.jsonl:2: expected a JSON object with a "
                                              r"string field 'text'.*sentence"):
        ev.read_jsonl(bad)
    bad.write_text('{"text": "oneword"}\n')
    with pytest.raises(ev.EvalDataError, match="at least two"):
        ev.evaluate_lambada(model, tok, bad)
    bad.write_text("")
    with pytest.raises(ev.EvalDataError, match="empty file"):
        ev.read_jsonl(bad)
    with pytest.raises(FileNotFoundError, match="no such jsonl"):
        ev.read_jsonl(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="unknown task 'hellaswag'"):
        ev.run_task("hellaswag", model, data=str(bad))
    # a real Megatron fixture whose ids are not NeoX tokens
    fixture = shared_data / "mmap" / "megatron_lm_fixtures" / "test_text_document"
    with pytest.raises(ev.EvalDataError, match="outside the model vocabulary"):
        ev.evaluate_token_stream(model, fixture, context_length=16)
    with pytest.raises(FileNotFoundError, match=r"expected .*\.bin and .*\.idx"):
        ev.evaluate_token_stream(model, tmp_path / "nothing")
    with pytest.raises(ValueError, match="continuation of 70 tokens is longer than the model "
                                         "window"):
        ev.TokenScorer(model, max_length=64).loglikelihood_tokens([([1], [5] * 70)])
    with pytest.raises(ValueError, match="token id 60000 outside"):
        ev.TokenScorer(model).loglikelihood_tokens([([1], [60000])])
    assert json.loads(json.dumps(ev.TASKS)) == ["lambada_openai", "perplexity"]
