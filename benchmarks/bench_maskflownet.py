"""Seconds per MaskFlowNet forward at 320x456 on the CPU: ours (torch) vs atlinter (MXNet).

Both run in the same invocation on the same machine with the same thread count
(torch ``set_num_threads``, MXNet ``OMP_NUM_THREADS``; default 2), on the same
random-weight ``maskflownet.params`` (built once by mxnet in the isolated test venv and
cached; run time does not depend on the weight values) and the same RGB uint8 pair. The
timed call is the whole user-facing path: atlinter's ``predict_flow`` (which resizes to
320x512 inside) and our ``MaskFlowNet.flow``.

The machines are shared, so the two sides are measured in alternating ``--rounds``
(each: the MXNet process warms up once and times ``--repeat`` calls, then ours does
the same), and both wall and CPU (process) seconds are reported with the load average.
The two flows are also compared (max |difference| in px).

``OMP_WAIT_POLICY`` defaults to ``PASSIVE`` for both sides (set it in the environment to
override): on an oversubscribed machine, OpenMP threads that spin at every op's barrier
waiting for a descheduled sibling made torch with 2 threads 3x slower than with 1
(measured here at load 8 on 2 cores); passive waiting removes that artefact. On
dedicated cores the policy makes little difference.

Usage::

    python benchmarks/bench_maskflownet.py [--threads 2] [--rounds 2] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]

from atlinter_ray.models import build_model  # noqa: E402
from atlinter_ray.testing.mxnet_env import random_params, run_oracle  # noqa: E402


def image_pair(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """A smooth RGB uint8 texture (H, W, 3) and a shifted copy."""
    rng = np.random.default_rng(0)
    noise = torch.from_numpy(rng.uniform(0, 1, (1, 3, height + 16, width + 16)).astype(np.float32))
    smooth = torch.nn.functional.avg_pool2d(noise, 9, 1, 4)[0].numpy()
    smooth = (smooth - smooth.min()) / (smooth.max() - smooth.min()) * 255
    a = smooth[:, 8 : 8 + height, 8 : 8 + width]
    b = smooth[:, 5 : 5 + height, 11 : 11 + width]
    return (
        np.rint(a).astype(np.uint8).transpose(1, 2, 0),
        np.rint(b).astype(np.uint8).transpose(1, 2, 0),
    )


def time_ours(model, x: np.ndarray, y: np.ndarray, repeat: int) -> dict[str, list[float]]:
    """Wall and CPU seconds of ``repeat`` ``flow`` calls (after the caller's warm-up)."""
    wall, cpu = [], []
    for _ in range(repeat):
        start, start_cpu = time.perf_counter(), time.process_time()
        model.flow(x, y, peak=255.0)
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return {"wall": wall, "cpu": cpu}


def summary(times: list[float]) -> dict[str, float]:
    """Median and minimum seconds."""
    return {"median": round(statistics.median(times), 3), "min": round(min(times), 3)}


def main() -> None:
    """Run both sides, print a JSON record and a one-line summary."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--height", type=int, default=320)
    parser.add_argument("--width", type=int, default=456)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    params = random_params()
    a, b = image_pair(args.height, args.width)
    x = a.transpose(2, 0, 1)[None].astype(np.float32)
    y = b.transpose(2, 0, 1)[None].astype(np.float32)
    model = build_model("maskflownet", checkpoint=str(params), device="cpu", batch_size=1)
    flow = model.flow(x, y, peak=255.0)[0]  # warm-up
    load = [os.getloadavg()[0]]
    times: dict[str, dict[str, list[float]]] = {
        "ours": {"wall": [], "cpu": []},
        "mxnet": {"wall": [], "cpu": []},
    }
    with tempfile.TemporaryDirectory() as tmp:
        cases = Path(tmp) / "cases.npz"
        np.savez(cases, a_pair=a, b_pair=b)
        run_oracle("predict", str(params), str(cases), str(Path(tmp) / "flows.npz"))
        reference = np.load(Path(tmp) / "flows.npz")["pair"]
        for _ in range(args.rounds):
            out = run_oracle(
                "bench", str(params), str(cases), "--repeat", str(args.repeat),
                threads=args.threads,
            )
            for key, values in json.loads(out.strip().splitlines()[-1])["pair"].items():
                times["mxnet"][key] += values
            for key, values in time_ours(model, x, y, args.repeat).items():
                times["ours"][key] += values
            load.append(os.getloadavg()[0])
    record = {
        "size": [args.height, args.width],
        "threads": args.threads,
        "calls_per_side": args.rounds * args.repeat,
        "torch": torch.__version__,
        "omp_wait_policy": os.environ["OMP_WAIT_POLICY"],
        "ours_s": {k: summary(v) for k, v in times["ours"].items()},
        "mxnet_s": {k: summary(v) for k, v in times["mxnet"].items()},
        "raw_s": times,
        "max_abs_flow_diff_px": float(np.abs(flow - reference).max()),
        "flow_range_px": [float(reference.min()), float(reference.max())],
        "loadavg_1min": load,
    }
    print(json.dumps(record, indent=2))
    ours, mx = record["ours_s"], record["mxnet_s"]
    print(
        f"MaskFlowNet {args.height}x{args.width}, {args.threads} thread(s), median wall "
        f"(CPU): ours {ours['wall']['median']:.2f} s ({ours['cpu']['median']:.2f}), "
        f"mxnet {mx['wall']['median']:.2f} s ({mx['cpu']['median']:.2f}); max |flow diff| "
        f"{record['max_abs_flow_diff_px']:.2e} px; load {load[0]:.1f}-{max(load):.1f}"
    )


if __name__ == "__main__":
    main()
