"""pythia_jax.train: loss, train step (accumulation, bf16, non-finite skip), the loop, its logs and
checkpoints, from_pretrained on a workdir, bad inputs. (Resume across processes and device
counts: test_train_resume.py.)"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO
from pythia_jax import checkpoint as ckpt_lib
from pythia_jax import optim, train
from pythia_jax.configs import smoke

VOCAB = 256


def write_rows(prefix, n_rows: int, seq_len: int, *, seed: int = 0, row_len: int | None = None):
    """A learnable pre-shuffled-style dataset: rows of arithmetic sequences mod VOCAB."""
    from pythia_jax.data.indexed import write_indexed_dataset
    rng = np.random.RandomState(seed)
    n = (seq_len + 1) if row_len is None else row_len
    start = rng.randint(0, VOCAB, n_rows)[:, None]
    stride = rng.randint(1, 4, n_rows)[:, None]
    rows = ((start + stride * np.arange(n)) % VOCAB).astype(np.uint16)
    write_indexed_dataset(prefix, list(rows), dtype=np.uint16)
    return str(prefix)


TINY = {
    "name": "tiny",
    "model.hidden_size": 32, "model.num_layers": 2, "model.num_heads": 2,
    "model.intermediate_size": 128, "model.vocab_size": VOCAB,
    "model.dtype": "float32", "model.scan_layers": False,
    "data.build_from_text": "", "data.eval_path": "",
    "train.num_steps": 6, "train.batch_size": 8, "train.seq_len": 16, "train.log_every": 2,
    "train.eval_every": 0, "train.progress_bar": False,
    "optim.peak_lr": 1e-2, "optim.min_lr": 1e-3, "optim.warmup_steps": 2,
    "optim.decay_steps": 100,
    "checkpoint.extra_steps": (0, 1, 2, 4), "checkpoint.every": 0,
    "checkpoint.rolling_every": 0, "checkpoint.save_final": True,
    "sample.max_new_tokens": 0,
}


def set_fields(c, values: dict):
    """`c` with each dotted field of `values` ("train.seq_len": 16, ...) set."""
    for key, value in values.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def tiny_config(data_path: str, **overrides):
    """configs/smoke.py shrunk to a 2-layer, width-32, 256-token model on `data_path`."""
    return set_fields(smoke.get_config(), {**TINY, "data.path": str(data_path), **overrides})


def snapshot(root) -> dict:
    """{relative path: (kind, size, mtime_ns, sha256)} for everything under root."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            p = os.path.join(dirpath, d)
            out[os.path.relpath(p, root)] = ("dir",)
        for f in filenames:
            p = os.path.join(dirpath, f)
            st = os.stat(p)
            digest = hashlib.sha256(open(p, "rb").read()).hexdigest()
            out[os.path.relpath(p, root)] = ("file", st.st_size, st.st_mtime_ns, digest)
    return out


def _flat(tree) -> dict:
    return {jax.tree_util.keystr(p): np.asarray(jax.device_get(x))
            for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.fixture(scope="module")
def rows16(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    return write_rows(d / "rows", 200, 16)


def _batch(setup, rows: np.ndarray) -> dict:
    rows = np.asarray(rows, np.int32)
    return {"inputs": jax.device_put(rows[:, :-1], setup.batch_sharding),
            "targets": jax.device_put(rows[:, 1:], setup.batch_sharding)}


# ------------------------------------------------------------------------------------------------
def test_cross_entropy_is_fp32_mean_over_the_full_padded_vocab():
    rng = np.random.RandomState(0)
    logits = rng.standard_normal((2, 3, 300)).astype(np.float32) * 3
    logits[..., 277:] += 4.0  # padded rows (never targets) still take part in the softmax
    targets = rng.randint(0, 277, (2, 3))
    x = logits.astype(np.float64)
    lse = np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1)) + x.max(-1)
    want = np.mean(lse - np.take_along_axis(x, targets[..., None], -1)[..., 0])
    got = train.cross_entropy(jnp.asarray(logits), jnp.asarray(targets))
    assert got.dtype == jnp.float32
    assert float(got) == pytest.approx(want, rel=1e-6)
    x_real = x[..., :277]
    lse_real = np.log(np.exp(x_real).sum(-1))
    truncated = np.mean(lse_real - np.take_along_axis(x_real, targets[..., None], -1)[..., 0])
    assert abs(float(got) - truncated) > 0.1  # a loss over the real 50277 ids only would differ
    got16 = train.cross_entropy(jnp.asarray(logits, jnp.bfloat16), jnp.asarray(targets))
    assert got16.dtype == jnp.float32


def test_gradient_accumulation_matches_the_full_batch(rows16):
    from pythia_jax.data.order import PythiaOrder
    rows = PythiaOrder(rows16, batch_size=8, seq_len=16).batch(0)
    c1 = tiny_config(rows16)
    c4 = tiny_config(rows16, **{"train.grad_accum_steps": 4})
    c4m = tiny_config(rows16, **{"train.microbatch_per_device": 2})
    mesh = train.make_mesh(c1)
    state, s1 = train.create_train_state(c1, mesh)
    _, s4 = train.create_train_state(c4, mesh, init=False)
    assert (s1.grad_accum, s4.grad_accum) == (1, 4)
    assert train.create_train_state(c4m, mesh, init=False)[1].grad_accum == 4
    # a cap: a shard with fewer rows than microbatch_per_device takes them in one microbatch
    c1m = tiny_config(rows16, **{"train.microbatch_per_device": 16})
    assert train.create_train_state(c1m, mesh, init=False)[1].grad_accum == 1
    with pytest.raises(train.TrainConfigError, match="microbatch_per_device=3: must divide the 8"):
        train.create_train_state(tiny_config(rows16, **{"train.microbatch_per_device": 3}),
                                 mesh, init=False)
    host = jax.device_get(state)
    a, m_a = train.make_train_step(s1, donate=False)(jax.device_put(host, s1.state_shardings),
                                                     _batch(s1, rows))
    b, m_b = train.make_train_step(s4, donate=False)(jax.device_put(host, s4.state_shardings),
                                                     _batch(s4, rows))
    assert float(m_b["loss"]) == pytest.approx(float(m_a["loss"]), rel=1e-6)
    assert float(m_b["grad_norm"]) == pytest.approx(float(m_a["grad_norm"]), rel=1e-5)
    # the first update has lr 0; Adam's first moment is (1 - b1) * clipped gradient
    fa, fb = _flat(a.opt_state), _flat(b.opt_state)
    for k in fa:
        if fa[k].dtype == bool:
            assert np.array_equal(fa[k], fb[k]), k
            continue
        fa[k], fb[k] = fa[k].astype(np.float64), fb[k].astype(np.float64)
        scale = max(float(np.max(np.abs(fa[k]))), 1e-30)
        assert float(np.max(np.abs(fa[k] - fb[k]))) <= 1e-5 * scale, k
    with pytest.raises(train.TrainConfigError, match="grad_accum_steps"):
        train.create_train_state(tiny_config(rows16, **{"train.grad_accum_steps": 3}), mesh,
                                 init=False)


def test_grad_reduce_modes_on_one_device_and_bad_values(rows16):
    """train.grad_reduce: "auto" resolves by the mesh (fsdp keeps the sharded accumulator);
    on one device "step" and "microbatch" give the same loss and gradients (the 8-device
    comparison and the HLO check: test_sharding.py); a bad value names the field."""
    from jax.sharding import AbstractMesh
    from pythia_jax.data.order import PythiaOrder
    from pythia_jax.sharding import logical_rules

    axes = ("data", "fsdp", "tensor")
    assert train.resolve_grad_reduce("auto", AbstractMesh((8, 1, 1), axes)) == "step"
    assert train.resolve_grad_reduce("auto", AbstractMesh((2, 2, 2), axes)) == "microbatch"
    assert train.resolve_grad_reduce("step", AbstractMesh((1, 8, 1), axes)) == "step"
    rows = PythiaOrder(rows16, batch_size=8, seq_len=16).batch(0)
    out = {}
    for mode in ("microbatch", "step"):
        cfg = tiny_config(rows16, **{"train.grad_accum_steps": 4, "train.grad_reduce": mode})
        mesh = train.make_mesh(cfg)
        state, setup = train.create_train_state(cfg, mesh)
        assert (setup.grad_accum, setup.grad_reduce) == (4, mode)
        b = _batch(setup, rows)

        def grads(params, inputs, targets, setup=setup, mesh=mesh):
            with logical_rules(mesh):
                return train._grads(setup, params, inputs, targets)

        out[mode] = jax.device_get(jax.jit(grads)(state.params, b["inputs"], b["targets"]))
    (l_mb, g_mb), (l_st, g_st) = out["microbatch"], out["step"]
    assert float(l_st) == pytest.approx(float(l_mb), rel=1e-6)
    for (k, x), y in zip(_flat(g_st).items(), _flat(g_mb).values()):
        scale = max(float(np.max(np.abs(y))), 1e-30)
        assert float(np.max(np.abs(x - y))) <= 1e-5 * scale, k
    with pytest.raises(train.TrainConfigError, match="train.grad_reduce"):
        train.create_train_state(tiny_config(rows16, **{"train.grad_reduce": "layer"}), mesh,
                                 init=False)


def test_bf16_compute_keeps_fp32_master_weights(rows16):
    from pythia_jax.data.order import PythiaOrder
    rows = PythiaOrder(rows16, batch_size=8, seq_len=16).batch(0)
    c32 = tiny_config(rows16)
    c16 = tiny_config(rows16, **{"model.dtype": "bfloat16"})
    mesh = train.make_mesh(c32)
    state, s32 = train.create_train_state(c32, mesh)
    _, s16 = train.create_train_state(c16, mesh, init=False)
    host = jax.device_get(state)
    _, m32 = train.make_train_step(s32, donate=False)(jax.device_put(host, s32.state_shardings),
                                                      _batch(s32, rows))
    st16, m16 = train.make_train_step(s16, donate=False)(
        jax.device_put(host, s16.state_shardings), _batch(s16, rows))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(st16.params))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(st16.opt_state)
               if jnp.issubdtype(x.dtype, jnp.floating))
    assert m16["loss"].dtype == jnp.float32
    l32, l16 = float(m32["loss"]), float(m16["loss"])
    assert np.isfinite(l16) and l16 != l32 and abs(l16 - l32) < 0.05 * l32
    with pytest.raises(train.TrainConfigError, match="param_dtype"):
        train.validate_config(tiny_config(rows16, **{"model.param_dtype": "bfloat16"}))


def test_nonfinite_gradients_skip_the_step_and_are_counted(rows16):
    from pythia_jax.data.order import PythiaOrder
    rows = PythiaOrder(rows16, batch_size=8, seq_len=16).batch(0)
    c = tiny_config(rows16)
    mesh = train.make_mesh(c)
    state, setup = train.create_train_state(c, mesh)
    step = train.make_train_step(setup, donate=False)
    state, m = step(state, _batch(setup, rows))
    assert int(m["skipped"]) == 0 and np.isfinite(float(m["loss"]))
    lr_next = float(optim.current_lr(state.opt_state, setup.schedule))
    host = jax.tree.map(np.array, jax.device_get(state))  # writable copies
    host.params["final_layer_norm"]["scale"][0] = np.nan  # every logit becomes NaN
    bad = jax.device_put(host, setup.state_shardings)
    after, m = step(bad, _batch(setup, rows))
    assert not np.isfinite(float(m["loss"]))
    assert int(m["skipped"]) == 1 and int(m["nonfinite_total"]) == 1
    assert int(after.step) == 2  # the step (and the data position) still advance
    for k, v in _flat(bad.params).items():
        assert np.array_equal(v, _flat(after.params)[k], equal_nan=True), k
    assert float(optim.current_lr(after.opt_state, setup.schedule)) == lr_next


def _read_jsonl(path):
    return [json.loads(line) for line in open(path)]


def test_loop_logs_checkpoints_resumes_and_loads(tmp_path, rows16):
    import pythia_jax

    import logging

    class Lines(logging.Handler):  # status lines are records of `pythia_jax.train`, not prints
        def emit(self, record):
            lines.append(record.getMessage())

    lines = []
    workdir = tmp_path / "run"
    c = tiny_config(rows16)
    logging.getLogger("pythia_jax.train").addHandler(handler := Lines())
    try:
        summary = train.train(c, str(workdir))
    finally:
        logging.getLogger("pythia_jax.train").removeHandler(handler)
    assert summary["end_step"] == 6 and not summary["preempted"]
    assert lines[0].startswith("initialized tiny"), lines
    assert [l.split(":")[0] for l in lines if l.startswith("step ")] == [
        "step 2", "step 4", "step 6"], lines

    # logs: JSONL (every log_every steps) and TensorBoard event files
    recs = [r for r in _read_jsonl(workdir / train.METRICS_FILE) if r["split"] == "train"]
    assert [r["step"] for r in recs] == [2, 4, 6]
    for r in recs:
        for key in ("loss", "lr", "grad_norm", "tokens_per_sec", "mfu", "nonfinite_total"):
            assert key in r, key
        assert r["tokens_per_sec"] > 0 and r["nonfinite_total"] == 0
    # the LR logged at step 2 is the one update 2 used (count 1 of the NeoX schedule)
    assert recs[0]["lr"] == pytest.approx(optim.pythia_lr(1, 1e-2, 1e-3, 2, 100), rel=1e-6)
    assert recs[-1]["loss"] < recs[0]["loss"]
    events = list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0

    # checkpoints: the configured schedule (0, 1, 2, 4) plus the final step
    ckdir = workdir / ckpt_lib.CHECKPOINT_DIR
    assert sorted(int(p.name) for p in ckdir.iterdir() if p.name.isdigit()) == [0, 1, 2, 4, 6]
    assert ckpt_lib.resolve_checkpoint_dir(workdir) == str(ckdir / "6")
    assert ckpt_lib.resolve_checkpoint_dir(ckdir / "2") == str(ckdir / "2")
    assert ckpt_lib.resolve_checkpoint_dir(tmp_path / "nothing-here") is None

    # every step directory is a model directory: from_pretrained(workdir) = the latest step
    final = _flat(summary["state"].params)
    model = pythia_jax.from_pretrained(str(workdir))
    from flax import nnx
    loaded = _flat(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    assert loaded.keys() == final.keys()
    assert all(np.array_equal(loaded[k], final[k]) for k in final)
    m0 = ckpt_lib.load_model(str(ckdir / "0"))
    emb0 = np.asarray(m0.embed_in.embedding[...])
    assert not np.array_equal(emb0, final["['embed_in']['embedding']"])
    assert emb0.std() == pytest.approx((2 / (5 * 32)) ** 0.5, rel=0.05)  # small_init, d=32
    logits = model(jnp.zeros((1, 4), jnp.int32))
    assert logits.shape == (1, 4, VOCAB)

    # running again resumes by itself: nothing left to do at num_steps; more steps continue
    again = train.train(c, str(workdir))
    assert (again["start_step"], again["end_step"]) == (6, 6)
    more = train.train(tiny_config(rows16, **{"train.num_steps": 8}), str(workdir))
    assert (more["start_step"], more["end_step"]) == (6, 8)
    recs = [r for r in _read_jsonl(workdir / train.METRICS_FILE) if r["split"] == "train"]
    assert [r["step"] for r in recs] == [2, 4, 6, 8]  # appended, never truncated

    # a workdir trained with another model refuses a different config, changing nothing
    before = snapshot(workdir)
    with pytest.raises(train.TrainError, match="hidden_size"):
        train.train(tiny_config(rows16, **{"train.num_steps": 10, "model.hidden_size": 64}),
                    str(workdir))
    assert snapshot(workdir) == before


def test_rolling_checkpoint_keeps_only_the_latest(tmp_path, rows16):
    workdir = tmp_path / "roll"
    c = tiny_config(rows16, **{"train.num_steps": 7, "checkpoint.extra_steps": (0,),
                               "checkpoint.rolling_every": 2, "checkpoint.keep_rolling": 1})
    train.train(c, str(workdir))
    ckdir = workdir / ckpt_lib.CHECKPOINT_DIR
    assert sorted(int(p.name) for p in ckdir.iterdir() if p.name.isdigit()) == [0, 7]


# ------------------------------------------------------------------------------------------------
# Bad input: clear errors, and the workdir is left exactly as it was
def _populated_workdir(tmp_path) -> pathlib.Path:
    w = tmp_path / "existing"
    (w / "checkpoints" / "notes").mkdir(parents=True)
    (w / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n')
    (w / "checkpoints" / "notes" / "keep.txt").write_text("precious")
    return w


def test_missing_data_file(tmp_path):
    w = _populated_workdir(tmp_path)
    before = snapshot(w)
    missing = tmp_path / "nowhere" / "document"
    with pytest.raises(train.TrainConfigError) as e:
        train.train(tiny_config(missing), str(w))
    msg = str(e.value)
    assert "config.data.path" in msg and str(missing) + ".bin" in msg and "no such file" in msg
    assert snapshot(w) == before
    assert not (tmp_path / "fresh").exists()
    with pytest.raises(train.TrainConfigError):
        train.train(tiny_config(missing), str(tmp_path / "fresh"))
    assert not (tmp_path / "fresh").exists()  # not even created


def test_items_that_are_not_seq_len_plus_one(tmp_path):
    w = _populated_workdir(tmp_path)
    before = snapshot(w)
    short = write_rows(tmp_path / "short", 64, 16, row_len=16)  # 16 tokens, expected 17
    with pytest.raises(train.TrainConfigError) as e:
        train.train(tiny_config(short), str(w))
    msg = str(e.value)
    assert "config.data.path" in msg and "seq_len + 1 = 17" in msg and "has 16 tokens" in msg
    # a raw (one item per document) file: items of varying length
    from pythia_jax.data.indexed import write_indexed_dataset
    docs = [np.arange(n, dtype=np.uint16) % VOCAB for n in (17, 40, 5, 17)]
    write_indexed_dataset(tmp_path / "docs", docs, dtype=np.uint16)
    with pytest.raises(train.TrainConfigError, match="seq_len"):
        train.train(tiny_config(tmp_path / "docs", **{"train.batch_size": 2,
                                                      "train.num_steps": 1}), str(w))
    assert snapshot(w) == before


def test_corrupt_checkpoint_directory(tmp_path, rows16):
    import pythia_jax

    w = tmp_path / "corrupt"
    c = tiny_config(rows16, **{"train.num_steps": 2})
    train.train(c, str(w))
    step2 = w / ckpt_lib.CHECKPOINT_DIR / "2"
    for f in (step2 / ckpt_lib.PARAMS_DIR).rglob("*"):
        if f.is_file():
            f.write_bytes(b"not an orbax file")
    before = snapshot(w)
    with pytest.raises(train.TrainError) as e:
        train.train(tiny_config(rows16, **{"train.num_steps": 4}), str(w))
    msg = str(e.value)
    assert str(step2) in msg and "corrupt" in msg and "Nothing was changed" in msg
    assert snapshot(w) == before
    with pytest.raises(ckpt_lib.CheckpointDirError, match=str(step2 / ckpt_lib.PARAMS_DIR)):
        pythia_jax.from_pretrained(str(w))
    # a step whose bookkeeping item is gone is also refused (and kept)
    w2 = tmp_path / "no_meta"
    train.train(c, str(w2))
    meta = w2 / ckpt_lib.CHECKPOINT_DIR / "2" / "meta"
    for f in meta.iterdir():
        f.unlink()
    before = snapshot(w2)
    with pytest.raises(train.TrainError, match="corrupt or incomplete"):
        train.train(tiny_config(rows16, **{"train.num_steps": 4}), str(w2))
    assert snapshot(w2) == before


# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_loss_goes_down_on_the_smoke_config(tmp_path):
    """configs/smoke.py as shipped (bundled corpus tokenized on first use), 40 steps."""
    c = smoke.get_config()
    c.train.num_steps = 40
    c.train.log_every = 10
    c.train.progress_bar = False
    c.train.eval_every = 0
    c.checkpoint.extra_steps = (0,)
    c.checkpoint.rolling_every = 0
    c.sample.max_new_tokens = 0
    w = tmp_path / "smoke"
    summary = train.train(c, str(w))
    losses = [h["loss"] for h in summary["history"]]
    assert len(losses) == 4
    assert losses[0] > 9.5                 # ~ln(50304) = 10.8 at the start
    assert losses[-1] < losses[0] - 1.5    # visibly lower after 40 steps
    assert "eval_loss" in summary and summary["eval_loss"] < losses[0]
    # the corpus was tokenized with the project's preprocessing into rows of seq_len + 1
    from pythia_jax.data.indexed import MMapIndexedDataset
    ds = MMapIndexedDataset(str(w / "data" / "tinyshakespeare_rows"))
    assert set(np.unique(ds.sizes)) == {c.train.seq_len + 1}
    assert len(ds) > c.train.num_steps * c.train.batch_size
    assert sorted(int(p.name) for p in (w / "checkpoints").iterdir()) == [0, 40]


def test_setups_are_built_per_call_and_reused_only_when_passed(rows16, tmp_path):
    """No hidden cache: each `create_train_state` builds its own setup (and compiled step); a
    setup handed back (`setup=`, e.g. a summary's) is reused as is, and one built for another
    config is refused by name."""
    c = tiny_config(rows16, **{"train.num_steps": 2, "checkpoint.extra_steps": ()})
    mesh = train.make_mesh(c)
    _, s1 = train.create_train_state(c, mesh, init=False)
    _, s2 = train.create_train_state(c, mesh, init=False)
    assert s1 is not s2 and train.make_train_step(s1) is not train.make_train_step(s2)
    _, same = train.create_train_state(c, mesh, init=False, setup=s1)
    assert same is s1
    summary = train.train(c, tmp_path / "a", setup=s1)
    assert summary["setup"] is s1 and summary["end_step"] == 2
    other = tiny_config(rows16, **{"optim.peak_lr": 5e-3})
    with pytest.raises(train.TrainConfigError, match="setup: built for another model, "
                                                     "optimizer, seed, mesh or batch layout"):
        train.create_train_state(other, mesh, setup=s1)
    with pytest.raises(train.TrainConfigError, match="setup: built for another"):
        train.train(other, tmp_path / "b", setup=s1)
    assert not (tmp_path / "b").exists()  # refused before anything is written


_NO_IMPORT_SWAP = r"""
import builtins, sys
sys.path.insert(0, "tests")
from pythia_jax import train      # everything train needs, imported up front
from test_train import tiny_config
import etils.epy
opened = []
real = etils.epy.lazy_imports
def recording(*a, **k):           # grain and etils.enp open this block while they import
    opened.append(sys._getframe(2).f_code.co_filename)
    return real(*a, **k)
etils.epy.lazy_imports = recording
original_import = builtins.__import__
train.train(tiny_config(sys.argv[1], **{"train.num_steps": 2}), sys.argv[2])
assert builtins.__import__ is original_import
print("OPENED", opened)
"""


def test_no_import_swaps_builtins_import_while_saves_are_in_flight(tmp_path, rows16):
    """etils' `lazy_imports()` (grain opens one while it imports) replaces `builtins.__import__`
    for every thread; opened mid-run, an orbax save thread's `from math import log` got a
    LazyModule and the save failed (Python 3.12 CI). Training imports all of that before its
    first save: a fresh process records no such block during `train.train`."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    p = subprocess.run([sys.executable, "-c", _NO_IMPORT_SWAP, rows16, str(tmp_path / "w")],
                       cwd=REPO, env=env, text=True, capture_output=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "OPENED []" in p.stdout, p.stdout[-2000:]
