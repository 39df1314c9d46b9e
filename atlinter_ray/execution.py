"""Run gap tasks: in-process (serial) or on an autoscaling Ray actor pool.

Both paths drive the same :class:`~atlinter_ray.worker.TaskWorker` and yield one result
row per task as tasks finish, so the driver's progress bar and summary do not care
where the work ran. The Ray path is Ray Data's own answer to a pool of stateful GPU
workers: ``map_batches`` with the worker class and an ``ActorPoolStrategy`` that grows
from ``min_workers`` to ``max_workers`` actors while tasks are queued. Only task
descriptions (a few hundred bytes) and result rows travel through the driver.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from typing import Any

from atlinter_ray.config import ResourcesConfig
from atlinter_ray.errors import ConfigError
from atlinter_ray.planning import GapTask
from atlinter_ray.worker import RESULT_COLUMNS, TaskWorker, WorkerSpec

log = logging.getLogger(__name__)


def run_serial(
    tasks: list[GapTask], spec: WorkerSpec, tasks_per_batch: int = 1
) -> Iterator[dict[str, Any]]:
    """Run every task in this process (no Ray): for debugging and small data."""
    worker = TaskWorker(spec)
    for start in range(0, len(tasks), tasks_per_batch):
        yield from worker.run(tasks[start : start + tasks_per_batch])


def connect(resources: ResourcesConfig) -> None:
    """Connect to the cluster (``resources.address`` or ``RAY_ADDRESS``) or start one."""
    import ray

    if ray.is_initialized():
        return
    address = resources.address or os.environ.get("RAY_ADDRESS")
    kwargs: dict[str, Any] = {"log_to_driver": True, "configure_logging": False}
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(
            num_cpus=resources.local_cpus,
            num_gpus=resources.local_gpus,
            object_store_memory=resources.object_store_memory,
            include_dashboard=False,
            **kwargs,
        )


def check_resources(resources: ResourcesConfig) -> None:
    """Refuse pool settings that can never run, before any actor starts."""
    if not 0 <= resources.min_workers <= resources.max_workers or resources.max_workers < 1:
        raise ConfigError(
            f"resources.min_workers={resources.min_workers}, resources.max_workers="
            f"{resources.max_workers}: need 0 <= min_workers <= max_workers and "
            "max_workers >= 1"
        )
    if resources.tasks_per_batch < 1:
        raise ConfigError("resources.tasks_per_batch must be at least 1")


def run_on_ray(
    tasks: list[GapTask], spec: WorkerSpec, resources: ResourcesConfig
) -> Iterator[dict[str, Any]]:
    """Run ``tasks`` on an autoscaling actor pool; yield result rows as they finish."""
    items = [{"task": t.to_json()} for t in tasks]
    yield from map_on_actor_pool(items, TaskWorker, {"spec": spec}, resources, RESULT_COLUMNS)


def map_on_actor_pool(
    items: list[dict[str, Any]],
    worker_class: type,
    constructor_kwargs: dict[str, Any],
    resources: ResourcesConfig,
    columns: Sequence[str],
) -> Iterator[dict[str, Any]]:
    """Feed ``items`` (one block each) to a pool of ``worker_class`` actors; yield their rows.

    ``worker_class(**constructor_kwargs)`` is built once per actor and called with
    numpy batches of ``resources.tasks_per_batch`` items; it returns a batch whose
    ``columns`` become plain Python rows here.
    """
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the driver shows one bar over tasks
    ctx.print_on_execution_start = False
    pool = ray.data.ActorPoolStrategy(
        min_size=max(1, resources.min_workers),
        max_size=resources.max_workers,
    )
    results = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        worker_class,
        fn_constructor_kwargs=constructor_kwargs,
        batch_size=resources.tasks_per_batch,
        batch_format="numpy",
        compute=pool,
        num_gpus=resources.gpus_per_worker or None,
        num_cpus=resources.cpus_per_worker,
    )
    for row in results.iter_rows():
        yield {c: _plain(row[c]) for c in columns}


def _plain(value: Any) -> Any:
    """numpy scalars -> Python scalars for JSON summaries."""
    return value.item() if hasattr(value, "item") else value
