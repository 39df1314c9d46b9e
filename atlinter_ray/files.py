"""Small files written whole or not at all, on any fsspec filesystem."""

from __future__ import annotations

import uuid

import fsspec


def write_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary sibling, then move it in place.

    A crash leaves at most a stray ``.<name>.tmp-*`` file, never a half-written ``path``.
    On object stores a PUT is already all-or-nothing, so the data goes straight there.
    """
    if not _is_local(fs):
        fs.pipe_file(path, data)
        return
    parent, name = path.rsplit("/", 1) if "/" in path else (".", path)
    tmp = f"{parent}/.{name}.tmp-{uuid.uuid4().hex}"
    try:
        fs.pipe_file(tmp, data)
        fs.mv(tmp, path)
    finally:
        if fs.exists(tmp):
            fs.rm(tmp)


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    """True for filesystems where a rename is atomic and a write is not (local disk)."""
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(fs, LocalFileSystem)
