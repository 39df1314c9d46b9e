"""A real S3-protocol server on loopback with a fault-injecting proxy in front of it.

::

    obstore / s3fs / zarr ──HTTP──> FaultyProxy (127.0.0.1:p) ──HTTP──> moto or SeaweedFS

The server is moto's ``ThreadedMotoServer`` (lenient: any credentials) or SeaweedFS
(:mod:`atlinter_ray.testing.seaweed`: checks signatures and conditional PUTs).

Tests and benchmarks point ``endpoint_url`` at the proxy. Each request is matched
against the proxy's rules in order; the first rule that matches and has uses left acts:

* ``"503"``  answers S3's ``SlowDown`` error (clients retry it);
* ``"drop"`` closes the connection without an answer;
* ``"hang"`` holds the request, unanswered, until :meth:`FaultyProxy.heal` (or stop).

Requests no rule matches pass through unchanged. The proxy (and moto) run in
threads of the calling process; Ray workers reach them over loopback like any client.
"""

from __future__ import annotations

import http.client
import re
import socket
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_SLOWDOWN = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
             b"<Message>Please reduce your request rate.</Message></Error>")
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te",
               "trailer", "upgrade", "content-length"}
ACTIONS = ("503", "drop", "hang")


@dataclass
class Rule:
    """Apply ``action`` to requests whose method and path match, ``times`` times (None: always)."""

    action: str
    method: str = ".*"
    path: str = ".*"
    times: int | None = None
    hits: int = 0

    def matches(self, method: str, path: str) -> bool:
        """True when the rule has uses left and matches the request."""
        return ((self.times is None or self.hits < self.times)
                and re.fullmatch(self.method, method) is not None
                and re.search(self.path, path) is not None)


class FaultyProxy:
    """A threaded HTTP proxy to ``upstream`` that injects faults by rule."""

    def __init__(self, upstream: str) -> None:
        host, port = upstream.split("//", 1)[-1].rstrip("/").split(":")
        self.upstream = (host, int(port))
        self.rules: list[Rule] = []
        self.seen: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._healed = threading.Event()
        self._healed.set()
        handle = self._handle

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_any(self) -> None:
                handle(self)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_any

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.endpoint_url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def add(self, action: str, method: str = ".*", path: str = ".*",
            times: int | None = None) -> Rule:
        """Add a fault rule (see the module docstring); returns it (``.hits`` counts uses)."""
        if action not in ACTIONS:
            raise ValueError(f"unknown fault {action!r}; choose one of {ACTIONS}")
        rule = Rule(action, method, path, times)
        with self._lock:
            self.rules.append(rule)
            if action == "hang":
                self._healed.clear()
        return rule

    def heal(self) -> None:
        """Drop every rule and release hung requests."""
        with self._lock:
            self.rules.clear()
        self._healed.set()

    def start(self) -> FaultyProxy:
        """Serve in a background thread."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving (hung requests are released)."""
        self._healed.set()
        self._server.shutdown()
        self._server.server_close()

    def _action(self, method: str, path: str) -> str | None:
        with self._lock:
            self.seen.append((method, path))
            for rule in self.rules:
                if rule.matches(method, path):
                    rule.hits += 1
                    return rule.action
        return None

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        action = self._action(h.command, h.path)
        if action == "hang":
            self._healed.wait()
            h.close_connection = True
            return
        if action == "drop":
            h.close_connection = True
            h.connection.shutdown(socket.SHUT_RDWR)
            return
        if action == "503":
            self._reply(h, 503, "Slow Down", [("Content-Type", "application/xml")], _SLOWDOWN)
            return
        conn = http.client.HTTPConnection(*self.upstream, timeout=120)
        try:
            headers = {k: v for k, v in h.headers.items() if k.lower() not in _HOP_BY_HOP}
            conn.request(h.command, h.path, body=body, headers=headers)
            resp = conn.getresponse()
            self._reply(h, resp.status, resp.reason, resp.getheaders(), resp.read())
        finally:
            conn.close()

    @staticmethod
    def _reply(h: BaseHTTPRequestHandler, status: int, reason: str,
               headers: list[tuple[str, str]], data: bytes) -> None:
        h.send_response(status, reason)
        for key, value in headers:
            if key.lower() not in _HOP_BY_HOP:
                h.send_header(key, value)
        # a HEAD answer has no body but tells the object's size: keep the server's length
        upstream = dict((k.lower(), v) for k, v in headers).get("content-length")
        h.send_header("Content-Length", upstream if h.command == "HEAD" and upstream
                      else str(len(data)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(data)


#: The S3-protocol servers :class:`S3Server` can run.
BACKENDS = ("moto", "seaweedfs")
#: AWS's documentation example credentials: a second identity of every server (moto
#: takes any), for tests that check credentials given on a command line never show.
EXAMPLE_CREDENTIALS = ("AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY")


class S3Server:
    """An S3 server (``backend``) on loopback with a :class:`FaultyProxy` in front.

    A context manager. ``options`` are storage options that go through the proxy;
    ``direct`` go straight to the server (for setting up and checking, untouched by
    faults).
    """

    def __init__(self, buckets: tuple[str, ...] = ("atlas-in", "atlas-out"),
                 key: str = "testing-key", secret: str = "testing-secret-value",
                 backend: str = "moto") -> None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown S3 server {backend!r}; choose one of {BACKENDS}")
        self.backend, self.buckets, self.key, self.secret = backend, buckets, key, secret
        self._server: Any
        if backend == "moto":
            from moto.server import ThreadedMotoServer

            from atlinter_ray.testing.ray_head import free_ports

            (port,) = free_ports(1)
            self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
            endpoint = f"http://127.0.0.1:{port}"
        else:
            from atlinter_ray.testing.seaweed import SeaweedServer

            self._server = SeaweedServer({key: secret, EXAMPLE_CREDENTIALS[0]:
                                          EXAMPLE_CREDENTIALS[1]})
            endpoint = self._server.endpoint_url
        self.direct = {"endpoint_url": endpoint, "key": key, "secret": secret}
        self.proxy = FaultyProxy(endpoint)
        self.options = {**self.direct, "endpoint_url": self.proxy.endpoint_url}

    def start(self) -> S3Server:
        """Start the server and the proxy; create the buckets."""
        self.proxy.start()
        try:
            self._server.start()
            self._make_buckets()
        except BaseException:
            self.stop()
            raise
        return self

    def _make_buckets(self) -> None:
        """Create the buckets (SeaweedFS may need a few seconds to take the first writes)."""
        import s3fs

        fs = s3fs.S3FileSystem(**self.direct, skip_instance_cache=True)
        deadline = time.monotonic() + 60
        for bucket in self.buckets:
            while True:
                try:
                    fs.makedirs(bucket, exist_ok=True)
                    fs.pipe_file(f"{bucket}/.ready", b"")
                    fs.rm_file(f"{bucket}/.ready")
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.5)

    def server_cpu_s(self) -> float:
        """CPU seconds the server has used: SeaweedFS's process; for moto, which runs in
        threads here, this whole process's (the proxy's and the caller's included)."""
        if self.backend == "moto":
            return time.process_time()
        return float(self._server.cpu_seconds())

    def stop(self) -> None:
        """Stop the proxy and the server."""
        self.proxy.stop()
        self._server.stop()

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
