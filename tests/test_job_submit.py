"""`ray job submit` end to end: a real head, the real CLI, the job users submit.

A head started with `ray start --head --block` (its own temp dir and free ports, token
authentication on with a token of its own), then exactly what docs/cluster.md tells
users to run: `ray job submit --working-dir <repo> -- python jobs/interpolate.py ...`
with Hydra overrides, GPU workers (the head fakes 2 GPUs) and the output on S3 (moto
on loopback; the credentials reach the nodes as environment, as from an instance role
or a Kubernetes Secret). The job must end SUCCEEDED and leave a complete volume.

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

from atlinter_ray.store import VolumeStore
from atlinter_ray.testing.ray_head import ANSI, LocalHead

REPO = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.slow, pytest.mark.ray]

# What `--working-dir` must not upload (the .gitignore'd caches are skipped by Ray).
EXCLUDES = [".git", ".cache", "outputs", "tests", "benchmarks", "*.egg-info"]


@pytest.fixture
def head(s3_server):
    # Object-store credentials reach the nodes as environment (an instance role, a
    # Kubernetes Secret), never through the job's config or runtime env.
    cluster = LocalHead(
        num_cpus=2, num_gpus=2, token=secrets.token_hex(32),
        extra_env={
            "AWS_ACCESS_KEY_ID": s3_server["key"],
            "AWS_SECRET_ACCESS_KEY": s3_server["secret"],
            "AWS_DEFAULT_REGION": "us-east-1",
        },
    )
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def test_submitted_job_reconstructs_the_sample_on_s3(head: LocalHead, s3_server):
    import s3fs

    # Token authentication is really on: no token, no access.
    assert head.http_status("/api/jobs/", None) == 401
    job_id = f"interpolate-{secrets.token_hex(4)}"
    root = f"s3://atlas-out/{job_id}"
    submitted = head.ray_cli(
        "job", "submit",
        "--working-dir", str(REPO),
        "--runtime-env-json", json.dumps({"excludes": EXCLUDES}),
        "--submission-id", job_id,
        "--", "python", "jobs/interpolate.py",
        "storage=s3", f"output.root={root}",
        f"+output.storage_options.endpoint_url={s3_server['endpoint_url']}",
        "run.progress=false",
        "resources=gpu_cluster", "resources.min_workers=0", "resources.max_workers=2",
        "resources.cpus_per_worker=0.5", "resources.tasks_per_batch=4",
        "resources.threads_per_worker=1",
        timeout=600, cwd=REPO,
    )
    output = ANSI.sub("", submitted.stdout + submitted.stderr)
    assert submitted.returncode == 0, output[-6000:]
    status = head.ray_cli("job", "status", job_id, cwd=REPO)
    assert f"Job '{job_id}' succeeded" in ANSI.sub("", status.stdout + status.stderr), status.stdout

    fs = s3fs.S3FileSystem(**s3_server)
    summary_text = fs.cat(f"{root}/run_summary.json").decode()
    summary = json.loads(summary_text)
    assert summary["tasks_total"] > 0 and summary["tasks_failed"] == 0
    assert summary["tasks_done"] + summary["tasks_skipped"] == summary["tasks_total"]
    # The actors asked for GPUs and got them from the cluster (fake ones here).
    assert 1 <= len(summary["gpus"]) <= 2, summary["gpus"]
    assert f"tasks: {summary['tasks_total']} (done {summary['tasks_total']}" in output
    assert s3_server["secret"] not in output + summary_text

    (dataset_id, image_url), = summary["outputs"].items()
    assert image_url.startswith(root)
    assert fs.exists(f"{root}/{dataset_id}.quicklook.png")  # drawn only when complete
    group = zarr.open_group(image_url, mode="r", storage_options=dict(s3_server))
    provenance = VolumeStore(root, dict(s3_server)).image_attrs(dataset_id)["atlinter_ray"]["provenance"]
    slices = sorted(p["slice"] for p in provenance)
    assert slices == list(range(len(slices)))
    assert len(slices) in group["0"].shape
    statuses = {p["status"] for p in provenance}
    assert {"measured", "predicted"} <= statuses, statuses
