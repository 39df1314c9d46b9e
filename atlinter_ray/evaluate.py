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

Layers: :func:`plan_holdout`, :func:`aggregate` and :func:`panel_slices` are pure;
:class:`EvalWorker` reads its sections, runs every model on a task and scores it (the
models are built once per worker); :func:`evaluate` is the driver, running the
workers in-process (``serial``) or on a Ray actor pool
(:func:`atlinter_ray.execution.map_batches`). Only scores and the few slices
drawn in the panels travel back to the driver.
"""

from __future__ import annotations

import io
import json
import logging
import math
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import cv2
import numpy as np

from atlinter_ray.config import DataConfig, ResourcesConfig, redact
from atlinter_ray.dataset import Dataset, read_sections
from atlinter_ray.engine import build_interpolator, predict
from atlinter_ray.errors import ConfigError
from atlinter_ray.execution import check_resources, connect, map_batches
from atlinter_ray.metrics import score_slice
from atlinter_ray.pipeline import load_datasets
from atlinter_ray.planning import (
    EDGE,
    PLACEMENTS,
    PREDICTED,
    GapTask,
    SliceJob,
    bisection_nodes,
    slice_position,
)
from atlinter_ray.store import VolumeStore
from atlinter_ray.worker import to_dtype

log = logging.getLogger(__name__)

HOLDOUTS = ("every_k", "leave_one_out")
METRICS = ("psnr", "ssim", "mae")
#: Name under which edge held-out sections (copied from the nearest section) are scored.
EDGE_COPY = "edge-copy"


@dataclass
class EvaluateConfig:
    """Everything one evaluation run needs (the schema of ``conf/evaluate.yaml``).

    ``models`` are registry names built with
    :func:`~atlinter_ray.engine.build_interpolator`; ``params`` and ``checkpoints``
    are keyed by model name. ``holdout`` is ``every_k`` (keep every ``k``-th known
    section, hold out the rest; ``k`` may be a list, e.g. ``[2, 3, 4]``, to sweep gap
    sizes) or ``leave_one_out`` (each interior section predicted from its two
    neighbours). ``panel_slices`` held-out slices per dataset (from the first ``k``)
    are drawn as truth / prediction / error.
    """

    data: DataConfig = field(default_factory=DataConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    models: list[str] = field(default_factory=lambda: ["linear", "dis"])
    params: dict[str, dict[str, Any]] = field(default_factory=dict)
    checkpoints: dict[str, str] = field(default_factory=dict)
    holdout: str = "every_k"
    k: Any = 2
    placement: str = "exact"
    panel_slices: int = 3
    output_root: str = "outputs/evaluation"
    output_storage_options: dict[str, Any] = field(default_factory=dict)
    serial: bool = False
    log_level: str = "INFO"


@dataclass(frozen=True)
class EvalSpec:
    """What an evaluation worker needs, small enough to ship to every actor."""

    models: tuple[str, ...]
    params: Mapping[str, Mapping[str, Any]]
    checkpoints: Mapping[str, str]
    datasets: Mapping[str, Mapping[str, Any]]
    #: Task id -> held-out slices whose predictions come back for the panels.
    panel: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    threads: int = 1


# -- pure planning and aggregation --------------------------------------------------


def check_config(cfg: EvaluateConfig) -> None:
    """Refuse an evaluation that cannot run, before any data is read or model built."""
    if cfg.holdout not in HOLDOUTS:
        raise ConfigError(f"holdout={cfg.holdout!r}: choose one of {list(HOLDOUTS)}")
    if cfg.holdout == "every_k":
        ks(cfg.k)
    if not cfg.models or len(set(cfg.models)) != len(cfg.models):
        raise ConfigError(
            f"models={list(cfg.models)}: name at least one model, each once "
            "(e.g. models=[linear,dis])"
        )
    if cfg.placement not in PLACEMENTS:
        raise ConfigError(f"placement={cfg.placement!r}: choose one of {list(PLACEMENTS)}")
    if cfg.panel_slices < 0:
        raise ConfigError(f"panel_slices={cfg.panel_slices}: must be 0 or more")
    check_resources(cfg.resources)


def ks(k: Any) -> list[int]:
    """The ``k`` setting as a list of integers >= 2 (one int or a list of them)."""
    values = list(k) if isinstance(k, (list, tuple)) else [k]
    if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 2 for v in values):
        raise ConfigError(
            f"k={k!r}: holdout=every_k keeps every k-th known section and needs an "
            "integer k >= 2 (k=2 holds out every other section), or a list of them"
        )
    return values


def _interior(dataset_id: str, left: int, right: int, targets: Sequence[int],
              placement: str) -> GapTask:
    """A task predicting ``targets`` from the sections ``left`` and ``right``."""
    jobs = tuple(SliceJob(s, PREDICTED, t=slice_position(s, left, right, placement))  # type: ignore[arg-type]
                 for s in targets)
    return GapTask(dataset_id, left, right, jobs)


def _edge(dataset_id: str, source: int, targets: Sequence[int], before: bool) -> GapTask:
    """A task scoring ``targets`` filled by copying ``source`` (no section on one side)."""
    jobs = tuple(SliceJob(s, EDGE, source=source) for s in targets)
    return GapTask(dataset_id, None if before else source, source if before else None, jobs)


def plan_holdout(
    dataset_id: str, section_numbers: Iterable[int], holdout: str, k: int = 2,
    placement: str = "exact",
) -> list[GapTask]:
    """Evaluation tasks of one dataset: held-out sections and what predicts them.

    ``every_k`` keeps known sections ``0, k, 2k, ...`` (in sorted order) and holds out
    the others; ``leave_one_out`` holds out each section alone. Interior targets are
    ``predicted`` jobs at their position between the bounding kept sections; targets
    with a kept section on one side only are ``edge-filled`` jobs copying it.
    """
    known = sorted(section_numbers)
    if holdout == "leave_one_out":
        tasks = [_edge(dataset_id, known[1], [known[0]], before=True)]
        tasks += [_interior(dataset_id, known[i - 1], known[i + 1], [known[i]], placement)
                  for i in range(1, len(known) - 1)]
        tasks.append(_edge(dataset_id, known[-2], [known[-1]], before=False))
        return tasks
    if holdout != "every_k":
        raise ConfigError(f"holdout={holdout!r}: choose one of {list(HOLDOUTS)}")
    kept = known[:: ks(k)[0]]
    tasks = []
    for left, right in zip(kept, kept[1:]):
        targets = [s for s in known if left < s < right]
        tasks.append(_interior(dataset_id, left, right, targets, placement))
    tail = [s for s in known if s > kept[-1]]
    if tail:
        tasks.append(_edge(dataset_id, kept[-1], tail, before=False))
    return tasks


def slice_geometry(task: GapTask, job: SliceJob) -> tuple[int | None, int]:
    """``(gap, distance)`` of a held-out slice: gap is None for edge slices."""
    if task.left is None or task.right is None:
        return None, abs(job.slice - (task.left if task.right is None else task.right))
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


def aggregate(rows: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Mean PSNR (finite values), SSIM and MAE of score rows, and how many slices."""
    rows = list(rows)
    finite = [r["psnr"] for r in rows if math.isfinite(r["psnr"])]
    return {
        "psnr": round(float(np.mean(finite)), 4) if finite else math.inf,
        "ssim": round(float(np.mean([r["ssim"] for r in rows])), 4),
        "mae": round(float(np.mean([r["mae"] for r in rows])), 4),
        "slices": len(rows),
    }


def _grouped(rows: Sequence[Mapping[str, Any]], key: str) -> dict[str, dict[str, Any]]:
    """Aggregate rows by model, then by the integer ``key`` (keys as strings, sorted)."""
    groups: dict[str, dict[int, list[Mapping[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        groups[r["model"]][r[key]].append(r)
    return {m: {str(v): aggregate(g[v]) for v in sorted(g)} for m, g in groups.items()}


def report_tables(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Overall, by-gap and by-distance scores per model, interior and edge apart."""
    interior = [r for r in rows if r["gap"] is not None]
    edge = [r for r in rows if r["gap"] is None]
    by_model: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for r in interior:
        by_model[r["model"]].append(r)
    return {
        "overall": {m: aggregate(rs) for m, rs in by_model.items()},
        "by_gap": _grouped(interior, "gap"),
        "by_distance": _grouped(interior, "distance"),
        "edge": {
            "policy": "copy the nearest remaining section (interpolation.edge=copy)",
            "overall": aggregate(edge) if edge else None,
            "by_distance": _grouped(edge, "distance").get(EDGE_COPY, {}),
        },
    }


# -- the worker ----------------------------------------------------------------------


def _hwc(frame: np.ndarray) -> np.ndarray:
    """``(C, H, W)`` -> the metrics' layout ``(H, W)`` or ``(H, W, C)``."""
    return frame[0] if frame.shape[0] == 1 else np.moveaxis(frame, 0, -1)


def failed_result(task: GapTask, error: str = "") -> dict[str, Any]:
    """A task's result before it is scored; the driver's for a task no worker ran."""
    return {"task_id": task.task_id, "status": "failed", "error": error,
            "scores": "[]", "arrays": b""}


class EvalWorker:
    """Scores every configured model on batches of evaluation tasks (models built once)."""

    def __init__(self, spec: EvalSpec) -> None:
        cv2.setNumThreads(spec.threads)
        self.models = {
            name: build_interpolator(name, spec.checkpoints.get(name), spec.params.get(name))
            for name in spec.models
        }
        self.datasets = {k: Dataset.from_json(v) for k, v in spec.datasets.items()}
        self.panel = {k: set(v) for k, v in spec.panel.items()}

    def run(self, tasks: list[GapTask]) -> list[dict[str, Any]]:
        """Score a batch of tasks: the pool's entry point."""
        return [self.run_task(task) for task in tasks]

    def run_task(self, task: GapTask) -> dict[str, Any]:
        """Score one task; failures are reported in the row, never raised."""
        row = failed_result(task)
        try:
            scores, arrays = self._score(task)
            buffer = io.BytesIO()
            if arrays:
                np.savez(buffer, **arrays)
            row.update(status="done", scores=json.dumps(scores), arrays=buffer.getvalue())
        except Exception as exc:  # report, never hide: the driver counts failures
            log.exception("evaluation task %s failed", task.task_id)
            row["error"] = f"{type(exc).__name__}: {exc}"
        return row

    def _score(self, task: GapTask) -> tuple[list[dict[str, Any]], dict[str, np.ndarray]]:
        """Score rows of every model on the task, and the panel slices' predictions."""
        ds = self.datasets[task.dataset_id]
        targets = [j.slice for j in task.jobs]
        bounds = [s for s in (task.left, task.right) if s is not None]
        images = dict(zip(bounds + targets, read_sections(ds, bounds + targets)))
        if task.predicted:
            a, b = images[task.left][None], images[task.right][None]
            candidates = {}
            for name, model in self.models.items():
                start = time.perf_counter()
                frames = predict(model, a, b, [j.t for j in task.jobs], ds.peak).frames[0]
                seconds = (time.perf_counter() - start) / len(task.jobs)
                candidates[name] = (to_dtype(frames, ds.dtype), seconds)
        else:
            copies = np.stack([images[j.source] for j in task.jobs])
            candidates = {EDGE_COPY: (copies, 0.0)}
        scores, arrays = [], {}
        for i, job in enumerate(task.jobs):
            gap, distance = slice_geometry(task, job)
            truth = _hwc(images[job.slice])
            for name, (frames, seconds) in candidates.items():
                pred = _hwc(frames[i])
                s = score_slice(pred, truth, ds.peak)
                scores.append({
                    "dataset": ds.id, "model": name, "slice": job.slice,
                    "left": task.left, "right": task.right, "gap": gap,
                    "distance": distance, "psnr": s.psnr, "ssim": s.ssim, "mae": s.mae,
                    "seconds": round(seconds, 4),
                })
                if job.slice in self.panel.get(task.task_id, ()):
                    arrays[f"{name}/{job.slice}"] = pred
        return scores, arrays


# -- plots ---------------------------------------------------------------------------


def metrics_plot_png(tables: Mapping[str, Any]) -> bytes:
    """PNG: PSNR, SSIM and MAE against gap (top) and distance (bottom), one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 6.5), layout="constrained")
    axes = fig.subplots(2, 3)
    units = {"psnr": "PSNR (dB)", "ssim": "SSIM", "mae": "MAE"}
    for row, (key, label) in enumerate((("by_gap", "gap (slices between kept sections)"),
                                        ("by_distance", "distance to nearest kept section"))):
        for col, metric in enumerate(METRICS):
            ax = axes[row, col]
            for model, by_value in tables[key].items():
                xs = [int(v) for v in by_value]
                ys = [by_value[v][metric] for v in by_value]
                ax.plot(xs, ys, marker="o", label=model)
            ax.set_xlabel(label)
            ax.set_ylabel(units[metric])
            ax.grid(alpha=0.3)
    axes[0, 0].legend()
    fig.suptitle("Held-out sections: score per model")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    return buffer.getvalue()


def panel_png(ds: Dataset, slices: Sequence[int], predictions: Mapping[str, np.ndarray],
              models: Sequence[str]) -> bytes:
    """PNG: per slice, the truth, then each model's prediction and absolute error."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    truths = {s: _hwc(img) for s, img in zip(slices, read_sections(ds, list(slices)))}
    cols = 1 + 2 * len(models)
    fig = Figure(figsize=(2.2 * cols, 2.3 * len(slices)), layout="constrained")
    axes = np.atleast_2d(fig.subplots(len(slices), cols, squeeze=False))
    for r, s in enumerate(slices):
        truth = truths[s]
        shown = [(f"truth {s}", truth, None)]
        for m in models:
            pred = predictions[f"{m}/{s}"]
            error = np.abs(pred.astype(np.float64) - truth.astype(np.float64))
            error = error.mean(axis=-1) if error.ndim == 3 else error
            shown += [(m, pred, None), (f"|error| {m}", error, "magma")]
        for c, (title, img, cmap) in enumerate(shown):
            ax = axes[r, c]
            if cmap is None:
                img = img.astype(np.float64) / ds.peak
                ax.imshow(np.clip(img, 0, 1), cmap="gray", vmin=0, vmax=1)
            else:
                ax.imshow(img, cmap=cmap, vmin=0, vmax=ds.peak / 4)
            ax.set_title(title, fontsize=8)
            ax.set_axis_off()
    fig.suptitle(f"{ds.id}: held-out truth, prediction, |error| (error scale 0..{ds.peak / 4:g})")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    return buffer.getvalue()


# -- the driver ----------------------------------------------------------------------


def _run(tasks: list[GapTask], spec: EvalSpec, cfg: EvaluateConfig) -> Iterator[dict[str, Any]]:
    """Result rows of every task, in-process or on the actor pool."""
    if cfg.serial:
        worker = EvalWorker(spec)
        for task in tasks:
            yield worker.run_task(task)
        return
    connect(cfg.resources)
    yield from map_batches(tasks, EvalWorker, spec, cfg.resources, failed_result)


def evaluate(cfg: EvaluateConfig) -> dict[str, Any]:
    """Run the evaluation; write ``evaluation.json`` and the plots; return the report."""
    start = time.perf_counter()
    check_config(cfg)
    # a bad name, setting or checkpoint fails before any data is read
    models = {m: build_interpolator(m, cfg.checkpoints.get(m), cfg.params.get(m))
              for m in cfg.models}
    datasets = load_datasets(cfg.data)
    sweep = ks(cfg.k) if cfg.holdout == "every_k" else [0]
    plans = {ds.id: [plan_holdout(ds.id, ds.section_numbers, cfg.holdout, k, cfg.placement)
                     for k in sweep] for ds in datasets}
    empty = [i for i, per_k in plans.items() for tasks in per_k
             if not any(t.predicted for t in tasks)]
    if empty:
        raise ConfigError(
            f"datasets {empty} have no held-out section between two kept ones with "
            f"holdout={cfg.holdout}, k={cfg.k}: lower k or use holdout=leave_one_out"
        )
    positions = sorted({j.t for per_k in plans.values() for ts in per_k for t in ts
                        for j in t.predicted})
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
    panel = {i: panel_slices(per_k[0], cfg.panel_slices) for i, per_k in plans.items()}
    spec = EvalSpec(
        models=tuple(cfg.models), params={m: dict(p) for m, p in cfg.params.items()},
        checkpoints=dict(cfg.checkpoints), datasets={ds.id: ds.to_json() for ds in datasets},
        panel={t: s for by_task in panel.values() for t, s in by_task.items()},
        threads=cfg.resources.threads_per_worker,
    )
    tasks = [t for per_k in plans.values() for ts in per_k for t in ts]
    log.info("evaluating %s on %d datasets, %d tasks", cfg.models, len(datasets), len(tasks))
    rows: list[dict[str, Any]] = []
    predictions: dict[str, np.ndarray] = {}
    failures = []
    for result in _run(tasks, spec, cfg):
        if result["status"] != "done":
            failures.append({"task_id": result["task_id"], "error": result["error"]})
            continue
        rows += json.loads(result["scores"])
        if result["arrays"]:
            dataset_id = result["task_id"].split("/", 1)[0]
            with np.load(io.BytesIO(result["arrays"])) as archive:
                predictions.update({f"{dataset_id}/{k}": archive[k] for k in archive.files})
    rows.sort(key=lambda r: (r["dataset"], r["slice"], r["model"]))
    store = VolumeStore(cfg.output_root, cfg.output_storage_options)
    outputs = {}
    if rows:
        outputs["metrics_plot"] = store.write_bytes("metrics.png", metrics_plot_png(report_tables(rows)))
    for ds in datasets:
        slices = [s for chosen in panel[ds.id].values() for s in chosen
                  if all(f"{ds.id}/{m}/{s}" in predictions for m in cfg.models)]
        if slices:
            mine = {k.split("/", 1)[1]: v for k, v in predictions.items() if k.startswith(f"{ds.id}/")}
            outputs[f"panel:{ds.id}"] = store.write_bytes(
                f"{ds.id}.panel.png", panel_png(ds, slices, mine, cfg.models))
    report = {
        "holdout": cfg.holdout,
        "k": sweep if cfg.holdout == "every_k" else None,
        "placement": cfg.placement,
        "models": list(cfg.models),
        "datasets": {ds.id: [_holdout_summary(ts) for ts in plans[ds.id]] for ds in datasets},
        **report_tables(rows),
        "per_dataset": {ds.id: report_tables([r for r in rows if r["dataset"] == ds.id])
                        for ds in datasets},
        "failures": failures,
        "slices": rows,
        "wall_seconds": round(time.perf_counter() - start, 3),
        "config": redact(asdict(cfg)),
    }
    outputs["report"] = store.write_bytes("evaluation.json", json.dumps(report, indent=1).encode())
    report["outputs"] = outputs
    return report


def _holdout_summary(tasks: Sequence[GapTask]) -> dict[str, list[int]]:
    """Which sections one holdout kept (``bounding``) and held out (interior, edge)."""
    interior = sorted(j.slice for t in tasks for j in t.predicted)
    edge = sorted(j.slice for t in tasks for j in t.jobs if j.status == EDGE)
    bounds = sorted({s for t in tasks for s in (t.left, t.right) if s is not None})
    return {"held_out": interior, "edge": edge, "bounding": bounds}


def format_table(report: Mapping[str, Any]) -> str:
    """Markdown table: model x gap with PSNR / SSIM / MAE, then the edge scores."""
    lines = ["| model | gap | slices | PSNR (dB) | SSIM | MAE |", "|---|---|---|---|---|---|"]
    for model, by_gap in report["by_gap"].items():
        for gap, sc in by_gap.items():
            lines.append(f"| {model} | {gap} | {sc['slices']} | {sc['psnr']:.2f} | "
                         f"{sc['ssim']:.4f} | {sc['mae']:.3f} |")
    edge = report["edge"]["overall"]
    if edge:
        lines.append(f"| {EDGE_COPY} | edge | {edge['slices']} | {edge['psnr']:.2f} | "
                     f"{edge['ssim']:.4f} | {edge['mae']:.3f} |")
    if report["failures"]:
        lines += [f"FAILED {f['task_id']}: {f['error']}" for f in report["failures"]]
    return "\n".join(lines)
