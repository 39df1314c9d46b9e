"""The pipeline on an autoscaling cluster: GPU workers appear for it and go away after.

Ray's ``AutoscalingCluster`` (the fake multi-node provider: each "node" is a raylet on
this machine) with a CPU-only head and a GPU worker type from 0. The interpolation job
runs against it as a driver; while its GPU actors are queued the autoscaler must add
GPU nodes, the job must complete the volume on them, and after ``idle_timeout_minutes``
the GPU nodes must be gone again.

Two deviations from ``AutoscalingCluster`` as shipped, both in :class:`IsolatedCluster`:

- the wheel lacks the ``fake_multi_node/example.yaml`` its ``_generate_config`` reads,
  so the config is built here (the same fields, autoscaler v1);
- its ``start``/``shutdown`` run ``ray stop --force``, which ends every Ray process on
  the machine (other test sessions' too). Here the head is a :class:`LocalHead` (own
  temp dir, free ports, own process group) and shutdown signals only that group; the
  fake nodes run under the head's autoscaler process, so they are in it too.

Run this file in a pytest invocation of its own (it starts a 3-raylet cluster):
``python -m pytest tests/test_autoscaling.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import zarr
from ray.cluster_utils import AutoscalingCluster

from atlinter_ray.store import VolumeStore
from atlinter_ray.testing.ray_head import LocalHead

REPO = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.slow, pytest.mark.ray]

HEAD = {"CPU": 2, "GPU": 0}
GPU_NODE = {"CPU": 1, "GPU": 1, "object_store_memory": 100 * 1024**2}
MAX_GPU_NODES = 2
IDLE_TIMEOUT_MINUTES = 0.25


class IsolatedCluster(AutoscalingCluster):
    """``AutoscalingCluster`` that never runs ``ray stop`` (see the module docstring)."""

    def _generate_config(self, head_resources, worker_node_types, autoscaler_v2=False,
                         **config_kwargs):
        if autoscaler_v2:
            raise ValueError("IsolatedCluster drives the v1 autoscaler only; pass autoscaler_v2=False")
        config = {
            "cluster_name": "fake_multinode",
            "max_workers": sum(t["max_workers"] for t in worker_node_types.values()),
            "provider": {
                "type": "fake_multinode",
                "use_node_id_as_ip": True,
                "disable_node_updaters": True,
                "disable_launch_config_check": True,
            },
            "available_node_types": {
                **worker_node_types,
                "ray.head.default": {
                    "resources": head_resources, "node_config": {}, "max_workers": 0,
                },
            },
            "head_node_type": "ray.head.default",
            "auth": {},
            "upscaling_speed": 1.0,
            "idle_timeout_minutes": 0.1,
            "docker": {},
            "initialization_commands": [],
            "setup_commands": [],
            "head_setup_commands": [],
            "worker_setup_commands": [],
            "head_start_ray_commands": [],
            "worker_start_ray_commands": [],
            "file_mounts": {},
            "cluster_synced_files": [],
            "file_mounts_sync_continuously": False,
            "rsync_exclude": [],
            "rsync_filter": [],
        }
        config.update(config_kwargs)
        return config

    def start(self, _system_config=None, override_env=None):
        if _system_config is not None:
            raise ValueError("IsolatedCluster takes no _system_config")
        self.head = LocalHead(
            num_cpus=int(self._head_resources["CPU"]),
            num_gpus=int(self._head_resources.get("GPU", 0)),
            extra_env={"AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_FAKE_CLUSTER": "1",
                       **(override_env or {})},
        )
        # Fake nodes must join this head, not the default port 6379.
        self._config["provider"]["gcs_address"] = self.head.gcs_address
        self._config["cluster_name"] = f"fake-{Path(self.head.temp_dir).name}"
        config_path = Path(self.head.temp_dir) / "autoscaling.json"
        config_path.write_text(json.dumps(self._config))
        self.head.cmd.append(f"--autoscaling-config={config_path}")
        self.head.start()

    def shutdown(self):
        self.head.stop()


def gpu_nodes(head: LocalHead) -> list[str]:
    """Ids of the alive nodes that have a GPU."""
    from ray.util.state import list_nodes

    nodes = list_nodes(address=head.address, filters=[("state", "=", "ALIVE")], detail=True,
                       raise_on_missing_output=False)
    return sorted(n.node_id for n in nodes if n.resources_total.get("GPU", 0) > 0)


@pytest.fixture
def cluster():
    cluster = IsolatedCluster(
        head_resources=dict(HEAD),
        worker_node_types={
            "gpu": {
                "resources": dict(GPU_NODE), "node_config": {},
                "min_workers": 0, "max_workers": MAX_GPU_NODES,
            }
        },
        idle_timeout_minutes=IDLE_TIMEOUT_MINUTES,
    )
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.shutdown()


def test_gpu_workers_scale_up_for_the_job_and_back_down(cluster, tmp_path):
    head = cluster.head
    assert gpu_nodes(head) == []  # GPU workers start from zero

    seen: set[str] = set()
    peak = 0
    done = threading.Event()

    def watch():
        nonlocal peak
        while not done.is_set():
            with_gpu = gpu_nodes(head)
            seen.update(with_gpu)
            peak = max(peak, len(with_gpu))
            time.sleep(0.5)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    out = tmp_path / "volumes"
    try:
        job = subprocess.run(
            [sys.executable, "jobs/interpolate.py", f"output.root={out}", "run.progress=false",
             "resources=gpu_cluster", "resources.min_workers=0",
             f"resources.max_workers={MAX_GPU_NODES}", "resources.cpus_per_worker=1",
             "resources.tasks_per_batch=2", "resources.threads_per_worker=1"],
            cwd=REPO, env={**head.env, "RAY_ADDRESS": head.gcs_address},
            capture_output=True, text=True, timeout=420,
        )
    finally:
        done.set()
        watcher.join()
    assert job.returncode == 0, (job.stdout + job.stderr)[-6000:]

    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["tasks_failed"] == 0 and summary["tasks_total"] > 0
    assert summary["tasks_done"] == summary["tasks_total"]
    # Every task ran on a GPU node the autoscaler added (the head has no GPU).
    assert summary["gpus"], summary
    task_nodes = {g.split(":")[0] for g in summary["gpus"]}
    assert task_nodes <= seen, (task_nodes, seen)
    assert 1 <= peak <= MAX_GPU_NODES, peak

    (dataset_id, image_url), = summary["outputs"].items()
    group = zarr.open_group(image_url, mode="r")
    store = VolumeStore(image_url.rsplit("/", 1)[0])
    slices = sorted(p["slice"] for p in store.image_attrs(dataset_id)["atlinter_ray"]["provenance"])
    assert slices == list(range(len(slices))) and len(slices) in group["0"].shape

    # Idle GPU nodes are removed: idle timeout + a few autoscaler rounds.
    deadline = time.monotonic() + IDLE_TIMEOUT_MINUTES * 60 + 60
    while gpu_nodes(head) and time.monotonic() < deadline:
        time.sleep(1)
    assert gpu_nodes(head) == [], "idle GPU nodes were not scaled down"
