"""Pure planning of an evaluation: which known sections are held out, what predicts them.

::

    known:     1   5   9   13  17        holdout=every_k, k=2
    kept:      1       9       17        gap 8, held-out 5 and 13 at distance 4
    task:      [ 1 -> 9: predict 5 ][ 9 -> 17: predict 13 ]

    known:     1   5   9   13  17        holdout=leave_one_out
    tasks:     [1->9: 5] [5->13: 9] [9->17: 13]   (each from its two neighbours)

Held-out sections with a remaining section on one side only are ``edge-filled`` jobs
copying it, as the pipeline's ``copy`` edge policy would.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from atlinter_ray.evaluation.config import ks
from atlinter_ray.planning import (
    EDGE,
    PREDICTED,
    GapTask,
    Placement,
    SliceJob,
    context_sections,
    slice_position,
)


def _interior(dataset_id: str, left: int, right: int, targets: Sequence[int],
              placement: Placement | str, context: tuple[int, ...] = ()) -> GapTask:
    """A task predicting ``targets`` from the sections ``left`` and ``right``."""
    jobs = tuple(SliceJob(s, PREDICTED, t=slice_position(s, left, right, placement))
                 for s in targets)
    return GapTask(dataset_id, left, right, jobs, context)


def _edge(dataset_id: str, source: int, targets: Sequence[int], before: bool) -> GapTask:
    """A task scoring ``targets`` filled by copying ``source`` (no section on one side)."""
    jobs = tuple(SliceJob(s, EDGE, source=source) for s in targets)
    return GapTask(dataset_id, None if before else source, source if before else None, jobs)


def plan_holdout(
    dataset_id: str, section_numbers: Iterable[int], holdout: str, k: int = 2,
    placement: Placement | str = Placement.exact, context: int = 0,
) -> list[GapTask]:
    """Evaluation tasks of one dataset: held-out sections and what predicts them.

    ``every_k`` keeps known sections ``0, k, 2k, ...`` (in sorted order) and holds out
    the others; ``leave_one_out`` holds out each section alone. Interior targets are
    ``predicted`` jobs at their position between the bounding kept sections; targets
    with a kept section on one side only are ``edge-filled`` jobs copying it.
    ``context`` kept sections on each side beyond the bounds are listed for context
    models (never a held-out one: with ``leave_one_out``, the neighbours of the pair).
    """
    known = sorted(section_numbers)
    if holdout == "leave_one_out":
        tasks = [_edge(dataset_id, known[1], [known[0]], before=True)]
        others = [[s for s in known if s != known[i]] for i in range(len(known))]
        tasks += [_interior(dataset_id, known[i - 1], known[i + 1], [known[i]], placement,
                            context_sections(others[i], i - 1, context))
                  for i in range(1, len(known) - 1)]
        tasks.append(_edge(dataset_id, known[-2], [known[-1]], before=False))
        return tasks
    kept = known[:: ks(k)[0]]
    tasks = []
    for i, (left, right) in enumerate(zip(kept, kept[1:])):
        targets = [s for s in known if left < s < right]
        tasks.append(_interior(dataset_id, left, right, targets, placement,
                               context_sections(kept, i, context)))
    tail = [s for s in known if s > kept[-1]]
    if tail:
        tasks.append(_edge(dataset_id, kept[-1], tail, before=False))
    return tasks


def kept_sections(tasks: Sequence[GapTask]) -> tuple[int, ...]:
    """The sections one holdout keeps: what tuning may read (never a held-out one)."""
    scored = {j.slice for t in tasks for j in t.jobs}
    used = {s for t in tasks for s in (t.left, t.right, *t.context) if s is not None}
    return tuple(sorted(used - scored))


def slice_geometry(task: GapTask, job: SliceJob) -> tuple[int | None, int]:
    """``(gap, distance)`` of a held-out slice: gap is None for edge slices."""
    if task.left is None or task.right is None:
        (nearest,) = task.bounds
        return None, abs(job.slice - nearest)
    return task.right - task.left, min(job.slice - task.left, task.right - job.slice)


def panel_slices(tasks: Sequence[GapTask], n: int) -> dict[str, tuple[int, ...]]:
    """Up to ``n`` interior held-out slices spread evenly over the tasks, by task id."""
    interior = sorted((j.slice, t.task_id) for t in tasks for j in t.predicted)
    if n <= 0 or not interior:
        return {}
    if n < len(interior):
        picks = np.linspace(0, len(interior) - 1, n + 2)[1:-1]
        interior = sorted({interior[int(round(p))] for p in picks})
    chosen: dict[str, tuple[int, ...]] = {}
    for s, task_id in interior:
        chosen[task_id] = chosen.get(task_id, ()) + (s,)
    return chosen


def holdout_summary(tasks: Sequence[GapTask]) -> dict[str, list[int]]:
    """Which sections one holdout kept (``bounding``) and held out (interior, edge)."""
    interior = sorted(j.slice for t in tasks for j in t.predicted)
    edge = sorted(j.slice for t in tasks for j in t.jobs if j.status == EDGE)
    bounds = sorted({s for t in tasks for s in (t.left, t.right) if s is not None})
    return {"held_out": interior, "edge": edge, "bounding": bounds}
