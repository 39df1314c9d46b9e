"""Planning: pure functions from datasets to gap tasks, and gap tasks to slab tasks.

Every slice of the output volume has exactly one writer task, so a task can be
redone at any time without touching another task's slices::

    slices:   0 1 2 | 3 4 5 6 7 8 9 10 | 11 ... 18 | 19 | 20 21
    known:          3                  11          19
    tasks:  [ lead ][ gap 3->11        ][ gap 11->19 ][ tail     ]
             edge    measured 3 +        measured 11 + measured 19 +
             0..2    predicted 4..10     predicted     edge 20..21

A gap task reads its two bounding known sections, copies the left one (measured)
and predicts the slices between them. A model that looks beyond the bounding pair
(:class:`~atlinter_ray.models.base.ContextInterpolator`, e.g. curved trajectories
through four sections) is planned with ``context=1``: each gap task then also lists
the known section before ``left`` and the one after ``right`` in ``context`` and reads
them, but still writes only its own slices::

    known:    3        11        19        27
    task 11->19:  context (3, 27), bounds 11 and 19, writes 11..18

The leading task fills the slices before the
first known section and the trailing task writes the last known section and the
slices after it, following the edge policy: ``copy`` (the nearest known section, as
the predecessor's ``GeneInterpolate`` does), ``empty`` (left at the fill value, 0) or,
with a reference volume, ``reference`` (predicted from the nearest known section, as its
``GeneOpticalFlow`` does; such slices have no ``t``).

The unit of work that writes the output is the **slab task** (:func:`plan_slabs`): the
output is stored in objects ``K`` slices deep (``output.slab``, :mod:`atlinter_ray.layout`),
and one task owns all slices of slabs ``[k*K, (k+1)*K)``, whatever they are (measured,
predicted, edge-filled, or left empty). Its ``parts`` are the gap tasks above cut to the
slab; a gap that crosses a slab boundary is computed by both slab tasks, each for its
own slices (an any-t model then costs nothing extra; a bisection repeats the shared
ancestors, a flow model the pair's flow)::

    slices:   0 .. 7 | 8 .. 15 | 16 .. 23        (K = 8; known 3, 11, 19)
    slab 0-7:   lead 0..2, measured 3, gap 3->11 for 4..7
    slab 8-15:  gap 3->11 for 8..10, measured 11, gap 11->19 for 12..15
    slab 16-23: gap 11->19 for 16..18, measured 19, tail 20..

Each predicted slice gets a fractional position ``t`` between its two sections:

* ``exact``: its true position, ``(s - left) / (right - left)``;
* ``atlinter``: the predecessor's choice among the ``2**n - 1`` bisection frames,
  ``n = ceil(log2(gap))``: the one nearest to ``s``, the lower one on a tie, with
  the same floating-point arithmetic, so ties resolve as they did there.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TypeVar

import numpy as np

from atlinter_ray.errors import ConfigError

E = TypeVar("E", bound=StrEnum)


class Placement(StrEnum):
    """Where a predicted slice sits between its two sections (``interpolation.placement``)."""

    exact = "exact"
    atlinter = "atlinter"


class EdgePolicy(StrEnum):
    """How slices outside the known sections are filled (``interpolation.edge``).

    ``reference`` predicts them like the others, each moved along the reference's flow
    from the nearest known section (reference-guided mode only), as the predecessor's
    ``GeneOpticalFlow`` did.
    """

    copy = "copy"
    empty = "empty"
    reference = "reference"


MEASURED, PREDICTED, EDGE = "measured", "predicted", "edge-filled"
#: Deepest bisection level: gaps up to 2**16 slices, far beyond any section spacing.
MAX_BISECTION_DEPTH = 16


@dataclass(frozen=True, slots=True)
class SliceJob:
    """How one output slice is made: copied from ``source`` or predicted at ``t``."""

    slice: int
    status: str
    source: int | None = None
    t: float | None = None

    @property
    def copied_from(self) -> int:
        """``source`` of a measured or edge-filled slice; ValueError for a predicted one."""
        if self.source is None:
            raise ValueError(f"slice {self.slice} is {self.status}: it copies no section")
        return self.source


@dataclass(frozen=True, slots=True)
class GapTask:
    """One unit of work: the slices between two known sections of one dataset.

    ``left``/``right`` are the bounding known sections (``None`` outside the known
    range); ``jobs`` lists every slice the task writes, in slice order; ``context``
    lists known sections beyond the bounds that the model also reads (before ``left``
    and after ``right``, sorted; empty for two-section models and at the ends).
    """

    dataset_id: str
    left: int | None
    right: int | None
    jobs: tuple[SliceJob, ...]
    context: tuple[int, ...] = ()

    @property
    def task_id(self) -> str:
        """Deterministic id: same dataset and bounds give the same id on every run."""
        lo = "start" if self.left is None else str(self.left)
        hi = "end" if self.right is None else str(self.right)
        return f"{self.dataset_id}/{lo}-{hi}"

    @property
    def predicted(self) -> tuple[SliceJob, ...]:
        """The jobs that need the model."""
        return tuple(j for j in self.jobs if j.status == PREDICTED)

    @property
    def pair(self) -> tuple[int, int]:
        """``(left, right)`` of a task between two known sections; ValueError at the edges."""
        if self.left is None or self.right is None:
            raise ValueError(f"task {self.task_id} lies outside the known sections: no pair")
        return self.left, self.right

    @property
    def positions(self) -> tuple[float, ...]:
        """Position ``t`` of each slice predicted between the bounds, in slice order."""
        return tuple(j.t for j in self.predicted if j.t is not None)

    @property
    def bounds(self) -> tuple[int, ...]:
        """The task's known bounding sections (one for the edge tasks)."""
        return tuple(s for s in (self.left, self.right) if s is not None)

    @property
    def sources(self) -> tuple[int, ...]:
        """Known sections the task reads."""
        wanted = {j.source for j in self.jobs if j.source is not None}
        if self.predicted:
            wanted |= set(self.bounds)
            wanted |= set(self.context)
        return tuple(sorted(wanted))


def atlinter_position(slice_number: int, left: int, right: int) -> float:
    """``t`` of the predecessor's bisection frame nearest to ``slice_number``."""
    n_repeat = math.ceil(math.log2(right - left))
    positions = np.linspace(left, right, 2**n_repeat + 1)[1:-1]
    index = min(range(len(positions)), key=lambda i: abs(positions[i] - slice_number))
    return float((index + 1) / 2**n_repeat)


def slice_position(
    slice_number: int, left: int, right: int, placement: Placement | str
) -> float:
    """Fractional position ``t`` in (0, 1) of ``slice_number`` between two sections."""
    if placement == Placement.exact:
        return (slice_number - left) / (right - left)
    return atlinter_position(slice_number, left, right)


def as_choice(enum: type[E], value: str, key: str) -> E:
    """``value`` as a member of ``enum``; ConfigError listing the choices otherwise."""
    try:
        return enum(value)
    except ValueError:
        raise ConfigError(f"{key}={value!r}: choose one of {[e.value for e in enum]}") from None


def plan_dataset(
    dataset_id: str,
    section_numbers: Iterable[int],
    n_slices: int,
    placement: Placement | str = Placement.exact,
    edge: EdgePolicy | str = EdgePolicy.copy,
    context: int = 0,
) -> list[GapTask]:
    """All tasks that together write every slice ``0..n_slices-1`` of one dataset.

    ``context``: known sections each gap task also reads on each side beyond its bounds.
    """
    placement = as_choice(Placement, placement, "interpolation.placement")
    edge = as_choice(EdgePolicy, edge, "interpolation.edge")
    known = sorted(section_numbers)
    first, last = known[0], known[-1]
    tasks: list[GapTask] = []
    if first > 0 and edge != EdgePolicy.empty:
        tasks.append(GapTask(dataset_id, None, first,
                             tuple(_edge_job(s, first, edge) for s in range(first))))
    for i, (left, right) in enumerate(zip(known, known[1:])):
        jobs = [SliceJob(left, MEASURED, source=left)]
        jobs += [
            SliceJob(s, PREDICTED, t=slice_position(s, left, right, placement))
            for s in range(left + 1, right)
        ]
        extra = context_sections(known, i, context) if len(jobs) > 1 else ()
        tasks.append(GapTask(dataset_id, left, right, tuple(jobs), extra))
    tail = [SliceJob(last, MEASURED, source=last)]
    if edge != EdgePolicy.empty:
        tail += [_edge_job(s, last, edge) for s in range(last + 1, n_slices)]
    tasks.append(GapTask(dataset_id, last, None, tuple(tail)))
    return tasks


@dataclass(frozen=True, slots=True)
class SlabTask:
    """One unit of work: every slice of one slab ``first..stop-1`` of one dataset.

    ``parts`` are the gap tasks cut to the slab's slices, in slice order; slices that no
    part lists (``interpolation.edge=empty``) are written as zeros.
    """

    dataset_id: str
    first: int
    stop: int
    parts: tuple[GapTask, ...]

    @property
    def task_id(self) -> str:
        """Deterministic id: same dataset and slab give the same id on every run."""
        return f"{self.dataset_id}/{self.first}-{self.stop - 1}"

    @property
    def jobs(self) -> tuple[SliceJob, ...]:
        """Every slice job of the slab, in slice order."""
        return tuple(j for part in self.parts for j in part.jobs)

    @property
    def predicted(self) -> tuple[SliceJob, ...]:
        """The jobs that need the model."""
        return tuple(j for part in self.parts for j in part.predicted)

    @property
    def sources(self) -> tuple[int, ...]:
        """Known sections the task reads."""
        return tuple(sorted({s for part in self.parts for s in part.sources}))


def plan_slabs(gaps: Sequence[GapTask], n_slices: int, slab: int) -> list[SlabTask]:
    """Gap tasks of one dataset regrouped into tasks that own whole slabs of ``slab`` slices.

    Every slab holding at least one planned slice becomes a task (a slab with none, in
    an empty edge, is left unwritten: it reads as zeros).
    """
    if slab < 1:
        raise ConfigError(f"output.slab={slab}: give a positive number of slices")
    tasks = []
    for first in range(0, n_slices, slab):
        stop = min(first + slab, n_slices)
        parts = []
        for gap in gaps:
            jobs = tuple(j for j in gap.jobs if first <= j.slice < stop)
            if jobs:
                parts.append(GapTask(gap.dataset_id, gap.left, gap.right, jobs, gap.context))
        if parts:
            tasks.append(SlabTask(parts[0].dataset_id, first, stop, tuple(parts)))
    return tasks


def _edge_job(slice_number: int, nearest: int, edge: EdgePolicy) -> SliceJob:
    """A slice outside the known range: a copy of ``nearest``, or predicted from it."""
    if edge == EdgePolicy.reference:
        return SliceJob(slice_number, PREDICTED)
    return SliceJob(slice_number, EDGE, source=nearest)


def context_sections(known: Sequence[int], i: int, n: int) -> tuple[int, ...]:
    """Up to ``n`` known sections before ``known[i]`` and after ``known[i + 1]`` (sorted)."""
    if n <= 0:
        return ()
    return tuple(known[max(0, i - n) : i]) + tuple(known[i + 2 : i + 2 + n])


def is_dyadic(t: float) -> bool:
    """True when ``t`` in (0, 1) is ``m / 2**k`` with ``k <= MAX_BISECTION_DEPTH``."""
    _, den = float(t).as_integer_ratio()  # every float is m/2^k; 1/3 has a huge k
    return 0 < t < 1 and den <= 2**MAX_BISECTION_DEPTH


def bisection_nodes(positions: Sequence[float]) -> list[list[float]]:
    """Tree nodes a midpoint-only model must compute to reach dyadic ``positions``.

    Returns the nodes level by level (coarsest first); a node at level ``d`` is the
    midpoint of its two neighbours at ``t ± 2**-d``, which are 0, 1 or nodes of
    earlier levels. Only the ancestors of the wanted positions are listed, so the cost
    is what the targets need rather than the full ``2**n - 1`` tree.
    """
    needed: set[tuple[int, int]] = set()

    def visit(num: int, depth: int) -> None:
        while num % 2 == 0 and depth > 0:
            num, depth = num // 2, depth - 1
        if depth == 0 or (num, depth) in needed:
            return
        needed.add((num, depth))
        visit(num - 1, depth)
        visit(num + 1, depth)

    for t in positions:
        if not is_dyadic(t):
            raise ConfigError(
                f"position {t} is not a dyadic fraction in (0, 1): a midpoint-only model "
                "cannot reach it; set interpolation.exact_fallback.name to a model with "
                "arbitrary t (e.g. dis, rife_v4) or use interpolation.placement=atlinter"
            )
        num, den = float(t).as_integer_ratio()
        visit(num, den.bit_length() - 1)
    levels: dict[int, list[float]] = {}
    for num, depth in needed:
        levels.setdefault(depth, []).append(num / 2**depth)
    return [sorted(levels[d]) for d in sorted(levels)]
