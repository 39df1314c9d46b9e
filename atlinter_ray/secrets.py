"""Keeping credentials out of everything a job prints or writes.

A secret is any value given under a secret-looking key (``key``, ``secret``, ``token``,
``password``, ``credential``): in the composed configuration, in a command-line
override (even one Hydra rejects before the job starts) or in the environment
(``AWS_SECRET_ACCESS_KEY``, ``RAY_AUTH_TOKEN``...). :func:`scrub` replaces those
values, and what looks like a credential whatever its key (AWS access key ids, the
password of a URL), with ``***``. :func:`redacted_output` routes the process's
stdout and stderr (our messages, logs, tracebacks, Hydra's and Ray's lines, the
progress bar) through it, so no failure path can print one.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, TextIO

SECRET_WORDS = ("key", "secret", "token", "password", "passwd", "credential")
#: Values shorter than this are not treated as secrets (they would mangle every line).
MIN_SECRET_LEN = 4
_PATTERNS = (
    (re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"), "***"),  # AWS access key ids
    (re.compile(r"(://[^/\s:@]+:)[^/\s@]+@"), r"\1***@"),  # user:password@ in URLs
)


def is_secret_key(key: Any) -> bool:
    """True for a configuration key whose value must never be shown."""
    return any(w in str(key).lower() for w in SECRET_WORDS)


def redact(obj: Any) -> Any:
    """Copy of ``obj`` with values of secret-looking keys replaced by ``***``."""
    if isinstance(obj, dict):
        return {k: "***" if is_secret_key(k) and v else redact(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    return obj


def secret_values(obj: Any) -> set[str]:
    """Every non-empty string value under a secret-looking key of ``obj`` (nested)."""
    found: set[str] = set()
    if isinstance(obj, dict):
        for k, v in obj.items():
            if is_secret_key(k) and isinstance(v, str) and v:
                found.add(v)
            else:
                found |= secret_values(v)
    elif isinstance(obj, list):
        for v in obj:
            found |= secret_values(v)
    return found


def override_secrets(args: Iterable[str]) -> set[str]:
    """Values of command-line overrides whose key looks secret (``+a.b.secret=VALUE``)."""
    found = set()
    for arg in args:
        key, sep, value = arg.partition("=")
        if sep and is_secret_key(key.rsplit(".", 1)[-1]) and value:
            found.add(value.strip("'\""))
    return found


def env_secrets(environ: Mapping[str, str] | None = None) -> set[str]:
    """Values of environment variables whose name looks secret."""
    env = os.environ if environ is None else environ
    return {v for k, v in env.items() if is_secret_key(k) and v}


def scrub(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every secret value, and anything that looks like a credential, as ``***``."""
    for value in sorted((s for s in secrets if len(s) >= MIN_SECRET_LEN), key=len, reverse=True):
        text = text.replace(value, "***")
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


class ScrubbingStream(io.TextIOBase):
    """A text stream that scrubs what it is given before passing it on."""

    def __init__(self, stream: TextIO, secrets: set[str]) -> None:
        self.stream, self.secrets = stream, secrets

    def write(self, text: str) -> int:
        """Write ``text`` scrubbed; report the length of ``text`` (callers count on it)."""
        self.stream.write(scrub(text, self.secrets))
        return len(text)

    def flush(self) -> None:
        """Flush the wrapped stream."""
        self.stream.flush()

    def isatty(self) -> bool:
        """Whether the wrapped stream is a terminal (the progress bar asks)."""
        return self.stream.isatty()

    def fileno(self) -> int:
        """The wrapped stream's descriptor."""
        return self.stream.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        """The wrapped stream's encoding."""
        return getattr(self.stream, "encoding", "utf-8")


@contextlib.contextmanager
def redacted_output(secrets: set[str]) -> Iterator[set[str]]:
    """Scrub everything written to ``sys.stdout``/``sys.stderr`` inside the block.

    Yields ``secrets``: values added to it later (the composed configuration's) are
    scrubbed from then on.
    """
    secrets |= env_secrets()
    saved = sys.stdout, sys.stderr
    sys.stdout = ScrubbingStream(saved[0], secrets)
    sys.stderr = ScrubbingStream(saved[1], secrets)
    try:
        yield secrets
    finally:
        sys.stdout, sys.stderr = saved
