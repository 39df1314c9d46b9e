"""Stateful property test: runs, kills and damage in any order never end in a wrong exit 0.

Hypothesis interleaves, on one local output root, in-process runs (``run.serial``) with:
runs killed at any write (:mod:`atlinter_ray.testing.faulty_objects`), deleted and
same-size corrupted objects of level 0 and of the pyramid, deleted markers, torn
metadata of our own images, someone else's OME-Zarr placed under one of our image
names, and the lease left behind by a killed driver. Each fault kind is a rule of its
own, so a failing sequence names the fault it needs. The invariants:

- a run that ends ok (exit 0) leaves exactly a clean run's bytes: every array of every
  pyramid level, every object of every image, the provenance and the pictures;
- nothing outside our images changes: files beside them stay, and a foreign image under
  one of our names is refused (no run ends ok) and stays byte-identical;
- with no foreign image in the way, a run that is not killed ends ok (a rerun finishes).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from atlinter_ray.config import Config
from atlinter_ray.objects import open_objects
from atlinter_ray.pipeline import RunSummary, run
from atlinter_ray.store import VolumeStore
from atlinter_ray.testing.datasets import write_dataset
from atlinter_ray.testing.faulty_objects import FaultyObjects, Fuse, Killed, dying_after

#: Two small datasets, cut along different axes (reference shape 24 x 16 x 20).
SHAPE = (24, 16, 20)
DATASETS = {"ga": ("coronal", [2, 7, 12, 17, 22]), "gb": ("sagittal", [1, 6, 11, 16])}
#: Beside our images: a note and another image, which no run may touch.
BESIDE = {"notes.txt": b"my notes\n"}
LEASE_FILE = ".atlinter_ray.lock"


def _write_inputs(folder: Path) -> None:
    """The two datasets' sections: smooth random images, so every level has structure."""
    rng = np.random.default_rng(20)
    index = {"coronal": 0, "sagittal": 2}
    for name, (axis, sections) in DATASETS.items():
        plane = [n for i, n in enumerate(SHAPE) if i != index[axis]]
        images = rng.integers(0, 256, (len(sections), *plane)).astype(np.uint8)
        write_dataset(folder, name, images, sections, axis=axis, reference_shape=list(SHAPE))


def _config(inputs: Path, root: Path) -> Config:
    cfg = Config()
    cfg.data.root, cfg.data.genes = str(inputs), sorted(DATASETS)
    cfg.model.name = "linear"
    cfg.output.root = str(root)
    cfg.output.pyramid_min = 4  # levels 0..3
    cfg.run.serial, cfg.run.progress = True, False
    return cfg


def _files(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` by its relative path."""
    return {str(p.relative_to(folder)): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _sha(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


def _levels(image: Path) -> list[str]:
    """The image's array folders, level 0 first."""
    return sorted((p.name for p in image.iterdir() if p.is_dir() and p.name.isdigit()), key=int)


def _decoded(array: Path) -> str:
    """sha256 of a level's decoded values, or why it cannot be read."""
    try:
        return _sha(np.ascontiguousarray(zarr.open_array(str(array), mode="r")[...]).tobytes())
    except Exception as exc:  # noqa: BLE001 - an unreadable level is a difference
        return f"unreadable: {type(exc).__name__}: {exc}"


def snapshot(root: Path) -> dict[str, Any]:
    """What a run leaves that must be a clean run's bytes, the run's own records aside.

    Per image: every object under it but its group metadata (every level's array
    metadata and objects), the group's OME metadata, every level decoded, the
    provenance, and the pictures beside it. Markers, the summary, the lease and the
    image's run record (generation, checksums, tokens) are the run's own.
    """
    out: dict[str, Any] = {}
    for name in sorted(DATASETS):
        image = root / f"{name}.ome.zarr"
        files = _files(image) if image.is_dir() else {}
        group = json.loads(files.pop("zarr.json", b"{}") or b"{}")
        attrs = group.get("attributes", {})
        out[name] = {
            "objects": {k: _sha(v) for k, v in files.items()},
            "ome": attrs.get("ome"),
            "arrays": {level: _decoded(image / level)
                       for level in (_levels(image) if image.is_dir() else [])},
            "provenance": VolumeStore(str(root)).image_attrs(name)["atlinter_ray"].get(
                "provenance") if attrs else None,
            "pictures": {s: _sha((root / f"{name}.{s}.png").read_bytes())
                         for s in ("quicklook", "montage") if (root / f"{name}.{s}.png").exists()},
        }
    return out


def _foreign_image(path: Path, torn: bool) -> None:
    """Someone else's OME-Zarr (no record of ours) at ``path``; its metadata torn or whole."""
    arr = zarr.create_array(str(path / "0"), shape=(4, 4, 4), chunks=(2, 4, 4), dtype="uint16")
    arr[...] = np.arange(64, dtype=np.uint16).reshape(4, 4, 4)
    meta = {"zarr_format": 3, "node_type": "group", "attributes": {"ome": {
        "version": "0.5", "multiscales": [{"axes": [{"name": a, "type": "space"} for a in "zyx"],
                                           "datasets": [{"path": "0", "coordinateTransformations": [
                                               {"type": "scale", "scale": [1, 1, 1]}]}]}]}}}
    blob = json.dumps(meta).encode()
    (path / "zarr.json").write_bytes(blob[: len(blob) // 2] if torn else blob)


class OutputMachine(RuleBasedStateMachine):
    """One output root under runs, kills and damage; see the module docstring."""

    #: Set by the test: the inputs, a folder for the roots, the clean snapshot, and
    #: the writes of a whole clean run (the range of kill points).
    inputs: Path
    base: Path
    clean: dict[str, Any]
    clean_writes: int

    def __init__(self) -> None:
        super().__init__()
        self.root = Path(tempfile.mkdtemp(dir=self.base))
        self.cfg = _config(self.inputs, self.root)
        for rel, blob in BESIDE.items():
            (self.root / rel).write_bytes(blob)
        _foreign_image(self.root / "other.ome.zarr", torn=False)
        self.beside = _files(self.root)
        #: dataset id -> the foreign image's files, while one lies under that name.
        self.foreign: dict[str, dict[str, bytes]] = {}

    def teardown(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    # -- runs ---------------------------------------------------------------------
    def _run(self, fuse: Fuse | None = None) -> RunSummary | BaseException:
        """One run's summary, or what stopped it (a refusal, a crash, a kill)."""
        try:
            if fuse is None:
                return run(self.cfg)
            with dying_after(fuse):
                return run(self.cfg)
        except (Exception, Killed) as exc:  # noqa: BLE001 - every end is judged below
            return exc

    def _judge(self, outcome: RunSummary | BaseException, killed: bool) -> None:
        """Exit 0 means the clean bytes; with nothing in the way, an unkilled run is ok."""
        ok = isinstance(outcome, RunSummary) and outcome.ok
        if ok:
            assert not self.foreign, f"exit 0 over the foreign image(s) {sorted(self.foreign)}"
            self._clean_bytes()
        elif not killed and not self.foreign:
            raise AssertionError(f"a rerun with nothing in the way did not finish: {outcome!r}")

    def _clean_bytes(self) -> None:
        """A clean run's bytes; level 0, the pyramid and the rest apart, to name the bug."""
        now = snapshot(self.root)
        for name, clean in self.clean.items():
            level0 = {k: v for k, v in now[name]["objects"].items() if k.startswith("0/")}
            assert (now[name]["arrays"].get("0"), level0) == (
                clean["arrays"]["0"], {k: v for k, v in clean["objects"].items()
                                       if k.startswith("0/")}), (
                f"exit 0 with level 0 of {name} not a clean run's bytes")
            assert now[name]["arrays"] == clean["arrays"], (
                f"exit 0 with a pyramid level of {name} not a clean run's values")
            assert now[name] == clean, (
                f"exit 0 with {name}'s pyramid objects, metadata, provenance or pictures "
                "not a clean run's")

    @rule()
    def rerun(self) -> None:
        """The same command, run to its end."""
        self._judge(self._run(), killed=False)

    @rule(writes=st.integers(min_value=0, max_value=200))
    def killed_run(self, writes: int) -> None:
        """The same command, its process killed at a write (a whole run's worth or fewer)."""
        fuse = Fuse(left=writes % (self.clean_writes + 1))
        outcome = self._run(fuse)
        self._judge(outcome, killed=fuse.blown)

    @rule()
    def stale_lease(self) -> None:
        """The lease file a killed driver left (its OS lock gone with it): taken over."""
        (self.root / LEASE_FILE).write_text(json.dumps(
            {"owner": "dead-driver", "host": "elsewhere", "pid": 2**22 + 7, "heartbeat": 0}))

    # -- damage to our images -----------------------------------------------------
    def _objects(self, pyramid: bool) -> list[str]:
        """Our images' stored objects of level 0, or of the levels above it (root-relative)."""
        found: list[Path] = []
        for name in sorted(set(DATASETS) - set(self.foreign)):
            image = self.root / f"{name}.ome.zarr"
            if image.is_dir():
                for level in _levels(image):
                    if (level != "0") == pyramid and (image / level / "c").is_dir():
                        found += sorted(p for p in (image / level / "c").rglob("*") if p.is_file())
        return [str(p.relative_to(self.root)) for p in found]

    def _draw(self, data: st.DataObject, objects: list[str]) -> Path:
        """One of ``objects``, drawn so that a failing sequence names it."""
        return self.root / data.draw(st.sampled_from(objects), label="object")

    def _has_level0(self) -> bool:
        return bool(self._objects(False))

    def _has_pyramid(self) -> bool:
        return bool(self._objects(True))

    @precondition(_has_level0)
    @rule(data=st.data())
    def delete_level0_object(self, data: st.DataObject) -> None:
        """A level-0 object lost (a lifecycle rule, a bad sync)."""
        self._draw(data, self._objects(False)).unlink()

    @precondition(_has_pyramid)
    @rule(data=st.data())
    def delete_pyramid_object(self, data: st.DataObject) -> None:
        """An object of a pyramid level (1, 2, ...) lost."""
        self._draw(data, self._objects(True)).unlink()

    def _corrupt(self, path: Path, seed: int) -> None:
        """Random bytes of the same size (bit rot, a half-applied sync)."""
        old = path.read_bytes()
        new = np.random.default_rng(seed).bytes(len(old))
        path.write_bytes(new if new != old else bytes([old[0] ^ 1]) + old[1:])

    @precondition(_has_level0)
    @rule(data=st.data(), seed=st.integers(0, 2**16))
    def corrupt_level0_object(self, data: st.DataObject, seed: int) -> None:
        """A level-0 object overwritten with random bytes of the same size."""
        self._corrupt(self._draw(data, self._objects(False)), seed)

    @precondition(_has_pyramid)
    @rule(data=st.data(), seed=st.integers(0, 2**16))
    def corrupt_pyramid_object(self, data: st.DataObject, seed: int) -> None:
        """A pyramid object overwritten with random bytes of the same size."""
        self._corrupt(self._draw(data, self._objects(True)), seed)

    def _has_markers(self) -> bool:
        return any((self.root / "_progress").rglob("*.*")) if (self.root / "_progress").is_dir() \
            else False

    @precondition(_has_markers)
    @rule(data=st.data())
    def delete_progress_object(self, data: st.DataObject) -> None:
        """A done marker or a task's reduction lost."""
        found = sorted(str(p.relative_to(self.root))
                       for p in (self.root / "_progress").rglob("*") if p.is_file())
        self._draw(data, found).unlink()

    def _has_own_image(self) -> bool:
        return any((self.root / f"{n}.ome.zarr" / "zarr.json").is_file()
                   for n in set(DATASETS) - set(self.foreign))

    @precondition(_has_own_image)
    @rule(data=st.data())
    def tear_own_metadata(self, data: st.DataObject) -> None:
        """Our own image's group metadata cut short (a torn write of a killed sync)."""
        names = sorted(n for n in set(DATASETS) - set(self.foreign)
                       if (self.root / f"{n}.ome.zarr" / "zarr.json").is_file())
        path = self.root / f"{data.draw(st.sampled_from(names), label='image')}.ome.zarr/zarr.json"
        blob = path.read_bytes()
        path.write_bytes(blob[: len(blob) // 2])

    # -- someone else's image -------------------------------------------------------
    @precondition(lambda self: len(self.foreign) < len(DATASETS))
    @rule(data=st.data(), torn=st.booleans())
    def place_foreign_image(self, data: st.DataObject, torn: bool) -> None:
        """Someone else's OME-Zarr copied over one of our image names (ours removed first)."""
        name = data.draw(st.sampled_from(sorted(set(DATASETS) - set(self.foreign))), label="name")
        image = self.root / f"{name}.ome.zarr"
        shutil.rmtree(image, ignore_errors=True)
        _foreign_image(image, torn)
        self.foreign[name] = _files(image)

    @precondition(lambda self: bool(self.foreign))
    @rule(data=st.data())
    def remove_foreign_image(self, data: st.DataObject) -> None:
        """Its owner takes the foreign image away again."""
        name = data.draw(st.sampled_from(sorted(self.foreign)), label="name")
        shutil.rmtree(self.root / f"{name}.ome.zarr")
        del self.foreign[name]

    # -- always -------------------------------------------------------------------
    @invariant()
    def nothing_outside_our_images_changes(self) -> None:
        """The files beside our images, and every foreign image, are byte-identical."""
        now = _files(self.root)
        for rel, blob in self.beside.items():
            assert now.get(rel) == blob, f"{rel} beside our images was changed or removed"
        for name, files in self.foreign.items():
            assert _files(self.root / f"{name}.ome.zarr") == files, (
                f"the foreign image under {name}.ome.zarr was changed or removed")


@pytest.mark.slow
def test_no_interleaving_of_runs_kills_and_damage_ends_in_a_wrong_exit_0(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    base = tmp_path_factory.mktemp("invariants")
    inputs = base / "in"
    _write_inputs(inputs)
    clean_root = base / "clean"
    fuse = Fuse()
    with dying_after(fuse):  # counts the writes of a whole run
        assert run(_config(inputs, clean_root)).ok
    OutputMachine.inputs, OutputMachine.base = inputs, base
    OutputMachine.clean, OutputMachine.clean_writes = snapshot(clean_root), len(fuse.writes)
    assert OutputMachine.clean_writes > 20 and len(OutputMachine.clean["ga"]["arrays"]) == 4
    run_state_machine_as_test(OutputMachine, settings=settings(
        max_examples=int(os.environ.get("ATLINTER_RAY_INVARIANT_EXAMPLES", "15")),
        stateful_step_count=8, deadline=None, derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]))


def test_the_fuse_kills_at_its_write_and_every_write_after(tmp_path: Path) -> None:
    """A batch is cut where the fuse blows; a dead process writes nothing more."""
    fuse = Fuse(left=2)
    objects = FaultyObjects(open_objects(str(tmp_path)), fuse)
    with pytest.raises(Killed):
        objects.put_many({"a": b"1", "b": b"2", "c": b"3"})
    with pytest.raises(Killed):
        objects.delete(["a"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"] and fuse.writes == ["a", "b"]
