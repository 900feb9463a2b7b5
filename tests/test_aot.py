"""Deviceless TPU compilation of the real train step (libtpu from PyPI, no TPU present).

`scripts/aot_report.py` lowers `train.make_train_step` for a `v5e:2x2` slice and compiles it
with libtpu; these tests check what it reports, including that the FLOPs / time extrapolated
from 1- and 2-layer compiles match a compile of the whole unrolled step. They fail (never
skip) without libtpu.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SMALL = ["--model=pythia-14m", "--topology=v5e:2x2", "--mesh=data:2,fsdp:2,tensor:1",
         "--batch=8", "--seq_len=128", "--set=model.num_layers=3", "--set=model.vocab_size=1024"]


def _env():
    return dict(os.environ, JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1",
                TF_CPP_MIN_LOG_LEVEL="3",
                PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")


def test_libtpu_is_installed():
    try:
        import libtpu  # noqa: F401
    except ImportError:
        pytest.fail("libtpu is not installed, so TPU compilation cannot be checked on this "
                    "machine: pip install 'pythia-jax[tpu]' (or pip install libtpu==0.0.52)")


@pytest.mark.slow
def test_small_train_step_compiles_for_v5e_2x2(tmp_path):
    out = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "aot_report.py"), *SMALL,
                           "--cost=check", f"--json={out}"], env=_env(), cwd=REPO, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "-> fits" in proc.stdout and "MFU" in proc.stdout, proc.stdout
    r = json.loads(out.read_text())
    assert r["chips"] == 4 and r["mesh"] == {"data": 2, "fsdp": 2, "tensor": 1}
    assert r["attention"] == "pallas" and r["scan_layers"] is True
    # the Pallas flash kernel went through Mosaic (forward and backward), not interpret mode
    assert r["mosaic_kernels"] >= 2
    # arguments hold the fp32 train state (params, Adam mu and nu), split at most 4 ways
    state_bytes = 12 * r["params"]
    args = r["memory"]["arguments_gib"] * 2**30
    assert state_bytes / 4 <= args <= state_bytes * 1.05 + 2**20
    assert r["memory"]["fits"] and 0 < r["memory"]["total_gib"] < r["memory"]["hbm_gib"]
    # compiler FLOPs (layer loop unrolled and extrapolated) agree with the analytic count
    assert 0.9 <= r["compiler_flops_per_step"] / r["model_flops_per_step"] <= 1.3, r
    assert r["estimated_step_s"] > 0 and 0 < r["mfu"] < 1
    # the extrapolation from 1- and 2-layer compiles reproduces the unrolled 3-layer step
    check = r["cost_check"]
    assert check["flops_ratio"] == pytest.approx(1.0, rel=0.01), check
    assert check["full_seconds"] > 0 and check["seconds_ratio"] == pytest.approx(1.0, rel=0.25)


@pytest.mark.slow
def test_step_that_cannot_fit_is_reported_as_not_fitting(tmp_path):
    # 4096 x 2048 tokens of 50,304 fp32 logits per step on 4 v5e chips: far beyond 16 GiB
    out = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "aot_report.py"),
                           "--model=pythia-14m", "--topology=v5e:2x2", "--mesh=data:4",
                           "--batch=4096", "--remat=none", "--cost=none", f"--json={out}"],
                          env=_env(), cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "DOES NOT FIT" in proc.stdout, proc.stdout
    m = json.loads(out.read_text())["memory"]
    assert m["fits"] is False and m["temporaries_gib"] > 16
