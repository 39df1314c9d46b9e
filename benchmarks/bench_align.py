"""Align throughput and quality: the align job on 1 and 2 Ray workers against the predecessor.

The predecessor aligned one section after another in one process (atlinter's
``data/align.py``: ANTs with its default thread count, all cores). The baseline here is
that loop over the same registration (:func:`atlinter_ray.align.registration.align_section`)
in a fresh process, with ITK's default threads and again with one thread (what each of
our workers uses, for identical bytes on every rerun). Then the align job runs the same
experiments on a local Ray cluster with ``resources.max_workers`` 1 and 2 (cluster
started once, before timing; actor start-up is inside the timing). Sections are real
slices (the bundled MNI152 sample resampled to the 25 µm CCF coronal plane, 320 x 456)
moved by known smooth fields, half of them RGB; the quality is the mean distance left
between the recovered and the perfect transform, against the applied one, and NCC to
the reference before and after.

    python benchmarks/bench_align.py                 # 4 experiments x 4 sections
    python benchmarks/bench_align.py --experiments 2 --sections 2   # quick look

Writes ``benchmarks/results/align.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from atlinter_ray.align.config import AlignConfig, AlignOutputConfig
from atlinter_ray.align.job import run_align
from atlinter_ray.config import DataConfig, ResourcesConfig, RunConfig
from atlinter_ray.testing.align_data import reference_volume, residual, write_misaligned

RESULTS = Path(__file__).resolve().parent / "results" / "align.json"

#: The predecessor's loop, in a process of its own (ITK fixes its threads per process).
_SERIAL_LOOP = """
import json, os, sys, time
import numpy as np
from atlinter_ray.align.config import Contrast, Fill, Transform
from atlinter_ray.align.registration import align_section, make_deterministic, to_gray
root, genes, threads = sys.argv[1], sys.argv[2].split(","), sys.argv[3]
if threads == "1":
    make_deterministic(1)
volume = np.load(f"{root}/nissl.npy")
start, n = time.perf_counter(), 0
for gene in genes:
    images = np.load(f"{root}/{gene}.npy")
    meta = json.load(open(f"{root}/{gene}.json"))
    for image, s in zip(images, meta["section_numbers"]):
        chw = image[None] if image.ndim == 2 else np.moveaxis(image, -1, 0)
        nissl = to_gray(volume[s][None], float(volume.max()))
        align_section(chw, 255.0, nissl, Transform.syn, {}, Fill.atlinter, Contrast.auto)
        n += 1
print(json.dumps({"sections": n, "seconds": time.perf_counter() - start}))
"""


def _serial(root: Path, genes: list[str], threads: str) -> dict[str, float]:
    """Sections/s of the predecessor's loop; ``threads`` "default" or "1"."""
    env = dict(os.environ)
    env.pop("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", None)
    out = subprocess.run([sys.executable, "-c", _SERIAL_LOOP, str(root), ",".join(genes), threads],
                         check=True, capture_output=True, text=True, env=env)
    run = json.loads(out.stdout.strip().splitlines()[-1])
    return {"seconds": round(run["seconds"], 3), "sections_per_s": round(run["sections"] / run["seconds"], 4)}


def _job(root: Path, genes: list[str], out: Path, workers: int) -> tuple[dict[str, float], object]:
    """Sections/s of the align job on ``workers`` Ray actors."""
    cfg = AlignConfig(
        data=DataConfig(root=str(root), genes=genes),
        reference=str(root / "nissl.npy"),
        output=AlignOutputConfig(root=str(out), overlay_sections=0),
        resources=ResourcesConfig(min_workers=workers, max_workers=workers),
        run=RunConfig(progress=False),
    )
    start = time.perf_counter()
    summary = run_align(cfg)
    seconds = time.perf_counter() - start
    sections = sum(r.registered for r in summary.results)
    assert summary.ok and summary.count("done") == len(genes)
    return {"seconds": round(seconds, 3), "sections_per_s": round(sections / seconds, 4)}, summary


def _quality(root: Path, out: Path, genes: list[str], fields: dict[str, np.ndarray],
             volume: np.ndarray, summary: object) -> dict[str, float]:
    """Distance to the perfect transform before (the applied one) and after aligning."""
    before, after = [], []
    for gene in genes:
        numbers = json.loads((root / f"{gene}.json").read_text())["section_numbers"]
        recovered = np.load(out / "transforms" / f"{gene}.npy")
        for k, s in enumerate(numbers):
            tissue = volume[s] > 12
            applied = fields[gene][k]
            before.append(float(np.hypot(applied[..., 0], applied[..., 1])[tissue].mean()))
            after.append(float(residual(recovered[k], applied)[tissue].mean()))
    sims = [r.similarity for r in summary.results]  # type: ignore[attr-defined]
    return {
        "misalignment_px_before": round(float(np.mean(before)), 3),
        "misalignment_px_after": round(float(np.mean(after)), 3),
        "residual_fraction": round(float(np.mean(after) / np.mean(before)), 4),
        "ncc_before": round(float(np.mean([s["before"]["ncc"] for s in sims])), 4),
        "ncc_after": round(float(np.mean([s["after"]["ncc"] for s in sims])), 4),
        "mi_before": round(float(np.mean([s["before"]["mi"] for s in sims])), 4),
        "mi_after": round(float(np.mean([s["after"]["mi"] for s in sims])), 4),
    }


def main() -> None:
    """Run the benchmark and write the results json."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiments", type=int, default=4)
    parser.add_argument("--sections", type=int, default=4)
    parser.add_argument("--amplitude", type=float, default=6.0, help="applied deformation scale (px)")
    args = parser.parse_args()

    import ray

    volume = reference_volume((91, 320, 456))
    with tempfile.TemporaryDirectory(prefix="bench-align-") as tmp:
        root = Path(tmp) / "in"
        root.mkdir()
        np.save(root / "nissl.npy", volume)
        genes = [f"exp{i}" for i in range(args.experiments)]
        fields = {
            gene: write_misaligned(root, gene, volume, "coronal",
                                   [20 + 50 // args.sections * k + i for k in range(args.sections)],
                                   amplitude=args.amplitude, rgb=i % 2 == 1, seed=10 * i)
            for i, gene in enumerate(genes)
        }
        load_before = os.getloadavg()
        serial_default = _serial(root, genes, "default")
        serial_one = _serial(root, genes, "1")
        ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
        try:
            one, _ = _job(root, genes, Path(tmp) / "w1", 1)
            two, summary = _job(root, genes, Path(tmp) / "w2", 2)
        finally:
            ray.shutdown()
        same = all((Path(tmp) / "w1" / f"{g}.npy").read_bytes()
                   == (Path(tmp) / "w2" / f"{g}.npy").read_bytes() for g in genes)
        quality = _quality(root, Path(tmp) / "w2", genes, fields, volume, summary)
    base = serial_default["sections_per_s"]
    result = {
        "benchmark": "align",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_average_before": [round(x, 2) for x in load_before],
                    "load_average_after": [round(x, 2) for x in os.getloadavg()]},
        "data": {"experiments": args.experiments, "sections_per_experiment": args.sections,
                 "section_shape": [320, 456], "rgb_experiments": args.experiments // 2,
                 "transform": "syn", "applied_amplitude_px": args.amplitude},
        "sections_per_s": {
            "predecessor_loop_default_threads": serial_default,
            "serial_loop_one_thread": serial_one,
            "job_1_worker": one,
            "job_2_workers": two,
        },
        "speedup_vs_predecessor_loop": {
            "serial_loop_one_thread": round(serial_one["sections_per_s"] / base, 3),
            "job_1_worker": round(one["sections_per_s"] / base, 3),
            "job_2_workers": round(two["sections_per_s"] / base, 3),
        },
        "same_bytes_1_and_2_workers": same,
        "quality": quality,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
