"""Ctrl-C and SIGTERM as users expect: stop now, keep finished work, exit 130 / 143.

While a job runs (:func:`stop_on_signals`), SIGINT and SIGTERM raise
:class:`Interrupted` in the driver; it unwinds like any exception, so every
``finally`` runs (the actor pool ends its actors, the output lease is released) and
nothing half-written is marked done (a task is marked only after its slices are
written). A second signal during that cleanup ends the process at once. ``ray.init``
installs its own SIGTERM handler; :func:`keep_handlers` puts ours back.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from types import FrameType

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """The job received SIGINT or SIGTERM; ``exit_status`` is 128 + the signal number."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_status(self) -> int:
        """The shell's convention: 130 for SIGINT, 143 for SIGTERM."""
        return 128 + self.signum


def exit_status(exc: KeyboardInterrupt) -> int:
    """The exit status for ``exc``: its signal's, or SIGINT's for a plain KeyboardInterrupt."""
    return exc.exit_status if isinstance(exc, Interrupted) else 128 + signal.SIGINT


def signal_name(exc: KeyboardInterrupt) -> str:
    """``SIGINT`` or ``SIGTERM``."""
    return signal.Signals(exc.signum).name if isinstance(exc, Interrupted) else "SIGINT"


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Turn the first SIGINT/SIGTERM into :class:`Interrupted`; a second one ends the process."""
    received: list[int] = []

    def handler(signum: int, frame: FrameType | None) -> None:
        if received:  # cleanup after the first signal is taking too long: stop now
            os._exit(128 + received[0])
        received.append(signum)
        raise Interrupted(signum)

    saved = {s: signal.getsignal(s) for s in SIGNALS}
    for s in SIGNALS:
        signal.signal(s, handler)
    try:
        yield
    except KeyboardInterrupt as exc:
        if received and not isinstance(exc, Interrupted):
            # Ray's blocking calls run the handler, drop its exception and raise a plain
            # KeyboardInterrupt of their own: name the signal that was really received
            raise Interrupted(received[0]) from exc
        raise
    finally:
        for s, previous in saved.items():
            signal.signal(s, previous)


@contextlib.contextmanager
def keep_handlers() -> Iterator[None]:
    """Restore the SIGINT/SIGTERM handlers that the block (``ray.init``) replaces."""
    if threading.current_thread() is not threading.main_thread():
        yield  # handlers belong to the main thread; ray.init sets none elsewhere
        return
    saved = {s: signal.getsignal(s) for s in SIGNALS}
    try:
        yield
    finally:
        for s, previous in saved.items():
            if previous is not None and signal.getsignal(s) is not previous:
                signal.signal(s, previous)
