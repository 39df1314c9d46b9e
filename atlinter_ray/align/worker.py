"""Aligning one experiment: read it, register every section, write it whole or not at all.

::

    <input>.npy + .json ──> sha256 of both ──> output marker bound to them and to the
                                               settings? yes: skipped, nothing read again
    for each section:   Nissl slice at its section number (beyond the reference: passed
                        through), register, move every channel by the same field
    write (each atomically, in this order):
        transforms/<id>.npy   (n, H, W, 2) float32, the dense field of every section
        <id>.npy              the aligned sections, same shape and dtype as the input
        overlays/<id>.png     section | Nissl | overlay before | overlay after
        <id>.json             the input's metadata + "alignment": the marker, written last

An experiment is complete when its ``.json`` parses, carries this format and the byte
sizes of the two ``.npy`` files that exist: a crash at any point leaves an experiment that
a rerun redoes. :class:`AlignWorker` is a plain class; the driver wraps it in Ray.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import fsspec
import numpy as np

from atlinter_ray.align.config import RegistrationConfig, ants_params
from atlinter_ray.align.overlay import OverlayRow, overlay_png
from atlinter_ray.align.registration import (
    PASSED_THROUGH,
    REGISTERED,
    SectionResult,
    align_section,
    make_deterministic,
    to_gray,
)
from atlinter_ray.dataset import Dataset
from atlinter_ray.errors import DatasetError
from atlinter_ray.files import write_atomic
from atlinter_ray.reference import ReferenceVolume, read_reference_slices

log = logging.getLogger(__name__)

#: Written into every aligned ``.json`` under ``alignment.format``.
FORMAT = "atlinter_ray.align/1"
DONE, SKIPPED, FAILED = "done", "skipped", "failed"


@dataclass(frozen=True, slots=True)
class AlignSpec:
    """What every align worker needs; small, shipped once to each actor."""

    registration: RegistrationConfig
    reference: ReferenceVolume
    #: The settings record every marker is bound to (transform, params, seed, reference hash…).
    settings: Mapping[str, Any]
    output_root: str
    output_storage_options: Mapping[str, Any] = field(default_factory=dict)
    overlay_sections: int = 4


@dataclass(frozen=True, slots=True)
class AlignResult:
    """What happened to one experiment."""

    dataset_id: str
    status: str  # done, skipped or failed
    sections: int
    registered: int = 0
    passed_through: tuple[dict[str, Any], ...] = ()
    #: Mean NCC and MI over the registered sections, before and after.
    similarity: Mapping[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    error: str = ""


def settings_digest(settings: Mapping[str, Any]) -> str:
    """sha256 of a settings record (canonical JSON)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def output_paths(root: str, dataset_id: str) -> dict[str, str]:
    """Where one experiment's outputs go under ``root``."""
    return {
        "npy": f"{root}/{dataset_id}.npy",
        "json": f"{root}/{dataset_id}.json",
        "transforms": f"{root}/transforms/{dataset_id}.npy",
        "overlay": f"{root}/overlays/{dataset_id}.png",
    }


def read_marker(fs: fsspec.AbstractFileSystem, root: str, dataset_id: str) -> dict[str, Any] | None:
    """The ``alignment`` record of a completely written experiment, else None."""
    paths = output_paths(root, dataset_id)
    try:
        record = json.loads(fs.cat_file(paths["json"]))
        alignment = record["alignment"]
        complete = (
            alignment["format"] == FORMAT
            and fs.size(paths["npy"]) == alignment["npy_bytes"]
            and fs.size(paths["transforms"]) == alignment["transforms_bytes"]
        )
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None
    return alignment if complete else None


def mean_similarity(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean NCC and MI before and after over the registered sections' records."""
    done = [r for r in records if r["status"] == REGISTERED]
    if not done:
        return {}
    return {
        when: {m: round(float(np.mean([r[when][m] for r in done])), 6) for m in ("ncc", "mi")}
        for when in ("before", "after")
    }


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _read_inputs(ds: Dataset) -> tuple[bytes, bytes]:
    """The experiment's ``.npy`` and ``.json`` bytes."""
    opts = dict(ds.storage_options)
    with fsspec.open(ds.images_url, "rb", **opts) as f:
        npy = f.read()
    with fsspec.open(ds.metadata_url, "rb", **opts) as f:
        meta = f.read()
    return npy, meta


class AlignWorker:
    """Aligns experiments one call at a time; a plain class, wrapped by Ray at run time."""

    def __init__(self, spec: AlignSpec) -> None:
        """Fix ANTs' seed and thread count for this process; open the output store."""
        make_deterministic(spec.registration.seed)
        self.spec = spec
        self.params = ants_params(spec.registration.params)
        self.fs, root = fsspec.core.url_to_fs(spec.output_root, **dict(spec.output_storage_options))
        self.root = root.rstrip("/")

    def run(self, batch: list[Dataset]) -> list[AlignResult]:
        """Align each experiment of ``batch``; report every one, never raise."""
        return [self.run_one(ds) for ds in batch]

    def run_one(self, ds: Dataset) -> AlignResult:
        """Align one experiment, or report why it failed."""
        start = time.monotonic()
        try:
            result = self.align(ds)
        except Exception as exc:  # report, never hide: the driver counts failures
            log.exception("experiment %s failed", ds.id)
            result = AlignResult(ds.id, FAILED, len(ds.section_numbers), error=f"{type(exc).__name__}: {exc}")
        return replace(result, seconds=round(time.monotonic() - start, 3))

    def align(self, ds: Dataset) -> AlignResult:
        """Skip ``ds`` if its marker matches its inputs and the settings; else align it."""
        npy, meta = _read_inputs(ds)
        inputs = {"npy_sha256": hashlib.sha256(npy).hexdigest(),
                  "json_sha256": hashlib.sha256(meta).hexdigest()}
        settings = settings_digest(self.spec.settings)
        marker = read_marker(self.fs, self.root, ds.id)
        if marker and marker.get("inputs") == inputs and marker.get("settings_sha256") == settings:
            return _result(ds.id, SKIPPED, marker["sections"], marker.get("similarity", {}))
        images = np.load(io.BytesIO(npy), allow_pickle=False)
        expected = (len(ds.section_numbers), *ds.image_shape) + ((3,) if ds.channels == 3 else ())
        if images.shape != expected or images.dtype.name != ds.dtype:
            raise DatasetError(
                f"{ds.images_url}: changed while the job ran ({images.shape} {images.dtype}, "
                f"validated as {expected} {ds.dtype}). Fix: rerun once the file is final."
            )
        sections = images[..., None] if ds.channels == 1 else images
        sections = np.moveaxis(sections, -1, 1)  # (n, C, H, W)
        results = self._register(ds, sections)
        aligned = np.moveaxis(np.stack([r.aligned for r in results]), 1, -1)
        aligned = aligned[..., 0] if ds.channels == 1 else aligned
        records = [{"section": s, **r.record} for s, r in zip(ds.section_numbers, results)]
        overlay = self._overlay(ds, sections, results)
        self._write(ds, json.loads(meta), aligned, results, records, inputs, settings, overlay)
        return _result(ds.id, DONE, records, mean_similarity(records))

    def _register(self, ds: Dataset, sections: np.ndarray) -> list[SectionResult]:
        """Every section registered to its Nissl slice (or passed through)."""
        reg, ref = self.spec.registration, self.spec.reference
        inside = [s for s in ds.section_numbers if 0 <= s < ds.n_slices]
        slices: list[np.ndarray] = list(read_reference_slices(ref, ds.axis_index, inside)) if inside else []
        nissl = {s: to_gray(plane, ref.peak) for s, plane in zip(inside, slices)}
        return [
            align_section(section, ds.peak, nissl.get(s), reg.transform, self.params,
                          reg.fill, reg.contrast)
            for s, section in zip(ds.section_numbers, sections)
        ]

    def _write(
        self,
        ds: Dataset,
        metadata: dict[str, Any],
        aligned: np.ndarray,
        results: list[SectionResult],
        records: list[dict[str, Any]],
        inputs: dict[str, str],
        settings: str,
        overlay: bytes | None,
    ) -> None:
        """Write transforms, images, picture, then the marker; each file atomically.

        A marker left by an earlier run goes first: until the new one is written, the
        experiment reads as incomplete, never as the old one over new images.
        """
        paths = output_paths(self.root, ds.id)
        if self.fs.exists(paths["json"]):
            self.fs.rm(paths["json"])
        for folder in ("transforms", "overlays"):
            self.fs.makedirs(f"{self.root}/{folder}", exist_ok=True)
        transforms = _npy_bytes(np.stack([r.field for r in results]))
        images = _npy_bytes(aligned)
        write_atomic(self.fs, paths["transforms"], transforms)
        write_atomic(self.fs, paths["npy"], images)
        if overlay is not None:
            write_atomic(self.fs, paths["overlay"], overlay)
        metadata["alignment"] = {
            "format": FORMAT,
            "inputs": inputs,
            "source": ds.images_url,
            "settings_sha256": settings,
            "settings": dict(self.spec.settings),
            "sections": records,
            "similarity": mean_similarity(records),
            "transforms": f"transforms/{ds.id}.npy",
            "npy_bytes": len(images),
            "transforms_bytes": len(transforms),
        }
        if "npy_bytes" in metadata:  # the download job's completeness field
            metadata["npy_bytes"] = len(images)
        write_atomic(self.fs, paths["json"], json.dumps(metadata, indent=1).encode())

    def _overlay(
        self, ds: Dataset, sections: np.ndarray, results: list[SectionResult]
    ) -> bytes | None:
        """The experiment's picture over a few registered sections spread along it."""
        n = self.spec.overlay_sections
        done = [i for i, r in enumerate(results) if r.nissl is not None]
        if not n or not done:
            return None
        picks = sorted({done[round(k)] for k in np.linspace(0, len(done) - 1, min(n, len(done)))})
        rows = []
        for i in picks:
            r, s = results[i], ds.section_numbers[i]
            assert r.nissl is not None and r.before is not None and r.after is not None
            b, a = r.record["before"]["ncc"], r.record["after"]["ncc"]
            rows.append(OverlayRow(
                image=sections[i], peak=ds.peak, nissl=r.nissl, before=r.before, after=r.after,
                label=f"{ds.id} section {s}: NCC {b:.3f} -> {a:.3f}",
            ))
        return overlay_png(rows)


def _result(dataset_id: str, status: str, records: list[dict[str, Any]],
            similarity: Mapping[str, Any]) -> AlignResult:
    """The result row of an experiment from its per-section records."""
    return AlignResult(
        dataset_id, status, len(records),
        registered=sum(r["status"] == REGISTERED for r in records),
        passed_through=tuple({"section": r["section"], "reason": r.get("reason", "")}
                             for r in records if r["status"] == PASSED_THROUGH),
        similarity=similarity,
    )


def failed_result(ds: Dataset, error: str) -> AlignResult:
    """The result of an experiment whose worker died."""
    return AlignResult(ds.id, FAILED, len(ds.section_numbers), error=error)
