"""Checks of the CUDA paths that no CPU test can run (issue 14); part of ``gpu_check.sh``.

Each check prints one line and lands in the JSON (``--out``); the script exits 1 if any
failed. About a minute on an H100/H200:

* ``tf32_off``: a model built with ``precision=fp32`` turns TF32 off (IEEE fp32), and a
  float32 convolution then matches float64 to 1e-5 relative;
* ``grids``: RIFE's and MaskFlowNet's warps under fp16 and bf16 autocast are within
  0.05 px of float32 (an image rising 1-2 per px, as in ``tests/test_gpu_ready.py``);
* ``correlation``: MaskFlowNet's correlation of bright fp16 features is finite;
* ``warp``: the device warp equals OpenCV's ``remap`` on the host, value for value;
* ``transfer``: uint8 frames through page-locked memory and back are unchanged;
* ``fatal``: a device-side assert in a child process is a fatal error
  (:func:`is_fatal_device_error`) and the context stays broken, so ending the actor is
  right; out of memory is not fatal;
* ``oom``: a forward that needs 1 GiB per item at batch 256 ends at the batch that fits;
* ``plan``: RAFT-small on 1024 x 1024 with batch and tile unset: the chosen batch and
  tile and the peak memory, and the flow finite.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from atlinter_ray.models.flow import warp, warp_tensor  # noqa: E402
from atlinter_ray.models.maskflownet import correlation  # noqa: E402
from atlinter_ray.models.maskflownet import warp as mfn_warp  # noqa: E402
from atlinter_ray.models.raft import RAFTNet  # noqa: E402
from atlinter_ray.models.rife_arch import backward_warp  # noqa: E402
from atlinter_ray.models.torch_runtime import (  # noqa: E402
    TorchFlowEstimator,
    TorchPairInterpolator,
    download,
    is_fatal_device_error,
    to_device,
)

DEV = torch.device("cuda:0")
_ASSERT = """
import torch
from atlinter_ray.models.torch_runtime import is_fatal_device_error
x = torch.zeros(4, device="cuda")
try:
    x[torch.tensor([40], device="cuda")] = 1.0
    torch.cuda.synchronize()
except Exception as exc:
    first = (type(exc).__name__, is_fatal_device_error(exc))
try:
    torch.ones(2, device="cuda").sum().item()
    after = "context still usable"
except Exception as exc:
    after = f"later calls fail too: {type(exc).__name__}"
print(repr((first, after)))
"""


def tf32_off() -> dict[str, Any]:
    """A fp32 model turns TF32 off; a conv then matches float64."""

    class Conv(TorchPairInterpolator):
        def forward(self, a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.module(a)

    Conv(torch.nn.Conv2d(3, 3, 3), None, device="cuda", precision="fp32")
    flags = {"matmul": torch.backends.cuda.matmul.fp32_precision,
             "conv": torch.backends.cudnn.conv.fp32_precision}
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(64, 64, 3, padding=1).to(DEV)
    x = torch.randn(8, 64, 128, 128, device=DEV)
    with torch.inference_mode():
        y32 = conv(x)
        y64 = torch.nn.functional.conv2d(x.double(), conv.weight.double(), conv.bias.double(),
                                         padding=1)
    rel = ((y32.double() - y64).abs().max() / y64.abs().max()).item()
    return {"ok": flags == {"matmul": "ieee", "conv": "ieee"} and rel < 1e-5, "flags": flags,
            "conv_rel_err_vs_fp64": rel}


def grids() -> dict[str, Any]:
    """Warps under fp16/bf16 autocast stay within 0.05 px of float32."""
    h, w = 64, 512
    out: dict[str, Any] = {}
    torch.manual_seed(0)
    for dtype in (torch.float16, torch.bfloat16):
        image = torch.arange(w, dtype=torch.float32, device=DEV).expand(1, 1, h, w).to(dtype)
        flow = (torch.randn(1, 4, h, w, device=DEV) * 20).to(dtype)
        ref = backward_warp(image.float(), flow[:, :2].float())
        ref_m = mfn_warp(image.float(), flow[:, 2:].float())
        with torch.autocast("cuda", dtype=dtype):
            got = backward_warp(image, flow[:, :2])
            got_m = mfn_warp(image, flow[:, 2:])
        out[str(dtype)] = max((got - ref).abs().max().item(), (got_m - ref_m).abs().max().item())
    return {"ok": all(v <= 0.05 for v in out.values()), "max_err_px": out}


def correlation_fp16() -> dict[str, Any]:
    """Bright fp16 features: finite correlation, equal to the fp32 one."""
    torch.manual_seed(0)
    f1 = (torch.rand(2, 196, 20, 28, device=DEV) * 40 + 20).half()
    f2 = (torch.rand(2, 196, 20, 28, device=DEV) * 40 + 20).half()
    with torch.autocast("cuda", dtype=torch.float16):
        corr = correlation(f1, f2, 4)
    ref = correlation(f1.float(), f2.float(), 4)
    return {"ok": bool(torch.isfinite(corr).all()) and torch.allclose(corr, ref),
            "max_abs": corr.abs().max().item()}


def warp_equals_opencv() -> dict[str, Any]:
    """The device warp against OpenCV's remap on the host."""
    rng = np.random.default_rng(3)
    images = (rng.random((4, 3, 320, 456)) * 255).astype(np.float32)
    flow = rng.normal(0, 6, (4, 2, 320, 456)).astype(np.float32)
    got = warp_tensor(torch.from_numpy(images).to(DEV), torch.from_numpy(flow).to(DEV)).cpu()
    ref = np.stack([warp(images[i], flow[i]) for i in range(4)])
    diff = np.abs(got.numpy() - ref)
    return {"ok": float(diff.max()) <= 1e-3, "max_abs": float(diff.max()),
            "values_differing": int((diff > 0).sum()), "of": int(diff.size)}


def transfer() -> dict[str, Any]:
    """uint8 frames to the device and back through page-locked memory."""
    x = np.random.default_rng(0).integers(0, 256, (64, 3, 320, 456), dtype=np.uint8)
    start = time.perf_counter()
    dev = to_device(x, DEV)
    host, ready = download(dev)
    ready()
    seconds = time.perf_counter() - start
    return {"ok": dev.dtype == torch.uint8 and bool(np.array_equal(host.numpy(), x)),
            "pinned": host.is_pinned(), "MB": x.nbytes / 1e6, "seconds": seconds}


def fatal() -> dict[str, Any]:
    """A device-side assert in a child: fatal, and the context stays broken."""
    run = subprocess.run([sys.executable, "-c", _ASSERT], capture_output=True, text=True,
                         cwd=ROOT, timeout=120, check=False)
    line = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else run.stderr[-400:]
    oom = is_fatal_device_error(torch.OutOfMemoryError("CUDA out of memory"))
    return {"ok": "True" in line and not oom, "child": line}


def oom() -> dict[str, Any]:
    """1 GiB per item: batch 256 cannot fit; the runtime halves until it does."""

    class Hungry(TorchPairInterpolator):
        multiple = 1

        def forward(self, a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            scratch = torch.empty(len(a), 2**28, device=a.device)  # 1 GiB per item
            return a + scratch[:, :1, None, None] * 0

    model = Hungry(torch.nn.Identity(), None, device="cuda", batch_size=256)
    a = np.zeros((256, 3, 8, 8), np.float32)
    out = model.interpolate(a, a, np.array([0.5]), peak=1.0)
    free, total = torch.cuda.mem_get_info(DEV)
    return {"ok": out.shape[0] == 256 and model.runtime.batch_size < 256,
            "final_batch": model.runtime.batch_size, "gpu_total_gib": total / 2**30}


def plan() -> dict[str, Any]:
    """RAFT-small at 1024 x 1024 with batch and tile from free memory."""

    class Raft(TorchFlowEstimator):
        multiple = 8
        input_range = 255.0

        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return self.module(a, b)

    torch.manual_seed(0)
    model = Raft(RAFTNet(small=True, iters=12), None, device="cuda", precision="bf16")
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (8, 1, 1024, 1024)).astype(np.float32)
    torch.cuda.reset_peak_memory_stats(DEV)
    start = time.perf_counter()
    flow = model.flow(a, np.roll(a, 3, axis=-1), peak=255.0)
    return {"ok": bool(np.isfinite(flow).all()), "batch": model.runtime.batch_size,
            "tile": model.runtime.tile, "seconds": time.perf_counter() - start,
            "peak_gib": torch.cuda.max_memory_allocated(DEV) / 2**30,
            "fp32_reruns": model.runtime.fp32_reruns}


def main() -> None:
    """Run every check; write the JSON; exit 1 if one failed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu-check.json"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check.py needs a CUDA device")
    report: dict[str, Any] = {"device": torch.cuda.get_device_name(DEV),
                              "torch": torch.__version__, "cuda": torch.version.cuda}
    for check in (fatal, tf32_off, grids, correlation_fp16, warp_equals_opencv, transfer, oom,
                  plan):
        try:
            report[check.__name__] = check()
        except Exception as exc:  # noqa: BLE001  (recorded: the other checks still run)
            report[check.__name__] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:400]}
        print(f"{check.__name__:18s} {report[check.__name__]}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    failed = [k for k, v in report.items() if isinstance(v, dict) and not v.get("ok")]
    print("FAILED: " + ", ".join(failed) if failed else "all checks passed")
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
