"""The stack-adaptive tuning stage: tune the model on each stack's known sections.

A model with a ``tune`` method (``fusion`` with ``model.params.tune=true``) learns per
stack from the sections it is given, before any gap task runs::

    known sections ──> TuneWorker (on the pool, one job per stack) ──> tuning result
          │                 key = sha256(model settings, section numbers, their bytes)
          └─ cache: <output>/_tuning/<dataset>/<key>.json  (a rerun reads it, no tuning)

The interpolation job tunes on every known section; the evaluation job only on the
sections it keeps, so tuning never sees a held-out slice. The result (the chosen
settings, the scores that chose them, the seconds spent, whether it came from the
cache) travels to the gap-task workers in their spec and into each slice's provenance.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from atlinter_ray.config import ResourcesConfig
from atlinter_ray.dataset import Dataset, read_sections
from atlinter_ray.engine import build_interpolator
from atlinter_ray.errors import AtlinterRayError
from atlinter_ray.execution import map_batches
from atlinter_ray.models.base import PairInterpolator
from atlinter_ray.store import VolumeStore

log = logging.getLogger(__name__)


class TuningError(AtlinterRayError, RuntimeError):
    """A tuning job failed while running; rerunning the same command retries it."""

    exit_status = 1


@dataclass(frozen=True, slots=True)
class TuneJob:
    """Tune the model for one stack from the known sections ``numbers`` (and no others)."""

    dataset_id: str
    numbers: tuple[int, ...]
    #: Name of the result: the dataset id, or e.g. ``<id>/k=2`` for one evaluation holdout.
    label: str = ""

    @property
    def task_id(self) -> str:
        """The result's name (the pool reports by it)."""
        return self.label or self.dataset_id


@dataclass(frozen=True)
class TuneSpec:
    """What a tuning worker needs: the model, the datasets, where the cache lives."""

    model_name: str
    checkpoint: str | None
    model_params: Mapping[str, Any]
    datasets: Mapping[str, Dataset]
    cache_root: str
    cache_storage_options: Mapping[str, Any] = field(default_factory=dict)
    threads: int = 1


@dataclass
class TuneResult:
    """One stack's tuning: the settings chosen (``result``), or the error."""

    task_id: str
    status: str = "failed"
    error: str = ""
    result: dict[str, Any] = field(default_factory=dict)


def is_tunable(model: PairInterpolator) -> bool:
    """True when the model asks for the tuning stage (``model.params.tune=true``)."""
    return bool(getattr(model, "tune_enabled", False))


def tuning_key(model: PairInterpolator, numbers: Sequence[int], sections: np.ndarray) -> str:
    """Content address of one tuning: model, settings, section numbers and section bytes."""
    h = hashlib.sha256()
    settings = {"model": model.name, **model.settings()}  # type: ignore[attr-defined]
    h.update(json.dumps(settings, sort_keys=True).encode())
    h.update(json.dumps(list(numbers)).encode())
    h.update(str(sections.dtype).encode() + str(sections.shape).encode())
    h.update(np.ascontiguousarray(sections).tobytes())
    return h.hexdigest()[:32]


class TuneWorker:
    """Tunes the model per stack; reads and writes the tuning cache itself."""

    def __init__(self, spec: TuneSpec) -> None:
        cv2.setNumThreads(spec.threads)
        self.model = build_interpolator(spec.model_name, spec.checkpoint, spec.model_params)
        self.datasets = dict(spec.datasets)
        self.store = VolumeStore(spec.cache_root, spec.cache_storage_options)

    def run(self, jobs: list[TuneJob]) -> list[TuneResult]:
        """Tune every job; failures are reported in the row, never raised."""
        rows = []
        for job in jobs:
            try:
                rows.append(TuneResult(job.task_id, "done", result=self.tune(job)))
            except Exception as exc:  # report, never hide: the driver stops the run
                log.exception("tuning %s failed", job.task_id)
                rows.append(TuneResult(job.task_id, error=f"{type(exc).__name__}: {exc}"))
        return rows

    def tune(self, job: TuneJob) -> dict[str, Any]:
        """The cached result for these sections, else a fresh tuning (then cached)."""
        ds = self.datasets[job.dataset_id]
        sections = read_sections(ds, job.numbers)
        key = tuning_key(self.model, job.numbers, sections)
        name = f"_tuning/{ds.id}/{key}.json"
        cached = self.store.read_bytes(name)
        if cached is not None:
            return {**json.loads(cached), "cached": True}
        start = time.perf_counter()
        result = self.model.tune(sections, job.numbers, ds.peak)  # type: ignore[attr-defined]
        result = {**result, "key": key, "sections": len(job.numbers),
                  "seconds": round(time.perf_counter() - start, 3)}
        self.store.write_bytes(name, json.dumps(result, sort_keys=True).encode())
        return {**result, "cached": False}


def failed_tune(job: TuneJob, error: str = "") -> TuneResult:
    """A tuning job's row when its actor died."""
    return TuneResult(job.task_id, error=error)


def run_tuning(
    jobs: Sequence[TuneJob], spec: TuneSpec, resources: ResourcesConfig, serial: bool
) -> dict[str, dict[str, Any]]:
    """Run every tuning job (in-process or on the actor pool); results by job name.

    Raises :class:`TuningError` naming the failed stacks: the gap tasks never run with
    a model that was meant to be tuned and was not.
    """
    rows = map_batches(jobs, TuneWorker, spec, resources, failed_tune, serial)
    results, failures = {}, []
    for row in rows:
        if row.status == "done":
            results[row.task_id] = row.result
            log.info("tuned %s in %.1f s%s: %s curved=%s", row.task_id,
                     row.result["seconds"], " (cached)" if row.result["cached"] else "",
                     row.result["members"], row.result["curved"])
        else:
            failures.append(f"{row.task_id}: {row.error}")
    if failures:
        raise TuningError(
            f"tuning failed for {len(failures)} stack(s): {'; '.join(failures)}. "
            "Rerun the same command to retry, or set model.params.tune=false"
        )
    return results
