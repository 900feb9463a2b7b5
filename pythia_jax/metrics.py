"""Training metrics: throughput / MFU arithmetic and the writers (console, JSONL, TensorBoard,
and Weights & Biases when `train.wandb_project` is set: the `wandb` extra).

Only process 0 writes; every writer appends (a resumed run continues the same files).
In a remote workdir (`gs://…`) the files are written in a local temporary folder and uploaded
through `paths` (an object store has no append): `metrics.jsonl` whole, TensorBoard event files
that changed, every `sync_secs` seconds and at `flush()` / `close()`; a resumed run first
downloads the existing `metrics.jsonl` to continue it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
from typing import Any, Mapping

import jax
import numpy as np

from pythia_jax import paths
from pythia_jax.progress import logger

_LOG = logger("train")

__all__ = ["peak_flops_per_device", "throughput", "MetricsWriter", "format_metrics",
           "MissingWandb"]

#: Dense bf16 peak FLOP/s per device (chip for TPU), matched on `device_kind` (first match wins).
_PEAK_FLOPS = (
    ("TPU v6 lite", 918e12), ("TPU v6e", 918e12), ("TPU v6", 918e12),
    ("TPU v5 lite", 197e12), ("TPU v5e", 197e12), ("TPU v5p", 459e12), ("TPU v5", 459e12),
    ("TPU v4", 275e12), ("TPU v3", 123e12), ("TPU v2", 45e12),
    ("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L4", 121e12), ("A10G", 70e12),
)


def peak_flops_per_device(configured: float = 0.0, device=None) -> float | None:
    """`configured` when > 0, else the table value for the device kind, else None (CPU)."""
    if configured and configured > 0:
        return float(configured)
    device = device or jax.devices()[0]
    kind = getattr(device, "device_kind", "") or ""
    for key, value in _PEAK_FLOPS:
        if key.lower() in kind.lower():
            return value
    return None


def throughput(steps: int, seconds: float, tokens_per_step: int, flops_per_token: float,
               num_devices: int, peak_per_device: float | None) -> dict:
    """tokens/s, achieved model FLOP/s per device and MFU (None without a peak)."""
    seconds = max(seconds, 1e-9)
    tps = steps * tokens_per_step / seconds
    flops = tps * flops_per_token
    out = {"tokens_per_sec": tps, "model_tflops_per_device": flops / num_devices / 1e12}
    out["mfu"] = (flops / (num_devices * peak_per_device)) if peak_per_device else None
    return out


def _fmt(k: str, v: Any) -> str:
    if v is None:
        return f"{k}=n/a"
    if isinstance(v, float):
        if k in ("lr",):
            return f"{k}={v:.3e}"
        if k == "mfu":
            return f"{k}={100 * v:.1f}%"
        if k in ("tokens_per_sec",):
            return f"tok/s={v:,.0f}"
        if math.isfinite(v) and abs(v) >= 1e-3:
            return f"{k}={v:.4f}"
        return f"{k}={v:.3e}"
    return f"{k}={v}"


def format_metrics(step: int, metrics: Mapping[str, Any], keys=None) -> str:
    keys = keys or ("loss", "lr", "grad_norm", "tokens_per_sec", "mfu", "nonfinite_total")
    return f"step {step}: " + " ".join(_fmt(k, metrics.get(k)) for k in keys if k in metrics)


def _drop_steps_after(path: str, step: int) -> int:
    """Rewrite the JSONL file `path` (atomically) without the lines whose "step" is > `step`;
    returns how many were dropped. Lines that are not JSON objects with a step are kept."""
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    keep = []
    for line in lines:
        try:
            rec_step = json.loads(line).get("step")
        except (ValueError, AttributeError):
            rec_step = None
        if not (isinstance(rec_step, int) and rec_step > step):
            keep.append(line if line.endswith("\n") else line + "\n")
    dropped = len(lines) - len(keep)
    if dropped:
        paths.write_text(path, "".join(keep))
    return dropped


class MissingWandb(ImportError):
    """A Weights & Biases project is configured but the `wandb` package is not installed."""


def _wandb_run(project: str, config: Mapping | None, local_dir: str | None):
    try:
        import wandb  # optional dependency (the `wandb` extra)
    except ImportError:
        raise MissingWandb(f"train.wandb_project={project!r} needs the wandb package: "
                           "pip install 'pythia-jax[wandb]' (or leave train.wandb_project empty)"
                           ) from None
    return wandb.init(project=project, config=dict(config or {}), dir=local_dir,
                      resume="allow")


class EventFile:
    """A TensorBoard event file of scalars, written in the calling thread (tensorboardX's
    record format; `tensorboardX` is the optional dependency).

    Not tensorboardX's `SummaryWriter`: that one writes from a thread of its own, so a write
    error (a full disk) kills the thread with a traceback on stderr, its queue then fills and
    the caller's next `add_scalar` blocks forever, and its exit-time callback fails again.
    Here a failed write raises where the scalar is added (or at `flush`/`close`), the file is
    closed either way, and nothing runs at exit. Buffered; flushed every `flush_secs`."""

    def __init__(self, logdir: str, flush_secs: float = 30.0, taken=None):
        """`taken(name)`: whether a file of that name exists where this folder's files end up
        (a remote workdir's bucket folder, which the local staging folder does not show)."""
        import socket

        from tensorboardX.proto import event_pb2
        from tensorboardX.record_writer import RecordWriter
        from tensorboardX.summary import scalar

        self._event, self._scalar = event_pb2.Event, scalar
        os.makedirs(logdir, exist_ok=True)
        # TensorBoard reads every file with "tfevents" in its name; the pid and a count keep a
        # resume within the same second from truncating (or, in a bucket, replacing) the
        # earlier run's file
        stem = (f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}."
                f"{os.getpid()}")
        name, n = stem, 0
        while os.path.exists(os.path.join(logdir, name)) or (taken is not None and taken(name)):
            n += 1
            name = f"{stem}.{n}"
        self.path = os.path.join(logdir, name)
        self._records = RecordWriter(self.path)
        self._flush_secs = float(flush_secs)
        self._flushed_at = time.monotonic()
        try:
            self._write(self._event(wall_time=time.time(), file_version="brain.Event:2"))
        except BaseException:
            self._records.close()
            raise

    def _write(self, event) -> None:
        self._records.write(event.SerializeToString())

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self._write(self._event(wall_time=time.time(), step=int(step),
                                summary=self._scalar(tag, float(value))))
        if time.monotonic() - self._flushed_at >= self._flush_secs:
            self.flush()

    def flush(self) -> None:
        self._records.flush()  # flush and fsync
        self._flushed_at = time.monotonic()

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self._records.close()  # closes the file even when its last flush fails


class MetricsWriter:
    """Console progress bar + `metrics.jsonl` + TensorBoard event files in `workdir` (a local
    folder or a URL; see the module docstring for remote workdirs).

    On processes other than 0 every method is a no-op.
    """

    def __init__(self, workdir: str, *, total_steps: int, initial_step: int = 0,
                 progress_bar: bool = True, jsonl_name: str = "metrics.jsonl",
                 tensorboard_dir: str = "tensorboard", enabled: bool | None = None,
                 sync_secs: float = 30.0, resume_step: int | None = None,
                 wandb_project: str | None = None, wandb_config: Mapping | None = None):
        """resume_step: the step a resumed run continues from; lines of `metrics.jsonl` for
        later steps (logged by the earlier run after its last checkpoint, and about to be
        logged again) are dropped first, so every step appears once.
        wandb_project: also log every scalar to this Weights & Biases project (the `wandb`
        extra; off when empty; `WANDB_MODE=offline` keeps the run in local files). `close()`
        finishes the run; wandb's service writes its last records after that, and they are on
        disk once the process exits (or after `wandb.teardown()`)."""
        self.enabled = (jax.process_index() == 0) if enabled is None else enabled
        workdir = os.fspath(workdir)
        self.jsonl_path = paths.join(workdir, jsonl_name)
        self.tensorboard_path = paths.join(workdir, tensorboard_dir)
        self._jsonl = None
        self._tb = None
        self._bar = None
        self._wandb = None
        self._staging = None  # local folder of a remote workdir's files
        self._sync_secs = float(sync_secs)
        self._synced_at = time.monotonic()
        self._sync_state: dict = {}
        if not self.enabled:
            return
        local_jsonl, local_tb = self.jsonl_path, self.tensorboard_path
        if paths.is_remote(workdir):
            paths.check_available(workdir)
            self._staging = tempfile.mkdtemp(prefix="pythia-jax-metrics-")
            local_jsonl = os.path.join(self._staging, jsonl_name)
            local_tb = os.path.join(self._staging, tensorboard_dir)
            if paths.exists(self.jsonl_path):  # a resumed run continues the file
                paths.download(self.jsonl_path, local_jsonl)
        self.dropped_lines = 0
        if resume_step is not None and os.path.exists(local_jsonl):
            self.dropped_lines = _drop_steps_after(local_jsonl, int(resume_step))
        try:
            self._jsonl = open(local_jsonl, "a", encoding="utf-8")
            self._local_tb = local_tb
            try:
                taken = (None if self._staging is None else
                         lambda name: paths.exists(paths.join(self.tensorboard_path, name)))
                self._tb = EventFile(local_tb, flush_secs=30, taken=taken)
            except ImportError:  # optional dependency: log to the console and JSONL only
                self._tb = None
            if wandb_project:
                self._wandb = _wandb_run(str(wandb_project), wandb_config,
                                         self._staging or (workdir if os.path.isdir(workdir) else None))
            if progress_bar:
                from tqdm import tqdm
                self._bar = tqdm(total=total_steps, initial=initial_step, unit="step",
                                 dynamic_ncols=True, file=sys.stderr, smoothing=0.1)
        except BaseException:  # e.g. MissingWandb: close what was opened (no writer thread left)
            self.close()
            raise

    def write(self, step: int, metrics: Mapping[str, Any], *, prefix: str = "train",
              console: bool = True) -> None:
        if not self.enabled:
            return
        clean = {}
        for k, v in metrics.items():
            if isinstance(v, (bool, np.bool_)):
                v = bool(v)
            elif isinstance(v, (int, np.integer)):
                v = int(v)
            elif isinstance(v, (float, np.floating)):
                v = float(v)
            clean[k] = v
        record = {"step": int(step), "split": prefix, "time": time.time(), **clean}
        self._jsonl.write(json.dumps(record, allow_nan=True) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in clean.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(f"{prefix}/{k}", v, int(step))
        if self._wandb is not None:
            self._wandb.log({f"{prefix}/{k}": v for k, v in clean.items()
                             if isinstance(v, (int, float)) and not isinstance(v, bool)},
                            step=int(step))
        if self._staging is not None and time.monotonic() - self._synced_at >= self._sync_secs:
            self.flush()
        if console:
            line = (format_metrics(step, clean) if prefix == "train"
                    else f"step {step}: " + " ".join(f"{prefix}_{_fmt(k, v)}"
                                                      for k, v in clean.items()))
            self.print(line)
        if self._bar is not None and prefix == "train":
            post = {k: clean[k] for k in ("loss", "lr") if isinstance(clean.get(k), float)}
            self._bar.set_postfix({k: (f"{v:.3e}" if k == "lr" else f"{v:.4f}")
                                   for k, v in post.items()}, refresh=False)

    def advance(self, step: int) -> None:
        if self._bar is not None:
            self._bar.update(step - self._bar.n)

    def print(self, line: str) -> None:
        """A console line (process 0): the `pythia_jax.train` logger at INFO, which
        `progress.console` writes above the progress bar."""
        if self.enabled:
            _LOG.info(line)

    def flush(self) -> None:
        """Flush the files (and upload them, for a remote workdir)."""
        if self._jsonl is not None:
            self._jsonl.flush()
        if self._tb is not None:
            self._tb.flush()
        self._sync()

    def _sync(self) -> None:
        if self._staging is None or self._jsonl is None:
            return
        paths.upload(self._jsonl.name, self.jsonl_path)
        if os.path.isdir(self._local_tb):
            paths.sync_up(self._local_tb, self.tensorboard_path, self._sync_state)
        self._synced_at = time.monotonic()

    def close(self) -> None:
        """Close every part; when one fails (a full disk) the others are still closed before the
        error goes on, and no event file is left open for an exit-time flush to fail on."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        tb, self._tb = self._tb, None
        try:
            if tb is not None:
                tb.close()
        finally:
            self._close_rest()

    def _close_rest(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
        try:
            if self._jsonl is not None:
                self._jsonl.flush()
                self._sync()
        finally:
            if self._jsonl is not None:
                self._jsonl.close()
                self._jsonl = None
            if self._staging is not None:
                shutil.rmtree(self._staging, ignore_errors=True)
                self._staging = None
