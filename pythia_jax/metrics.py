"""Training metrics: throughput / MFU arithmetic and the writers (console, JSONL, TensorBoard).

Only process 0 writes; every writer appends (a resumed run continues the same files).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Mapping

import jax
import numpy as np

__all__ = ["peak_flops_per_device", "throughput", "MetricsWriter", "format_metrics"]

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


class MetricsWriter:
    """Console progress bar + `metrics.jsonl` + TensorBoard event files in `workdir`.

    On processes other than 0 every method is a no-op.
    """

    def __init__(self, workdir: str, *, total_steps: int, initial_step: int = 0,
                 progress_bar: bool = True, jsonl_name: str = "metrics.jsonl",
                 tensorboard_dir: str = "tensorboard", enabled: bool | None = None):
        self.enabled = (jax.process_index() == 0) if enabled is None else enabled
        self.jsonl_path = os.path.join(workdir, jsonl_name)
        self._jsonl = None
        self._tb = None
        self._bar = None
        if not self.enabled:
            return
        self._jsonl = open(self.jsonl_path, "a", encoding="utf-8")
        try:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(logdir=os.path.join(workdir, tensorboard_dir),
                                     purge_step=None, flush_secs=30)
        except ImportError:  # optional dependency: log to the console and JSONL only
            self._tb = None
        if progress_bar:
            from tqdm import tqdm
            self._bar = tqdm(total=total_steps, initial=initial_step, unit="step",
                             dynamic_ncols=True, file=sys.stderr, smoothing=0.1)

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
                    self._tb.add_scalar(f"{prefix}/{k}", v, global_step=int(step))
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
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(line, file=sys.stdout)
        else:
            print(line, flush=True)

    def flush(self) -> None:
        if self._jsonl is not None:
            self._jsonl.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
