"""Status lines go through `logging` (`pythia_jax.progress.console`), not `print`."""

from __future__ import annotations

import logging

import pytest

from pythia_jax import progress


@pytest.fixture
def fresh_logger():
    """The `pythia_jax` logger as an unconfigured process has it, restored afterwards."""
    log = logging.getLogger("pythia_jax")
    saved = (list(log.handlers), log.level, log.propagate)
    for h in list(log.handlers):
        log.removeHandler(h)
    log.setLevel(logging.NOTSET)
    log.propagate = True
    yield log
    for h in list(log.handlers):
        log.removeHandler(h)
    for h in saved[0]:
        log.addHandler(h)
    log.setLevel(saved[1])
    log.propagate = saved[2]


def test_console_writes_bare_lines_to_stdout_once(fresh_logger, capsys, caplog):
    root_seen = []

    class Root(logging.Handler):
        def emit(self, record):
            root_seen.append(record.getMessage())

    root = Root()
    logging.getLogger().addHandler(root)
    try:
        progress.console()
        progress.console()  # idempotent: one handler
        progress.logger("train").info("step 3: loss 1.0")
        progress.logger("train").debug("not at INFO")
    finally:
        logging.getLogger().removeHandler(root)
    out, err = capsys.readouterr()
    assert out == "step 3: loss 1.0\n" and err == ""
    assert root_seen == []  # not printed a second time by the root (absl) handler
    assert len(fresh_logger.handlers) == 1


def test_a_configured_logger_is_left_alone(fresh_logger, capsys):
    seen = []

    class Mine(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    progress.logger("train").addHandler(mine := Mine())
    try:
        progress.console()
        progress.logger("train").info("resumed from x")  # INFO: console() set the level
    finally:
        progress.logger("train").removeHandler(mine)
    assert seen == ["resumed from x"]
    assert fresh_logger.handlers == [] and capsys.readouterr().out == ""


def test_quiet_by_level(fresh_logger, capsys):
    progress.console()
    fresh_logger.setLevel(logging.WARNING)
    progress.logger("train").info("step 1")
    progress.logger("train").warning("a warning")
    assert capsys.readouterr().out == "a warning\n"
