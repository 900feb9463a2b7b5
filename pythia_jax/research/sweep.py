"""Checkpoint sweeps: one task (a callable model -> metrics) over many checkpoints of one model.

    rows = sweep("EleutherAI/pythia-160m", "step1000,step2000,main", task, "results.csv")

* Revisions: a hub id with branch names (`all` = Pythia's 154 `step{N}` branches), a training
  workdir with step numbers (`all` = every saved step), or a local folder holding one model
  directory per revision (`DIR/step1000/`, ...).
* One compile for the whole sweep: every checkpoint of a model has the same config, and the
  task's jitted programs take the weights as arguments; the `compiles` column counts the XLA
  compilations each revision triggered (0 after the first when shapes are fixed).
* The next checkpoint is read (and fingerprinted) on a background thread while the current one
  computes.
* Resumable: revisions already in the CSV are skipped; each finished revision is appended and
  fsync'ed (a kill loses at most the revision in flight; a torn last line is dropped on resume).
* Each revision's parameters are fingerprinted (sha256 over names, shapes, dtypes and bytes); a
  revision whose weights equal an earlier one's gets `same_weights_as` set and a warning
  (several Pythia hub branches serve another step's weights: pythia issues #195, #205, #206).
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import hashlib
import io
import os
import re
import tempfile
import threading
import time
import warnings
from typing import Callable, Mapping, Sequence

import jax
import numpy as np
from flax import nnx

import pythia_jax
from pythia_jax import paths
from pythia_jax.research.stream import PYTHIA_CHECKPOINT_STEPS

__all__ = ["Revision", "SweepError", "resolve_revisions", "fingerprint", "sweep", "plot_sweep",
           "read_results", "CompileCounter", "BASE_COLUMNS", "pythia_revisions"]

BASE_COLUMNS = ("revision", "step", "fingerprint", "same_weights_as", "compiles", "seconds")
_STEP_NAME = re.compile(r"step(\d+)")
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
_REF_NAME = re.compile(r"[\w][\w./-]*")


class SweepError(ValueError):
    """A sweep input that cannot work (bad revision names, missing checkpoints, bad CSV)."""


@dataclasses.dataclass(frozen=True)
class Revision:
    """One checkpoint: `name` (the CSV key), its training step (None if unknown), and what
    `pythia_jax.from_pretrained` gets: `source` and the hub `revision`."""
    name: str
    step: int | None
    source: str
    revision: str | None = None


def pythia_revisions() -> list[str]:
    return [f"step{s}" for s in PYTHIA_CHECKPOINT_STEPS]


def _split(spec) -> list[str]:
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else \
        [str(s).strip() for s in spec]
    if not names or any(not n for n in names):
        raise SweepError(f"revisions: expected a comma-separated list of names (or 'all'), "
                         f"got {spec!r}")
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise SweepError(f"revisions: {dup!r} is listed twice")
    return names


def _is_model_dir(path: str) -> bool:
    return (os.path.isfile(os.path.join(path, "config.json"))
            or os.path.isfile(os.path.join(path, "pythia_jax_config.json")))


def _workdir_steps(path: str) -> dict[int, str]:
    base = os.path.join(path, "checkpoints")
    if not os.path.isdir(base):
        return {}
    out = {}
    for n in os.listdir(base):
        d = os.path.join(base, n)
        if n.isdigit() and os.path.isdir(d) and _is_model_dir(d):
            out[int(n)] = d
    return dict(sorted(out.items()))


def _step_of(name: str) -> int | None:
    m = _STEP_NAME.fullmatch(name)
    return int(m.group(1)) if m else None


def resolve_revisions(model: str, revisions="all") -> list[Revision]:
    """The checkpoints a sweep visits, in order (see the module docstring for the forms)."""
    model = os.fspath(model)
    if os.path.isdir(model):
        steps = _workdir_steps(model)
        if steps:  # a training workdir: revisions are step numbers (N or stepN)
            if revisions == "all":
                return [Revision(f"step{s}", s, d) for s, d in steps.items()]
            out = []
            for n in _split(revisions):
                s = int(n) if n.isdigit() else _step_of(n)
                if s is None or s not in steps:
                    raise SweepError(f"revision {n!r}: no checkpoint step of that name in "
                                     f"{model}/checkpoints (expected N or stepN, one of "
                                     f"{', '.join(map(str, steps))})")
                if any(r.step == s for r in out):
                    raise SweepError(f"revision {n!r}: step {s} is listed twice")
                out.append(Revision(f"step{s}", s, steps[s]))
            return out
        subs = sorted((n for n in os.listdir(model)
                       if _is_model_dir(os.path.join(model, n))),
                      key=lambda n: (_step_of(n) is None, _step_of(n) or 0, n))
        if not subs:
            raise SweepError(f"{model}: neither a training workdir (checkpoints/N/) nor a folder "
                             "of revision directories (DIR/step1000/config.json, ...)")
        names = subs if revisions == "all" else _split(revisions)
        for n in names:
            if n not in subs:
                raise SweepError(f"revision {n!r}: no model directory {os.path.join(model, n)} "
                                 f"(this folder has {', '.join(subs)})")
        return [Revision(n, _step_of(n), os.path.join(model, n)) for n in names]
    if not _HUB_ID.fullmatch(model):
        raise SweepError(f"{model}: no such directory, and not a hub id like "
                         "'EleutherAI/pythia-160m'")
    pythia = model.lower().startswith("eleutherai/pythia-")
    names = pythia_revisions() if revisions == "all" else _split(revisions)
    out = []
    for n in names:
        s = _step_of(n)
        if pythia and n != "main" and (s is None or s not in PYTHIA_CHECKPOINT_STEPS):
            raise SweepError(f"revision {n!r}: Pythia's hub branches are main and step{{N}} for "
                             "N in 0, 1, 2, 4, ..., 512, 1000, 2000, ..., 143000")
        if not _REF_NAME.fullmatch(n):
            raise SweepError(f"revision {n!r}: not a branch name")
        if pythia and n == "main":
            s = PYTHIA_CHECKPOINT_STEPS[-1]
        out.append(Revision(n, s, model, n))
    return out


def fingerprint(model) -> str:
    """sha256 (hex) over every parameter's path, shape, dtype and bytes, in path order."""
    h = hashlib.sha256()
    flat = sorted(((".".join(str(p) for p in path), v.get_value())
                   for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))),
                  key=lambda kv: kv[0])
    for name, x in flat:
        a = np.asarray(jax.device_get(x))
        h.update(f"{name}:{a.shape}:{a.dtype.str};".encode())
        h.update(np.ascontiguousarray(a).view(np.uint8).tobytes())
    return h.hexdigest()


class CompileCounter:
    """Counts XLA backend compilations (process-wide) while active."""

    _EVENT = "/jax/core/compile/backend_compile_duration"
    _lock = threading.Lock()
    _count = 0
    _registered = False

    @classmethod
    def _listener(cls, event, duration, **_):
        if event == cls._EVENT:
            with cls._lock:
                cls._count += 1

    @classmethod
    def total(cls) -> int:
        with cls._lock:
            if not cls._registered:
                jax.monitoring.register_event_duration_secs_listener(cls._listener)
                cls._registered = True
            return cls._count


# ------------------------------------------------------------------------------------------------
# The results file
def read_results(path: str) -> tuple[list[str] | None, list[dict]]:
    """(header, rows) of a sweep CSV; a torn last line (no newline: a kill mid-write) is
    ignored. Raises SweepError naming the line for anything else malformed."""
    if not os.path.exists(path):
        return None, []
    with open(path, newline="") as fh:
        text = fh.read()
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
    lines = list(csv.reader(io.StringIO(text)))
    if not lines:
        return None, []
    header = lines[0]
    if tuple(header[: len(BASE_COLUMNS)]) != BASE_COLUMNS:
        raise SweepError(f"{path}: line 1: expected a sweep results header starting with "
                         f"{','.join(BASE_COLUMNS)}, got {','.join(header)!r} (another "
                         "file? use a new --out)")
    rows = []
    for k, line in enumerate(lines[1:], start=2):
        if len(line) != len(header):
            raise SweepError(f"{path}: line {k}: expected {len(header)} fields, got "
                             f"{len(line)}")
        rows.append(dict(zip(header, line)))
    return header, rows


def _append(path: str, text: str) -> None:
    with open(path, "a", newline="") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def _drop_torn_tail(path: str) -> None:
    with open(path, "rb+") as fh:
        data = fh.read()
        if data and not data.endswith(b"\n"):
            fh.truncate(data.rfind(b"\n") + 1)


def _csv_line(values) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow(values)
    return buf.getvalue()


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return repr(v)
    return str(v)


# ------------------------------------------------------------------------------------------------
def sweep(model: str, revisions, task: Callable[[object], Mapping[str, float]], out: str, *,
          dtype=None, compute_dtype: str | None = None, loader: Callable | None = None,
          log: Callable[[str], None] | None = print) -> list[dict]:
    """Run `task(model) -> {metric: value}` on every revision; append one CSV row each.

    Returns every row of the results file (earlier runs' included), as dicts of strings.
    `loader(revision) -> GPTNeoX` replaces `pythia_jax.from_pretrained` (e.g. to add a mesh).
    """
    revs = resolve_revisions(model, revisions) if not (
        isinstance(revisions, list) and revisions and isinstance(revisions[0], Revision)) \
        else revisions
    out = os.fspath(out)
    header, done = read_results(out)
    if header is not None:
        _drop_torn_tail(out)
    by_name = {r["revision"]: r for r in done}
    fps = {r["fingerprint"]: r["revision"] for r in done}
    todo = [r for r in revs if r.name not in by_name]
    if log and len(todo) < len(revs):
        log(f"sweep: {len(revs) - len(todo)} revision(s) already in {out}; "
            f"{len(todo)} to run")

    def load(rev: Revision):
        if loader is not None:
            m = loader(rev)
        else:
            m = pythia_jax.from_pretrained(rev.source, revision=rev.revision, dtype=dtype,
                                           compute_dtype=compute_dtype)
        return m, fingerprint(m)

    config = None
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        nxt = pool.submit(load, todo[0]) if todo else None
        for i, rev in enumerate(todo):
            try:
                m, fp = nxt.result()
            except (OSError, ValueError) as e:
                raise SweepError(f"revision {rev.name!r} ({rev.source}): {e}") from e
            nxt = pool.submit(load, todo[i + 1]) if i + 1 < len(todo) else None
            if config is not None and m.config != config:
                raise SweepError(f"revision {rev.name!r}: model config differs from the "
                                 "earlier revisions' (a sweep compares checkpoints of one model)")
            config = m.config
            c0, t0 = CompileCounter.total(), time.perf_counter()
            metrics = dict(task(m))
            metrics = {k: float(v) for k, v in metrics.items()}
            jax.effects_barrier()
            secs, compiles = time.perf_counter() - t0, CompileCounter.total() - c0
            same = fps.get(fp)
            if same is not None:
                warnings.warn(f"revision {rev.name!r} has the same weights as {same!r} "
                              f"(fingerprint {fp[:12]}): the checkpoint probably serves the "
                              "wrong step (see pythia issues #195, #205, #206)", stacklevel=2)
            else:
                fps[fp] = rev.name
            if header is None:
                header = list(BASE_COLUMNS) + sorted(metrics)
                tmp = out + ".tmp"
                with open(tmp, "w", newline="") as fh:
                    fh.write(_csv_line(header))
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, out)
            cols = header[len(BASE_COLUMNS):]
            if sorted(metrics) != sorted(cols):
                raise SweepError(f"{out}: revision {rev.name!r}: the task returned metrics "
                                 f"{sorted(metrics)}, the file has columns {cols} (another "
                                 "task? use a new --out)")
            row = {"revision": rev.name, "step": rev.step, "fingerprint": fp,
                   "same_weights_as": same, "compiles": compiles, "seconds": round(secs, 3),
                   **metrics}
            _append(out, _csv_line([_fmt(row[c]) for c in header]))
            if log:
                shown = ", ".join(f"{k}={v:.6g}" for k, v in metrics.items())
                log(f"sweep: {rev.name}: {shown} ({secs:.1f}s, {compiles} compile(s)"
                    f"{', SAME WEIGHTS AS ' + same if same else ''})")
            del m
    return read_results(out)[1]


def plot_sweep(rows: Sequence[Mapping[str, str]], metric: str, path: str, *,
               title: str | None = None) -> str:
    """PNG of `metric` against step (symmetric-log x axis: Pythia's early steps are
    log-spaced, and step 0 stays on the plot); revisions flagged with equal weights are
    marked. Written to a temporary name and renamed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = []
    for r in rows:
        if metric not in r:
            raise SweepError(f"plot: no column {metric!r} (have "
                             f"{', '.join(k for k in r if k not in BASE_COLUMNS)})")
        if r.get("step", "") == "" or r[metric] == "":
            continue
        pts.append((int(r["step"]), float(r[metric]), bool(r.get("same_weights_as"))))
    if not pts:
        raise SweepError("plot: no revision with a known step to plot")
    pts.sort()
    x = np.array([p[0] for p in pts], float)
    y = np.array([p[1] for p in pts], float)
    dup = np.array([p[2] for p in pts], bool)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(x, y, "o-", ms=3, lw=1, label=metric)
    if dup.any():
        ax.plot(x[dup], y[dup], "x", color="red", ms=8, label="same weights as another step")
    ax.set_xscale("symlog", linthresh=1.0)
    ax.set_xlabel("training step")
    ax.set_ylabel(metric)
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        with paths.sigterm_held():  # no SIGTERM between the creation and the cleanup block
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=".plot.", suffix=".png")
        os.close(fd)
        fig.savefig(tmp, format="png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
    return path
