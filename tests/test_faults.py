"""Exactly-once output under faults: each run ends in a clean run's bytes, or in a clear
error in bounded time with nothing marked done that is not stored.

Local outputs run in-process (``run.serial``); S3 outputs on the real local Ray cluster,
through the fault-injecting proxy in front of moto (:mod:`atlinter_ray.testing.faulty_s3`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import fsspec
import numpy as np
import psutil
import pytest
import s3fs
import zarr

from atlinter_ray import finishing
from atlinter_ray.config import Config
from atlinter_ray.errors import OutputBusyError, StoreError
from atlinter_ray.finishing import Reduction
from atlinter_ray.layout import downsample2
from atlinter_ray.pipeline import run
from atlinter_ray.store import VolumeStore, decode_marker, encode_marker
from atlinter_ray.testing.datasets import real_volume, sample_on_s3, sections_of, write_dataset
from atlinter_ray.testing.faulty_s3 import EXAMPLE_CREDENTIALS

SECTIONS = [4, 10, 16, 23, 30, 37, 45, 52, 60, 66, 72, 80, 86]
#: Slabs of 8 slices (finer than the default ``output.slab``): the faults below hit one
#: task among 12 of the 91 coronal slices.
SLAB = 8
TASKS = -(-91 // SLAB)


def _local(tmp_path: Path, sections: list[int] = SECTIONS, axis: str = "coronal") -> Config:
    volume = real_volume()
    write_dataset(tmp_path / "in", "g", sections_of(volume, sections, axis), sections,
                  axis=axis, reference_shape=list(volume.shape))
    cfg = Config()
    cfg.data.root, cfg.data.genes = str(tmp_path / "in"), ["g"]
    cfg.output.root = str(tmp_path / "out")
    cfg.model.name = "linear"
    cfg.output.slab = SLAB
    cfg.run.serial, cfg.run.progress = True, False
    return cfg


def content(fs, root: str) -> dict[str, str]:
    """sha256 of every output object, the image's generation id (in its metadata and its
    sidecar) and the lease left out."""
    out = {}
    for path in sorted(fs.find(root)):
        rel = path[len(root.rstrip("/")) + 1:]
        if rel.startswith("_progress/") or rel in ("run_summary.json", "_lease.json",
                                                   ".atlinter_ray.lock"):
            continue
        blob = fs.cat_file(path)
        if rel.endswith(".ome.zarr/zarr.json"):
            meta = json.loads(blob)
            meta["attributes"]["atlinter_ray"].pop("generation")
            meta["attributes"]["atlinter_ray"].pop("complete")
            blob = json.dumps(meta, sort_keys=True).encode()
        elif rel.endswith(".provenance.json"):  # the image's sidecar names its generation too
            side = json.loads(blob)
            side.pop("generation")
            blob = json.dumps(side, sort_keys=True).encode()
        out[rel] = hashlib.sha256(blob).hexdigest()
    return out


def _marked_objects_are_stored(store: VolumeStore, ds_id: str) -> None:
    """Every object every marker of the current image claims is in the store."""
    meta = store.image_attrs(ds_id)["atlinter_ray"]
    from atlinter_ray.identity import ImageIdentity

    identity = ImageIdentity(meta["generation"], "")
    paths = store._marker_files(ds_id, identity)
    stored = store.stored_objects(ds_id)
    for blob in store.objects.get_many(paths).values():
        marker = decode_marker(blob)
        assert marker is not None
        for key, entry in marker.record["objects"].items():
            assert key in stored and stored[key] == entry["size"], key


def test_an_image_deleted_with_its_markers_kept_is_rebuilt(tmp_path: Path) -> None:
    cfg = _local(tmp_path)
    assert run(cfg).ok
    clean = content(fsspec.filesystem("file"), cfg.output.root)
    shutil.rmtree(tmp_path / "out" / "g.ome.zarr")  # a colleague's rm; the markers stay
    again = run(cfg)
    assert again.ok and again.tasks_done == TASKS and again.tasks_skipped == 0
    assert content(fsspec.filesystem("file"), cfg.output.root) == clean
    assert len(list((tmp_path / "out" / "_progress" / "g").iterdir())) == 1  # old ones gone


def test_an_overwrite_killed_between_removals_is_finished_by_its_rerun(tmp_path: Path) -> None:
    cfg = _local(tmp_path)
    assert run(cfg).ok
    cfg.model.name, cfg.output.overwrite = "dis", True
    # the overwrite removed the old image, then died before it removed the old markers
    shutil.rmtree(tmp_path / "out" / "g.ome.zarr")
    again = run(cfg)
    assert again.ok and again.tasks_done == TASKS
    prov = VolumeStore(cfg.output.root).image_attrs("g")["atlinter_ray"]["provenance"]
    assert {p["model"] for p in prov if p["status"] == "predicted"} == {"dis"}
    resumed = run(cfg)  # overwrite=true resumes (here: finds done) its own run
    assert resumed.ok and resumed.tasks_skipped == TASKS and resumed.tasks_done == 0


def test_lost_objects_of_a_complete_image_are_found_and_redone(tmp_path: Path) -> None:
    cfg = _local(tmp_path)
    assert run(cfg).ok
    clean = content(fsspec.filesystem("file"), cfg.output.root)
    chunks = tmp_path / "out" / "g.ome.zarr" / "0" / "c"
    (chunks / "2" / "0" / "0").unlink()  # a lifecycle rule took an object (slab 2)
    (chunks / "8" / "0" / "0").write_bytes(b"torn")  # and another was damaged (slab 8)
    again = run(cfg)
    assert again.ok and again.tasks_done == 2  # the tasks owning them: 16-23 and 64-71
    assert content(fsspec.filesystem("file"), cfg.output.root) == clean


class Killed(BaseException):
    """The process dying at a chosen point: no handler of ours may catch it."""


def _die_on_call(n: int, original, when=lambda *a, **k: True):
    """``original`` wrapped to die at its ``n``-th call that ``when`` accepts."""
    calls = []

    def dying(*args, **kwargs):
        if when(*args, **kwargs):
            calls.append(1)
            if len(calls) == n:
                raise Killed
        return original(*args, **kwargs)
    return dying


#: Where a run dies: (what, object patched, attribute, call it dies at, which calls count).
KILL_POINTS = {
    "image arrays made, metadata not": (VolumeStore, "_put_group", 1, None),
    "slices of 3 tasks written, 3rd marker not": (VolumeStore, "mark_done", 3, None),
    "last task's slices written, marker not": (VolumeStore, "mark_done", TASKS, None),
    "pyramid and pictures written, metadata not": (VolumeStore, "update_attrs", 1, None),
    "complete, summary not written": (
        VolumeStore, "write_bytes", 1, lambda self, name, data: name == "run_summary.json"),
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_a_run_killed_at_any_phase_is_finished_by_its_rerun(tmp_path: Path, point: str) -> None:
    cfg = _local(tmp_path)
    assert run(cfg).ok
    store = VolumeStore(cfg.output.root)
    clean = content(fsspec.filesystem("file"), cfg.output.root)
    shutil.rmtree(tmp_path / "out")
    owner, name, n, when = KILL_POINTS[point]
    with pytest.MonkeyPatch.context() as mp:
        original = getattr(owner, name)
        mp.setattr(owner, name, _die_on_call(n, original, when or (lambda *a, **k: True)))
        with pytest.raises(Killed):
            run(cfg)
    if (tmp_path / "out" / "g.ome.zarr" / "zarr.json").exists():
        _marked_objects_are_stored(store, "g")  # nothing marked done that is not there
    again = run(cfg)
    assert again.ok, again.failures
    assert again.tasks_done + again.tasks_skipped == TASKS
    assert content(fsspec.filesystem("file"), cfg.output.root) == clean
    summary = json.loads((tmp_path / "out" / "run_summary.json").read_text())
    assert summary["complete"] == ["g"] and not summary["incomplete"]


@pytest.mark.parametrize("slab", [SLAB, 5])  # even: tasks store level-1 blocks; odd: sums
@pytest.mark.parametrize("axis", ["coronal", "sagittal"])
def test_finishing_builds_the_pyramid_from_the_tasks_reductions(
    tmp_path: Path, axis: str, slab: int
) -> None:
    """No slice is read back when every task's marker carries its reduction; a marker
    without one costs a read of its slices from level 0, a torn marker reads as absent
    (its task is redone), and the output is the same bytes either way."""
    reads: list[tuple[int, int]] = []
    original = finishing._read_slab

    def counted(arr, index, axis_):
        reads.append((index[axis_].start, index[axis_].stop))
        return original(arr, index, axis_)

    cfg = _local(tmp_path, [4, 10, 16, 23, 30, 37, 45, 52, 60, 66, 72], axis)
    cfg.output.slab = slab
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(finishing, "_read_slab", counted)
        assert run(cfg).ok
        assert reads == []
        levels = [np.asarray(zarr.open_array(f"{cfg.output.root}/g.ome.zarr/{k}")[...])
                  for k in range(2)]
        np.testing.assert_array_equal(levels[1], downsample2(levels[0]))  # 91x79x77: odd sides
        clean = content(fsspec.filesystem("file"), cfg.output.root)
        shutil.rmtree(tmp_path / "out")
        with pytest.MonkeyPatch.context() as dying:
            dying.setattr(VolumeStore, "update_attrs", _die_on_call(1, VolumeStore.update_attrs))
            with pytest.raises(Killed):
                run(cfg)
        n = levels[0].shape[{"coronal": 0, "sagittal": 2}[axis]]
        last = (n - 1) // slab * slab
        markers = sorted((tmp_path / "out" / "_progress" / "g").rglob("*"))
        markers = [m for m in markers if m.is_file()]
        assert len(markers) == -(-n // slab)  # one object per task: one per slab
        second = markers[0].parent / f"{slab}-{2 * slab - 1}.done"
        marker = decode_marker(second.read_bytes())
        assert marker is not None and marker.reduction
        kept = Reduction.from_bytes(marker.reduction)
        assert (kept.level1 is not None) == (slab % 2 == 0) != (kept.sums is not None)
        second.write_bytes(encode_marker(marker.record, None))  # a marker without one
        (markers[0].parent / f"{last}-{n - 1}.done").write_bytes(b'{"torn')
        again = run(cfg)
    assert again.ok and again.tasks_done == 1  # the torn marker's task
    read = sorted(s for start, stop in reads for s in range(start, stop))
    assert read == [*range(slab, 2 * slab)]  # only the second task's slices
    assert content(fsspec.filesystem("file"), cfg.output.root) == clean


def test_a_reduction_reads_back_as_written_and_other_bytes_are_refused() -> None:
    """Both kinds of reduction round-trip; the previous version's ``.npz`` format, a torn
    one and one holding both kinds read as "not a reduction" (finishing then reads the
    task's slices from level 0 instead)."""
    import io

    import numcodecs

    rng = np.random.default_rng(0)
    cuts = {0: rng.integers(0, 255, (3, 9, 7), dtype=np.uint8)}
    sums = rng.integers(0, 2000, (3, 5, 5, 4), dtype=np.uint16)
    level1 = rng.integers(0, 255, (3, 3, 5, 4), dtype=np.uint8)
    for made in (Reduction(4, 5, sums, cuts), Reduction(4, 6, None, cuts, level1)):
        back = Reduction.from_bytes(made.to_bytes())
        assert (back.first, back.count) == (made.first, made.count)
        for mine, theirs in ((back.sums, made.sums), (back.level1, made.level1),
                             (back.cuts[0], made.cuts[0])):
            assert (mine is None) == (theirs is None)
            if mine is not None:
                np.testing.assert_array_equal(mine, theirs)
                assert mine.dtype == theirs.dtype
    old = io.BytesIO()
    np.savez(old, first=4, count=5, sums=sums, cut0=cuts[0])
    blob = Reduction(4, 5, sums, cuts).to_bytes()
    both = Reduction(4, 5, sums, cuts, level1).to_bytes()
    for bad in (bytes(numcodecs.Blosc(cname="lz4").encode(old.getvalue())), blob[:-9], both):
        with pytest.raises(ValueError, match="not a reduction"):
            Reduction.from_bytes(bad)


def test_changed_input_is_refused_then_rebuilt_on_request(tmp_path: Path) -> None:
    cfg = _local(tmp_path)
    assert run(cfg).ok
    fewer = [s for s in SECTIONS if s != 45]
    cfg = _local(tmp_path, fewer)
    with pytest.raises(StoreError, match=r"section numbers \(removed \[45\]"):
        run(cfg)
    cfg.output.overwrite = True
    rebuilt = run(cfg)
    assert rebuilt.ok and rebuilt.tasks_done == TASKS
    prov = VolumeStore(cfg.output.root).image_attrs("g")["atlinter_ray"]["provenance"]
    assert [p["slice"] for p in prov] == list(range(91))
    assert 45 not in {p["slice"] for p in prov if p["status"] == "measured"}


def test_a_second_driver_on_one_output_is_refused_before_writing(tmp_path: Path) -> None:
    cfg = _local(tmp_path)
    with VolumeStore(cfg.output.root).lease():  # another driver is running
        with pytest.raises(OutputBusyError, match=r"is being written by another driver \(pid"):
            run(cfg)
    assert not (tmp_path / "out" / "g.ome.zarr").exists()
    assert run(cfg).ok  # and once it is gone, this one runs


@pytest.mark.parametrize("fault", ["error", "hang"])
def test_a_summary_the_store_does_not_take_is_reported_not_waited_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fault: str
) -> None:
    """The last write of a run, its run_summary.json, fails or never returns: the run ends
    (after resources.heartbeat_s at most), not ok, saying the summary is not written."""
    cfg = _local(tmp_path)
    cfg.resources.heartbeat_s = 3.0
    released = threading.Event()
    write = VolumeStore.write_bytes

    def failing(self: VolumeStore, name: str, data: bytes) -> str:
        if name == "run_summary.json":
            if fault == "error":
                raise PermissionError(13, "Permission denied", name)
            released.wait(600)  # a store that never answers
        return write(self, name, data)

    monkeypatch.setattr(VolumeStore, "write_bytes", failing)
    try:
        summary = run(cfg)
    finally:
        released.set()
    assert not summary.ok and "complete 1, incomplete 0" in summary.to_text()
    assert "run_summary.json could not be written" in summary.stopped
    assert ("got no answer in 3 s" if fault == "hang" else "PermissionError") in summary.stopped
    assert "run summary" not in summary.files


# -- on S3, through the fault proxy, on the real Ray cluster ----------------------------

@pytest.fixture(scope="module")
def s3_input(s3_servers) -> str:
    """The test dataset on S3 (RGB), written once: every S3 run reads the same input."""
    return sample_on_s3(s3_servers.direct, "atlas-in/faults", SECTIONS)


def _s3(servers, s3_input: str, name: str, **storage: object) -> Config:
    cfg = Config()
    cfg.data.root, cfg.data.genes = s3_input, ["g"]
    cfg.data.storage_options = dict(servers.direct)
    cfg.output.root = f"s3://atlas-out/{name}"
    cfg.output.storage_options = {**servers.options, **storage}
    cfg.model.name = "linear"
    cfg.output.slab = SLAB
    cfg.run.progress = False
    cfg.resources.min_workers = cfg.resources.max_workers = 2
    return cfg


@pytest.fixture(scope="module")
def clean_s3(s3_servers, s3_input, ray_cluster) -> dict[str, str]:
    """The bytes of a clean S3 run of the test dataset (linear, 2 workers)."""
    assert run(_s3(s3_servers, s3_input, "clean")).ok
    return content(_direct_fs(s3_servers), "atlas-out/clean")


def _direct_fs(faulty_s3) -> s3fs.S3FileSystem:
    return s3fs.S3FileSystem(**faulty_s3.direct, skip_instance_cache=True)


@pytest.mark.ray
def test_503s_and_dropped_connections_end_in_the_clean_bytes(faulty_s3, s3_input, clean_s3):
    cfg = _s3(faulty_s3, s3_input, "flaky")
    slow = faulty_s3.proxy.add("503", method="PUT", path=r"/atlas-out/flaky/g\.ome\.zarr/0/c/",
                               times=6)
    dropped = faulty_s3.proxy.add("drop", method="GET", path="/atlas-out/flaky/_progress",
                                  times=2)
    summary = run(cfg)
    assert summary.ok and slow.hits == 6 and dropped.hits >= 1
    assert content(_direct_fs(faulty_s3), "atlas-out/flaky") == clean_s3


@pytest.mark.ray
def test_a_hung_store_call_times_out_and_its_task_is_rerun(faulty_s3, s3_input, clean_s3,
                                                          caplog):
    cfg = _s3(faulty_s3, s3_input, "hung")
    cfg.resources.task_timeout_s, cfg.resources.heartbeat_s = 8.0, 2.0
    caplog.set_level("INFO", logger="atlinter_ray")
    hang = faulty_s3.proxy.add("hang", method="PUT", path=r"/atlas-out/hung/g\.ome\.zarr/0/c/0/3/",
                               times=1)
    ended = threading.Event()

    def heal_later() -> None:
        """Hold the hung call 20 s after it hangs, well past the task timeout, then free it."""
        while hang.hits == 0 and not ended.is_set():
            time.sleep(0.1)
        ended.wait(20.0)
        faulty_s3.proxy.heal()

    release = threading.Thread(target=heal_later, daemon=True)
    release.start()
    try:
        summary = run(cfg)
    finally:
        ended.set()
        release.join()
    assert hang.hits == 1
    assert summary.ok and summary.tasks_retried >= 1
    assert any("timed out after 8 s" in r.message for r in caplog.records)
    assert any("still working" in r.message for r in caplog.records)
    assert content(_direct_fs(faulty_s3), "atlas-out/hung") == clean_s3


@pytest.mark.ray
def test_a_store_that_is_down_stops_the_job_early_with_the_cause(faulty_s3, s3_input):
    cfg = _s3(faulty_s3, s3_input, "down", config_kwargs={"retries": {"max_attempts": 1}})
    cfg.resources.max_storage_errors = 3
    faulty_s3.proxy.add("503", method="PUT", path=r"/atlas-out/down/g\.ome\.zarr/0/c/")
    summary = run(cfg)
    assert not summary.ok and "3 storage failures in a row" in summary.stopped
    assert "g" in summary.incomplete
    assert summary.tasks_failed == TASKS - summary.tasks_done
    faulty_s3.proxy.heal()
    store = VolumeStore(cfg.output.root, faulty_s3.direct)
    _marked_objects_are_stored(store, "g")
    cfg.output.storage_options = dict(faulty_s3.options)
    assert run(cfg).ok  # the same command finishes it


@pytest.mark.ray
def test_a_store_that_hangs_for_good_ends_the_job_naming_it(faulty_s3, s3_input, clean_s3):
    """The output store stops answering mid-run, for good: the real job ends, exit 1, within a
    generous bound of task_timeout_s + heartbeat_s, naming the store (not the resources) in
    the stop and in every failed task, and reporting that the summary was not written; the
    same command, once the store answers again, ends in a clean run's bytes."""
    timeout_s, heartbeat_s = 20, 5
    args = ["data=allen", f"data.root={s3_input}", "data.genes=[g]", "model=linear",
            "output.root=s3://atlas-out/hung-for-good", f"output.slab={SLAB}", "run.progress=false",
            "resources.local_cpus=2", "resources.min_workers=2", "resources.max_workers=2",
            f"resources.task_timeout_s={timeout_s}", f"resources.heartbeat_s={heartbeat_s}",
            "resources.max_storage_errors=3",
            *[f"+{side}.storage_options.{k}={v}" for side in ("data", "output")
              for k, v in faulty_s3.direct.items() if k != "endpoint_url"],
            f"+data.storage_options.endpoint_url={faulty_s3.direct['endpoint_url']}",
            f"+output.storage_options.endpoint_url={faulty_s3.proxy.endpoint_url}"]
    # the first marker write hangs; from then on every request to the output does
    first = faulty_s3.proxy.add("hang", method="PUT", path="/atlas-out/hung-for-good/_progress/")
    ray_tmp = tempfile.mkdtemp(prefix="i20h", dir="/tmp")
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "RAY_AUTH_MODE": "disabled"}
    try:
        driver = subprocess.Popen([sys.executable, "-m", "atlinter_ray", *args], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  start_new_session=True)
        deadline = time.monotonic() + 300
        while first.hits == 0 and driver.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert first.hits >= 1, "the job never reached its first commit"
        faulty_s3.proxy.add("hang", path="/atlas-out/hung-for-good")
        hung_at = time.monotonic()
        output, _ = driver.communicate(timeout=600)
        ended_after = time.monotonic() - hung_at
    finally:
        _end_processes_of(ray_tmp)
        faulty_s3.proxy.heal()
    assert driver.returncode == 1, output
    # generous: the old pool took over 10x this, blaming resources.gpus_per_worker
    assert ended_after < 3 * (timeout_s + heartbeat_s), (ended_after, output)
    cause = "the output store s3://atlas-out/hung-for-good stopped answering"
    assert f"STOPPED: {cause}" in output
    failed = [line for line in output.splitlines() if line.startswith("FAILED ")]
    assert failed and all(cause in line for line in failed), failed
    assert "no worker started" not in output and "gpus_per_worker" not in output
    assert "run_summary.json was not written: the output store does not answer" in output
    try:
        again = _job(args, {"RAY_TMPDIR": ray_tmp, "RAY_AUTH_MODE": "disabled"})
    finally:
        _end_processes_of(ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "complete 1, incomplete 0" in again.stdout
    assert content(_direct_fs(faulty_s3), "atlas-out/hung-for-good") == clean_s3


@pytest.mark.ray
def test_a_killed_worker_is_replaced_and_its_task_rerun(faulty_s3, s3_input, clean_s3):
    cfg = _s3(faulty_s3, s3_input, "killed")
    hang = faulty_s3.proxy.add("hang", method="PUT", path="/atlas-out/killed/_progress/.*/24-31",
                               times=1)

    def kill_when_stuck() -> None:
        while hang.hits == 0:
            time.sleep(0.1)
        for proc in psutil.Process().children(recursive=True):  # this session's cluster only
            if "TaskWorker" in " ".join(proc.cmdline()):
                proc.kill()  # the workers die as on a lost node, one of them mid-task
        faulty_s3.proxy.heal()

    killer = threading.Thread(target=kill_when_stuck, daemon=True)
    killer.start()
    summary = run(cfg)
    killer.join(timeout=60)
    assert summary.ok and summary.tasks_retried >= 1
    assert content(_direct_fs(faulty_s3), "atlas-out/killed") == clean_s3


@pytest.mark.ray
def test_a_recreated_empty_bucket_is_rebuilt(faulty_s3, s3_input, clean_s3):
    cfg = _s3(faulty_s3, s3_input, "rebucket")
    cfg.output.root = "s3://atlas-scratch/rebucket"
    fs = _direct_fs(faulty_s3)
    fs.mkdir("atlas-scratch")
    assert run(cfg).ok
    fs.rm("atlas-scratch", recursive=True)  # the bucket is lost...
    fs.mkdir("atlas-scratch")  # ...and made again, empty
    again = run(cfg)
    assert again.ok and again.tasks_done == TASKS
    assert content(fs, "atlas-scratch/rebucket") == clean_s3


@pytest.mark.ray
def test_a_lost_pyramid_level_on_s3_is_rebuilt(faulty_s3, s3_input, ray_cluster):
    fs = _direct_fs(faulty_s3)
    clean = _s3(faulty_s3, s3_input, "pyramid-clean")
    clean.output.pyramid_min = 16  # levels 1, 2 and 3
    assert run(clean).ok
    expected = content(fs, "atlas-out/pyramid-clean")
    cfg = _s3(faulty_s3, s3_input, "pyramid")
    cfg.output.pyramid_min = 16
    assert run(cfg).ok
    image = "atlas-out/pyramid/g.ome.zarr"
    fs.rm([p for p in fs.find(f"{image}/1") if "/c/" in p])  # every object of level 1
    again = run(cfg)
    assert again.ok and again.tasks_done == 0 and again.complete == ["g"]
    assert content(fs, "atlas-out/pyramid") == expected
    fs.rm(f"{image}/2/c/0/0/0/0")  # one object of level 2 (RGB: channels first)
    again = run(cfg)
    assert again.ok and again.tasks_done == 0 and again.complete == ["g"]
    assert content(fs, "atlas-out/pyramid") == expected


def _job(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "atlinter_ray", *args], capture_output=True,
                          text=True, timeout=600, env={**os.environ, **env})


@pytest.mark.ray
def test_failing_jobs_never_show_the_credentials_given_as_overrides(faulty_s3, s3_input):
    key, secret = EXAMPLE_CREDENTIALS  # AWS's documentation example, known to both servers
    creds = [f"+{side}.storage_options.{k}={v}" for side in ("data", "output")
             for k, v in (("key", key), ("secret", secret))]
    common = ["data=allen", f"data.root={s3_input}", "data.genes=[g]", "model=linear",
              f"+data.storage_options.endpoint_url={faulty_s3.direct['endpoint_url']}",
              f"+output.storage_options.endpoint_url={faulty_s3.proxy.endpoint_url}",
              "run.progress=false", *creds]
    ray_tmp = tempfile.mkdtemp(prefix="i9r", dir="/tmp")  # short: Ray's socket paths live here
    env = {"RAY_TMPDIR": ray_tmp, "RAY_AUTH_MODE": "disabled"}
    try:
        # 1. an output bucket that does not exist: refused before any work
        missing = _job([*common, "output.root=s3://no-such-bucket/x"], env)
        assert missing.returncode == 2, missing.stderr
        assert "output.root=s3://no-such-bucket/x cannot be used" in missing.stderr
        # 2. a store that fails every write once the workers run: stopped early, exit 1
        faulty_s3.proxy.add("503", method="PUT", path=r"/atlas-out/secret-job/g\.ome\.zarr/0/c/")
        failing = _job([*common, "output.root=s3://atlas-out/secret-job",
                        "resources.max_storage_errors=2", "resources.local_cpus=2",
                        "+output.storage_options.config_kwargs.retries.max_attempts=1"], env)
        assert failing.returncode == 1, failing.stderr
        assert "storage failures in a row" in failing.stdout + failing.stderr
        fs = _direct_fs(faulty_s3)
        written = [fs.cat_file(p) for p in fs.find("atlas-out/secret-job")]
        logs = [p.read_bytes() for p in Path(ray_tmp).rglob("*") if p.is_file()]
        assert logs and written
        for text in [missing.stdout, missing.stderr, failing.stdout, failing.stderr]:
            assert key not in text and secret not in text
        for blob in written + logs:
            assert key.encode() not in blob and secret.encode() not in blob
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _end_processes_of(ray_tmp: str) -> None:
    """End the processes of a Ray cluster this test's job started (they name its temp dir)."""
    for proc in psutil.process_iter(["cmdline"]):
        if ray_tmp in " ".join(proc.info["cmdline"] or []):
            with contextlib.suppress(psutil.Error):
                proc.kill()


@pytest.mark.ray
def test_a_killed_driver_is_finished_by_rerunning_the_command(faulty_s3, s3_input, clean_s3):
    args = ["data=allen", f"data.root={s3_input}", "data.genes=[g]", "model=linear",
            "output.root=s3://atlas-out/driver-killed", f"output.slab={SLAB}",
            "run.progress=false",
            "resources.local_cpus=2", "resources.min_workers=2", "resources.max_workers=2",
            *[f"+{side}.storage_options.{k}={v}" for side in ("data", "output")
              for k, v in faulty_s3.direct.items() if k != "endpoint_url"],
            f"+data.storage_options.endpoint_url={faulty_s3.direct['endpoint_url']}",
            f"+output.storage_options.endpoint_url={faulty_s3.proxy.endpoint_url}"]
    hang = faulty_s3.proxy.add("hang", method="PUT", path="/atlas-out/driver-killed/_progress/.*40-47")
    ray_tmp = tempfile.mkdtemp(prefix="i9k", dir="/tmp")
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "RAY_AUTH_MODE": "disabled"}
    driver = subprocess.Popen([sys.executable, "-m", "atlinter_ray", *args], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while hang.hits == 0 and driver.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert hang.hits == 1, "the job never reached the task it is killed in"
        os.killpg(driver.pid, signal.SIGKILL)  # the driver dies mid-run
        driver.wait()
    finally:
        _end_processes_of(ray_tmp)
        faulty_s3.proxy.heal()
    try:
        again = _job(args, {"RAY_TMPDIR": ray_tmp, "RAY_AUTH_MODE": "disabled"})
    finally:
        _end_processes_of(ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert again.returncode == 0, again.stderr
    assert "complete 1, incomplete 0" in again.stdout
    assert content(_direct_fs(faulty_s3), "atlas-out/driver-killed") == clean_s3
