"""A real GCS server for tests: `gcp-storage-emulator` on a free 127.0.0.1 port (no network).

Reuse in any test module (the data tests do too):

    from gcs_utils import gcs, gcs_emulator  # noqa: F401  (pytest fixtures)

    def test_x(gcs):                 # gcs: GcsEnv, the environment already pointed at the server
        url = gcs.url("my/file")     # gs://<bucket>/<unique test prefix>/my/file
        gcs.fs.pipe(url, b"...")     # a gcsfs filesystem on the emulator
        subprocess.run([...], env=gcs.env)   # the same settings for a child process

`gcs_emulator` (session scope) starts the server once (subprocess, waits until it answers,
kills it at the end). `gcs` (function scope) sets, through `monkeypatch` only:
`STORAGE_EMULATOR_HOST` (gcsfs), `TENSORSTORE_GCS_HTTP_URL` (orbax's tensorstore),
`GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false` (else gcsfs probes every bucket over gRPC and waits
60 s; it is read when gcsfs is imported, so an already imported gcsfs is switched to its plain
filesystem class here too) and anonymous credentials (`FSSPEC_GCS_TOKEN=anon`, fsspec's config),
and clears the cached filesystems so each test starts clean. Each test gets its own prefix in
the one bucket.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid

import pytest

BUCKET = "pythia-jax-test"


# The emulator leaves out the generation headers real GCS sends with an object's bytes
# (`x-goog-generation`, `x-goog-metageneration`); tensorstore reads an OCDBT manifest's
# generation from them ("Malformed StorageGeneration" without). The launcher adds them.
_LAUNCHER = """
import sys
from gcp_storage_emulator.handlers import objects
_download = objects.download
def download(request, response, storage, *args, **kwargs):
    try:
        obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    except Exception:
        obj = None
    if obj:
        response["x-goog-generation"] = str(obj.get("generation", "1"))
        response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
    return _download(request, response, storage, *args, **kwargs)
objects.download = download
from gcp_storage_emulator.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclasses.dataclass
class GcsEmulator:
    host: str  # http://127.0.0.1:PORT
    bucket: str

    def env(self) -> dict[str, str]:
        """The variables that point gcsfs, tensorstore and fsspec at this server."""
        return {"STORAGE_EMULATOR_HOST": self.host, "TENSORSTORE_GCS_HTTP_URL": self.host,
                "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false", "FSSPEC_GCS_TOKEN": "anon",
                "FSSPEC_GS_TOKEN": "anon", "NO_GCE_CHECK": "true"}


@pytest.fixture(scope="session")
def gcs_emulator(tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("gcs-emulator") / "emulator.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-c", _LAUNCHER, "start", "--host=127.0.0.1", f"--port={port}", "--in-memory",
             f"--default-bucket={BUCKET}", "-q"], stdout=fh, stderr=subprocess.STDOUT)
    host = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"{host}/storage/v1/b/{BUCKET}", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"gcp-storage-emulator did not come up on {host}: "
                               f"{log.read_text()[-2000:]}")
        time.sleep(0.2)
    try:
        yield GcsEmulator(host, BUCKET)
    finally:
        proc.kill()
        proc.wait()


@dataclasses.dataclass
class GcsEnv:
    emulator: GcsEmulator
    prefix: str  # gs://bucket/<unique>
    env: dict  # os.environ plus the emulator settings, for subprocesses
    fs: object  # gcsfs filesystem on the emulator

    def url(self, rel: str = "") -> str:
        return f"{self.prefix}/{rel}" if rel else self.prefix

    def list(self, rel: str = "") -> list[str]:
        """Every object under the test's prefix (or `rel` below it), as paths relative to it."""
        root = self.url(rel)[len("gs://"):]
        return sorted(p[len(self.prefix) - len("gs://") + 1:] for p in self.fs.find(root))


def _clear_filesystem_caches() -> None:
    import fsspec
    from etils.epath import backend

    from pythia_jax import paths
    paths._filesystem.cache_clear()
    backend.fsspec_backend._get_filesystem.cache_clear()
    for proto in ("gs", "gcs"):
        cls = fsspec.registry.get(proto)
        if cls is not None:
            cls.clear_instance_cache()


@pytest.fixture
def gcs(gcs_emulator, monkeypatch):
    import fsspec
    for k, v in gcs_emulator.env().items():
        monkeypatch.setenv(k, v)
    for proto in ("gs", "gcs"):  # fsspec read FSSPEC_* when it was imported: set it directly too
        monkeypatch.setitem(fsspec.config.conf, proto,
                            {**fsspec.config.conf.get(proto, {}), "token": "anon"})
    if "gcsfs" in sys.modules:  # imported before the variable was set: use the plain class
        import gcsfs
        import gcsfs.core
        monkeypatch.setattr(gcsfs, "GCSFileSystem", gcsfs.core.GCSFileSystem)
        import fsspec.registry  # noqa: F401
        fsspec_registry = sys.modules["fsspec.registry"]
        for proto in ("gs", "gcs"):
            if proto in fsspec_registry._registry:
                monkeypatch.setitem(fsspec_registry._registry, proto, gcsfs.core.GCSFileSystem)
    _clear_filesystem_caches()
    fs = fsspec.filesystem("gs", use_listings_cache=False)
    yield GcsEnv(gcs_emulator, f"gs://{gcs_emulator.bucket}/{uuid.uuid4().hex[:12]}",
                 {**os.environ}, fs)
    _clear_filesystem_caches()
