"""The training stream as a research object (pythia_jax.research.stream): which iteration read
a row, a batch's rows, the first checkpoint that saw a row, and step_loss_delta against torch."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from hf_utils import tiny_hf_model  # noqa: E402

import pythia_jax  # noqa: E402
from pythia_jax import train  # noqa: E402
from pythia_jax.configs import pythia as pythia_configs  # noqa: E402
from pythia_jax.data.indexed import write_indexed_dataset  # noqa: E402
from pythia_jax.data.order import PythiaOrder  # noqa: E402
from pythia_jax.research import stream  # noqa: E402

V = 128
B, T = 4, 16  # a small stream: 4 rows of 17 tokens per step


def test_rows_steps_and_checkpoints():
    assert stream.batch_index(0) == 0 and stream.batch_index(1023) == 0
    assert stream.batch_index(1024) == 1
    assert stream.batch_rows(3) == range(3072, 4096)
    assert stream.step_of_row(1023) == 1 and stream.step_of_row(1024) == 2
    assert stream.first_checkpoint_with(0) == 1
    assert stream.first_checkpoint_with(1024 * 3) == 4  # update 4 used it; step4 is saved
    assert stream.first_checkpoint_with(1024 * 4) == 8
    assert stream.first_checkpoint_with(1024 * 600) == 1000
    assert stream.first_checkpoint_with(1024 * 143000 - 1) == 143000
    assert stream.first_checkpoint_with(1024 * 143000) is None
    assert stream.batch_index(9, batch_size=4) == 2 and stream.batch_rows(2, 4) == range(8, 12)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="row"):
            stream.batch_index(bad)
    with pytest.raises(ValueError, match="batch_size"):
        stream.batch_rows(1, batch_size=0)


def test_the_values_docs_research_md_shows():
    assert stream.batch_index(5000) == 4
    assert stream.step_of_row(5000) == 5
    assert stream.first_checkpoint_with(5000) == 8
    assert stream.batch_rows(4) == range(4096, 5120)


def test_checkpoint_steps_are_pythias_save_schedule():
    c = pythia_configs.get_config("160m")
    assert list(stream.PYTHIA_CHECKPOINT_STEPS) == train.checkpoint_steps(
        c.train.num_steps, c.checkpoint.extra_steps, every=c.checkpoint.every)
    assert len(stream.PYTHIA_CHECKPOINT_STEPS) == 154


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("stream")
    rows = np.random.RandomState(0).randint(2, V, (5 * B, T + 1))
    write_indexed_dataset(d / "doc", list(rows), dtype=np.uint16)
    hfs = [tiny_hf_model(s, init_scale=0.1, vocab_size=V, max_position_embeddings=64)
           for s in (0, 1)]
    models = []
    for k, hf in enumerate(hfs):
        hf.save_pretrained(d / f"m{k}")
        models.append(pythia_jax.from_pretrained(d / f"m{k}"))
    return dict(prefix=str(d / "doc"), rows=rows, hfs=hfs, models=models)


def _torch_loss(hf, rows):
    x = torch.as_tensor(rows)
    with torch.no_grad():
        logits = hf(x[:, :-1]).logits.float()
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, V), x[:, 1:].reshape(-1),
                                            reduction="none").reshape(len(rows), -1)
    return float(nll.mean()), nll.mean(-1).numpy()


def test_rows_of_a_batch_are_what_training_reads(setup):
    order = PythiaOrder(setup["prefix"], batch_size=B, seq_len=T)
    for k in range(5):
        np.testing.assert_array_equal(order.batch(k), setup["rows"][list(stream.batch_rows(k, B))])


def test_step_loss_delta_against_torch(setup):
    before, after = setup["models"]
    step = 3  # update 3 trains on iteration 2's batch: rows 8..11
    res = stream.step_loss_delta(before, after, setup["prefix"], step, batch_size=B, seq_len=T)
    assert res.rows == range(2 * B, 3 * B)
    batch = setup["rows"][2 * B: 3 * B]
    lb, rb = _torch_loss(setup["hfs"][0], batch)
    la, ra = _torch_loss(setup["hfs"][1], batch)
    assert res.loss_before == pytest.approx(lb, rel=1e-5)
    assert res.loss_after == pytest.approx(la, rel=1e-5)
    assert res.delta == pytest.approx(la - lb, rel=1e-4, abs=1e-6)
    np.testing.assert_allclose(res.row_loss_before, rb, rtol=1e-5)
    np.testing.assert_allclose(res.row_loss_after, ra, rtol=1e-5)
    # not the neighbouring batch
    assert res.loss_before != pytest.approx(_torch_loss(setup["hfs"][0],
                                                        setup["rows"][3 * B: 4 * B])[0], rel=1e-5)
    with pytest.raises(ValueError, match="step: expected >= 1"):
        stream.step_loss_delta(before, after, setup["prefix"], 0, batch_size=B, seq_len=T)
    with pytest.raises(IndexError, match="past the end"):
        stream.step_loss_delta(before, after, setup["prefix"], 6, batch_size=B, seq_len=T)
