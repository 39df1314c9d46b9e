"""The evaluation report: scores aggregated per model, gap and distance; plots; a table."""

from __future__ import annotations

import io
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from atlinter_ray.dataset import Dataset, read_sections
from atlinter_ray.evaluation.workers import EDGE_COPY, hwc
from atlinter_ray.metrics import SliceScores, psnr, summarize
from atlinter_ray.quicklook import ERROR_SCALE

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


#: Axis labels with units; MAE is in the data's own units (grey levels for 8-bit data).
UNITS = {"psnr": "PSNR (dB, higher is better)", "ssim": "SSIM (1 = identical)",
         "mae": "MAE (intensity units, lower is better)"}


def _strip(ax: Any, rows: Sequence[Mapping[str, Any]], key: str, metric: str,
           models: Sequence[str]) -> None:
    """Every slice's score as a dot, per model side by side at each integer ``key``; means as bars."""
    values = sorted({int(r[key]) for r in rows})
    width = 0.8 / max(1, len(models))
    for i, model in enumerate(models):
        colour = f"C{i}"
        for j, v in enumerate(values):
            ys = np.array([r[metric] for r in rows if r["model"] == model and int(r[key]) == v],
                          dtype=np.float64)
            ys = ys[np.isfinite(ys)]
            if not ys.size:
                continue
            x = j + (i - (len(models) - 1) / 2) * width
            jitter = np.linspace(-width / 4, width / 4, ys.size) if ys.size > 1 else np.zeros(1)
            ax.scatter(x + jitter, ys, s=9, color=colour, alpha=0.55, linewidths=0)
            ax.hlines(ys.mean(), x - width / 2.5, x + width / 2.5, color="black", linewidth=2)
    ax.set_xticks(range(len(values)), [str(v) for v in values])
    ax.set_xlim(-0.6, len(values) - 0.4)
    ax.set_ylabel(UNITS[metric])
    ax.grid(axis="y", alpha=0.3)


def metrics_plot_png(rows: Sequence[Mapping[str, Any]], title: str = "") -> bytes:
    """PNG: every held-out slice's PSNR, SSIM and MAE per model, against gap (top) and
    distance to the nearest kept section (bottom); black bars are the means.

    Axes are whole slices (one tick per gap or distance measured), each dot one slice,
    the legend gives each model's number of slices: meaningful with a single gap too.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    interior = [r for r in rows if r["gap"] is not None]
    models = sorted({r["model"] for r in interior})
    fig = Figure(figsize=(12, 7), layout="constrained")
    axes = fig.subplots(2, 3)
    for row, (key, label) in enumerate((("gap", "gap (slices between the two kept sections)"),
                                        ("distance", "distance to the nearest kept section (slices)"))):
        for col, metric in enumerate(METRICS):
            _strip(axes[row, col], interior, key, metric, models)
            axes[row, col].set_xlabel(label)
    handles = [Line2D([], [], marker="o", linestyle="", color=f"C{i}",
                      label=f"{m} (N = {sum(r['model'] == m for r in interior)} slices)")
               for i, m in enumerate(models)]
    handles.append(Line2D([], [], color="black", linewidth=2, label="mean"))
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles))
    fig.suptitle(title or "Held-out sections: every slice's score per model")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    return buffer.getvalue()


def panel_png(ds: Dataset, slices: Sequence[int], predictions: Mapping[str, np.ndarray],
              models: Sequence[str], where: Mapping[int, str] | None = None) -> bytes:
    """PNG: per slice, the truth, then each model's prediction (with its PSNR) and absolute
    error on a fixed scale (0 to :data:`~atlinter_ray.quicklook.ERROR_SCALE` of full
    intensity, shown on a colour bar); ``where`` labels each slice (e.g. its gap)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    truths = {s: hwc(img) for s, img in zip(slices, read_sections(ds, list(slices)))}
    cols = 1 + 2 * len(models)
    fig = Figure(figsize=(2.2 * cols + 1.2, 2.4 * len(slices)), layout="constrained")
    axes = np.atleast_2d(fig.subplots(len(slices), cols, squeeze=False))
    top = ERROR_SCALE * ds.peak
    mappable = None
    for r, s in enumerate(slices):
        truth = truths[s]
        label = f"truth, slice {s}" + (f"\n{where[s]}" if where and s in where else "")
        shown: list[tuple[str, np.ndarray, str | None]] = [(label, truth, None)]
        for m in models:
            pred = predictions[f"{m}/{s}"]
            error = np.abs(pred.astype(np.float64) - truth.astype(np.float64))
            error = error.mean(axis=-1) if error.ndim == 3 else error
            score = psnr(pred, truth, ds.peak)
            shown += [(f"{m}\nPSNR {score:.1f} dB", pred, None), (f"|error| {m}", error, "inferno")]
        for c, (name, img, cmap) in enumerate(shown):
            ax = axes[r, c]
            if cmap is None:
                img = img.astype(np.float64) / ds.peak
                ax.imshow(np.clip(img, 0, 1), cmap="gray", vmin=0, vmax=1)
            else:
                mappable = ax.imshow(img, cmap=cmap, vmin=0, vmax=top)
            ax.set_title(name, fontsize=8)
            ax.set_axis_off()
    if mappable is not None:
        bar = fig.colorbar(mappable, ax=axes[:, -1].tolist(), shrink=0.8, extend="max")
        bar.set_label(f"|error| (0 to {top:g} = {ERROR_SCALE:.0%} of full intensity {ds.peak:g})")
    fig.suptitle(f"{ds.id}: held-out slices, predictions and errors")
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
