"""Shared fixtures: a small real local Ray cluster, started once per test session."""

from __future__ import annotations

import os
import socket

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def start_local_ray(num_cpus: int = 2, num_gpus: int = 0) -> None:
    """Start a small local cluster: dashboard off, small object store."""
    import ray

    ray.init(
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        include_dashboard=False,
        object_store_memory=200 * 1024**2,
        log_to_driver=False,
        configure_logging=False,
    )


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster with 2 CPUs and 2 fake GPUs, shared by the session."""
    import ray

    if ray.is_initialized():
        yield ray
        return
    start_local_ray(num_cpus=2, num_gpus=2)
    yield ray
    ray.shutdown()


def free_port() -> int:
    """A TCP port nobody listens on right now (loopback)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-protocol server (moto) on loopback; yields s3fs storage options.

    The buckets ``atlas-in`` and ``atlas-out`` exist; credentials are dummies that
    tests use to check secrets never leak into outputs.
    """
    import s3fs
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    options = {
        "endpoint_url": f"http://127.0.0.1:{port}",
        "key": "testing-key",
        "secret": "testing-secret-value",
    }
    fs = s3fs.S3FileSystem(**options)
    for bucket in ("atlas-in", "atlas-out"):
        fs.mkdir(bucket)
    yield options
    server.stop()
