"""Slab tasks: one writer per slab-deep object, and the same values as gap by gap.

Planning is checked as a pure function; the pipeline's output is checked against an
oracle that reconstructs the volume the predecessor's way, one whole gap at a time in
memory (``predict_gap`` per gap task), for each model kind: any-t, flow, midpoint
bisection and a context model.
"""

from __future__ import annotations

import pickle
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from atlinter_ray.config import Config
from atlinter_ray.dataset import load_dataset, read_sections
from atlinter_ray.dtypes import to_dtype
from atlinter_ray.engine import atlinter_canvas, build_interpolator, model_context, predict_gap
from atlinter_ray.errors import ConfigError
from atlinter_ray.layout import as_slab
from atlinter_ray.pipeline import run
from atlinter_ray.planning import (
    EDGE,
    MEASURED,
    PREDICTED,
    bisection_nodes,
    plan_dataset,
    plan_slabs,
)
from atlinter_ray.store import VolumeStore
from atlinter_ray.testing.datasets import real_volume, sections_of, write_dataset
from atlinter_ray.testing.predecessor import predecessor_rife_hd

SECTIONS = [4, 10, 16, 23, 30, 37, 45, 52, 60, 66, 72, 80, 86]


@pytest.mark.parametrize("slab", [1, 3, 8, 16, 100])
@pytest.mark.parametrize("edge", ["copy", "empty", "reference"])
def test_slab_tasks_own_whole_slabs_and_keep_every_job(slab: int, edge: str) -> None:
    known = [4, 5, 9, 17, 40]
    gaps = plan_dataset("g", known, 45, edge=edge)
    tasks = plan_slabs(gaps, 45, slab)
    for task in tasks:  # whole slabs, each its own
        assert task.first % slab == 0 and task.stop == min(task.first + slab, 45)
        assert all(task.first <= j.slice < task.stop for j in task.jobs)
    assert len({t.first for t in tasks}) == len(tasks)
    # the same jobs as the gap tasks, each once, with the same gap, position and source
    def rows(parts):
        return sorted((j.slice, j.status, j.source, j.t, p.left, p.right, p.context)
                      for p in parts for j in p.jobs)
    assert rows(p for t in tasks for p in t.parts) == rows(gaps)
    # a slab is planned when it holds a planned slice: with edge=empty, slabs 0..3 of
    # slab=1 are left unwritten (zeros), as no gap task wrote those slices before
    planned = {j.slice // slab for g in gaps for j in g.jobs}
    assert [t.first // slab for t in tasks] == sorted(planned)


def test_a_gap_crossing_slab_boundaries_is_computed_by_each_slab_for_its_slices() -> None:
    gaps = plan_dataset("g", [3, 11, 19], 24, placement="atlinter")
    first, second, third = plan_slabs(gaps, 24, 8)
    assert [t.task_id for t in (first, second, third)] == ["g/0-7", "g/8-15", "g/16-23"]
    assert [(p.left, p.right) for p in first.parts] == [(None, 3), (3, 11)]
    assert [(p.left, p.right) for p in second.parts] == [(3, 11), (11, 19)]
    assert [j.slice for j in second.parts[0].jobs] == [8, 9, 10]
    assert second.parts[0].positions == (0.625, 0.75, 0.875)
    assert second.sources == (3, 11, 19)  # both bounds of both gaps it predicts in
    assert [j.status for j in first.jobs] == [EDGE] * 3 + [MEASURED] + [PREDICTED] * 4
    # a midpoint model repeats the shared ancestors (t=0.5, 0.75) in both slabs
    assert bisection_nodes(first.parts[1].positions) == [[0.5], [0.25], [0.125, 0.375]]
    assert bisection_nodes(second.parts[0].positions) == [[0.5], [0.75], [0.625, 0.875]]


def test_slab_task_ids_are_deterministic_and_survive_pickling() -> None:
    a = plan_slabs(plan_dataset("gene", [17, 3, 11], 22), 22, 8)
    b = plan_slabs(plan_dataset("gene", [3, 11, 17], 22), 22, 8)
    assert [t.task_id for t in a] == [t.task_id for t in b] == [
        "gene/0-7", "gene/8-15", "gene/16-21"]
    assert pickle.loads(pickle.dumps(a)) == a
    with pytest.raises(ConfigError, match="output.slab=0"):
        plan_slabs(a[0].parts, 22, 0)


def _oracle(cfg: Config, name: str) -> np.ndarray:
    """The volume gap task by gap task, in memory, as the one-slice layout's tasks made it."""
    ds = load_dataset(f"{cfg.data.root}/{name}", None)
    model = build_interpolator(cfg.model.name, cfg.model.checkpoint, cfg.model.params,
                               asdict(cfg.interpolation.exact_fallback))
    numbers = sorted(ds.section_numbers)
    sections = dict(zip(numbers, read_sections(ds, numbers)))
    volume = np.zeros((ds.n_slices, ds.channels, *ds.image_shape), np.uint8)
    canvas = atlinter_canvas(model, cfg.interpolation.placement)
    for task in plan_dataset(ds.id, numbers, ds.n_slices, cfg.interpolation.placement,
                             cfg.interpolation.edge, model_context(model)):
        made = (predict_gap(model, sections, task, ds.peak, canvas).frames[0]
                if task.predicted else [])
        k = 0
        for job in task.jobs:
            if job.source is not None:
                volume[job.slice] = to_dtype(sections[job.source], "uint8")
            else:
                volume[job.slice] = to_dtype(np.asarray(made[k]), "uint8")
                k += 1
    return as_slab(ds, volume)


def _rife_hd(folder: Path) -> Path:
    """The predecessor's RIFE_HD network with random weights, in its checkpoint layout."""
    predecessor_rife_hd(folder / "rife")
    return folder / "rife"


#: Model kind -> (model, placement, params, checkpoint maker).
KINDS = {
    "any-t": ("linear", "exact", {}, None),
    "flow": ("dis", "exact", {"preset": "fast"}, None),
    "midpoint bisection": ("rife_hd", "atlinter", {}, _rife_hd),
    "context": ("curved", "exact", {}, None),
}


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("edge, slab", [("copy", 8), ("empty", 16)])
def test_slab_tasks_write_the_values_of_gap_tasks(
    tmp_path: Path, kind: str, edge: str, slab: int
) -> None:
    torch.set_num_threads(2)
    model, placement, params, checkpoint = KINDS[kind]
    volume = real_volume()
    write_dataset(tmp_path / "in", "g", sections_of(volume, SECTIONS, "coronal"), SECTIONS,
                  reference_shape=list(volume.shape))
    cfg = Config()
    cfg.data.root, cfg.data.genes = str(tmp_path / "in"), ["g"]
    cfg.output.root, cfg.output.slab = str(tmp_path / "out"), slab
    cfg.model.name, cfg.model.params = model, params
    if checkpoint is not None:
        cfg.model.checkpoint = str(checkpoint(tmp_path))
    cfg.interpolation.placement, cfg.interpolation.edge = placement, edge
    cfg.run.serial, cfg.run.progress, cfg.output.quicklook = True, False, False
    cfg.resources.tasks_per_batch = 3  # chunks mixing slabs and gaps
    summary = run(cfg)
    planned = range(4, 87) if edge == "empty" else range(91)  # the rest stays zeros
    assert summary.ok and summary.tasks_done == len({s // slab for s in planned})
    out = VolumeStore(cfg.output.root).read_volume("g")
    expected = _oracle(cfg, "g")
    np.testing.assert_array_equal(out, expected)
    assert out[SECTIONS[1]].any() and out[7].any()
    if edge == "empty":
        assert not out[:4].any() and not out[87:].any()
    provenance = VolumeStore(cfg.output.root).image_attrs("g")["atlinter_ray"]["provenance"]
    assert [p["slice"] for p in provenance] == list(planned)
