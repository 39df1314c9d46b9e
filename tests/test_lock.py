"""The CI lock (constraints.txt) pins every dependency within pyproject.toml's ranges.

`.ci/run` installs from the lock so that a new upstream release cannot break CI; these
tests keep the lock, pyproject.toml, `.ci/run` and README.md's test block in step.
"""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "constraints.txt"


def _locked() -> dict[str, Version]:
    """Package name -> pinned version, from the lock."""
    pins: dict[str, Version] = {}
    for line in LOCK.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, version = line.partition("==")
        assert sep, f"{LOCK}: {line!r} is not a `name==version` pin; rerun scripts/lock.sh"
        pins[canonicalize_name(name)] = Version(version)
    return pins


def _requirements() -> list[Requirement]:
    """Every requirement of the package and of its extras, self-references left out."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    texts = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        texts.extend(extra)
    return [r for r in map(Requirement, texts) if canonicalize_name(r.name) != "atlinter-ray"]


def test_every_requirement_is_pinned_inside_its_range() -> None:
    pins = _locked()
    problems = []
    for req in _requirements():
        pinned = pins.get(canonicalize_name(req.name))
        if pinned is None:
            problems.append(f"{req.name} is not in the lock")
        elif not req.specifier.contains(pinned, prereleases=True):
            problems.append(f"{req.name}=={pinned} is outside pyproject.toml's {req}")
    assert not problems, "; ".join(problems) + ": refresh with scripts/lock.sh"


def test_torch_is_pinned_to_the_cpu_build_on_disk() -> None:
    assert _locked()["torch"] == Version("2.13.0")


def test_this_environment_was_installed_from_the_lock() -> None:
    """What is installed is what the lock says (a test run against other versions proves little)."""
    drift = []
    for name, pinned in _locked().items():
        try:
            installed = Version(metadata.version(name))
        except metadata.PackageNotFoundError:
            continue  # an optional dependency of a dependency, not installed here
        if installed.public != pinned.public:
            drift.append(f"{name} {installed} (lock: {pinned})")
    assert not drift, "installed versions differ from constraints.txt: " + ", ".join(drift)


def test_ci_and_readme_install_from_the_lock() -> None:
    ci = (REPO / ".ci" / "run").read_text()
    readme = (REPO / "README.md").read_text()
    installs = re.findall(r"^pip install .*$", ci, re.MULTILINE)
    assert installs and all("-c constraints.txt" in line for line in installs), installs
    for line in installs:
        assert line.replace(" -q", "") in readme, f"README.md's test block lacks {line!r}"
