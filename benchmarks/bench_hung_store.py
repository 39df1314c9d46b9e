"""How long the job takes to end once its output store hangs for good, old package vs this one.

Issue 20 ("How we will know"): the hung-store end time, with a short and with the
issue's configuration. The real job (``python -m atlinter_ray``, its own local Ray
cluster, 2 workers, ``model=linear``) reconstructs the faults test's dataset (91 RGB
coronal slices, 12 slab tasks) from a moto S3 server, writing to it through the
fault-injecting proxy (:mod:`atlinter_ray.testing.faulty_s3`). The task's first marker
write hangs, and from then on every request to the output does, unanswered, until the
job ends. Measured: seconds from the hang to the job's exit, its exit status, and its
closing lines (the stop's cause). The baseline is the package at ``--baseline-rev``
(exported from git into a temporary folder, imported through ``PYTHONPATH``), the
candidate this working tree; both run in this one invocation, one after the other.

Usage (from the repository root)::

    python benchmarks/bench_hung_store.py                                  # 20 s / 5 s / 3
    python benchmarks/bench_hung_store.py --task-timeout-s 60 --heartbeat-s 20
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

from atlinter_ray.testing.datasets import sample_on_s3
from atlinter_ray.testing.faulty_s3 import S3Server

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = [4, 10, 16, 23, 30, 37, 45, 52, 60, 66, 72, 80, 86]


def _run(server: S3Server, src: Path, name: str, settings: list[str], limit_s: float) -> dict[str, Any]:
    """One job of the package in ``src`` whose output hangs at its first commit."""
    data = sample_on_s3(server.direct, "atlas-in/hung", SECTIONS)
    args = ["data=allen", f"data.root={data}", "data.genes=[g]", "model=linear",
            f"output.root=s3://atlas-out/{name}", "run.progress=false",
            "resources.local_cpus=2", "resources.min_workers=2", "resources.max_workers=2",
            *settings,
            *[f"+{side}.storage_options.{k}={v}" for side in ("data", "output")
              for k, v in server.direct.items() if k != "endpoint_url"],
            f"+data.storage_options.endpoint_url={server.direct['endpoint_url']}",
            f"+output.storage_options.endpoint_url={server.proxy.endpoint_url}"]
    first = server.proxy.add("hang", method="PUT", path=f"/atlas-out/{name}/_progress/")
    ray_tmp = tempfile.mkdtemp(prefix="bh", dir="/tmp")  # short: Ray's socket paths
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "RAY_AUTH_MODE": "disabled",
           "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(src)}
    lines: list[str] = []
    job = subprocess.Popen([sys.executable, "-m", "atlinter_ray", *args], cwd=src, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert job.stdout is not None
    reader = threading.Thread(target=lambda: lines.extend(job.stdout or []), daemon=True)
    reader.start()
    try:
        while first.hits == 0 and job.poll() is None:
            time.sleep(0.1)
        server.proxy.add("hang", path=f"/atlas-out/{name}")
        hung_at = time.monotonic()
        try:
            status: int | str = job.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            job.kill()
            status = f"killed after {limit_s:.0f} s"
        ended_s = time.monotonic() - hung_at
        reader.join(timeout=10)
    finally:
        server.proxy.heal()
        for proc in psutil.process_iter(["cmdline"]):
            if ray_tmp in " ".join(proc.info["cmdline"] or []):
                with contextlib.suppress(psutil.Error):
                    proc.kill()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    closing = [line.rstrip()[:400] for line in lines
               if line.startswith(("STOPPED", "atlinter_ray: error", "FAILED g/0-7",
                                   "task g/0-7 failed"))]
    return {"ended_s_after_hang": round(ended_s, 1), "exit_status": status, "closing": closing}


def main() -> None:
    """Run the baseline and this tree against a store that hangs; print and save the times."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline-rev", default="f44ce1c")
    parser.add_argument("--task-timeout-s", type=float, default=20.0)
    parser.add_argument("--heartbeat-s", type=float, default=5.0)
    parser.add_argument("--max-storage-errors", type=int, default=3)
    parser.add_argument("--limit-s", type=float, default=1200.0,
                        help="a job still running this long after the hang is killed")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    settings = [f"resources.task_timeout_s={args.task_timeout_s:g}",
                f"resources.heartbeat_s={args.heartbeat_s:g}",
                f"resources.max_storage_errors={args.max_storage_errors}"]
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp, S3Server(backend="moto") as server:
        old = Path(tmp) / "baseline"
        old.mkdir()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.baseline_rev],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
        for label, src in (("old", old), ("new", ROOT)):
            results[label] = _run(server, src, f"hung-{label}", settings, args.limit_s)
            r = results[label]
            print(f"{label}: exit {r['exit_status']}, ended {r['ended_s_after_hang']} s after "
                  "the store hung", flush=True)
            for line in r["closing"]:
                print(f"    {line}")
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / (
        f"hung-store-{args.task_timeout_s:g}-{args.heartbeat_s:g}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "date": datetime.now(UTC).isoformat(timespec="seconds"), "command": " ".join(sys.argv),
        "baseline_rev": args.baseline_rev, "settings": settings, "paths": results,
    }, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
