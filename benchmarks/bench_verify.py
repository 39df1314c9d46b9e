"""What proving a complete dataset costs: the checksum at write time and the rerun's proof.

For one full-size gene (528 x 320 x 456, grey, uint8 and float32: ``bench_slab.py``'s
synthetic gene) written as the workers write it (:meth:`VolumeStore.write_slices`, a
slab a task) with its pyramid (levels down to ``pyramid_min``):

* **checksum at write time**: CRC32C (``google-crc32c``, the ledger's choice) against
  blake2b over the same stored bytes, as a fraction of the write itself;
* **verification per dataset** (:func:`atlinter_ray.ledger.verify_image`: every object of
  every level read back and checked), on local disk and on an S3 server on loopback
  (moto and SeaweedFS where installed), against the write of the same objects.

Usage::

    python benchmarks/bench_verify.py --out benchmarks/results [--s3 moto seaweedfs]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(__file__))
from bench_slab import SHAPE, synthetic_gene


def write_gene(root: str, folder: Path, dtype: str, options: dict[str, Any]) -> dict[str, Any]:
    """Write one gene's level 0 and pyramid under ``root``; time it, return the inventory."""
    from atlinter_ray.dataset import load_dataset
    from atlinter_ray.layout import DEFAULT_LAYOUT, array_spec, downsample2, pyramid_shapes
    from atlinter_ray.store import VolumeStore
    from atlinter_ray.testing.datasets import prepare_image, write_dataset

    volume = synthetic_gene().astype(dtype)
    if dtype.startswith("float"):
        volume /= 255.0
    ds = load_dataset(str(write_dataset(folder / f"in-{dtype}", "g", volume[[4, 12]], [4, 12],
                                        reference_shape=list(SHAPE))))
    store = VolumeStore(root, options)
    prepare_image(store, ds, dtype=dtype)
    inventory: dict[str, dict[str, Any]] = {}
    start = time.perf_counter()
    for first in range(0, SHAPE[0], DEFAULT_LAYOUT.slab):
        written = store.write_slices(ds, first, volume[first:first + DEFAULT_LAYOUT.slab, None])
        inventory.update({f"0/{k}": v for k, v in written.items()})
    level = volume
    for number, shape in enumerate(pyramid_shapes(volume.shape, 1, DEFAULT_LAYOUT.pyramid_min), 1):
        level = downsample2(level)
        assert level.shape == shape
        inventory[f"{number}/zarr.json"] = store.create_level(
            ds, str(number), array_spec(ds, DEFAULT_LAYOUT, shape), dtype,
            DEFAULT_LAYOUT.zstd_level)
        written = store.write_slabs(ds, str(number), 0, level)
        inventory.update({f"{number}/{k}": v for k, v in written.items()})
    return {"store": store, "inventory": inventory, "write_s": time.perf_counter() - start}


def checksum_costs(store: Any, inventory: dict[str, Any]) -> dict[str, float]:
    """Seconds to checksum every stored object: CRC32C (ours) and blake2b."""
    from atlinter_ray import ledger

    folder = store.image_key("g")
    blobs = store.objects.get_many([f"{folder}/{k}" for k in inventory])
    out = {}
    for name, fn in (("crc32c", ledger.object_sum),
                     ("blake2b", lambda b: hashlib.blake2b(b, digest_size=16).digest())):
        start = time.perf_counter()
        for blob in blobs.values():
            fn(blob)
        out[f"{name}_s"] = time.perf_counter() - start
    return out


def measure(root: str, folder: Path, dtype: str, options: dict[str, Any]) -> dict[str, Any]:
    """One gene written, then verified (best of 3)."""
    from atlinter_ray import ledger

    made = write_gene(root, folder, dtype, options)
    store, inventory = made["store"], made["inventory"]
    times = []
    for _ in range(3):
        start = time.perf_counter()
        verdicts = ledger.verify_image(store, "g", inventory)
        times.append(time.perf_counter() - start)
        assert set(verdicts.values()) == {ledger.Verdict.OK}
    stored = sum(v["size"] for v in inventory.values())
    return {"objects": len(inventory), "stored_bytes": stored,
            "levels": len({k.split("/", 1)[0] for k in inventory}),
            "write_s": round(made["write_s"], 3), "verify_s": round(min(times), 3),
            "verify_MB_per_s": round(stored / min(times) / 1e6, 1),
            **{k: round(v, 4) for k, v in checksum_costs(store, inventory).items()}}


def main() -> None:
    """Print the measurements; save them as ``verify.json`` under ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="folder for verify.json")
    parser.add_argument("--s3", nargs="*", default=["moto"], help="S3 servers to measure")
    args = parser.parse_args()
    results: dict[str, Any] = {"started": datetime.now(UTC).isoformat(timespec="seconds"),
                               "shape": list(SHAPE)}
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in ("uint8", "float32"):
            results[f"local {dtype}"] = measure(f"{tmp}/out-{dtype}", Path(tmp), dtype, {})
            print(f"local {dtype}: {results[f'local {dtype}']}", flush=True)
        from atlinter_ray.testing.faulty_s3 import S3Server

        for backend in args.s3:
            with S3Server(backend=backend) as server:
                for dtype in ("uint8", "float32"):
                    key = f"s3 {backend} {dtype}"
                    results[key] = measure(f"s3://atlas-out/{dtype}", Path(tmp), dtype,
                                           dict(server.direct))
                    print(f"{key}: {results[key]}", flush=True)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "verify.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
