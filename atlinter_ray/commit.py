"""Committing one finished task from a worker: the ledger's commit, with its errors named.

The worker decides when and from where a task is committed (the compute path); what
committing means (objects with their checksums, then the marker, which carries the reduction) is
:func:`atlinter_ray.ledger.commit`'s. Here the task's reduction is made (what finishing
needs of its slices, :class:`~atlinter_ray.finishing.Reduction`), and a failing store
becomes a :class:`~atlinter_ray.errors.StorageError` naming the task and the fix. The
driver's fencing token travels with the commit: a worker of a driver whose lease another
driver took over never marks a task done (:func:`~atlinter_ray.lease.check_fence`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from atlinter_ray import ledger
from atlinter_ray.dataset import Dataset
from atlinter_ray.errors import StorageError, is_storage_error
from atlinter_ray.finishing import reduce_slab
from atlinter_ray.identity import ImageIdentity
from atlinter_ray.layout import as_slab
from atlinter_ray.lease import FenceToken
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
    fence: FenceToken | None = None,
) -> None:
    """Commit ``block`` (the task's whole slab ``(K, C, H, W)`` in the output dtype).

    ``records`` is the per-slice provenance, in slice order, that the marker carries;
    ``identity`` the image generation and input fingerprint the task was planned for;
    ``fence`` the driver's lease token (None: unfenced), checked before the marker.
    A failing store raises :class:`~atlinter_ray.errors.StorageError` naming the task.
    """
    try:
        reduction = reduce_slab(ds, as_slab(ds, block), task.first).to_bytes()
        ledger.commit(store, ds, identity, task, block, reduction, records, model_calls,
                      fence)
    except Exception as exc:
        if not is_storage_error(exc) or isinstance(exc, StorageError):
            raise
        raise StorageError(
            f"{task.task_id}: writing to {store.image_url(ds.id)} failed "
            f"({type(exc).__name__}: {str(exc)[:300]}). Fix: check that the output store "
            "is reachable, writable and not full, then rerun the same command."
        ) from exc
