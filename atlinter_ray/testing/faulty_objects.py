"""A fault-injecting object store: the process "dies" at a chosen write.

:func:`dying_after` wraps every :class:`~atlinter_ray.objects.Objects` that a
:class:`~atlinter_ray.store.VolumeStore` opens, and the store's metadata writes that go
through zarr (arrays created, group metadata written or updated), so that one
:class:`Fuse` counts every write of an in-process run (``run.serial=true``)::

    fuse = Fuse(left=7)          # 7 writes go through, the 8th kills the "process"
    with dying_after(fuse):
        run(cfg)                 # raises Killed at that write

A batch of objects is written one object at a time, so a kill can land in the middle
of it. Once the fuse has blown, every later write raises too: a dead process writes
nothing more, whatever its other threads were doing. :class:`Killed` is a
``BaseException``, so no handler of ours can mistake it for a storage error and carry on.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from unittest import mock

import zarr

from atlinter_ray import store as store_module
from atlinter_ray.objects import Capabilities, Objects, open_objects


class Killed(BaseException):
    """The process dying at a chosen write: no handler of ours may catch it."""


@dataclass
class Fuse:
    """Writes left before the process dies (None: never), shared by every store of a run."""

    left: int | None = None
    #: True once the process has died.
    blown: bool = False
    #: What was written, in order (keys, or ``zarr:<what>`` for metadata through zarr).
    writes: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def spend(self, what: str) -> None:
        """Count one write, or raise :class:`Killed` when the process is (now) dead."""
        with self._lock:
            if self.blown:
                raise Killed(f"dead before {what}")
            if self.left is not None:
                if self.left <= 0:
                    self.blown = True
                    raise Killed(f"died at {what} after {len(self.writes)} writes")
                self.left -= 1
            self.writes.append(what)


class FaultyObjects(Objects):
    """Another :class:`Objects`, whose writes and deletions each spend the :class:`Fuse`."""

    def __init__(self, inner: Objects, fuse: Fuse) -> None:
        self.inner, self.fuse, self.url = inner, fuse, inner.url

    @property
    def capabilities(self) -> Capabilities:
        """The wrapped store's guarantees."""
        return self.inner.capabilities

    def get(self, key: str) -> bytes | None:
        """The object's bytes, or None."""
        return self.inner.get(key)

    def get_tagged(self, key: str) -> tuple[bytes, str | None] | None:
        """The object's bytes and ETag, or None."""
        return self.inner.get_tagged(key)

    def get_many(self, keys: list[str]) -> dict[str, bytes]:
        """``{key: bytes}`` of the objects that exist."""
        return self.inner.get_many(keys)

    def put(self, key: str, data: bytes) -> None:
        """Store one object, if the process is still alive."""
        self.fuse.spend(key)
        self.inner.put(key, data)

    def put_many(self, blobs: Mapping[str, bytes]) -> None:
        """Store the objects one by one: a kill can leave part of the batch."""
        for key, data in blobs.items():
            self.put(key, data)

    def put_if(self, key: str, data: bytes, etag: str | None) -> str | None:
        """A conditional write, if the process is still alive."""
        self.fuse.spend(key)
        return self.inner.put_if(key, data, etag)

    def delete(self, keys: list[str]) -> None:
        """Remove the objects one by one."""
        for key in keys:
            self.fuse.spend(f"delete {key}")
            self.inner.delete([key])

    def delete_prefix(self, prefix: str) -> None:
        """Remove a folder (one write: the store removes it in one go)."""
        self.fuse.spend(f"delete {prefix}/")
        self.inner.delete_prefix(prefix)

    def sizes(self, prefix: str) -> dict[str, int]:
        """``{key: size}`` under ``prefix``."""
        return self.inner.sizes(prefix)

    def zarr_location(self, key: str) -> tuple[Any, dict[str, Any] | None]:
        """What zarr opens for ``key`` (its writes are counted by :func:`dying_after`)."""
        return self.inner.zarr_location(key)

    def local_path(self, key: str) -> str | None:
        """The local file behind ``key``, or None."""
        return self.inner.local_path(key)


@contextlib.contextmanager
def dying_after(fuse: Fuse) -> Iterator[Fuse]:
    """Every store opened inside counts its writes on ``fuse`` and dies when it blows."""
    volume_store = store_module.VolumeStore

    def counted(name: str, original: Any) -> Any:
        def write(*args: Any, **kwargs: Any) -> Any:
            fuse.spend(f"zarr:{name}")
            return original(*args, **kwargs)
        return write

    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(
            store_module, "open_objects",
            lambda url, options=None: FaultyObjects(open_objects(url, options), fuse)))
        for name in ("create_level", "update_attrs"):
            stack.enter_context(mock.patch.object(
                volume_store, name, counted(name, getattr(volume_store, name))))
        stack.enter_context(mock.patch.object(
            zarr, "create_group", counted("create_group", zarr.create_group)))
        yield fuse
