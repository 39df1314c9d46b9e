"""Seconds per MaskFlowNet forward at 320x456 on the CPU: ours (torch) vs atlinter (MXNet).

Both run in the same invocation on the same machine with 2 threads (torch
``set_num_threads``, MXNet ``OMP_NUM_THREADS``), on the same random-weight
``maskflownet.params`` (built once by mxnet in the isolated test venv and cached; run
time does not depend on the weight values) and the same RGB uint8 pair. The timed call
is the whole user-facing path: atlinter's ``predict_flow`` (which resizes to 320x512
inside) and our ``MaskFlowNet.flow``. Each side is warmed up once, then timed
``--repeat`` times; the median and minimum are reported, with the load average, since
the machines are shared. The two flows are also compared (max |difference| in px).

Usage::

    python benchmarks/bench_maskflownet.py [--repeat 5] [--height 320 --width 456]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from atlinter_ray.models import build_model  # noqa: E402
from mxnet_env import run_oracle  # noqa: E402
from pypi import CACHE  # noqa: E402

THREADS = 2


def random_params() -> Path:
    """A random-weight maskflownet.params in the original layout (cached)."""
    path = CACHE / "bench" / "maskflownet-random-seed0.params"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        run_oracle("make-params", str(tmp), "--seed", "0", "--flow-gain", "1.0")
        tmp.rename(path)
    return path


def image_pair(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """A smooth RGB uint8 texture (H, W, 3) and a shifted copy."""
    rng = np.random.default_rng(0)
    noise = torch.from_numpy(rng.uniform(0, 1, (1, 3, height + 16, width + 16)).astype(np.float32))
    smooth = torch.nn.functional.avg_pool2d(noise, 9, 1, 4)[0].numpy()
    smooth = (smooth - smooth.min()) / (smooth.max() - smooth.min()) * 255
    a = smooth[:, 8 : 8 + height, 8 : 8 + width]
    b = smooth[:, 5 : 5 + height, 11 : 11 + width]
    return (np.rint(a).astype(np.uint8).transpose(1, 2, 0), np.rint(b).astype(np.uint8).transpose(1, 2, 0))


def time_ours(params: Path, a: np.ndarray, b: np.ndarray, repeat: int) -> tuple[list[float], np.ndarray]:
    """Seconds per ``flow`` call of our model after one warm-up, and its flow."""
    torch.set_num_threads(THREADS)
    model = build_model("maskflownet", checkpoint=str(params), device="cpu", batch_size=1)
    x = a.transpose(2, 0, 1)[None].astype(np.float32)
    y = b.transpose(2, 0, 1)[None].astype(np.float32)
    flow = model.flow(x, y, peak=255.0)[0]
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        model.flow(x, y, peak=255.0)
        times.append(time.perf_counter() - start)
    return times, flow


def main() -> None:
    """Run both, print a JSON record and a one-line summary."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--height", type=int, default=320)
    parser.add_argument("--width", type=int, default=456)
    args = parser.parse_args()
    params = random_params()
    a, b = image_pair(args.height, args.width)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        cases = Path(tmp) / "cases.npz"
        np.savez(cases, a_pair=a, b_pair=b)
        out = run_oracle("bench", str(params), str(cases), "--repeat", str(args.repeat), threads=THREADS)
        mxnet_times = json.loads(out.strip().splitlines()[-1])["pair"]
        run_oracle("predict", str(params), str(cases), str(Path(tmp) / "flows.npz"), threads=THREADS)
        reference = np.load(Path(tmp) / "flows.npz")["pair"]
    ours_times, flow = time_ours(params, a, b, args.repeat)
    record = {
        "size": [args.height, args.width],
        "threads": THREADS,
        "repeat": args.repeat,
        "torch": torch.__version__,
        "ours_s": {"median": statistics.median(ours_times), "min": min(ours_times), "all": ours_times},
        "mxnet_s": {"median": statistics.median(mxnet_times), "min": min(mxnet_times), "all": mxnet_times},
        "max_abs_flow_diff_px": float(np.abs(flow - reference).max()),
        "flow_range_px": [float(reference.min()), float(reference.max())],
        "loadavg_1min": [load_before, os.getloadavg()[0]],
    }
    print(json.dumps(record, indent=2))
    print(
        f"MaskFlowNet {args.height}x{args.width}, {THREADS} threads: ours "
        f"{record['ours_s']['median']:.2f} s (min {record['ours_s']['min']:.2f}), mxnet "
        f"{record['mxnet_s']['median']:.2f} s (min {record['mxnet_s']['min']:.2f}); "
        f"max |flow diff| {record['max_abs_flow_diff_px']:.2e} px"
    )


if __name__ == "__main__":
    main()
