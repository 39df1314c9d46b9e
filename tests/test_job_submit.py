"""`ray job submit` end to end: a real head, the real CLI, the job users submit.

A head started with `ray start --head --block` (its own temp dir and free ports, token
authentication on with a token of its own), then exactly what docs/cluster.md tells
users to run: `ray job submit --working-dir <repo> -- python jobs/interpolate.py ...`
with Hydra overrides, GPU workers (the head fakes 2 GPUs) and a temporary output.
The job must end SUCCEEDED and leave a complete volume.

The head is stopped by signalling the processes this test started (the `ray start`
process, its process group, then any leftover process that names this head's temp
dir): never `ray stop`, which would end every Ray cluster on the machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
import zarr

pytestmark = [pytest.mark.slow, pytest.mark.ray]

REPO = Path(__file__).resolve().parents[1]
RAY = shutil.which("ray") or str(Path(os.sys.executable).with_name("ray"))
ANSI = re.compile(r"\x1b\[[0-9;]*m")
# What `--working-dir` must not upload (the .gitignore'd caches are skipped by Ray).
EXCLUDES = [".git", ".cache", "outputs", "tests", "benchmarks", "*.egg-info"]


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free on 127.0.0.1 right now."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class LocalHead:
    """A Ray head of our own on this machine, with token authentication."""

    def __init__(self, num_cpus: int = 2, num_gpus: int = 2):
        self.token = secrets.token_hex(32)
        # Short: Ray's unix socket paths live under it (108-byte limit).
        self.temp_dir = tempfile.mkdtemp(prefix="rjs", dir="/tmp")
        (gcs, dash, client, agent_http, agent_grpc, runtime_env, metrics, nm, om) = free_ports(9)
        self.gcs_port, self.dashboard_port = gcs, dash
        self.address = f"http://127.0.0.1:{dash}"
        self.env = {
            **os.environ,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": self.token,
            "RAY_USAGE_STATS_ENABLED": "0",
        }
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
        ]
        self.proc: subprocess.Popen | None = None
        self.log_path = Path(self.temp_dir) / "ray_start.log"

    def start(self, timeout: float = 120) -> None:
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
        request = urllib.request.Request(self.address + path)
        if token is not None:
            request.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.status
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError:
            return None

    def ray_cli(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        """Run the `ray` CLI against this head with its token, as a user would."""
        return subprocess.run(
            [RAY, *args], env={**self.env, "RAY_ADDRESS": self.address}, cwd=REPO,
            capture_output=True, text=True, timeout=timeout,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""

    def stop(self, grace: float = 3) -> None:
        """End every process of this head (and only those), then remove its temp dir.

        All of them run in the process group of the `ray start` we launched: SIGTERM
        to the group (what `ray stop` sends to each Ray process), SIGKILL to what is
        left after ``grace`` seconds, then any process that still names our temp dir.
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


@pytest.fixture
def head():
    cluster = LocalHead()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def test_submitted_job_reconstructs_the_sample(head: LocalHead, tmp_path: Path):
    # Token authentication is really on: no token, no access.
    assert head.http_status("/api/jobs/", None) == 401
    out = tmp_path / "volumes"
    job_id = f"interpolate-{secrets.token_hex(4)}"
    submitted = head.ray_cli(
        "job", "submit",
        "--working-dir", str(REPO),
        "--runtime-env-json", json.dumps({"excludes": EXCLUDES}),
        "--submission-id", job_id,
        "--", "python", "jobs/interpolate.py",
        f"output.root={out}", "run.progress=false",
        "resources=gpu_cluster", "resources.min_workers=0", "resources.max_workers=2",
        "resources.cpus_per_worker=0.5", "resources.tasks_per_batch=4",
        "resources.threads_per_worker=1",
        timeout=600,
    )
    output = ANSI.sub("", submitted.stdout + submitted.stderr)
    assert submitted.returncode == 0, output[-6000:] + head.log()
    status = head.ray_cli("job", "status", job_id)
    assert f"Job '{job_id}' succeeded" in ANSI.sub("", status.stdout + status.stderr), status.stdout

    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["tasks_total"] > 0 and summary["tasks_failed"] == 0
    assert summary["tasks_done"] + summary["tasks_skipped"] == summary["tasks_total"]
    # The actors asked for GPUs and got them from the cluster (fake ones here).
    assert 1 <= len(summary["gpus"]) <= 2, summary["gpus"]
    assert f"tasks: {summary['tasks_total']} (done {summary['tasks_total']}" in output

    (dataset_id, image_url), = summary["outputs"].items()
    assert (out / f"{dataset_id}.quicklook.png").is_file()  # drawn only when complete
    group = zarr.open_group(image_url, mode="r")
    provenance = group.attrs["atlinter_ray"]["provenance"]
    slices = sorted(p["slice"] for p in provenance)
    assert slices == list(range(len(slices)))
    assert len(slices) in group["0"].shape
    statuses = {p["status"] for p in provenance}
    assert {"measured", "predicted"} <= statuses, statuses
