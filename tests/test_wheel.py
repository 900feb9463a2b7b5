"""The built wheel, installed into a fresh venv, run as a user runs it: from a folder that is not
the clone.

How the venv is made, and why: `python -m venv --without-pip` from the running interpreter (no
ensurepip, no download), plus one `.pth` file naming the running environment's site-packages,
so the new venv sees the already-installed dependencies (jax, flax, lm-eval, ...) offline.
`.pth` files inside a folder added that way are not executed, so the clone's editable install
(a `.pth` import hook) stays invisible: `pythia_jax` and `pythia_jax_scripts` can only come from
the wheel, installed with the running environment's pip (`--no-deps --no-index
--ignore-installed`: nothing resolved, nothing downloaded, nothing outside the new venv touched).
A real `pip install` from an index would need the network and minutes of downloads. The wheel is
built from a copy of the sources (`pip wheel --no-deps --no-build-isolation`), so the shared
checkout gets no build/ folder.
"""

import glob
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1",
               TOKENIZERS_PARALLELISM="false", **extra)
    return env


def _check(p):
    assert p.returncode == 0, (p.stdout[-3000:], p.stderr[-3000:])
    return p


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("pythia_jax", "scripts"):
        shutil.copytree(os.path.join(REPO, name), src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(REPO, name), src / name)
    _check(subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                           "--no-build-isolation", "-w", str(root / "dist"), str(src)],
                          env=_env(), capture_output=True, text=True, timeout=600))
    wheel = glob.glob(str(root / "dist" / "pythia_jax-*.whl"))
    assert len(wheel) == 1, os.listdir(root / "dist")
    venv = root / "venv"
    _check(subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)],
                          capture_output=True, text=True, timeout=300))
    py = venv / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()"
                           "['purelib'])"], capture_output=True, text=True, check=True)
    parent = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    with open(os.path.join(site.stdout.strip(), "_parent_env.pth"), "w") as fh:
        fh.write("\n".join(sorted(parent)) + "\n")
    _check(subprocess.run([str(py), "-m", "pip", "install", "--no-deps", "--no-index",
                           "--ignore-installed", wheel[0]],
                          env=_env(), capture_output=True, text=True, timeout=600))
    work = root / "work"  # not the clone: no configs/, scripts/ or pythia_jax/ here
    work.mkdir()
    return {"wheel": wheel[0], "bin": venv / "bin", "python": py, "work": work,
            "site": site.stdout.strip()}


def _command(installed, name, *args, timeout=900, **env):
    return subprocess.run([str(installed["bin"] / name), *args], cwd=installed["work"],
                          env=_env(**env), capture_output=True, text=True, timeout=timeout)


def test_wheel_ships_every_module_and_command(installed):
    """Every module of pythia_jax/ (packages are listed in pyproject.toml, not found: a new
    subpackage left out of the list fails here), every script as pythia_jax_scripts, the
    bundled configs and assets, and one console command per script."""
    names = set(zipfile.ZipFile(installed["wheel"]).namelist())
    for folder, package in (("pythia_jax", "pythia_jax"), ("scripts", "pythia_jax_scripts")):
        for dirpath, dirnames, files in os.walk(os.path.join(REPO, folder)):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            rel = os.path.relpath(dirpath, os.path.join(REPO, folder))
            for f in files:
                if f.endswith(".py") or rel == "assets":
                    want = os.path.normpath(os.path.join(package, rel, f))
                    assert want in names, (f"{want} is not in the wheel (add its package to "
                                           "[tool.setuptools] packages in pyproject.toml)")
    assert "pythia_jax/configs/smoke.py" in names and "pythia_jax/assets/20B_tokenizer.json" in names
    scripts = {f[:-3] for f in os.listdir(os.path.join(REPO, "scripts"))
               if f.endswith(".py") and f != "__init__.py"}
    commands = {f for f in os.listdir(installed["bin"]) if f.startswith("pythia-jax-")}
    assert len(commands) == len(scripts) == 14, sorted(commands)
    p = _check(subprocess.run([str(installed["python"]), "-c", "import pythia_jax, "
                              "pythia_jax_scripts; print(pythia_jax.__file__); "
                              "print(pythia_jax_scripts.__file__)"], cwd=installed["work"],
                              env=_env(), capture_output=True, text=True, timeout=300))
    for line in p.stdout.split():
        assert line.startswith(installed["site"]), f"imported from the clone: {line}"


def test_installed_generate_help(installed):
    p = _check(_command(installed, "pythia-jax-generate", "--help"))
    assert p.stdout.startswith("Continue a prompt with a Pythia model")
    assert "--max_new_tokens" in p.stdout and "--compute_dtype" in p.stdout


def test_installed_train_smoke_config_by_name(installed):
    """`pythia-jax-train --config=smoke` outside the clone: the bundled config and its bundled
    corpus, 2 steps of a shrunken model, a checkpoint and the metrics in the workdir."""
    wd = installed["work"] / "run"
    p = _check(_command(
        installed, "pythia-jax-train", "--config=smoke", f"--workdir={wd}",
        "--config.train.num_steps=2", "--config.train.log_every=1", "--config.train.seq_len=16",
        "--config.train.batch_size=2", "--config.train.eval_every=0",
        "--config.data.build_eval_rows=0", "--config.data.eval_path=",
        "--config.model.num_layers=1", "--config.model.hidden_size=32",
        "--config.model.num_heads=2", "--config.model.intermediate_size=64",
        "--config.sample.max_new_tokens=0"))
    assert "finished at step 2" in p.stdout, p.stdout
    config = json.load(open(wd / "train_config.json"))
    assert config["name"] == "smoke" and config["model"]["num_layers"] == 1
    steps = [json.loads(line)["step"] for line in open(wd / "metrics.jsonl")
             if json.loads(line)["split"] == "train"]
    assert steps == [1, 2]
    assert os.path.isdir(wd / "checkpoints") and os.listdir(wd / "checkpoints")


@pytest.mark.slow
def test_installed_lm_eval_command_on_a_local_task(installed, shared_data, tmp_path):
    """`pythia-jax-lm-eval` with lm_eval's own arguments on a local copy of lambada_openai:
    the harness runs our model (its accuracy is pythia_jax.evaluate's on the same examples)."""
    import pythia_jax
    from pythia_jax import evaluate as ev
    from pythia_jax.tokenizer import load_tokenizer
    from test_evaluate import build_lambada_model, lambada_path
    from test_lm_eval_adapter import write_task_dir

    model = build_lambada_model(shared_data, 12)
    d = tmp_path / "hf"
    pythia_jax.save_pretrained(model, d)
    tasks = write_task_dir(tmp_path / "tasks", shared_data)
    out = tmp_path / "out"
    p = _check(_command(installed, "pythia-jax-lm-eval", "--model", "pythia_jax",
                        "--model_args", f"pretrained={d}", "--tasks", "lambada_local",
                        "--include_path", str(tasks), "--limit", "12", "--batch_size", "8",
                        "--output_path", str(out), HF_HOME=str(tmp_path / "hf_home")))
    files = [os.path.join(r, f) for r, _, fs in os.walk(out) for f in fs if f.endswith(".json")]
    assert len(files) == 1, (os.listdir(out), p.stdout[-2000:])
    res = json.load(open(files[0]))["results"]["lambada_local"]
    ours = ev.evaluate_lambada(model, load_tokenizer(), lambada_path(shared_data), limit=12)
    assert res["acc,none"] == pytest.approx(ours["acc"], abs=1e-9)
    assert res["acc,none"] > 0  # the planted examples are found: a real score, not all misses
