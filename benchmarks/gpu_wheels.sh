#!/usr/bin/env bash
# Download, into .cache/whl/ (ignored by git), the wheels that gpu_check.sh needs and
# the GPU machine's image lacks (it has torch, numpy, OpenCV, fsspec, scikit-image,
# matplotlib, tqdm, requests; it has no network). Neither Ray nor Hydra is among them:
# the check runs the driver from Python (pipeline.run) with run.serial, the worker
# in-process, which is the same code an actor runs. A few MB.
set -euo pipefail
cd "$(dirname "$0")/.."
plat=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
  plat+=(--platform "$p")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${plat[@]}" -d .cache/whl \
  zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0 \
  deprecated==1.3.1 wrapt==2.5.2
ls -la .cache/whl
