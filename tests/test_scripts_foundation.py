"""End-to-end CLI tests: scripts/model_info.py and scripts/convert.py."""

import json
import os
import subprocess
import sys

import pytest
import torch

from hf_utils import tiny_hf_model
from test_config import CARD

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(script, *args, check=True):
    env = dict(os.environ, JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1")
    p = subprocess.run([sys.executable, os.path.join(REPO, "scripts", script), *args],
                       capture_output=True, text=True, env=env, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"{script} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def test_model_info_all_sizes_match_the_card():
    out = json.loads(run("model_info.py", "--model=all").stdout)
    got = {d["model"]: (d["total_params"], d["non_embedding_params"]) for d in out}
    for name, counts in CARD.items():
        assert got[name] == counts, name
    one = json.loads(run("model_info.py", "--model=pythia-70m").stdout)
    assert one["flops_per_token"] == 3 * (2 * (6 * 12 * 512 * 512 + 50304 * 512) + 4 * 6 * 2048 * 512)


def test_model_info_bad_model():
    p = run("model_info.py", "--model=pythia-3b", check=False)
    assert p.returncode == 2 and "unknown model preset 'pythia-3b'" in p.stderr


def test_convert_hf_to_jax_to_hf_is_bit_exact(tmp_path):
    from transformers import GPTNeoXForCausalLM
    hf = tiny_hf_model(seed=20, init_scale=0.1).half()
    hf.save_pretrained(tmp_path / "src")
    run("convert.py", f"--src={tmp_path / 'src'}", f"--dst={tmp_path / 'jax'}", "--to=jax")
    assert (tmp_path / "jax" / "pythia_jax_config.json").is_file()
    run("convert.py", f"--src={tmp_path / 'jax'}", f"--dst={tmp_path / 'back'}", "--to=hf")
    back = GPTNeoXForCausalLM.from_pretrained(tmp_path / "back", dtype=torch.float16)
    a, b = hf.state_dict(), back.state_dict()
    for k in a:
        assert a[k].dtype == b[k].dtype == torch.float16 and torch.equal(a[k], b[k]), k


def test_convert_bad_input_leaves_things_alone(tmp_path):
    p = run("convert.py", f"--src={tmp_path / 'missing'}", f"--dst={tmp_path / 'o'}", "--to=jax",
            check=False)
    assert p.returncode == 2 and "missing: no such directory" in p.stderr
    assert not (tmp_path / "o").exists()
    p = run("convert.py", "--src=x", "--dst=y", "--to=onnx", check=False)
    assert p.returncode != 0 and "--to" in p.stderr
    tiny_hf_model(seed=21).save_pretrained(tmp_path / "src")
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "keep.txt").write_text("x")
    p = run("convert.py", f"--src={tmp_path / 'src'}", f"--dst={tmp_path / 'o'}", "--to=hf",
            check=False)
    assert p.returncode == 2 and "already exists" in p.stderr
    assert os.listdir(tmp_path / "o") == ["keep.txt"]
