"""Shared fixtures (a small real local Ray cluster, S3 servers) and the markers' rules.

Markers mean what the README says, and are applied here from what a test uses:
``ray`` for every test that uses the ``ray_cluster`` fixture, ``slow`` for every ``ray``
test, and
``network`` for every test of a module that fetches data or oracles from the package
index (cached under ``.cache/`` after the first run). A test that starts Ray in this
process without being marked ``ray`` fails, so ``-m "not ray"`` never starts a cluster.
"""

from __future__ import annotations

import os
import types

import pytest

from atlinter_ray.testing.faulty_s3 import BACKENDS, S3Server
from atlinter_ray.testing.ray_head import start_local_ray

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

#: Helper modules that download from the package index on first use.
_FETCHING = {
    "atlinter_ray.testing.pypi",
    "atlinter_ray.testing.predecessor",
    "atlinter_ray.testing.predecessor_align",
    "atlinter_ray.testing.mxnet_env",
    "atlinter_ray.testing.rife_wheels",
}


def _fetches(module: types.ModuleType) -> bool:
    """True when a test module uses one of the fetching helpers."""
    for value in vars(module).values():
        origin = value.__name__ if isinstance(value, types.ModuleType) else getattr(
            value, "__module__", None
        )
        if origin in _FETCHING:
            return True
    return False


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark tests ``ray``/``slow`` and ``network`` from what they use."""
    for item in items:
        if "ray_cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.ray)
        if item.get_closest_marker("ray") is not None:
            item.add_marker(pytest.mark.slow)  # a cluster takes seconds to start
        module = getattr(item, "module", None)
        if module is not None and _fetches(module):
            item.add_marker(pytest.mark.network)


@pytest.fixture(autouse=True)
def _ray_only_where_marked(request: pytest.FixtureRequest):
    """Fail a test that starts Ray in this process without the ``ray`` marker."""
    import sys

    before = "ray" in sys.modules and sys.modules["ray"].is_initialized()
    yield
    after = "ray" in sys.modules and sys.modules["ray"].is_initialized()
    if after and not before and request.node.get_closest_marker("ray") is None:
        pytest.fail(f"{request.node.nodeid} starts Ray: mark it @pytest.mark.ray (and slow)")


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


@pytest.fixture(scope="session", params=BACKENDS)
def s3_servers(request: pytest.FixtureRequest):
    """A real S3-protocol server on loopback with a fault-injecting proxy in front: every
    test that uses it runs against moto and against SeaweedFS (which checks signatures).

    The buckets ``atlas-in`` and ``atlas-out`` exist; credentials are dummies that
    tests use to check secrets never leak into outputs.
    """
    with S3Server(backend=request.param) as server:
        yield server


@pytest.fixture(scope="session")
def s3_server():
    """s3fs storage options of a moto server on loopback (no proxy), for tests of other
    things than the store that only need a bucket."""
    with S3Server(backend="moto") as server:
        yield dict(server.direct)


@pytest.fixture
def faulty_s3(s3_servers):
    """The S3 server behind its proxy, healed again after the test (``.proxy.add(...)``)."""
    yield s3_servers
    s3_servers.proxy.heal()
