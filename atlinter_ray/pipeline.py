"""The driver: datasets in, whole volumes out.

``run(config)`` validates every dataset, the model (and that it reaches every planned
position: a midpoint-only model with ``placement=exact`` needs
``interpolation.exact_fallback``) and the reference volume of the reference-guided
mode (``interpolation.reference``) before any Ray work, plans the
gap tasks, skips those already marked done, runs the rest (on Ray, or in-process with
``run.serial``), merges provenance, draws quick-looks and returns a
:class:`RunSummary`, which it also writes beside the output.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import fsspec
from tqdm import tqdm

from atlinter_ray import __version__
from atlinter_ray.config import Config, DataConfig, redact
from atlinter_ray.dataset import Dataset, load_dataset
from atlinter_ray.dtypes import output_dtype
from atlinter_ray.engine import build_for_validation, check_reachable, model_context
from atlinter_ray.errors import ConfigError, DatasetNotFoundError
from atlinter_ray.execution import check_resources, connect, run_on_ray, run_serial
from atlinter_ray.models.base import PairInterpolator, is_torch_model
from atlinter_ray.models.reference_guided import reference_estimator
from atlinter_ray.planning import EdgePolicy, GapTask, plan_dataset
from atlinter_ray.quicklook import montage_gaps, montage_png, quicklook_png
from atlinter_ray.reference import ReferenceVolume, load_reference, reference_provenance
from atlinter_ray.store import VolumeStore
from atlinter_ray.tuning import TuneJob, TuneSpec, is_tunable, run_tuning
from atlinter_ray.worker import TaskResult, WorkerSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RunSummary:
    """What a run did, for people (printed) and machines (``run_summary.json``)."""

    datasets: list[str]
    tasks_total: int
    tasks_done: int
    tasks_skipped: int
    tasks_failed: int
    slices_written: int
    wall_seconds: float
    slices_per_second: float
    model_calls: int
    nodes: list[str]
    gpus: list[str]
    outputs: dict[str, str]
    #: Tasks run per worker device and precision (``"cuda:0 (NVIDIA H100) bf16": 812``).
    devices: dict[str, int] = field(default_factory=dict)
    #: Model items recomputed in float32 because their low-precision output was not finite.
    fp32_reruns: int = 0
    failures: list[dict[str, str]] = field(default_factory=list)
    scores: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    #: Dataset id -> the tuning stage's result (choice, scores, seconds, cached).
    tuning: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when no task failed."""
        return self.tasks_failed == 0

    def to_text(self) -> str:
        """A short human-readable report."""
        lines = [
            f"datasets: {len(self.datasets)}  tasks: {self.tasks_total} "
            f"(done {self.tasks_done}, skipped {self.tasks_skipped}, "
            f"failed {self.tasks_failed})",
            f"slices written: {self.slices_written} in {self.wall_seconds:.1f} s "
            f"({self.slices_per_second:.1f} slices/s); model calls: {self.model_calls}",
            f"nodes: {len(self.nodes)}  GPUs: {len(self.gpus)}  devices: "
            + (", ".join(f"{d} ({n} tasks)" for d, n in self.devices.items()) or "-")
            + (f"  fp32 reruns: {self.fp32_reruns}" if self.fp32_reruns else ""),
        ]
        lines += [f"output {k}: {v}" for k, v in self.outputs.items()]
        lines += [
            f"tuned {k}: {'+'.join(r['members'])} curved={r['curved']} in {r['seconds']:.1f} s"
            f"{' (cached)' if r['cached'] else ''}"
            for k, r in self.tuning.items()
        ]
        for ds_id, by_model in self.scores.items():
            for who, sc in by_model.items():
                lines.append(
                    f"{ds_id} vs held-out truth, {who:>6}: PSNR {sc['psnr']:.2f} dB  "
                    f"SSIM {sc['ssim']:.4f}  MAE {sc['mae']:.3f}  ({sc['slices']} slices)"
                )
        lines += [f"FAILED {f['task_id']}: {f['error']}" for f in self.failures]
        return "\n".join(lines)


def dataset_urls(data: DataConfig) -> list[str]:
    """Every dataset URL named by ``data.genes``, ``data.datasets`` and the manifest."""
    urls = list(data.datasets)
    if data.genes:
        if not data.root:
            raise ConfigError(
                "data.genes is set but data.root is not: set data.root to the folder or "
                "URL holding <gene>.npy and <gene>.json"
            )
        urls += [f"{data.root.rstrip('/')}/{g}" for g in data.genes]
    if data.manifest:
        try:
            with fsspec.open(data.manifest, "rt", **data.storage_options) as f:
                lines = [ln.split("#", 1)[0].strip() for ln in f]
        except FileNotFoundError as exc:
            raise DatasetNotFoundError(
                f"{data.manifest}: manifest not found (data.manifest); give a text file "
                "with one dataset path or URL per line"
            ) from exc
        urls += [ln for ln in lines if ln]
    if not urls:
        raise ConfigError(
            "no datasets: set data.genes (with data.root), data.datasets or "
            "data.manifest, or use the bundled sample with data=sample"
        )
    return urls


def _shape3(shape: list[int]) -> tuple[int, int, int]:
    """``data.reference_shape`` as a 3-tuple; ConfigError otherwise."""
    if len(shape) != 3:
        raise ConfigError(
            f"data.reference_shape={list(shape)}: give three sizes (AP, DV, LR), e.g. "
            "[528, 320, 456] for the 25 um CCF"
        )
    return int(shape[0]), int(shape[1]), int(shape[2])


def load_datasets(data: DataConfig, outside_ok: bool = False) -> list[Dataset]:
    """Load and validate every dataset; ids must be unique (they name the outputs).

    ``outside_ok``: accept section numbers beyond the reference (see :func:`load_dataset`).
    """
    datasets = [
        load_dataset(u, _shape3(data.reference_shape), data.storage_options, outside_ok)
        for u in dataset_urls(data)
    ]
    seen: dict[str, str] = {}
    for ds in datasets:
        if ds.id in seen:
            raise ConfigError(
                f"two datasets are both named {ds.id!r} ({seen[ds.id]} and "
                f"{ds.images_url}); outputs are named by dataset, so rename one"
            )
        seen[ds.id] = ds.images_url
    return datasets


def check_reference(
    cfg: Config, model: PairInterpolator, datasets: list[Dataset]
) -> ReferenceVolume | None:
    """The validated reference volume of the reference-guided mode, or None when unset."""
    if not cfg.interpolation.reference:
        if cfg.interpolation.edge == EdgePolicy.reference:
            raise ConfigError(
                "interpolation.edge=reference predicts edge slices from a reference volume, "
                "but interpolation.reference is not set. Fix: set interpolation.reference "
                "to the reference .npy, or use interpolation.edge=copy or empty"
            )
        return None
    reference_estimator(model, cfg.model.name)  # a pair interpolator cannot be guided
    return load_reference(cfg.interpolation.reference, datasets, cfg.data.storage_options)


def check_worker_device(cfg: Config) -> None:
    """Refuse a CUDA-only model setting for Ray workers that are given no GPU."""
    params = cfg.model.params
    wants_cuda = str(params.get("device", "auto")).startswith("cuda") or (
        params.get("precision") == "fp16"
    )
    if wants_cuda and not cfg.run.serial and not cfg.resources.gpus_per_worker:
        raise ConfigError(
            f"model.params.device={params.get('device', 'auto')} / precision="
            f"{params.get('precision', 'fp32')} needs a GPU on every worker, but "
            "resources.gpus_per_worker is 0. Fix: resources=gpu_cluster (or "
            "resources.gpus_per_worker=1), or model.params.device=auto with fp32/bf16"
        )


def _configured_device(name: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """The device and precision as configured (for torch models; none for the others)."""
    if not is_torch_model(name):
        return {}
    return {"device": str(params.get("device", "auto")),
            "precision": str(params.get("precision", "fp32"))}


def run(cfg: Config) -> RunSummary:
    """Reconstruct every configured dataset; see the module docstring."""
    start = time.perf_counter()
    check_resources(cfg.resources)
    if not 1 <= cfg.output.zstd_level <= 22:
        raise ConfigError(f"output.zstd_level={cfg.output.zstd_level}: choose 1 (fast) to 22 (small)")
    datasets = load_datasets(cfg.data)
    # Build the model once here: a bad name, setting or checkpoint fails before the pool.
    # On the CPU in fp32: device and precision are the workers' (the head may have no GPU).
    fallback = asdict(cfg.interpolation.exact_fallback)
    check_worker_device(cfg)
    model = build_for_validation(cfg.model.name, cfg.model.checkpoint, cfg.model.params, fallback)
    # the run's identity names the configured device and precision; each slice's
    # provenance and each task's result name what its worker really ran on
    provenance = {**model.provenance(), **_configured_device(cfg.model.name, cfg.model.params)}
    reference = check_reference(cfg, model, datasets)
    if reference is not None:
        provenance = {**provenance, **reference_provenance(reference.url)}
    store = VolumeStore(cfg.output.root, cfg.output.storage_options)
    tasks_by_ds = {
        ds.id: plan_dataset(ds.id, ds.section_numbers, ds.n_slices,
                            cfg.interpolation.placement, cfg.interpolation.edge,
                            model_context(model))
        for ds in datasets
    }
    for tasks in tasks_by_ds.values():
        check_reachable(model, tasks)
    dtypes = {ds.id: output_dtype(ds, cfg.output.dtype) for ds in datasets}
    todo: list[GapTask] = []
    skipped = 0
    for ds in datasets:
        run_info = {
            **provenance,
            "params": dict(cfg.model.params),
            "placement": cfg.interpolation.placement,
            "edge": cfg.interpolation.edge,
            "dtype": dtypes[ds.id],
        }
        store.prepare_image(ds, dtypes[ds.id], run_info, cfg.output.overwrite,
                            cfg.output.zstd_level)
        done = store.done_records(ds.id)
        pending = [t for t in tasks_by_ds[ds.id] if t.task_id not in done]
        skipped += len(tasks_by_ds[ds.id]) - len(pending)
        todo += pending
    tuning: dict[str, Any] = {}
    pending_ds = sorted({t.dataset_id for t in todo if t.predicted})
    if is_tunable(model) and pending_ds:
        by_id = {ds.id: ds for ds in datasets}
        tuning = run_tuning(
            [TuneJob(i, tuple(by_id[i].section_numbers)) for i in pending_ds],
            TuneSpec(cfg.model.name, cfg.model.checkpoint, dict(cfg.model.params),
                     by_id, cfg.output.root, dict(cfg.output.storage_options),
                     cfg.resources.threads_per_worker),
            cfg.resources, cfg.run.serial,
        )
    spec = WorkerSpec(
        model_name=cfg.model.name,
        checkpoint=cfg.model.checkpoint,
        model_params=dict(cfg.model.params),
        datasets={ds.id: ds for ds in datasets},
        dtypes=dtypes,
        output_root=cfg.output.root,
        output_storage_options=dict(cfg.output.storage_options),
        threads=cfg.resources.threads_per_worker,
        io_threads=max(2, int(cfg.resources.cpus_per_worker)),
        reference=reference,
        exact_fallback=fallback,
        placement=cfg.interpolation.placement,
        tuning=tuning,
    )
    log.info("%d datasets, %d tasks to run, %d already done", len(datasets), len(todo), skipped)
    rows = _execute(todo, spec, cfg)
    outputs, complete = _finalize(store, datasets, tasks_by_ds, cfg)
    if cfg.data.truth:  # scikit-image is imported only when there is truth to score
        from atlinter_ray.scoring import load_truth, score_run
    scores = {
        ds.id: score_run(
            store, ds, load_truth(cfg.data.truth[ds.id], ds, cfg.data.storage_options),
            cfg.interpolation.placement,
        )
        for ds in complete
        if ds.id in cfg.data.truth
    }
    failed = [r for r in rows if not r.done]
    written = sum(r.slices for r in rows if r.done)
    wall = time.perf_counter() - start
    summary = RunSummary(
        datasets=[ds.id for ds in datasets],
        tasks_total=sum(len(t) for t in tasks_by_ds.values()),
        tasks_done=len(rows) - len(failed),
        tasks_skipped=skipped,
        tasks_failed=len(failed),
        slices_written=written,
        wall_seconds=round(wall, 3),
        slices_per_second=round(written / wall, 3) if wall > 0 else 0.0,
        model_calls=sum(r.model_calls for r in rows),
        nodes=sorted({r.worker.node_id or socket.gethostname() for r in rows}),
        gpus=sorted({f"{r.worker.node_id}:{g}" for r in rows for g in r.worker.gpu_ids}),
        outputs=outputs,
        devices=dict(Counter(f"{r.worker.device} {r.worker.precision}" for r in rows if r.done)),
        fp32_reruns=sum(r.fp32_reruns for r in rows),
        failures=[{"task_id": r.task_id, "error": r.error} for r in failed],
        scores=scores,
        config=redact(asdict(cfg)),
        tuning=tuning,
    )
    store.write_bytes("run_summary.json", json.dumps(asdict(summary), indent=2).encode())
    return summary


def _execute(tasks: list[GapTask], spec: WorkerSpec, cfg: Config) -> list[TaskResult]:
    """Run the tasks with a progress bar over slices; return every task's result."""
    if not tasks:
        return []
    if cfg.run.serial:
        stream: Iterable[TaskResult] = run_serial(tasks, spec, cfg.resources.tasks_per_batch)
    else:
        connect(cfg.resources)
        stream = run_on_ray(tasks, spec, cfg.resources)
    rows = []
    total = sum(len(t.jobs) for t in tasks)
    with tqdm(total=total, unit="slice", disable=not cfg.run.progress,
              desc=f"atlinter_ray {__version__}") as bar:
        for row in stream:
            rows.append(row)
            bar.update(row.slices)
            if not row.done:
                log.error("task %s failed: %s", row.task_id, row.error)
    return rows


def _finalize(
    store: VolumeStore,
    datasets: list[Dataset],
    tasks_by_ds: dict[str, list[GapTask]],
    cfg: Config,
) -> tuple[dict[str, str], list[Dataset]]:
    """Merge provenance and draw quick-looks for every dataset whose tasks all finished."""
    outputs, complete = {}, []
    for ds in datasets:
        records = store.done_records(ds.id)
        outputs[ds.id] = store.image_url(ds.id)
        if len(records) < len(tasks_by_ds[ds.id]):
            log.warning("%s is incomplete; rerun the same command to finish it", ds.id)
            continue
        store.finalize(ds, records)
        complete.append(ds)
        if cfg.output.quicklook:
            store.write_bytes(f"{ds.id}.quicklook.png", quicklook_png(store, ds, records))
            if montage_gaps(store.image_attrs(ds.id)["atlinter_ray"]["provenance"]):
                store.write_bytes(f"{ds.id}.montage.png", montage_png(store, ds))
    return outputs, complete
