"""Files written whole or not at all, on any fsspec filesystem."""

from __future__ import annotations

import hashlib
import io
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import IO, Any

import fsspec
from fsspec.implementations.local import LocalFileSystem


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    """True for local disk: files can be memory-mapped, a rename is atomic, a write is not."""
    return isinstance(fs, LocalFileSystem)


def write_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary sibling, then move it in place.

    A crash leaves at most a stray ``.<name>.tmp-*`` file, never a half-written ``path``.
    On object stores a PUT is already all-or-nothing, so the data goes straight there.
    """
    if not is_local(fs):
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


@contextmanager
def open_atomic(fs: fsspec.AbstractFileSystem, path: str) -> Iterator[IO[bytes]]:
    """A binary file to write a large file piece by piece; ``path`` appears only when done.

    On local disk the pieces go to a temporary sibling that is moved in place after the
    block ends without error (and removed otherwise). On object stores they are gathered
    in memory and PUT whole, since an upload cut short must not leave an object behind.
    """
    if not is_local(fs):
        buffer = io.BytesIO()
        yield buffer
        fs.pipe_file(path, buffer.getvalue())
        return
    parent, name = path.rsplit("/", 1) if "/" in path else (".", path)
    tmp = f"{parent}/.{name}.tmp-{uuid.uuid4().hex}"
    try:
        with fs.open(tmp, "wb") as f:
            yield f
        fs.mv(tmp, path)
    finally:
        if fs.exists(tmp):
            fs.rm(tmp)


#: Bytes read per step while hashing a file. The driver hashes up to 16 files at once:
#: its peak RSS while fingerprinting 12 full-size genes grew by 160 MB with 8 MiB
#: blocks, 18 MB with these (and hashed faster: 0.14 s against 0.21 s).
HASH_BLOCK = 2**20


def file_sha256(url: str, storage_options: Mapping[str, Any]) -> str:
    """sha256 of a whole file at any fsspec URL, read a block at a time (flat memory)."""
    from atlinter_ray.errors import DatasetNotFoundError

    digest = hashlib.sha256()
    try:
        with fsspec.open(url, "rb", **storage_options) as f:
            while block := f.read(HASH_BLOCK):
                digest.update(block)
    except FileNotFoundError as exc:
        raise DatasetNotFoundError(f"{url}: file not found. Fix: check the path or URL.") from exc
    return digest.hexdigest()
