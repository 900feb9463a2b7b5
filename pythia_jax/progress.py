"""What long jobs show on the terminal: an optional tqdm progress bar and the status lines.

Status lines (training's step lines, "resumed from …", checkpoint notes) go to the standard
`logging` logger `pythia_jax` (children `pythia_jax.train`, …), not to `print`. A job that talks
to a terminal calls `console()`: unless that logger (or one of its children) already has a
handler, it gets one that writes the bare message to stdout, above any tqdm bar, and stops those
records from reaching the root logger (absl's handler would print them a second time, prefixed);
either way the logger's level becomes INFO unless you set one. So:

    logging.getLogger("pythia_jax").setLevel(logging.WARNING)   # quiet
    logging.getLogger("pythia_jax").addHandler(my_handler)       # your format / file; then
                                                                  # `console()` adds nothing
"""

from __future__ import annotations

import logging
import sys

__all__ = ["progress_bar", "logger", "console"]

ROOT = "pythia_jax"


class _NullBar:
    def update(self, n=1):
        pass

    def close(self):
        pass


def progress_bar(total, desc: str, enabled: bool, **tqdm_kwargs):
    """A tqdm bar (imported only when enabled) or an object with the same update/close."""
    if enabled:
        from tqdm import tqdm
        return tqdm(total=total, desc=desc, **tqdm_kwargs)
    return _NullBar()


def logger(name: str) -> logging.Logger:
    """The logger `pythia_jax.<name>`."""
    return logging.getLogger(f"{ROOT}.{name}")


class _ConsoleHandler(logging.Handler):
    """The bare message on the current `sys.stdout` (looked up per record, so a redirected or
    captured stdout gets it), written through tqdm so that a running bar stays below it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = self.format(record)
            if "tqdm" in sys.modules:
                from tqdm import tqdm
                tqdm.write(msg, file=sys.stdout)
            else:
                sys.stdout.write(msg + "\n")
            sys.stdout.flush()
        except Exception:
            self.handleError(record)


def _has_handler(log: logging.Logger) -> bool:
    """`log` or one of its descendants below ROOT has a handler (a user's configuration)."""
    if log.handlers:
        return True
    return any(isinstance(l, logging.Logger) and l.handlers
               for n, l in logging.Logger.manager.loggerDict.items()
               if n.startswith(ROOT + "."))


def console() -> None:
    """Status lines on stdout (see the module docstring). Idempotent; adds no handler where you
    configured one and keeps a level you set."""
    log = logging.getLogger(ROOT)
    if log.level == logging.NOTSET:  # status lines are INFO, whoever handles them
        log.setLevel(logging.INFO)
    if any(isinstance(h, _ConsoleHandler) for h in log.handlers) or _has_handler(log):
        return
    log.addHandler(_ConsoleHandler())
    log.propagate = False
