"""Issue 12 experiment: could learned members (RIFE 4.x) let a mix beat the best single by 1 dB?

At gap 8 on every real volume, collect each member's prediction of every held-out slice
(the harness of ``bench_context.py``), then score:

- every single model (mean per-slice PSNR, uint8, as the benchmark);
- oracle A: least-squares mix (weights + bias) of {tvl1, dis, deepflow} fitted on the
  held-out truth itself (an upper bound on any per-volume linear mix);
- oracle B: the same with {tvl1, dis, deepflow, rife_v4 4.0, rife_v4 4.2x};
  ``B+v3`` adds rife_v3 (dyadic positions exist at gap 8), ``B+fus`` adds fusion;
- oracle C: per-pixel best member of set B (closest to the truth) - a loose upper bound
  on any per-pixel selection; ``C_A``: the same for the classical set only;
- C8 / C16 / C32: best member of set B per 8/16/32-pixel block (``_A``: classical
  set), a tighter bound on region-wise confidence selection; ``slice_best_B``: the
  best member of B chosen per held-out slice;
- realisable mix: the least-squares mix of set B (and of A) fitted WITHOUT the held-out
  slices: every interior known section is predicted from its neighbours 16 apart
  (both phases of the gap-8 sections, midpoints only) and the weights fitted there.

Predictions are cached per volume under ``benchmarks/results/oracle_cache/``.

Usage (repository root)::

    python benchmarks/oracle_members.py --volumes mni152_2mm tomo nuclei mni152_1mm
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_context as BC

from atlinter_ray.metrics import score_slice
from atlinter_ray.planning import plan_dataset
from atlinter_ray.testing.volumes import REAL_VOLUMES

HERE = Path(__file__).resolve().parent
CACHE = HERE / "results" / "oracle_cache"
MEMBERS = ["tvl1", "dis", "deepflow", "fusion", "rife_v4 4.0", "rife_v4 4.2x", "rife_v3"]
SET_A = ["tvl1", "dis", "deepflow"]
SET_B = SET_A + ["rife_v4 4.0", "rife_v4 4.2x"]
SINGLE = ["dis", "deepflow", "tvl1", "rife_v3", "rife_v4 4.0", "rife_v4 4.2x"]


def collect(model, volume, tasks):
    """Float predictions ``(N, H, W)`` of every predicted slice, their slice numbers, seconds."""
    preds, slices, seconds = [], [], 0.0
    for task in tasks:
        frames, spent = BC.predict_task(model, volume, task)
        seconds += spent
        for k, job in enumerate(task.predicted):
            preds.append(frames[k].astype(np.float32))
            slices.append(job.slice)
    return np.stack(preds), np.array(slices), seconds


def mean_psnr(pred: np.ndarray, truth: np.ndarray) -> float:
    """Mean per-slice PSNR of float predictions, rounded to uint8 as the benchmark does."""
    p = np.clip(np.rint(pred), 0, 255).astype(np.uint8)
    return float(np.mean([score_slice(p[i], truth[i], 255.0).psnr for i in range(len(p))]))


def lstsq_weights(preds: list[np.ndarray], truth: np.ndarray) -> np.ndarray:
    """Weights (one per member, then a bias) minimising the squared error to ``truth``."""
    x = np.stack([p.ravel().astype(np.float64) for p in preds] + [np.ones(truth.size)], 1)
    w, *_ = np.linalg.lstsq(x, truth.ravel().astype(np.float64), rcond=None)
    return w


def mix(preds: list[np.ndarray], w: np.ndarray) -> np.ndarray:
    """``sum w_i p_i + bias``."""
    out = np.full(preds[0].shape, w[-1], np.float64)
    for wi, p in zip(w[:-1], preds):
        out += wi * p
    return out


def per_pixel_best(preds: list[np.ndarray], truth: np.ndarray) -> np.ndarray:
    """At each pixel, the member (rounded to uint8) closest to the truth."""
    p = np.clip(np.rint(np.stack(preds)), 0, 255)
    idx = np.abs(p - truth[None].astype(np.float64)).argmin(0)
    return np.take_along_axis(p, idx[None], 0)[0]


def block_best(preds: list[np.ndarray], truth: np.ndarray, size: int) -> np.ndarray:
    """In each ``size`` x ``size`` block of each slice, the member with the least error."""
    p = np.clip(np.rint(np.stack(preds)), 0, 255)
    err = (p - truth[None].astype(np.float64)) ** 2  # (M, N, H, W)
    h, w = truth.shape[1:]
    rows, cols = np.arange(0, h, size), np.arange(0, w, size)
    sse = np.add.reduceat(np.add.reduceat(err, rows, axis=2), cols, axis=3)
    idx = sse.argmin(0)  # (N, nh, nw)
    idx = np.repeat(np.repeat(idx, size, axis=1), size, axis=2)[:, :h, :w]
    return np.take_along_axis(p, idx[None], 0)[0]


def gap8(vol: str, volume: np.ndarray, built, stride: int):
    """Every member's prediction of the held-out slices at gap 8 (cached)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"{vol}_gap8_s{stride}.npz"
    if path.exists():
        z = np.load(path, allow_pickle=True)
        return {m: z[m] for m in MEMBERS}, z["slices"], z["seconds"].item()
    known = BC.known_positions(volume.shape[0], "8")
    tasks = [t for t in plan_dataset(vol, known, volume.shape[0], context=1) if t.predicted]
    tasks = tasks[::stride]
    preds, seconds, slices = {}, {}, None
    for m in MEMBERS:
        preds[m], s, seconds[m] = collect(built[m], volume, tasks)
        assert slices is None or (s == slices).all()
        slices = s
        print(f"  {m:14s} {seconds[m] / len(s):.4f} s/slice", flush=True)
    np.savez(path, slices=slices, seconds=np.array(seconds, dtype=object), **preds)
    return preds, slices, seconds


def gap16_midpoints(vol: str, volume: np.ndarray, built, names):
    """Predictions of every interior gap-8 known section from its neighbours 16 apart."""
    path = CACHE / f"{vol}_gap16_mid.npz"
    if path.exists():
        z = np.load(path)
        return {m: z[m] for m in names}, z["slices"]
    known = BC.known_positions(volume.shape[0], "8")
    keep = set(known)
    tasks = []
    for phase in (0, 1):
        k16 = known[phase::2]
        for t in plan_dataset(vol, k16, volume.shape[0], context=1):
            jobs = tuple(j for j in t.jobs if j.status == "predicted" and j.slice in keep)
            if jobs:
                tasks.append(dataclasses.replace(t, jobs=jobs))
    preds, slices = {}, None
    for m in names:
        preds[m], s, _ = collect(built[m], volume, tasks)
        slices = s
    np.savez(path, slices=slices, **preds)
    return preds, slices


def analyse(vol: str, stride: int, built, realisable: bool) -> dict:
    """Every row of the table for one volume."""
    volume = REAL_VOLUMES[vol]()
    print(f"{vol} {volume.shape} stride {stride}", flush=True)
    preds, slices, seconds = gap8(vol, volume, built, stride)
    truth = volume[slices]
    single = {m: mean_psnr(preds[m], truth) for m in MEMBERS}
    sec = {m: seconds[m] / len(slices) for m in MEMBERS}
    best = max(SINGLE, key=lambda m: single[m])
    out = {"slices": int(len(slices)), "stride": stride, "psnr": single,
           "seconds_per_slice": sec, "best_single": best}
    sets = {"A": SET_A, "B": SET_B, "B+v3": SET_B + ["rife_v3"],
            "B+v3+fus": SET_B + ["rife_v3", "fusion"]}
    oracle, weights = {}, {}
    for name, members in sets.items():
        w = lstsq_weights([preds[m] for m in members], truth)
        weights[name] = dict(zip(members + ["bias"], np.round(w, 3).tolist()))
        oracle[name] = mean_psnr(mix([preds[m] for m in members], w), truth)
    oracle["C"] = mean_psnr(per_pixel_best([preds[m] for m in SET_B], truth), truth)
    oracle["C_A"] = mean_psnr(per_pixel_best([preds[m] for m in SET_A], truth), truth)
    oracle["C+v3+fus"] = mean_psnr(
        per_pixel_best([preds[m] for m in sets["B+v3+fus"]], truth), truth)
    for size in (8, 16, 32):
        oracle[f"C{size}"] = mean_psnr(
            block_best([preds[m] for m in SET_B], truth, size), truth)
        oracle[f"C{size}_A"] = mean_psnr(
            block_best([preds[m] for m in SET_A], truth, size), truth)
    oracle["slice_best_B"] = float(np.mean([max(
        score_slice(np.clip(np.rint(preds[m][i]), 0, 255).astype(np.uint8), truth[i],
                    255.0).psnr for m in SET_B) for i in range(len(truth))]))
    out["oracle"], out["weights"] = oracle, weights
    if realisable:
        names = sets["B+v3+fus"]
        train, tslices = gap16_midpoints(vol, volume, built, names)
        ttruth = volume[tslices]
        real, rweights = {}, {}
        for name, members in sets.items():
            w = lstsq_weights([train[m] for m in members], ttruth)
            rweights[name] = dict(zip(members + ["bias"], np.round(w, 3).tolist()))
            real[name] = mean_psnr(mix([preds[m] for m in members], w), truth)
        out["realisable"], out["realisable_weights"] = real, rweights
        out["realisable_targets"] = int(len(tslices))
    ref = single[best]
    out["gain_db"] = {"fusion": single["fusion"] - ref,
                      **{f"oracle {k}": v - ref for k, v in oracle.items()},
                      **{f"real {k}": v - ref for k, v in out.get("realisable", {}).items()}}
    print(json.dumps(out, indent=1, default=float), flush=True)
    return out


def main() -> None:
    """Run the volumes named; write benchmarks/results/oracle_members.json."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--volumes", nargs="*", default=list(REAL_VOLUMES))
    parser.add_argument("--stride", nargs="*", default=[], help="vol=k: every k-th gap")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--realisable", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    strides = {k: int(v) for k, v in (s.split("=") for s in args.stride)}
    built = BC.models()
    res_path = HERE / "results" / "oracle_members.json"
    results = json.loads(res_path.read_text()) if res_path.exists() else {}
    for vol in args.volumes:
        results[vol] = analyse(vol, strides.get(vol, 1), built, args.realisable)
        res_path.write_text(json.dumps(results, indent=1, default=float))


if __name__ == "__main__":
    main()
