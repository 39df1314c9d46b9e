"""One driver at a time per output root: a lease object in the store itself.

Two drivers writing one output would mix two runs' markers, images and summaries, so
the second is refused before it writes anything, with the holder named::

    local disk      <root>/.atlinter_ray.lock, held with an OS lock (flock) for the
                    run; the OS drops it when the process dies, so a killed driver
                    never blocks the next run
    object store    <root>/_lease.json = {owner, host, pid, heartbeat}; created with a
                    conditional PUT (If-None-Match: *; on s3:// through obstore, whose
                    conflict error is the same on AWS, moto and SeaweedFS), renewed every ttl/3 seconds by a
                    thread with If-Match on its last ETag. A lease whose heartbeat is
                    older than ``ttl_s``, or whose holder is a dead process on this
                    host, is taken over (again with If-Match, so one taker wins)

A driver that finds its lease renewed by someone else (or cannot renew it for
``ttl_s``) has lost it: :meth:`OutputLease.check` then raises, and the run stops
without declaring anything complete. Stores that ignore conditional requests get the
same protocol with a read-back check of the owner after each write.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any, Self

from atlinter_ray.errors import IncompleteOutputError, OutputBusyError
from atlinter_ray.objects import Objects

log = logging.getLogger(__name__)

LOCK_NAME = ".atlinter_ray.lock"
LEASE_NAME = "_lease.json"


class OutputLease:
    """Exclusive use of an output root by this driver; a context manager."""

    def __init__(self, objects: Objects, ttl_s: float = 60.0):
        self.objects, self.url, self.ttl_s = objects, objects.url, ttl_s
        self.owner = uuid.uuid4().hex
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._fd: int | None = None
        self._etag: str | None = None

    # -- public ---------------------------------------------------------------------
    def acquire(self) -> None:
        """Take the lease or raise :class:`OutputBusyError` naming its holder."""
        lock = self.objects.local_path(LOCK_NAME)
        if lock is not None:
            os.makedirs(os.path.dirname(lock), exist_ok=True)
            self._acquire_local(lock)
        else:
            self._acquire_remote()
            self._thread = threading.Thread(target=self._heartbeat, daemon=True,
                                            name="atlinter-ray-lease")
            self._thread.start()

    def check(self) -> None:
        """Raise :class:`IncompleteOutputError` when this driver no longer holds the lease."""
        if self._lost:
            raise IncompleteOutputError(
                f"{self.url}: this run lost its lease on the output ({self._lost}); nothing "
                "more is marked complete. Fix: make sure only one job writes this "
                "output.root, then rerun the same command."
            )

    def release(self) -> None:
        """Give the lease back (best effort: an expired lease is free anyway)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._fd is not None:
            import fcntl

            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
        elif self._etag is not None and not self._lost:
            try:
                if self._read()[0].get("owner") == self.owner:
                    self.objects.delete([LEASE_NAME])
            except (OSError, ValueError):
                log.debug("could not remove the lease", exc_info=True)

    def __enter__(self) -> Self:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    # -- local: an OS lock ------------------------------------------------------------
    def _acquire_local(self, path: str) -> None:
        import fcntl

        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(_parse(os.pread(fd, 4096, 0)))
            os.close(fd)
            raise OutputBusyError(self._busy(holder)) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, self._record(), 0)
        self._fd = fd

    # -- object stores: a conditional PUT and a heartbeat -------------------------------
    def _record(self) -> bytes:
        return json.dumps({"owner": self.owner, "host": socket.gethostname(),
                           "pid": os.getpid(), "heartbeat": time.time()}).encode()

    def _read(self) -> tuple[dict[str, Any], str | None]:
        """The lease record and its ETag; FileNotFoundError when there is none."""
        found = self.objects.get_tagged(LEASE_NAME)
        if found is None:
            raise FileNotFoundError(f"{self.url}/{LEASE_NAME}")
        return _parse(found[0]), found[1]

    def _put(self, if_match: str | None) -> None:
        """Write our record: create-only, or replacing exactly the version ``if_match``."""
        etag = self.objects.put_if(LEASE_NAME, self._record(), if_match)
        held, stored = self._read()
        if held.get("owner") != self.owner:  # a store that ignored the condition
            raise FileExistsError(f"{self.url}/{LEASE_NAME}")
        self._etag = etag or stored

    def _acquire_remote(self) -> None:
        try:
            self._put(None)
            return
        except FileExistsError:
            pass
        held, etag = self._read()
        if not _expired(held, self.ttl_s):
            raise OutputBusyError(self._busy(_describe(held)))
        log.warning("taking over the expired lease of %s", _describe(held))
        try:
            self._put(etag)
        except (FileExistsError, FileNotFoundError, OSError) as exc:
            raise OutputBusyError(self._busy("another driver that took it first")) from exc

    def _heartbeat(self) -> None:
        last_ok = time.monotonic()
        while not self._stop.wait(self.ttl_s / 3) and not self._lost:
            if self._renew():
                last_ok = time.monotonic()
            elif not self._lost and time.monotonic() - last_ok > self.ttl_s:
                self._lost = f"no renewal for {self.ttl_s:.0f} s"

    def _renew(self) -> bool:
        """Renew the lease if this driver still holds it; True when renewed."""
        try:
            held, _ = self._read()
            if held.get("owner") != self.owner:
                self._lost = f"{_describe(held)} holds it now"
                return False
            self._put(self._etag)
            return True
        except Exception as exc:  # noqa: BLE001 - retried until ttl_s has passed
            log.warning("could not renew the output lease (%s); retrying", type(exc).__name__)
            return False

    def _busy(self, holder: str) -> str:
        return (
            f"{self.url} is being written by another driver ({holder}). Two jobs must not "
            "write one output. Fix: wait for that job to end (a lease of a killed job on "
            f"another machine expires {self.ttl_s:.0f} s after its last heartbeat), or "
            "choose another output.root."
        )


def _parse(blob: bytes) -> dict[str, Any]:
    try:
        record = json.loads(blob or b"{}")
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


def _describe(held: dict[str, Any]) -> str:
    if not held:
        return "holder unknown"
    age = time.time() - float(held.get("heartbeat", 0))
    return f"pid {held.get('pid')} on {held.get('host')}, last heartbeat {age:.0f} s ago"


def _expired(held: dict[str, Any], ttl_s: float) -> bool:
    """A lease nobody renews: too old, or held by a process of this host that is gone."""
    if time.time() - float(held.get("heartbeat", 0)) > ttl_s:
        return True
    if held.get("host") != socket.gethostname():
        return False
    try:
        pid = int(held.get("pid", 0))
        if pid <= 0:
            return False
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError):
        return False
    return False

