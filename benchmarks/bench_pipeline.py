"""Pipeline vs the predecessor's way: wall time, slices/s and peak memory.

Runs, in one invocation on the same full-size dataset (reference 528x320x456, RGB
uint8, one section every 8 slices, synthetic smooth content that moves from section
to section):

* ``predecessor``: the predecessor's own loop, atlinter 0.2.3's
  ``GeneInterpolate(GeneDataset(...), model).predict_volume()``, with the same model
  plugged in as its ``PairInterpolationModel`` (a midpoint per call, as atlinter drives
  every pair model: 2^ceil(log2 gap) - 1 calls per gap, each on the previous calls'
  outputs), the result saved as one uint8 ``.npy``. The ratios are against it;
* ``sequential``: a lean in-process loop over our own engine (flow computed once per
  gap and warped to every missing slice, one float64 volume in memory), OpenCV on every
  core: the same algorithm as the pipeline without Ray, the harder baseline;
* the same lean loop with OpenCV held to one thread (``sequential-1t``);
* ``pipeline`` with 1 and with 2 Ray workers (one thread each), writing OME-Zarr.

Each table row gives the speed and memory ratios against ``predecessor`` and the speed
ratios against ``sequential`` and ``sequential-1t``.

Each mode runs in its own process; a sampler adds up the proportional set size (PSS)
of the driver and our worker actors, so shared libraries count once; Ray's service
processes are reported in a separate column. The local cluster is started before the
clock runs, as it would be on a real cluster; the actor pool's start (process spawn,
imports, model load: a fixed few seconds per run) is inside the clock.

Usage::

    python benchmarks/bench_pipeline.py --model dis --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = (528, 320, 456)
SPACING = 8


def make_dataset(folder: Path, seed: int = 0, name: str = "synthetic") -> Path:
    """Write the synthetic full-size RGB dataset ``<name>``; return its ``.npy`` path."""
    import cv2

    rng = np.random.default_rng(seed)
    h, w = REFERENCE[1:]
    field = np.zeros((h + 64, w + 256, 3), np.float32)
    for sigma, weight in ((24, 1.0), (8, 0.5), (3, 0.25)):
        noise = rng.random(field.shape).astype(np.float32)
        field += weight * cv2.GaussianBlur(noise, (0, 0), sigma)
    field = (field - field.min()) / (field.max() - field.min()) * 255
    sections = list(range(4, REFERENCE[0], SPACING))
    images = np.empty((len(sections), h, w, 3), np.uint8)
    for k, s in enumerate(sections):
        dx, dy = s * 0.4, 8 * np.sin(s / 60)  # content drifts slowly along the AP axis
        m = np.float32([[1, 0, dx], [0, 1, dy + 16]])
        images[k] = cv2.warpAffine(field, m, (field.shape[1], field.shape[0]))[:h, :w].astype(np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / f"{name}.npy", images)
    (folder / f"{name}.json").write_text(
        json.dumps({"section_numbers": sections, "axis": "coronal"})
    )
    return folder / f"{name}.npy"


class PeakPSS:
    """Samples the PSS of this process (the driver) and of the Ray processes beside it.

    ``peak`` is the driver plus our worker actors (``ray::...TaskWorker``), the figure
    the targets are about; ``driver_peak`` the driver alone; ``peak_with_services``
    adds every other ``ray::`` process
    (the dashboard and runtime-env agents, idle pooled workers),
    so nothing is hidden. GCS and raylet are not counted in either.
    """

    def __init__(self, interval: float = 0.2) -> None:
        self.interval, self._stop = interval, threading.Event()
        self.peak = self.peak_with_services = self.driver_peak = 0
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _pss(pid: int) -> int:
        """PSS in bytes from ``smaps_rollup`` (cheap: the sampler must not steal CPU)."""
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
        return 0

    def _sample(self) -> tuple[int, int, int]:
        me = os.getpid()
        driver = ours = self._pss(me)
        services = 0
        for p in psutil.process_iter(["cmdline"]):
            cmd = " ".join(p.info["cmdline"] or [])
            if p.pid == me or not cmd.startswith("ray::"):
                continue
            try:
                pss = self._pss(p.pid)
            except (FileNotFoundError, ProcessLookupError, PermissionError):
                continue
            if "TaskWorker" in cmd:
                ours += pss
            else:
                services += pss
        return driver, ours, ours + services

    def _run(self) -> None:
        while not self._stop.is_set():
            driver, ours, everything = self._sample()
            self.driver_peak = max(self.driver_peak, driver)
            self.peak = max(self.peak, ours)
            self.peak_with_services = max(self.peak_with_services, everything)
            time.sleep(self.interval)

    def __enter__(self) -> PeakPSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def save_uint8(volume: np.ndarray, out: Path) -> None:
    """Save slice by slice: no second full-size copy."""
    saved = np.lib.format.open_memmap(out / "volume.npy", "w+", np.uint8, volume.shape)
    for i in range(volume.shape[0]):
        saved[i] = np.clip(np.rint(volume[i]), 0, 255)
    saved.flush()


def predecessor(npy: Path, model_name: str, out: Path) -> dict:
    """atlinter 0.2.3's ``predict_volume`` with our model as its pair model."""
    from atlinter_ray.testing.predecessor import import_predecessor

    import_predecessor()
    from atlinter.data import GeneDataset
    from atlinter.pair_interpolation import GeneInterpolate, PairInterpolationModel

    from atlinter_ray.engine import build_interpolator

    model = build_interpolator(model_name)

    class Midpoint(PairInterpolationModel):
        """Our model at t = 1/2 on atlinter's (H, W, 3) float64 images."""

        def interpolate(self, img1: np.ndarray, img2: np.ndarray) -> np.ndarray:
            a, b = (np.moveaxis(img, -1, 0)[None] for img in (img1, img2))
            return np.moveaxis(model.interpolate(a, b, np.array([0.5]), 255.0)[0, 0], 0, -1)

    start = time.perf_counter()
    meta = json.loads(npy.with_suffix(".json").read_text())
    data = GeneDataset(np.load(npy), meta["section_numbers"], meta["axis"], (*REFERENCE, 3))
    save_uint8(GeneInterpolate(data, Midpoint()).predict_volume(), out)
    return {"wall_s": time.perf_counter() - start, "slices": REFERENCE[0]}


def sequential(npy: Path, model_name: str, out: Path, threads: int) -> dict:
    """The predecessor's way, with our model: whole float64 volume, gap after gap.

    ``threads``: OpenCV threads (0: the library default, every core).
    """
    import cv2

    from atlinter_ray.dataset import load_dataset
    from atlinter_ray.engine import build_interpolator, predict
    from atlinter_ray.planning import plan_dataset

    if threads:
        cv2.setNumThreads(threads)
    start = time.perf_counter()
    ds = load_dataset(str(npy))
    model = build_interpolator(model_name)
    gene = np.load(npy)
    volume = np.zeros((*REFERENCE, 3))  # float64, as atlinter's GeneDataset/predict_volume
    volume[list(ds.section_numbers)] = gene
    for task in plan_dataset(ds.id, ds.section_numbers, ds.n_slices):
        for job in task.jobs:
            if job.source is not None:
                volume[job.slice] = volume[job.source]
        if task.predicted:
            a = np.moveaxis(volume[task.left], -1, 0)[None]
            b = np.moveaxis(volume[task.right], -1, 0)[None]
            frames = predict(model, a, b, [j.t for j in task.predicted], 255.0).frames[0]
            for job, frame in zip(task.predicted, frames):
                volume[job.slice] = np.moveaxis(frame, 0, -1)
    save_uint8(volume, out)
    return {"wall_s": time.perf_counter() - start, "slices": REFERENCE[0]}


def pipeline(npy: Path, model_name: str, out: Path, workers: int) -> dict:
    """This project's pipeline on a local Ray cluster with ``workers`` actors."""
    import ray

    from atlinter_ray.config import Config
    from atlinter_ray.pipeline import run

    t0 = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    init_s = time.perf_counter() - t0
    cfg = Config()
    cfg.data.datasets = [str(npy)]
    cfg.model.name, cfg.model.params = model_name, {}
    cfg.output.root, cfg.output.quicklook = str(out / "volumes"), False
    cfg.resources.min_workers = cfg.resources.max_workers = workers
    cfg.run.progress = False
    start = time.perf_counter()
    summary = run(cfg)
    wall = time.perf_counter() - start
    ray.shutdown()
    assert summary.ok, summary.failures
    return {"wall_s": wall, "slices": summary.slices_written, "ray_init_s": init_s}


def child(args: argparse.Namespace) -> None:
    """Run one mode and print its JSON result (called in a fresh process)."""
    out = Path(args.workdir) / f"{args.mode}-{args.workers}-{args.threads}"
    out.mkdir(parents=True, exist_ok=True)
    with PeakPSS() as mem:
        if args.mode == "predecessor":
            result = predecessor(Path(args.npy), args.model, out)
        elif args.mode == "sequential":
            result = sequential(Path(args.npy), args.model, out, args.threads)
        else:
            result = pipeline(Path(args.npy), args.model, out, args.workers)
    result["peak_pss_mb"] = mem.peak / 2**20
    result["peak_pss_with_ray_services_mb"] = mem.peak_with_services / 2**20
    result["slices_per_s"] = result["slices"] / result["wall_s"]
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    """Run every mode on the same data and print the table and the ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="dis")
    parser.add_argument("--out", default=None, help="folder for results.json")
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--npy", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        child(args)
        return
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}
    with tempfile.TemporaryDirectory() as tmp:
        npy = make_dataset(Path(tmp) / "data")
        results = {}
        runs = (("predecessor", 0, 0), ("sequential", 0, 0), ("sequential", 0, 1),
                ("pipeline", 1, 0), ("pipeline", 2, 0))
        for mode, workers, threads in runs:
            cmd = [sys.executable, __file__, "--mode", mode, "--workers", str(workers),
                   "--threads", str(threads),
                   "--npy", str(npy), "--workdir", tmp, "--model", args.model]
            done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
            line = next(ln for ln in done.stdout.splitlines() if ln.startswith("RESULT "))
            name = f"pipeline-{workers}w" if workers else (f"{mode}-1t" if threads else mode)
            results[name] = json.loads(line[7:])
    base = results["predecessor"]
    lean, single = results["sequential"], results["sequential-1t"]
    print(f"model={args.model}  reference={REFERENCE} RGB uint8, one section every {SPACING}")
    print(f"{'mode':<14}{'wall s':>9}{'slices/s':>10}{'peak MB':>10}{'speed x':>9}{'memory x':>10}"
          f"{'MB w/ Ray services':>20}{'x lean loop':>13}{'x lean 1-thread':>17}")
    for name, r in results.items():
        r["speedup"] = r["slices_per_s"] / base["slices_per_s"]
        r["memory_ratio"] = r["peak_pss_mb"] / base["peak_pss_mb"]
        r["speedup_vs_lean_loop"] = r["slices_per_s"] / lean["slices_per_s"]
        r["speedup_vs_lean_1_thread"] = r["slices_per_s"] / single["slices_per_s"]
        print(f"{name:<14}{r['wall_s']:>9.2f}{r['slices_per_s']:>10.1f}{r['peak_pss_mb']:>10.0f}"
              f"{r['speedup']:>9.2f}{r['memory_ratio']:>10.2f}"
              f"{r['peak_pss_with_ray_services_mb']:>20.0f}{r['speedup_vs_lean_loop']:>13.2f}"
              f"{r['speedup_vs_lean_1_thread']:>17.2f}")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / f"pipeline-{args.model}.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
