"""Generate docs/reference/configuration.md from the config's single source of truth.

Every key comes from the jobs' schemas (the dataclasses in ``atlinter_ray/config.py`` and
each job's ``config.py``), its meaning from the ``#:`` comment above the field (or the
class docstring), its default from the composed ``conf/`` (so a YAML value wins over the
schema's, as it does when a job runs), and the choices of each config group from the
files in ``conf/<group>/``. ``tests/test_docs.py`` fails while the page is out of date::

    python scripts/config_reference.py          # rewrite the page
    python scripts/config_reference.py --check  # exit 1 if it is out of date
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import sys
import textwrap
import typing
from enum import Enum
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PAGE = REPO / "docs" / "reference" / "configuration.md"


def field_comments(cls: type) -> dict[str, str]:
    """The ``#:`` comment lines right above each field of a dataclass, joined."""
    source = textwrap.dedent(inspect.getsource(cls))
    lines = source.splitlines()
    (node,) = ast.parse(source).body
    assert isinstance(node, ast.ClassDef)
    comments: dict[str, str] = {}
    for item in node.body:
        if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
            above: list[str] = []
            row = item.lineno - 2
            while row >= 0 and lines[row].strip().startswith("#:"):
                above.insert(0, lines[row].strip()[2:].strip())
                row -= 1
            if above:
                comments[item.target.id] = " ".join(above)
    return comments


def summary(cls: type) -> str:
    """A class docstring, on one line."""
    return " ".join((inspect.getdoc(cls) or "").split())


def shown(value: Any) -> str:
    """A default as a user writes it on the command line."""
    if isinstance(value, Enum):
        value = value.value
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, str):
        return f"`{value}`" if value else "`''`"
    text = json.dumps(value, separators=(",", ":")).replace('"', "")
    return f"`{text}`"


def cell(text: str) -> str:
    """Text safe inside a markdown table cell (``<`` escaped outside code spans)."""
    parts = text.replace("``", "`").replace("|", "\\|").replace("\n", " ").split("`")
    return "`".join(p.replace("<", "&lt;") if i % 2 == 0 else p for i, p in enumerate(parts))


def rows(cls: type, values: dict[str, Any], prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, meaning) of every leaf field, depth first, nested sections expanded."""
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    out: list[tuple[str, str, str]] = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        kind = hints[f.name]
        value = values.get(f.name) if isinstance(values, dict) else None
        if dataclasses.is_dataclass(kind):
            assert isinstance(kind, type)
            meaning = comments.get(f.name) or summary(kind)
            out.append((key, "", meaning))
            out += rows(kind, value or {}, f"{key}.")
            continue
        if f.name not in values:
            value = getattr(cls(), f.name)  # type: ignore[operator]
        choices = ""
        if isinstance(kind, type) and issubclass(kind, Enum):
            choices = "one of " + ", ".join(f"`{m.value}`" for m in kind) + ". "
        out.append((key, shown(value), choices + comments.get(f.name, "")))
    return out


def group_choices(group: Path) -> list[tuple[str, str]]:
    """(choice, its leading comment block) of each YAML file of a config group."""
    found = []
    for path in sorted(group.glob("*.yaml")):
        block = []
        for line in path.read_text().splitlines():
            if not line.startswith("#"):
                break
            if not line.startswith("# @package"):
                block.append(line.lstrip("#").strip())
        found.append((path.stem, " ".join(block)))
    return found


def composed(config_name: str) -> dict[str, Any]:
    """The job's configuration as ``conf/`` composes it, interpolations left unresolved."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from atlinter_ray.cli import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name=config_name)
    container = OmegaConf.to_container(cfg, resolve=False)
    assert isinstance(container, dict)
    return {str(k): v for k, v in container.items()}


def jobs() -> list[tuple[str, str, type, str]]:
    """(title, command, schema, conf file) of every job."""
    from atlinter_ray.align.config import AlignConfig
    from atlinter_ray.allen.config import DownloadConfig
    from atlinter_ray.config import Config
    from atlinter_ray.evaluation.config import EvaluateConfig

    return [
        ("Interpolation", "atlinter-ray", Config, "config"),
        ("Evaluation", "atlinter-ray-evaluate", EvaluateConfig, "evaluate"),
        ("Download", "atlinter-ray-download", DownloadConfig, "download"),
        ("Align", "atlinter-ray-align", AlignConfig, "align"),
    ]


def render() -> str:
    """The whole reference page."""
    out = [
        "# Configuration reference",
        "",
        "<!-- Generated by scripts/config_reference.py from the schemas and conf/: do not edit. -->",
        "",
        "Every key of every job, with its default (as `conf/` sets it) and its meaning. Set",
        "any of them on the command line as `key=value` (lists as `key=[a,b]`; a new key of an",
        "open mapping such as `output.storage_options` with a leading `+`). A `${...}` default",
        "is filled in when the job starts. [Configuration](../configuration.md) explains the",
        "settings people change most.",
        "",
        "## Config groups of the interpolation job",
        "",
        "A group is chosen as `group=choice` and sets several keys at once.",
        "",
    ]
    for group in sorted(p for p in (REPO / "conf").iterdir() if p.is_dir()):
        out += [f"### `{group.name}=`", "", "| choice | what it sets |", "|---|---|"]
        out += [f"| `{name}` | {cell(comment)} |" for name, comment in group_choices(group)]
        out.append("")
    for title, command, schema, conf in jobs():
        out += [f"## {title}: `{command}`", "", cell(summary(schema)), "",
                "| key | default | meaning |", "|---|---|---|"]
        for key, default, meaning in rows(schema, composed(conf)):
            key_cell = f"**`{key}`**" if not default else f"`{key}`"
            out.append(f"| {key_cell} | {default} | {cell(meaning)} |")
        out.append("")
    return "\n".join(out)


def main() -> int:
    """Write the page, or with ``--check`` report whether it is up to date."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the page is out of date")
    args = parser.parse_args()
    text = render()
    if args.check:
        if not PAGE.is_file() or PAGE.read_text() != text:
            print(f"{PAGE} is out of date: run python scripts/config_reference.py", file=sys.stderr)
            return 1
        return 0
    PAGE.parent.mkdir(parents=True, exist_ok=True)
    PAGE.write_text(text)
    print(f"wrote {PAGE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
