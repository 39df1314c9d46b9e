"""The align job: every section of every experiment registered to its Nissl slice.

::

    datasets (npy+json, any URL) ──> validated on the driver (headers only); sections
                                     beyond the reference are allowed: passed through
    reference (.nrrd or .npy)    ──> a .nrrd is rewritten once as <output>/reference/<stem>.npy
                                     (sha256-bound), so workers read only their slices;
                                     its shape must be every dataset's reference_shape
    output                       ──> an experiment aligned here with other settings is
                                     refused (output.overwrite=true redoes it)
                                 ──> one task per experiment (AlignWorker) on the actor
                                     pool, or in this process (run.serial=true)
                                 ──> progress over sections; align_summary.json;
                                     exit 1 if any experiment failed (rerun to finish)

The predecessor ran the same registration one section after another in one process;
here experiments run side by side, one ITK thread each, so the bytes do not depend on
how many workers ran them.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from importlib.metadata import version
from typing import Any

import fsspec
import numpy as np
from tqdm import tqdm

from atlinter_ray.align.config import ANTS_TRANSFORMS, AlignConfig, ants_params, check_config
from atlinter_ray.align.worker import (
    DONE,
    FAILED,
    SKIPPED,
    AlignResult,
    AlignSpec,
    AlignWorker,
    failed_result,
    read_marker,
    settings_digest,
)
from atlinter_ray.config import ResourcesConfig
from atlinter_ray.dataset import Dataset, field_error
from atlinter_ray.errors import DatasetNotFoundError, StoreError
from atlinter_ray.execution import map_batches
from atlinter_ray.files import file_sha256, write_atomic
from atlinter_ray.inputs import load_datasets
from atlinter_ray.nrrd_volume import read_nrrd_info
from atlinter_ray.reference import (
    ReferenceVolume,
    cache_nrrd_as_npy,
    iter_plane_blocks,
    load_reference,
)
from atlinter_ray.secrets import redact

log = logging.getLogger(__name__)

FIELD = "reference"
SUMMARY = "align_summary.json"


@dataclass(frozen=True, slots=True)
class AlignSummary:
    """What an align run did, for people (printed) and machines (``align_summary.json``)."""

    results: tuple[AlignResult, ...]
    reference: dict[str, Any]
    wall_seconds: float
    outputs: dict[str, str] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when no experiment failed."""
        return not any(r.status == FAILED for r in self.results)

    def count(self, status: str) -> int:
        """Experiments with ``status``."""
        return sum(r.status == status for r in self.results)

    @property
    def sections_per_second(self) -> float:
        """Sections registered per second of wall time."""
        done = sum(r.registered for r in self.results if r.status == DONE)
        return round(done / self.wall_seconds, 4) if self.wall_seconds else 0.0

    def to_text(self) -> str:
        """A short human-readable report."""
        lines = [
            f"experiments: {len(self.results)} (aligned {self.count(DONE)}, already aligned "
            f"{self.count(SKIPPED)}, failed {self.count(FAILED)}); "
            f"{self.sections_per_second:.2f} sections/s over {self.wall_seconds:.1f} s",
        ]
        for r in self.results:
            sim = r.similarity
            if r.status == FAILED:
                lines.append(f"FAILED {r.dataset_id}: {r.error}")
                continue
            line = f"{r.dataset_id}: {r.status}, {r.registered}/{r.sections} sections registered"
            if sim:
                line += (f", NCC {sim['before']['ncc']:.3f} -> {sim['after']['ncc']:.3f}, "
                         f"MI {sim['before']['mi']:.3f} -> {sim['after']['mi']:.3f}")
            lines.append(line)
            lines += [f"  section {p['section']} passed through: {p['reason']}"
                      for p in r.passed_through]
        lines += [f"output {k}: {v}" for k, v in self.outputs.items()]
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        """Plain JSON-able data."""
        return {
            "experiments": [asdict(r) for r in self.results],
            "aligned": self.count(DONE),
            "skipped": self.count(SKIPPED),
            "failed": self.count(FAILED),
            "sections_per_second": self.sections_per_second,
            "wall_seconds": self.wall_seconds,
            "reference": self.reference,
            "outputs": self.outputs,
            "config": self.config,
        }


def _join(root: str, name: str) -> str:
    return f"{root.rstrip('/')}/{name}"


def prepare_reference(cfg: AlignConfig, datasets: list[Dataset]) -> tuple[ReferenceVolume, dict[str, Any]]:
    """The validated Nissl volume (a ``.nrrd`` rewritten once as ``.npy``) and its record.

    Headers are checked against every dataset before the volume is read whole (to hash
    it and, for a ``.nrrd``, to rewrite it).
    """
    url = cfg.reference
    assert url is not None  # check_config
    opts = dict(cfg.data.storage_options)
    if not url.endswith(".nrrd"):
        ref = load_reference(url, datasets, opts, setting=FIELD)
        record: dict[str, Any] = {"url": url, "sha256": _sha256(url, opts)}
    else:
        try:
            info = read_nrrd_info(url, opts)
        except DatasetNotFoundError as exc:
            raise _missing(url) from exc
        for ds in datasets:
            if info.shape not in (ds.reference_shape, (*ds.reference_shape, 3)):
                raise _shape_error(url, info.shape, ds)
        sha = _sha256(url, opts)
        stem = url.rstrip("/").rsplit("/", 1)[-1][: -len(".nrrd")]
        npy_url = _join(cfg.output.root, f"reference/{stem}.npy")
        npy_opts = dict(cfg.output.storage_options)
        cache_nrrd_as_npy(url, opts, sha, npy_url, npy_opts)
        ref = load_reference(npy_url, datasets, npy_opts, setting=FIELD)
        record = {"url": url, "sha256": sha, "npy": npy_url}
    ref = replace(ref, peak=volume_peak(ref))
    record.update(shape=list(ref.shape), dtype=ref.dtype, peak=ref.peak)
    return ref, record


def volume_peak(ref: ReferenceVolume) -> float:
    """The Nissl's own maximum, what the predecessor divides the volume by (1.0 if blank).

    Not the dtype's maximum: a uint8 Nissl peaking at 130 divided by 255 registers to
    transforms up to half a pixel away from the predecessor's. Float volumes were scanned
    by :func:`load_reference` already; integer ones are read here, a block of planes at a time.
    """
    if np.dtype(ref.dtype).kind != "u":
        return ref.peak
    top = max(int(block.max()) for block in iter_plane_blocks(ref))
    return float(top) if top > 0 else 1.0


def _sha256(url: str, opts: dict[str, Any]) -> str:
    try:
        return file_sha256(url, opts)
    except DatasetNotFoundError as exc:
        raise _missing(url) from exc


def _missing(url: str) -> DatasetNotFoundError:
    return DatasetNotFoundError(
        f"{url}: field {FIELD!r}: Nissl volume not found. Fix: give the path or URL of the "
        "Nissl .nrrd or .npy (read with data.storage_options); atlinter-ray-download "
        "nissl=true fetches Allen's ara_nissl_25.nrrd"
    )


def _shape_error(url: str, shape: tuple[int, ...], ds: Dataset) -> Exception:
    return field_error(
        url, FIELD, f"volume shape {shape} does not match dataset {ds.id}'s reference shape "
        f"{ds.reference_shape}",
        f"give the Nissl volume of the datasets' reference space, shape {ds.reference_shape} "
        "(the 25 um CCF: ara_nissl_25.nrrd), or set data.reference_shape",
    )


def settings_record(cfg: AlignConfig, reference_sha256: str) -> dict[str, Any]:
    """Everything an aligned experiment's bytes depend on besides its own input files."""
    reg = cfg.registration
    return {
        "transform": reg.transform.value,
        "ants_type_of_transform": ANTS_TRANSFORMS[reg.transform],
        "params": {k: list(v) if isinstance(v, tuple) else v
                   for k, v in sorted(ants_params(reg.params).items())},
        "seed": reg.seed,
        "fill": reg.fill.value,
        "contrast": reg.contrast.value,
        "itk_threads": 1,
        "nissl_scale": "volume maximum",
        "antspyx": version("antspyx"),
        "reference_sha256": reference_sha256,
    }


def check_markers(cfg: AlignConfig, datasets: list[Dataset], settings: str) -> None:
    """Refuse to redo experiments this output holds from other settings (unless overwrite)."""
    if cfg.output.overwrite:
        return
    fs, root = fsspec.core.url_to_fs(cfg.output.root, **dict(cfg.output.storage_options))
    conflicts = []
    for ds in datasets:
        marker = read_marker(fs, root.rstrip("/"), ds.id)
        if marker is not None and marker.get("settings_sha256") != settings:
            conflicts.append(f"{ds.id} ({_differences(marker.get('settings', {}), cfg)})")
    if conflicts:
        raise StoreError(
            f"{cfg.output.root} holds experiments aligned with other settings: "
            f"{', '.join(conflicts)}. Fix: use another output.root, or output.overwrite=true "
            "to align them again with these settings"
        )


def _differences(theirs: dict[str, Any], cfg: AlignConfig) -> str:
    """Which settings of a marker differ from this run's (reference hash aside)."""
    ours = settings_record(cfg, theirs.get("reference_sha256", ""))
    keys = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
    return "differs in " + ", ".join(keys) if keys else "another reference volume"


def worker_resources(resources: ResourcesConfig) -> ResourcesConfig:
    """One CPU and no GPU per align actor: ANTs runs on one ITK thread and never on a GPU.

    ``resources=gpu_cluster`` would otherwise hold a GPU (and 4 CPUs) per idle-waiting actor.
    """
    if resources.gpus_per_worker or resources.cpus_per_worker != 1:
        log.info("align workers ask for 1 CPU and no GPU each (resources.cpus_per_worker=%s, "
                 "gpus_per_worker=%s do not apply)", resources.cpus_per_worker,
                 resources.gpus_per_worker)
    return replace(resources, cpus_per_worker=1, gpus_per_worker=0)


def run_align(cfg: AlignConfig) -> AlignSummary:
    """Validate everything, align every experiment not yet aligned, write the summary."""
    start = time.perf_counter()
    check_config(cfg)
    datasets = load_datasets(cfg.data, outside_ok=True)
    reference, ref_record = prepare_reference(cfg, datasets)
    settings = settings_record(cfg, ref_record["sha256"])
    check_markers(cfg, datasets, settings_digest(settings))
    spec = AlignSpec(
        registration=cfg.registration, reference=reference, settings=settings,
        output_root=cfg.output.root, output_storage_options=dict(cfg.output.storage_options),
        overlay_sections=cfg.output.overlay_sections,
    )
    total = sum(len(ds.section_numbers) for ds in datasets)
    log.info("aligning %d experiments (%d sections) to %s", len(datasets), total, cfg.reference)
    by_id = {ds.id: ds for ds in datasets}
    results: list[AlignResult] = []
    with tqdm(total=total, unit="section", desc="align", disable=not cfg.run.progress) as bar:
        for result in map_batches(datasets, AlignWorker, spec, worker_resources(cfg.resources),
                                  failed_result, cfg.run.serial):
            results.append(result)
            bar.update(len(by_id[result.dataset_id].section_numbers))
    results.sort(key=lambda r: r.dataset_id)
    fs, root = fsspec.core.url_to_fs(cfg.output.root, **dict(cfg.output.storage_options))
    fs.makedirs(root, exist_ok=True)
    outputs = {"summary": _join(cfg.output.root, SUMMARY)}
    summary = AlignSummary(
        results=tuple(results), reference=ref_record,
        wall_seconds=round(time.perf_counter() - start, 3), outputs=outputs,
        config=redact(asdict(cfg)),
    )
    write_atomic(fs, _join(root, SUMMARY), json.dumps(summary.to_json(), indent=1, default=str).encode())
    return summary
