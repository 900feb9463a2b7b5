"""Two local processes (jax.distributed over 127.0.0.1, gloo CPU collectives, four fake devices
each) train three steps with `train.train` and get the same losses as one process with eight
devices; metrics are written once (process 0) and the collectively written checkpoint restores.

Each run is a subprocess: `python tests/test_multihost.py worker PID NPROC PORT WORKDIR DATA OUT`.
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
MESH = (1, 4, 2)      # fsdp spans both processes; tensor inside each process
STEPS = 3
TIMEOUT = 420


def _config(data_prefix: str):
    sys.path.insert(0, str(REPO / "tests"))
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
    c.sample.max_new_tokens = 0
    c.checkpoint.extra_steps = ()
    c.checkpoint.every = 0
    c.checkpoint.rolling_every = 0
    c.checkpoint.save_final = True
    return c


def _worker(pid: int, nproc: int, port: int, workdir: str, data: str, out: str) -> None:
    from pythia_jax import distributed
    started = distributed.initialize(f"127.0.0.1:{port}", nproc, pid)
    import jax

    from pythia_jax import train
    summary = train.train(_config(data), workdir)
    # The final parameters, gathered from both processes, for checking the checkpoint exactly.
    from jax.experimental import multihost_utils
    params = multihost_utils.process_allgather(summary["state"].params, tiled=True)
    if jax.process_index() == 0:
        flat = {jax.tree_util.keystr(p): np.asarray(x)
                for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
        np.savez(pathlib.Path(out, f"params_{nproc}.npz"), **flat)
    result = {
        "pid": pid, "started_distributed": started,
        "process_index": jax.process_index(), "process_count": jax.process_count(),
        "device_count": jax.device_count(), "local_device_count": jax.local_device_count(),
        "losses": [h["loss"] for h in summary["history"]],
        "end_step": summary["end_step"],
    }
    pathlib.Path(out, f"result_{pid}_of_{nproc}.json").write_text(json.dumps(result))
    if started:
        jax.distributed.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(pid, nproc, port, workdir, data, out, devices):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1",
               PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(k, None)
    return subprocess.Popen(
        [sys.executable, __file__, "worker", str(pid), str(nproc), str(port), str(workdir),
         str(data), str(out)], env=env, cwd=REPO, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)


def _run_all(procs) -> list[str]:
    """Wait for every process (killing all of them on timeout or failure); their outputs."""
    outputs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=TIMEOUT)
            outputs.append(out)
            if p.returncode != 0:
                raise RuntimeError(f"worker exited {p.returncode}:\n{out[-5000:]}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return outputs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from pythia_jax.data.indexed import write_indexed_dataset

    root = tmp_path_factory.mktemp("multihost")
    rows = np.random.RandomState(0).randint(0, 256, size=(16 * STEPS, 17))
    data = root / "rows"
    write_indexed_dataset(str(data), rows.tolist(), vocab_size=256)
    out = root / "out"
    out.mkdir()
    port = _free_port()
    try:
        _run_all([_start(i, 2, port, root / "multi", data, out, 4) for i in range(2)])
        _run_all([_start(0, 1, 0, root / "single", data, out, 8)])
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        pytest.fail(f"multi-host run failed: {e}")
    res = {p.stem: json.loads(p.read_text()) for p in out.glob("result_*.json")}
    return root, res


@pytest.mark.slow
def test_two_processes_match_one_process(runs):
    _, res = runs
    a, b, single = res["result_0_of_2"], res["result_1_of_2"], res["result_0_of_1"]
    for r, pid in ((a, 0), (b, 1)):
        assert r["started_distributed"] and r["process_count"] == 2 and r["process_index"] == pid
        assert r["device_count"] == 8 and r["local_device_count"] == 4
    assert not single["started_distributed"] and single["process_count"] == 1
    assert single["device_count"] == 8
    assert len(single["losses"]) == STEPS and a["end_step"] == STEPS
    assert a["losses"] == b["losses"]  # both processes report the same global loss
    np.testing.assert_allclose(a["losses"], single["losses"], rtol=1e-5)
    assert len(set(single["losses"])) == STEPS  # three different batches


@pytest.mark.slow
def test_metrics_once_and_checkpoint_written_collectively(runs):
    import jax
    from flax import nnx

    from pythia_jax import checkpoint as ckpt_lib
    root, _ = runs
    out = root / "out"
    lines = [json.loads(l) for l in (root / "multi" / "metrics.jsonl").read_text().splitlines()]
    train_lines = [l for l in lines if l.get("split") == "train"]
    assert [l.get("step") for l in train_lines] == list(range(1, STEPS + 1)), lines
    for run, nproc in (("multi", 2), ("single", 1)):
        # the final checkpoint, restored here on one device, holds exactly the parameters the
        # processes ended with (each process wrote its own shards)
        model = ckpt_lib.load_model(str(root / run))
        flat = {"".join(f"[{p!r}]" for p in path): np.asarray(v.get_value())
                for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
        want = np.load(out / f"params_{nproc}.npz")
        assert sorted(flat) == sorted(want.files) and len(flat) == 16
        for k in flat:
            np.testing.assert_array_equal(flat[k], want[k], err_msg=f"{run} {k}")
    # multi vs single process: the same run up to float rounding. Adam's division by sqrt(v)
    # turns rounding noise in zero-gradient elements (the key bias) into ~lr-sized noise, so
    # the parameters are compared at the scale of one update, the losses (above) at 1e-5.
    a, b = np.load(out / "params_2.npz"), np.load(out / "params_1.npz")
    for k in a.files:
        np.testing.assert_allclose(a[k], b[k], rtol=0, atol=1e-4, err_msg=k)
    assert jax.device_count() == 1


if __name__ == "__main__" and len(sys.argv) == 8 and sys.argv[1] == "worker":
    _worker(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6],
            sys.argv[7])
