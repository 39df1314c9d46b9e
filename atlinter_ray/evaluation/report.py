"""The evaluation report: scores aggregated per model, gap and distance; plots; a table."""

from __future__ import annotations

import io
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from atlinter_ray.dataset import Dataset, read_sections
from atlinter_ray.evaluation.workers import EDGE_COPY, hwc
from atlinter_ray.metrics import SliceScores, summarize

METRICS = ("psnr", "ssim", "mae")


def aggregate(rows: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Mean PSNR (finite values), SSIM and MAE of score rows, and how many slices."""
    return summarize([SliceScores(r["psnr"], r["ssim"], r["mae"]) for r in rows])


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
        "seconds_per_slice": {m: round(float(np.mean([r["seconds"] for r in rs])), 4)
                              for m, rs in by_model.items()},
        "by_gap": _grouped(interior, "gap"),
        "by_distance": _grouped(interior, "distance"),
        "edge": {
            "policy": "copy the nearest remaining section (interpolation.edge=copy)",
            "overall": aggregate(edge) if edge else None,
            "by_distance": _grouped(edge, "distance").get(EDGE_COPY, {}),
        },
    }


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

    truths = {s: hwc(img) for s, img in zip(slices, read_sections(ds, list(slices)))}
    cols = 1 + 2 * len(models)
    fig = Figure(figsize=(2.2 * cols, 2.3 * len(slices)), layout="constrained")
    axes = np.atleast_2d(fig.subplots(len(slices), cols, squeeze=False))
    for r, s in enumerate(slices):
        truth = truths[s]
        shown: list[tuple[str, np.ndarray, str | None]] = [(f"truth {s}", truth, None)]
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
