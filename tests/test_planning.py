"""Planning is pure: every slice has one writer, positions follow the placement."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest

from atlinter_ray.errors import ConfigError
from atlinter_ray.planning import (
    EDGE,
    MEASURED,
    PREDICTED,
    atlinter_position,
    bisection_nodes,
    plan_dataset,
)


@pytest.mark.parametrize("edge", ["copy", "empty"])
def test_every_slice_written_exactly_once(edge: str) -> None:
    known = [4, 5, 9, 17, 40]
    tasks = plan_dataset("g", known, 45, edge=edge)
    slices = [j.slice for t in tasks for j in t.jobs]
    assert len(slices) == len(set(slices))
    expected = set(range(45)) if edge == "copy" else set(range(4, 41))
    assert set(slices) == expected
    status = {j.slice: j.status for t in tasks for j in t.jobs}
    assert all(status[s] == MEASURED for s in known)
    assert {s for s, v in status.items() if v == PREDICTED} == set(range(4, 41)) - set(known)
    if edge == "copy":
        sources = {j.slice: j.source for t in tasks for j in t.jobs if j.status == EDGE}
        assert sources == {**{s: 4 for s in range(4)}, **{s: 40 for s in range(41, 45)}}


def test_reference_edges_are_predicted_from_the_nearest_section() -> None:
    """``edge=reference``: the predecessor's GeneOpticalFlow predicts edge slices too."""
    tasks = plan_dataset("g", [4, 9], 12, edge="reference")
    slices = sorted(j.slice for t in tasks for j in t.jobs)
    assert slices == list(range(12))
    lead, _, tail = tasks
    assert (lead.left, lead.right, lead.bounds) == (None, 4, (4,))
    assert all(j.status == PREDICTED and j.t is None and j.source is None for j in lead.jobs)
    assert tail.bounds == (9,) and tail.sources == (9,)
    assert [j.status for j in tail.jobs] == [MEASURED, PREDICTED, PREDICTED]


def test_typed_accessors_refuse_what_a_job_or_task_lacks() -> None:
    """``pair``, ``positions`` and ``copied_from`` give ints and floats, or say why not."""
    lead, gap, tail = plan_dataset("g", [4, 8], 10, edge="copy")
    assert gap.pair == (4, 8) and gap.positions == (0.25, 0.5, 0.75)
    assert lead.positions == () and [j.copied_from for j in lead.jobs] == [4] * 4
    with pytest.raises(ValueError, match="g/8-end lies outside the known sections"):
        _ = tail.pair
    with pytest.raises(ValueError, match="slice 5 is predicted: it copies no section"):
        _ = gap.jobs[1].copied_from
    (edge_task, _, _) = plan_dataset("g", [4, 8], 10, edge="reference")
    assert edge_task.positions == ()  # predicted from the reference, at no position t


def test_task_ids_are_deterministic_and_survive_pickling() -> None:
    a = plan_dataset("gene", [17, 3, 11], 22)
    b = plan_dataset("gene", [3, 11, 17], 22)
    assert [t.task_id for t in a] == [t.task_id for t in b] == [
        "gene/start-3", "gene/3-11", "gene/11-17", "gene/17-end"
    ]
    assert all(pickle.loads(pickle.dumps(t)) == t for t in a)  # how Ray ships tasks


def test_exact_positions_are_true_fractions() -> None:
    (task,) = [t for t in plan_dataset("g", [0, 6], 7) if t.left == 0]
    assert [j.t for j in task.predicted] == [k / 6 for k in range(1, 6)]


def _predecessor_choice(s: int, left: int, right: int) -> float:
    """The predecessor's rule, written out: nearest of 2**n - 1 frames, first on ties."""
    n = math.ceil(math.log2(right - left))
    positions = list(np.linspace(left, right, 2**n + 1)[1:-1])
    best = min(range(len(positions)), key=lambda i: abs(positions[i] - s))
    return positions[best]


@pytest.mark.parametrize("gap", [2, 3, 5, 6, 8, 12, 17])
def test_atlinter_positions_pick_the_predecessor_frame(gap: int) -> None:
    left = 10
    for s in range(left + 1, left + gap):
        t = atlinter_position(s, left, left + gap)
        assert left + t * gap == pytest.approx(_predecessor_choice(s, left, left + gap))
        _, den = t.as_integer_ratio()
        assert den & (den - 1) == 0  # dyadic


def test_bisection_computes_only_needed_nodes() -> None:
    assert bisection_nodes([0.5]) == [[0.5]]
    assert bisection_nodes([0.125]) == [[0.5], [0.25], [0.125]]
    full = [k / 16 for k in range(1, 16)]
    assert sum(map(len, bisection_nodes(full))) == 15
    # the 16 slices of a gap of 17: the predecessor spends 31 calls, we need fewer
    needed = {atlinter_position(s, 0, 17) for s in range(1, 17)}
    assert sum(map(len, bisection_nodes(sorted(needed)))) < 31
    with pytest.raises(ConfigError, match="placement=atlinter"):
        bisection_nodes([1 / 3])


def test_bad_policies_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="interpolation.placement"):
        plan_dataset("g", [0, 4], 5, placement="nearest")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="interpolation.edge"):
        plan_dataset("g", [0, 4], 5, edge="mirror")  # type: ignore[arg-type]
