"""Command-line overrides checked against a job's schema before Hydra composes anything.

Hydra refuses an unknown key only until the user follows its advice and writes
``+key=value``; then the key is silently dropped by the schema and the job runs without
it. Here every override is checked against the job's dataclass schema (the single
source of truth of its keys) and its config groups (the files under ``conf/<group>/``):
an unknown key or group option is refused, with the closest names as suggestions.
Fields typed as mappings (``output.storage_options``, ``model.params``, ...) are
free-form: keys under them are the user's own, added with ``+``.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser

from atlinter_ray.errors import ConfigError


def _field_types(schema: type) -> dict[str, Any]:
    """The resolved type of each field of the dataclass ``schema``."""
    hints = typing.get_type_hints(schema)
    return {f.name: hints[f.name] for f in dataclasses.fields(schema)}


def unwrap_optional(kind: Any) -> Any:
    """``X`` for ``X | None``; ``kind`` otherwise."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return kind


def is_mapping(kind: Any) -> bool:
    """True for a free-form mapping field (``dict[str, ...]``)."""
    kind = unwrap_optional(kind)
    return kind is dict or typing.get_origin(kind) in (dict, Mapping)


def is_schema(kind: Any) -> bool:
    """True for a nested dataclass section."""
    kind = unwrap_optional(kind)
    return isinstance(kind, type) and dataclasses.is_dataclass(kind)


def schema_keys(schema: type, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Every dotted key of ``schema`` with its type: sections, then their fields, in order."""
    for name, kind in _field_types(schema).items():
        key = f"{prefix}{name}"
        yield key, kind
        if is_schema(kind):
            yield from schema_keys(unwrap_optional(kind), f"{key}.")


def suggest(word: str, choices: Sequence[str]) -> str:
    """``"; did you mean X?"`` for the closest of ``choices``, or ``""``."""
    close = difflib.get_close_matches(word, list(choices), n=2, cutoff=0.6)
    if not close:
        return ""
    return f"; did you mean {' or '.join(close)}?"


def check_key(key: str, schema: type, job: str) -> None:
    """Refuse a dotted ``key`` that ``schema`` does not have (free-form maps excepted)."""
    node: Any = schema
    parts = key.split(".")
    for depth, part in enumerate(parts):
        fields = _field_types(node)
        if part not in fields:
            known = [k for k, kind in schema_keys(schema) if not is_schema(kind)]
            here = ".".join(parts[: depth + 1])
            raise ConfigError(
                f"unknown key '{key}': {job} has no '{here}'{suggest(key, known)} "
                f"(`{job} --help` lists every key)"
            )
        kind = fields[part]
        if is_mapping(kind):
            return  # free-form: the rest of the key is the user's
        if is_schema(kind):
            node = unwrap_optional(kind)
            continue
        if depth < len(parts) - 1:
            raise ConfigError(
                f"unknown key '{key}': '{'.'.join(parts[: depth + 1])}' is a value, not a "
                f"section (`{job} --help` lists every key)"
            )


def check_overrides(
    args: Sequence[str], schema: type, groups: Mapping[str, Sequence[str]], job: str
) -> None:
    """Refuse overrides naming an unknown key, group or group option (with suggestions).

    ``groups`` maps each config group the job uses to its options. ``hydra.*`` keys and
    ``hydra/*`` groups are Hydra's own and pass.
    """
    try:
        parsed = OverridesParser.create().parse_overrides(list(args))
    except Exception as exc:  # noqa: BLE001 - Hydra's grammar errors, shown as ours
        raise ConfigError(f"cannot read the command line: {exc}") from None
    for override in parsed:
        key = override.key_or_group
        if key == "hydra" or key.startswith(("hydra.", "hydra/")) or override.package:
            continue
        if key in groups and "." not in key:
            value = override.value()
            options = list(groups[key])
            if not isinstance(value, str) or value not in options:
                raise ConfigError(
                    f"{key}={value}: no such {key} option{suggest(str(value), options)} "
                    f"(choose from {', '.join(options)})"
                )
            continue
        check_key(key, schema, job)
