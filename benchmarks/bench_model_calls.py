"""Model calls per missing slice for midpoint-only models: ours vs the predecessor.

The predecessor computes the whole bisection tree of every gap, ``2**ceil(log2 gap) - 1``
calls, and keeps the frame nearest each missing slice. We plan the same frames
(``placement=atlinter``) but compute only the tree nodes those frames need; with a
model that takes any ``t`` (RIFE 4.x, flow models) it is one call per missing slice.
Counts come from the same planning code the workers run.

Usage::

    python benchmarks/bench_model_calls.py
"""

from __future__ import annotations

import math

from atlinter_ray.planning import bisection_nodes, plan_dataset


def calls_for_gap(gap: int) -> tuple[int, int]:
    """(predecessor calls, our bisection calls) for one gap between known sections."""
    (task,) = [t for t in plan_dataset("g", [0, gap], gap + 1, "atlinter") if t.right == gap]
    ours = sum(len(level) for level in bisection_nodes(sorted({j.t for j in task.predicted})))
    return 2 ** math.ceil(math.log2(gap)) - 1, ours


def main() -> None:
    """Print the table for gaps 2..17 and for the CCF with one section every 8 slices."""
    print(f"{'gap':>4}{'missing':>9}{'atlinter calls':>16}{'ours':>6}"
          f"{'atlinter/slice':>16}{'ours/slice':>12}")
    for gap in range(2, 18):
        theirs, ours = calls_for_gap(gap)
        print(f"{gap:>4}{gap - 1:>9}{theirs:>16}{ours:>6}"
              f"{theirs / (gap - 1):>16.2f}{ours / (gap - 1):>12.2f}")
    known = list(range(4, 528, 8))
    tasks = plan_dataset("ccf", known, 528, "atlinter")
    missing = sum(len(t.predicted) for t in tasks)
    theirs = sum(calls_for_gap(t.right - t.left)[0] for t in tasks if t.predicted)
    ours = sum(calls_for_gap(t.right - t.left)[1] for t in tasks if t.predicted)
    print(f"CCF 528 slices, one section every 8: {missing} missing slices, "
          f"atlinter {theirs} calls ({theirs / missing:.2f}/slice), ours {ours} "
          f"({ours / missing:.2f}/slice); arbitrary-t models: 1.00/slice")


if __name__ == "__main__":
    main()
