"""Quiet failures: one message per failure, tracebacks only with ``run.debug=true``.

A worker that fails a task logs it with its traceback (``log.exception``) and returns
the failure to the driver, which reports it in one line. Without a filter, Ray forwards
the worker's traceback to the driver's console (``log_to_driver``), and a serial run
prints it beside the driver's line. :func:`quiet_failures` installs, in one process,
a filter on the handlers that print our records::

    record of ours with a traceback ──> run.debug=false: dropped (the driver's line says why)
                                    └─> run.debug=true: the traceback appended to
                                        traceback_log() on this node; the record becomes
                                        one line that names that file

The driver installs it when a job starts (``cli.guarded``); the actor pool installs it
in every worker process it starts, with the driver's setting (:func:`debug_enabled`).
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import traceback
from pathlib import Path

#: Records of these loggers (and their children) are ours.
PACKAGE = "atlinter_ray"

_state = {"debug": False}


class _FailureFilter(logging.Filter):
    """Drops our records that carry a traceback, or (debug) files it and names the file."""

    def __init__(self, debug: bool) -> None:
        super().__init__()
        self.debug = debug

    def filter(self, record: logging.LogRecord) -> bool:
        """False for a traceback-carrying record of ours unless debug; see the module doc."""
        if not record.exc_info or not (record.name == PACKAGE or record.name.startswith(PACKAGE + ".")):
            return True
        if not self.debug:
            return False
        exc = record.exc_info[1]
        path = traceback_log()
        path.parent.mkdir(parents=True, exist_ok=True)
        text = "".join(traceback.format_exception(*record.exc_info))
        with path.open("a", encoding="utf-8") as log_file:
            log_file.write(f"--- {record.getMessage()}\n{text}\n")
        cause = f"{type(exc).__name__}: {exc}" if exc is not None else "no exception"
        record.msg, record.args = f"{record.getMessage()}: {cause} (traceback in {path})", None
        record.exc_info, record.exc_text = None, None
        return True


def traceback_log() -> Path:
    """The file this process appends failure tracebacks to (run.debug=true), on its node."""
    return Path(tempfile.gettempdir()) / PACKAGE / f"tracebacks-{socket.gethostname()}-{os.getpid()}.log"


def debug_enabled() -> bool:
    """The setting :func:`quiet_failures` was last called with in this process."""
    return _state["debug"]


def quiet_failures(debug: bool) -> None:
    """Filter this process's log output as the module doc says (replacing an earlier call).

    The filter goes on the root logger's handlers; a process without any (a Ray worker)
    gets a stderr handler for our records, at the level Python's fallback prints.
    """
    _state["debug"] = debug
    handlers = logging.getLogger().handlers
    if not handlers:
        ours = logging.getLogger(PACKAGE)
        if not ours.handlers:
            stderr = logging.StreamHandler()
            stderr.setLevel(logging.WARNING)
            ours.addHandler(stderr)
        handlers = ours.handlers
    for handler in handlers:
        for old in [f for f in handler.filters if isinstance(f, _FailureFilter)]:
            handler.removeFilter(old)
        handler.addFilter(_FailureFilter(debug))
