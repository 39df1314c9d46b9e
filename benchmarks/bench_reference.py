"""Reference-guided reconstruction on co-registered pairs where the gene is not the reference.

The reference is a real volume (the bundled MNI152 2009a T1, ``mni152_2mm``), stacked
along each of its three axes (three stacks with different motion between slices). Per
stack, three genes share its space:

- ``control``: the gene is the reference itself (the ceiling);
- ``contrast``: region-wise expression on the reference's anatomy: the smoothed volume
  cut into ``LABELS`` intensity classes (a label map of the real anatomy), each class
  given its own level, times a smooth multiplicative field: the same anatomy in another
  contrast, as a gene against the Nissl;
- ``reversed``: the same recipe on the volume reversed along the stack axis: other
  anatomy at every slice, the reference's guidance wrong (on the left-right stack,
  axis 2, the mirrored hemispheres nearly match: there it is not a mismatch);
- ``deformed``: the same recipe on the volume deformed in-plane by a smooth random
  displacement (up to ``MISMATCH_PX`` pixels) that changes along the stack axis every
  ``MISMATCH_PERIOD`` slices: a gene whose anatomy moves from slice to slice otherwise
  than the reference's (the reference's guidance is wrong by a few pixels per gap).

Known sections every ``--gap`` slices (8); every slice between two known sections is
predicted and scored (PSNR in dB, uint8, mean over slices, and by distance to the
nearest known section). Configurations: ``fusion`` (no reference), ``fusion+reference``
(the recommended configuration with a reference: the two-sided reference member fused
with the pair members, trust learned per gap), ``two-sided`` and ``nearest`` (one
flow model on the reference), all with the members/estimator given.

Usage (from the repository root; writes ``benchmarks/results/reference.json``)::

    python benchmarks/bench_reference.py                       # DIS+DeepFlow+TV-L1 fusion
    python benchmarks/bench_reference.py --members dis --out reference-dis.json
    python benchmarks/bench_reference.py --stacks 0 --genes reversed --out reference-rev.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from scipy import ndimage

from atlinter_ray.models.base import FlowEstimator, Neighbour, build_model
from atlinter_ray.models.context import FusionInterpolator
from atlinter_ray.models.flow import FlowInterpolator
from atlinter_ray.models.reference_guided import (
    nearest_known,
    predict_from_reference,
    predict_gap_from_reference,
)
from atlinter_ray.sample import sample_truth

RESULTS = Path(__file__).resolve().parent / "results"
#: Intensity classes of the label map a ``contrast`` gene is painted on.
LABELS = 6
#: Largest in-plane displacement (pixels) of a ``deformed`` gene's anatomy.
MISMATCH_PX = 6.0
#: Slices over which that displacement changes (its coarse grid along the stack).
MISMATCH_PERIOD = 12


def label_gene(volume: np.ndarray, seed: int) -> np.ndarray:
    """Region-wise expression on ``volume``'s anatomy (see the module), uint8."""
    rng = np.random.default_rng(seed)
    smooth = np.stack([cv2.GaussianBlur(p.astype(np.float32), (0, 0), 1.0) for p in volume])
    edges = np.quantile(smooth[smooth > 8], np.linspace(0, 1, LABELS + 1)[1:-1])
    labels = np.digitize(smooth, edges) * (smooth > 8)
    levels = np.concatenate([[0.0], rng.uniform(30, 240, LABELS)])
    painted = levels[labels].astype(np.float32)
    coarse = rng.standard_normal([max(2, n // 16) for n in volume.shape])
    field = ndimage.zoom(coarse, [n / c for n, c in zip(volume.shape, coarse.shape)], order=1)
    gene = painted * (1.0 + 0.15 * field)
    gene = np.stack([cv2.GaussianBlur(p, (0, 0), 0.7) for p in gene])
    out: np.ndarray = np.clip(np.rint(gene), 0, 255).astype(np.uint8)
    return out


def deformed(volume: np.ndarray, seed: int) -> np.ndarray:
    """``volume`` moved in-plane by a smooth random displacement varying along axis 0."""
    rng = np.random.default_rng(seed)
    coarse = (max(2, volume.shape[0] // MISMATCH_PERIOD), 3, 3)
    grid = np.mgrid[tuple(slice(0, n) for n in volume.shape)].astype(np.float32)
    for axis in (1, 2):
        field = ndimage.zoom(rng.uniform(-1, 1, coarse),
                             [n / c for n, c in zip(volume.shape, coarse)], order=3)
        grid[axis] += MISMATCH_PX * np.clip(field, -1, 1)
    out: np.ndarray = ndimage.map_coordinates(volume.astype(np.float32), grid, order=1,
                                              mode="nearest")
    return out


def stacks() -> dict[str, np.ndarray]:
    """The real volume stacked along each axis (axis 0 first)."""
    volume = sample_truth()
    return {f"mni152_2mm axis {k}": np.ascontiguousarray(np.moveaxis(volume, k, 0))
            for k in range(3)}


def genes(reference: np.ndarray) -> dict[str, np.ndarray]:
    """The three genes of one stack (see the module)."""
    return {
        "control": reference,
        "contrast": label_gene(reference, seed=1),
        "reversed": label_gene(reference[::-1], seed=1),
        "deformed": label_gene(deformed(reference, seed=2), seed=1),
    }


def psnr(pred: np.ndarray, truth: np.ndarray) -> float:
    """PSNR (dB) of a prediction rounded to uint8 against a uint8 truth."""
    p = np.clip(np.rint(pred), 0, 255).astype(np.float64)
    mse = float(np.mean((p - truth.astype(np.float64)) ** 2))
    return 99.0 if mse == 0 else 10 * np.log10(255.0**2 / mse)


def predict(config: str, fusion: FusionInterpolator, estimator: FlowEstimator,
            gene: np.ndarray, reference: np.ndarray, known: list[int]) -> dict[int, np.ndarray]:
    """Every slice between two known sections, ``(H, W)`` by slice number."""
    g = gene.astype(np.float32)[:, None]
    r = reference.astype(np.float32)[:, None]
    flow = FlowInterpolator(estimator)
    out = {}
    for i in range(len(known) - 1):
        lo, hi = known[i], known[i + 1]
        context = tuple(c for c in (known[i - 1] if i > 0 else None,
                                    known[i + 2] if i + 2 < len(known) else None)
                        if c is not None)
        targets = list(range(lo + 1, hi))
        ts = np.array([(s - lo) / (hi - lo) for s in targets], np.float32)
        if config == "fusion":
            before = Neighbour(g[known[i - 1]]) if i > 0 else None
            after = Neighbour(g[known[i + 2]]) if i + 2 < len(known) else None
            frames = fusion.interpolate_context(g[lo], g[hi], ts, 255.0, before, after)
        elif config == "nearest":
            nearest = [nearest_known(s, (lo, hi)) for s in targets]
            frames = predict_from_reference(estimator, r[targets], r[nearest], g[nearest], 255.0)
        else:
            model = fusion if config == "fusion+reference" else flow
            frames = predict_gap_from_reference(model, estimator, g, r, targets, (lo, hi),
                                                context, 255.0, 255.0)
        out.update({s: f[0] for s, f in zip(targets, frames)})
    return out


def score(pred: dict[int, np.ndarray], gene: np.ndarray, known: list[int]) -> dict[str, Any]:
    """Mean PSNR over the predicted slices, and by distance to the nearest known one."""
    by_distance: dict[int, list[float]] = {}
    values = []
    for s, frame in pred.items():
        value = psnr(frame, gene[s])
        values.append(value)
        by_distance.setdefault(abs(s - nearest_known(s, known)), []).append(value)
    return {"psnr": round(float(np.mean(values)), 3),
            "by_distance": {str(d): round(float(np.mean(v)), 3)
                            for d, v in sorted(by_distance.items())}}


def main() -> None:
    """Run every stack, gene and configuration; print and save the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gap", type=int, default=8)
    parser.add_argument("--members", default="dis,deepflow,tvl1")
    parser.add_argument("--estimator", default="dis")
    parser.add_argument("--stacks", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--genes", nargs="*", default=["control", "contrast", "reversed",
                                                          "deformed"])
    parser.add_argument("--out", default="reference.json")
    args = parser.parse_args()
    cv2.setNumThreads(1)
    estimator = build_model(args.estimator)
    assert isinstance(estimator, FlowEstimator)
    fusion = build_model("fusion", members=args.members.split(","),
                         reference_flow=args.estimator)
    assert isinstance(fusion, FusionInterpolator)
    rows = []
    for k, (name, reference) in enumerate(stacks().items()):
        if k not in args.stacks:
            continue
        known = list(range(0, reference.shape[0], args.gap))
        for gene_name, gene in genes(reference).items():
            if gene_name not in args.genes:
                continue
            row: dict[str, Any] = {"stack": name, "gene": gene_name}
            for config in ("fusion", "fusion+reference", "two-sided", "nearest"):
                start = time.perf_counter()
                pred = predict(config, fusion, estimator, gene, reference, known)
                row[config] = {**score(pred, gene, known),
                               "s_per_slice": round((time.perf_counter() - start) / len(pred), 3)}
            row["gain_over_fusion_db"] = round(
                row["fusion+reference"]["psnr"] - row["fusion"]["psnr"], 3)
            print(json.dumps(row), flush=True)
            rows.append(row)
            out = {"gap": args.gap, "members": args.members, "estimator": args.estimator,
                   "rows": rows}
            (RESULTS / args.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
