"""Shared argument handling of the model-loading command-line scripts (generate, evaluate)."""

from __future__ import annotations

import sys

from absl import flags


def parse_model_flags(flag_values: flags.FlagValues, argv=None) -> str | None:
    """Parse `argv` (default `sys.argv`) into `flag_values`, which must define `--model`.

    The flags are reset to their defaults first, so a script's `main()` can run more than once
    in a process. Returns None, or the error message for a malformed command line (unknown or
    ill-typed flag, positional arguments, no `--model`).
    """
    flag_values.unparse_flags()
    try:
        rest = flag_values(list(sys.argv if argv is None else argv))
    except flags.Error as e:
        return str(e)
    if len(rest) > 1:
        return f"unexpected arguments {rest[1:]} (flags are --name=value)"
    if not flag_values.model:
        return "--model is required (an HF directory, hub id or pythia-jax checkpoint)"
    return None
