"""Calls that may hang (a store that stops answering) given a bounded time.

A request to a store that accepts the connection and never answers does not return by
itself for minutes (the client's own timeouts and retries: obstore's ``retry_timeout``
is 180 s). Where the driver needs an answer in bounded time, it runs the call in a
daemon thread and stops waiting after the time given; the thread is left behind, so
nothing (the process's exit included) waits on it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def call_within(fn: Callable[[], T], timeout_s: float, what: str) -> T:
    """``fn()``'s result or exception; :class:`TimeoutError` naming ``what`` after ``timeout_s``."""
    done: list[T] = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            done.append(fn())
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller below
            errors.append(exc)

    thread = threading.Thread(target=target, name=f"within-{what[:40]}", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if errors:
        raise errors[0]
    if thread.is_alive():
        raise TimeoutError(f"{what} got no answer in {timeout_s:.0f} s")
    return done[0]
