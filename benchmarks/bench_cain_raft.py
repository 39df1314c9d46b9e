"""Seconds per predicted slice for CAIN and RAFT: ours vs the predecessor, same input, same run.

One predicted slice is one CAIN forward (a midpoint) or one RAFT flow (the
predecessor's reference-guided mode computes one flow per predicted slice). Both sides
get the same 320x456 RGB pair and the same random weights (the predecessor's own
modules, saved in the original layouts and loaded by our code): timings do not depend
on weight values. The predecessor runs as atlinter 0.2.3 calls it: CAIN in training
mode without ``no_grad`` on a ``(1, 3, H, W)`` tensor (its wrapper's RGB path is broken,
so the tensor is passed to the network directly, as the grayscale path does after
repeating to 3 channels), RAFT through ``RAFTNet.preprocess_images`` / ``predict_flow``
(pad to 8, 20 iterations). Ours runs through the model protocol (numpy in, numpy out).

Usage (from the repository root)::

    python benchmarks/bench_cain_raft.py --threads 2 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]

from atlinter_ray.models.base import build_model  # noqa: E402
from atlinter_ray.testing.predecessor import import_predecessor  # noqa: E402


def timed(fns: dict[str, Callable[[], object]], repeats: int) -> list[tuple[str, float, float]]:
    """Median and minimum wall seconds of each function, runs interleaved after a warm-up.

    Interleaving (A, B, C, A, B, C, ...) spreads load from other processes on a shared
    machine evenly over the variants being compared.
    """
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {label: [] for label in fns}
    for _ in range(repeats):
        for label, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[label].append(time.perf_counter() - start)
    return [(label, statistics.median(t), min(t)) for label, t in times.items()]


def bench_cain(
    a: np.ndarray, b: np.ndarray, tmp: Path, repeats: int
) -> list[tuple[str, float, float]]:
    """Predecessor CAIN vs ours (default and channels_last)."""
    from atlinter.vendor.cain.cain import CAIN as PredecessorCAIN

    net = torch.nn.DataParallel(PredecessorCAIN())
    path = tmp / "pretrained_cain.pth"
    torch.save({"state_dict": net.state_dict()}, path, _use_new_zipfile_serialization=False)
    ta = torch.from_numpy(a.transpose(2, 0, 1)[None] / np.float32(255))
    tb = torch.from_numpy(b.transpose(2, 0, 1)[None] / np.float32(255))
    x0, x1 = ta.numpy(), tb.numpy()
    ours = build_model("cain", checkpoint=str(path), device="cpu")
    ours_cl = build_model("cain", checkpoint=str(path), device="cpu", channels_last=True)
    return timed(
        {
            "cain predecessor": lambda: net(ta.clone(), tb.clone()),
            "cain ours": lambda: ours.interpolate(x0, x1, [0.5]),
            "cain ours channels_last": lambda: ours_cl.interpolate(x0, x1, [0.5]),
        },
        repeats,
    )


def bench_raft(
    small: bool, a: np.ndarray, b: np.ndarray, tmp: Path, repeats: int
) -> list[tuple[str, float, float]]:
    """Predecessor RAFT (large or small) vs ours (default and channels_last)."""
    from atlinter.optical_flow import RAFTNet
    from atlinter.vendor.RAFT.raft import RAFT as PredecessorRAFT

    name = "raft_small" if small else "raft"
    net = torch.nn.DataParallel(
        PredecessorRAFT(argparse.Namespace(small=small, mixed_precision=False))
    )
    path = tmp / f"{name}.pth"
    torch.save(net.state_dict(), path)
    oracle = RAFTNet.__new__(RAFTNet)  # its __init__ hard-codes the large model
    oracle.device, oracle.model = "cpu", net.module.eval()
    x0 = a.transpose(2, 0, 1)[None].astype(np.float32)
    x1 = b.transpose(2, 0, 1)[None].astype(np.float32)
    ours = build_model(name, checkpoint=str(path), device="cpu")
    ours_cl = build_model(name, checkpoint=str(path), device="cpu", channels_last=True)
    return timed(
        {
            f"{name} predecessor": lambda: oracle.predict_flow(*oracle.preprocess_images(a, b)),
            f"{name} ours": lambda: ours.flow(x0, x1, peak=255.0),
            f"{name} ours channels_last": lambda: ours_cl.flow(x0, x1, peak=255.0),
        },
        repeats,
    )


def main() -> None:
    """Run the benchmark and print one line per variant."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--height", type=int, default=320)
    parser.add_argument("--width", type=int, default=456)
    parser.add_argument("--models", default="cain,raft,raft_small")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    import_predecessor()
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (args.height, args.width, 3), dtype=np.uint8)
    b = np.roll(a, (2, -3), (0, 1))
    load_before = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models.split(","):
            if model == "cain":
                rows += bench_cain(a, b, Path(tmp), args.repeats)
            elif model in ("raft", "raft_small"):
                rows += bench_raft(model == "raft_small", a, b, Path(tmp), args.repeats)
            else:
                raise SystemExit(f"unknown model {model!r}: use cain, raft, raft_small")
    print(
        f"{args.height}x{args.width} RGB, CPU, {args.threads} threads, torch "
        f"{torch.__version__}; seconds per predicted slice (median, min of {args.repeats}); "
        f"load average before {load_before:.1f}, after {os.getloadavg()[0]:.1f}"
    )
    for label, median, best in rows:
        print(f"{label:32s} {median:7.3f} {best:7.3f}")


if __name__ == "__main__":
    main()
