"""from_pretrained with HF's keywords against a local HF cache (huggingface_hub's layout, made
here: no network), Pythia names, dtype aliases, keyword errors; GPTNeoX.from_pretrained /
save_pretrained (generation_config.json read by transformers) / generate."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import pythia_jax  # noqa: E402
from pythia_jax import GPTNeoX, pretrained  # noqa: E402
from hf_utils import tiny_hf_model  # noqa: E402

HASH_MAIN = "a" * 40
HASH_STEP = "b" * 40


def _leaves(model):
    return [np.asarray(x) for x in jax.tree.leaves(model)]


def _same(a, b):
    la, lb = _leaves(a), _leaves(b)
    return len(la) == len(lb) and all(x.dtype == y.dtype and np.array_equal(x, y)
                                      for x, y in zip(la, lb))


def _snapshot(cache, repo, ref, commit, src_dir):
    """huggingface_hub's cache layout: models--OWNER--NAME/{refs/REF, snapshots/COMMIT/…}."""
    store = cache / ("models--" + repo.replace("/", "--"))
    (store / "refs").mkdir(parents=True, exist_ok=True)
    (store / "refs" / ref).write_text(commit)
    shutil.copytree(src_dir, store / "snapshots" / commit)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hfconv")
    main, step, bins = root / "main", root / "step", root / "bins"
    tiny_hf_model(seed=0).save_pretrained(main)
    tiny_hf_model(seed=1).save_pretrained(step)
    tiny_hf_model(seed=2).save_pretrained(bins, safe_serialization=False)
    cache = root / "cache"
    _snapshot(cache, "EleutherAI/pythia-70m", "main", HASH_MAIN, main)
    _snapshot(cache, "EleutherAI/pythia-70m", "step3000", HASH_STEP, step)
    _snapshot(cache, "someone/bin-only", "main", HASH_MAIN, bins)
    return dict(main=main, step=step, bins=bins, cache=cache)


def test_hub_id_from_a_prefilled_cache_equals_the_directory(dirs):
    kw = dict(cache_dir=dirs["cache"], local_files_only=True)
    ref = pythia_jax.from_pretrained(dirs["main"])
    assert _same(pythia_jax.from_pretrained("EleutherAI/pythia-70m", **kw), ref)
    step = pythia_jax.from_pretrained("EleutherAI/pythia-70m", revision="step3000", **kw)
    assert _same(step, pythia_jax.from_pretrained(dirs["step"])) and not _same(step, ref)
    # a repo with PyTorch .bin weights only (the second snapshot pattern)
    assert _same(pythia_jax.from_pretrained("someone/bin-only", **kw),
                 pythia_jax.from_pretrained(dirs["bins"]))


def test_pythia_names_resolve_to_eleutherai_hub_ids(dirs, tmp_path, monkeypatch):
    assert pretrained.resolve_source("pythia-70m") == "EleutherAI/pythia-70m"
    assert pretrained.resolve_source("pythia-160m-deduped") == "EleutherAI/pythia-160m-deduped"
    assert pretrained.resolve_source("pythia-99m") == "pythia-99m"  # no such Pythia
    model = pythia_jax.from_pretrained("pythia-70m", cache_dir=dirs["cache"],
                                       local_files_only=True)
    assert _same(model, pythia_jax.from_pretrained(dirs["main"]))
    # a local path of that name wins
    monkeypatch.chdir(tmp_path)
    shutil.copytree(dirs["step"], tmp_path / "pythia-70m")
    assert pretrained.resolve_source("pythia-70m") == "pythia-70m"
    assert _same(pythia_jax.from_pretrained("pythia-70m"), pythia_jax.from_pretrained(dirs["step"]))


def test_not_cached_with_local_files_only_is_a_clear_error(dirs):
    with pytest.raises(OSError, match=r"'EleutherAI/pythia-1b' \(revision main\) is not in the "
                                      r"HF cache .*local_files_only=True"):
        pythia_jax.from_pretrained("EleutherAI/pythia-1b", cache_dir=dirs["cache"],
                                   local_files_only=True)
    with pytest.raises(OSError, match="revision step7"):
        pythia_jax.from_pretrained("pythia-70m", revision="step7", cache_dir=dirs["cache"],
                                   local_files_only=True)


def test_unknown_keyword_names_the_accepted_ones_and_overrides_still_work(dirs):
    with pytest.raises(TypeError) as e:
        pythia_jax.from_pretrained(dirs["main"], cach_dir="x")
    msg = str(e.value)
    assert "['cach_dir']" in msg
    for name in pretrained.KEYWORDS + pretrained.EXECUTION_FIELDS:
        assert name in msg
    with pytest.raises(TypeError, match="hidden_size"):  # an architecture field is no override
        pythia_jax.from_pretrained(dirs["main"], hidden_size=32)
    m = pythia_jax.from_pretrained(dirs["main"], scan_layers=False, remat="full")
    assert (m.config.scan_layers, m.config.remat) == (False, "full")
    # every execution field is a ModelConfig field
    assert set(pretrained.EXECUTION_FIELDS) <= set(pythia_jax.ModelConfig.__dataclass_fields__)


def test_dtype_aliases(dirs, tmp_path):
    for dtype, want in [(None, "float32"), ("bf16", "bfloat16"), ("fp16", "float16"),
                        ("fp32", "float32"), ("BF16", "bfloat16"), (np.float16, "float16"),
                        (jnp.bfloat16, "bfloat16"), (torch.float16, "float16"),
                        ("torch.bfloat16", "bfloat16")]:
        m = pythia_jax.from_pretrained(dirs["main"], dtype=dtype)
        assert m.config.param_dtype == want, dtype
        assert m.embed_in.embedding[...].dtype == jnp.dtype(want)
    tiny_hf_model(seed=0).half().save_pretrained(tmp_path / "fp16")
    assert pythia_jax.from_pretrained(tmp_path / "fp16", dtype="auto").config.param_dtype == \
        "float16"
    assert pythia_jax.from_pretrained(tmp_path / "fp16").config.param_dtype == "float32"
    for bad in ("int8", "fp8", np.int32):
        with pytest.raises(ValueError, match="dtype: expected 'auto'"):
            pythia_jax.from_pretrained(dirs["main"], dtype=bad)


def test_model_methods_and_generation_config(dirs, tmp_path):
    model = GPTNeoX.from_pretrained(dirs["main"])
    assert isinstance(model, GPTNeoX) and _same(model, pythia_jax.from_pretrained(dirs["main"]))
    ids = [[5, 6, 7]]
    assert model.generate(ids, max_new_tokens=6, eos_token_id=[]) == \
        pythia_jax.generate(model, ids, 6, eos_token_id=[])
    dst = model.save_pretrained(tmp_path / "export")
    assert os.path.isfile(os.path.join(dst, "generation_config.json"))
    gc = transformers.GenerationConfig.from_pretrained(dst)
    assert (gc.bos_token_id, gc.eos_token_id) == (0, 0)
    assert _same(pythia_jax.from_pretrained(dst), model)
    # transformers' own model from the export stops at the EOS the generation config names,
    # as our default eos_token_id does
    hf = transformers.GPTNeoXForCausalLM.from_pretrained(dst).eval()
    assert hf.generation_config.eos_token_id == 0


def test_wandb_writer_off_by_default_and_a_missing_package_names_the_extra(tmp_path, monkeypatch):
    """Without the wandb package (hidden here) the configured path fails in one line naming
    the extra; unset, the writer never imports it."""
    import sys
    from pythia_jax import metrics
    from pythia_jax.configs import pythia as pythia_configs
    assert pythia_configs.get_config("70m").train.wandb_project == ""
    monkeypatch.setitem(sys.modules, "wandb", None)  # importing it raises ImportError
    os.makedirs(tmp_path / "a")
    w = metrics.MetricsWriter(str(tmp_path / "a"), total_steps=2, progress_bar=False,
                              enabled=True)
    w.write(1, {"loss": 1.0}, console=False)
    w.close()
    os.makedirs(tmp_path / "b")
    with pytest.raises(metrics.MissingWandb) as e:
        metrics.MetricsWriter(str(tmp_path / "b"), total_steps=2, progress_bar=False,
                              enabled=True, wandb_project="pythia-runs")
    assert "pip install 'pythia-jax[wandb]'" in str(e.value) and "\n" not in str(e.value)
    assert "train.wandb_project='pythia-runs'" in str(e.value)


def _wandb_records(path):
    """The records of an offline run's transaction log (`run-*.wandb`): wandb's LevelDB-style
    log (7-byte file header ":W&B" + magic + version; 32 KiB blocks of chunks, each with a
    7-byte header crc32/length/type, FULL=1 FIRST=2 MIDDLE=3 LAST=4) of protobuf `Record`s."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb
    data = open(path, "rb").read()
    assert data[:4] == b":W&B", data[:7]
    pos, block, raws, buf = 7, 32768, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and n == 0:  # padding to the block's end
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + n], pos + 7 + n
        if kind == 1:
            raws.append(chunk)
        elif kind == 2:
            buf = chunk
        elif kind == 3:
            buf += chunk
        elif kind == 4:
            raws.append(buf + chunk)
    out = []
    for raw in raws:
        r = pb.Record()
        r.ParseFromString(raw)
        out.append(r)
    return out


def test_wandb_writer_logs_the_training_scalars_offline(tmp_path, monkeypatch):
    """The real wandb package in offline mode (no network): the run in the workdir holds the
    config and, per step, every numeric scalar under the TensorBoard names (train and eval of a
    step in one row)."""
    import glob
    import json

    from pythia_jax import metrics
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    w = metrics.MetricsWriter(str(tmp_path), total_steps=3, progress_bar=False, enabled=True,
                              wandb_project="pythia-runs",
                              wandb_config={"model": {"hidden_size": 24}})
    try:
        for step in (1, 2, 3):
            w.write(step, {"loss": 1.0 / step, "lr": 1e-3 * step, "note": "not a scalar"},
                    console=False)
        w.write(3, {"loss": 0.5}, prefix="eval", console=False)
    finally:
        w.close()
    # `run.finish()` returns before wandb-core has closed the run's stream (its last step,
    # `inform_finish`, is fire-and-forget), so the transaction log may still be unflushed here
    # (CI once read a file with no history records). `teardown` waits for the service to exit,
    # which closes every stream; a process gets the same from wandb's atexit hook.
    import wandb
    wandb.teardown()
    logs = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(logs) == 1, os.listdir(tmp_path)
    records = _wandb_records(logs[0])
    rows = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            rows[r.history.step.num] = {"/".join(i.nested_key) or i.key: json.loads(i.value_json)
                                        for i in r.history.item}
    assert sorted(rows) == [1, 2, 3]
    for step in (1, 2, 3):
        assert rows[step]["train/loss"] == pytest.approx(1 / step)
        assert rows[step]["train/lr"] == pytest.approx(1e-3 * step)
        assert "train/note" not in rows[step]
    assert rows[3]["eval/loss"] == 0.5 and "eval/loss" not in rows[2]
    runs = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert runs and runs[0].project == "pythia-runs"
    config = {u.key: json.loads(u.value_json) for u in runs[0].config.update}
    assert config["model"] == {"hidden_size": 24}, config


def _event_records(path):
    """The `Event` protos of a TensorBoard event file (TFRecord framing: u64 length, masked
    crc32c of the length, the bytes, masked crc32c of the bytes; every crc checked)."""
    import struct

    from tensorboardX.crc32c import crc32c
    from tensorboardX.proto import event_pb2

    def masked(b):
        c = crc32c(b)
        return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF

    data, pos, out = open(path, "rb").read(), 0, []
    while pos < len(data):
        head = data[pos:pos + 8]
        (n,), (hc,) = struct.unpack("<Q", head), struct.unpack("<I", data[pos + 8:pos + 12])
        body = data[pos + 12:pos + 12 + n]
        (bc,) = struct.unpack("<I", data[pos + 12 + n:pos + 16 + n])
        assert hc == masked(head) and bc == masked(body), f"{path}: bad crc at byte {pos}"
        ev = event_pb2.Event()
        ev.ParseFromString(body)
        out.append(ev)
        pos += 16 + n
    return out


def test_tensorboard_event_file_holds_the_scalars_and_a_resume_adds_a_file(tmp_path):
    """The event file is TensorBoard's format (version record first, then one scalar summary
    per metric and step), and a resumed writer in the same second starts a second file
    instead of truncating the first."""
    from pythia_jax import metrics
    for start in (0, 2):
        w = metrics.MetricsWriter(str(tmp_path), total_steps=4, progress_bar=False,
                                  enabled=True, resume_step=start or None)
        for step in (start + 1, start + 2):
            w.write(step, {"loss": 1.0 / step, "lr": 1e-3 * step, "note": "text"},
                    console=False)
        w.close()
    files = sorted((tmp_path / "tensorboard").iterdir())
    assert len(files) == 2, files
    seen = {}
    for f in files:
        events = _event_records(f)
        assert events[0].file_version == "brain.Event:2"
        for ev in events[1:]:
            (v,) = ev.summary.value
            seen[(v.tag, ev.step)] = v.simple_value
    assert seen.keys() == {(f"train/{k}", s) for k in ("loss", "lr") for s in (1, 2, 3, 4)}
    for s in (1, 2, 3, 4):
        assert seen[("train/loss", s)] == pytest.approx(1.0 / s)
        assert seen[("train/lr", s)] == pytest.approx(1e-3 * s)
