"""The actor pool on a real local Ray cluster: every item answered once, dead actors
replaced, broken items and broken workers reported instead of hanging the run."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from atlinter_ray.errors import FatalWorkerError, StoreHungError
from atlinter_ray.pool import PoolSpec, PoolStats, map_unordered

pytestmark = pytest.mark.ray


@pytest.fixture(autouse=True, scope="module")
def _ship_this_module_by_value():
    """Workers cannot import a test module: send its classes to them by value."""
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


class Echo:
    """A worker that remembers its construction and can be told to crash."""

    def __init__(self, crash_dir: str) -> None:
        self.crash_dir = Path(crash_dir)
        self.calls = 0

    def run(self, item: str) -> dict:
        self.calls += 1
        if item.startswith("die-once") and not (self.crash_dir / item).exists():
            (self.crash_dir / item).touch()
            os._exit(1)  # the process dies as on a lost node
        if item == "die-always":
            os._exit(1)
        if item == "raise":
            raise ValueError("bad item: raise")
        if item.startswith("cuda-once") and not (self.crash_dir / item).exists():
            (self.crash_dir / item).write_text(str(os.getpid()))
            # what TaskWorker raises for a CUDA error: this process's GPU is unusable
            raise FatalWorkerError("the device cuda:0 failed (CUDA error: an illegal memory access)")
        if item == "hang":
            time.sleep(600)  # a store that stops answering
        time.sleep(0.3)  # long enough that a second actor is up before the queue empties
        return {"item": item, "pid": os.getpid(), "calls_here": self.calls}

    def other(self, item: str) -> dict:
        return {"item": item, "method": "other"}


class Unbuildable:
    """A worker whose constructor fails, as a model that cannot load on the node."""

    def __init__(self, crash_dir: str) -> None:
        raise RuntimeError(f"cannot load the model on this node ({crash_dir})")

    def run(self, item: str) -> dict:  # pragma: no cover - never built
        return {"item": item}


class StartsOnce:
    """A worker whose node is lost after it: every later constructor waits for good."""

    def __init__(self, crash_dir: str) -> None:
        built = Path(crash_dir) / "built"
        if built.exists():
            time.sleep(600)  # a replacement the cluster never brings up
        built.touch()

    def run(self, item: str) -> dict:
        os._exit(1)  # its node is lost


def failed(item: str, error: str) -> dict:
    return {"item": item, "failed": error}


def results(worker: type, items: list[str], tmp_path: Path, stats: PoolStats | None = None,
            **spec) -> dict[str, dict]:
    out = list(map_unordered(worker, (str(tmp_path),), items, PoolSpec(**spec), failed,
                             stats=stats))
    assert len(out) == len(items), "every item gets exactly one result"
    return {r["item"]: r for r in out}


def test_every_item_runs_once_across_both_actors(ray_cluster, tmp_path):
    items = [f"item-{i}" for i in range(12)]
    got = results(Echo, items, tmp_path, min_workers=1, max_workers=2)
    assert sorted(got) == sorted(items)
    pids = {r["pid"] for r in got.values()}
    assert len(pids) == 2, "both actors served items"
    # each actor was built once and kept its state across calls
    for pid in pids:
        served = sorted(r["calls_here"] for r in got.values() if r["pid"] == pid)
        assert served == list(range(1, len(served) + 1))


def test_an_actor_that_dies_is_replaced_and_its_items_rerun(ray_cluster, tmp_path):
    items = ["die-once-a", *[f"item-{i}" for i in range(6)]]
    got = results(Echo, items, tmp_path, max_workers=2)
    assert all("failed" not in r for r in got.values()), got
    assert (tmp_path / "die-once-a").exists()  # it did crash the first time


def test_a_worker_whose_device_fails_is_ended_and_its_item_rerun_elsewhere(ray_cluster, tmp_path):
    items = ["cuda-once-a", *[f"item-{i}" for i in range(4)]]
    got = results(Echo, items, tmp_path, max_workers=1)
    assert all("failed" not in r for r in got.values()), got
    first = int((tmp_path / "cuda-once-a").read_text())
    # the item was rerun by a fresh actor (max_workers=1: the failed one was ended first)
    assert got["cuda-once-a"]["pid"] != first
    assert {r["pid"] for r in got.values()} == {got["cuda-once-a"]["pid"]}


def test_an_item_that_always_kills_its_actor_is_reported_not_retried_forever(
    ray_cluster, tmp_path
):
    items = ["die-always", *[f"item-{i}" for i in range(4)]]
    got = results(Echo, items, tmp_path, max_workers=2, max_attempts=2)
    assert "died" in got["die-always"]["failed"].lower() or "exit" in got["die-always"]["failed"].lower()
    assert all("failed" not in got[f"item-{i}"] for i in range(4))


def test_an_exception_in_the_worker_becomes_that_items_failure(ray_cluster, tmp_path):
    got = results(Echo, ["raise", "fine"], tmp_path, max_workers=1)
    assert got["raise"]["failed"] == "ValueError: bad item: raise"
    assert "failed" not in got["fine"]


def test_workers_that_cannot_start_fail_every_item_with_the_cause(ray_cluster, tmp_path):
    got = results(Unbuildable, ["a", "b", "c"], tmp_path, max_workers=2)
    for r in got.values():
        assert "cannot load the model on this node" in r["failed"]


def test_no_items_starts_no_actor(ray_cluster, tmp_path):
    assert list(map_unordered(Unbuildable, (str(tmp_path),), [], PoolSpec(), failed)) == []


def test_workers_the_cluster_cannot_place_fail_with_the_fix_after_the_timeout(
    ray_cluster, tmp_path
):
    # the test cluster has 2 GPUs: an actor asking for 3 can never be placed
    got = results(Echo, ["a", "b"], tmp_path, num_gpus=3, max_workers=1,
                  start_timeout_s=2.0, warn_every_s=0.5)
    for r in got.values():
        assert "no worker started in" in r["failed"]
        assert "3 GPU" in r["failed"] and "resources.gpus_per_worker" in r["failed"]


def test_a_call_past_its_timeout_ends_its_actor_and_is_retried_then_reported(
    ray_cluster, tmp_path, caplog
):
    stats = PoolStats()
    caplog.set_level("INFO", logger="atlinter_ray.pool")
    started = time.monotonic()
    got = results(Echo, ["hang", "fine"], tmp_path, stats, max_workers=1, max_attempts=2,
                  call_timeout_s=3.0, heartbeat_s=1.0)
    assert time.monotonic() - started < 120  # not the 600 s the call would hang
    assert "timed out after 3 s" in got["hang"]["failed"]
    assert "failed" not in got["fine"]
    assert (stats.timeouts, stats.retries) == (2, 1)
    assert any("still working: 1 call(s) running" in r.message for r in caplog.records)


def test_results_bring_follow_up_items_with_their_own_method(ray_cluster, tmp_path):
    def more(result: dict) -> list[str]:
        return [f"m:{result['item']}"] if result["item"].startswith("item") else []

    out = list(map_unordered(Echo, (str(tmp_path),), ["item-1", "item-2"], PoolSpec(max_workers=1),
                             failed, method=lambda i: "other" if i.startswith("m:") else "run",
                             more=more))
    got = {r["item"]: r for r in out}
    assert sorted(got) == ["item-1", "item-2", "m:item-1", "m:item-2"]
    assert got["m:item-1"]["method"] == "other" and "pid" in got["item-1"]


def test_the_start_timeout_is_kept_to_the_second_not_to_the_next_warning(ray_cluster, tmp_path):
    started = time.monotonic()
    got = results(Echo, ["a"], tmp_path, num_gpus=3, max_workers=1, start_timeout_s=2.0,
                  warn_every_s=600.0)
    assert "no worker started in 2 s" in got["a"]["failed"]
    assert time.monotonic() - started < 60  # before, the first check came after warn_every_s


def test_a_pool_without_workers_after_a_loss_names_the_loss_not_resources(ray_cluster, tmp_path):
    """The last worker died and no replacement comes up: its death is the cause given."""
    got = results(StartsOnce, ["a"], tmp_path, max_workers=1, start_timeout_s=3.0)
    error = got["a"]["failed"]
    assert "ActorDiedError" in error and "no replacement worker started in the 3 s" in error
    assert "gpus_per_worker" not in error


def test_a_timed_out_call_asks_stalled_and_what_it_raises_ends_the_pool(ray_cluster, tmp_path):
    asked = []

    def stalled() -> None:
        asked.append(time.monotonic())
        raise StoreHungError("the store stopped answering")

    with pytest.raises(StoreHungError, match="stopped answering"):
        list(map_unordered(Echo, (str(tmp_path),), ["hang", "fine"],
                           PoolSpec(max_workers=1, call_timeout_s=3.0), failed,
                           stalled=stalled))
    assert len(asked) == 1
