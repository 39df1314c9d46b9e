"""Committing one finished task to the output store: its slices first, then its marker.

The worker decides when and from where a task is committed (the compute path); this
module decides what committing means. The order is what makes a crash harmless: a task
whose marker exists has every object written, and a task without one is simply
redone. The marker carries the task's reduction (what finishing needs of its slices,
:class:`~atlinter_ray.finishing.Reduction`), so finishing need not read them back, and a
commit is two requests on an object store: the slab's shard(s), then the marker.
The marker is bound to the image generation and input fingerprint it was written for
(``identity``) and names every object the task stored with its size (a slab task owns
whole shard objects: :mod:`atlinter_ray.layout`), and the slab's slices ``first`` and
``count``, so finishing can prove the dataset complete from one listing of the store.
The marker stays one record per task, so a checksum per object can join the sizes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from atlinter_ray.dataset import Dataset
from atlinter_ray.errors import StorageError, is_storage_error
from atlinter_ray.finishing import reduce_slab
from atlinter_ray.identity import ImageIdentity
from atlinter_ray.layout import as_slab
from atlinter_ray.planning import SlabTask
from atlinter_ray.store import VolumeStore


def commit_task(
    store: VolumeStore,
    ds: Dataset,
    task: SlabTask,
    block: np.ndarray,
    records: Sequence[Mapping[str, Any]],
    model_calls: int,
    identity: ImageIdentity,
) -> None:
    """Write ``block`` (the task's whole slab ``(K, C, H, W)`` in the output dtype), then its marker.

    ``records`` is the per-slice provenance, in slice order, that the marker carries;
    ``identity`` the image generation and input fingerprint the task was planned for.
    A failing store raises :class:`~atlinter_ray.errors.StorageError` naming the task.
    """
    try:
        objects = store.write_slices(ds, task.first, block)
        reduction = reduce_slab(ds, as_slab(ds, block), task.first)
        store.mark_done(identity, task.task_id, {
            "slices": list(records), "model_calls": model_calls, "objects": objects,
            "first": task.first, "count": task.stop - task.first,
        }, reduction.to_bytes())
    except Exception as exc:
        if not is_storage_error(exc) or isinstance(exc, StorageError):
            raise
        raise StorageError(
            f"{task.task_id}: writing to {store.image_url(ds.id)} failed "
            f"({type(exc).__name__}: {str(exc)[:300]}). Fix: check that the output store "
            "is reachable, writable and not full, then rerun the same command."
        ) from exc
