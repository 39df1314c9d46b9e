"""Evaluate models on held-out sections: hide known sections, predict them, score them.

The truth is the data itself: some measured sections of each dataset are held out,
every configured model reconstructs them from the sections that remain, and each
prediction is scored against the held-out image with :mod:`atlinter_ray.metrics`
(PSNR, SSIM, MAE). Scores are reported per model, per gap (distance between the two
bounding remaining sections) and per distance to the nearest remaining section::

    known:     1   5   9   13  17        holdout=every_k, k=2
    kept:      1       9       17        gap 8, held-out 5 and 13 at distance 4
    task:      [ 1 -> 9: predict 5 ][ 9 -> 17: predict 13 ]

    known:     1   5   9   13  17        holdout=leave_one_out
    tasks:     [1->9: 5] [5->13: 9] [9->17: 13]   (each from its two neighbours)

Held-out sections with a remaining section on one side only (after the last kept
section with ``every_k``; the first and last sections with ``leave_one_out``) cannot
be interpolated. They are scored separately, as the pipeline's ``copy`` edge policy
fills them (the nearest remaining section), under ``"edge"`` in the report, and never
mixed into the model scores.

Layers: :mod:`~atlinter_ray.evaluation.holdout` and :mod:`~atlinter_ray.evaluation.report`
are pure; :class:`~atlinter_ray.evaluation.workers.EvalWorker` reads its sections, runs
every model on a task and scores it (the models are built once per worker);
:func:`evaluate` is the driver, running the workers in-process (``serial``) or on a Ray
actor pool (:func:`atlinter_ray.execution.map_batches`). Only scores and the few slices
drawn in the panels travel back to the driver.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import numpy as np

from atlinter_ray.dataset import Dataset
from atlinter_ray.engine import build_interpolator, model_context
from atlinter_ray.errors import ConfigError
from atlinter_ray.evaluation.config import EvaluateConfig, Holdout, check_config, ks
from atlinter_ray.evaluation.holdout import (
    holdout_summary,
    kept_sections,
    panel_slices,
    plan_holdout,
)
from atlinter_ray.evaluation.report import metrics_plot_png, panel_png, report_tables
from atlinter_ray.evaluation.workers import EvalSpec, EvalWorker, failed_result
from atlinter_ray.execution import map_batches
from atlinter_ray.inputs import load_datasets
from atlinter_ray.models.base import PairInterpolator
from atlinter_ray.planning import GapTask, bisection_nodes
from atlinter_ray.secrets import redact
from atlinter_ray.store import VolumeStore
from atlinter_ray.tuning import TuneJob, TuneSpec, is_tunable, run_tuning

log = logging.getLogger(__name__)


def _tune(
    cfg: EvaluateConfig, models: dict[str, PairInterpolator], datasets: list[Dataset],
    plans: dict[str, list[list[GapTask]]], sweep: list[int],
) -> dict[str, dict[str, tuple[str, dict[str, Any]]]]:
    """Tune each tunable model per dataset and holdout on the kept sections only.

    Returns model -> task id -> (``<dataset>/k=<k>``, tuning result).
    """
    tunable = [m for m, model in models.items() if is_tunable(model)]
    if tunable and cfg.holdout != Holdout.every_k:
        raise ConfigError(
            f"models {tunable} tune on the kept sections (params.<model>.tune=true), which "
            "needs holdout=every_k (with leave_one_out every section is held out once)"
        )
    out: dict[str, dict[str, tuple[str, dict[str, Any]]]] = {}
    for name in tunable:
        jobs = [TuneJob(ds.id, kept_sections(tasks), f"{ds.id}/k={k}")
                for ds in datasets for k, tasks in zip(sweep, plans[ds.id])]
        spec = TuneSpec(name, cfg.checkpoints.get(name), dict(cfg.params.get(name) or {}),
                        {ds.id: ds for ds in datasets}, cfg.output_root,
                        dict(cfg.output_storage_options), cfg.resources.threads_per_worker)
        results = run_tuning(jobs, spec, cfg.resources, cfg.serial)
        out[name] = {t.task_id: (f"{i}/k={k}", results[f"{i}/k={k}"])
                     for i, per_k in plans.items() for k, tasks in zip(sweep, per_k)
                     for t in tasks}
    return out


def evaluate(cfg: EvaluateConfig) -> dict[str, Any]:
    """Run the evaluation; write ``evaluation.json`` and the plots; return the report."""
    start = time.perf_counter()
    check_config(cfg)
    # a bad name, setting or checkpoint fails before any data is read
    models = {m: build_interpolator(m, cfg.checkpoints.get(m), cfg.params.get(m))
              for m in cfg.models}
    datasets = load_datasets(cfg.data)
    sweep = ks(cfg.k) if cfg.holdout == Holdout.every_k else [0]
    context = max(model_context(m) for m in models.values())
    plans = {ds.id: [plan_holdout(ds.id, ds.section_numbers, cfg.holdout, k, cfg.placement,
                                  context) for k in sweep] for ds in datasets}
    empty = [i for i, per_k in plans.items() for tasks in per_k
             if not any(t.predicted for t in tasks)]
    if empty:
        raise ConfigError(
            f"datasets {empty} have no held-out section between two kept ones with "
            f"holdout={cfg.holdout}, k={cfg.k}: lower k or use holdout=leave_one_out"
        )
    positions = sorted({t for per_k in plans.values() for tasks in per_k for task in tasks
                        for t in task.positions})
    for name, model in models.items():
        if not model.arbitrary_t:  # midpoint-only: every position must be dyadic
            try:
                bisection_nodes(positions)
            except ConfigError as exc:
                raise ConfigError(
                    f"model {name!r} predicts midpoints only, but with holdout="
                    f"{cfg.holdout}, k={cfg.k} some held-out sections are not at dyadic "
                    f"positions ({exc}). Fix: set placement=atlinter, or k=2 or 4 on "
                    "evenly spaced sections"
                ) from exc
    tuning = _tune(cfg, models, datasets, plans, sweep)
    panel = {i: panel_slices(per_k[0], cfg.panel_slices) for i, per_k in plans.items()}
    spec = EvalSpec(
        models=tuple(cfg.models), params={m: dict(p) for m, p in cfg.params.items()},
        checkpoints=dict(cfg.checkpoints), datasets={ds.id: ds for ds in datasets},
        panel={t: s for by_task in panel.values() for t, s in by_task.items()},
        threads=cfg.resources.threads_per_worker, placement=cfg.placement,
        tuning={m: {t: r for t, (_, r) in by_task.items()} for m, by_task in tuning.items()},
    )
    tasks = [t for per_k in plans.values() for ts in per_k for t in ts]
    log.info("evaluating %s on %d datasets, %d tasks", cfg.models, len(datasets), len(tasks))
    rows: list[dict[str, Any]] = []
    predictions: dict[str, np.ndarray] = {}
    failures = []
    for result in map_batches(tasks, EvalWorker, spec, cfg.resources, failed_result, cfg.serial):
        if result.status != "done":
            failures.append({"task_id": result.task_id, "error": result.error})
            continue
        rows += result.scores
        dataset_id = result.task_id.split("/", 1)[0]
        predictions.update({f"{dataset_id}/{k}": v for k, v in result.arrays.items()})
    rows.sort(key=lambda r: (r["dataset"], r["slice"], r["model"]))
    store = VolumeStore(cfg.output_root, cfg.output_storage_options)
    outputs = {}
    if rows:
        title = (f"Held-out sections of {', '.join(ds.id for ds in datasets[:3])}"
                 f"{' ...' if len(datasets) > 3 else ''}: holdout={cfg.holdout}"
                 f"{f', k={sweep}' if cfg.holdout == Holdout.every_k else ''}")
        outputs["metrics_plot"] = store.write_bytes("metrics.png", metrics_plot_png(rows, title))
    for ds in datasets:
        slices = [s for chosen in panel[ds.id].values() for s in chosen
                  if all(f"{ds.id}/{m}/{s}" in predictions for m in cfg.models)]
        if slices:
            mine = {k.split("/", 1)[1]: v for k, v in predictions.items() if k.startswith(f"{ds.id}/")}
            outputs[f"panel:{ds.id}"] = store.write_bytes(
                f"{ds.id}.panel.png", panel_png(ds, slices, mine, cfg.models, where=_where(plans[ds.id][0])))
    report = {
        "holdout": cfg.holdout,
        "k": sweep if cfg.holdout == Holdout.every_k else None,
        "placement": cfg.placement,
        "models": list(cfg.models),
        "datasets": {ds.id: [holdout_summary(ts) for ts in plans[ds.id]] for ds in datasets},
        **report_tables(rows),
        "per_dataset": {ds.id: report_tables([r for r in rows if r["dataset"] == ds.id])
                        for ds in datasets},
        "failures": failures,
        "tuning": {m: dict(by_task.values()) for m, by_task in tuning.items()},
        "slices": rows,
        "wall_seconds": round(time.perf_counter() - start, 3),
        "config": redact(asdict(cfg)),
    }
    outputs["report"] = store.write_bytes("evaluation.json", json.dumps(report, indent=1).encode())
    report["outputs"] = outputs
    return report



def _where(tasks: Sequence[GapTask]) -> dict[int, str]:
    """Each held-out slice's place, for the panel: its gap and distance to a kept section."""
    return {j.slice: f"gap {t.pair[1] - t.pair[0]}, "
                     f"{min(j.slice - t.pair[0], t.pair[1] - j.slice)} from a kept section"
            for t in tasks for j in t.predicted}
