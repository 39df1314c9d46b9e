"""Committing one finished task to the output store: its slices first, then its marker.

The worker decides when and from where a task is committed (the compute path); this
module decides what committing means. The order is what makes a crash harmless: a task
whose marker exists has every slice written, and a task without one is simply redone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from atlinter_ray.dataset import Dataset
from atlinter_ray.planning import GapTask
from atlinter_ray.store import VolumeStore


def commit_task(
    store: VolumeStore,
    ds: Dataset,
    task: GapTask,
    block: np.ndarray,
    records: Sequence[Mapping[str, Any]],
    model_calls: int,
) -> None:
    """Write ``block`` (the task's slices ``(K, C, H, W)`` in the output dtype), then its marker.

    ``records`` is the per-slice provenance, in slice order, that the marker carries.
    """
    # a task's slices are consecutive (planning.GapTask), so they go in one write
    store.write_slices(ds, task.jobs[0].slice, block)
    store.mark_done(
        task.task_id,
        {"task_id": task.task_id, "slices": list(records), "model_calls": model_calls},
    )
