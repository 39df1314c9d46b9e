"""Run slab tasks: in-process (serial) or on an autoscaling Ray actor pool.

Both paths drive the same :class:`~atlinter_ray.worker.TaskWorker` and yield one result
per task as tasks finish (and one per finishing job: :func:`run_work`), so the driver's
progress bar and summary do not care where the work ran. The Ray path hands batches of
tasks to an autoscaling pool of worker actors (:mod:`atlinter_ray.pool`), at most
``max_workers`` of them, each with its own ``gpus_per_worker``. Only task descriptions
(a few hundred bytes) and result records travel through the driver.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Callable, Generator, Iterator, Sequence
from typing import Any, TypeVar

from atlinter_ray.config import ResourcesConfig
from atlinter_ray.errors import ConfigError
from atlinter_ray.finishing import FinishJob, FinishResult
from atlinter_ray.interrupts import keep_handlers
from atlinter_ray.planning import SlabTask
from atlinter_ray.pool import PoolSpec, PoolStats, map_unordered
from atlinter_ray.worker import TaskResult, TaskWorker, WorkerSpec, failed_result

#: What a worker is handed: a batch of slab tasks, or the finishing of one dataset.
WorkItem = list[SlabTask] | FinishJob
#: What comes back: one result per task, one per finishing job.
WorkResult = TaskResult | FinishResult

log = logging.getLogger(__name__)
R = TypeVar("R")
T = TypeVar("T")


def connect(resources: ResourcesConfig) -> None:
    """Connect to the cluster (``resources.address`` or ``RAY_ADDRESS``) or start one.

    A local cluster is started only after :func:`check_local_capacity` agreed that it
    can place one worker: it can never grow. ``ray.init`` replaces the SIGTERM handler;
    the job's own (:mod:`atlinter_ray.interrupts`) is put back.
    """
    import ray

    if ray.is_initialized():
        return
    address = resources.address or os.environ.get("RAY_ADDRESS")
    kwargs: dict[str, Any] = {"log_to_driver": True, "configure_logging": False}
    with keep_handlers():
        if address:
            ray.init(address=address, **kwargs)
        else:
            check_local_capacity(resources)
            ray.init(
                num_cpus=resources.local_cpus,
                num_gpus=resources.local_gpus,
                object_store_memory=resources.object_store_memory,
                include_dashboard=False,
                **kwargs,
            )


def machine_resources() -> dict[str, float]:
    """The CPUs and GPUs a local Ray cluster started here would have, as Ray counts them."""
    from ray._private.accelerators import get_accelerator_manager_for_resource
    from ray._private.utils import get_num_cpus

    cpus = float(get_num_cpus())
    gpus = get_accelerator_manager_for_resource("GPU")
    if gpus is None:
        return {"CPU": cpus, "GPU": 0.0}
    visible = gpus.get_current_process_visible_accelerator_ids()
    count = gpus.get_current_node_num_accelerators()
    return {"CPU": cpus, "GPU": float(count if visible is None else min(count, len(visible)))}


def local_capacity(resources: ResourcesConfig) -> dict[str, float] | None:
    """What the local cluster :func:`connect` would start offers; None when it joins one.

    None too when Ray already runs in this process (a cluster started by someone else,
    which may grow).
    """
    import ray

    if resources.address or os.environ.get("RAY_ADDRESS") or ray.is_initialized():
        return None
    machine = machine_resources()
    return {
        "CPU": machine["CPU"] if resources.local_cpus is None else float(resources.local_cpus),
        "GPU": machine["GPU"] if resources.local_gpus is None else float(resources.local_gpus),
    }


def refuse_unplaceable(resources: ResourcesConfig, capacity: dict[str, float]) -> None:
    """Refuse workers asking for more than a cluster that cannot grow has (``capacity``)."""
    for name, key, wanted in (("GPU", "gpus_per_worker", resources.gpus_per_worker),
                              ("CPU", "cpus_per_worker", resources.cpus_per_worker)):
        have = capacity.get(name, 0.0)
        if wanted > have:
            raise ConfigError(
                f"resources.{key}={wanted:g}: each worker asks for {wanted:g} {name}, but the "
                f"local Ray cluster this job starts (no resources.address, no RAY_ADDRESS) "
                f"has {have:g} {name}s and can never gain more, so no worker could ever "
                f"start. Fix: resources=laptop (or resources.{key}={have:g}), or run on a "
                "cluster that has them: resources.address=ray://HOST:10001 or RAY_ADDRESS"
            )


def check_local_capacity(resources: ResourcesConfig) -> None:
    """Refuse, before any work, workers the local cluster this job would start cannot place."""
    capacity = local_capacity(resources)
    if capacity is not None:
        refuse_unplaceable(resources, capacity)


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
    for key in ("task_timeout_s", "heartbeat_s"):
        value = getattr(resources, key)
        if value is not None and value <= 0:
            raise ConfigError(f"resources.{key}={value}: give a number of seconds > 0")
    if resources.max_storage_errors < 1:
        raise ConfigError(
            f"resources.max_storage_errors={resources.max_storage_errors}: give at least 1"
        )
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
        call_timeout_s=(None if resources.task_timeout_s is None
                        else resources.task_timeout_s * resources.tasks_per_batch),
        heartbeat_s=resources.heartbeat_s,
    )


def map_batches(
    tasks: Sequence[T],
    worker_class: type,
    spec: Any,
    resources: ResourcesConfig,
    failed: Callable[[T, str], R],
    serial: bool = False,
) -> Iterator[R]:
    """Hand ``resources.tasks_per_batch`` tasks per call to ``worker_class(spec).run``.

    On the actor pool (connecting first), or in this process with ``serial`` (no Ray,
    for debugging). Yields the workers' rows; ``failed(task, error)`` stands for a task
    whose actor died.
    """
    chunks = batches(tasks, resources.tasks_per_batch)
    if serial:
        worker = worker_class(spec)
        for batch in chunks:
            yield from worker.run(batch)
        return
    connect(resources)
    for rows in map_unordered(
        worker_class, (spec,), chunks, pool_spec(resources),
        lambda batch, error: [failed(t, error) for t in batch],
    ):
        yield from rows


def batches(tasks: Sequence[T], size: int) -> list[list[T]]:
    """``tasks`` in consecutive batches of ``size``."""
    return [list(tasks[i : i + size]) for i in range(0, len(tasks), size)]


def run_work(
    items: Sequence[WorkItem],
    spec: WorkerSpec,
    resources: ResourcesConfig,
    follow_up: Callable[[WorkResult], list[WorkItem]],
    serial: bool = False,
    stats: PoolStats | None = None,
    stalled: Callable[[], None] | None = None,
) -> Generator[WorkResult, None, None]:
    """Run task batches and finishing jobs, in this process or on the actor pool.

    ``follow_up(result)`` returns the work a result brings (a dataset's finishing job
    after its last task, tasks to redo after finishing found them lost); it runs before
    the rest of the queue. ``stalled()`` is called after calls ran past
    ``resources.task_timeout_s``; what it raises ends the run (:mod:`atlinter_ray.pool`).
    Closing the iterator early ends every worker.
    """
    if serial:
        yield from _serial(TaskWorker(spec), items, follow_up)
        return

    def method(item: WorkItem) -> str:
        return "finish" if isinstance(item, FinishJob) else "run"

    def failed(item: WorkItem, error: str) -> list[WorkResult]:
        if isinstance(item, FinishJob):
            return [FinishResult(item.dataset_id, error=error)]
        return [failed_result(t, error) for t in item]

    def more(results: list[WorkResult]) -> list[WorkItem]:
        return [new for result in _listed(results) for new in follow_up(result)]

    for results in map_unordered(
        TaskWorker, (spec,), list(items), pool_spec(resources), failed, method, more, stats,
        stalled,
    ):
        yield from _listed(results)


def _listed(results: Any) -> list[WorkResult]:
    """A worker call's results as a list (``run`` returns one per task, ``finish`` one)."""
    return list(results) if isinstance(results, list) else [results]


def _serial(
    worker: TaskWorker, items: Sequence[WorkItem], follow_up: Callable[[WorkResult], list[WorkItem]]
) -> Iterator[WorkResult]:
    """The same queue discipline as the pool, in this process."""
    queue = deque(items)
    while queue:
        item = queue.popleft()
        results: list[WorkResult] = (
            [worker.finish(item)] if isinstance(item, FinishJob) else list(worker.run(item))
        )
        for result in results:
            queue.extendleft(reversed(follow_up(result)))
            yield result
