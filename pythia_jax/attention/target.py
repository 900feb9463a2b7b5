"""The platform that attention is traced for: the one explicit place of the backend choice.

By default that is the platform this process computes on (`jax.default_backend()`). Programs
compiled for another platform than the one running the trace (a TPU step compiled deviceless on a
CPU host with `libtpu`: `pythia_jax.aot`, `attention.tpu_compile`) say so with

    with attention.target_platform("tpu"):
        compiled = jax.jit(step).lower(...).compile()

Everything that picks a code path per platform reads `current_platform()` at trace time: the
`auto` dispatch (`resolve_impl`), Pallas interpret mode of our kernel and of splash
(`resolve_interpret`: interpret on CPU, Mosaic on TPU), the query blocks of the XLA reference and
the cuDNN check. The target is a `jax.make_user_context`, part of JAX's trace and compile cache
keys: a jitted function traced for one platform is traced anew for another, never reused.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import jax

__all__ = ["PLATFORMS", "target_platform", "current_platform", "resolve_interpret"]

#: Platforms attention can be traced for ("gpu" covers CUDA and ROCm).
PLATFORMS = ("cpu", "gpu", "tpu")

#: None (this process's backend) or one of PLATFORMS; in JAX's jit cache key.
_TARGET = jax.make_user_context(default_value=None)


def _normalize(platform: str) -> str:
    platform = str(platform).lower()
    return "gpu" if platform in ("cuda", "rocm") else platform


@contextlib.contextmanager
def target_platform(platform: str | None) -> Iterator[str]:
    """Trace attention for `platform` ("cpu", "gpu" or "tpu"; None = this process's backend)
    inside the block; yields the platform in force."""
    if platform is not None:
        platform = _normalize(platform)
        if platform not in PLATFORMS:
            raise ValueError(f"target_platform: expected one of {PLATFORMS} or None, got "
                             f"{platform!r}")
    with _TARGET(platform):
        yield current_platform()


def current_platform() -> str:
    """The platform attention is traced for: the innermost `target_platform`, else JAX's
    default backend ("cpu", "gpu" or "tpu")."""
    platform = _TARGET.value
    return platform if platform is not None else _normalize(jax.default_backend())


def resolve_interpret(interpret, impl: str):
    """Pallas `interpret` for a TPU kernel `impl`: an explicit value is kept; None means
    interpret mode on CPU and the real Mosaic kernel on TPU (other platforms: a clear error)."""
    if interpret is not None:
        return interpret
    platform = current_platform()
    if platform == "cpu":
        return True
    if platform != "tpu":
        raise ValueError(
            f"attention_impl={impl!r} is a TPU (Mosaic) kernel; the target platform is "
            f"{platform!r}. Use 'cudnn' or 'auto' on GPU, or pass interpret=True.")
    return False
