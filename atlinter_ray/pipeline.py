"""The driver: datasets in, whole volumes out, and proof that they are whole.

``run(config)``::

    validate + fingerprint every dataset (parallel, headers and streamed hashes)
    check the model, its reach and the reference volume           -- nothing written yet
    take the output's lease (one driver per output root)
    check every existing image against this run (parallel)        -- refuse conflicts
    create the missing images; prove each complete image again, object by object
        (ledger.py: what is missing or damaged is redone or rebuilt)
    list each image's markers of its generation
    run the tasks not marked done; a dataset's last task brings its finishing job
        (verify markers against the store, pyramid, pictures, metadata: finishing.py);
        tasks whose output finishing finds missing are redone once
    score against truth (when given), write run_summary.json

Nothing heavy passes through the driver: it holds dataset descriptions, task
descriptions and result records. It stops early, with the cause, after
``resources.max_storage_errors`` storage failures in a row, and a run that cannot
prove every dataset complete is not ``ok`` (the job exits 1).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import socket
import time
from collections import Counter, defaultdict
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from tqdm import tqdm

from atlinter_ray import __version__, ledger
from atlinter_ray.config import Config, DataConfig, ResourcesConfig
from atlinter_ray.dataset import Dataset, dataset_urls
from atlinter_ray.dtypes import SCALING_KEY, output_dtype, output_scale, scaling_record
from atlinter_ray.engine import build_for_validation, check_reachable, model_context
from atlinter_ray.errors import (
    AtlinterRayError,
    ConfigError,
    DamagedObjectError,
    OutputRootError,
    StoreError,
    StoreHungError,
    is_storage_error,
)
from atlinter_ray.execution import (
    WorkItem,
    WorkResult,
    batches,
    check_local_capacity,
    check_resources,
    connect,
    run_work,
)
from atlinter_ray.finishing import FinishJob
from atlinter_ray.identity import ImageIdentity
from atlinter_ray.inputs import THREADS, Inputs, load_inputs
from atlinter_ray.layout import DEFAULT_SLAB, Layout
from atlinter_ray.lease import OutputLease, read_lease
from atlinter_ray.models.base import PairInterpolator, is_torch_model
from atlinter_ray.models.reference_guided import reference_estimator
from atlinter_ray.planning import EdgePolicy, SlabTask, plan_dataset, plan_slabs
from atlinter_ray.pool import PoolStats
from atlinter_ray.quicklook import montage_png
from atlinter_ray.reference import ReferenceVolume, prepare_reference, reference_provenance
from atlinter_ray.secrets import env_secrets, redact, scrub, secret_values
from atlinter_ray.storage_hints import store_fix
from atlinter_ray.store import ImageState, VolumeStore
from atlinter_ray.timebox import call_within
from atlinter_ray.tuning import TuneJob, TuneSpec, is_tunable, run_tuning
from atlinter_ray.worker import TaskResult, WorkerSpec, failed_result

log = logging.getLogger(__name__)


def gap_text(gaps: Sequence[int]) -> str:
    """The gaps a score was measured at, as a reader needs them: ``gap 4``, ``gaps 3 to 8``."""
    if not gaps:
        return "no gap"
    return f"gap {gaps[0]}" if len(gaps) == 1 else f"gaps {min(gaps)} to {max(gaps)}"


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
    #: Files this run wrote beside the images (pictures, the summary), by what they are.
    files: dict[str, str] = field(default_factory=dict)
    #: Tasks run per worker device and precision (``"cuda:0 (NVIDIA H100) bf16": 812``).
    devices: dict[str, int] = field(default_factory=dict)
    #: Model items recomputed in float32 because their low-precision output was not finite.
    fp32_reruns: int = 0
    failures: list[dict[str, str]] = field(default_factory=list)
    scores: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    #: Dataset id -> the tuning stage's result (choice, scores, seconds, cached).
    tuning: dict[str, Any] = field(default_factory=dict)
    #: Datasets verified complete (their markers checked against the store).
    complete: list[str] = field(default_factory=list)
    #: Datasets that are not complete, with the reason.
    incomplete: dict[str, str] = field(default_factory=dict)
    #: Invalid datasets left out (``data.skip_invalid``), with the reason.
    skipped_datasets: dict[str, str] = field(default_factory=dict)
    #: Task runs repeated after a worker died or timed out.
    tasks_retried: int = 0
    #: Why the run stopped before running everything ("" when it did not).
    stopped: str = ""

    @property
    def ok(self) -> bool:
        """True when every task ran and every dataset is verified complete."""
        return self.tasks_failed == 0 and not self.incomplete and not self.stopped

    def to_text(self) -> str:
        """A short human-readable report."""
        lines = [
            f"datasets: {len(self.datasets)} (complete {len(self.complete)}, incomplete "
            f"{len(self.incomplete)}, skipped {len(self.skipped_datasets)})  tasks: "
            f"{self.tasks_total} (done {self.tasks_done}, skipped {self.tasks_skipped}, "
            f"failed {self.tasks_failed}, retried {self.tasks_retried})",
            f"slices written: {self.slices_written} in {self.wall_seconds:.1f} s "
            f"({self.slices_per_second:.1f} slices/s); model calls: {self.model_calls}",
            f"nodes: {len(self.nodes)}  GPUs: {len(self.gpus)}  devices: "
            + (", ".join(f"{d} ({n} tasks)" for d, n in self.devices.items()) or "-")
            + (f"  fp32 reruns: {self.fp32_reruns}" if self.fp32_reruns else ""),
        ]
        lines += [f"output {k}: {v}" for k, v in self.outputs.items()]
        lines += [f"wrote {k}: {v}" for k, v in self.files.items()]
        lines += [
            f"tuned {k}: {'+'.join(r['members'])} curved={r['curved']} in {r['seconds']:.1f} s"
            f"{' (cached)' if r['cached'] else ''}"
            for k, r in self.tuning.items()
        ]
        for ds_id, by_model in self.scores.items():
            for who, sc in by_model.items():
                lines.append(
                    f"{ds_id} vs held-out truth, {who:>6}: PSNR {sc['psnr']:.2f} dB  "
                    f"SSIM {sc['ssim']:.4f}  MAE {sc['mae']:.3f}  ({sc['slices']} slices, "
                    f"{gap_text(sc.get('gaps', []))})"
                )
        lines += [f"SKIPPED {url}: {why}" for url, why in self.skipped_datasets.items()]
        lines += [f"FAILED {f['task_id']}: {f['error']}" for f in self.failures[:20]]
        if len(self.failures) > 20:
            lines.append(f"... and {len(self.failures) - 20} more failed tasks (run_summary.json)")
        lines += [f"INCOMPLETE {ds}: {why}" for ds, why in self.incomplete.items()]
        if self.stopped:
            lines.append(f"STOPPED: {self.stopped}")
        if not self.ok:
            lines.append("Rerun the same command to finish: work already done is kept.")
        return "\n".join(lines)


def check_truths(data: DataConfig, inputs: Inputs) -> None:
    """Every ``data.truth`` entry names a dataset of the run and fits it (before any work);
    entries of datasets skipped as invalid are left alone."""
    if not data.truth:
        return
    from atlinter_ray.scoring import check_truth  # imports scikit-image

    by_id = {ds.id: ds for ds in inputs.datasets}
    skipped = {dataset_urls(url)[0] for url in inputs.skipped}
    unknown = sorted(set(data.truth) - set(by_id) - skipped)
    if unknown:
        raise ConfigError(
            f"data.truth names {unknown}, which are not datasets of this run "
            f"({sorted(by_id)}). Fix: key data.truth by dataset id, or drop those entries"
        )
    for ds_id, url in data.truth.items():
        if ds_id in by_id:
            check_truth(url, by_id[ds_id], data.storage_options)


def check_reference(
    cfg: Config, model: PairInterpolator, datasets: list[Dataset]
) -> ReferenceVolume | None:
    """The validated reference volume of the reference-guided mode, or None when unset."""
    if not cfg.interpolation.reference:
        if cfg.interpolation.edge == EdgePolicy.reference:
            raise ConfigError(
                "interpolation.edge=reference predicts edge slices from a reference volume, "
                "but interpolation.reference is not set. Fix: set interpolation.reference "
                "to the reference volume (.npy, .nrrd or OME-Zarr), or use "
                "interpolation.edge=copy or empty"
            )
        return None
    reference_estimator(model, cfg.model.name)  # a pair interpolator cannot be guided
    return prepare_reference(cfg.interpolation.reference, datasets, cfg.data.storage_options,
                             f"{cfg.output.root.rstrip('/')}/_reference",
                             cfg.output.storage_options)


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


def layout_of(cfg: Config) -> Layout:
    """The image layout ``output.*`` asks for, checked."""
    if cfg.output.shards is not None:
        raise ConfigError(
            f"output.shards={cfg.output.shards} is no longer a setting: every level-0 object "
            f"is now a shard output.slab slices deep (default {DEFAULT_SLAB}), with "
            "output.chunks=[h, w] inner chunks. Fix: remove output.shards (and set "
            "output.slab to choose the depth)"
        )
    chunks = cfg.output.chunks
    layout = Layout(
        slab=cfg.output.slab,
        chunks=None if chunks is None else tuple(chunks),  # type: ignore[arg-type]
        zstd_level=cfg.output.zstd_level,
        pyramid_min=cfg.output.pyramid_min,
    )
    layout.check()
    return layout


def run(cfg: Config) -> RunSummary:
    """Reconstruct every configured dataset; see the module docstring."""
    start = time.perf_counter()
    check_resources(cfg.resources)
    if not cfg.run.serial:
        check_local_capacity(cfg.resources)  # before any data is read or written
    layout = layout_of(cfg)
    began = time.perf_counter()
    inputs = load_inputs(cfg.data)
    datasets = inputs.datasets
    log.info("%d datasets validated and fingerprinted in %.1f s", len(datasets),
             time.perf_counter() - began)
    check_truths(cfg.data, inputs)
    scaling = cfg.output.dtype_scaling
    dtypes = {ds.id: output_dtype(ds, cfg.output.dtype, scaling) for ds in datasets}
    scales = {ds.id: output_scale(ds, dtypes[ds.id], scaling) for ds in datasets}
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
    gaps_by_ds = {
        ds.id: plan_dataset(ds.id, ds.section_numbers, ds.n_slices,
                            cfg.interpolation.placement, cfg.interpolation.edge,
                            model_context(model))
        for ds in datasets
    }
    for gaps in gaps_by_ds.values():
        check_reachable(model, gaps)
    tasks_by_ds = {ds.id: plan_slabs(gaps_by_ds[ds.id], ds.n_slices, layout.slab)
                   for ds in datasets}
    run_info = {
        **provenance,
        "params": dict(cfg.model.params),
        "placement": cfg.interpolation.placement,
        "edge": cfg.interpolation.edge,
    }
    store = VolumeStore(cfg.output.root, cfg.output.storage_options)
    lease = store.lease(cfg.output.lease_ttl_s)
    with _usable(cfg.output.root):
        lease.acquire()
    hung = False  # the output store stopped answering: nothing more is asked of it
    try:
        with _usable(cfg.output.root):
            states = _prepare(store, inputs, _image_runs(run_info, dtypes, scales), layout,
                              cfg.output.overwrite)
            states = _in_parallel(lambda ds: ledger.recheck(store, ds, states[ds.id],
                                                      tasks_by_ds[ds.id], layout.slab), datasets)
            done = _in_parallel(lambda ds: store.done_task_ids(ds.id, states[ds.id].identity),
                                datasets)
        todo = [t for ds in datasets for t in tasks_by_ds[ds.id] if t.task_id not in done[ds.id]]
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
            images={k: s.identity for k, s in states.items()},
            scales={k: v for k, v in scales.items() if v != 1.0},
            fence=lease.token,
        )
        skipped = sum(len(done[ds.id]) for ds in datasets)
        log.info("%d datasets, %d tasks to run, %d already done", len(datasets), len(todo),
                 skipped)
        tracker = _Tracker(tasks_by_ds, todo, states, cfg)
        outcome = _execute(tracker, spec, cfg, lease, store)
        hung = outcome.hung
        if not hung:  # a lease lost to a hung store: the store is the cause to report
            lease.check()
        scores, damaged = ({}, {}) if hung else _scores(store, datasets, tracker.complete, cfg)
        for ds_id, why in damaged.items():
            tracker.complete.discard(ds_id)
            tracker.failed[ds_id] = why
        rows = outcome.rows
        if not outcome.stopped:  # a store that failed is not asked again
            try:
                rows = committed_rows(store, tracker.identities, rows)
            except Exception as exc:
                if not is_storage_error(exc):
                    raise
                log.warning("could not list the committed tasks (%s: %s); failed tasks are "
                            "counted as reported", type(exc).__name__, exc)
            tracker.settle(rows)
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
            outputs={ds.id: store.image_url(ds.id) for ds in datasets},
            devices=dict(Counter(f"{r.worker.device} {r.worker.precision}" for r in rows if r.done)),
            fp32_reruns=sum(r.fp32_reruns for r in rows),
            failures=[{"task_id": r.task_id, "error": r.error} for r in failed],
            scores=scores,
            files=dict(sorted(tracker.files.items())),
            config=redact(asdict(cfg)),
            tuning=tuning,
            complete=sorted(tracker.complete),
            incomplete=tracker.incomplete(),
            skipped_datasets=dict(inputs.skipped),
            tasks_retried=outcome.stats.retries,
            stopped=outcome.stopped,
        )
        summary = _write_summary(store, summary, cfg, hung)
    finally:
        _release(lease, hung)
    return summary


#: Seconds the lease's release may take at the end (best effort: an unrenewed lease is
#: taken over by the next run anyway).
RELEASE_TIMEOUT_S = 10.0


def _write_summary(store: VolumeStore, summary: RunSummary, cfg: Config,
                   hung: bool) -> RunSummary:
    """``summary`` after writing it to ``run_summary.json`` (secrets removed), within
    ``resources.heartbeat_s``; one that could not be written says so and is not ``ok``."""
    url = f"{store.root}/run_summary.json"
    if hung:
        return _unwritten(summary, f"{url} was not written: the output store does not answer")
    secrets = secret_values(asdict(cfg)) | env_secrets()
    text = scrub(json.dumps(asdict(summary), indent=2), secrets)
    try:
        summary.files["run summary"] = call_within(
            lambda: store.write_bytes("run_summary.json", text.encode()),
            cfg.resources.heartbeat_s, f"writing {url}")
    except Exception as exc:
        if not is_storage_error(exc):
            raise
        return _unwritten(summary, f"{url} could not be written ({type(exc).__name__}: "
                                   f"{str(exc)[:300]})")
    return summary


def _unwritten(summary: RunSummary, why: str) -> RunSummary:
    """``summary`` stopped with ``why`` (its file is missing: the run is not ``ok``)."""
    log.error("%s", why)
    return dataclasses.replace(summary, stopped="; ".join(x for x in (summary.stopped, why) if x))


def _release(lease: OutputLease, hung: bool) -> None:
    """Give the lease back within :data:`RELEASE_TIMEOUT_S`; to a hung store, without waiting."""
    try:
        call_within(lease.release, 0.0 if hung else RELEASE_TIMEOUT_S, "releasing the lease")
    except Exception as exc:  # noqa: BLE001 - best effort: the next run takes it over
        why = "the output store does not answer" if hung else f"{type(exc).__name__}: {exc}"
        log.warning("the output lease is left for the next run to take over (%s)", why)


@contextlib.contextmanager
def _usable(root: str) -> Iterator[None]:
    """Turn a failure to use the output root at all into an error naming it and the fix."""
    try:
        yield
    except AtlinterRayError:
        raise
    except Exception as exc:
        if not is_storage_error(exc):
            raise
        raise OutputRootError(
            f"output.root={root} cannot be used ({type(exc).__name__}: {exc}): "
            f"{store_fix(root, exc, 'output.root', 'output.storage_options')}."
        ) from exc


def _in_parallel(fn: Any, datasets: Sequence[Dataset]) -> dict[str, Any]:
    """``{dataset id: fn(dataset)}``, a few store round trips at a time."""
    if not datasets:
        return {}
    with ThreadPoolExecutor(max_workers=min(THREADS, len(datasets))) as pool:
        return dict(zip([ds.id for ds in datasets], pool.map(fn, datasets)))


def _image_runs(
    run_info: Mapping[str, Any], dtypes: Mapping[str, str], scales: Mapping[str, float]
) -> dict[str, dict[str, Any]]:
    """Each dataset's run record: the run's, its output dtype and, when scaled, its scaling."""
    out = {}
    for ds_id, dtype in dtypes.items():
        record = {**run_info, "dtype": dtype}
        if scales[ds_id] != 1.0:
            record[SCALING_KEY] = scaling_record(scales[ds_id])
        out[ds_id] = record
    return out


def _prepare(
    store: VolumeStore,
    inputs: Inputs,
    runs: Mapping[str, Mapping[str, Any]],
    layout: Layout,
    overwrite: bool,
) -> dict[str, ImageState]:
    """Check every existing image (reads only, all of them), then create the missing ones."""
    datasets = inputs.datasets

    def check(ds: Dataset) -> ImageState | StoreError | None:
        try:
            return store.check_image(ds, runs[ds.id],
                                     inputs.fingerprints[ds.id], layout, overwrite)
        except StoreError as exc:
            return exc

    found = _in_parallel(check, datasets)
    conflicts = [v for v in found.values() if isinstance(v, StoreError)]
    if len(conflicts) == 1:
        raise conflicts[0]
    if conflicts:
        listing = "\n".join(f"  - {c}" for c in conflicts[:20])
        raise StoreError(f"{len(conflicts)} outputs conflict with this run:\n{listing}")
    missing = [ds for ds in datasets if found[ds.id] is None]
    created = _in_parallel(
        lambda ds: store.create_image(ds, runs[ds.id]["dtype"], runs[ds.id],
                                      inputs.fingerprints[ds.id], layout),
        missing,
    )
    return {ds.id: created.get(ds.id) or found[ds.id] for ds in datasets}


class _Tracker:
    """Which tasks each dataset still waits for, and the work that results bring."""

    def __init__(
        self,
        tasks_by_ds: Mapping[str, list[SlabTask]],
        todo: Sequence[SlabTask],
        states: Mapping[str, ImageState],
        cfg: Config,
    ) -> None:
        self.by_id = {t.task_id: t for tasks in tasks_by_ds.values() for t in tasks}
        self.pending: dict[str, set[str]] = defaultdict(set)
        for task in todo:
            self.pending[task.dataset_id].add(task.task_id)
        self.identities: dict[str, ImageIdentity] = {k: s.identity for k, s in states.items()}
        self.task_ids = {ds: tuple(t.task_id for t in tasks) for ds, tasks in tasks_by_ds.items()}
        self.quicklook, self.batch = cfg.output.quicklook, cfg.resources.tasks_per_batch
        self.complete = {ds for ds, s in states.items() if s.complete and not self.pending[ds]}
        self.failed: dict[str, str] = {}
        self.redone: set[str] = set()
        self.results: dict[str, TaskResult] = {}
        #: Files each dataset's finishing wrote beside its image (quick-look, montage).
        self.files: dict[str, str] = {}

    def initial(self) -> list[WorkItem]:
        """The tasks to run, then the finishing of datasets whose tasks are all done."""
        todo = [self.by_id[t] for ds in self.pending for t in sorted(self.pending[ds])]
        items: list[WorkItem] = list(batches(todo, self.batch))
        items += [self.finish_job(ds) for ds in self.task_ids
                  if ds not in self.complete and not self.pending[ds]]
        return items

    def finish_job(self, ds: str) -> FinishJob:
        """The finishing job of dataset ``ds``."""
        return FinishJob(ds, self.identities[ds], self.task_ids[ds], self.quicklook)

    def follow_up(self, result: WorkResult) -> list[WorkItem]:
        """Record ``result``; return the finishing job or the redo it brings."""
        if isinstance(result, TaskResult):
            self.results[result.task_id] = result
            ds = result.dataset_id
            if not result.done:
                self.failed.setdefault(ds, f"task {result.task_id} failed: {result.error}")
                return []
            self.pending[ds].discard(result.task_id)
            return [] if self.pending[ds] or ds in self.failed else [self.finish_job(result.dataset_id)]
        ds = result.dataset_id
        if result.done:
            self.complete.add(ds)
            self.files.update({f"{ds} {kind}": url for kind, url in result.outputs.items()
                               if kind != "image"})
        elif result.status == "redo" and ds not in self.redone:
            self.redone.add(ds)
            self.pending[ds] = set(result.redo)
            return list(batches([self.by_id[t] for t in result.redo], self.batch))
        elif result.status == "redo":
            self.failed[ds] = (f"{len(result.redo)} task(s) lost their output twice in this run "
                               f"({', '.join(result.redo[:5])})")
        else:
            self.failed[ds] = f"finishing failed: {result.error}"
        return []

    def settle(self, rows: Sequence[TaskResult]) -> None:
        """Forget the failures of datasets whose tasks the store shows all committed."""
        for row in rows:
            if row.done:
                self.pending[row.dataset_id].discard(row.task_id)
        for ds in [ds for ds in self.failed if ds not in self.complete]:
            if self.failed[ds].startswith("task ") and not self.pending[ds]:
                del self.failed[ds]

    def incomplete(self) -> dict[str, str]:
        """Datasets not verified complete, with the reason."""
        out = {}
        for ds in self.task_ids:
            if ds in self.complete:
                continue
            out[ds] = self.failed.get(ds) or (
                f"{len(self.pending[ds])} task(s) not run" if self.pending[ds]
                else "not verified (finishing did not run)")
        return out


@dataclass
class _Outcome:
    rows: list[TaskResult]
    stats: PoolStats
    stopped: str = ""
    #: The output store stopped answering (:func:`store_answers`).
    hung: bool = False


def _execute(tracker: _Tracker, spec: WorkerSpec, cfg: Config, lease: OutputLease,
             store: VolumeStore) -> _Outcome:
    """Run the work with one progress bar over every slice; stop early on a failing store."""
    stats = PoolStats()
    items = tracker.initial()
    if not items:
        return _Outcome([], stats)
    if not cfg.run.serial:
        connect(cfg.resources)
    stream = run_work(items, spec, cfg.resources, tracker.follow_up, cfg.run.serial, stats,
                      lambda: store_answers(store, cfg.resources))
    total = sum(len(tracker.by_id[t].jobs) for ids in tracker.pending.values() for t in ids)
    in_a_row, stopped, last, hung = 0, "", "", False
    n_datasets = len(tracker.task_ids)
    with tqdm(total=total, unit="slice", disable=not cfg.run.progress, smoothing=0.1,
              desc=f"atlinter_ray {__version__}") as bar:
        try:
            for result in stream:
                if isinstance(result, TaskResult):
                    bar.update(result.slices)
                    if tracker.results.get(result.task_id) is not result:
                        tracker.follow_up(result)  # failed by the pool: no worker reported it
                    if not result.done:
                        log.error("task %s failed: %s", result.task_id, result.error)
                elif not result.done:
                    log.error("finishing %s: %s", result.dataset_id,
                              result.error or f"redo {len(result.redo)} task(s)")
                    if result.status == "redo":
                        bar.total += sum(len(tracker.by_id[t].jobs) for t in result.redo)
                bar.set_postfix_str(f"{len(tracker.complete)}/{n_datasets} datasets complete")
                if getattr(result, "storage_error", False):
                    in_a_row, last = in_a_row + 1, result.error
                elif result.done:
                    in_a_row = 0
                if in_a_row >= cfg.resources.max_storage_errors:
                    stopped = (f"{in_a_row} storage failures in a row, the last: {last}. Fix: "
                               "check that the stores are reachable, writable and not full "
                               "(endpoint, credentials, space), then rerun the same command")
                    log.error("stopping early: %s", stopped)
                    break
                lease.check()
        except StoreHungError as exc:
            stopped, hung = str(exc), True
            log.error("stopping early: %s", stopped)
        finally:
            stream.close()
    rows = list(tracker.results.values())
    for ids in tracker.pending.values():  # never reported: the run stopped early
        for task_id in sorted(ids - set(tracker.results)):
            rows.append(failed_result(tracker.by_id[task_id],
                                      f"not run: {stopped or 'the run ended before a worker took it'}"))
    return _Outcome(rows, stats, stopped, hung)


def store_answers(store: VolumeStore, resources: ResourcesConfig) -> None:
    """Raise :class:`StoreHungError` when the output store does not answer one small read
    (its lease record) within ``resources.heartbeat_s``.

    What the actor pool asks after a call ran past ``resources.task_timeout_s``: a hung
    store ends the run at once with its name, where a slow model or a lost node only
    has its task rerun.
    """
    try:
        call_within(lambda: read_lease(store.objects), resources.heartbeat_s,
                    f"a read of {store.root}")
    except TimeoutError:
        raise StoreHungError(
            f"the output store {store.root} stopped answering: a task ran past "
            f"resources.task_timeout_s={resources.task_timeout_s:g} s and a read of its lease "
            f"record got no answer in resources.heartbeat_s={resources.heartbeat_s:g} s. "
            "Fix: check that the store answers (its server, endpoint_url, network), then "
            "rerun the same command: committed work is kept"
        ) from None
    except Exception as exc:  # noqa: BLE001 - it answered, with an error: not hung
        log.debug("the output store answered the probe with %s", type(exc).__name__)


#: Seconds the end-of-run marker listing may take before failures are kept as reported.
LISTING_TIMEOUT_S = 60.0


def committed_rows(
    store: VolumeStore,
    identities: Mapping[str, ImageIdentity],
    rows: Sequence[TaskResult],
    timeout_s: float = LISTING_TIMEOUT_S,
) -> list[TaskResult]:
    """``rows`` with the failed tasks the store holds markers for turned done.

    A worker can commit a task and die before its result comes back (its node lost):
    the pool then reports the task failed, though its slices and marker are stored.
    One marker listing per dataset with failures makes the counts match the store. The
    listings are given ``timeout_s`` (:func:`~atlinter_ray.timebox.call_within`): a hung
    store raises ``TimeoutError`` here instead of holding the run forever.
    """
    failing = sorted({r.dataset_id for r in rows if not r.done})
    if not failing:
        return list(rows)
    stored = call_within(lambda: {ds: store.done_task_ids(ds, identities[ds]) for ds in failing},
                         timeout_s, "listing the done markers")
    return [dataclasses.replace(r, status="done", error="", storage_error=False)
            if not r.done and r.task_id in stored[r.dataset_id] else r for r in rows]


def _scores(
    store: VolumeStore, datasets: Sequence[Dataset], complete: set[str], cfg: Config
) -> tuple[dict[str, Any], dict[str, str]]:
    """Scores of the complete datasets that have held-out truth, and the datasets whose
    level 0 turned out not to decode, with the reason (no longer complete)."""
    wanted = [ds for ds in datasets if ds.id in complete and ds.id in cfg.data.truth]
    if not wanted:
        return {}, {}
    from atlinter_ray.scoring import load_truth, score_run  # imports scikit-image

    scores: dict[str, Any] = {}
    damaged: dict[str, str] = {}
    for ds in wanted:
        truth = load_truth(cfg.data.truth[ds.id], ds, cfg.data.storage_options)
        try:
            scores[ds.id] = score_run(store, ds, truth, cfg.interpolation.placement)
        except DamagedObjectError as exc:
            damaged[ds.id] = str(exc)
            continue
        if cfg.output.quicklook and scores[ds.id]["model"]["gaps"]:
            # the montage again, now with the true slices and the error beside the predicted
            store.write_bytes(f"{ds.id}.montage.png", montage_png(store, ds, truth=truth))
    return scores, damaged
