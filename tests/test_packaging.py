"""The dependency ranges of pyproject.toml against the lock files CI installs (constraints/).

No network and no installs: the files are parsed and compared. Each constraints/pyXY.txt is an
exact `pip freeze` of a working environment on Python X.Y; every requirement of pyproject.toml
that applies on that Python (its environment marker evaluated for X.Y on Linux x86_64) must be
pinned there, inside its range.
"""

import pathlib
import re
import tomllib

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = pathlib.Path(__file__).resolve().parents[1]
PYPROJECT = REPO / "pyproject.toml"
CONSTRAINTS = REPO / "constraints"
CI_RUN = REPO / ".ci" / "run"
README = REPO / "README.md"

#: the only packages pinned with `==` in pyproject.toml, and why (the comments there say more).
EXACT_PINS = {
    "torch": "a looser requirement on Python 3.11 resolves to a CUDA build of several GB",
    "libtpu": "must match the PJRT ABI of the installed jaxlib",
}
#: the Pythons CI runs the suite on, one lock file each.
LOCKED_PYTHONS = ("3.11", "3.12")
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!_-]+)$")


def _project() -> dict:
    return tomllib.loads(PYPROJECT.read_text())["project"]


def _ci_extras() -> set[str]:
    """The extras CI installs: `dev` and the extras `dev` names (`pythia-jax[a,b]`)."""
    project = _project()
    extras = {"dev"}
    for r in project["optional-dependencies"]["dev"]:
        req = Requirement(r)
        if canonicalize_name(req.name) == canonicalize_name(project["name"]):
            extras |= req.extras
    return extras


def _requirements() -> list[tuple[str, Requirement, bool]]:
    """(where, requirement, installed by CI) for every dependency and extra entry but our own."""
    project = _project()
    ci = _ci_extras()
    out = [("dependencies", Requirement(r), True) for r in project["dependencies"]]
    for extra, reqs in project["optional-dependencies"].items():
        for r in reqs:
            req = Requirement(r)
            if canonicalize_name(req.name) != canonicalize_name(project["name"]):
                out.append((f"optional-dependencies.{extra}", req, extra in ci))
    return out


def parse_constraints(path: pathlib.Path) -> dict[str, Version]:
    """The pins of a lock file: only `name==version` lines, comments and blank lines allowed."""
    pins: dict[str, Version] = {}
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = _PIN.match(line)
        if m is None:
            raise ValueError(f"{path}:{n}: expected an exact pin `name==version`, got {raw!r}")
        name = canonicalize_name(m.group(1))
        if name in pins:
            raise ValueError(f"{path}:{n}: {m.group(1)} is pinned twice")
        pins[name] = Version(m.group(2))
    return pins


def _environment(python: str) -> dict[str, str]:
    env = dict(default_environment())
    env.update(python_version=python, python_full_version=f"{python}.0", sys_platform="linux",
               platform_system="Linux", platform_machine="x86_64", os_name="posix",
               implementation_name="cpython", platform_python_implementation="CPython",
               extra="")
    return env


def out_of_range(pins: dict[str, Version], python: str) -> list[str]:
    """Every requirement that applies on `python` and is outside its range in `pins`, or missing
    from `pins` although CI installs it (an extra that `dev` leaves out need not be pinned)."""
    env = _environment(python)
    problems = []
    for where, req, installed_by_ci in _requirements():
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        name = canonicalize_name(req.name)
        if name not in pins:
            if installed_by_ci:
                problems.append(f"{req.name} ({where}: {req.specifier}) is not pinned")
        elif not req.specifier.contains(pins[name], prereleases=True):
            problems.append(f"{req.name}=={pins[name]} lies outside {where}'s {req.specifier}")
    return problems


@pytest.mark.parametrize("python", LOCKED_PYTHONS)
def test_every_requirement_is_pinned_inside_its_range(python):
    path = CONSTRAINTS / f"py{python.replace('.', '')}.txt"
    assert path.is_file(), f"{path}: CI's lock file for Python {python} is missing"
    assert out_of_range(parse_constraints(path), python) == []


@pytest.mark.parametrize("python", LOCKED_PYTHONS)
def test_lock_file_is_for_its_python_and_not_for_this_project(python):
    path = CONSTRAINTS / f"py{python.replace('.', '')}.txt"
    text = path.read_text()
    assert f"Python {python}" in text.splitlines()[0], f"{path}: first line must name Python {python}"
    pins = parse_constraints(path)
    assert canonicalize_name(_project()["name"]) not in pins  # an editable install is not a pin


def test_the_two_lock_files_differ_where_the_pythons_do():
    """The 3.11 file is the lower end (jax 0.10.2); the 3.12 one has the newer JAX."""
    low, high = (parse_constraints(CONSTRAINTS / f"py{p.replace('.', '')}.txt")
                 for p in LOCKED_PYTHONS)
    assert low["jax"] < high["jax"] and low["jaxlib"] < high["jaxlib"]
    assert low["flax"] < high["flax"]


def test_ranges_are_bounded_on_both_sides():
    """A library's ranges: a tested lower bound and an upper bound; `==` only where listed."""
    for where, req, _ in _requirements():
        ops = {s.operator for s in req.specifier}
        if "==" in ops:
            assert canonicalize_name(req.name) in EXACT_PINS, f"{where}: {req} is pinned with =="
            continue
        assert ">=" in ops and "<" in ops, f"{where}: {req} needs a >= lower and a < upper bound"


def test_out_of_range_names_the_package_and_range():
    """The checker itself catches a pin below, above or missing."""
    pins = parse_constraints(CONSTRAINTS / "py311.txt")
    low = dict(pins, jax=Version("0.9.0"))
    assert any(p.startswith("jax==0.9.0 lies outside dependencies's ") and ">=0.10.2" in p
               for p in out_of_range(low, "3.11"))
    high = dict(pins, flax=Version("1.0.0"))
    assert any(p.startswith("flax==1.0.0 lies outside ") and "<0.13" in p
               for p in out_of_range(high, "3.11"))
    missing = {k: v for k, v in pins.items() if k != "tqdm"}
    assert any(p.startswith("tqdm ") and "is not pinned" in p for p in out_of_range(missing, "3.11"))
    # torch's marker: 3.11 must hold exactly 2.13.0
    assert any("torch==2.14.1" in p for p in out_of_range(dict(pins, torch=Version("2.14.1")), "3.11"))


def test_parse_constraints_rejects_non_pins(tmp_path):
    bad = tmp_path / "py311.txt"
    bad.write_text("# Python 3.11\njax>=0.10\n")
    with pytest.raises(ValueError, match=r"py311.txt:2: expected an exact pin"):
        parse_constraints(bad)
    bad.write_text("# Python 3.11\n-e /work/main\n")
    with pytest.raises(ValueError, match=r"py311.txt:2: expected an exact pin"):
        parse_constraints(bad)
    bad.write_text("jax==0.10.2\nJAX==0.10.2\n")
    with pytest.raises(ValueError, match=r"py311.txt:2: JAX is pinned twice"):
        parse_constraints(bad)


def test_ci_installs_each_lock_file_and_runs_the_readme_command():
    ci = CI_RUN.read_text()
    for python in LOCKED_PYTHONS:
        assert f"constraints/py{python.replace('.', '')}.txt" in ci
    # the README's test command is the one .ci/run calls (keep the two in sync)
    readme_cmds = re.findall(r"^pip install -e '\.\[dev\]' && python -m pytest$", README.read_text(),
                             re.MULTILINE)
    assert readme_cmds, "README.md lost its test command"
    assert re.search(r"^\s*pip install -e '\.\[dev\]' && python -m pytest(\s|$)", ci, re.MULTILINE)
