"""Memorization as in the Pythia paper against transformers' greedy `generate` (called the way
`predictable-memorization/eval_memorization.py` calls it) on rows whose continuations were
planted; resumable CSV runs, host split, bad inputs (scripts/memorization.py)."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from conftest import REPO  # noqa: E402
from hf_utils import tiny_hf_model  # noqa: E402

import pythia_jax  # noqa: E402
from pythia_jax.data.indexed import write_indexed_dataset  # noqa: E402
from pythia_jax.research import memorization as mem  # noqa: E402

V = 128
ROW_LEN = 80  # >= 64; Pythia's items hold 2049 tokens, the reader only needs the first 64
N_ROWS = 12


def _script():
    spec = importlib.util.spec_from_file_location("_mem_script", REPO / "scripts" /
                                                  "memorization.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _hf_paper_generate(hf, prompts):
    """eval_memorization.py: generate(context, max_length=64, min_length=64), greedy. Its
    model config has no pad token (HF then pads with EOS and attends to every prompt token);
    the explicit all-ones mask keeps that (HF would otherwise mask prompt tokens equal to
    pad_token_id)."""
    x = torch.as_tensor(prompts)
    with torch.no_grad():
        out = hf.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_length=64,
                          min_length=64, pad_token_id=1)
    return out[:, 32:64].numpy()


def _hf_true_logprob(hf, windows):
    with torch.no_grad():
        lp = torch.log_softmax(hf(torch.as_tensor(windows)).logits.float(), -1).numpy()
    return np.take_along_axis(lp[:, 31:63], windows[:, 32:64, None], -1)[..., 0].sum(-1)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny random GPT-NeoX (HF and ours) and a stream whose rows 0, 3, 6, 9 continue with
    the model's own greedy tokens (planted: must score 32/32), rows 1, 4, 7, 10 the same with
    one token changed at position 5 + row, the rest random."""
    d = tmp_path_factory.mktemp("mem")
    hf = tiny_hf_model(0, init_scale=0.15, vocab_size=V, max_position_embeddings=128)
    hf.save_pretrained(d / "hf")
    model = pythia_jax.from_pretrained(d / "hf")
    rng = np.random.RandomState(0)
    rows = rng.randint(2, V, (N_ROWS, ROW_LEN))
    greedy = _hf_paper_generate(hf, rows[:, :32])
    for r in range(N_ROWS):
        if r % 3 == 0:
            rows[r, 32:64] = greedy[r]
        elif r % 3 == 1:
            rows[r, 32:64] = greedy[r]
            k = 5 + r
            rows[r, 32 + k] = (greedy[r, k] + 1) % V
    write_indexed_dataset(d / "stream", list(rows), dtype=np.uint16)
    hf_gen = _hf_paper_generate(hf, rows[:, :32])
    return dict(dir=d, hf=hf, model=model, rows=rows, prefix=str(d / "stream"), hf_gen=hf_gen)


def test_scores_match_transformers_greedy_on_planted_rows(setup):
    rows, hf_gen = setup["rows"], setup["hf_gen"]
    res = mem.memorize_rows(setup["model"], setup["prefix"], range(N_ROWS), batch_size=4)
    np.testing.assert_array_equal(res.generated, hf_gen)
    # one program for every batch (the last one padded), reused for other rows
    compiled = mem._memorize_batch._cache_size()
    again = mem.memorize_rows(setup["model"], setup["prefix"], [11, 2, 7], batch_size=4)
    assert mem._memorize_batch._cache_size() == compiled
    np.testing.assert_array_equal(again.generated, hf_gen[[11, 2, 7]])
    truth = rows[:, 32:64]
    np.testing.assert_array_equal(res.matches, (hf_gen == truth).sum(-1))
    planted, perturbed = np.arange(0, N_ROWS, 3), np.arange(1, N_ROWS, 3)
    assert (res.matches[planted] == 32).all() and res.memorized[planted].all()
    assert (res.score[planted] == 1.0).all() and (res.first_mismatch[planted] == 32).all()
    assert (res.matches[perturbed] == 31).all() and not res.memorized[perturbed].any()
    np.testing.assert_array_equal(res.first_mismatch[perturbed], 5 + perturbed)
    rand = np.arange(2, N_ROWS, 3)
    assert (res.matches[rand] < 8).all()
    np.testing.assert_allclose(res.true_logprob, _hf_true_logprob(setup["hf"], rows[:, :64]),
                               rtol=1e-5, atol=1e-4)
    # the planted continuation is the likeliest one: higher log-prob than the random rows'
    assert res.true_logprob[planted].min() > res.true_logprob[rand].max()


def test_end_of_text_is_suppressed_as_min_length_does(tmp_path):
    """A model that always prefers token 0: HF's min_length=64 never emits it, and neither do
    we by default; with suppress_eos=False greedy decoding emits it at every step."""
    hf = tiny_hf_model(1, init_scale=0.15, vocab_size=V, max_position_embeddings=128)
    with torch.no_grad():
        hf.gpt_neox.final_layer_norm.bias[:] = 1.0
        hf.gpt_neox.final_layer_norm.weight[:] = 0.01
        hf.get_output_embeddings().weight[0, :] = 0.5  # logit(0) ~ 0.5 * d: far above the rest
    hf.save_pretrained(tmp_path / "hf")
    model = pythia_jax.from_pretrained(tmp_path / "hf")
    prompts = np.random.RandomState(1).randint(2, V, (3, 64))
    ref = _hf_paper_generate(hf, prompts[:, :32])
    assert not (ref == 0).any()
    gen, _ = mem.memorize_tokens(model, prompts, batch_size=4)
    np.testing.assert_array_equal(gen, ref)
    with torch.no_grad():  # unconstrained, the greedy choice is token 0 at every position
        free = hf(torch.as_tensor(prompts)).logits.argmax(-1).numpy()
    assert (free[:, 31:] == 0).all()
    gen_free, _ = mem.memorize_tokens(model, prompts, batch_size=4, suppress_eos=False)
    assert (gen_free == 0).all()


def _csv_rows(path):
    lines = open(path).read().splitlines()
    assert lines[0] == ",".join(mem.CSV_COLUMNS)
    return [line.split(",") for line in lines[1:]]


def test_script_writes_and_resumes_without_recomputing(setup, tmp_path, capsys, monkeypatch):
    out = tmp_path / "mem.csv"
    script = _script()
    args = ["memorization.py", f"--model={setup['dir'] / 'hf'}", f"--data={setup['prefix']}",
            f"--out={out}", "--batch_size=4"]
    assert script.main(args + ["--start_row=0", "--end_row=6"]) == 0
    first = _csv_rows(out)
    assert [int(r[0]) for r in first] == list(range(6))
    ref = (setup["hf_gen"] == setup["rows"][:, 32:64]).sum(-1)
    assert [int(r[1]) for r in first] == ref[:6].tolist()
    assert [int(r[3]) for r in first][:2] == [32, 6]

    # a kill in the middle of a write leaves a torn last line: it is dropped and row 6 redone
    with open(out, "a") as fh:
        fh.write("6,3")
    calls = []
    real = mem.memorize_rows

    def counting(model, data, rows, **kw):
        calls.append(list(rows))
        return real(model, data, rows, **kw)
    monkeypatch.setattr(mem, "memorize_rows", counting)
    capsys.readouterr()
    assert script.main(args + ["--start_row=0", "--end_row=12"]) == 0
    assert "6 row(s) scored, 6 already in" in capsys.readouterr().out
    assert sorted(r for c in calls for r in c) == list(range(6, 12))  # rows 0..5 not redone
    rows = _csv_rows(out)
    assert [int(r[0]) for r in rows] == list(range(12))
    assert [int(r[1]) for r in rows] == ref.tolist()
    assert rows[:6] == first
    # nothing left to do: no model call at all
    calls.clear()
    assert script.main(args + ["--start_row=0", "--end_row=12"]) == 0
    assert calls == []


def test_rows_are_split_over_hosts(setup, tmp_path):
    parts = [mem.host_rows(0, 11, p, 3) for p in range(3)]
    assert [list(p) for p in parts] == [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9, 10]]
    out = tmp_path / "m.csv"
    got = {}
    for p in range(2):
        r = mem.run_memorization(setup["model"], setup["prefix"], 2, 9, str(out), batch_size=4,
                                 process_index=p, process_count=2)
        assert r["path"] == str(tmp_path / f"m.process{p}-of-2.csv")
        got[p] = [int(x[0]) for x in _csv_rows(r["path"])]
    assert got == {0: [2, 3, 4], 1: [5, 6, 7, 8]}
    assert not out.exists()


def test_bad_inputs_fail_clearly_and_write_nothing(setup, tmp_path, capsys):
    script = _script()
    base = ["memorization.py", f"--model={setup['dir'] / 'hf'}", "--batch_size=4"]
    out = tmp_path / "x.csv"

    def run(*extra):
        capsys.readouterr()
        rc = script.main(base + list(extra))
        return rc, capsys.readouterr().err

    rc, err = run(f"--data={tmp_path / 'nope'}", "--start_row=0", "--end_row=4", f"--out={out}")
    assert rc == 2 and "nope" in err and ".bin" in err and not out.exists()
    rc, err = run(f"--data={setup['prefix']}", "--start_row=0", f"--end_row={N_ROWS + 1}",
                  f"--out={out}")
    assert rc == 2 and "out of range" in err and f"{N_ROWS} rows" in err and not out.exists()
    rc, err = run(f"--data={setup['prefix']}", "--start_row=5", "--end_row=5", f"--out={out}")
    assert rc == 2 and "--start_row < --end_row" in err
    rc, err = run(f"--data={setup['prefix']}", "--start_row=0", "--end_row=4")
    assert rc == 2 and "--out is required" in err
    # a results file with a malformed line in the middle: named, left untouched
    bad = tmp_path / "bad.csv"
    bad.write_text(",".join(mem.CSV_COLUMNS) + "\n0,32,1.0,32,-3.5\nnot,a,row\n1,2,0.0625,0,-9\n")
    before = bad.read_bytes()
    rc, err = run(f"--data={setup['prefix']}", "--start_row=0", "--end_row=4", f"--out={bad}")
    assert rc == 2 and f"{bad}: line 3" in err and bad.read_bytes() == before
    other = tmp_path / "other.csv"
    other.write_text("revision,step\nstep1,1\n")
    rc, err = run(f"--data={setup['prefix']}", "--start_row=0", "--end_row=4", f"--out={other}")
    assert rc == 2 and "line 1" in err and "header" in err
    # rows shorter than 64 tokens
    write_indexed_dataset(tmp_path / "short", [list(range(2, 50))] * 3, dtype=np.uint16)
    rc, err = run(f"--data={tmp_path / 'short'}", "--start_row=0", "--end_row=3", f"--out={out}")
    assert rc == 2 and "has 48 tokens" in err and "at least 64" in err and not out.exists()
    # token ids the model cannot embed
    write_indexed_dataset(tmp_path / "big", [[V + 5] * 70] * 2, dtype=np.uint16)
    rc, err = run(f"--data={tmp_path / 'big'}", "--start_row=0", "--end_row=2", f"--out={out}")
    assert rc == 2 and "outside the vocabulary" in err and not out.exists()
    rc, err = run("--data=x", "--start_row=0", "--end_row=2", "stray")
    assert rc == 2 and "unexpected arguments" in err
    assert not os.path.exists(out)
