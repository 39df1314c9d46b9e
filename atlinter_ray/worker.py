"""The worker: a plain class that runs slab tasks; Ray wraps it only at start.

One :class:`TaskWorker` loads its model once, then runs each batch of tasks as a
pipeline of three stages, so the device computes while the CPU moves data::

    io threads:   read sections of chunk k+1   |  write (compress, store) chunk k-1
    main thread:  upload chunk k (uint8, page-locked, non-blocking) -> predict every
                  pair of every task in the chunk together -> round/clip to the output
                  dtype on the device -> fetch (non-blocking)

A slab task predicts its slices gap by gap (its ``parts``): pairs of different parts,
tasks, datasets and positions share one chunk (for midpoint-only
models, one bisection depth at a time), so the model sees full batches of fixed shapes.
A chunk holds enough tasks for about two model batches. Frames travel to the device
in their stored dtype and come back in the output dtype; bisection levels and flow
warps never leave the device. With a reference volume each slice is instead made from
the known sections moved along the reference's flow (per task, on the host; see
:mod:`atlinter_ray.models.reference_guided`).

Every task is reported, success or failure, so one bad task never hides the rest of
the run; a task counts as done only once its slices and marker are written. A CUDA
error that leaves the device unusable is not reported per task: it raises
:class:`~atlinter_ray.errors.FatalWorkerError`, the pool ends this actor and reruns its
tasks on a fresh one. The same class runs in-process for ``run.serial=true``.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from atlinter_ray import __version__
from atlinter_ray.commit import commit_task
from atlinter_ray.dataset import Dataset, read_sections
from atlinter_ray.dtypes import to_dtype
from atlinter_ray.engine import (
    atlinter_canvas,
    build_interpolator,
    predict_gap,
    predict_pairs,
    slice_provenance,
)
from atlinter_ray.errors import FatalWorkerError, is_storage_error
from atlinter_ray.finishing import FinishJob, FinishResult, finish_dataset
from atlinter_ray.identity import ImageIdentity
from atlinter_ray.lease import FenceToken
from atlinter_ray.models.base import ContextInterpolator, FlowEstimator, PairInterpolator
from atlinter_ray.models.reference_guided import (
    predict_gap_from_reference,
    reference_estimator,
    reference_known,
)
from atlinter_ray.planning import GapTask, Placement, SlabTask
from atlinter_ray.reference import ReferenceVolume, read_reference_slices, reference_provenance
from atlinter_ray.store import VolumeStore

log = logging.getLogger(__name__)
SOFTWARE = f"atlinter_ray {__version__}"
#: Model items (pairs x positions) a chunk aims at, in model batches.
CHUNK_BATCHES = 2


@dataclass(frozen=True, slots=True)
class WorkerIdentity:
    """Where a worker runs: its process, Ray node and the GPUs Ray gave it."""

    pid: int = 0
    node_id: str = ""
    gpu_ids: tuple[str, ...] = ()
    cuda_visible_devices: str = ""
    #: The device the model really runs on (``cuda:0 (NVIDIA H100 ...)``, ``cpu``) and
    #: its precision: the worker's own, not the driver's validation build.
    device: str = ""
    precision: str = ""


@dataclass(slots=True)
class TaskResult:
    """What became of one slab task; the driver counts, reports and sums these."""

    task_id: str
    dataset_id: str
    #: Slices the task writes (done) or should have written (failed).
    slices: int
    status: str = "failed"  # "done" | "failed"
    model_calls: int = 0
    seconds: float = 0.0
    error: str = ""
    #: The failure was the input or output store's (the driver stops early on a run of these).
    storage_error: bool = False
    worker: WorkerIdentity = field(default_factory=WorkerIdentity)
    #: Model items of this task's chunk recomputed in float32 because the low-precision
    #: output was not finite (counted on the chunk's first task).
    fp32_reruns: int = 0

    @property
    def done(self) -> bool:
        """True when the task's slices and marker are written."""
        return self.status == "done"


def failed_result(task: SlabTask, error: str = "") -> TaskResult:
    """A task's result before it succeeds; the driver's for a task no worker ran."""
    return TaskResult(task.task_id, task.dataset_id, len(task.jobs), error=error)


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs, small enough to ship to every actor."""

    model_name: str
    checkpoint: str | None
    model_params: Mapping[str, Any]
    datasets: Mapping[str, Dataset]
    dtypes: Mapping[str, str]
    output_root: str
    output_storage_options: Mapping[str, Any] = field(default_factory=dict)
    threads: int = 1
    #: The reference-guided mode's volume, or None.
    reference: ReferenceVolume | None = None
    #: ``interpolation.exact_fallback`` (name, checkpoint, params), or None.
    exact_fallback: Mapping[str, Any] | None = None
    #: ``interpolation.placement`` (``atlinter``: the predecessor's padded canvas).
    placement: Placement = Placement.exact
    #: Threads that read sections and commit tasks while the model computes.
    io_threads: int = 2
    #: Dataset id -> the tuning stage's result for that stack (:mod:`atlinter_ray.tuning`).
    tuning: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    #: The image generation and input fingerprint each dataset's markers are bound to.
    images: Mapping[str, ImageIdentity] = field(default_factory=dict)
    #: Dataset id -> the factor values are multiplied by before the cast to its output
    #: dtype (``output.dtype_scaling``; absent: 1.0, written as they are).
    scales: Mapping[str, float] = field(default_factory=dict)
    #: The driver's lease token, checked before every marker and final metadata write
    #: (:func:`~atlinter_ray.lease.check_fence`); None: unfenced.
    fence: FenceToken | None = None


def _identity(model: Any) -> WorkerIdentity:
    """Where this worker runs: process, Ray node, the GPUs Ray gave it, device, precision."""
    node_id = ""
    gpu_ids: tuple[str, ...] = ()
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            node_id = ray.get_runtime_context().get_node_id()
            gpu_ids = tuple(str(g) for g in ray.get_gpu_ids())
    return WorkerIdentity(
        pid=os.getpid(),
        node_id=node_id,
        gpu_ids=gpu_ids,
        cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES", ""),
        **_device_identity(model),
    )


def _runtime(model: Any) -> Any:
    """The torch runtime behind a model (its estimator's, its midpoint model's), or None."""
    for part in (model, getattr(model, "estimator", None), getattr(model, "midpoint", None)):
        for owner in (part, getattr(part, "estimator", None)):
            runtime = getattr(owner, "runtime", None)
            if runtime is not None:
                return runtime
    return None


def _device_identity(model: Any) -> dict[str, str]:
    """The device and precision this worker's model really runs with."""
    runtime = _runtime(model)
    if runtime is None:
        return {"device": "cpu", "precision": "fp32"}
    device = str(runtime.device)
    if runtime.cuda:
        import torch

        device += f" ({torch.cuda.get_device_name(runtime.device)})"
    return {"device": device, "precision": runtime.precision}


@dataclass
class _Chunk:
    """Tasks computed together."""

    tasks: list[SlabTask]
    peak: float


class TaskWorker:
    """Runs batches of slab tasks with one model loaded once."""

    def __init__(self, spec: WorkerSpec) -> None:
        cv2.setNumThreads(spec.threads)
        self.model = build_interpolator(
            spec.model_name, spec.checkpoint, spec.model_params, spec.exact_fallback
        )
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(spec.threads)
        self.datasets: dict[str, Dataset] = dict(spec.datasets)
        self.dtypes = dict(spec.dtypes)
        self.scales = dict(spec.scales)
        self.images = dict(spec.images)
        self.fence = spec.fence
        self.store = VolumeStore(spec.output_root, spec.output_storage_options)
        self.provenance = self.model.provenance()
        self.placement = spec.placement
        self.canvas = atlinter_canvas(self.model, spec.placement)
        self.reference = spec.reference
        #: The flow estimator the reference guides (checked now: a pair model has none).
        self.estimator: FlowEstimator | None = None
        if self.reference is not None:
            self.estimator = reference_estimator(self.model, spec.model_name)
            self.provenance = {**self.provenance, **reference_provenance(self.reference.url)}
        self.tuning = dict(spec.tuning)
        self._tuned: dict[str, PairInterpolator] = {}
        self.runtime = _runtime(self.model)
        self.identity = _identity(self.model)
        self.io = ThreadPoolExecutor(max(1, spec.io_threads), thread_name_prefix="atlinter-io")

    def model_for(self, dataset_id: str) -> PairInterpolator:
        """The model with this dataset's tuning applied (the configured one if untuned)."""
        if dataset_id not in self.tuning:
            return self.model
        if dataset_id not in self._tuned:
            self._tuned[dataset_id] = self.model.tuned(self.tuning[dataset_id])  # type: ignore[attr-defined]
        return self._tuned[dataset_id]

    def run(self, tasks: list[SlabTask]) -> list[TaskResult]:
        """Run ``tasks``; return one result per task, in order."""
        rows = {t.task_id: failed_result(t) for t in tasks}
        for row in rows.values():
            row.worker = self.identity
        writes: list[tuple[SlabTask, Future[None], float]] = []
        chunks = self._chunks(tasks)
        # all reads queued first: they run ahead of the compute
        reads = [self.io.submit(self._read, chunk.tasks) for chunk in chunks]
        for chunk, read in zip(chunks, reads):
            start = time.perf_counter()
            try:
                reruns = self.runtime.fp32_reruns if self.runtime else 0
                blocks = self._compute(chunk, read.result())
                if self.runtime:
                    rows[chunk.tasks[0].task_id].fp32_reruns = self.runtime.fp32_reruns - reruns
            except Exception as exc:
                self._fatal(exc)
                log.exception("tasks %s failed", [t.task_id for t in chunk.tasks])
                for task in chunk.tasks:
                    rows[task.task_id].error = f"{type(exc).__name__}: {exc}"
                    rows[task.task_id].storage_error = is_storage_error(exc)
                continue
            elapsed = (time.perf_counter() - start) / len(chunk.tasks)
            for task, (ready, calls) in zip(chunk.tasks, blocks):
                rows[task.task_id].model_calls = calls
                writes.append((task, self.io.submit(self._commit, task, ready, calls), elapsed))
        for task, future, elapsed in writes:
            row = rows[task.task_id]
            row.seconds = elapsed
            try:
                future.result()
                row.status = "done"
            except Exception as exc:  # report, never hide: the driver counts failures
                self._fatal(exc)
                log.exception("task %s failed", task.task_id)
                row.error = f"{type(exc).__name__}: {exc}"
                row.storage_error = is_storage_error(exc)
        return [rows[t.task_id] for t in tasks]

    def finish(self, job: FinishJob) -> FinishResult:
        """Verify a dataset whose tasks are all done and write its finishing work."""
        return finish_dataset(self.store, self.datasets[job.dataset_id], job, self.fence)

    def _fatal(self, exc: BaseException) -> None:
        """Raise :class:`FatalWorkerError` for an error that leaves the device unusable."""
        if self.runtime is None:
            return
        from atlinter_ray.models.torch_runtime import is_fatal_device_error

        if is_fatal_device_error(exc):
            raise FatalWorkerError(
                f"the device {self.identity.device} failed ({type(exc).__name__}: "
                f"{str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}); "
                "this worker stops so that its tasks run on a fresh one"
            ) from exc

    def _chunks(self, tasks: Sequence[SlabTask]) -> list[_Chunk]:
        """Tasks grouped by image shape, channels, peak, output dtype and scale, cut into chunks.

        Positions are not part of the key: items of any positions share a batch. Tasks
        with nothing to predict (edges) go apart, so a model failure never takes them.
        """
        groups: dict[tuple[Any, ...], list[SlabTask]] = defaultdict(list)
        for task in tasks:
            ds = self.datasets[task.dataset_id]
            key = (ds.image_shape, ds.channels, ds.peak, self.dtypes[ds.id],
                   self.scales.get(ds.id, 1.0), not task.predicted)
            groups[key].append(task)
        target = CHUNK_BATCHES * self.runtime.batch_size if self.runtime else 1
        if self.reference is not None:
            target = 1
        chunks = []
        for (_, _, peak, _, _, _), group in groups.items():
            items = target  # every group starts a chunk
            for task in group:
                if items >= target:
                    chunks.append(_Chunk([], peak))
                    items = 0
                chunks[-1].tasks.append(task)
                items += max(len(task.predicted), 1)
        return chunks

    def _read(self, tasks: Sequence[SlabTask]) -> dict[tuple[str, int], np.ndarray]:
        """Every known section the tasks need, each read once: ``(dataset, section) -> (C, H, W)``."""
        wanted: dict[str, set[int]] = defaultdict(set)
        for task in tasks:
            wanted[task.dataset_id].update(task.sources)
        out = {}
        for ds_id, sections in wanted.items():
            order = sorted(sections)
            for s, image in zip(order, read_sections(self.datasets[ds_id], order)):
                out[ds_id, s] = image
        return out

    def _compute(
        self, chunk: _Chunk, sections: Mapping[tuple[str, int], np.ndarray]
    ) -> list[tuple[Callable[[], np.ndarray], int]]:
        """Per task: a function giving its ``(K, C, H, W)`` block once fetched, and its model calls."""
        tasks = chunk.tasks
        gaps = [(t.task_id, part) for t in tasks for part in t.parts if part.predicted]
        frames: dict[str, list[Any]] = defaultdict(list)
        calls: dict[str, int] = defaultdict(int)
        made: list[tuple[Any, int]] = []  # per gap part, in order: its frames and calls
        if gaps and self.reference is not None:
            made = [(self._from_reference(part, sections, self.reference), len(part.predicted))
                    for _, part in gaps]
        elif gaps and isinstance(self.model, ContextInterpolator):
            for _, part in gaps:  # each part with its own neighbours (and its stack's tuning)
                own = {s: sections[part.dataset_id, s] for s in part.sources}
                model = self.model_for(part.dataset_id)
                made.append((predict_gap(model, own, part, chunk.peak).frames[0],
                             len(part.predicted)))
        elif gaps:
            made = self._predict_pairs([part for _, part in gaps], sections, chunk.peak)
        for (task_id, _), (part_frames, n) in zip(gaps, made):
            frames[task_id].extend(part_frames[i] for i in range(len(part_frames)))
            calls[task_id] += n
        return self._blocks(tasks, sections, frames, calls)

    def _predict_pairs(
        self, parts: Sequence[GapTask], sections: Mapping[tuple[str, int], np.ndarray],
        peak: float,
    ) -> list[tuple[Any, int]]:
        """Frames and model calls of each gap part, every gap of the chunk predicted once.

        Parts of one gap (the slab tasks on both sides of a slab boundary, in one chunk)
        share their pair: its flow or bisection nodes are computed once, for the union of
        their positions, and the calls are counted on the gap's first part.
        """
        wanted: dict[tuple[str, int, int], set[float]] = {}
        for part in parts:
            wanted.setdefault((part.dataset_id, *part.pair), set()).update(part.positions)
        gaps = list(wanted)
        positions = [tuple(sorted(wanted[g])) for g in gaps]
        keys = sorted({(d, s) for d, left, right in gaps for s in (left, right)})
        slot = {k: i for i, k in enumerate(keys)}
        stack = np.stack([sections[k] for k in keys])
        known = self.runtime.upload(stack).float() if self.runtime else stack
        pick = _picker(known)
        a = pick([slot[d, left] for d, left, _ in gaps])
        b = pick([slot[d, right] for d, _, right in gaps])
        result = predict_pairs(self.model, a, b, positions, peak, self.canvas)
        index = {g: i for i, g in enumerate(gaps)}
        made, counted = [], set()
        for part in parts:
            i = index[part.dataset_id, *part.pair]
            rows = [positions[i].index(t) for t in part.positions]
            if rows == list(range(rows[0], rows[0] + len(rows))):  # a view, not a copy
                picked = result.frames[i][rows[0] : rows[0] + len(rows)]
            else:
                picked = result.frames[i][rows]
            made.append((picked, 0 if i in counted else result.model_calls[i]))
            counted.add(i)
        return made

    def _blocks(
        self,
        tasks: Sequence[SlabTask],
        sections: Mapping[tuple[str, int], np.ndarray],
        frames: Mapping[str, Sequence[Any]],
        calls: Mapping[str, int],
    ) -> list[tuple[Callable[[], np.ndarray], int]]:
        """Each task's slices in the output dtype (scaled as configured), converted where they were predicted.

        A block holds the task's whole slab; slices that no job lists stay zeros.

        Predicted frames on a device are rounded, clipped and cast there, and every
        block of the chunk comes back in one non-blocking copy; the io thread that
        writes a block waits for that copy, not the main thread.
        """
        dtype = self.dtypes[tasks[0].dataset_id]
        scale = self.scales.get(tasks[0].dataset_id, 1.0)
        parts: list[list[Any]] = []
        predicted: list[list[bool]] = []  # per slice: a model frame, still to be converted
        for task in tasks:
            made: Any = frames.get(task.task_id)
            ds = self.datasets[task.dataset_id]
            k = 0
            part: list[Any] = [np.zeros((ds.channels, *ds.image_shape), dtype)] * (
                task.stop - task.first)
            fresh = [False] * len(part)
            for job in task.jobs:
                if job.source is not None:
                    part[job.slice - task.first] = to_dtype(
                        sections[task.dataset_id, job.source], dtype, scale)
                else:
                    part[job.slice - task.first] = made[k]
                    fresh[job.slice - task.first] = True
                    k += 1
            parts.append(part)
            predicted.append(fresh)
        on_device = (
            self.runtime is not None and self.reference is None and bool(frames)
            and _device_dtype(dtype)
        )
        if not on_device:
            return [
                (_given(np.stack([to_dtype(_host(x), dtype, scale if new else 1.0)
                                  for x, new in zip(part, fresh)])),
                 calls.get(task.task_id, 0))
                for task, part, fresh in zip(tasks, parts, predicted)
            ]
        from atlinter_ray.models.torch_runtime import download, to_dtype_tensor

        device_parts = [
            [to_dtype_tensor(self.runtime.upload(x) if isinstance(x, np.ndarray) else x, dtype,
                             scale if new else 1.0)
             for x, new in zip(part, fresh)]
            for part, fresh in zip(parts, predicted)
        ]
        import torch

        host, ready = download(torch.cat([torch.stack(p) for p in device_parts]))
        bounds = np.cumsum([0, *(len(p) for p in parts)])

        def block(i: int) -> Callable[[], np.ndarray]:
            def fetch() -> np.ndarray:
                ready()
                return host[bounds[i] : bounds[i + 1]].numpy()

            return fetch

        return [(block(i), calls.get(task.task_id, 0)) for i, task in enumerate(tasks)]

    def _from_reference(
        self,
        part: GapTask,
        sections: Mapping[tuple[str, int], np.ndarray],
        reference: ReferenceVolume,
    ) -> np.ndarray:
        """Frames ``(K, C, H, W)``: the part's known sections moved along the reference flow."""
        ds = self.datasets[part.dataset_id]
        targets = [j.slice for j in part.predicted]
        wanted = sorted(set(targets) | set(part.bounds) | set(part.context))
        ref = dict(zip(wanted, read_reference_slices(reference, ds.axis_index, wanted)))
        assert self.estimator is not None  # set with the reference in __init__
        return predict_gap_from_reference(
            self.model_for(part.dataset_id), self.estimator,
            {s: sections[part.dataset_id, s] for s in part.sources}, ref, targets,
            part.bounds, part.context, ds.peak, reference.peak,
            atlinter=self.placement == Placement.atlinter,
        )

    def _commit(self, task: SlabTask, block: Callable[[], np.ndarray], model_calls: int) -> None:
        """Commit ``task``: its slab (once fetched) with per-slice provenance, then its marker."""
        records = []
        for part in task.parts:
            for job in part.jobs:
                record: dict[str, Any] = {"slice": job.slice, "status": job.status,
                                          "software": SOFTWARE}
                if job.source is not None:
                    record["source"] = job.source
                else:
                    record.update(left=part.left, right=part.right, t=job.t,
                                  **slice_provenance(self.model, job.t, self.provenance))
                    if self.reference is not None:
                        record["known"] = reference_known(
                            job.slice, part.bounds, self.placement == Placement.atlinter)
                    if part.context:
                        record["context"] = list(part.context)
                    tuned = self.tuning.get(task.dataset_id)
                    if tuned is not None:
                        record["tuned"] = {k: tuned[k] for k in ("members", "curved", "key")}
                records.append(record)
        commit_task(self.store, self.datasets[task.dataset_id], task, block(), records, model_calls,
                    self.images[task.dataset_id], self.fence)


def _device_dtype(dtype: str) -> bool:
    """True when predicted frames can be converted to ``dtype`` on the device."""
    from atlinter_ray.models.torch_runtime import DEVICE_DTYPES

    return np.dtype(dtype).name in DEVICE_DTYPES


def _given(block: np.ndarray) -> Callable[[], np.ndarray]:
    """A block that is already on the host."""
    return lambda: block


def _picker(known: Any) -> Callable[[list[int]], Any]:
    """Rows of a host array or device tensor by index."""
    if isinstance(known, np.ndarray):
        return lambda rows: known[rows]
    from atlinter_ray.models.torch_runtime import to_device

    return lambda rows: known[to_device(np.asarray(rows, dtype=np.int64), known.device)]


def _host(x: Any) -> np.ndarray:
    """A host array of ``x`` (numpy, or a tensor fetched from its device)."""
    return x if isinstance(x, np.ndarray) else x.detach().cpu().numpy()
