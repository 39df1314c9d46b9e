"""Each job's ``--help`` and ``--version`` text, generated from its schema and ``conf/``.

The keys, their types and choices come from the job's dataclass schema; the defaults
from the job's configuration as composed with no override (so a group file's values,
``resources=laptop``..., show as the job really starts); the group options from the
files under ``conf/<group>/``. Nothing here is copied by hand, so the help cannot drift
from the configuration.
"""

from __future__ import annotations

import enum
import importlib.metadata
import platform
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from atlinter_ray.overrides import is_mapping, is_schema, schema_keys, unwrap_optional

#: Characters of ``key = default`` before the type column of the key list.
KEY_WIDTH = 48
#: Libraries whose versions ``--version -v`` and the help's footer show.
LIBRARIES = ("torch", "ray", "zarr", "numpy", "hydra-core")

EXIT_CODES = (
    ("0", "success"),
    ("1", "the run failed while running; work already done is kept: rerun the same "
          "command to finish"),
    ("2", "bad configuration or input, or resources no node can offer; nothing was "
          "written"),
    ("130", "interrupted (Ctrl-C); 143: terminated (SIGTERM). Finished work is kept: "
            "rerun the same command to resume"),
)


@dataclass(frozen=True, slots=True)
class JobHelp:
    """What a job's help says beyond its keys: the command, one line, three examples."""

    command: str
    config_name: str
    schema: type
    summary: str
    #: ``(command line, what it does)``, real commands users can paste.
    examples: tuple[tuple[str, str], ...]
    #: What an interrupted run keeps and how to go on (the interrupt line says it).
    kept: str
    #: Extra lines (an optional extra the job needs).
    notes: tuple[str, ...] = ()


def package_version() -> str:
    """The installed atlinter_ray version."""
    from atlinter_ray import __version__

    return __version__


def library_versions() -> dict[str, str]:
    """Python's and each of :data:`LIBRARIES`'s installed version (read without importing)."""
    found = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def version_text(verbose: bool) -> str:
    """``atlinter_ray X.Y.Z``, and with ``verbose`` one line per library."""
    lines = [f"atlinter_ray {package_version()}"]
    if verbose:
        lines += [f"  {name} {version}" for name, version in library_versions().items()]
    return "\n".join(lines)


def _show(value: Any) -> str:
    """A default as the command line would write it."""
    if value is None:
        return "null"
    if value == "???":
        return "??? (required)"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, list):
        return "[" + ",".join(_show(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_show(v)}" for k, v in value.items()) + "}" if value else "{}"
    return str(value)


def _kind(key: str, kind: Any) -> str:
    """A field's type in a few characters, or its choices."""
    kind = unwrap_optional(kind)
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        return " | ".join(str(m.value) for m in kind)
    if is_mapping(kind):
        return f"free-form map: +{key}.NAME=VALUE adds an entry"
    if typing.get_origin(kind) is not None:
        return str(kind).replace("typing.", "")
    name = getattr(kind, "__name__", str(kind))
    return "any" if name == "Any" else name


def _lookup(defaults: Mapping[str, Any], key: str) -> Any:
    """The value at dotted ``key`` of nested ``defaults`` (``None`` when absent)."""
    node: Any = defaults
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def key_lines(schema: type, defaults: Mapping[str, Any]) -> list[str]:
    """One line per key of ``schema``: ``key = default   type or choices``; sections as titles."""
    rows: list[tuple[str, str, str]] = []
    for key, kind in schema_keys(schema):
        if is_schema(kind):
            if "." not in key:
                rows.append((key, "", ""))
            continue
        rows.append((key, _show(_lookup(defaults, key)), _kind(key, kind)))
    lines = []
    for key, value, kind in rows:
        if not kind:
            lines.append(f"  {key}:")
            continue
        left = f"    {key} = {value}"
        lines.append(f"{left:<{KEY_WIDTH}}  {kind}" if len(left) <= KEY_WIDTH
                     else f"{left}\n{'':<{KEY_WIDTH}}  {kind}")
    return lines


def help_text(
    job: JobHelp, groups: Mapping[str, Sequence[str]], chosen: Mapping[str, str],
    defaults: Mapping[str, Any],
) -> str:
    """The whole ``--help`` page of ``job``.

    ``groups`` maps each config group the job uses to its options, ``chosen`` to the
    default option, ``defaults`` is the job's composed configuration with no override.
    """
    out = [f"{job.command}: {job.summary}", "",
           f"usage: {job.command} [KEY=VALUE ...] [GROUP=OPTION ...]",
           f"       {job.command} --help | --version [-v] | --cfg job [overrides]", ""]
    out += list(job.notes) + ([""] if job.notes else [])
    out.append("examples:")
    for command, what in job.examples:
        out += [f"  {command}", f"      {what}"]
    if groups:
        out += ["", "config groups (GROUP=OPTION picks a file of conf/GROUP/):"]
        for group, options in groups.items():
            listed = ", ".join(f"{o} (default)" if o == chosen.get(group) else o for o in options)
            out.append(f"  {group}: {listed}")
    out += ["", "keys (KEY=VALUE; defaults as the default groups set them; a key the job "
                "does not have is refused):"]
    out += key_lines(job.schema, defaults)
    out += ["", "exit status:"] + [f"  {code:>3}  {what}" for code, what in EXIT_CODES]
    out += ["", "docs: README.md and docs/ in the repository; each key's meaning is in the "
                f"docstrings of {job.schema.__module__}.{job.schema.__name__}."]
    versions = ", ".join(f"{k} {v}" for k, v in library_versions().items())
    out += [f"version: atlinter_ray {package_version()} ({versions})"]
    return "\n".join(out)
