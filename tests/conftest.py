"""Test-wide setup: CPU only, 64-bit off, quiet libtpu, one compilation cache, shared fixtures."""

import atexit
import os
import pathlib
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# One persistent XLA compilation cache for the whole run: the pytest process, its xdist workers
# (they inherit this environment from the controller, which sets it first) and every script the
# tests start as a subprocess. Most of those scripts compile the same tiny programs; a warm cache
# halves a tiny `scripts/train.py` run (16 s -> 9 s measured). A cached executable is the one XLA
# would compile again (the key covers the program, the devices and XLA_FLAGS), so results are
# unchanged. A size limit turns on jax's file lock, so concurrent workers never read a half-written
# entry. Set JAX_COMPILATION_CACHE_DIR yourself to keep the cache between runs.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="pythia-jax-tests-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    if "PYTEST_XDIST_WORKER" not in os.environ:  # the process that made it removes it
        atexit.register(shutil.rmtree, _cache, ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(8 << 30))

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SHARED_DATA = SHARED / "data"


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    if not SHARED_DATA.is_dir():
        raise RuntimeError(f"{SHARED_DATA}: the shared reference data must sit beside the repo")
    return SHARED_DATA
