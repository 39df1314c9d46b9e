"""A Ray head of a test's own, beside any other Ray cluster on the machine.

`ray start --head --block` with its own temp dir and free ports, in its own process
group. Stopping it signals exactly that group (and any process naming its temp dir),
never `ray stop`, which ends every Ray cluster on the machine, other people's too.
Also :func:`start_local_ray`, the small in-process cluster of most tests.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil

RAY = shutil.which("ray") or str(Path(sys.executable).with_name("ray"))
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free on this machine right now."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port() -> int:
    """A TCP port nobody listens on right now (loopback)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start_local_ray(num_cpus: int = 2, num_gpus: int = 0) -> None:
    """Start a small local cluster in this process: dashboard off, small object store."""
    import ray

    ray.init(
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        include_dashboard=False,
        object_store_memory=200 * 1024**2,
        log_to_driver=False,
        configure_logging=False,
    )


class LocalHead:
    """A Ray head of our own; ``token`` turns token authentication on.

    Args:
        num_cpus, num_gpus: the head's logical resources (GPUs may be fake).
        token: the cluster's auth token (RAY_AUTH_MODE=token), or None for
            RAY_AUTH_MODE=disabled.
        extra_args: more `ray start` options (e.g. ``--autoscaling-config=...``).
        extra_env: more environment for the head's processes.
    """

    def __init__(
        self,
        num_cpus: int = 2,
        num_gpus: int = 0,
        token: str | None = None,
        extra_args: list[str] | None = None,
        extra_env: dict[str, str] | None = None,
    ):
        self.token = token
        # Short: Ray's unix socket paths live under it (108-byte limit).
        self.temp_dir = tempfile.mkdtemp(prefix="rjs", dir="/tmp")
        (gcs, dash, client, agent_http, agent_grpc, runtime_env, metrics, nm, om) = free_ports(9)
        self.gcs_port, self.dashboard_port = gcs, dash
        self.address = f"http://127.0.0.1:{dash}"
        self.env = {
            **os.environ,
            # `python` in a job's entry point is this interpreter, as in an activated venv
            "PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]),
            "RAY_AUTH_MODE": "token" if token else "disabled",
            "RAY_USAGE_STATS_ENABLED": "0",
            **(extra_env or {}),
        }
        if token:
            self.env["RAY_AUTH_TOKEN"] = token
        else:
            self.env.pop("RAY_AUTH_TOKEN", None)
        self.env.pop("RAY_ADDRESS", None)
        self.cmd = [
            RAY, "start", "--head", "--block",
            f"--port={gcs}", f"--num-cpus={num_cpus}", f"--num-gpus={num_gpus}",
            "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
            f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent_http}",
            f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={runtime_env}",
            f"--metrics-export-port={metrics}", f"--node-manager-port={nm}",
            f"--object-manager-port={om}", f"--temp-dir={self.temp_dir}",
            "--object-store-memory=200000000", "--disable-usage-stats",
            *(extra_args or []),
        ]
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = Path(self.temp_dir) / "ray_start.log"

    @property
    def gcs_address(self) -> str:
        """host:port of the head's GCS (what RAY_ADDRESS names for a driver)."""
        from ray._private.services import get_node_ip_address

        return f"{get_node_ip_address()}:{self.gcs_port}"  # type: ignore[no-untyped-call]

    def start(self, timeout: float = 120) -> None:
        """Start the head; return when its dashboard answers (raise with its log if not)."""
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                self.cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: we stop exactly it
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited {self.proc.returncode}:\n{self.log()}")
            if self.http_status("/api/jobs/", self.token) == 200:
                return
            time.sleep(1)
        raise TimeoutError(f"the dashboard did not answer in {timeout} s:\n{self.log()}")

    def http_status(self, path: str, token: str | None) -> int | None:
        """HTTP status of a dashboard GET (None: no answer)."""
        request = urllib.request.Request(self.address + path)
        if token is not None:
            request.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                status: int = response.status
                return status
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError:
            return None

    def ray_cli(
        self, *args: str, timeout: float = 300, cwd: str | Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run the `ray` CLI against this head (with its token), from ``cwd``."""
        return subprocess.run(
            [RAY, *args], env={**self.env, "RAY_ADDRESS": self.address}, cwd=cwd,
            capture_output=True, text=True, timeout=timeout,
        )

    def log(self) -> str:
        """The tail of `ray start`'s output."""
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""

    def stop(self, grace: float = 3) -> None:
        """End every process of this head (and only those), then remove its temp dir.

        All of them run in the process group of the `ray start` we launched (nodes an
        autoscaler starts too: the fake provider runs them under the head's monitor):
        SIGTERM to the group (what `ray stop` sends to each Ray process), SIGKILL to
        what is left after ``grace`` seconds, then any process still naming our temp
        dir.
        """
        if self.proc is not None:
            group = self.proc.pid  # start_new_session: the group id is its pid
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGTERM)
            deadline = time.monotonic() + grace
            # `ray start` itself outlives SIGTERM: wait for the processes it started.
            while time.monotonic() < deadline and _group_alive(group, but=self.proc.pid):
                time.sleep(0.5)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)
        for p in psutil.process_iter(["pid", "cmdline"]):
            with contextlib.suppress(psutil.Error):
                if any(self.temp_dir in part for part in p.info["cmdline"] or []):
                    p.kill()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _group_alive(group: int, but: int) -> bool:
    """Whether a live (not zombie) process other than ``but`` is in group ``group``."""
    for p in psutil.process_iter(["pid", "status"]):
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if (
                p.pid != but
                and p.info["status"] != psutil.STATUS_ZOMBIE
                and os.getpgid(p.pid) == group
            ):
                return True
    return False
