"""Checkpoints of the old QKV layout (`checkpoint.PARAM_LAYOUT` 1: `[.., d, N, 3, H]`) against the
current one (2: `[.., d, 3, N, H]`).

`tests/fixtures/param_layout1/` is a real training workdir (step 2: parameters and AdamW
moments) written by the layout-1 code, with the losses that code computed
(`tests/fixtures/make_param_layout1.py`). Its model has 3 heads, where both layouts have the same
shapes: only the `param_layout` field can tell them apart, and the losses show whether the
arrays were permuted.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO
from fixtures.make_param_layout1 import LAYOUT1, ROWS
from test_train import TINY, tiny_config, write_rows

from pythia_jax import checkpoint as ckpt_lib
from pythia_jax import train

FIXTURE = REPO / "tests" / "fixtures" / "param_layout1"
REF = json.loads((FIXTURE / "reference.json").read_text())


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("layout1")
    return write_rows(d / "rows", ROWS["n_rows"], ROWS["seq_len"], seed=ROWS["seed"])


def _workdir(tmp_path):
    w = tmp_path / "run"
    shutil.copytree(FIXTURE / ckpt_lib.CHECKPOINT_DIR, w / ckpt_lib.CHECKPOINT_DIR)
    return w


def _rows(data) -> np.ndarray:
    return np.asarray(np.memmap(data + ".bin", np.uint16, mode="r")[:8 * 17].reshape(8, 17),
                      np.int32)


def _losses(workdir) -> dict:
    out = {}
    for line in open(workdir / train.METRICS_FILE):
        r = json.loads(line)
        if r["split"] == "train":
            out[str(r["step"])] = r["loss"]
    return out


def test_the_fixture_is_layout_1():
    cfg = json.loads((FIXTURE / "checkpoints" / "2" / ckpt_lib.CONFIG_NAME).read_text())
    assert "param_layout" not in cfg and cfg["num_heads"] == 3
    assert ckpt_lib.param_layout_of(str(FIXTURE / "checkpoints" / "2" / ckpt_lib.CONFIG_NAME)) == 1


def test_layout1_model_dir_loads_as_the_old_code_computed(data):
    model = ckpt_lib.load_model(str(FIXTURE / "checkpoints" / "2"))
    assert model.layers.attention.query_key_value.kernel[...].shape == (2, 24, 3, 3, 8)
    rows = _rows(data)
    loss = float(train.cross_entropy(model(jnp.asarray(rows[:, :-1])), rows[:, 1:]))
    assert loss == pytest.approx(REF["step2_loss_rows_0_8"], rel=1e-6)


def test_the_layout_field_decides_not_the_shapes(tmp_path, data):
    """The same arrays read as layout 2 (the field set by hand) load without complaint (same
    shapes, checksums intact) but are a different model: the field is what makes the loss
    right above."""
    w = _workdir(tmp_path)
    cfg_path = w / "checkpoints" / "2" / ckpt_lib.CONFIG_NAME
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "param_layout": 2}))
    model = ckpt_lib.load_model(str(w / "checkpoints" / "2"))
    rows = _rows(data)
    loss = float(train.cross_entropy(model(jnp.asarray(rows[:, :-1])), rows[:, 1:]))
    assert abs(loss - REF["step2_loss_rows_0_8"]) > 1e-3


def test_layout1_workdir_resumes_with_the_old_codes_losses(tmp_path, data):
    """Training resumes from the layout-1 step (parameters and both AdamW moments permuted): the
    losses of steps 3 and 4 are the ones the layout-1 code logged on its straight run, and the
    new step directory is written in layout 2."""
    w = _workdir(tmp_path)
    summary = train.train(tiny_config(data, **{**LAYOUT1, "checkpoint.save_final": True}), str(w))
    assert (summary["start_step"], summary["end_step"]) == (2, 4)
    got = _losses(w)
    for step in ("3", "4"):
        assert got[step] == pytest.approx(REF["train_loss"][step], rel=1e-5, abs=1e-6), step
    new_cfg = w / "checkpoints" / "4" / ckpt_lib.CONFIG_NAME
    assert ckpt_lib.param_layout_of(str(new_cfg)) == ckpt_lib.PARAM_LAYOUT == 2
    # and the layout-2 step reloads as the model that training ended with
    final = jax.tree.map(np.asarray, summary["state"].params)
    model = ckpt_lib.load_model(str(w / "checkpoints" / "4"))
    np.testing.assert_array_equal(model.layers.attention.query_key_value.kernel[...],
                                  final["layers"]["attention"]["query_key_value"]["kernel"])


def test_layout1_workdir_resumes_on_eight_devices(tmp_path, data):
    """The same resume by `scripts/train.py` on 8 fake CPU devices (data 4 x fsdp 2: the
    permuted arrays restored straight onto their shardings): the old code's losses to fp32
    rounding of another reduction order."""
    w = _workdir(tmp_path)
    flags = []
    for k, v in {**TINY, **LAYOUT1, "data.path": data, "mesh.shape.data": 4,
                 "mesh.shape.fsdp": 2}.items():
        if isinstance(v, tuple):
            v = "(" + ", ".join(str(x) for x in v) + ("," if len(v) == 1 else "") + ")"
        flags.append(f"--config.{k}={v}")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    p = subprocess.run([sys.executable, "scripts/train.py", "--config=configs/smoke.py",
                        f"--workdir={w}", *flags], cwd=REPO, env=env, text=True,
                       capture_output=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "(step 2) on 8 device(s)" in p.stdout + p.stderr
    got = _losses(w)
    for step in ("3", "4"):
        assert got[step] == pytest.approx(REF["train_loss"][step], rel=1e-5), step


def test_unknown_layout_is_refused_naming_the_file_and_field(tmp_path):
    w = _workdir(tmp_path)
    cfg_path = w / "checkpoints" / "2" / ckpt_lib.CONFIG_NAME
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "param_layout": 7}))
    with pytest.raises(ckpt_lib.CheckpointDirError) as e:
        ckpt_lib.load_model(str(w / "checkpoints" / "2"))
    assert str(cfg_path) in str(e.value) and "'param_layout' is 7" in str(e.value)
