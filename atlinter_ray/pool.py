"""An autoscaling pool of stateful Ray actors, fed from a queue of work items.

Each actor builds its worker (a model, a client) once and then serves one item per
call; the driver keeps ``calls_per_actor`` calls queued on every ready actor so none
waits for a round trip, and hands the next item to whichever actor finishes first.
The pool asks Ray for as many actors as there is work for, up to ``max_workers``:
actors Ray cannot place yet stay pending, and on an autoscaling cluster that pending
demand is what brings GPU nodes up. Work only goes to actors that are ready. Once the
queue is empty, idle actors above ``min_workers`` and still-pending ones are released,
so their nodes can go idle and leave before the run ends.

If an actor dies (node lost, out of memory), or its method raises
:class:`~atlinter_ray.errors.FatalWorkerError` (its GPU is unusable; the pool then ends
it), its items go back to the queue, up to
``max_attempts`` times each, and a replacement is started; an item that keeps failing,
or that no actor is left to run, becomes a failure result instead, so the caller
always gets one result per item. Items must therefore be idempotent to run twice. A
call that runs longer than ``call_timeout_s`` counts as a death: its actor is killed
(a hung store client never returns by itself) and the item goes back to the queue;
``stalled()``, when given, is then called once, and an exception it raises (the driver's
probe found the store hung) ends every actor and reaches the caller.
Every rerun is counted in :class:`PoolStats`. When nothing finishes for
``heartbeat_s``, a log line says what is running and for how long. Each actor filters
its failure logs as the driver does (:mod:`atlinter_ray.quiet`): the caller reports
every failure once, and tracebacks appear only with ``run.debug=true``.

A result may bring more work: ``more(result)`` returns items that go to the front of
the queue (the driver uses it to finish a dataset on a worker once its last task is
done, and to redo tasks whose output went missing).

Why not Ray Data's ``map_batches`` with an ``ActorPoolStrategy``: on this project's
2-core machine it took 5.3 s from the call to two constructed actors, against 1.2 s
for plain actors, and each of its workers carries Ray Data's imports; for a whole-volume
job of a few seconds of compute that start-up was the largest cost.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from atlinter_ray.errors import FatalWorkerError
from atlinter_ray.quiet import debug_enabled, quiet_failures

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class PoolSpec:
    """Size and per-actor resources of a pool."""

    min_workers: int = 1
    max_workers: int = 2
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    #: Calls queued on each ready actor, so it never waits for the driver between items.
    calls_per_actor: int = 2
    #: Runs of one item before it is reported failed (its actors having died).
    max_attempts: int = 3
    #: Seconds to wait for the first actor to be placed and built before every item is
    #: reported failed (None: forever); a warning is logged every ``warn_every_s``.
    start_timeout_s: float | None = 900.0
    warn_every_s: float = 60.0
    #: Seconds one call may run before its actor is killed and the item rerun (None: no limit).
    call_timeout_s: float | None = None
    #: Seconds without any result after which a progress line is logged.
    heartbeat_s: float = 60.0


@dataclass
class PoolStats:
    """What the pool had to repeat: items rerun after their actor died or timed out."""

    retries: int = 0
    timeouts: int = 0


@dataclass
class _Entry(Generic[T]):
    item: T
    attempts: int = 0


@dataclass
class _Actor:
    handle: Any
    ready_ref: Any
    ready: bool = False
    calls: list[Any] = field(default_factory=list)  # refs, in the order the actor runs them
    #: When the call at the head of ``calls`` started (monotonic seconds).
    since: float = 0.0


def map_unordered(
    worker_class: type,
    args: tuple[Any, ...],
    items: Sequence[T],
    spec: PoolSpec,
    failed: Callable[[T, str], R],
    method: str | Callable[[T], str] = "run",
    more: Callable[[R], Sequence[T]] | None = None,
    stats: PoolStats | None = None,
    stalled: Callable[[], None] | None = None,
) -> Iterator[R]:
    """Yield ``worker_class(*args).<method>(item)`` for every item, as actors finish them.

    ``failed(item, error)`` builds the result of an item that could not be run;
    ``method`` may name the method per item; ``more(result)`` returns follow-up items
    (run before the rest of the queue); ``stats`` counts reruns; ``stalled()`` is called
    after calls timed out, and what it raises ends the pool. Closing the iterator early
    ends every actor.
    """
    pool = _ActorPool(worker_class, args, spec, failed, method, more, stats or PoolStats(),
                      stalled)
    try:
        yield from pool.run(items)
    finally:
        pool.close()


class _ActorPool(Generic[T, R]):
    """The state of one :func:`map_unordered` call: actors, their calls and the queue."""

    def __init__(
        self,
        worker_class: type,
        args: tuple[Any, ...],
        spec: PoolSpec,
        failed: Callable[[T, str], R],
        method: str | Callable[[T], str],
        more: Callable[[R], Sequence[T]] | None,
        stats: PoolStats,
        stalled: Callable[[], None] | None = None,
    ) -> None:
        import ray

        self.remote: Any = ray.remote(_quieted(worker_class, debug_enabled())).options(
            num_cpus=spec.num_cpus, num_gpus=spec.num_gpus or None, max_restarts=0
        )
        self.args, self.spec, self.failed, self.method = args, spec, failed, method
        self.more, self.stats, self.stalled = more, stats, stalled
        self.queue: deque[_Entry[T]] = deque()
        self.actors: dict[Any, _Actor] = {}  # by the ref that resolves when it is ready
        self.calls: dict[Any, tuple[_Actor, _Entry[T]]] = {}
        self.replacements = 2 * spec.max_workers  # for actors that died
        #: The last failure of an actor or call ("" while none failed).
        self.last_error = ""
        #: Since when no actor has been ready (monotonic seconds; None while one is).
        self.unready_since: float | None = None

    def run(self, items: Sequence[T]) -> Iterator[R]:
        """Feed every item to the actors; yield each result (or failure) once."""
        import ray

        spec = self.spec
        self.queue.extend(_Entry(item) for item in items)
        self.start(min(spec.max_workers, max(len(items), spec.min_workers if items else 0)))
        since = time.monotonic()  # of the last event: an actor up or down, a result
        quiet = since  # of the last result or heartbeat line
        gave_up = ""  # why the wait for a worker ended (start_timeout_s)
        while self.calls or (self.queue and self.actors):
            waiting = [k for k, a in self.actors.items() if not a.ready] + list(self.calls)
            done, _ = ray.wait(waiting, num_returns=1, timeout=self._wait_s(quiet))
            now = time.monotonic()
            if not done:
                yield from self.expire(now)
                if self.unready_since is not None:
                    waited = now - self.unready_since
                    unplaced = _unplaced(spec, waited, self.last_error)
                    if spec.start_timeout_s is not None and waited >= spec.start_timeout_s:
                        gave_up = unplaced
                        break
                    if now - quiet >= spec.warn_every_s:
                        log.warning("%s", unplaced)
                        quiet = now
                elif now - quiet >= spec.heartbeat_s:
                    log.info("%s", self.heartbeat(now, now - since))
                    quiet = now
                self.feed()
                continue
            since = quiet = now
            yield from self.collect(done[0])
            self.feed()
            if not self.queue:
                _shrink(list(self.actors.values()), spec.min_workers, self.release)
        for entry in self.queue:  # no actor could be started or kept alive
            yield self.failed(entry.item, gave_up or self.last_error
                              or "no worker could be started")

    def _wait_s(self, quiet: float) -> float:
        """How long to wait for the next event: until a deadline, a heartbeat or a warning."""
        spec, now = self.spec, time.monotonic()
        ends = [quiet + (spec.heartbeat_s if self.unready_since is None else spec.warn_every_s)]
        if spec.start_timeout_s is not None and self.unready_since is not None:
            ends.append(self.unready_since + spec.start_timeout_s)
        if spec.call_timeout_s is not None:
            ends += [a.since + spec.call_timeout_s for a in self.actors.values() if a.calls]
        return max(0.01, min(ends) - now)

    def expire(self, now: float) -> Iterator[R]:
        """Kill the actors whose running call passed ``call_timeout_s``; requeue their items."""
        import ray

        limit = self.spec.call_timeout_s
        if limit is None:
            return
        expired = [a for a in self.actors.values() if a.calls and now - a.since >= limit]
        for actor in expired:
            self.stats.timeouts += 1
            ray.kill(actor.handle)
            yield from self.lost(actor, f"timed out after {limit:.0f} s (resources.task_timeout_s)")
        if expired and self.stalled is not None:
            self.stalled()

    def heartbeat(self, now: float, idle: float) -> str:
        """One line on what the pool is doing while nothing finishes."""
        running = [now - a.since for a in self.actors.values() if a.calls]
        longest = f" (the longest for {max(running):.0f} s)" if running else ""
        return (f"still working: {len(running)} call(s) running{longest}, {len(self.queue)} "
                f"queued; nothing finished in the last {idle:.0f} s")

    def collect(self, ref: Any) -> Iterator[R]:
        """Handle a finished ref: an actor that started (or failed to), or a call's result."""
        import ray

        if ref in self.actors:
            try:
                ray.get(ref)
                self.actors[ref].ready = True
                self.unready_since = None
            except ray.exceptions.RayError as exc:
                yield from self.lost(self.actors[ref], _describe(exc))
            return
        actor, entry = self.calls[ref]
        try:
            result = ray.get(ref)
        except ray.exceptions.RayActorError as exc:
            yield from self.lost(actor, _describe(exc))
            return
        except ray.exceptions.RayError as exc:  # the method itself raised
            if isinstance(getattr(exc, "cause", None), FatalWorkerError):
                # its device is unusable: end it, rerun its items on another actor
                ray.kill(actor.handle)
                yield from self.lost(actor, _describe(exc))
                return
            result = self.failed(entry.item, _describe(exc))
        del self.calls[ref]
        actor.calls.remove(ref)
        actor.since = time.monotonic()  # the next queued call starts now
        follow = list(self.more(result)) if self.more is not None else []
        self.queue.extendleft(_Entry(item) for item in reversed(follow))
        if follow and not self.actors:
            self.start(min(self.spec.max_workers, len(self.queue)))
        yield result

    def start(self, n: int) -> None:
        """Ask Ray for ``n`` more actors (they may stay pending until placed)."""
        for _ in range(n):
            handle = self.remote.remote(*self.args)
            ready_ref = handle.__ray_ready__.remote()
            self.actors[ready_ref] = _Actor(handle, ready_ref)
        self._note_unready()

    def _note_unready(self) -> None:
        """Start the clock of :func:`_unplaced` when no actor is ready any more."""
        if self.unready_since is None and not any(a.ready for a in self.actors.values()):
            self.unready_since = time.monotonic()

    def release(self, actor: _Actor) -> None:
        """Forget ``actor`` and end it."""
        import ray

        del self.actors[actor.ready_ref]
        ray.kill(actor.handle)
        self._note_unready()

    def feed(self) -> None:
        """Keep ``calls_per_actor`` calls queued on every ready actor."""
        for actor in self.actors.values():
            while actor.ready and self.queue and len(actor.calls) < self.spec.calls_per_actor:
                entry = self.queue.popleft()
                entry.attempts += 1
                name = self.method if isinstance(self.method, str) else self.method(entry.item)
                ref = getattr(actor.handle, name).remote(entry.item)
                if not actor.calls:
                    actor.since = time.monotonic()
                actor.calls.append(ref)
                self.calls[ref] = (actor, entry)

    def lost(self, actor: _Actor, error: str) -> Iterator[R]:
        """Forget a dead actor; requeue or fail its items; start a replacement."""
        self.last_error = error
        del self.actors[actor.ready_ref]
        self._note_unready()
        for position, ref in enumerate(actor.calls):
            _, entry = self.calls.pop(ref)
            if position:  # queued behind the running call: it never ran
                entry.attempts -= 1
            if entry.attempts < self.spec.max_attempts:
                self.stats.retries += 0 if position else 1
                self.queue.appendleft(entry)
            else:
                yield self.failed(entry.item, error)
        if self.queue and self.replacements > 0 and len(self.actors) < self.spec.max_workers:
            self.replacements -= 1
            log.warning("a worker died (%s); starting a replacement", error)
            self.start(1)

    def close(self) -> None:
        """End every actor still held."""
        for actor in list(self.actors.values()):
            self.release(actor)


def _quieted(worker_class: type, debug: bool) -> type:
    """``worker_class`` whose actors log failures as the driver does (:mod:`atlinter_ray.quiet`).

    A subclass defined here (pickled by value), so each actor process installs the
    filter before the worker's own constructor runs.
    """

    base: Any = worker_class

    def __init__(self: Any, *args: Any) -> None:
        quiet_failures(debug)
        base.__init__(self, *args)

    return type(worker_class.__name__, (worker_class,), {"__init__": __init__})


def _shrink(actors: list[_Actor], keep: int, release: Callable[[_Actor], None]) -> None:
    """With nothing left to hand out: release pending actors, and idle ones above ``keep``."""
    pending = [a for a in actors if not a.ready]
    for actor in pending:
        release(actor)
    ready = [a for a in actors if a.ready]
    idle = [a for a in ready if not a.calls]
    for actor in idle[: max(0, len(ready) - keep)]:
        release(actor)


def _unplaced(spec: PoolSpec, waited: float, last_error: str = "") -> str:
    """Why no worker runs, and what to change; after ``last_error`` (the failure that ended
    the last worker), that failure first: a worker that died of it says nothing of resources."""
    import ray

    if last_error:
        return (f"{last_error}; no replacement worker started in the {waited:.0f} s that "
                "followed")
    return (
        f"no worker started in {waited:.0f} s: each asks for {spec.num_cpus} CPU and "
        f"{spec.num_gpus} GPU, and the cluster now has {ray.available_resources()}. Fix: "  # type: ignore[no-untyped-call]
        "lower resources.gpus_per_worker / resources.cpus_per_worker, or add nodes (an "
        "autoscaling cluster can take minutes: raise resources.start_timeout_s)"
    )


def _describe(exc: BaseException) -> str:
    """A short cause for a failure row: the worker's own exception when Ray has it."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        exc = cause
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[-1][:300] if lines else ''}"
