"""Slab-deep output: duplicated model work at slab boundaries, and what a viewer reads.

Two measurements (issue 19), each ratio from one run:

* **duplicated model calls** (from the planning code the workers run): a gap that crosses
  a slab boundary is computed by the slab task on each side, each for its own slices.
  Per model kind, the calls of slab tasks over the calls of gap tasks (one per gap), for
  a 528-slice CCF volume with a section every ``spacing`` slices, averaged over the 8
  section offsets and at the offset of ``bench_pipeline.py``'s genes (first section 4):

  - any-t models (linear, RIFE 4.x, a context model): one call per predicted slice;
  - midpoint bisection (``placement=atlinter``, RIFE HD, CAIN): the tree nodes each
    part of a gap needs (the shared ancestors are computed on both sides);
  - flow models (DIS, RAFT...): one flow pair per gap part (the warps are per slice).

  Each for every slab task its own chunk (``resources.tasks_per_batch=1``, the
  default) and for chunks of 8 consecutive tasks (``batch=8``, the GPU cluster
  profile's): parts of one gap in one chunk share its calls
  (:meth:`atlinter_ray.worker.TaskWorker._predict_pairs`), so only gaps crossing a
  chunk's edge are computed twice.
* **bytes a viewer reads for one plane at level 0**: a 528 x 320 x 456 grey uint8 gene
  (smooth synthetic content drifting along the sections, as ``bench_pipeline.py``'s
  genes) written by :meth:`VolumeStore.write_slices`, read through zarr (as
  neuroglancer / napari read: shard index, then inner chunks by byte range) with a store
  that counts bytes and requests: a sagittal, an axial and a coronal plane against all
  of level 0, and the same for the one-slice-deep layout of the previous version
  (one whole-slice chunk per object, written by zarr). Target: <= 1/8 of level 0.
  Also the whole level read by zarr against :meth:`VolumeStore.read_volume` (which
  decodes the shards itself).

Usage::

    python benchmarks/bench_slab.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from atlinter_ray.planning import bisection_nodes, plan_dataset, plan_slabs

#: Full-size CCF volume at 25 um (coronal, horizontal, sagittal).
SHAPE = (528, 320, 456)


def model_calls(gaps: Iterable[Any]) -> dict[str, int]:
    """Calls of each model kind to predict ``gaps`` (gap tasks or their parts), each alone."""
    parts = [g for g in gaps if g.predicted]
    return {
        "any-t": sum(len(g.positions) for g in parts),
        "midpoint bisection": sum(len(n) for g in parts for n in bisection_nodes(g.positions)),
        "flow": len(parts),
    }


def chunk_calls(tasks: list[Any], batch: int) -> dict[str, int]:
    """Calls of each kind when ``batch`` consecutive slab tasks go to a worker together:
    parts of one gap in one chunk share its calls, for the union of their positions
    (:meth:`atlinter_ray.worker.TaskWorker._predict_pairs`)."""
    calls = {"any-t": 0, "midpoint bisection": 0, "flow": 0}
    for i in range(0, len(tasks), batch):
        wanted: dict[tuple[Any, Any], set[float]] = {}
        for part in (p for t in tasks[i : i + batch] for p in t.parts if p.predicted):
            wanted.setdefault((part.left, part.right), set()).update(part.positions)
        for positions in wanted.values():
            calls["any-t"] += len(positions)
            calls["midpoint bisection"] += sum(len(n) for n in bisection_nodes(sorted(positions)))
            calls["flow"] += 1
    return calls


def duplicated(spacing: int, offset: int, slab: int, batch: int = 1,
               n: int = SHAPE[0]) -> dict[str, float]:
    """Fraction of each kind's slab-task calls that repeat a gap task's, at one offset,
    with ``batch`` tasks per worker call (``resources.tasks_per_batch``)."""
    known = list(range(offset, n, spacing))
    gaps = plan_dataset("g", known, n, "atlinter")
    once = model_calls(gaps)
    slabs = chunk_calls(plan_slabs(gaps, n, slab), batch)
    return {kind: (slabs[kind] - once[kind]) / slabs[kind] for kind in once}


def duplication_table(slabs: Iterable[int], spacings: Iterable[int],
                      batches: Iterable[int] = (1,)) -> dict[str, Any]:
    """``{"K=<k> spacing=<s>[ batch=<b>]": {"mean over offsets": {kind: fraction},
    "first section 4": {...}}}`` (batch 1 unnamed)."""
    out: dict[str, Any] = {}
    for spacing in spacings:
        for k in slabs:
            for batch in batches:
                rows = [duplicated(spacing, offset, k, batch) for offset in range(spacing)]
                mean = {kind: float(np.mean([r[kind] for r in rows])) for kind in rows[0]}
                key = f"K={k} spacing={spacing}" + (f" batch={batch}" if batch > 1 else "")
                out[key] = {"mean over offsets": mean, "first section 4": rows[4 % spacing]}
    return out


def synthetic_gene(seed: int = 0) -> np.ndarray:
    """A ``SHAPE`` grey uint8 volume: a smooth noise field drifting along the sections."""
    import cv2

    rng = np.random.default_rng(seed)
    h, w = SHAPE[1:]
    field = np.zeros((h + 64, w + 256), np.float32)
    for sigma, weight in ((24, 1.0), (8, 0.5), (3, 0.25)):
        field += weight * cv2.GaussianBlur(rng.random(field.shape).astype(np.float32), (0, 0),
                                           sigma)
    field = (field - field.min()) / (field.max() - field.min()) * 255
    volume = np.empty(SHAPE, np.uint8)
    for s in range(SHAPE[0]):
        m = np.float32([[1, 0, s * 0.4], [0, 1, 16 + 8 * np.sin(s / 60)]])
        volume[s] = cv2.warpAffine(field, m, (field.shape[1], field.shape[0]))[:h, :w]
    return volume


def counting_array(path: Path) -> tuple[Any, dict[str, int]]:
    """A zarr array opened read-only through a store that counts chunk bytes and requests."""
    import zarr
    from zarr.storage import LocalStore, WrapperStore

    counts = {"bytes": 0, "requests": 0}

    class Counting(WrapperStore[LocalStore]):
        """Counts every read of a chunk or shard (whole, or a byte range of it)."""

        async def get(self, key: str, prototype: Any, byte_range: Any = None) -> Any:
            buf = await self._store.get(key, prototype, byte_range)
            if buf is not None and key.startswith("c/"):
                counts["bytes"] += len(buf)
                counts["requests"] += 1
            return buf

        async def get_partial_values(self, prototype: Any, key_ranges: Any) -> Any:
            bufs = await asyncio.gather(*(self.get(k, prototype, r) for k, r in key_ranges))
            return list(bufs)

    store = Counting(LocalStore(str(path), read_only=True))
    return zarr.open_array(store, mode="r"), counts


def plane_reads(path: Path) -> dict[str, Any]:
    """Bytes and requests of a sagittal, an axial and a coronal plane, and of the whole level."""
    out: dict[str, Any] = {}
    planes = {"sagittal (x = 228)": (slice(None), slice(None), 228),
              "axial (y = 160)": (slice(None), 160, slice(None)),
              "coronal (z = 264)": (264, slice(None), slice(None)),
              "all of level 0": (slice(None),) * 3}
    for name, index in planes.items():
        arr, counts = counting_array(path)
        start = time.perf_counter()
        np.asarray(arr[index])
        out[name] = {**counts, "seconds": time.perf_counter() - start}
    whole = out["all of level 0"]["bytes"]
    for name in planes:
        out[name]["fraction_of_level_0"] = out[name]["bytes"] / whole
    return out


def viewer_reads(folder: Path) -> dict[str, Any]:
    """Plane reads of one gene in the slab layout (ours) and the one-slice layout (before)."""
    import zarr

    from atlinter_ray.dataset import load_dataset
    from atlinter_ray.store import VolumeStore
    from atlinter_ray.testing.datasets import prepare_image, write_dataset

    volume = synthetic_gene()
    ds = load_dataset(str(write_dataset(folder / "in", "g", volume[[4, 12]], [4, 12],
                                        reference_shape=list(SHAPE))))
    store = VolumeStore(str(folder / "slab"))
    prepare_image(store, ds, layout=_layout())
    start = time.perf_counter()
    objects = {}
    for first in range(0, SHAPE[0], _layout().slab):
        frames = volume[first : first + _layout().slab, None]
        objects |= store.write_slices(ds, first, frames)
    slab_write = time.perf_counter() - start
    start = time.perf_counter()
    assert (store.read_volume(ds.id) == volume).all()
    our_read = time.perf_counter() - start
    before = zarr.create_array(str(folder / "one-slice"), shape=SHAPE,
                               chunks=(1, *SHAPE[1:]), dtype="uint8", fill_value=0,
                               compressors=zarr.codecs.ZstdCodec(level=1))
    start = time.perf_counter()
    before[...] = volume
    one_slice_write = time.perf_counter() - start
    return {
        "level 0": {"shape": list(SHAPE), "dtype": "uint8",
                    "raw_bytes": int(volume.nbytes)},
        "slab layout": {"objects": len(objects), "stored_bytes": sum(o["size"] for o in objects.values()),
                        "write_seconds": slab_write, "layout": _layout().to_json(),
                        "whole level read by VolumeStore.read_volume, seconds": our_read,
                        "reads": plane_reads(folder / "slab" / "g.ome.zarr" / "0")},
        "one-slice layout (before)": {"objects": SHAPE[0], "write_seconds (zarr)": one_slice_write,
                                      "reads": plane_reads(folder / "one-slice")},
    }


def _layout() -> Any:
    from atlinter_ray.layout import DEFAULT_LAYOUT

    return DEFAULT_LAYOUT


def main() -> None:
    """Print both measurements; save them as ``slab.json`` under ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="folder for slab.json")
    args = parser.parse_args()
    started = datetime.now(UTC).isoformat(timespec="seconds")
    table = duplication_table((4, 8, 16, 32), (4, 8, 16), (1, 8))
    print("fraction of model calls duplicated at slab boundaries (slab tasks vs gap tasks)")
    print(f"{'':<30}{'any-t':>8}{'bisection':>11}{'flow':>8}   (first section 4: same order)")
    for key, row in table.items():
        mean, at4 = row["mean over offsets"], row["first section 4"]
        print(f"{key:<30}" + "".join(f"{mean[k]:>{w}.1%}" for k, w in
                                     (("any-t", 8), ("midpoint bisection", 11), ("flow", 8)))
              + "   " + " ".join(f"{at4[k]:.1%}" for k in at4))
    with tempfile.TemporaryDirectory() as tmp:
        reads = viewer_reads(Path(tmp))
    print(f"whole level 0 by VolumeStore.read_volume (our shard decoder): "
          f"{reads['slab layout']['whole level read by VolumeStore.read_volume, seconds']:.2f} s")
    for layout in ("slab layout", "one-slice layout (before)"):
        print(layout)
        for name, r in reads[layout]["reads"].items():
            print(f"  {name:<20} {r['bytes'] / 1e6:8.2f} MB in {r['requests']:>5} reads "
                  f"({r['fraction_of_level_0']:.3f} of level 0), {r['seconds']:.2f} s")
    slab = reads["slab layout"]["reads"]
    targets = {"sagittal_and_axial_at_most_one_eighth": all(
        slab[k]["fraction_of_level_0"] <= 1 / 8 for k in ("sagittal (x = 228)",
                                                          "axial (y = 160)"))}
    print(f"targets met: {targets}")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "slab.json").write_text(json.dumps({
            "date": started, "command": " ".join(sys.argv), "cpus": os.cpu_count(),
            "duplicated_model_calls": table, "viewer_reads": reads, "targets_met": targets,
        }, indent=2) + "\n")


if __name__ == "__main__":
    main()
