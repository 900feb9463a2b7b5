"""The command lines: `--help` of every script, the Pythia / GPT-NeoX flag spellings, bundled
configs by name, the defaults users get (no `../shared`).

Scripts run as subprocesses by path (`python scripts/X.py`, as the README runs them; their
`__main__` block is the same `run()` the console commands call): the absl scripts define their
flags on the process-global `absl.flags.FLAGS`, so two of them cannot share this process.
tests/test_wheel.py runs the installed console commands.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from pythia_jax import cli
from pythia_jax.data.indexed import MMapIndexedDataset, write_indexed_dataset
from pythia_jax.data.shards import shard

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false",
           HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")

#: every script, and flags its --help must list (its own, our additions and the aliases).
SCRIPTS = {
    "train": ["--config", "--workdir", "bundled config by name"],
    "convert": ["--src", "--dst", "--to"],
    "generate": ["--model", "--prompt", "--compute_dtype", "--attention_impl"],
    "evaluate": ["--model", "--task", "--data", "--compute_dtype", "--attention_impl",
                 "--[no]progress"],
    "batch_viewer": ["--data", "--start_step", "--end_step", "--start_iteration",
                     "--end_iteration", "--load_path", "--save_path"],
    "preprocess_data": ["--input", "--output_prefix", "--json_keys", "--tokenizer_type",
                        "--vocab_file"],
    "unshard": ["--input", "--input_file", "--output_dir", "--num_shards"],
    "export_gguf": ["--src", "--dst", "--type"],
    "aot_report": ["--model", "--topology", "--set"],
    "lm_eval_cli": ["--model_args", "--tasks", "pythia_jax", "lm_eval's arguments"],
    "memorization": ["--model", "--data", "--start_row", "--end_row"],
    "sweep": ["--model", "--revisions", "--task"],
    "tuned_lens": ["--model", "--data", "--steps"],
    "model_info": ["--model", "--seq_len"],
}


def run(script, *args, cwd=REPO, env=ENV, timeout=300):
    return subprocess.run([sys.executable, os.path.join(REPO, "scripts", f"{script}.py"), *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_every_script_is_a_console_command():
    """Each script of scripts/ is in [project.scripts] (and nothing else is), with a run()."""
    import tomllib
    project = tomllib.loads(open(os.path.join(REPO, "pyproject.toml")).read())["project"]
    targets = {v.split(":")[0].removeprefix("pythia_jax_scripts."): v.split(":")[1]
               for v in project["scripts"].values()}
    files = {f[:-3] for f in os.listdir(os.path.join(REPO, "scripts"))
             if f.endswith(".py") and f != "__init__.py"}
    assert set(targets) == files == set(SCRIPTS)
    assert set(targets.values()) == {"run"}
    for name in files:
        assert "\ndef run(" in open(os.path.join(REPO, "scripts", f"{name}.py")).read(), name


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_help(script):
    """`--help` prints the script's docstring and its flags on stdout and exits 0; `-h` too."""
    p = run(script, "--help")
    assert p.returncode == 0, p.stderr[-2000:]
    doc_first_line = open(os.path.join(REPO, "scripts", f"{script}.py")).read()
    doc_first_line = doc_first_line.split('"""', 2)[1].strip().splitlines()[0]
    assert p.stdout.startswith(doc_first_line), p.stdout[:500]
    for flag in SCRIPTS[script]:
        assert flag in p.stdout, f"{script} --help does not list {flag}:\n{p.stdout}"
    if script == "generate":  # argparse's spelling and a help flag after other flags
        q = run(script, "--model=x", "-h")
        assert q.returncode == 0 and q.stdout == p.stdout


def test_help_requested_stops_at_double_dash():
    assert cli.help_requested(["prog", "--model=x", "--help"])
    assert cli.help_requested(["prog", "-?"])
    assert not cli.help_requested(["prog", "--", "--help"])
    assert not cli.help_requested(["prog", "--helper=1"])


def test_bundled_configs_by_name(tmp_path, monkeypatch):
    """`--config=smoke` / `pythia:70m` / `configs/pythia.py:70m` outside a clone resolve to the
    package's files; an existing file wins; an unknown name is an error listing the bundled
    ones."""
    monkeypatch.chdir(tmp_path)  # no configs/ folder here
    pkg = os.path.join(REPO, "pythia_jax", "configs")
    argv = cli.resolve_config_argv(["train", "--config=smoke", "--config.train.num_steps=3"])
    assert argv == ["train", f"--config={pkg}/smoke.py", "--config.train.num_steps=3"]
    for spec in ("pythia:70m", "pythia.py:70m", "configs/pythia.py:70m"):
        argv = cli.resolve_config_argv(["train", f"--config={spec}"])
        assert argv == ["train", f"--config={pkg}/pythia.py:70m"], spec
        assert cli.config_flags_error(argv + ["--config.train.num_steps=5"]) is None
    assert cli.resolve_config_argv(["train", "--config", "smoke"]) == [
        "train", "--config", f"{pkg}/smoke.py"]
    (tmp_path / "smoke.py").write_text("def get_config():\n    return {}\n")
    assert cli.resolve_config_argv(["t", "--config=smoke.py"]) == ["t", "--config=smoke.py"]
    argv = cli.resolve_config_argv(["t", "--config=nope:1"])
    assert argv == ["t", "--config=nope:1"]
    error = cli.config_flags_error(argv)
    assert "nope" in error and "does not exist" in error and "pythia, smoke" in error
    assert cli.bundled_config_path("../smoke") is None
    assert cli.bundled_config_path("__init__") is None


def test_train_script_bad_bundled_config_name(tmp_path):
    p = run("train", "--config=smokee", cwd=tmp_path)
    assert p.returncode == 2
    assert "--config=smokee" in p.stderr and "bundled configs by name: pythia, smoke" in p.stderr


def _items(n_rows, width, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(1, 50000, size=(n_rows, width)).astype(np.uint16)


def test_batch_viewer_pythia_flags(tmp_path):
    """Pythia's utils/batch_viewer.py command line: --load_path, --start_iteration,
    --end_iteration (inclusive), --save_path DIR -> DIR/indicies.npy = dataset items
    [start*B, (end+1)*B); the same array as our own flags write."""
    B, L = 2, 5
    items = _items(6 * B, L + 1)
    write_indexed_dataset(tmp_path / "document", items, vocab_size=50277)
    save = tmp_path / "saved" / "here"
    p = run("batch_viewer", f"--load_path={tmp_path / 'document'}", "--start_iteration=1",
            "--end_iteration=3", f"--save_path={save}", "--conf_dir=utils/dummy_config.yml",
            f"--batch_size={B}", f"--seq_len={L}")
    assert p.returncode == 0, p.stderr
    got = np.load(save / "indicies.npy")
    ds = MMapIndexedDataset(tmp_path / "document")
    np.testing.assert_array_equal(got, np.stack([ds[i] for i in range(1 * B, (3 + 1) * B)]))
    p = run("batch_viewer", f"--data={tmp_path / 'document'}", "--start_step=1", "--end_step=3",
            f"--out={tmp_path / 'ours.npy'}", f"--batch_size={B}", f"--seq_len={L}")
    assert p.returncode == 0, p.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "ours.npy"), got)
    p = run("batch_viewer", f"--data={tmp_path / 'document'}", f"--save_path={save}",
            f"--out={tmp_path / 'x.npy'}", f"--batch_size={B}", f"--seq_len={L}")
    assert p.returncode != 0 and "not both" in p.stderr
    assert not (tmp_path / "x.npy").exists()


def test_unshard_pythia_output_dir(tmp_path):
    """Pythia's unshard_memmap.py: --input_file SHARD0 --num_shards N --output_dir DIR writes
    DIR/NAME.bin (the folder created), byte for byte the unsharded file."""
    data = np.random.default_rng(1).integers(0, 256, 5000, dtype=np.uint8).tobytes()
    (tmp_path / "src").mkdir()
    whole = tmp_path / "src" / "document.bin"
    whole.write_bytes(data)
    shards = shard(str(whole), 2000)  # 3 shards of at most 2000 bytes
    whole.unlink()
    out_dir = tmp_path / "merged" / "folder"
    p = run("unshard", f"--input_file={shards[0]}", "--num_shards=3", f"--output_dir={out_dir}",
            "--noprogress")
    assert p.returncode == 0, p.stderr
    assert (out_dir / "document.bin").read_bytes() == data
    p = run("unshard", f"--input_file={shards[0]}", f"--output_dir={out_dir}",
            f"--output={tmp_path / 'x.bin'}", "--noprogress")
    assert p.returncode != 0 and "not both" in p.stderr


def test_preprocess_neox_flags(tmp_path):
    """GPT-NeoX's tools/datasets/preprocess_data.py spellings give the same files as ours:
    --output-prefix, --tokenizer-type HFTokenizer, --vocab-file, --append-eod, --jsonl-keys
    with space-separated keys. Another tokenizer type is refused, writing nothing."""
    docs = [{"text": "Hello world.", "title": "A"}, {"text": "Second doc here", "title": "B c"}]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(d) + "\n" for d in docs))
    vocab = os.path.join(REPO, "pythia_jax", "assets", "20B_tokenizer.json")
    p = run("preprocess_data", "--input", str(src), "--output-prefix", str(tmp_path / "neox"),
            "--tokenizer-type", "HFTokenizer", "--vocab-file", vocab, "--append-eod",
            "--jsonl-keys", "text", "title", "--workers", "1", "--noprogress")
    assert p.returncode == 0, p.stderr
    p = run("preprocess_data", f"--input={src}", f"--output_prefix={tmp_path / 'ours'}",
            f"--tokenizer={vocab}", "--append_eod", "--json_keys=text,title", "--noprogress")
    assert p.returncode == 0, p.stderr
    for key in ("text", "title"):
        for ext in ("bin", "idx"):
            neox = (tmp_path / f"neox_{key}_document.{ext}").read_bytes()
            assert neox == (tmp_path / f"ours_{key}_document.{ext}").read_bytes(), (key, ext)
    ds = MMapIndexedDataset(tmp_path / "neox_title_document")
    assert len(ds) == 2 and ds[0][-1] == 0  # --append-eod: <|endoftext|> = 0 last
    before = sorted(os.listdir(tmp_path))
    p = run("preprocess_data", f"--input={src}", f"--output-prefix={tmp_path / 'gpt2'}",
            "--tokenizer-type=GPT2BPETokenizer", "--noprogress")
    assert p.returncode != 0 and "tokenizer_type" in p.stderr and "HFTokenizer" in p.stderr
    assert sorted(os.listdir(tmp_path)) == before


def test_evaluate_default_data_is_the_hub_dataset(tmp_path):
    """No ../shared default: without --data, lambada_openai reads the hub dataset's file;
    offline with an empty cache that is one error line naming the dataset and --data."""
    env = dict(ENV, HF_HOME=str(tmp_path / "hf"), HF_HUB_CACHE=str(tmp_path / "hf" / "hub"))
    p = run("evaluate", f"--model={tmp_path / 'no_model'}", "--task=lambada_openai", env=env)
    assert p.returncode == 2
    assert "evaluate: error: cannot get the LAMBADA test set data/lambada_test.jsonl" in p.stderr
    assert "EleutherAI/lambada_openai" in p.stderr and "--data=" in p.stderr
    assert "Traceback" not in p.stderr
    assert "shared" not in open(os.path.join(REPO, "scripts", "evaluate.py")).read()


def test_lm_eval_command_without_lm_eval(tmp_path):
    """Without the eval extra the command says which extra to install (exit 2)."""
    code = ("import runpy, sys; sys.modules['lm_eval'] = None; sys.argv = ['pythia-jax-lm-eval']; "
            f"runpy.run_path({os.path.join(REPO, 'scripts', 'lm_eval_cli.py')!r}, "
            "run_name='__main__')")
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=ENV, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 2
    assert "pip install 'pythia-jax[eval]'" in p.stderr


def test_evaluate_compute_dtype_and_attention_impl(tmp_path, capsys):
    """--compute_dtype reaches the model (bfloat16 activations change the perplexity a little,
    float32 reproduces the default exactly); a bad --attention_impl is refused by name."""
    import pythia_jax
    from flax import nnx
    from pythia_jax.config import ModelConfig
    from test_scripts_use import _load_script

    cfg = ModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                      vocab_size=512)
    pythia_jax.save_pretrained(pythia_jax.GPTNeoX(cfg, rngs=nnx.Rngs(0)), tmp_path / "hf")
    rng = np.random.default_rng(0)
    prefix = tmp_path / "val_text_document"
    write_indexed_dataset(prefix, [rng.integers(1, 512, 40) for _ in range(3)], vocab_size=512)
    script = _load_script("evaluate")

    def ppl(*extra):
        rc = script.main(["evaluate.py", f"--model={tmp_path / 'hf'}", "--task=perplexity",
                          f"--data={prefix}", "--context_length=16", "--noprogress", *extra])
        out, err = capsys.readouterr()
        assert rc == 0, err
        return json.loads(out)["nll"]

    default = ppl()
    assert ppl("--compute_dtype=float32", "--attention_impl=xla") == default
    bf16 = ppl("--compute_dtype=bfloat16")
    assert bf16 != default and bf16 == pytest.approx(default, rel=2e-2)
    rc = script.main(["evaluate.py", f"--model={tmp_path / 'hf'}", "--task=perplexity",
                      f"--data={prefix}", "--attention_impl=flash"])
    err = capsys.readouterr().err
    assert rc == 2 and "--attention_impl" in err and "xla" in err and "pallas" in err
