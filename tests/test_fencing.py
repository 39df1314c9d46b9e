"""Fenced writes: a driver whose lease another driver took over commits and finishes nothing.

Every test runs on local disk (the lock file) and on both S3 servers (``_lease.json``,
conditional PUTs); the workers are the production :class:`TaskWorker`, in this process.
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from atlinter_ray.config import Config
from atlinter_ray.dataset import Dataset, load_dataset
from atlinter_ray.errors import OutputBusyError, SupersededError
from atlinter_ray.execution import batches, run_work
from atlinter_ray.finishing import FinishJob
from atlinter_ray.layout import DEFAULT_SLAB
from atlinter_ray.lease import LEASE_NAME, OutputLease, read_lease
from atlinter_ray.planning import plan_dataset, plan_slabs
from atlinter_ray.store import VolumeStore
from atlinter_ray.testing.datasets import prepare_image, real_volume, sections_of, write_dataset
from atlinter_ray.worker import TaskWorker, WorkerSpec

SECTIONS = [4, 10, 16, 23, 30, 37, 45, 52, 60, 66, 72, 80, 86]
#: The taker's TTL: seconds it watches an unrenewed lease before taking it over.
TTL_S = 3.0


def _run_tasks(tasks, spec):
    """The tasks' rows through the job's own path, in this process."""
    return list(run_work(batches(tasks, 1), spec, Config().resources, lambda _: [], True))


def _dataset(tmp_path: Path) -> Dataset:
    volume = real_volume()
    write_dataset(tmp_path / "in", "g", sections_of(volume, SECTIONS, "coronal"), SECTIONS,
                  reference_shape=list(volume.shape))
    return load_dataset(str(tmp_path / "in" / "g"))


def _take_over(store: VolumeStore, old: OutputLease) -> OutputLease:
    """Another driver takes ``old``'s lease: on local disk once ``old``'s process let its
    lock go; on an object store once ``old`` stopped renewing (frozen) and the taker
    watched its record unchanged for its TTL."""
    if store.objects.local_path("") is not None:
        old.release()
    else:
        old._stop.set()
        assert old._thread is not None
        old._thread.join()
    new = store.lease(ttl_s=TTL_S)
    new.acquire()
    assert new.token.epoch == old.token.epoch + 1
    return new


def test_a_superseded_driver_commits_and_finishes_nothing_on_local_disk(tmp_path: Path) -> None:
    _superseded(tmp_path, str(tmp_path / "out"), {})


def test_a_superseded_driver_commits_and_finishes_nothing_on_object_stores(
    tmp_path: Path, s3_servers
) -> None:
    _superseded(tmp_path, f"s3://atlas-out/fence-{uuid.uuid4().hex[:8]}", s3_servers.direct)


def _superseded(tmp_path: Path, root: str, options: dict[str, Any]) -> None:
    """Take the lease from a driver, then run its worker's commits and finishing."""
    store = VolumeStore(root, options)
    ds = _dataset(tmp_path)
    identity = prepare_image(store, ds).identity
    tasks = plan_slabs(plan_dataset(ds.id, ds.section_numbers, ds.n_slices), ds.n_slices, DEFAULT_SLAB)
    old = store.lease()
    old.acquire()
    spec = WorkerSpec("linear", None, {}, {ds.id: ds}, {ds.id: "uint8"}, root, options,
                      images={ds.id: identity}, fence=old.token)
    new = _take_over(store, old)
    try:
        # a worker of the old driver: its slices may land, its markers never do
        rows = _run_tasks(tasks[:2], spec)
        assert all(not r.done and "SupersededError" in r.error
                   and "another driver took over" in r.error for r in rows), rows
        assert not any(r.storage_error for r in rows)  # not a failing store: no retry storm
        assert store.done_records(ds.id, identity) == {}
        # the new driver's workers commit every task, each marker naming its epoch
        current = dataclasses.replace(spec, fence=new.token)
        assert all(r.done for r in _run_tasks(tasks, current))
        records = store.done_records(ds.id, identity)
        assert len(records) == len(tasks)
        assert {r["fence"] for r in records.values()} == {new.token.epoch}
        # finishing by the old driver: refused before the metadata, nothing complete
        job = FinishJob(ds.id, identity, tuple(t.task_id for t in tasks), quicklook=False)
        late = TaskWorker(spec).finish(job)
        assert not late.done and "another driver took over" in late.error
        assert "complete" not in store.image_attrs(ds.id)["atlinter_ray"]
        finished = TaskWorker(current).finish(job)
        assert finished.done, finished.error
        assert store.image_attrs(ds.id)["atlinter_ray"]["complete"] == identity.generation
    finally:
        new.release()


def test_the_final_metadata_write_is_conditional_on_the_version_read(s3_servers,
                                                                     tmp_path: Path) -> None:
    """If-Match on the ETag finishing saw: a change in between (another driver) is refused."""
    store = VolumeStore(f"s3://atlas-out/fence-{uuid.uuid4().hex[:8]}", s3_servers.direct)
    ds = _dataset(tmp_path)
    prepare_image(store, ds)
    seen = store.metadata_version(ds.id)
    assert seen is not None
    store.update_attrs(ds.id, {"someone": "else"})  # another writer, in between
    with pytest.raises(SupersededError, match="metadata changed while this run finished it"):
        store.update_attrs(ds.id, {"ours": 1}, if_match=seen)
    assert "ours" not in store.image_attrs(ds.id)
    store.update_attrs(ds.id, {"ours": 1}, if_match=store.metadata_version(ds.id))
    attrs = store.image_attrs(ds.id)
    assert attrs["ours"] == 1 and attrs["someone"] == "else" and "ome" in attrs


def test_expiry_is_judged_by_watching_not_by_the_holders_clock(s3_servers) -> None:
    """A record whose holder's clock says "just renewed" (far in the future) is still taken
    over once the taker saw it unchanged for its TTL; a live holder, whose record carries
    no wall-clock time at all, is refused once it is seen renewed."""
    store = VolumeStore(f"s3://atlas-out/fence-{uuid.uuid4().hex[:8]}", s3_servers.direct)
    elsewhere = {"owner": "x", "host": "another-host", "pid": 1, "epoch": 7}
    store.objects.put(LEASE_NAME, json.dumps({**elsewhere, "heartbeat": time.time() + 1e6}).encode())
    taker = store.lease(ttl_s=TTL_S)
    began = time.monotonic()
    taker.acquire()
    try:
        assert time.monotonic() - began >= TTL_S  # it watched for its whole TTL
        assert read_lease(store.objects)["owner"] == taker.owner and taker.token.epoch == 8
    finally:
        taker.release()
    assert read_lease(store.objects)["released"] and read_lease(store.objects)["epoch"] == 8
    again = store.lease(ttl_s=TTL_S)
    again.acquire()  # a released lease is taken at once, its epoch raised
    again.release()
    assert read_lease(store.objects)["epoch"] == 9

    holder = store.lease(ttl_s=6.0)  # renews every 2 s
    holder.acquire()
    try:
        assert "heartbeat" not in read_lease(store.objects)
        with pytest.raises(OutputBusyError, match=r"another driver \(pid \d+ on .*epoch 10\)"):
            store.lease(ttl_s=60.0).acquire()
    finally:
        holder.release()
