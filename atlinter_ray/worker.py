"""The worker: a plain class that runs gap tasks; Ray wraps it only at start.

One :class:`TaskWorker` loads its model once, then for each batch of tasks reads the
two bounding sections of every task itself, predicts the missing slices (pairs with
the same positions are batched into one model call; with a reference volume, each
slice is instead its nearest known section moved along the reference's flow), writes
the slices straight to the output store and marks each task done. It always reports
every task, success or failure, so one bad task never hides the rest of the run. The
same class runs in-process for ``run.serial=true``.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from atlinter_ray import __version__
from atlinter_ray.commit import commit_task
from atlinter_ray.dataset import Dataset, read_sections
from atlinter_ray.dtypes import to_dtype
from atlinter_ray.engine import atlinter_canvas, build_interpolator, predict, slice_provenance
from atlinter_ray.models.base import FlowEstimator
from atlinter_ray.models.reference_guided import (
    nearest_known,
    predict_from_reference,
    reference_estimator,
)
from atlinter_ray.planning import GapTask, Placement
from atlinter_ray.reference import ReferenceVolume, read_reference_slices, reference_provenance
from atlinter_ray.store import VolumeStore

log = logging.getLogger(__name__)
SOFTWARE = f"atlinter_ray {__version__}"


@dataclass(frozen=True, slots=True)
class WorkerIdentity:
    """Where a worker runs: its process, Ray node and the GPUs Ray gave it."""

    pid: int = 0
    node_id: str = ""
    gpu_ids: tuple[str, ...] = ()
    cuda_visible_devices: str = ""


@dataclass(slots=True)
class TaskResult:
    """What became of one gap task; the driver counts, reports and sums these."""

    task_id: str
    dataset_id: str
    #: Slices the task writes (done) or should have written (failed).
    slices: int
    status: str = "failed"  # "done" | "failed"
    model_calls: int = 0
    seconds: float = 0.0
    error: str = ""
    worker: WorkerIdentity = field(default_factory=WorkerIdentity)

    @property
    def done(self) -> bool:
        """True when the task's slices and marker are written."""
        return self.status == "done"


def failed_result(task: GapTask, error: str = "") -> TaskResult:
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


def _identity() -> WorkerIdentity:
    """Where this worker runs: process, Ray node and the GPUs Ray gave it."""
    node_id, gpu_ids = "", ()
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
    )


class TaskWorker:
    """Runs batches of gap tasks with one model loaded once."""

    def __init__(self, spec: WorkerSpec) -> None:
        cv2.setNumThreads(spec.threads)
        self.model = build_interpolator(
            spec.model_name, spec.checkpoint, spec.model_params, spec.exact_fallback
        )
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(spec.threads)
        self.datasets = dict(spec.datasets)
        self.dtypes = dict(spec.dtypes)
        self.store = VolumeStore(spec.output_root, spec.output_storage_options)
        self.provenance = self.model.provenance()
        self.placement = spec.placement
        self.canvas = atlinter_canvas(self.model, spec.placement)
        self.reference: ReferenceVolume | None = None
        self.estimator: FlowEstimator | None = None
        if spec.reference is not None:
            self.reference = spec.reference
            self.estimator = reference_estimator(self.model, spec.model_name)
            self.provenance = {**self.provenance, **reference_provenance(self.reference.url)}
        self.identity = _identity()

    def run(self, tasks: list[GapTask]) -> list[TaskResult]:
        """Run ``tasks``; return one result per task, in order."""
        rows = {t.task_id: failed_result(t) for t in tasks}
        for row in rows.values():
            row.worker = self.identity
        groups: dict[tuple, list[GapTask]] = defaultdict(list)
        for task in tasks:
            ds = self.datasets[task.dataset_id]
            positions = tuple(j.t for j in task.predicted)
            groups[(ds.image_shape, ds.channels, ds.peak, positions)].append(task)
        for (_, _, peak, positions), group in groups.items():
            start = time.perf_counter()
            try:
                sections = {
                    t.task_id: dict(zip(t.sources, read_sections(self.datasets[t.dataset_id], t.sources)))
                    for t in group
                }
                frames, calls = None, 0
                if positions and self.reference is not None:
                    frames = np.stack([self._from_reference(t, sections[t.task_id]) for t in group])
                    calls = len(positions)
                elif positions:
                    a = np.stack([sections[t.task_id][t.left] for t in group])
                    b = np.stack([sections[t.task_id][t.right] for t in group])
                    prediction = predict(self.model, a, b, positions, peak, self.canvas)
                    frames, calls = prediction.frames, prediction.model_calls // len(group)
                for i, task in enumerate(group):
                    self._write(task, sections[task.task_id],
                                None if frames is None else frames[i], calls)
                    rows[task.task_id].status = "done"
                    rows[task.task_id].model_calls = calls
            except Exception as exc:  # report, never hide: the driver counts failures
                log.exception("tasks %s failed", [t.task_id for t in group])
                for task in group:
                    if not rows[task.task_id].done:
                        rows[task.task_id].error = f"{type(exc).__name__}: {exc}"
            elapsed = (time.perf_counter() - start) / len(group)
            for task in group:
                rows[task.task_id].seconds = elapsed
        return [rows[t.task_id] for t in tasks]

    def _from_reference(self, task: GapTask, sections: Mapping[int, np.ndarray]) -> np.ndarray:
        """Frames ``(K, C, H, W)``: each nearest known section moved along the reference flow."""
        ds = self.datasets[task.dataset_id]
        targets = [j.slice for j in task.predicted]
        # Inside a gap, or outside the known range (edge=reference): the nearest known
        # section is one of the task's bounds.
        nearest = [nearest_known(s, task.bounds) for s in targets]
        wanted = sorted(set(targets) | set(nearest))
        ref = dict(zip(wanted, read_reference_slices(self.reference, ds.axis_index, wanted)))
        return predict_from_reference(
            self.estimator,
            np.stack([ref[s] for s in targets]),
            np.stack([ref[k] for k in nearest]),
            np.stack([sections[k] for k in nearest]),
            self.reference.peak,
            atlinter=self.placement == Placement.atlinter,
        )

    def _write(
        self,
        task: GapTask,
        sections: Mapping[int, np.ndarray],
        frames: np.ndarray | None,
        model_calls: int,
    ) -> None:
        """Convert ``task``'s slices to the output dtype, with provenance; commit them."""
        ds = self.datasets[task.dataset_id]
        dtype = self.dtypes[ds.id]
        records = []
        block = []
        k = 0
        for job in task.jobs:
            record = {"slice": job.slice, "status": job.status, "software": SOFTWARE}
            if job.source is not None:
                block.append(to_dtype(sections[job.source], dtype))
                record["source"] = job.source
            else:
                block.append(to_dtype(frames[k], dtype))
                k += 1
                record.update(left=task.left, right=task.right, t=job.t,
                              **slice_provenance(self.model, job.t, self.provenance))
                if self.reference is not None:
                    record["known"] = nearest_known(job.slice, task.bounds)
            records.append(record)
        commit_task(self.store, ds, task, np.stack(block), records, model_calls)
