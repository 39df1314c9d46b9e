"""One driver at a time per output root: a lease object in the store itself, and fencing.

Two drivers writing one output would mix two runs' markers, images and summaries, so
the second is refused before it writes anything, with the holder named::

    local disk      <root>/.atlinter_ray.lock, held with an OS lock (flock) for the
                    run; the OS drops it when the process dies, so a killed driver
                    never blocks the next run
    object store    <root>/_lease.json = {owner, host, pid, epoch, beat}; created with a
                    conditional PUT (If-None-Match: *; on s3:// through obstore, whose
                    conflict error is the same on AWS, moto and SeaweedFS), renewed every
                    ttl/3 seconds by a thread with If-Match on its last ETag (``beat``
                    counts the renewals, so every renewal changes the object)

Expiry compares no clocks of two hosts: a driver that finds the lease held watches the
record, on its own monotonic clock, and takes it over (If-Match on the version it
watched, so one taker wins) only when the record stayed unchanged for ``ttl_s``, or at
once when its holder is a dead process of this same host. A record that changes while
it watches has a live holder: the driver is refused (:class:`OutputBusyError`).

Fencing: every acquire or takeover raises the lease's ``epoch`` by one (it is kept in
the lock file, and a released ``_lease.json`` keeps its epoch). The driver's
:class:`FenceToken` (epoch and owner) travels with every task; :func:`check_fence`,
called right before a task's marker and a dataset's final metadata are written, reads
the lease record and refuses (:class:`SupersededError`) the write of a driver whose
lease another driver has taken since, so a worker of a superseded driver never marks
anything done. A driver that finds its lease renewed by someone else (or cannot renew
it for ``ttl_s``) has lost it: :meth:`OutputLease.check` then raises, and the run stops
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
from dataclasses import dataclass
from typing import Any, Self

from atlinter_ray.errors import IncompleteOutputError, OutputBusyError, SupersededError
from atlinter_ray.objects import Objects

log = logging.getLogger(__name__)

LOCK_NAME = ".atlinter_ray.lock"
LEASE_NAME = "_lease.json"
#: Longest pause between two looks at a lease being watched for expiry (seconds).
WATCH_EVERY_S = 2.0


@dataclass(frozen=True, slots=True)
class FenceToken:
    """Which lease a write belongs to: its epoch (raised by every acquire) and holder."""

    epoch: int
    owner: str


class OutputLease:
    """Exclusive use of an output root by this driver; a context manager."""

    def __init__(self, objects: Objects, ttl_s: float = 60.0):
        self.objects, self.url, self.ttl_s = objects, objects.url, ttl_s
        self.owner = uuid.uuid4().hex
        self.epoch = 0
        self._beat = 0
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

    @property
    def token(self) -> FenceToken:
        """The fencing token of the lease this driver took (after :meth:`acquire`)."""
        return FenceToken(self.epoch, self.owner)

    def check(self) -> None:
        """Raise :class:`IncompleteOutputError` when this driver no longer holds the lease."""
        if self._lost:
            raise IncompleteOutputError(
                f"{self.url}: this run lost its lease on the output ({self._lost}); nothing "
                "more is marked complete. Fix: make sure only one job writes this "
                "output.root, then rerun the same command."
            )

    def release(self) -> None:
        """Give the lease back, keeping its epoch (best effort: an expired lease is free anyway)."""
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
                    self.objects.put_if(LEASE_NAME, self._record(released=True), self._etag)
            except (OSError, ValueError):
                log.debug("could not release the lease", exc_info=True)

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
        self.epoch = _epoch(_parse(os.pread(fd, 4096, 0))) + 1
        os.ftruncate(fd, 0)
        os.pwrite(fd, self._record(), 0)
        self._fd = fd

    # -- object stores: a conditional PUT and a heartbeat -------------------------------
    def _record(self, released: bool = False) -> bytes:
        record = {"owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(),
                  "epoch": self.epoch, "beat": self._beat}
        return json.dumps({**record, "released": True} if released else record).encode()

    def _read(self) -> tuple[dict[str, Any], str | None]:
        """The lease record and its ETag; FileNotFoundError when there is none."""
        found = self.objects.get_tagged(LEASE_NAME)
        if found is None:
            raise FileNotFoundError(f"{self.url}/{LEASE_NAME}")
        return _parse(found[0]), found[1]

    def _put(self, if_match: str | None) -> None:
        """Write our record: create-only, or replacing exactly the version ``if_match``."""
        etag = self.objects.put_if(LEASE_NAME, self._record(), if_match)
        if etag is not None and self.objects.capabilities.conditional_create:
            self._etag = etag  # the store itself refused any conflict: no read-back
            return
        held, stored = self._read()
        if held.get("owner") != self.owner:  # a store that ignored the condition
            raise FileExistsError(f"{self.url}/{LEASE_NAME}")
        self._etag = etag or stored

    def _acquire_remote(self) -> None:
        self.epoch = 1
        try:
            self._put(None)
            return
        except FileExistsError:
            pass
        held, etag = self._read()
        if not (held.get("released") or _dead_here(held)):
            held, etag = self._watch(held, etag)
        if not held.get("released"):  # a released lease is the normal case: no warning
            log.warning("taking over the expired lease of %s", _describe(held))
        self.epoch = _epoch(held) + 1
        try:
            self._put(etag)
        except (FileExistsError, FileNotFoundError, OSError) as exc:
            raise OutputBusyError(self._busy("another driver that took it first")) from exc

    def _watch(self, held: dict[str, Any], etag: str | None) -> tuple[dict[str, Any], str | None]:
        """Watch a held lease for ``ttl_s`` of this host's monotonic clock.

        Returns the record (and ETag) to take over: unchanged all along, or released
        meanwhile. A record renewed meanwhile has a live holder: :class:`OutputBusyError`.
        """
        log.info("the output lease is held by %s; watching it for up to %.0f s",
                 _describe(held), self.ttl_s)
        deadline = time.monotonic() + self.ttl_s
        while (left := deadline - time.monotonic()) > 0:
            time.sleep(min(left, WATCH_EVERY_S, self.ttl_s / 6))
            try:
                now, now_etag = self._read()
            except FileNotFoundError:  # removed meanwhile: free, taken with a create
                return {}, None
            if now.get("released"):
                return now, now_etag
            if (now, now_etag) != (held, etag):
                raise OutputBusyError(self._busy(_describe(now)))
        return held, etag

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
            self._beat += 1
            self._put(self._etag)
            return True
        except Exception as exc:  # noqa: BLE001 - retried until ttl_s has passed
            log.warning("could not renew the output lease (%s); retrying", type(exc).__name__)
            return False

    def _busy(self, holder: str) -> str:
        return (
            f"{self.url} is being written by another driver ({holder}). Two jobs must not "
            "write one output. Fix: wait for that job to end (the lease of a job killed on "
            f"another machine is taken over once it stayed unrenewed for {self.ttl_s:.0f} s "
            "while the next job watched it), or choose another output.root."
        )


def read_lease(objects: Objects) -> dict[str, Any]:
    """The lease record of an output root (``{}`` when there is none)."""
    lock = objects.local_path(LOCK_NAME)
    if lock is None:
        return _parse(objects.get(LEASE_NAME) or b"")
    try:
        with open(lock, "rb") as f:
            return _parse(f.read(4096))
    except FileNotFoundError:
        return {}


def check_fence(objects: Objects, token: FenceToken | None, what: str) -> None:
    """Refuse a write for ``what`` when the lease is no longer ``token``'s (None: unfenced).

    Called right before a commit's marker and a dataset's final metadata: the record is
    read from the store itself, so a worker of a driver whose lease was taken over since
    is refused whatever its driver believes.
    """
    if token is None:
        return
    held = read_lease(objects)
    if (_epoch(held), held.get("owner")) != (token.epoch, token.owner) or held.get("released"):
        raise SupersededError(
            f"{what}: not marked done: another driver took over {objects.url} (lease epoch "
            f"{_epoch(held)}, held by {_describe(held)}; this run's epoch {token.epoch}), so "
            "this run's writes are refused. Fix: let that job finish, or rerun the same "
            "command once it has ended."
        )


def _parse(blob: bytes) -> dict[str, Any]:
    try:
        record = json.loads(blob or b"{}")
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


def _epoch(held: dict[str, Any]) -> int:
    """The epoch of a lease record (0 for none, or one written before epochs)."""
    try:
        return int(held.get("epoch", 0))
    except (TypeError, ValueError):
        return 0


def _describe(held: dict[str, Any]) -> str:
    if not held:
        return "holder unknown"
    return f"pid {held.get('pid')} on {held.get('host')}, lease epoch {_epoch(held)}"


def _dead_here(held: dict[str, Any]) -> bool:
    """True when the holder is a process of this host that is gone."""
    if held.get("host") != socket.gethostname():
        return False
    try:
        pid = int(held.get("pid", 0))
        if pid <= 0:
            return False
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError, TypeError):
        return False
    return False
