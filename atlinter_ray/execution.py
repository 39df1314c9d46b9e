"""Run gap tasks: in-process (serial) or on an autoscaling Ray actor pool.

Both paths drive the same :class:`~atlinter_ray.worker.TaskWorker` and yield one result
row per task as tasks finish, so the driver's progress bar and summary do not care
where the work ran. The Ray path hands batches of tasks to an autoscaling pool of worker
actors (:mod:`atlinter_ray.pool`), at most ``max_workers`` of them, each with its own
``gpus_per_worker``. Only task descriptions (a few hundred bytes) and result rows
travel through the driver.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

from atlinter_ray.config import ResourcesConfig
from atlinter_ray.errors import ConfigError
from atlinter_ray.planning import GapTask
from atlinter_ray.pool import PoolSpec, map_unordered
from atlinter_ray.worker import TaskResult, TaskWorker, WorkerSpec, failed_result

log = logging.getLogger(__name__)
R = TypeVar("R")
T = TypeVar("T")


def run_serial(
    tasks: list[GapTask], spec: WorkerSpec, tasks_per_batch: int = 1
) -> Iterator[TaskResult]:
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
    if resources.start_timeout_s is not None and resources.start_timeout_s <= 0:
        raise ConfigError(
            f"resources.start_timeout_s={resources.start_timeout_s}: give a number of "
            "seconds > 0, or null to wait for workers forever"
        )


def pool_spec(resources: ResourcesConfig) -> PoolSpec:
    """The actor pool that ``resources`` asks for."""
    return PoolSpec(
        min_workers=resources.min_workers,
        max_workers=resources.max_workers,
        num_cpus=resources.cpus_per_worker,
        num_gpus=resources.gpus_per_worker,
        start_timeout_s=resources.start_timeout_s,
    )


def run_on_ray(
    tasks: list[GapTask], spec: WorkerSpec, resources: ResourcesConfig
) -> Iterator[TaskResult]:
    """Run ``tasks`` on an autoscaling actor pool; yield results as they finish."""
    yield from map_batches(tasks, TaskWorker, spec, resources, failed_result)


def map_batches(
    tasks: Sequence[T],
    worker_class: type,
    spec: Any,
    resources: ResourcesConfig,
    failed: Callable[[T, str], R],
) -> Iterator[R]:
    """Hand ``resources.tasks_per_batch`` tasks per call to ``worker_class(spec).run``.

    Yields the workers' rows; ``failed(task, error)`` stands for a task whose actor died.
    """
    n = resources.tasks_per_batch
    batches = [list(tasks[i : i + n]) for i in range(0, len(tasks), n)]
    for rows in map_unordered(
        worker_class, (spec,), batches, pool_spec(resources),
        lambda batch, error: [failed(t, error) for t in batch],
    ):
        yield from rows
