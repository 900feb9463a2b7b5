"""Fault cases of training, checkpoints and the formats (issue 14 items 1, 2, 8, 10–14): each
test fails when its handling breaks (see docs/faults.md)."""

from __future__ import annotations

import errno
import json
import os
import signal
import stat
import subprocess
import sys
import types

import numpy as np
import pytest
from flax import nnx

import pythia_jax
from conftest import REPO
from gcs_utils import gcs, gcs_emulator  # noqa: F401  (pytest fixtures)
from pythia_jax import paths
from pythia_jax.config import ModelConfig
from pythia_jax.hf import write_safetensors
from pythia_jax.model import GPTNeoX
from test_train import TINY, write_rows

CFG = ModelConfig(hidden_size=24, num_layers=2, num_heads=3, intermediate_size=40,
                  vocab_size=64, max_position_embeddings=32)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# -- item 10: output directories get the umask's mode, not mkdtemp's 0700 ------------------------
@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_saved_directories_get_the_umask_mode(tmp_path, umask):
    model = GPTNeoX(CFG, rngs=nnx.Rngs(0))
    old = os.umask(umask)
    try:
        hf_dir = pythia_jax.save_pretrained(model, tmp_path / "hf", tokenizer=False)
        jax_dir = pythia_jax.checkpoint.save_model(model, tmp_path / "jax")
        paths.write_text(tmp_path / "note.txt", "x")
    finally:
        os.umask(old)
    for d in (hf_dir, jax_dir):
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o777 & ~umask, d
    assert stat.S_IMODE(os.stat(tmp_path / "note.txt").st_mode) == 0o666 & ~umask


# -- item 14: hf.write_safetensors writes under a temporary name -----------------------------------
def test_write_safetensors_failure_keeps_the_old_file(tmp_path):
    path = tmp_path / "model.safetensors"
    write_safetensors(str(path), {"a": np.arange(4, dtype=np.float32)})
    before = path.read_bytes()

    def broken():
        raise RuntimeError("source failed mid-write")

    with pytest.raises(RuntimeError, match="mid-write"):
        write_safetensors(str(path), [("a", np.arange(4, dtype=np.float32)),
                                      ("b", ((1000,), np.float32, broken))])
    assert path.read_bytes() == before        # not truncated, not half-rewritten
    assert os.listdir(tmp_path) == ["model.safetensors"]  # no temporary left


# -- item 11: a misspelled config field or a missing config file -----------------------------------
def _train_script(*args, timeout=120):
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("XLA_FLAGS", None)
    return subprocess.run([sys.executable, "scripts/train.py", *map(str, args)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("args, message", [
    (["--config=configs/smoke.py", "--config.train.num_stpes=3"],
     "--config.train.num_stpes=3: config.train has no field 'num_stpes'; did you mean "
     "config.train.num_steps?"),
    (["--config=configs/smoke.py", "--config.trian.num_steps=3"],
     "--config.trian.num_steps=3: config has no field 'trian'; did you mean config.train?"),
    (["--config=configs/nope.py"],
     f"--config=configs/nope.py: config file {REPO / 'configs' / 'nope.py'} does not exist"),
    (["--config=configs/pythia.py:99m"],
     "--config=configs/pythia.py:99m: cannot load the config file: ValueError: "
     "configs/pythia.py: unknown size '99m'"),
])
def test_train_script_names_a_bad_config_field_or_file(tmp_path, args, message):
    r = _train_script(*args, f"--workdir={tmp_path / 'w'}")
    assert r.returncode == 2, r.stderr[-2000:]
    assert f"train.py: error: {message}" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "w").exists()


def test_nonfinite_learning_rate_is_refused(tmp_path):
    from pythia_jax import train
    from test_train import tiny_config
    prefix = write_rows(tmp_path / "rows", 4 * 8, 16)
    for field in ("peak_lr", "min_lr"):
        config = tiny_config(prefix, **{f"optim.{field}": float("inf"), "train.num_steps": 2})
        with pytest.raises(train.TrainConfigError, match="optim.peak_lr / optim.min_lr: "
                           "expected finite numbers >= 0"):
            train.train(config, tmp_path / "w")
    assert not (tmp_path / "w").exists()


def test_max_consecutive_nonfinite_fields_can_be_set_from_the_command_line():
    from ml_collections import config_flags  # noqa: F401  (the configs are locked there)
    from pythia_jax.configs import pythia, smoke
    for c in (pythia.get_config("14m"), smoke.get_config()):
        c.lock()
        c.train.max_consecutive_nonfinite = 3
        c.optim.max_consecutive_nonfinite = 5  # raises on a locked config without the field


# -- training workdirs: a module-wide dataset and one compiled setup ------------------------------
@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    return write_rows(tmp_path_factory.mktemp("rows") / "rows", 20 * 8, 16, seed=5)


@pytest.fixture(scope="module")
def cached_setup():
    return {}


def _train(rows, workdir, cached_setup, **overrides):
    from pythia_jax import train
    config = _config(rows, **overrides)
    summary = train.train(config, workdir, setup=cached_setup.get("setup"))
    cached_setup["setup"] = summary["setup"]
    return summary


def _config(rows, **overrides):
    from test_train import tiny_config
    return tiny_config(rows, **{"checkpoint.async_save": False, **overrides})


def _steps(workdir) -> list[int]:
    return sorted(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit())


# -- item 1: a resume with another schedule deletes none of the earlier run's checkpoints ----------
def test_resume_with_another_schedule_keeps_every_earlier_checkpoint(tmp_path, rows,
                                                                     cached_setup):
    w = tmp_path / "w"
    _train(rows, w, cached_setup, **{"train.num_steps": 12,
                                     "checkpoint.extra_steps": (0, 1, 2, 4, 8)})
    assert _steps(w) == [0, 1, 2, 4, 8, 12]
    _train(rows, w, cached_setup, **{"train.num_steps": 14, "checkpoint.extra_steps": (0,)})
    assert _steps(w) == [0, 1, 2, 4, 8, 12, 14]
    _train(rows, w, cached_setup, **{"train.num_steps": 16})
    assert _steps(w) == [0, 1, 2, 4, 8, 12, 14, 16]


def test_resume_still_replaces_rolling_checkpoints(tmp_path, rows, cached_setup):
    w = tmp_path / "w"
    _train(rows, w, cached_setup, **{"train.num_steps": 5, "checkpoint.extra_steps": (0,),
                                     "checkpoint.rolling_every": 3, "checkpoint.save_final": False})
    assert _steps(w) == [0, 3]  # 3: rolling
    _train(rows, w, cached_setup, **{"train.num_steps": 7, "checkpoint.extra_steps": (0,),
                                     "checkpoint.rolling_every": 3, "checkpoint.save_final": False})
    assert _steps(w) == [0, 6]  # the earlier run's rolling step 3 was replaced by 6


# -- item 2: a damaged checkpoint is an error naming the step directory ---------------------------
def _damage_largest_params_file(step_dir) -> str:
    files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(step_dir, "params"))
             for f in fs]
    target = max(files, key=os.path.getsize)
    size = os.path.getsize(target)
    with open(target, "r+b") as fh:
        fh.seek(size // 2)
        fh.write(b"\xff" * 8)
    assert os.path.getsize(target) == size
    return target


def test_damaged_checkpoint_is_refused_by_training_and_from_pretrained(tmp_path, rows,
                                                                       cached_setup):
    from pythia_jax import train
    w = tmp_path / "w"
    _train(rows, w, cached_setup, **{"train.num_steps": 6})
    assert _steps(w) == [0, 1, 2, 4, 6]
    step6 = str(w / "checkpoints" / "6")
    before = {n: os.path.getmtime(os.path.join(w, "checkpoints", n)) for n in os.listdir(
        w / "checkpoints")}
    _damage_largest_params_file(step6)
    with pytest.raises(train.TrainError) as e:
        _train(rows, w, cached_setup, **{"train.num_steps": 8})
    msg = str(e.value)
    assert msg.startswith(f"{step6}: damaged checkpoint: params[")
    assert "move this step directory aside to resume from step 4" in msg
    assert _steps(w) == [0, 1, 2, 4, 6]  # nothing saved, nothing deleted
    assert {n: os.path.getmtime(os.path.join(w, "checkpoints", n)) for n in os.listdir(
        w / "checkpoints")} == before
    for src in (w, step6):
        with pytest.raises(pythia_jax.checkpoint.CheckpointDirError,
                           match=f"^{step6}: damaged checkpoint: params\\["):
            pythia_jax.from_pretrained(src)
    pythia_jax.from_pretrained(w / "checkpoints" / "4")  # an intact step still loads


def test_damaged_model_directory_is_refused(tmp_path):
    model = GPTNeoX(CFG, rngs=nnx.Rngs(0))
    d = pythia_jax.checkpoint.save_model(model, tmp_path / "m")
    pythia_jax.from_pretrained(d)  # intact
    _damage_largest_params_file(d)
    with pytest.raises(pythia_jax.checkpoint.CheckpointDirError,
                       match=f"^{d}: damaged checkpoint: params\\["):
        pythia_jax.from_pretrained(d)
    with pytest.raises(pythia_jax.checkpoint.CheckpointDirError, match="damaged checkpoint"):
        pythia_jax.from_pretrained(d, dtype="bfloat16")  # verified before the cast


def test_checksums_see_any_changed_word_and_nonfinite_values():
    import jax.numpy as jnp
    from pythia_jax.checkpoint import array_checksums
    x = jnp.arange(1000, dtype=jnp.float32)
    base, bad = array_checksums({"x": x, "h": x.astype(jnp.bfloat16)})
    assert bad == []
    for i in (0, 499, 999):
        assert array_checksums({"x": x.at[i].set(-1.0)})[0]["['x']"] != base["['x']"]
    swapped = x.at[3].set(x[4]).at[4].set(x[3])
    assert array_checksums({"x": swapped})[0]["['x']"] != base["['x']"]
    assert array_checksums({"h": x.astype(jnp.bfloat16).at[7].set(2.0)})[0]["['h']"] != base["['h']"]
    assert array_checksums({"x": x.at[5].set(jnp.nan), "i": jnp.arange(3)})[1] == ["['x']"]


def test_nonfinite_parameters_are_never_saved(tmp_path, rows, cached_setup):
    """A NaN in the parameters (here put into the state by hand) stops the run at the save with
    an error naming the step; nothing is written for that step."""
    import jax
    import jax.numpy as jnp
    from pythia_jax import train
    w = tmp_path / "w"
    summary = _train(rows, w, cached_setup, **{"train.num_steps": 2})
    state = summary["state"]
    state.params = jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.nan), state.params)
    ck = train.Checkpoints(tmp_path / "w2", _config(rows), summary["setup"])
    try:
        with pytest.raises(train.TrainError, match=f"^{tmp_path / 'w2' / 'checkpoints' / '2'}: "
                           "not saving step 2: the parameters hold NaN or inf"):
            ck.save(state, {"reason": "schedule"})
    finally:
        ck.close()
    assert _steps(tmp_path / "w2") == []


# -- item 13: one rule for the latest step; metrics.jsonl without repeats --------------------------
def test_training_and_from_pretrained_agree_on_the_latest_step(tmp_path, rows, cached_setup):
    from pythia_jax import train
    w = tmp_path / "w"
    _train(rows, w, cached_setup, **{"train.num_steps": 6})
    os.remove(w / "checkpoints" / "6" / "pythia_jax_config.json")
    assert pythia_jax.checkpoint.resolve_checkpoint_dir(w) == str(w / "checkpoints" / "4")
    assert train.Checkpoints(w, _config(rows), cached_setup["setup"]).latest_step() == 4
    with pytest.raises(train.TrainError, match=f"^{w / 'checkpoints' / '6'}: not a finished "
                       "checkpoint .* newer than the latest finished step 4; move it aside"):
        _train(rows, w, cached_setup, **{"train.num_steps": 8})
    assert _steps(w) == [0, 1, 2, 4, 6]


def _metrics(workdir) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_metrics_jsonl_holds_each_step_once_after_a_resume(tmp_path, rows, cached_setup):
    import shutil
    w = tmp_path / "w"
    _train(rows, w, cached_setup, **{"train.num_steps": 6, "train.log_every": 1})
    # as after a crash between logging step 6 and finishing its checkpoint: resume from 4
    shutil.rmtree(w / "checkpoints" / "6")
    _train(rows, w, cached_setup, **{"train.num_steps": 6, "train.log_every": 1})
    _train(rows, w, cached_setup, **{"train.num_steps": 6, "train.log_every": 1})  # nothing to do
    _train(rows, w, cached_setup, **{"train.num_steps": 8, "train.log_every": 1})
    lines = [m for m in _metrics(w) if m["split"] == "train"]
    assert [m["step"] for m in lines] == list(range(1, 9))
    assert all(m.get("tokens_per_sec", 1) > 0 for m in lines)  # never tok/s=0


# -- item 12: one run per workdir -------------------------------------------------------------------
def _lock(workdir, **fields):
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "train.lock"), "w") as f:
        json.dump(fields, f)


def test_second_run_in_a_locked_workdir_is_refused(tmp_path, rows, cached_setup):
    import socket
    import time
    from pythia_jax import train
    w = tmp_path / "w"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _lock(w, host=socket.gethostname(), pid=sleeper.pid, time=time.time(), token="x")
        with pytest.raises(train.TrainError, match=f"^{w}: another training run holds this "
                           f"workdir \\(host {socket.gethostname()}, pid {sleeper.pid}, lock "):
            _train(rows, w, cached_setup)
        # another host's lock, refreshed recently: refused as well
        _lock(w, host="elsewhere", pid=1, time=time.time() - 60, token="y")
        with pytest.raises(train.TrainError, match="host elsewhere, pid 1"):
            _train(rows, w, cached_setup)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert not (w / "checkpoints").exists() and not (w / "metrics.jsonl").exists()


def test_stale_lock_is_taken_over_and_released_at_the_end(tmp_path, rows, cached_setup, capsys):
    import socket
    import time
    from pythia_jax import train
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    w = tmp_path / "w"
    _lock(w, host=socket.gethostname(), pid=dead.pid, time=time.time(), token="x")
    _train(rows, w, cached_setup, **{"train.num_steps": 2})
    assert (f"taking over a stale lock of host {socket.gethostname()}, pid {dead.pid} (pid "
            f"{dead.pid} is not running on this host)") in capsys.readouterr().out
    assert not (w / "train.lock").exists()  # released
    _lock(w, host="elsewhere", pid=1, time=time.time() - train.LOCK_STALE_SECS - 5, token="y")
    _train(rows, w, cached_setup, **{"train.num_steps": 3})
    assert "not refreshed for 15 min" in capsys.readouterr().out
    assert _steps(w)[-1] == 3


def test_lock_is_held_while_training(tmp_path, rows, cached_setup, monkeypatch):
    """While a run trains, the lock names this process (read at each save, inside the run)."""
    from pythia_jax import train
    w = tmp_path / "w"
    seen = []
    real_save = train.Checkpoints.save

    def save(self, state, meta):
        with open(w / "train.lock") as f:
            seen.append(json.load(f))
        return real_save(self, state, meta)

    monkeypatch.setattr(train.Checkpoints, "save", save)
    _train(rows, w, cached_setup, **{"train.num_steps": 2})
    assert seen and all(s["pid"] == os.getpid() for s in seen)
    assert not (w / "train.lock").exists()


def test_lock_in_a_bucket(gcs):
    """gs:// workdirs: the lock is an object; a live one is refused, one not refreshed for
    LOCK_STALE_SECS is taken over, and a run releases only its own lock."""
    import time
    from pythia_jax import train
    w = gcs.url("w")
    a = train.WorkdirLock(w)
    a.acquire()
    assert json.loads(paths.read_text(a.path))["token"] == a.token
    b = train.WorkdirLock(w)
    with pytest.raises(train.TrainError, match=f"^{w}: another training run holds this workdir"):
        b.acquire()
    paths.write_text(a.path, json.dumps({"host": "elsewhere", "pid": 1, "token": "old",
                                         "time": time.time() - train.LOCK_STALE_SECS - 60}))
    b.acquire()
    assert json.loads(paths.read_text(b.path))["token"] == b.token
    a.release()  # not a's any more: left alone
    assert paths.exists(b.path)
    b.release()
    assert not paths.exists(b.path)


# -- item 8: a full disk while training ------------------------------------------------------------
@pytest.fixture
def one_mib_disk(tmp_path):
    """(folder on a 1 MiB file system, preexec_fn): a real tmpfs when this process may mount one
    (root), else a 1 MiB file size limit in the child (as tests/test_faults_scripts.py does)."""
    d = tmp_path / "small"
    d.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(d)],
                       capture_output=True)
    if r.returncode == 0:
        yield d, None
        subprocess.run(["umount", str(d)], check=True)
        return

    def limit():
        import resource
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    yield d, limit


def test_full_disk_while_training_is_one_line_naming_the_last_good_checkpoint(
        tmp_path, rows, one_mib_disk):
    from test_faults_scripts import _train_flags
    folder, preexec = one_mib_disk
    w = folder / "w"
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("XLA_FLAGS", None)
    r = subprocess.run([sys.executable, "scripts/train.py", "--config=configs/smoke.py",
                        f"--workdir={w}", *_train_flags(rows, **{"train.num_steps": 20})],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
                       preexec_fn=preexec)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-3000:]
    latest = pythia_jax.checkpoint.latest_step(w / "checkpoints")
    last = str(w / "checkpoints" / str(latest)) if latest is not None else "none"
    # The whole of stderr is the one line: no orbax log tracebacks and none of tensorstore's
    # late "Event loop is closed" reports (train._QuietClosedLoopHook), before it or after it.
    assert r.stderr.strip() == (
        f"error: {w}: no space left on the device (while writing checkpoints or metrics); "
        f"the last good checkpoint is {last}. Free space and run again to resume from it.")
    assert "finished at" not in r.stdout
    if preexec is None:  # tmpfs: steps 0 (and, depending on timing, 1) fit, a later one does not
        assert latest in (0, 1)
        pythia_jax.from_pretrained(last)  # intact (its checksums verified)
    assert not (w / "train.lock").exists()


_FULL_DISK_METRICS = r"""
import os, resource, signal, sys
from pythia_jax.metrics import MetricsWriter
w = MetricsWriter(sys.argv[1], total_steps=1, progress_bar=False, enabled=True)
w.write(0, {"loss": 1.0}, console=False)
w.flush()
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
try:
    for i in range(1, 5000):  # metrics.jsonl and the event file grow past the limit
        w.write(i, {"loss": 1.0, "lr": 1e-4, "grad_norm": 0.5}, console=False)
        if i % 100 == 0:
            w.flush()
except OSError as e:
    print("write raised errno", e.errno, flush=True)
try:
    w.close()
except OSError as e:
    print("close raised errno", e.errno, flush=True)
print("closed", w._tb is None and w._jsonl is None, flush=True)
"""


def test_metrics_on_a_full_disk_raise_in_the_caller_and_leave_nothing_for_exit(tmp_path):
    """The metrics files hit a full disk (a 4 KiB file-size limit): the write error reaches the
    training loop in its own thread, `close` closes every part, and the process exits with no
    late report. (tensorboardX's `SummaryWriter`, used before, wrote from a thread that died on
    the error with a traceback, after which its full queue blocked the next scalar for good,
    and its exit-time callback failed again with "Exception ignored in atexit callback".)"""
    r = subprocess.run([sys.executable, "-c", _FULL_DISK_METRICS, str(tmp_path)],
                       cwd=REPO, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout.splitlines()
    assert out[0] == f"write raised errno {errno.EFBIG}", r.stdout + r.stderr[-2000:]
    assert out[-1] == "closed True", r.stdout
    assert r.stderr.strip() == "", r.stderr[-3000:]
    assert list((tmp_path / "tensorboard").iterdir())  # the event file was being written


def test_quiet_closed_loop_hook_drops_only_the_late_callback_reports():
    """The unraisable-exception hook that `train` installs drops exactly the reports of
    tensorstore callbacks onto a closed asyncio loop and passes every other report on."""
    import asyncio
    from pythia_jax import train

    seen = []
    hook = train._QuietClosedLoopHook(seen.append)

    def report(fn):
        try:
            fn()
        except BaseException as e:
            # the fields of sys.unraisablehook's argument (its type is not constructible)
            return types.SimpleNamespace(exc_type=type(e), exc_value=e,
                                         exc_traceback=e.__traceback__, err_msg=None,
                                         object=None)

    loop = asyncio.new_event_loop()
    loop.close()
    late = report(lambda: loop.call_soon_threadsafe(print))
    assert str(late.exc_value) == "Event loop is closed"
    hook(late)
    assert seen == []

    other = report(lambda: (_ for _ in ()).throw(RuntimeError("Event loop is closed")))
    hook(other)  # same text, not from call_soon_threadsafe: a real report, passed on
    different = report(lambda: 1 / 0)
    hook(different)
    assert seen == [other, different]

    before = sys.unraisablehook
    restore = train._install_closed_loop_hook()
    try:
        assert isinstance(sys.unraisablehook, train._QuietClosedLoopHook)
        assert train._install_closed_loop_hook()() is None  # installed once, not stacked
        assert sys.unraisablehook.inner is before
    finally:
        restore()
    assert sys.unraisablehook is before


_ABANDONED_WRITE = """
import sys
from pythia_jax import train
async def async_serialize_from_host():  # named like orbax's (serialization.py), whose write_fragment a failed save abandons
    async def write_fragment():
        pass
    return write_fragment()
async def write_something_else():
    pass
if sys.argv[1] == "quiet":
    train._quiet_abandoned_writes()
# kept to interpreter exit, where a failed save's coroutines are collected ("sys:1: ...")
kept = []
try:
    async_serialize_from_host().send(None)
except StopIteration as done:
    kept.append(done.value)  # the inner coroutine, never awaited
if sys.argv[2] == "other":
    kept.append(write_something_else())
"""


@pytest.mark.parametrize("mode", ["quiet", "loud"])
def test_full_disk_silences_only_the_abandoned_serialization_coroutines(mode):
    """After a full disk `train` ignores Python's "coroutine ... was never awaited" warning for
    the serialization writes the failed save left (printed at interpreter exit, after the
    one-line error) and no other such warning."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    for other in ("none", "other"):
        r = subprocess.run([sys.executable, "-c", _ABANDONED_WRITE, mode, other], cwd=REPO,
                           env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-3000:]
        abandoned = "'async_serialize_from_host.<locals>.write_fragment' was never awaited"
        assert (abandoned in r.stderr) == (mode == "loud"), r.stderr[-3000:]
        assert ("'write_something_else' was never awaited" in r.stderr) == (other == "other")
