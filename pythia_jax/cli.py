"""What the command-line scripts share: model flags (generate, evaluate), SIGTERM handling
(`exit_on_sigterm`, every script), output files (`output_path_error`, `atomic_output`), config
files (`config_flags_error`, `resolve_config_argv`: bundled configs by name) and the console
entry points (`run_app`, `--help` on stdout with exit 0 in every script)."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import tempfile
import threading

from absl import app, flags

from pythia_jax import paths


def parse_model_flags(flag_values: flags.FlagValues, argv=None) -> str | None:
    """Parse `argv` (default `sys.argv`) into `flag_values`, which must define `--model`.

    The flags are reset to their defaults first, so a script's `main()` can run more than once
    in a process. Returns None, or the error message for a malformed command line (unknown or
    ill-typed flag, positional arguments, no `--model`). `--help` (any of `HELP_FLAGS`) prints
    the defining script's docstring and these flags on stdout and exits 0.
    """
    argv = list(sys.argv if argv is None else argv)
    if help_requested(argv):
        print_help(_defining_module(flag_values), model_flags_help(flag_values))
        sys.exit(0)
    flag_values.unparse_flags()
    try:
        rest = flag_values(argv)
    except flags.Error as e:
        return str(e)
    if len(rest) > 1:
        return f"unexpected arguments {rest[1:]} (flags are --name=value)"
    if not flag_values.model:
        return "--model is required (an HF directory, hub id or pythia-jax checkpoint)"
    return None


# -- termination and output files shared by every script -------------------------------------------
#: Exit status of a script stopped by SIGTERM (128 + 15, what a shell reports for the signal).
SIGTERM_EXIT = 128 + signal.SIGTERM


class Terminated(SystemExit):
    """Raised in the main thread by SIGTERM once `exit_on_sigterm` is installed.

    A `SystemExit` (exit status 143), not an `Exception`: `except Exception` handlers let it
    through, while the `except BaseException` / `finally` blocks that remove temporary files on
    Ctrl-C (KeyboardInterrupt) run for it too, and the interpreter then exits without a traceback.
    """

    def __init__(self, prog: str):
        super().__init__(SIGTERM_EXIT)
        self.prog = prog


def exit_on_sigterm(prog: str | None = None) -> None:
    """Call first in a script's main: SIGTERM then unwinds like Ctrl-C (temporary outputs are
    removed by the same cleanup) and the script exits with status 143 after one line on stderr.
    A no-op outside the main thread (where signal handlers cannot be set); a second SIGTERM
    during the cleanup is ignored."""
    if threading.current_thread() is not threading.main_thread():
        return
    name = prog or os.path.basename(sys.argv[0] or "pythia_jax")

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # let the cleanup finish
        print(f"{name}: terminated (SIGTERM); removing temporary files", file=sys.stderr,
              flush=True)
        raise Terminated(name)

    signal.signal(signal.SIGTERM, handler)


def output_path_error(path: str, flag: str) -> str | None:
    """None when `path` can be written (created or replaced) as a file; otherwise the error
    message naming `flag`: checked before any work so a bad path fails in a second, not after.
    A URL (`gs://…`) needs its filesystem installed and must not be a folder."""
    path = os.fspath(path)
    if paths.is_remote(path):
        try:
            paths.check_available(path)
            if paths.isdir(path):
                return f"{flag}={path}: is a directory; expected a file path"
        except (ImportError, OSError) as e:
            return f"{flag}={path}: {e}"
        return None
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        return f"{flag}={path}: is a directory; expected a file path"
    if not os.path.isdir(folder):
        return f"{flag}={path}: folder {folder} does not exist"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"{flag}={path}: folder {folder} is not writable"
    if os.path.exists(path) and not os.path.isfile(path):
        return f"{flag}={path}: exists and is not a regular file"
    return None


def _file_mode() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_output(path: str):
    """Yields a temporary file name beside `path` (hidden, same folder); when the block ends
    normally the file gets the umask's usual mode and is renamed onto `path`. On any exception
    (Ctrl-C and `Terminated` included) the temporary file is removed: nothing partial is left."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        with paths.sigterm_held():  # no SIGTERM between the creation and the cleanup block
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.",
                                       suffix=".tmp")
        os.close(fd)
        yield tmp
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except BaseException:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_text_atomic(path: str, text: str) -> None:
    """Write `text` to `path` through `atomic_output` (flushed to disk before the rename); a URL
    through `paths.write_text` (uploaded whole)."""
    if paths.is_remote(path):
        paths.write_text(path, text)
        return
    with atomic_output(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())


# -- config files and --config.FIELD overrides (ml_collections config_flags) -----------------------
def config_flags_error(argv, name: str = "config") -> str | None:
    """None when `argv`'s `--NAME=FILE[:ARG]` loads and every `--NAME.a.b=VALUE` override names
    an existing field; otherwise one line saying which file or field is wrong (with the close
    matches of a misspelled field). Checked before absl parses the flags, whose errors for
    these cases are tracebacks from inside ml_collections."""
    import difflib
    import importlib.util

    argv = list(argv)
    spec, overrides = None, []
    for i, a in enumerate(argv[1:], 1):
        if a == "--":
            break
        for prefix in (f"--{name}=", f"-{name}="):
            if a.startswith(prefix):
                spec = a[len(prefix):]
        if a in (f"--{name}", f"-{name}") and i + 1 < len(argv):
            spec = argv[i + 1]
        for prefix in (f"--{name}.", f"--no{name}.", f"-{name}."):
            if a.startswith(prefix):
                overrides.append((a, a[len(prefix):].split("=", 1)[0]))
    if spec is None:
        return None
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        return (f"--{name}={spec}: config file {os.path.abspath(path)} "
                + ("is not a file" if os.path.exists(path) else "does not exist")
                + f" (bundled configs by name: {', '.join(bundled_config_names())})")
    try:
        mod_spec = importlib.util.spec_from_file_location("_pythia_jax_checked_config", path)
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
        config = module.get_config(arg) if arg else module.get_config()
    except Exception as e:  # the config file's own error, in one line
        return f"--{name}={spec}: cannot load the config file: {type(e).__name__}: {e}"
    for flag, dotted in overrides:
        node, where = config, name
        for part in dotted.split("."):
            keys = _config_keys(node)
            if keys is None:
                return f"{flag}: {where} is a value ({type(node).__name__}), not a section"
            if part not in keys:
                close = difflib.get_close_matches(part, keys, n=3, cutoff=0.6)
                hint = (f"; did you mean {', '.join(f'{where}.{c}' for c in close)}?" if close
                        else f"; its fields: {', '.join(sorted(keys))}")
                return f"{flag}: {where} has no field {part!r}{hint}"
            node, where = node[part], f"{where}.{part}"
    return None


def _config_keys(node) -> list[str] | None:
    if hasattr(node, "keys") and callable(node.keys):
        return [str(k) for k in node.keys()]
    return None


# -- console entry points (pyproject [project.scripts]) ---------------------------------------------
#: The help flags every script answers (absl's, plus argparse's -h); help goes to stdout, exit 0.
HELP_FLAGS = ("--help", "-help", "-h", "-?", "--helpshort", "-helpshort", "--helpfull",
              "-helpfull")


def help_requested(argv) -> bool:
    """True when `argv` (argv[0] = the program) asks for help before a `--`."""
    for a in list(argv)[1:]:
        if a == "--":
            return False
        if a in HELP_FLAGS:
            return True
    return False


def print_help(module_name: str, flag_help: str) -> None:
    """The script's docstring and its flags on stdout (what `--help` prints)."""
    module = sys.modules.get(module_name)
    doc = (getattr(module, "__doc__", None) or "").strip("\n")
    prog = os.path.basename(sys.argv[0] or module_name)
    text = (doc or f"USAGE: {prog} [flags]") + "\n"
    if flag_help:
        text += "\nflags:\n" + flag_help + "\n"
    sys.stdout.write(text)
    sys.stdout.flush()


def model_flags_help(flag_values: flags.FlagValues) -> str:
    """The help text of a script-local FlagValues (generate, evaluate, …): all its flags."""
    return flag_values.get_help(include_special_flags=False)


def _defining_module(flag_values: flags.FlagValues) -> str:
    """The module that defined `flag_values`' flags (absl files `__main__`'s under argv[0])."""
    for key in flag_values.flags_by_module_dict():
        return key if key in sys.modules else "__main__"
    return "__main__"


def run_app(main, module_name: str, argv=None) -> None:
    """`absl.app.run(main)` for a script that defines its flags on `absl.flags.FLAGS`, also when
    the script runs as an installed console command: `--help` then prints the script's own
    docstring and flags (absl's prints those of `__main__`, which for a console command is pip's
    launcher, with no flags) and exits 0."""
    argv = list(sys.argv if argv is None else argv)
    if help_requested(argv):
        # absl files a module's flags under its name, or under sys.argv[0] for `__main__`.
        key = sys.argv[0] if module_name == "__main__" else module_name
        full = any(a in ("--helpfull", "-helpfull") for a in argv)
        print_help(module_name, flags.FLAGS.get_help() if full
                   else flags.FLAGS.module_help(key))
        sys.exit(0)
    app.run(main, argv=argv)


#: Where `--config=NAME[:ARG]` looks when NAME is not a file: the configs shipped in the package.
CONFIG_PACKAGE = "pythia_jax.configs"


def bundled_config_path(name: str) -> str | None:
    """The file of the bundled config `name` (`smoke`, `pythia`, `smoke.py`, `configs/smoke.py`),
    or None when the package has no such config."""
    from importlib import resources

    base = name[len("configs/"):] if name.startswith("configs/") else name
    if base.endswith(".py"):
        base = base[:-3]
    if not base or not base.isidentifier() or base.startswith("_"):
        return None
    path = resources.files(CONFIG_PACKAGE) / f"{base}.py"
    return str(path) if path.is_file() else None


def bundled_config_names() -> list[str]:
    from importlib import resources

    return sorted(p.name[:-3] for p in resources.files(CONFIG_PACKAGE).iterdir()
                  if p.name.endswith(".py") and not p.name.startswith("_"))


def resolve_config_argv(argv, name: str = "config") -> list[str]:
    """`argv` with `--NAME=SPEC[:ARG]` pointing at a bundled config's file when SPEC is not a
    file but names one of `pythia_jax.configs` (`--config=smoke`, `--config=pythia:70m`, or the
    repository's `configs/pythia.py:70m` run outside a clone). ml_collections' config flag takes
    a file path; this gives it the installed package's file. Other arguments are unchanged."""
    out = list(argv)
    for i in range(1, len(out)):
        a = out[i]
        if a == "--":
            break
        for prefix in (f"--{name}=", f"-{name}="):
            if a.startswith(prefix):
                path, sep, arg = a[len(prefix):].partition(":")
                if not os.path.exists(path) and (found := bundled_config_path(path)):
                    out[i] = f"{prefix}{found}{sep}{arg}"
        if a in (f"--{name}", f"-{name}") and i + 1 < len(out):
            path, sep, arg = out[i + 1].partition(":")
            if not os.path.exists(path) and (found := bundled_config_path(path)):
                out[i + 1] = f"{found}{sep}{arg}"
    return out


# -- default data ----------------------------------------------------------------------------------
#: OpenAI's LAMBADA test set (5,153 examples, what lm-eval's lambada_openai scores) on the hub.
LAMBADA_HUB_REPO = "EleutherAI/lambada_openai"
LAMBADA_HUB_FILE = "data/lambada_test.jsonl"


def default_lambada_path() -> str:
    """The LAMBADA test .jsonl from the hub dataset (downloaded once into the HF cache; offline,
    the cached copy). OSError naming the dataset and `--data` when it cannot be had."""
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(LAMBADA_HUB_REPO, LAMBADA_HUB_FILE, repo_type="dataset")
    except Exception as e:  # offline, no cache, hub errors: one line instead of a traceback
        why = (str(e).strip().splitlines() or [""])[0]
        raise OSError(f"cannot get the LAMBADA test set {LAMBADA_HUB_FILE} of the hub dataset "
                      f"{LAMBADA_HUB_REPO} ({type(e).__name__}: {why}); pass "
                      "--data=lambada_test.jsonl (a .jsonl of {\"text\": ...} lines)") from e
