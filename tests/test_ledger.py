"""The ledger: every object of every level proved on rerun and repaired, and images that
are not ours refused untouched.

Local outputs run in-process (``run.serial``), as in ``test_faults.py``; each damage is
made to a complete run's output and each rerun must end in a clean run's bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import fsspec
import numpy as np
import pytest
import zarr
from omegaconf import OmegaConf

from atlinter_ray import ledger
from atlinter_ray import store as store_module
from atlinter_ray.cli import guarded, interpolate
from atlinter_ray.config import Config
from atlinter_ray.errors import StoreError
from atlinter_ray.ledger import Verdict
from atlinter_ray.objects import FsspecObjects
from atlinter_ray.pipeline import run
from atlinter_ray.store import VolumeStore
from atlinter_ray.testing.datasets import real_volume, sections_of, write_dataset

SECTIONS = [4, 10, 16, 23, 30, 37, 45, 52, 60, 66, 72, 80, 86]


def _config(tmp_path: Path, out: str = "out", truth: bool = False) -> Config:
    volume = real_volume()
    write_dataset(tmp_path / "in", "g", sections_of(volume, SECTIONS, "coronal"), SECTIONS,
                  reference_shape=list(volume.shape))
    cfg = Config()
    cfg.data.root, cfg.data.genes = str(tmp_path / "in"), ["g"]
    if truth:
        np.savez(tmp_path / "truth.npz", volume=volume)
        cfg.data.truth = {"g": str(tmp_path / "truth.npz")}
    cfg.output.root = str(tmp_path / out)
    cfg.output.pyramid_min = 16  # levels 1, 2 and 3 on the 91 x 79 x 77 sample
    cfg.model.name = "linear"
    cfg.run.serial, cfg.run.progress = True, False
    return cfg


def _levels(root: str) -> dict[str, str]:
    """sha256 of every object of every level of the image, its metadata included (the
    group's, which names the generation, left out)."""
    image = Path(root) / "g.ome.zarr"
    return {p.relative_to(image).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(image.rglob("*")) if p.is_file() and p.parent != image}


def _tree(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root``."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def clean(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The level objects of a clean run."""
    tmp = tmp_path_factory.mktemp("clean")
    cfg = _config(tmp)
    assert run(cfg).ok
    return _levels(cfg.output.root)


def _scramble(path: Path) -> None:
    """Random bytes of the same size (bit rot, a bad copy, a half-applied sync)."""
    path.write_bytes(np.random.default_rng(7).integers(0, 256, path.stat().st_size,
                                                       np.uint8).tobytes())


@pytest.mark.parametrize("damage", ["level 1 deleted", "a level-2 object deleted",
                                    "a level-2 object overwritten, same size",
                                    "level 3's metadata deleted"])
def test_a_damaged_pyramid_is_rebuilt_by_the_rerun(tmp_path: Path, clean, damage) -> None:
    cfg = _config(tmp_path)
    assert run(cfg).ok
    image = tmp_path / "out" / "g.ome.zarr"
    if damage == "level 1 deleted":
        shutil.rmtree(image / "1")
    elif damage == "level 3's metadata deleted":
        (image / "3" / "zarr.json").unlink()
    elif damage == "a level-2 object deleted":
        (image / "2" / "c" / "0" / "0" / "0").unlink()
    else:
        _scramble(image / "2" / "c" / "0" / "0" / "0")
    again = run(cfg)
    assert again.ok and again.tasks_done == 0 and again.complete == ["g"]
    assert _levels(cfg.output.root) == clean
    assert run(cfg).tasks_done == 0  # and the repaired image is proved complete


@pytest.mark.parametrize("truth", [False, True])
def test_same_size_damage_of_a_level0_object_redoes_its_task(tmp_path: Path, clean,
                                                             truth: bool) -> None:
    cfg = _config(tmp_path, truth=truth)
    assert run(cfg).ok
    _scramble(tmp_path / "out" / "g.ome.zarr" / "0" / "c" / "5" / "0" / "0")
    again = run(cfg)
    assert again.ok and again.tasks_done == 1  # the task owning slab 5, slices 40-47
    assert _levels(cfg.output.root) == clean
    if truth:
        assert "g" in again.scores


def test_verify_names_each_objects_verdict(tmp_path: Path) -> None:
    objects = FsspecObjects(str(tmp_path), {})
    blobs = {"a": b"alpha", "b": b"bravo", "c": b"charlie"}
    objects.put_many({f"img/{k}": v for k, v in blobs.items()})
    expected = {k: ledger.object_sum(v) for k, v in blobs.items()}
    objects.put("img/b", b"brave")  # same size, other bytes
    objects.delete(["img/c"])
    assert ledger.verify_objects(objects, "img", expected) == {
        "a": Verdict.OK, "b": Verdict.CORRUPT, "c": Verdict.MISSING}


def _someone_elses(image: Path, state: str) -> None:
    """An OME-Zarr image named as ours that another tool wrote (or is writing)."""
    if state == "valid group":
        zarr.create_group(str(image), zarr_format=3, attributes={"ome": {"version": "0.5"}})
        zarr.create_array(str(image / "0"), shape=(4, 4), dtype="uint8", fill_value=0)[:] = 3
        return
    (image / "0" / "c").mkdir(parents=True)
    (image / "0" / "c" / "0").write_bytes(b"their data")
    if state == "torn zarr.json":
        (image / "zarr.json").write_bytes(b'{"zarr_format": 3, "node_ty')


@pytest.mark.parametrize("state", ["no zarr.json", "torn zarr.json", "valid group"])
def test_an_image_that_is_not_ours_is_refused_untouched(tmp_path: Path, state: str,
                                                        capsys) -> None:
    cfg = _config(tmp_path)
    out = tmp_path / "out"
    _someone_elses(out / "g.ome.zarr", state)
    (out / "g.provenance.json").write_text('{"theirs": true}')
    (out / "_progress" / "g").mkdir(parents=True)
    (out / "_progress" / "g" / "notes.txt").write_text("theirs too")
    before = _tree(out)
    with pytest.raises(StoreError, match="not written by atlinter_ray") as refused:
        run(cfg)
    assert str(out / "g.ome.zarr") in str(refused.value)
    assert "output.overwrite=true" in str(refused.value)
    assert "another output.root" in str(refused.value)
    with pytest.raises(SystemExit) as stop:  # the command line: exit 2, the same message
        guarded(interpolate)(OmegaConf.structured(cfg))
    assert stop.value.code == 2 and "not written by atlinter_ray" in capsys.readouterr().err
    assert {k: v for k, v in _tree(out).items() if k not in (".atlinter_ray.lock",)} == before
    cfg.output.overwrite = True  # only on request is it replaced
    assert run(cfg).ok
    assert (out / "g.ome.zarr" / ledger.IMAGE_RECORD).exists()
    assert VolumeStore(str(out)).image_attrs("g")["atlinter_ray"]["complete"]


class Killed(BaseException):
    """The process dying at a chosen point: no handler of ours may catch it."""


def test_a_run_killed_after_claiming_its_image_is_finished_by_the_rerun(
        tmp_path: Path, clean, monkeypatch) -> None:
    cfg = _config(tmp_path)
    claim = store_module.claim_image

    def claim_then_die(*args: object) -> None:
        claim(*args)  # type: ignore[arg-type]
        raise Killed

    monkeypatch.setattr(store_module, "claim_image", claim_then_die)
    with pytest.raises(Killed):
        run(cfg)
    image = tmp_path / "out" / "g.ome.zarr"
    assert os.listdir(image) == [ledger.IMAGE_RECORD]  # our record, and nothing else yet
    monkeypatch.undo()
    again = run(cfg)
    assert again.ok and again.complete == ["g"]
    assert _levels(cfg.output.root) == clean


def test_an_image_record_of_another_dataset_is_foreign(tmp_path: Path) -> None:
    objects = FsspecObjects(str(tmp_path), {})
    assert ledger.image_owner(objects, "g.ome.zarr", "g") is Verdict.MISSING
    ledger.claim_image(objects, "g.ome.zarr", "h")  # copied in from another dataset's image
    assert ledger.image_owner(objects, "g.ome.zarr", "g") is Verdict.FOREIGN
    ledger.claim_image(objects, "g.ome.zarr", "g")
    assert ledger.image_owner(objects, "g.ome.zarr", "g") is Verdict.OK
    assert json.loads(objects.get(f"g.ome.zarr/{ledger.IMAGE_RECORD}") or b"")["dataset"] == "g"
    assert fsspec.filesystem("file").exists(str(tmp_path / "g.ome.zarr"))


def test_level0_damaged_after_its_proof_is_reported_then_redone(tmp_path: Path, clean,
                                                                  monkeypatch) -> None:
    """Scoring reads level 0 whole: an object that no longer decodes there (damaged after
    the rerun proved it) makes the dataset incomplete with the cause, never a crash, and
    the next rerun redoes it: no endless "rerun to finish"."""
    cfg = _config(tmp_path, truth=True)
    assert run(cfg).ok
    _scramble(tmp_path / "out" / "g.ome.zarr" / "0" / "c" / "5" / "0" / "0")
    monkeypatch.setattr(ledger, "recheck", lambda store, ds, state, *args: state)
    damaged = run(cfg)
    assert not damaged.ok and "g" not in damaged.complete and "g" not in damaged.scores
    assert "0/c/5/0/0 does not decode" in damaged.incomplete["g"]
    monkeypatch.undo()
    again = run(cfg)
    assert again.ok and again.tasks_done == 1 and "g" in again.scores
    assert _levels(cfg.output.root) == clean
