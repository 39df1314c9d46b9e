"""The manual: README.md short and free of development-history wording, the generated
configuration reference up to date, every relative link of README.md resolving.

``mkdocs build --strict`` (in ``.ci/run``) checks the site's own links and anchors.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = REPO / "docs"

#: Wording of a development log, meaningless to a user (README.md is also the PyPI page).
FORBIDDEN = [
    "this 2-core machine",
    "load average",
    "issue 9",
    "git revision",
    "(not tried here)",
    "From the root of a fresh clone",
    "on the project's machines",
    "this machine cannot",
    "within the session",
    "the issue's target",
    "(issue ",
]


def _user_pages() -> list[Path]:
    return [README, REPO / "CHANGELOG.md", *sorted(DOCS.rglob("*.md"))]


def test_readme_is_short() -> None:
    lines = README.read_text().splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines; move detail to docs/"


@pytest.mark.parametrize("page", _user_pages(), ids=lambda p: str(p.relative_to(REPO)))
def test_no_development_history_wording(page: Path) -> None:
    text = page.read_text().lower()
    found = [phrase for phrase in FORBIDDEN if phrase.lower() in text]
    assert not found, f"{page.relative_to(REPO)} reads like a development log: {found}"


def test_forbidden_phrases_are_caught(tmp_path: Path) -> None:
    """The check above would flag the old README's wording."""
    old = "On this 2-core machine (load average 1.5), git revision `8bbea28` (not tried here)."
    assert sum(p.lower() in old.lower() for p in FORBIDDEN) == 4
    assert any(p in "### Fixed (issue 10: every input read right)" for p in FORBIDDEN)


def test_readme_links_resolve() -> None:
    text = README.read_text()
    targets = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text)
    local = [t for t in targets if not re.match(r"[a-z]+://", t)]
    assert local, "README.md links no page of the manual"
    missing = [t for t in local if not (REPO / t).exists()]
    assert not missing, f"README.md links files that do not exist: {missing}"


def test_every_page_is_in_the_nav() -> None:
    nav = (REPO / "mkdocs.yml").read_text()
    pages = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    listed = set(re.findall(r":\s*([\w/.-]+\.md)\s*$", nav, flags=re.M))
    assert pages <= listed, f"pages missing from mkdocs.yml's nav: {sorted(pages - listed)}"
    assert listed <= pages, f"nav entries without a page: {sorted(listed - pages)}"


def test_configuration_reference_is_up_to_date() -> None:
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "config_reference.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_configuration_reference_names_every_key() -> None:
    """Every leaf key of the interpolation schema, and every config group choice, is listed."""
    from dataclasses import fields, is_dataclass

    from atlinter_ray.config import Config

    def keys(cls: type, prefix: str = "") -> list[str]:
        out = []
        for f in fields(cls):  # type: ignore[arg-type]
            value = getattr(cls(), f.name)
            out += keys(type(value), f"{prefix}{f.name}.") if is_dataclass(value) else [f"{prefix}{f.name}"]
        return out

    page = (DOCS / "reference" / "configuration.md").read_text()
    missing = [k for k in keys(Config) if f"`{k}`" not in page]
    assert not missing, missing
    choices = [p.stem for p in (REPO / "conf").glob("*/*.yaml")]
    assert all(f"| `{c}` |" in page for c in choices)
