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

import json
import secrets
from pathlib import Path

import pytest
import zarr
from ray_head import ANSI, REPO, LocalHead

pytestmark = [pytest.mark.slow, pytest.mark.ray]

# What `--working-dir` must not upload (the .gitignore'd caches are skipped by Ray).
EXCLUDES = [".git", ".cache", "outputs", "tests", "benchmarks", "*.egg-info"]


@pytest.fixture
def head():
    cluster = LocalHead(num_cpus=2, num_gpus=2, token=secrets.token_hex(32))
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
