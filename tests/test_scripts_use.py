"""scripts/generate.py, scripts/evaluate.py and `python -m pythia_jax.lm_eval_adapter` as used."""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import pythia_jax
from pythia_jax import evaluate as ev
from pythia_jax.generation import generate
from pythia_jax.tokenizer import load_tokenizer
from test_evaluate import build_lambada_model, lambada_path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_script(name):
    mod_name = f"_pj_script_{name}"
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    spec = importlib.util.spec_from_file_location(mod_name, os.path.join(REPO, "scripts",
                                                                         f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def export(tmp_path_factory, shared_data):
    d = tmp_path_factory.mktemp("scripts") / "hf"
    m = build_lambada_model(shared_data, 20)
    pythia_jax.save_pretrained(m, d)
    return d, m


def _run(name, argv, capsys):
    rc = _load_script(name).main([f"{name}.py"] + argv)
    out, err = capsys.readouterr()
    return rc, out, err


def test_generate_script_prints_the_greedy_continuation(export, capsys):
    d, model = export
    prompt = "The quick brown fox"
    rc, out, err = _run("generate", [f"--model={d}", f"--prompt={prompt}",
                                     "--max_new_tokens=12"], capsys)
    assert rc == 0, err
    tok = load_tokenizer(d)
    new = generate(model, [tok.encode(prompt).ids], 12, eos_token_id=0)[0]
    new = [t for t in new if t != 0]
    assert out == prompt + tok.decode(new) + "\n"
    # sampling flags are accepted and reproducible
    args = [f"--model={d}", f"--prompt={prompt}", "--max_new_tokens=8", "--temperature=0.9",
            "--top_k=40", "--top_p=0.9", "--seed=7"]
    rc1, out1, _ = _run("generate", args, capsys)
    rc2, out2, _ = _run("generate", args, capsys)
    assert rc1 == rc2 == 0 and out1 == out2 and out1.startswith(prompt)


def test_generate_script_errors(export, capsys):
    d, _ = export
    rc, _, err = _run("generate", [f"--model={d}", "--prompt=", "--max_new_tokens=4"], capsys)
    assert rc == 2 and "--prompt is empty" in err
    long_prompt = "word " * 2100
    rc, _, err = _run("generate", [f"--model={d}", f"--prompt={long_prompt}",
                                   "--max_new_tokens=4"], capsys)
    assert rc == 2 and "prompt too long" in err and "2048" in err
    rc, _, err = _run("generate", [f"--model={d}/nope", "--prompt=hi"], capsys)
    assert rc == 2 and "no such directory" in err
    rc, _, err = _run("generate", ["--prompt=hi"], capsys)
    assert rc == 2 and "--model is required" in err
    rc, _, err = _run("generate", [f"--model={d}", "--prompt=hi", "extra"], capsys)
    assert rc == 2 and "generate: error: unexpected arguments ['extra']" in err
    rc, _, err = _run("generate", [f"--model={d}", "--prompt=hi", "--nope=1"], capsys)
    assert rc == 2 and "generate: error:" in err and "nope" in err
    rc, _, err = _run("generate", [f"--model={d}", "--prompt=hi", "--temperature=1",
                                   "--top_p=2"], capsys)
    assert rc == 2 and "top_p" in err


def prefill_lambada_cache(cache, src, monkeypatch):
    """`src` as the hub dataset's LAMBADA file in an HF cache (huggingface_hub's layout:
    refs/main -> snapshots/COMMIT/FILE), with huggingface_hub pointed at it, offline."""
    import huggingface_hub.constants as hub_constants
    from pythia_jax.cli import LAMBADA_HUB_FILE, LAMBADA_HUB_REPO
    repo = cache / ("datasets--" + LAMBADA_HUB_REPO.replace("/", "--"))
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    dst = repo / "snapshots" / commit / LAMBADA_HUB_FILE
    dst.parent.mkdir(parents=True)
    dst.write_bytes(open(src, "rb").read())
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)


def test_evaluate_script_lambada_and_perplexity(export, capsys, shared_data, tmp_path,
                                                monkeypatch):
    from pythia_jax.data.indexed import write_indexed_dataset
    d, model = export
    rc, out, err = _run("evaluate", [f"--model={d}", "--task=lambada_openai",
                                     f"--data={lambada_path(shared_data)}", "--limit=20",
                                     f"--output={tmp_path / 'res.json'}"], capsys)
    assert rc == 0, err
    res = json.loads(out)
    want = ev.evaluate_lambada(model, load_tokenizer(d), lambada_path(shared_data), limit=20)
    assert res["num_examples"] == 20 and res["acc"] == want["acc"]
    assert res["perplexity"] == pytest.approx(want["perplexity"], rel=1e-6)
    assert json.loads((tmp_path / "res.json").read_text()) == res
    # the default data: the hub dataset's LAMBADA file, here from a pre-filled HF cache, offline
    prefill_lambada_cache(tmp_path / "hub", lambada_path(shared_data), monkeypatch)
    rc, out, err = _run("evaluate", [f"--model={d}", "--task=lambada_openai", "--limit=20"],
                        capsys)
    assert rc == 0 and json.loads(out)["acc"] == res["acc"], err

    rng = np.random.default_rng(0)
    prefix = tmp_path / "val_text_document"
    write_indexed_dataset(prefix, [rng.integers(2, 50000, 30) for _ in range(5)], vocab_size=50304)
    rc, out, err = _run("evaluate", [f"--model={d}", "--task=perplexity", f"--data={prefix}",
                                     "--context_length=32", "--stride=8"], capsys)
    assert rc == 0, err
    res = json.loads(out)
    assert res["predicted_tokens"] == 149 and res["stride"] == 8 and res["perplexity"] > 1


def test_evaluate_script_errors(export, capsys, tmp_path, shared_data):
    d, _ = export
    rc, _, err = _run("evaluate", [f"--model={d}", "--task=hellaswag"], capsys)
    assert rc == 2 and "unknown task 'hellaswag'" in err and "lambada_openai" in err
    rc, _, err = _run("evaluate", ["--task=lambada_openai"], capsys)
    assert rc == 2 and "evaluate: error: --model is required" in err
    rc, _, err = _run("evaluate", [f"--model={d}", "lambada_openai"], capsys)
    assert rc == 2 and "evaluate: error: unexpected arguments ['lambada_openai']" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a b"}\nnot json\n')
    rc, _, err = _run("evaluate", [f"--model={d}", "--task=lambada_openai", f"--data={bad}"],
                      capsys)
    assert rc == 2 and f"{bad}:2: malformed JSON" in err
    rc, _, err = _run("evaluate", [f"--model={d}", "--task=perplexity"], capsys)
    assert rc == 2 and "--data is required" in err
    fixture = shared_data / "mmap" / "megatron_lm_fixtures" / "test_text_document"
    rc, _, err = _run("evaluate", [f"--model={d}", "--task=perplexity", f"--data={fixture}",
                                   "--context_length=8"], capsys)
    assert rc == 2 and "outside the model vocabulary" in err
    rc, _, err = _run("evaluate", [f"--model={d}", "--task=lambada_openai",
                                   f"--data={tmp_path / 'missing.jsonl'}"], capsys)
    assert rc == 2 and "no such file" in err


@pytest.mark.slow
def test_lm_eval_cli_through_the_adapter_module(export, tmp_path, shared_data):
    """The documented command line: lm-eval's own CLI with `pythia_jax` registered."""
    from test_lm_eval_adapter import write_task_dir
    d, _ = export
    tasks = write_task_dir(tmp_path / "tasks", shared_data)
    out = tmp_path / "out"
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    cmd = [sys.executable, "-m", "pythia_jax.lm_eval_adapter", "--model", "pythia_jax",
           "--model_args", f"pretrained={d}", "--tasks", "lambada_local",
           "--include_path", str(tasks), "--limit", "10", "--batch_size", "8",
           "--output_path", str(out)]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    files = [os.path.join(r, f) for r, _, fs in os.walk(out) for f in fs if f.endswith(".json")]
    assert files, os.listdir(out)
    res = json.load(open(files[0]))["results"]["lambada_local"]
    assert set(res) >= {"acc,none", "perplexity,none"}
    # the plain `scripts/generate.py` command line, as a user runs it
    p = subprocess.run([sys.executable, "scripts/generate.py", f"--model={d}",
                        "--prompt=Hello, I am", "--max_new_tokens=5"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0 and p.stdout.startswith("Hello, I am"), p.stderr[-3000:]
