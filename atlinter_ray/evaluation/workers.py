"""The evaluation worker: every configured model on a task's held-out sections, scored.

Models are built once per worker; a task's result carries its score rows and the few
predicted slices drawn in the panels, as plain Python objects (Ray pickles them).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from atlinter_ray.dataset import Dataset, read_sections
from atlinter_ray.dtypes import to_dtype
from atlinter_ray.engine import atlinter_canvas, build_interpolator, predict_gap
from atlinter_ray.evaluation.holdout import slice_geometry
from atlinter_ray.metrics import score_slice
from atlinter_ray.models.base import PairInterpolator
from atlinter_ray.planning import GapTask, Placement

log = logging.getLogger(__name__)

#: Name under which edge held-out sections (copied from the nearest section) are scored.
EDGE_COPY = "edge-copy"


@dataclass(frozen=True)
class EvalSpec:
    """What an evaluation worker needs, small enough to ship to every actor."""

    models: tuple[str, ...]
    params: Mapping[str, Mapping[str, Any]]
    checkpoints: Mapping[str, str]
    datasets: Mapping[str, Dataset]
    #: Task id -> held-out slices whose predictions come back for the panels.
    panel: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    threads: int = 1
    #: ``placement`` (``atlinter``: the predecessor's padded canvas for its RIFE).
    placement: Placement = Placement.exact
    #: Model name -> task id -> the tuning stage's result for that task's kept sections.
    tuning: Mapping[str, Mapping[str, Mapping[str, Any]]] = field(default_factory=dict)


@dataclass
class EvalResult:
    """One task's outcome: score rows per model and slice, and the panels' predictions."""

    task_id: str
    status: str = "failed"
    error: str = ""
    scores: list[dict[str, Any]] = field(default_factory=list)
    #: ``"<model>/<slice>"`` -> predicted slice ``(H, W[, C])`` for the panels.
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


def failed_result(task: GapTask, error: str = "") -> EvalResult:
    """A task's result before it is scored; the driver's for a task no worker ran."""
    return EvalResult(task.task_id, error=error)


def hwc(frame: np.ndarray) -> np.ndarray:
    """``(C, H, W)`` -> the metrics' layout ``(H, W)`` or ``(H, W, C)``."""
    return frame[0] if frame.shape[0] == 1 else np.moveaxis(frame, 0, -1)


class EvalWorker:
    """Scores every configured model on batches of evaluation tasks (models built once)."""

    def __init__(self, spec: EvalSpec) -> None:
        cv2.setNumThreads(spec.threads)
        self.models = {
            name: build_interpolator(name, spec.checkpoints.get(name), spec.params.get(name))
            for name in spec.models
        }
        self.canvas = {n: atlinter_canvas(m, spec.placement) for n, m in self.models.items()}
        self.datasets = dict(spec.datasets)
        self.panel = {k: set(v) for k, v in spec.panel.items()}
        self.tuning = spec.tuning

    def _model(self, name: str, task: GapTask) -> PairInterpolator:
        """The model ``name``, tuned on this task's kept sections when it was tuned."""
        result = self.tuning.get(name, {}).get(task.task_id)
        model = self.models[name]
        return model if result is None else model.tuned(result)  # type: ignore[attr-defined]

    def run(self, tasks: list[GapTask]) -> list[EvalResult]:
        """Score a batch of tasks: the pool's entry point."""
        return [self.run_task(task) for task in tasks]

    def run_task(self, task: GapTask) -> EvalResult:
        """Score one task; failures are reported in the row, never raised."""
        try:
            scores, arrays = self._score(task)
        except Exception as exc:  # report, never hide: the driver counts failures
            log.exception("evaluation task %s failed", task.task_id)
            return failed_result(task, f"{type(exc).__name__}: {exc}")
        return EvalResult(task.task_id, "done", scores=scores, arrays=arrays)

    def _score(self, task: GapTask) -> tuple[list[dict[str, Any]], dict[str, np.ndarray]]:
        """Score rows of every model on the task, and the panel slices' predictions."""
        ds = self.datasets[task.dataset_id]
        targets = [j.slice for j in task.jobs]
        bounds = [*task.bounds, *task.context]
        images = dict(zip(bounds + targets, read_sections(ds, bounds + targets)))
        if task.predicted:
            candidates = {}
            for name in self.models:
                model = self._model(name, task)
                start = time.perf_counter()
                frames = predict_gap(model, images, task, ds.peak, self.canvas[name]).frames[0]
                seconds = (time.perf_counter() - start) / len(task.jobs)
                candidates[name] = (to_dtype(frames, ds.dtype), seconds)
        else:
            copies = np.stack([images[j.copied_from] for j in task.jobs])
            candidates = {EDGE_COPY: (copies, 0.0)}
        scores, arrays = [], {}
        for i, job in enumerate(task.jobs):
            gap, distance = slice_geometry(task, job)
            truth = hwc(images[job.slice])
            for name, (frames, seconds) in candidates.items():
                pred = hwc(frames[i])
                s = score_slice(pred, truth, ds.peak)
                scores.append({
                    "dataset": ds.id, "model": name, "slice": job.slice,
                    "left": task.left, "right": task.right, "gap": gap,
                    "distance": distance, "psnr": s.psnr, "ssim": s.ssim, "mae": s.mae,
                    "seconds": round(seconds, 4),
                })
                if job.slice in self.panel.get(task.task_id, ()):
                    arrays[f"{name}/{job.slice}"] = pred
        return scores, arrays
