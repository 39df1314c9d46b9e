"""The pipeline end to end on a real local Ray cluster: output, resume, GPUs, failures."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import zarr

from atlinter_ray.config import Config
from atlinter_ray.dataset import load_dataset
from atlinter_ray.errors import ConfigError, StoreError
from atlinter_ray.execution import batches, run_work
from atlinter_ray.layout import Layout
from atlinter_ray.pipeline import committed_rows, run
from atlinter_ray.planning import plan_dataset, plan_slabs
from atlinter_ray.store import SIDECAR_KEYS, VolumeStore, decode_marker, encode_marker, sidecar_name
from atlinter_ray.testing.datasets import prepare_image, real_volume, sections_of, write_dataset
from atlinter_ray.worker import WorkerSpec, failed_result

SECTIONS = [4, 10, 16, 23, 30, 37, 45, 52, 60, 66, 72, 80, 86]


def _run_tasks(tasks, spec, resources=None, tasks_per_batch=1):
    """The tasks' rows through the job's own path (:func:`run_work`): on Ray when given
    ``resources``, else in this process."""
    serial = resources is None
    resources = resources or Config().resources
    return list(run_work(batches(tasks, tasks_per_batch), spec, resources, lambda _: [], serial))

#: Slabs of 8 slices (finer than the default ``output.slab``): 12 tasks of the 91 slices.
SLAB = 8
TASKS = 12


def _config(tmp_path: Path, **resources) -> Config:
    volume = real_volume(rgb=True)
    write_dataset(tmp_path / "in", "rgbgene", sections_of(volume, SECTIONS, "coronal"),
                  SECTIONS, reference_shape=list(volume.shape[:3]))
    cfg = Config()
    cfg.data.root, cfg.data.genes = str(tmp_path / "in"), ["rgbgene"]
    cfg.output.root = str(tmp_path / "out")
    cfg.model.name, cfg.model.params = "dis", {"preset": "fast"}
    cfg.output.slab = SLAB
    cfg.run.progress = False
    for key, value in {"min_workers": 2, "max_workers": 2, **resources}.items():
        setattr(cfg.resources, key, value)
    return cfg


def _snapshot(root: Path) -> dict[str, str]:
    """sha256 of every output file; markers without the lease epoch of the run that wrote them."""
    return {
        str(p.relative_to(root)): hashlib.sha256(_unfenced(p)).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name not in ("run_summary.json", ".atlinter_ray.lock")
    }


def _unfenced(path: Path) -> bytes:
    """A file's bytes; a task marker's without its ``fence`` (each run's lease epoch)."""
    if "_progress" not in path.parts or path.suffix != ".done":
        return path.read_bytes()
    marker = decode_marker(path.read_bytes())
    assert marker is not None and isinstance(marker.record.pop("fence"), int)
    return encode_marker(marker.record, marker.reduction)


@pytest.mark.ray
def test_reconstructs_whole_volume_on_two_workers(ray_cluster, tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    summary = run(cfg)
    assert summary.ok and summary.tasks_done == TASKS
    assert summary.slices_written == 91 and summary.nodes
    assert summary.devices == {"cpu fp32": summary.tasks_done}  # as the workers report
    truth = real_volume(rgb=True)
    group = zarr.open_group(str(tmp_path / "out" / "rgbgene.ome.zarr"), mode="r")
    out = np.moveaxis(group["0"][...], 0, -1)
    assert out.shape == truth.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(out[SECTIONS], truth[SECTIONS])  # measured, untouched
    np.testing.assert_array_equal(out[:4], np.repeat(truth[4:5], 4, 0))  # edge copy
    np.testing.assert_array_equal(out[87:], np.repeat(truth[86:87], 4, 0))
    predicted = [s for s in range(4, 87) if s not in SECTIONS]
    err = np.abs(out[predicted].astype(float) - truth[predicted]).mean()
    assert 0 < err < 12
    # OME-Zarr 0.5 metadata napari and neuroglancer read
    ome = group.attrs["ome"]
    assert ome["version"] == "0.5"
    axes = ome["multiscales"][0]["axes"]
    assert [a["name"] for a in axes] == ["c", "z", "y", "x"]
    scale = ome["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]["scale"]
    assert scale == [1.0, 25.0, 25.0, 25.0]
    # one shard object per slab of 8 slices (never shared by tasks), 32 x 32 inner chunks;
    # a pyramid level (one writer: finishing) is one shard object, with the same chunks
    assert group["0"].shards == (3, 8, 96, 96) and group["0"].chunks == (3, 8, 32, 32)
    assert group["1"].shape == (3, 46, 40, 39)
    assert group["1"].shards == (3, 48, 64, 64) and group["1"].chunks == (3, 8, 32, 32)
    # per-slice provenance, in a sidecar beside the image: the OME metadata stays lean
    assert set(group.attrs["atlinter_ray"]).isdisjoint(SIDECAR_KEYS)
    prov = json.loads((tmp_path / "out" / sidecar_name("rgbgene")).read_text())["provenance"]
    assert [p["slice"] for p in prov] == list(range(91))
    assert {p["status"] for p in prov} == {"measured", "predicted", "edge-filled"}
    pred = next(p for p in prov if p["slice"] == 7)
    assert pred["model"] == "dis" and pred["left"] == 4 and pred["right"] == 10
    assert pred["t"] == pytest.approx(0.5) and pred["software"].startswith("atlinter_ray")
    # quick-look and summary beside the output
    raw = (tmp_path / "out" / "rgbgene.quicklook.png").read_bytes()
    png = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_COLOR)
    assert png is not None and png.shape[0] >= 79
    written = json.loads((tmp_path / "out" / "run_summary.json").read_text())
    assert written["tasks_done"] == summary.tasks_done


@pytest.mark.ray
def test_rerun_skips_done_tasks_and_redoes_lost_ones_bytes_identical(ray_cluster, tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    assert run(cfg).ok
    out = tmp_path / "out"
    first = _snapshot(out)
    again = run(cfg)
    assert (again.tasks_done, again.tasks_skipped) == (0, TASKS)
    assert _snapshot(out) == first
    # a crash after writing slices but before the marker, and a lost shard
    (markers,) = (out / "_progress" / "rgbgene").iterdir()  # one image generation
    (markers / "16-23.done").unlink()
    (markers / "40-47.done").unlink()
    shard = out / "rgbgene.ome.zarr" / "0" / "c" / "0" / "7" / "0" / "0"  # slices 56-63
    shard.write_bytes(b"garbage")
    redo = run(cfg)
    assert (redo.tasks_done, redo.tasks_skipped) == (3, TASKS - 3)
    assert _snapshot(out) == first


def test_another_model_cannot_silently_mix_into_an_output(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    cfg.run.serial = True
    assert run(cfg).ok
    cfg.model.name, cfg.model.params = "linear", {}
    with pytest.raises(StoreError, match="output.overwrite=true"):
        run(cfg)
    cfg.output.overwrite = True
    summary = run(cfg)
    assert summary.ok and summary.tasks_skipped == 0


@pytest.mark.parametrize("setting, value", [
    ("max_workers", 0), ("min_workers", 3), ("tasks_per_batch", 0), ("start_timeout_s", 0.0),
])
def test_impossible_pool_settings_are_refused_before_any_work(
    tmp_path: Path, setting: str, value: float
) -> None:
    cfg = _config(tmp_path)
    setattr(cfg.resources, setting, value)
    with pytest.raises(ConfigError, match=f"resources.{setting}"):
        run(cfg)
    assert not (tmp_path / "out").exists()


def test_compression_level_is_configurable_and_checked_up_front(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    cfg.run.serial = True
    cfg.output.zstd_level = 0
    with pytest.raises(ConfigError, match="output.zstd_level=0"):
        run(cfg)
    assert not (tmp_path / "out").exists()  # refused before anything was written
    cfg.output.zstd_level = -8
    with pytest.raises(ConfigError, match="output.zstd_level=-8"):
        run(cfg)
    levels = {1: tmp_path / "light", 9: tmp_path / "heavy", -3: tmp_path / "fast"}
    for level, root in levels.items():
        cfg.output.zstd_level, cfg.output.root = level, str(root)
        assert run(cfg).ok
    arrays = [zarr.open_array(str(root / "rgbgene.ome.zarr" / "0"), mode="r")
              for root in levels.values()]
    assert [a.metadata.codecs[0].codecs[-1].level for a in arrays] == [1, 9, -3]  # in shards
    for other in arrays[1:]:  # same values, other bytes
        np.testing.assert_array_equal(arrays[0][...], other[...])


@pytest.mark.ray
def test_gpu_workers_each_get_their_own_gpu(ray_cluster, tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    ds = load_dataset(f"{cfg.data.root}/rgbgene", None)
    state = prepare_image(VolumeStore(cfg.output.root), ds, layout=Layout(slab=SLAB))
    # enough to reach both: the second actor may take seconds to start on a busy machine
    tasks = plan_slabs(plan_dataset(ds.id, ds.section_numbers, ds.n_slices), ds.n_slices, SLAB) * 12
    spec = WorkerSpec("linear", None, {}, {ds.id: ds}, {ds.id: "uint8"}, cfg.output.root,
                      images={ds.id: state.identity})
    cfg.resources.gpus_per_worker = 1
    rows = _run_tasks(tasks, spec, cfg.resources)
    assert all(r.done for r in rows)
    by_pid = {r.worker.pid: (",".join(r.worker.gpu_ids), r.worker.cuda_visible_devices) for r in rows}
    assert len(by_pid) == 2
    gpus = sorted(g for g, _ in by_pid.values())
    assert gpus == ["0", "1"]
    assert all(cvd == gpu for gpu, cvd in by_pid.values())  # each sees only its own


def test_a_failing_task_is_reported_and_never_marked_done(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    ds = load_dataset(f"{cfg.data.root}/rgbgene", None)
    store = VolumeStore(cfg.output.root)
    identity = prepare_image(store, ds, layout=Layout(slab=SLAB)).identity
    tasks = plan_slabs(plan_dataset(ds.id, ds.section_numbers, ds.n_slices), ds.n_slices, SLAB)
    broken = dataclasses.replace(ds, images_url=str(tmp_path / "vanished.npy"))
    spec = WorkerSpec("linear", None, {}, {ds.id: broken}, {ds.id: "uint8"}, cfg.output.root,
                      images={ds.id: identity})
    rows = _run_tasks(tasks, spec)
    assert all(not r.done and "vanished.npy" in r.error for r in rows)
    assert store.done_records(ds.id, identity) == {}
    good = dataclasses.replace(spec, datasets={ds.id: ds})
    assert all(r.done for r in _run_tasks(tasks, good, tasks_per_batch=4))
    assert len(store.done_records(ds.id, identity)) == len(tasks)


@pytest.mark.ray
def test_a_run_no_worker_can_start_says_why_for_every_task(ray_cluster, tmp_path: Path) -> None:
    """Every failed task names the cause, and the counts match the store's markers."""
    cfg = _config(tmp_path, min_workers=1, max_workers=1, gpus_per_worker=3, start_timeout_s=3.0)
    cfg.model.name, cfg.model.params = "linear", {}
    summary = run(cfg)
    assert not summary.ok and summary.tasks_failed == summary.tasks_total > 0
    assert summary.tasks_done == 0 and len(summary.failures) == summary.tasks_total
    for failure in summary.failures:
        assert "no worker started in 3 s" in failure["error"], failure
    text = summary.to_text()
    assert "not run: \n" not in text + "\n" and "no worker started" in text
    written = json.loads((tmp_path / "out" / "run_summary.json").read_text())
    assert all(f["error"].strip().endswith(")") for f in written["failures"])


def test_tasks_a_lost_run_committed_count_as_done(tmp_path: Path) -> None:
    """A task reported failed whose marker the store holds (its node died after the commit)."""
    cfg = _config(tmp_path)
    ds = load_dataset(f"{cfg.data.root}/rgbgene", None)
    store = VolumeStore(cfg.output.root)
    identity = prepare_image(store, ds, layout=Layout(slab=SLAB)).identity
    tasks = plan_slabs(plan_dataset(ds.id, ds.section_numbers, ds.n_slices), ds.n_slices, SLAB)
    spec = WorkerSpec("linear", None, {}, {ds.id: ds}, {ds.id: "uint8"}, cfg.output.root,
                      images={ds.id: identity})
    committed = tasks[: len(tasks) // 2]
    assert all(r.done for r in _run_tasks(committed, spec))
    lost = [failed_result(t, "ActorDiedError: the node was lost") for t in tasks]
    rows = committed_rows(store, {ds.id: identity}, lost)
    assert {r.task_id for r in rows if r.done} == {t.task_id for t in committed}
    assert {r.task_id for r in rows if not r.done} == {t.task_id for t in tasks[len(committed):]}
    assert all(r.error == "ActorDiedError: the node was lost" for r in rows if not r.done)
