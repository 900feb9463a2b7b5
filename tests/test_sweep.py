"""Checkpoint sweeps (pythia_jax.research.sweep, scripts/sweep.py) on a training workdir and a
folder of HF directories made from tiny random models: one compile for all revisions, resume
without recomputing, equal weights flagged, a valid PNG, clear errors for bad revisions."""

from __future__ import annotations

import csv
import importlib.util
import shutil
import warnings

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

from conftest import REPO  # noqa: E402
from hf_utils import tiny_hf_model  # noqa: E402

import pythia_jax  # noqa: E402
from pythia_jax import checkpoint as ckpt_lib  # noqa: E402
from pythia_jax import evaluate as ev  # noqa: E402
from pythia_jax.data.indexed import write_indexed_dataset  # noqa: E402
from pythia_jax.research import sweep as sw  # noqa: E402

V = 128


def _script():
    spec = importlib.util.spec_from_file_location("_sweep_script", REPO / "scripts" / "sweep.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A training workdir with steps 0, 1, 2, 4 (step 4 holds step 2's weights, like a hub
    branch serving the wrong step), the same as a folder of HF dirs, and a token stream."""
    d = tmp_path_factory.mktemp("sweep")
    hf_dirs = d / "hf"
    work = d / "work"
    for step, seed in ((0, 0), (1, 1), (2, 2)):
        hf = tiny_hf_model(seed, vocab_size=V, max_position_embeddings=64)
        hf.save_pretrained(hf_dirs / f"step{step}")
        ckpt_lib.save_model(pythia_jax.from_pretrained(hf_dirs / f"step{step}"),
                            str(work / "checkpoints" / str(step)))
    shutil.copytree(hf_dirs / "step2", hf_dirs / "step4")
    shutil.copytree(work / "checkpoints" / "2", work / "checkpoints" / "4")
    docs = [list(np.random.RandomState(i).randint(2, V, 50)) for i in range(4)]
    write_indexed_dataset(d / "val", docs, dtype=np.uint16)
    return dict(dir=d, hf=hf_dirs, work=work, data=str(d / "val"))


def _read(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_resolve_revisions_forms_and_errors(setup):
    revs = sw.resolve_revisions(str(setup["work"]), "all")
    assert [(r.name, r.step) for r in revs] == [("step0", 0), ("step1", 1), ("step2", 2),
                                                ("step4", 4)]
    assert revs[2].source == str(setup["work"] / "checkpoints" / "2")
    assert [r.step for r in sw.resolve_revisions(str(setup["work"]), "4,step1")] == [4, 1]
    assert [r.name for r in sw.resolve_revisions(str(setup["hf"]), "all")] == \
        ["step0", "step1", "step2", "step4"]
    hub = sw.resolve_revisions("EleutherAI/pythia-160m", "all")
    assert len(hub) == 154 and hub[0].revision == "step0" and hub[-1].step == 143000
    assert hub[0].source == "EleutherAI/pythia-160m"
    main = sw.resolve_revisions("EleutherAI/pythia-160m", "step512,main")
    assert [(r.revision, r.step) for r in main] == [("step512", 512), ("main", 143000)]
    with pytest.raises(sw.SweepError, match=r"'step7'.*one of 0, 1, 2, 4"):
        sw.resolve_revisions(str(setup["work"]), "step1,step7")
    with pytest.raises(sw.SweepError, match=r"'latest'.*has step0, step1, step2, step4"):
        sw.resolve_revisions(str(setup["hf"]), "latest")
    with pytest.raises(sw.SweepError, match=r"'step1500'.*step\{N\}"):
        sw.resolve_revisions("EleutherAI/pythia-160m", "step1000,step1500")
    with pytest.raises(sw.SweepError, match="listed twice"):
        sw.resolve_revisions(str(setup["work"]), "1,step1")
    with pytest.raises(sw.SweepError, match="no such directory"):
        sw.resolve_revisions(str(setup["dir"] / "missing"), "all")


def test_fingerprint_is_the_weights(setup):
    a = pythia_jax.from_pretrained(setup["hf"] / "step2")
    b = pythia_jax.from_pretrained(setup["work"] / "checkpoints" / "4")
    c = pythia_jax.from_pretrained(setup["hf"] / "step1")
    assert sw.fingerprint(a) == sw.fingerprint(b) != sw.fingerprint(c)
    a.layers.mlp.dense_h_to_4h.bias[...] = a.layers.mlp.dense_h_to_4h.bias[...].at[0, 0].add(1e-3)
    assert sw.fingerprint(a) != sw.fingerprint(b)


def test_sweep_script_one_compile_flags_equal_weights_and_plots(setup, tmp_path, capsys):
    out, png = tmp_path / "ppl.csv", tmp_path / "ppl.png"
    script = _script()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rc = script.main(["sweep.py", f"--model={setup['work']}", "--revisions=all",
                          "--task=perplexity", f"--data={setup['data']}", "--context_length=32",
                          f"--out={out}", f"--plot={png}"])
    assert rc == 0, capsys.readouterr().err
    rows = _read(out)
    assert [r["revision"] for r in rows] == ["step0", "step1", "step2", "step4"]
    assert [r["same_weights_as"] for r in rows] == ["", "", "", "step2"]
    assert "same weights as another revision: step4" in capsys.readouterr().out
    assert any("'step4' has the same weights as 'step2'" in str(w.message) for w in caught)
    # the metric is the real evaluation of each checkpoint
    for r in rows:
        m = pythia_jax.from_pretrained(setup["work"] / "checkpoints" / r["step"])
        ref = ev.evaluate_token_stream(m, setup["data"], context_length=32)
        assert float(r["perplexity"]) == pytest.approx(ref["perplexity"], rel=1e-6)
    assert rows[2]["perplexity"] == rows[3]["perplexity"] != rows[1]["perplexity"]
    # weights are arguments: only the first revision compiles anything
    assert int(rows[0]["compiles"]) >= 1  # the counter sees compilations...
    assert [int(r["compiles"]) for r in rows[1:]] == [0, 0, 0]  # ...and there are no more
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image
    img = matplotlib.image.imread(str(png))
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert not list(tmp_path.glob(".plot.*"))


def test_sweep_resumes_without_recomputing(setup, tmp_path):
    out = str(tmp_path / "r.csv")
    seen = []

    def task(model):
        seen.append(sw.fingerprint(model))
        return {"bias_sum": float(np.asarray(model.layers.attention.dense.bias[...]).sum())}
    revs = sw.resolve_revisions(str(setup["hf"]), "step0,step1")
    sw.sweep(str(setup["hf"]), revs, task, out, log=None)
    assert len(seen) == 2
    first = open(out).read()
    # a kill in the middle of the next append leaves a torn line: dropped, that revision redone
    with open(out, "a") as fh:
        fh.write("step2,2,abc")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows = sw.sweep(str(setup["hf"]), "all", task, out, log=None)
    assert len(seen) == 4  # step2 and step4 only
    assert open(out).read().startswith(first)
    assert [r["revision"] for r in rows] == ["step0", "step1", "step2", "step4"]
    assert rows[3]["same_weights_as"] == "step2"
    assert any("same weights" in str(w.message) for w in caught)
    sw.sweep(str(setup["hf"]), "all", task, out, log=None)
    assert len(seen) == 4  # all done: nothing loaded or run


def test_sweep_bad_inputs(setup, tmp_path, capsys):
    script = _script()

    def run(*extra):
        capsys.readouterr()
        return script.main(["sweep.py", *extra]), capsys.readouterr().err

    out = tmp_path / "o.csv"
    rc, err = run(f"--model={setup['work']}", "--revisions=step3", "--task=perplexity",
                  f"--data={setup['data']}", f"--out={out}")
    assert rc == 2 and "'step3'" in err and "one of 0, 1, 2, 4" in err and not out.exists()
    rc, err = run("--model=EleutherAI/pythia-160m", "--revisions=step77", "--task=perplexity",
                  f"--data={setup['data']}", f"--out={out}")
    assert rc == 2 and "'step77'" in err and not out.exists()
    rc, err = run(f"--model={setup['work']}", "--task=accuracy", f"--out={out}")
    assert rc == 2 and "unknown task 'accuracy'" in err
    rc, err = run(f"--model={setup['work']}", "--task=perplexity", f"--out={out}")
    assert rc == 2 and "--data is required" in err
    rc, err = run(f"--model={setup['work']}", "--task=memorization", f"--data={setup['data']}",
                  f"--out={out}")
    assert rc == 2 and "--end_row is required" in err
    bad = tmp_path / "bad.csv"
    bad.write_text("row,matches,score\n1,2,3\n")
    before = bad.read_bytes()
    rc, err = run(f"--model={setup['work']}", "--task=perplexity", f"--data={setup['data']}",
                  f"--out={bad}")
    assert rc == 2 and f"{bad}: line 1" in err and bad.read_bytes() == before
    # another task's results file: the metric columns differ
    rows_ok = tmp_path / "ok.csv"
    assert run(f"--model={setup['hf']}", "--revisions=step0", "--task=perplexity",
               f"--data={setup['data']}", "--context_length=32", f"--out={rows_ok}")[0] == 0
    rc, err = run(f"--model={setup['hf']}", "--revisions=step1", "--task=memorization",
                  f"--data={setup['data']}", "--end_row=1", f"--out={rows_ok}")
    assert rc == 2 and ("at least 64" in err or "columns" in err)
    with pytest.raises(sw.SweepError, match="no column 'acc'"):
        sw.plot_sweep(_read(rows_ok), "acc", str(tmp_path / "p.png"))
