"""The download job: Allen ISH experiments -> ``<experiment>.npy`` + ``<experiment>.json``.

::

    genes, planes ──> plan (driver, before any image download):
                        every gene must exist  ── else UnknownGeneError, nothing written
                        list experiments, skip those already complete in the store
                  ──> one task per experiment (Ray actor pool, or in-process):
                        list section images + transforms ── MissingTransformError
                        download images (threads, rate-limited, retried)
                        warp each into the 25 µm reference plane, sort by slice
                        write <id>.npy aside -> move; then <id>.json aside -> move
                  ──> summary; failed experiments raise DownloadError at the end
    nissl=true    ──> the Nissl volume (``nissl_url``, Allen's ara_nissl_25.nrrd) into the
                      same output, as shipped, checked readable, once (for the align job)

The ``.json`` is written last and is the completion marker: an experiment is complete
when its ``.json`` parses and records the byte size of an existing ``.npy``. Every file is
written under a temporary name and then moved, so a crash leaves at most a stray
temporary file, never a half file that looks complete; a rerun redoes the experiment.

Concurrency: ``concurrency`` actors, each with ``image_threads`` download threads. The
request rate limit is global: each actor gets ``max_requests_per_second / concurrency``.
Actors are I/O bound and ask Ray for ``worker_cpus`` (a fraction of a CPU) each.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

import fsspec
import numpy as np

from atlinter_ray.allen.client import AllenClient, UnknownGeneError
from atlinter_ray.allen.config import DownloadConfig
from atlinter_ray.allen.geometry import (
    VOXEL_UM,
    SectionPoint,
    affine_2d,
    affine_3d,
    get_plane,
    plane_to_image,
    section_coordinate,
    section_point,
    slice_index,
    warp_to_reference,
)
from atlinter_ray.dataset import CCF_25UM_SHAPE
from atlinter_ray.errors import AtlinterRayError, DatasetError, StoreError
from atlinter_ray.files import write_atomic
from atlinter_ray.interrupts import keep_handlers
from atlinter_ray.nrrd_volume import read_nrrd
from atlinter_ray.pool import PoolSpec, map_unordered

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")

#: Written into every ``.json`` so readers can tell our files apart.
FORMAT = "atlinter_ray.download/1"
NISSL_FORMAT = "atlinter_ray.download.nissl/1"


class DownloadError(AtlinterRayError, RuntimeError):
    """One or more experiments failed to download; the others were written."""

    exit_status = 1

    def __init__(self, message: str, failures: dict[int, str]) -> None:
        """Keep the per-experiment failure messages in ``failures``."""
        super().__init__(message)
        self.failures = failures


def allen_client(config: DownloadConfig, share: int = 1) -> AllenClient:
    """An API client holding ``1/share`` of the global request rate."""
    return AllenClient(
        config.api_url,
        max_requests_per_second=config.max_requests_per_second / share,
        retries=config.retries,
        backoff_s=config.backoff_s,
        timeout_s=config.timeout_s,
        page_size=config.page_size,
    )


@dataclass(frozen=True, slots=True)
class Experiment:
    """One ISH experiment (Allen SectionDataSet) to download."""

    experiment_id: int
    gene: str
    plane: str
    section_thickness: float
    reference_space_id: int | None
    alignment3d: Mapping[str, Any] | None


@dataclass(frozen=True, slots=True)
class ExperimentResult:
    """What happened to one experiment."""

    experiment_id: int
    gene: str
    plane: str
    status: str  # "done" or "failed"
    n_sections: int = 0
    error: str = ""
    seconds: float = 0.0


@dataclass(frozen=True, slots=True)
class DownloadSummary:
    """The outcome of a run."""

    planned: tuple[int, ...]
    skipped: tuple[int, ...]
    results: tuple[ExperimentResult, ...]
    genes_without_experiments: tuple[tuple[str, str], ...]
    #: The Nissl volume's record (``file``, ``sha256``, ``shape``, ``status``), if asked for.
    nissl: Mapping[str, Any] | None = None
    #: Where the experiments were written (the job's ``output``).
    output: str = ""

    def describe(self) -> str:
        """A few human-readable lines."""
        done = [r for r in self.results if r.status == "done"]
        failed = [r for r in self.results if r.status == "failed"]
        lines = [
            f"experiments: {len(self.planned)} planned, {len(self.skipped)} already complete, "
            f"{len(done)} downloaded, {len(failed)} failed"
        ]
        if self.nissl is not None:
            lines.append(f"  Nissl volume {self.nissl['file']} {tuple(self.nissl['shape'])}: "
                         f"{'already there' if self.nissl['status'] == 'skipped' else 'downloaded'}")
        lines += [
            f"  no {plane} experiment for gene {gene}"
            for gene, plane in self.genes_without_experiments
        ]
        lines += [f"  failed {r.experiment_id} ({r.gene}, {r.plane}): {r.error}" for r in failed]
        if self.output:
            lines += [f"wrote {r.experiment_id} ({r.gene}, {r.plane}): "
                      f"{self.output.rstrip('/')}/{r.experiment_id}.npy + .json" for r in done]
        return "\n".join(lines)


# ------------------------------------------------------------------------------ store


def open_store(
    output: str, storage_options: Mapping[str, Any]
) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and root path of ``output`` (created if missing)."""
    fs, root = fsspec.core.url_to_fs(output, **dict(storage_options))
    root = root.rstrip("/")
    fs.makedirs(root, exist_ok=True)
    return fs, root


def experiment_paths(root: str, experiment_id: int) -> tuple[str, str]:
    """The ``.npy`` and ``.json`` paths of one experiment."""
    return f"{root}/{experiment_id}.npy", f"{root}/{experiment_id}.json"


def read_complete_metadata(
    fs: fsspec.AbstractFileSystem, root: str, experiment_id: int
) -> dict[str, Any] | None:
    """The experiment's metadata if it is completely written, else None."""
    npy, meta = experiment_paths(root, experiment_id)
    try:
        record = json.loads(fs.cat_file(meta))
        size = fs.size(npy)
    except (FileNotFoundError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("npy_bytes") != size:
        return None
    return record


def check_not_conflicting(
    record: Mapping[str, Any], experiment: Experiment, config: DownloadConfig, where: str
) -> None:
    """Raise StoreError if a complete experiment was made with other settings."""
    theirs = (record.get("downsample"), record.get("axis"), record.get("section_point", "top_left"))
    ours = (config.downsample, experiment.plane, str(config.section_point))
    if theirs != ours:
        raise StoreError(
            f"{where} holds experiment {experiment.experiment_id} downloaded with "
            f"downsample/axis/section_point {theirs}, but this run asks for {ours}; use another `output` "
            "or delete that experiment's .npy and .json"
        )


# --------------------------------------------------------------------------- planning


def plan(
    client: AllenClient, config: DownloadConfig
) -> tuple[list[Experiment], list[tuple[str, str]]]:
    """Check every gene, then list its experiments per plane (no image is downloaded here)."""
    unknown = [gene for gene in config.genes if not client.gene_exists(gene)]
    if unknown:
        hints = []
        for gene in unknown:
            similar = client.similar_genes(gene)
            hints.append(
                f"{gene!r}"
                + (f" (did you mean {', '.join(map(repr, similar))}?)" if similar else "")
            )
        raise UnknownGeneError(
            f"unknown gene(s) {', '.join(hints)} at {config.api_url}: not a gene of the Allen "
            "Mouse Brain Atlas; check the symbol (official MGI symbol, case-sensitive) in `genes`"
        )
    experiments: dict[int, Experiment] = {}
    empty: list[tuple[str, str]] = []
    for gene in config.genes:
        for plane in config.planes:
            rows = client.experiments(gene, plane)
            if not rows:
                empty.append((gene, plane))
            for row in rows:
                eid = int(row["id"])
                experiments.setdefault(
                    eid,
                    Experiment(
                        experiment_id=eid,
                        gene=gene,
                        plane=plane,
                        # every P56 ISH experiment is cut at 25 µm; the API states it
                        section_thickness=float(row.get("section_thickness") or 25.0),
                        reference_space_id=row.get("reference_space_id"),
                        alignment3d=row.get("alignment3d"),
                    ),
                )
    return sorted(experiments.values(), key=lambda e: e.experiment_id), empty


# ------------------------------------------------------------------------- experiment


def select_sections(
    sections: list[tuple[float, int, T]], n_slices: int, plane: str
) -> tuple[list[tuple[float, int, T]], list[dict[str, Any]]]:
    """Keep one section per reference slice inside the volume; say why the others went.

    ``sections`` are ``(coordinate_um, image_id, anything)`` sorted by coordinate. Of two
    sections in one slice, the one nearest the slice centre stays (then the lower id):
    the dataset loader accepts one image per slice.
    """
    best: dict[int, tuple[float, int, T]] = {}
    dropped: list[dict[str, Any]] = []
    for item in sections:
        coord, image_id, _ = item
        index = slice_index(coord)
        if not 0 <= index < n_slices:
            dropped.append(
                {
                    "image_id": image_id,
                    "slice": index,
                    "reason": f"outside the {n_slices} {plane} slices",
                }
            )
            continue
        key = (abs(coord - (index + 0.5) * VOXEL_UM), image_id)
        kept = best.get(index)
        if kept is None or key < (abs(kept[0] - (index + 0.5) * VOXEL_UM), kept[1]):
            if kept is not None:
                dropped.append({"image_id": kept[1], "slice": index, "reason": "duplicate slice"})
            best[index] = item
        else:
            dropped.append({"image_id": image_id, "slice": index, "reason": "duplicate slice"})
    return [best[k] for k in sorted(best)], sorted(dropped, key=lambda d: d["image_id"])


@dataclass(frozen=True, slots=True)
class SectionImage:
    """One section image's place in its experiment: id, section number, 2D transforms."""

    image_id: int
    section_number: float
    tsv: np.ndarray
    tvs: np.ndarray


def _in_parallel(fn: Callable[[T], R], items: list[T], threads: int) -> list[R]:
    """``fn`` over ``items`` on ``threads`` threads, in order; the first failure cancels the rest."""
    with ThreadPoolExecutor(max_workers=threads) as pool:
        futures = [pool.submit(fn, item) for item in items]
        try:
            return [f.result() for f in futures]
        except BaseException:  # one image failed for good: do not download the rest
            for f in futures:
                f.cancel()
            raise


def download_experiment(
    client: AllenClient,
    fs: fsspec.AbstractFileSystem,
    root: str,
    experiment: Experiment,
    config: DownloadConfig,
) -> int:
    """Download, align and write one experiment; return its number of sections.

    With ``section_point=top_left`` (the predecessor's rule) every section is placed from
    its transforms alone, so only the sections kept are downloaded; the other rules need
    each image to place it, so every section image is downloaded, placed, warped, and
    only then are duplicates and sections outside the volume dropped.
    """
    eid = experiment.experiment_id
    plane = get_plane(experiment.plane)
    where = f"experiment {eid} (gene {experiment.gene}, {plane.name})"
    trv = affine_3d(experiment.alignment3d, "trv", where)
    tvr = affine_3d(experiment.alignment3d, "tvr", where)
    rows = client.section_images(eid)
    if not rows:
        raise DatasetError(f"{where} has no section images in the Allen API; drop it from the run")
    images = []  # every transform checked before downloading
    for row in sorted(rows, key=lambda r: int(r["id"])):
        image_where = f"{where}, section image {row['id']}"
        tsv = affine_2d(row.get("alignment2d"), "tsv", image_where)
        tvs = affine_2d(row.get("alignment2d"), "tvs", image_where)
        if row.get("section_number") is None:
            raise DatasetError(
                f"{image_where} has no section_number in the Allen API; drop this experiment"
            )
        images.append(SectionImage(int(row["id"]), float(row["section_number"]), tsv, tvs))

    def coordinate(image: SectionImage, xy: tuple[float, float]) -> float:
        """Reference coordinate along the normal of the image's full-resolution pixel ``xy``."""
        return section_coordinate(image.tsv, tvr, image.section_number,
                                  experiment.section_thickness, plane.name, xy)

    def warp(image: SectionImage, coord: float, pixels: np.ndarray) -> np.ndarray:
        """The downloaded section sampled on the reference plane at ``coord``."""
        matrix = plane_to_image(plane.name, coord, trv, image.tvs, config.downsample)
        return warp_to_reference(pixels, matrix, plane.shape)

    def download(image: SectionImage) -> np.ndarray:
        """The section image at ``config.downsample``."""
        return client.section_image(image.image_id, config.downsample)

    if config.section_point == SectionPoint.top_left:
        by_transform = [(coordinate(i, (0.0, 0.0)), i.image_id, i) for i in images]
        chosen, dropped = select_sections(sorted(by_transform, key=lambda s: s[:2]),
                                          plane.n_slices, plane.name)
        warped = _in_parallel(lambda item: warp(item[2], item[0], download(item[2])),
                              chosen, config.image_threads)
        inside = [(coord, image_id) for coord, image_id, _ in chosen]
    else:
        def place(image: SectionImage) -> tuple[float, int, np.ndarray]:
            pixels = download(image)
            point = section_point(pixels, config.section_point, config.downsample)
            coord = coordinate(image, point)
            return coord, image.image_id, warp(image, coord, pixels)

        by_image = _in_parallel(place, images, config.image_threads)
        kept, dropped = select_sections(sorted(by_image, key=lambda s: s[:2]),
                                        plane.n_slices, plane.name)
        warped = [pixels for _, _, pixels in kept]
        inside = [(coord, image_id) for coord, image_id, _ in kept]
    if not inside:
        raise DatasetError(
            f"{where}: all {len(images)} sections fall outside the {plane.n_slices} reference "
            "slices; its transforms look wrong, drop it from the run"
        )
    ndims = {w.ndim for w in warped}
    if len(ndims) != 1:
        raise DatasetError(f"{where}: sections mix grayscale and colour images; cannot stack them")
    volume = np.stack(warped).astype(np.uint8, copy=False)

    buffer = io.BytesIO()
    np.save(buffer, volume, allow_pickle=False)
    npy_bytes = buffer.getvalue()
    npy_path, json_path = experiment_paths(root, eid)
    metadata = {
        "section_numbers": [slice_index(s[0]) for s in inside],
        "axis": plane.name,
        "image_ids": [s[1] for s in inside],
        "image_shape": list(volume.shape[1:]),
        "gene": experiment.gene,
        "experiment_id": eid,
        "plane": plane.name,
        "downsample": config.downsample,
        "section_point": str(config.section_point),
        "section_coordinates_um": [round(s[0], 4) for s in inside],
        "dropped_sections": dropped,
        "reference_shape": list(CCF_25UM_SHAPE),
        "section_thickness_um": experiment.section_thickness,
        "reference_space_id": experiment.reference_space_id,
        "source": f"{client.api_url} (Allen Mouse Brain Atlas ISH)",
        "npy_bytes": len(npy_bytes),
        "format": FORMAT,
    }
    write_atomic(fs, npy_path, npy_bytes)
    write_atomic(fs, json_path, json.dumps(metadata, indent=1).encode())
    return len(inside)


class ExperimentWorker:
    """Downloads experiments one call at a time; a plain class, wrapped by Ray at run time."""

    def __init__(self, config: DownloadConfig, rate_share: int = 1) -> None:
        """Open the API client (with its share of the rate limit) and the store."""
        self.config = config
        self.client = allen_client(config, share=rate_share)
        self.fs, self.root = open_store(config.output, config.storage_options)

    def run(self, experiment: Experiment) -> ExperimentResult:
        """Download one experiment; report success or failure, never raise."""
        start = time.monotonic()
        status, n, error = "failed", 0, ""
        try:
            n = download_experiment(self.client, self.fs, self.root, experiment, self.config)
            status = "done"
        except Exception as exc:  # noqa: BLE001  (reported to the driver, which raises DownloadError)
            error = f"{type(exc).__name__}: {exc}"
        finally:
            result = ExperimentResult(
                experiment.experiment_id,
                experiment.gene,
                experiment.plane,
                status,
                n,
                error,
                round(time.monotonic() - start, 3),
            )
        log.info(
            "experiment %s: %s%s", experiment.experiment_id, status, f" ({error})" if error else ""
        )
        return result


def download_nissl(
    client: AllenClient, fs: fsspec.AbstractFileSystem, root: str, url: str
) -> dict[str, Any]:
    """Fetch the Nissl volume at ``url`` into ``root``, as shipped, unless already there.

    The file is complete when ``<name>.json`` beside it records its source, sha256 and byte
    size; the bytes are checked to be a whole, readable 3-D NRRD volume before either file
    is written.
    """
    name = url.rstrip("/").rsplit("/", 1)[-1]
    path, marker = f"{root}/{name}", f"{root}/{name}.json"
    try:
        record = json.loads(fs.cat_file(marker))
        if record.get("source") == url and fs.size(path) == record.get("bytes"):
            return {**record, "status": "skipped"}
    except (FileNotFoundError, ValueError, AttributeError):
        pass
    data = client.get(url)
    volume = read_nrrd(data, url)
    if volume.ndim != 3:
        raise DatasetError(
            f"{url}: a {volume.ndim}-D NRRD file, not a volume. Fix: set nissl_url to the "
            "3-D Nissl volume (Allen's ara_nissl_25.nrrd)"
        )
    record = {
        "source": url,
        "file": name,
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "shape": list(volume.shape),
        "dtype": volume.dtype.name,
        "format": NISSL_FORMAT,
    }
    write_atomic(fs, path, data)
    write_atomic(fs, marker, json.dumps(record, indent=1).encode())
    return {**record, "status": "done"}


# ---------------------------------------------------------------------------- driver


def _run_on_ray(config: DownloadConfig, todo: list[Experiment]) -> list[ExperimentResult]:
    """Run ``todo`` on a pool of download actors, at most ``concurrency`` at once."""
    import ray

    if not ray.is_initialized():
        with keep_handlers():
            ray.init()
    spec = PoolSpec(min_workers=1, max_workers=config.concurrency, num_cpus=config.worker_cpus)
    return list(map_unordered(
        ExperimentWorker, (config, config.concurrency), todo, spec,
        lambda exp, error: ExperimentResult(
            exp.experiment_id, exp.gene, exp.plane, "failed", error=error
        ),
    ))


def run_download(config: DownloadConfig) -> DownloadSummary:
    """Plan, skip complete experiments, download the rest; raise DownloadError on failures."""
    client = allen_client(config)
    try:
        experiments, empty = plan(client, config)
        # created only once the API answered: an offline run leaves no empty folder
        fs, root = open_store(config.output, config.storage_options)
        nissl = download_nissl(client, fs, root, config.nissl_url) if config.nissl else None
    finally:
        client.close()
    todo, skipped = [], []
    for exp in experiments:
        record = read_complete_metadata(fs, root, exp.experiment_id)
        if record is None:
            todo.append(exp)
        else:
            check_not_conflicting(record, exp, config, config.output)
            skipped.append(exp.experiment_id)
    log.info(
        "%d experiments planned, %d complete, %d to download",
        len(experiments),
        len(skipped),
        len(todo),
    )
    if not todo:
        results: list[ExperimentResult] = []
    elif config.use_ray:
        results = _run_on_ray(config, todo)
    else:
        worker = ExperimentWorker(config)
        results = [worker.run(exp) for exp in todo]
    results.sort(key=lambda r: r.experiment_id)
    summary = DownloadSummary(
        planned=tuple(e.experiment_id for e in experiments),
        skipped=tuple(skipped),
        results=tuple(results),
        genes_without_experiments=tuple(empty),
        nissl=nissl,
        output=config.output,
    )
    failures = {r.experiment_id: r.error for r in results if r.status != "done"}
    if failures:
        raise DownloadError(
            f"{len(failures)} of {len(todo)} experiment(s) failed (the others are written; "
            "rerun to retry only the failed ones):\n" + summary.describe(),
            failures,
        )
    return summary


def summary_dict(summary: DownloadSummary) -> dict[str, Any]:
    """The summary as plain JSON-able data."""
    return asdict(summary)
