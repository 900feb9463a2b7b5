"""Fault cases of the scripts (issue 14), each a real subprocess: out-of-vocabulary token ids and
all-non-finite runs in scripts/train.py, a full disk and bad --out in batch_viewer, SIGTERM in
every long-running script (no temporary file left, exit status 143, no orphaned worker), and
output paths checked before the work (evaluate)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO
from pythia_jax.data.indexed import write_indexed_dataset
from test_train import TINY, VOCAB, write_rows

TERMINATED = 128 + signal.SIGTERM


def _env(**extra) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false",
               ALLOW_MULTIPLE_LIBTPU_LOAD="1", TF_CPP_MIN_LOG_LEVEL="3", **extra)
    env.pop("XLA_FLAGS", None)
    return env


def _script(name: str, *args) -> list[str]:
    return [sys.executable, str(REPO / "scripts" / name), *map(str, args)]


def _run(cmd, timeout=120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=timeout, **kw)


def _hidden(folder) -> list[str]:
    return sorted(n for n in os.listdir(folder) if n.startswith("."))


def _writing(folder) -> bool:
    """A hidden (temporary) file in `folder` already holds data, or a hidden directory already
    holds a file: the script is mid-write (past the creation of its temporary output)."""
    for n in _hidden(folder):
        p = os.path.join(folder, n)
        try:
            if os.path.isdir(p) and os.listdir(p) or os.path.isfile(p) and os.path.getsize(p):
                return True
        except OSError:
            pass
    return False


def _children(pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(d))
    return out


def _workers_ready(pid: int) -> list[int]:
    """The pool workers of `pid` that have run their initializer, which ignores SIGINT (the
    parent stops the pool): bit 1 of SigIgn in /proc/PID/status."""
    ready = []
    for k in _children(pid):
        try:
            with open(f"/proc/{k}/cmdline") as f:
                if "spawn_main" not in f.read():
                    continue  # multiprocessing's resource tracker
            with open(f"/proc/{k}/status") as f:
                ign = next(line for line in f if line.startswith("SigIgn:"))
            if int(ign.split()[1], 16) & (1 << (signal.SIGINT - 1)):
                ready.append(k)
        except (OSError, StopIteration):
            pass
    return ready


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _terminate_when(cmd, ready, log_path, timeout=90.0, sig=signal.SIGTERM, outdir=None,
                    attempts=3):
    """Start `cmd`; once `ready(pid)` is true (polled every 2 ms) freeze the process (SIGSTOP),
    check `ready` again, send `sig` and let it go on (SIGCONT). The signal then lands in the
    state `ready` saw, however long this test process (on a loaded machine) took to send it.
    A run that got past that state before it was frozen is started again (its output in
    `outdir` removed), up to `attempts` runs. Returns (exit status, output, what `ready` gave)."""
    for attempt in range(attempts):
        with open(log_path, "w") as log:
            p = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=log, stderr=subprocess.STDOUT)
            deadline = time.monotonic() + timeout
            try:
                while not ready(p.pid):
                    if p.poll() is not None:
                        pytest.fail(f"exited {p.returncode} before the signal could be sent:\n"
                                    + open(log_path).read()[-3000:])
                    if time.monotonic() > deadline:
                        pytest.fail("never got ready:\n" + open(log_path).read()[-3000:])
                    time.sleep(0.002)
                p.send_signal(signal.SIGSTOP)
                seen = p.poll() is None and ready(p.pid)
                if seen:
                    p.send_signal(sig)
                p.send_signal(signal.SIGCONT)
                rc = p.wait(timeout=60)
            finally:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        if seen:
            return rc, open(log_path).read(), seen
        if outdir is None:
            break
        for name in os.listdir(outdir):  # the finished output of a run the signal missed
            path = os.path.join(outdir, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    pytest.fail(f"the process was past the ready state before it could be stopped "
                f"({attempt + 1} runs):\n" + open(log_path).read()[-3000:])


# -- scripts/train.py ---------------------------------------------------------------------------
def _train_flags(data_path, **overrides) -> list[str]:
    values = {**TINY, "data.path": data_path, **overrides}
    out = []
    for k, v in values.items():
        if isinstance(v, tuple):
            v = "(" + ", ".join(str(x) for x in v) + ("," if len(v) == 1 else "") + ")"
        out.append(f"--config.{k}={v}")
    return out


def _train(workdir, data, **overrides):
    return _run(_script("train.py", "--config=configs/smoke.py", f"--workdir={workdir}",
                        *_train_flags(data, **overrides)), timeout=300)


def _metrics(workdir) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_train_stops_on_a_token_id_outside_the_vocabulary(tmp_path):
    from pythia_jax.data.indexed import MMapIndexedDataset
    prefix = write_rows(tmp_path / "rows", 6 * 8, 16, seed=1)
    rows = np.array(MMapIndexedDataset(prefix).get_range(0, 48)).reshape(48, 17)
    rows[3 * 8 + 5, 9] = VOCAB + 44  # step 3, row 5
    write_indexed_dataset(prefix, list(rows), dtype=np.uint16)
    r = _train(tmp_path / "w", prefix)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-3000:]
    assert (f"{prefix}.bin: item 29 (step 3, row 5, position 9) holds token id {VOCAB + 44}, "
            f"outside the vocabulary [0, {VOCAB})") in r.stderr
    assert "Traceback" not in r.stderr and "finished at" not in r.stdout
    # nothing was trained on the bad batch: every logged loss is finite, no step past 3 saved
    assert all(np.isfinite(m["loss"]) for m in _metrics(tmp_path / "w") if "loss" in m)
    steps = sorted(int(p) for p in os.listdir(tmp_path / "w" / "checkpoints") if p.isdigit())
    assert steps and max(steps) <= 3


# weights of N(0, 1e30): the first forward overflows fp32, every gradient is non-finite
DIVERGED = {"model.init_method": "normal", "model.output_init_method": "normal",
            "model.init_std": 1e30}


def test_train_whose_every_update_is_nonfinite_exits_nonzero(tmp_path):
    prefix = write_rows(tmp_path / "rows", 6 * 8, 16, seed=1)
    r = _train(tmp_path / "w", prefix, **DIVERGED)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-3000:]
    assert "error: all 6 updates of this run (steps 0..5) had non-finite gradients" in r.stderr
    assert str(tmp_path / "w" / "checkpoints") in r.stderr
    assert "finished at" not in r.stdout
    steps = sorted(int(p) for p in os.listdir(tmp_path / "w" / "checkpoints") if p.isdigit())
    assert 6 not in steps  # no "final" checkpoint of a run that learned nothing


def test_train_stops_at_max_consecutive_nonfinite(tmp_path):
    prefix = write_rows(tmp_path / "rows", 130 * 8, 16, seed=1)
    r = _train(tmp_path / "w", prefix, **DIVERGED, **{"train.num_steps": 130,
                                                      "train.log_every": 4})
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-3000:]
    assert ("error: 100 consecutive updates had non-finite gradients (limit "
            "train.max_consecutive_nonfinite=100); stopping at step 100") in r.stderr
    assert max(m["step"] for m in _metrics(tmp_path / "w")) == 100


# -- batch_viewer: a full disk, a bad --out ------------------------------------------------------
def _viewer_data(folder, n_items: int, item_len: int = 2):
    items = (np.arange(n_items * item_len) % 50000).reshape(n_items, item_len).astype(np.uint16)
    write_indexed_dataset(folder / "document", items, dtype=np.uint16)
    return folder / "document"


@pytest.fixture
def small_disk(tmp_path):
    """(folder on a 64 KiB file system, preexec_fn, what the error says). A real tmpfs when this
    process may mount one (root); otherwise a 64 KiB file size limit in the child."""
    d = tmp_path / "small"
    d.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(d)],
                       capture_output=True)
    if r.returncode == 0:
        yield d, None, "no space left on the device"
        subprocess.run(["umount", str(d)], check=True)
        return

    def limit():
        import resource
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))

    yield d, limit, "file too large"


def test_batch_viewer_full_disk_says_so_and_leaves_nothing(tmp_path, small_disk):
    folder, preexec, why = small_disk
    data = _viewer_data(tmp_path, 64, item_len=1025)  # 131 KB of output: twice the room
    out = folder / "view.npy"
    r = _run(_script("batch_viewer.py", f"--data={data}", "--start_step=0", "--end_step=7",
                     "--batch_size=8", "--seq_len=1024", f"--out={out}"), preexec_fn=preexec)
    assert r.returncode == 1, (r.returncode, r.stderr[-3000:])  # SIGBUS was -7
    assert f"error: --out={out}: {why} (the array needs 131,200 bytes); nothing was written" \
        in r.stderr
    assert os.listdir(folder) == []
    # the same command with room succeeds and writes the exact array
    ok = tmp_path / "view.npy"
    r = _run(_script("batch_viewer.py", f"--data={data}", "--start_step=0", "--end_step=7",
                     "--batch_size=8", "--seq_len=1024", f"--out={ok}"))
    assert r.returncode == 0, r.stderr
    np.testing.assert_array_equal(np.load(ok), (np.arange(64 * 1025) % 50000).reshape(64, 1025))


@pytest.mark.parametrize("bad", ["dir", "missing_folder"])
def test_batch_viewer_bad_out_fails_before_reading(tmp_path, bad):
    data = _viewer_data(tmp_path, 8)
    out = tmp_path if bad == "dir" else tmp_path / "no" / "x.npy"
    before = sorted(os.listdir(tmp_path))
    r = _run(_script("batch_viewer.py", f"--data={data}", "--batch_size=2", "--seq_len=1",
                     f"--out={out}"))
    assert r.returncode == 1
    expect = (f"error: --out={out}: is a directory; expected a file path" if bad == "dir" else
              f"error: --out={out}: folder {tmp_path / 'no'} does not exist")
    assert expect in r.stderr
    assert sorted(os.listdir(tmp_path)) == before


# -- SIGTERM: exit 143, no temporary file, no orphaned worker ----------------------------------
def test_batch_viewer_sigterm_leaves_no_temp_file(tmp_path):
    n = 400_000  # one 2-token item per step: a loop of ~seconds
    data = _viewer_data(tmp_path, n)
    outdir = tmp_path / "out"
    outdir.mkdir()
    rc, log, _ = _terminate_when(
        _script("batch_viewer.py", f"--data={data}", "--start_step=0", f"--end_step={n - 1}",
                "--batch_size=1", "--seq_len=1", f"--out={outdir / 'v.npy'}"),
        lambda pid: _writing(outdir), tmp_path / "log", outdir=outdir)
    assert rc == TERMINATED, log[-3000:]
    assert "batch_viewer: terminated (SIGTERM); removing temporary files" in log
    assert "Traceback" not in log
    assert os.listdir(outdir) == []


def test_unshard_sigterm_leaves_no_temp_file(tmp_path):
    from pythia_jax.data.shards import shard_paths
    n = 20_000  # many small shards: a merge of ~seconds
    paths = shard_paths(str(tmp_path / "doc"), n)
    for i, p in enumerate(paths):
        with open(p, "wb") as f:
            f.write(i.to_bytes(4, "little"))
    outdir = tmp_path / "out"
    outdir.mkdir()
    rc, log, _ = _terminate_when(
        _script("unshard.py", f"--input={paths[0]}", f"--output={outdir / 'doc.bin'}",
                "--noprogress"),
        lambda pid: _writing(outdir), tmp_path / "log", outdir=outdir)
    assert rc == TERMINATED, log[-3000:]
    assert "unshard: terminated (SIGTERM)" in log and "Traceback" not in log
    assert os.listdir(outdir) == []


def _jsonl(path, n_docs: int):
    words = "the quick brown fox jumps over the lazy dog while seven wizards quietly hex".split()
    rng = np.random.default_rng(0)
    with open(path, "w") as f:
        for _ in range(n_docs):
            f.write(json.dumps({"text": " ".join(rng.choice(words, 300))}) + "\n")


@pytest.mark.parametrize("workers", [1, 2])
def test_preprocess_sigterm_stops_workers_and_leaves_no_temp_file(tmp_path, workers):
    src = tmp_path / "in.jsonl"
    _jsonl(src, 20_000)
    outdir = tmp_path / "out"
    outdir.mkdir()
    kids: set[int] = set()

    def ready(pid):  # the output is being built and (with a pool) the workers run
        kids.update(_children(pid))
        return bool(_hidden(outdir)) and (workers == 1 or len(_workers_ready(pid)) == workers)

    rc, log, _ = _terminate_when(
        _script("preprocess_data.py", f"--input={src}", f"--output_prefix={outdir / 'x'}",
                "--append_eod", f"--workers={workers}", "--noprogress"),
        ready, tmp_path / "log", outdir=outdir)
    assert rc == TERMINATED, log[-3000:]
    assert "preprocess_data: terminated (SIGTERM)" in log and "Traceback" not in log
    assert os.listdir(outdir) == []
    deadline = time.monotonic() + 10
    while any(_alive(k) for k in kids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [k for k in kids if _alive(k)]


def test_preprocess_workers_die_with_a_killed_parent(tmp_path):
    src = tmp_path / "in.jsonl"
    _jsonl(src, 20_000)
    kids: set[int] = set()

    def ready(pid):
        kids.update(_children(pid))
        return len(_workers_ready(pid)) == 2

    rc, log, _ = _terminate_when(
        _script("preprocess_data.py", f"--input={src}", f"--output_prefix={tmp_path / 'x'}",
                "--workers=2", "--noprogress"),
        ready, tmp_path / "log", sig=signal.SIGKILL)
    assert rc == -signal.SIGKILL
    deadline = time.monotonic() + 10
    while any(_alive(k) for k in kids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [k for k in kids if _alive(k)], "workers outlived their killed parent"


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from hf_utils import tiny_hf_model
    d = tmp_path_factory.mktemp("hf") / "tiny"
    tiny_hf_model(hidden_size=256, intermediate_size=1024, num_hidden_layers=8,
                  vocab_size=50304).save_pretrained(d)
    return d


def test_convert_sigterm_leaves_no_temp_dir(tmp_path, hf_dir):
    outdir = tmp_path / "out"
    outdir.mkdir()
    rc, log, _ = _terminate_when(
        _script("convert.py", f"--src={hf_dir}", f"--dst={outdir / 'ck'}", "--to=jax",
                "--noprogress"),
        lambda pid: _writing(outdir), tmp_path / "log", outdir=outdir)
    assert rc == TERMINATED, log[-3000:]
    assert "convert: terminated (SIGTERM)" in log
    assert os.listdir(outdir) == []


def test_export_gguf_sigterm_leaves_no_temp_file(tmp_path, hf_dir):
    outdir = tmp_path / "out"
    outdir.mkdir()
    rc, log, _ = _terminate_when(
        _script("export_gguf.py", f"--src={hf_dir}", f"--dst={outdir / 'm.gguf'}", "--type=q4_0",
                "--noprogress"),
        lambda pid: _writing(outdir), tmp_path / "log", outdir=outdir)
    assert rc == TERMINATED, log[-3000:]
    assert "export_gguf: terminated (SIGTERM)" in log
    assert os.listdir(outdir) == []


# -- evaluate: --output checked before the evaluation --------------------------------------------
def test_evaluate_bad_output_fails_before_loading_the_model(tmp_path):
    r = _run(_script("evaluate.py", f"--model={tmp_path / 'no-such-model'}", "--task=perplexity",
                     f"--data={tmp_path / 'no-data'}", "--output=/nonexistent/x.json"))
    assert r.returncode == 2
    assert ("evaluate: error: --output=/nonexistent/x.json: folder /nonexistent does not exist"
            in r.stderr)
    assert "no-such-model" not in r.stderr  # the model was never opened
    r = _run(_script("evaluate.py", f"--model={tmp_path / 'no-such-model'}", "--task=perplexity",
                     f"--data={tmp_path / 'no-data'}", f"--output={tmp_path}"))
    assert r.returncode == 2 and "is a directory; expected a file path" in r.stderr
