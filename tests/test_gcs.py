"""gs:// everywhere a path is taken, against a real GCS server (`gcp-storage-emulator` on
127.0.0.1, tests/gcs_utils.py): the path layer, a training run whose workdir is a bucket (every
file lands there, nothing under a local runs/), a bit-exact resume from the bucket,
`from_pretrained("gs://…")` (workdir, step directory, HF export), `convert.py` from and to a
bucket, and the one-line error naming the `gcs` extra when gcsfs is missing."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from conftest import REPO
from gcs_utils import gcs, gcs_emulator  # noqa: F401  (pytest fixtures)
from test_train import tiny_config, write_rows

from pythia_jax import checkpoint, paths
from pythia_jax import train as train_lib
from pythia_jax.pretrained import from_pretrained, save_pretrained


def _params(model) -> dict:
    leaves = jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]
    return {jax.tree_util.keystr(p): np.asarray(jax.device_get(x)) for p, x in leaves}


def _tree(tree) -> dict:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(p): np.asarray(jax.device_get(x)) for p, x in leaves}


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k


# ------------------------------------------------------------------------------------------------
# The path layer on a bucket
def test_paths_on_a_bucket(gcs):
    base = gcs.url("p")
    paths.write_text(paths.join(base, "a/x.txt"), "hello world")
    paths.write_bytes(paths.join(base, "a/b/y.bin"), bytes(range(256)))
    assert paths.isdir(paths.join(base, "a")) and not paths.isfile(paths.join(base, "a"))
    assert paths.isfile(paths.join(base, "a/x.txt")) and not paths.exists(base + "/nope")
    assert paths.listdir(paths.join(base, "a")) == ["b", "x.txt"]
    assert paths.list_sizes(paths.join(base, "a")) == {"x.txt": 11}
    assert paths.size(paths.join(base, "a/b/y.bin")) == 256
    assert paths.read_range(paths.join(base, "a/b/y.bin"), 250, 6) == bytes(range(250, 256))
    with pytest.raises(EOFError, match=r"y\.bin: wanted bytes \[250, 257\), the file ends at 256"):
        paths.read_range(paths.join(base, "a/b/y.bin"), 250, 7)
    with pytest.raises(FileNotFoundError, match="nope"):
        paths.listdir(base + "/nope")
    with pytest.raises(ValueError, match="no append"):
        paths.open(paths.join(base, "a/x.txt"), "a")
    # atomic_write: an error leaves the object as it was
    with pytest.raises(RuntimeError):
        with paths.atomic_write(paths.join(base, "a/x.txt"), "w") as fh:
            fh.write("half")
            raise RuntimeError("boom")
    assert paths.read_text(paths.join(base, "a/x.txt")) == "hello world"
    # atomic_dir: refused over a non-empty folder, uploaded whole on success
    with pytest.raises(FileExistsError, match="already exists"):
        with paths.atomic_dir(paths.join(base, "a")):
            pass
    with paths.atomic_dir(paths.join(base, "d")) as tmp:
        with open(os.path.join(tmp, "f"), "w") as fh:
            fh.write("1")
        assert not paths.exists(paths.join(base, "d/f"))  # nothing visible before the end
    assert gcs.list("p/d") == ["p/d/f"]
    with paths.local_copy(paths.join(base, "a")) as local:
        with open(os.path.join(local, "b", "y.bin"), "rb") as fh:
            assert fh.read() == bytes(range(256))
    local_dir = local
    assert not os.path.exists(local_dir)  # the download is removed at the end
    paths.rmtree(base)
    assert not paths.exists(base)


# ------------------------------------------------------------------------------------------------
# A training run in a bucket
@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    return write_rows(tmp_path_factory.mktemp("gcs_rows") / "rows", 64, 16, seed=5)


def _cfg(rows, num_steps):
    # one save per bucket run (steps 2 and 3): each orbax save to the server costs seconds
    return tiny_config(rows, **{"train.num_steps": num_steps, "checkpoint.extra_steps": (2,),
                                "train.log_every": 1})


def test_train_in_a_bucket_resumes_bit_exactly(gcs, rows, tmp_path, monkeypatch, request):
    monkeypatch.chdir(tmp_path)  # a stray local runs/ would appear here
    ref = train_lib.train(_cfg(rows, 3), str(tmp_path / "local"))
    workdir = gcs.url("run")
    first = train_lib.train(_cfg(rows, 2), workdir, setup=ref["setup"])
    assert first["end_step"] == 2
    second = train_lib.train(_cfg(rows, 3), workdir, setup=ref["setup"])
    assert second["start_step"] == 2 and second["end_step"] == 3
    # the resumed run ends bit-identical to the straight local one
    _assert_same(_tree(second["state"].params), _tree(ref["state"].params))
    _assert_same(_tree(second["state"].opt_state), _tree(ref["state"].opt_state))
    # convert.py from the bucket workdir to an HF export in the bucket, in the background while
    # the checks below run (its imports and compiles take a while)
    out = gcs.url("converted")
    convert = subprocess.Popen(
        [sys.executable, "scripts/convert.py", f"--src={workdir}", f"--dst={out}", "--to=hf",
         "--noprogress"], cwd=REPO, env=gcs.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    request.addfinalizer(lambda: convert.poll() is None and convert.kill())
    info = subprocess.Popen(
        [sys.executable, "scripts/model_info.py", f"--model={workdir}"], cwd=REPO, env=gcs.env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    request.addfinalizer(lambda: info.poll() is None and info.kill())

    objects = gcs.list("run")
    names = {o.split("/", 1)[1] for o in objects}
    for step in (2, 3):
        assert f"checkpoints/{step}/{checkpoint.CONFIG_NAME}" in names
        assert any(n.startswith(f"checkpoints/{step}/params/") for n in names)
        assert any(n.startswith(f"checkpoints/{step}/opt_state/") for n in names)
    assert train_lib.CONFIG_COPY in names
    assert json.loads(paths.read_text(paths.join(workdir, train_lib.CONFIG_COPY)))[
        "train"]["num_steps"] == 3
    events = [n for n in names if n.startswith("tensorboard/events.out.tfevents")]
    assert len(events) == 2, names  # one event file per run, both uploaded
    lines = [json.loads(s) for s in
             paths.read_text(paths.join(workdir, train_lib.METRICS_FILE)).splitlines()]
    assert [r["step"] for r in lines if r["split"] == "train"] == [1, 2, 3]  # appended on resume
    assert not os.path.exists(tmp_path / "runs") and sorted(os.listdir(tmp_path)) == ["local"]

    # from_pretrained: the workdir (newest step), a step directory, an HF export in the bucket
    want = _params(from_pretrained(str(tmp_path / "local")))
    _assert_same(_params(from_pretrained(workdir)), want)
    step2 = _params(from_pretrained(workdir + "/checkpoints/2/"))
    assert not all(np.array_equal(step2[k], want[k]) for k in want)  # really step 2
    hf_dir = gcs.url("hf")
    save_pretrained(from_pretrained(workdir), hf_dir)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(paths.listdir(hf_dir))
    _assert_same(_params(from_pretrained(hf_dir)), want)
    with pytest.raises(FileNotFoundError, match="no such directory"):
        from_pretrained(gcs.url("missing"))
    with pytest.raises(checkpoint.CheckpointDirError, match="not a checkpoint"):
        from_pretrained(gcs.url("run/tensorboard"))

    # the model_info.py and convert.py runs started above
    stdout, stderr = info.communicate(timeout=300)
    assert info.returncode == 0, stderr[-3000:]
    got = json.loads(stdout)
    assert (got["model"], got["hidden_size"], got["num_layers"]) == (workdir, 32, 2)
    stdout, stderr = convert.communicate(timeout=300)
    assert convert.returncode == 0, stderr[-3000:]
    assert f"wrote hf checkpoint to {out}" in stdout
    _assert_same(_params(from_pretrained(out)), want)


def test_resumed_metrics_in_the_same_second_keep_the_earlier_event_file(gcs, monkeypatch,
                                                                          tmp_path):
    """A remote workdir's event files are written in a fresh local staging folder and
    uploaded; a resumed writer started in the same second (same host and pid) must pick a new
    name against the bucket's files, not replace the first run's file (which lost its
    scalars: the 3.12 run of test_train_in_a_bucket_resumes_bit_exactly found one file of two)."""
    import time as real_time
    import types

    from test_hf_conventions import _event_records

    from pythia_jax import metrics
    monkeypatch.setattr(metrics, "time", types.SimpleNamespace(
        time=lambda: 1_796_300_000.0, monotonic=real_time.monotonic))
    workdir = gcs.url("metrics")
    for start in (0, 2):
        w = metrics.MetricsWriter(workdir, total_steps=4, progress_bar=False, enabled=True,
                                  resume_step=start or None)
        for step in (start + 1, start + 2):
            w.write(step, {"loss": 1.0 / step}, console=False)
        w.close()
    names = [n for n in gcs.list("metrics") if n.startswith("metrics/tensorboard/")]
    assert len(names) == 2, names
    seen = {}
    for i, n in enumerate(names):
        local = paths.download(gcs.url(n), str(tmp_path / f"ev{i}"))
        for ev in _event_records(local)[1:]:
            (v,) = ev.summary.value
            seen[ev.step] = v.simple_value
    assert seen == pytest.approx({s: 1.0 / s for s in (1, 2, 3, 4)})
    lines = paths.read_text(paths.join(workdir, "metrics.jsonl")).splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3, 4]


def test_script_output_paths_on_a_bucket(gcs):
    """--output/--out of the scripts: a URL is checked (a folder refused) and written whole."""
    from pythia_jax import cli
    url = gcs.url("out/result.json")
    assert cli.output_path_error(url, "--output") is None
    cli.write_text_atomic(url, '{"ok": 1}\n')
    assert paths.read_text(url) == '{"ok": 1}\n'
    assert cli.output_path_error(gcs.url("out"), "--output") == (
        f"--output={gcs.url('out')}: is a directory; expected a file path")


# ------------------------------------------------------------------------------------------------
# Without gcsfs: one line naming the extra
def test_missing_gcsfs_names_the_extra_in_process(monkeypatch, rows):
    import fsspec.registry  # noqa: F401
    fsspec_registry = sys.modules["fsspec.registry"]
    monkeypatch.setitem(sys.modules, "gcsfs", None)
    for proto in ("gs", "gcs"):
        if proto in fsspec_registry._registry:
            monkeypatch.delitem(fsspec_registry._registry, proto)
    paths._filesystem.cache_clear()
    try:
        hint = "pip install 'pythia-jax[gcs]'"
        with pytest.raises(paths.MissingCloudDependency, match=re.escape(hint)):
            paths.exists("gs://bucket/x")
        with pytest.raises(ImportError, match=r"\[gcs\]"):
            from_pretrained("gs://bucket/run")
        with pytest.raises(train_lib.TrainConfigError, match=r"--workdir=gs://bucket/run: .*\[gcs\]"):
            train_lib.train(_cfg(rows, 1), "gs://bucket/run")
        from pythia_jax import cli
        assert "pip install 'pythia-jax[gcs]'" in cli.output_path_error("gs://b/x.json", "--out")
    finally:
        paths._filesystem.cache_clear()


def test_missing_gcsfs_script_exits_2_with_one_line(tmp_path, rows):
    code = ("import sys, runpy; sys.modules['gcsfs'] = None; "
            f"sys.argv = ['train.py', '--config=configs/smoke.py', '--workdir=gs://bucket/run', "
            f"'--config.data.path={rows}', '--config.data.build_from_text=', "
            "'--config.data.eval_path=']; runpy.run_path('scripts/train.py', run_name='__main__')")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 2, p.stderr[-3000:]
    err = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "pip install 'pythia-jax[gcs]'" in err[0], p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    assert not (tmp_path / "runs").exists()
