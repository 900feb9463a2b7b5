"""Preemption on a multi-process run, for real: two local processes (`scripts/train.py
--distributed`, jax.distributed over 127.0.0.1, gloo CPU collectives, four fake devices each).

- SIGTERM to one of them mid-run: both stop at the same step (a multiple of
  train.preemption_check_every), the checkpoint of that step is written by both, both exit with
  PREEMPTED_EXIT_STATUS (75); started again they resume from it, and the final parameters are
  bit for bit those of a run that was never interrupted.
- A process whose partner never comes up gets one clear line (coordinator, process, count) and
  exit status 3 within --distributed_timeout, instead of JAX's abort or a hang.
- Bad cluster environments are refused in one line, exit 2.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
MESH = (1, 4, 2)      # fsdp spans both processes; tensor inside each process
STEPS = 60
CHECK_EVERY = 3
TIMEOUT = 900  # per process; the shared 2-core machine can take minutes to compile


def preempt_config(data_prefix: str):
    """The config that the runs load (through a config file written by the test)."""
    sys.path.insert(0, str(TESTS))
    from test_sharding import tiny_train_config

    c = tiny_train_config(MESH)
    c.data.path = data_prefix
    c.data.build_from_text = ""
    c.data.eval_path = ""
    c.data.prefetch = 1
    c.train.num_steps = STEPS
    c.train.log_every = 1
    c.train.eval_every = 0
    c.train.progress_bar = False
    c.train.preemption_check_every = CHECK_EVERY
    c.sample.max_new_tokens = 0
    c.checkpoint.extra_steps = ()
    c.checkpoint.every = 0
    c.checkpoint.rolling_every = 0
    c.checkpoint.save_final = True
    return c


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(pid: int, nproc: int, port: int) -> dict:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1",
               JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(nproc),
               JAX_PROCESS_ID=str(pid),
               PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    return env


def _train(pid, nproc, port, config, workdir, *extra, env=None):
    return subprocess.Popen(
        [sys.executable, str(REPO / "scripts" / "train.py"), f"--config={config}",
         f"--workdir={workdir}", "--distributed", *extra],
        env=env or _env(pid, nproc, port), cwd=REPO, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)


def _finish(procs) -> list[tuple[int, str]]:
    """Wait for every process (killing all of them on timeout); (status, output) of each."""
    out = []
    try:
        for p in procs:
            text, _ = p.communicate(timeout=TIMEOUT)
            out.append((p.returncode, text))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return out


def _pair(config, workdir):
    port = _free_port()
    return [_train(i, 2, port, config, workdir) for i in range(2)]


def _train_steps(workdir: pathlib.Path) -> list[int]:
    p = workdir / "metrics.jsonl"
    if not p.exists():
        return []
    steps = []
    for line in p.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:  # a line being written
            continue
        if rec.get("split") == "train":
            steps.append(rec["step"])
    return steps


def _params(workdir) -> dict:
    from flax import nnx

    from pythia_jax import checkpoint as ckpt_lib
    model = ckpt_lib.load_model(str(workdir))
    return {"".join(f"[{p!r}]" for p in path): np.asarray(v.get_value())
            for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from pythia_jax.data.indexed import write_indexed_dataset

    root = tmp_path_factory.mktemp("preempt")
    rows = np.random.RandomState(0).randint(0, 256, size=(16 * STEPS, 17))
    data = root / "rows"
    write_indexed_dataset(str(data), rows.tolist(), vocab_size=256)
    config = root / "config.py"
    config.write_text(f"import sys\nsys.path.insert(0, {str(TESTS)!r})\n"
                      "from test_preemption import preempt_config\n\n\n"
                      f"def get_config():\n    return preempt_config({str(data)!r})\n")

    # 1. interrupted: SIGTERM to process 1 once process 0 has logged step 2
    procs = _pair(config, root / "preempted")
    deadline = time.time() + TIMEOUT
    while (not _train_steps(root / "preempted") or max(_train_steps(root / "preempted")) < 2):
        if time.time() > deadline or any(p.poll() is not None for p in procs):
            outs = _finish(procs)
            pytest.fail("the run did not start (or ended before it was signalled): "
                        + " | ".join(f"exit {st}: {text[-2000:]}" for st, text in outs))
        time.sleep(0.02)
    signalled_at = max(_train_steps(root / "preempted"))
    procs[1].send_signal(signal.SIGTERM)
    first = _finish(procs)
    # what the interrupted run left (the relaunch's checkpoint policy may delete it later)
    from pythia_jax import checkpoint as ckpt_lib
    ckpts = root / "preempted" / "checkpoints"
    left = {"steps": ckpt_lib.step_numbers(str(ckpts))}
    for step in left["steps"]:
        left["meta"] = json.loads((ckpts / str(step) / "meta" / "metadata").read_text())
        left["written"] = sorted({p.name for p in (ckpts / str(step)).rglob("ocdbt.process_*")})
    # 2. started again in the same workdir
    second = _finish(_pair(config, root / "preempted"))
    # 3. never interrupted
    straight = _finish(_pair(config, root / "straight"))
    return dict(root=root, first=first, second=second, straight=straight,
                signalled_at=signalled_at, left=left)


def _stop_step(text: str, pid: int) -> int:
    tag = f"[process {pid}] step "
    lines = [l for l in text.splitlines() if l.startswith(tag)]
    assert len(lines) == 1 and "termination requested" in lines[0], text[-3000:]
    return int(lines[0][len(tag):].split(":")[0])


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_at_the_same_step(runs):
    from pythia_jax.train import PREEMPTED_EXIT_STATUS
    (s0, out0), (s1, out1) = runs["first"]
    assert (s0, s1) == (PREEMPTED_EXIT_STATUS, PREEMPTED_EXIT_STATUS), out0[-3000:] + out1[-3000:]
    stop = _stop_step(out0, 0)
    assert _stop_step(out1, 1) == stop  # process 1 got the signal, process 0 agreed
    assert stop % CHECK_EVERY == 0 and runs["signalled_at"] < stop < STEPS
    assert f"preempted at step {stop}" in out0
    # the checkpoint of that step, written by both processes, is the only one
    left = runs["left"]
    assert left["steps"] == [stop]
    assert left["meta"]["reason"] == "preemption" and left["meta"]["step"] == stop
    assert left["written"] == ["ocdbt.process_0", "ocdbt.process_1"], left["written"]


@pytest.mark.slow
def test_relaunch_resumes_and_ends_with_the_weights_of_a_straight_run(runs):
    (s0, out0), (s1, out1) = runs["second"]
    assert (s0, s1) == (0, 0), out0[-3000:] + out1[-3000:]
    stop = _stop_step(runs["first"][0][1], 0)
    assert f"(step {stop})" in out0 and "resumed from" in out0
    assert f"finished at step {STEPS}" in out0
    assert all(s == 0 for s, _ in runs["straight"]), runs["straight"][0][1][-3000:]
    steps = _train_steps(runs["root"] / "preempted")
    assert steps == list(range(1, stop + 1)) + list(range(stop + 1, STEPS + 1))
    got, want = _params(runs["root"] / "preempted"), _params(runs["root"] / "straight")
    assert sorted(got) == sorted(want) and len(got) == 16
    for k in got:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_a_process_whose_partner_never_comes_up_gets_a_clear_error(tmp_path):
    from pythia_jax.distributed import INIT_TIMEOUT_EXIT_STATUS
    port = _free_port()
    config = REPO / "configs" / "smoke.py"
    for pid in (0, 1):  # the coordinator waiting for process 1; process 1 with no coordinator
        (status, out), = _finish([_train(pid, 2, port, config, tmp_path / "w",
                                         "--distributed_timeout=3")])
        assert status == INIT_TIMEOUT_EXIT_STATUS, out[-3000:]
        line = next(l for l in out.splitlines() if l.startswith("error: jax.distributed"))
        assert f"process {pid} of 2, coordinator 127.0.0.1:{port}" in line
        assert "waiting for the other 1" in line and "within 3 s" in line
        assert "Check failure" not in out  # our message, not JAX's abort
    assert not (tmp_path / "w").exists()


def test_bad_cluster_environment_is_refused(tmp_path):
    config = REPO / "configs" / "smoke.py"
    env = _env(5, 2, 1234)
    (status, out), = _finish([_train(5, 2, 1234, config, tmp_path / "w", env=env)])
    assert status == 2 and "error: --distributed: multi-process run: process id 5 is not in " \
        "0..1" in out, out[-3000:]
    env = _env(0, 2, 1234)
    del env["JAX_PROCESS_ID"]
    (status, out), = _finish([_train(0, 2, 1234, config, tmp_path / "w", env=env)])
    assert status == 2 and "JAX_PROCESS_ID not set" in out, out[-3000:]
    assert not (tmp_path / "w").exists()
