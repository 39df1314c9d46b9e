"""Output store: one OME-Zarr 0.5 image per dataset, plus per-task done markers.

Layout under the output root (a local path or any fsspec URL such as ``s3://``)::

    <root>/<dataset>.ome.zarr/          OME-Zarr 0.5 image (Zarr v3), array "0"
    <root>/<dataset>.quicklook.png      three orthogonal views
    <root>/_progress/<dataset>/<lo>-<hi>.json   done marker + provenance of a task
    <root>/run_summary.json

The array is in reference orientation, ``(z, y, x)`` = (AP, DV, LR), with a leading
channel axis for RGB. A chunk is one whole slice along the section axis, so chunks
never straddle two tasks and concurrent writers never touch the same object. A task
writes its slices first and its marker last: a crashed or retried task is simply
redone, and its marker carries the per-slice provenance the driver merges into the
image's attributes at the end.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Mapping
from typing import Any

import fsspec
import numpy as np
import zarr
from zarr.codecs import ZstdCodec

from atlinter_ray import __version__
from atlinter_ray.dataset import Dataset
from atlinter_ray.errors import StoreError
from atlinter_ray.files import write_atomic

_SPACE_AXES = ("z", "y", "x")


def _join(root: str, *parts: str) -> str:
    return posixpath.join(root.rstrip("/"), *parts)


class VolumeStore:
    """Reads and writes the output images and task markers under one root."""

    def __init__(self, root: str, storage_options: Mapping[str, Any] | None = None):
        self.root = root.rstrip("/")
        self.storage_options = dict(storage_options or {})
        self.fs, self._root_path = fsspec.core.url_to_fs(self.root, **self.storage_options)
        self._arrays: dict[str, zarr.Array] = {}

    # -- locations ------------------------------------------------------------------
    def image_url(self, dataset_id: str) -> str:
        """URL of the dataset's OME-Zarr image."""
        return _join(self.root, f"{dataset_id}.ome.zarr")

    def _fs_path(self, *parts: str) -> str:
        return _join(self._root_path, *parts)

    def _marker_path(self, task_id: str) -> str:
        return self._fs_path("_progress", f"{task_id}.json")

    # -- images ---------------------------------------------------------------------
    def prepare_image(
        self,
        ds: Dataset,
        dtype: str,
        run_info: Mapping[str, Any],
        overwrite: bool = False,
        zstd_level: int = 1,
    ) -> None:
        """Create the dataset's image, or check that an existing one is from this run.

        ``run_info`` identifies what produces the bytes (model, checkpoint hash,
        placement, edge policy, dtype); resuming with a different one would mix two
        reconstructions in one volume, so it is refused unless ``overwrite``.
        """
        url = self.image_url(ds.id)
        if self.fs.exists(self._fs_path(f"{ds.id}.ome.zarr", "zarr.json")):
            found = zarr.open_group(url, mode="r", storage_options=self._opts(url))
            previous = found.attrs.get("atlinter_ray", {}).get("run")
            if previous == dict(run_info) and not overwrite:
                return
            if not overwrite:
                raise StoreError(
                    f"{url} was written by a different run ({previous}); this run is "
                    f"{dict(run_info)}. Fix: choose another output.root, or set "
                    "output.overwrite=true to replace it."
                )
            self.fs.rm(self._fs_path(f"{ds.id}.ome.zarr"), recursive=True)
            progress = self._fs_path("_progress", ds.id)
            if self.fs.exists(progress):
                self.fs.rm(progress, recursive=True)
        group = zarr.open_group(url, mode="w", zarr_format=3, storage_options=self._opts(url))
        shape, chunks, dims = _array_layout(ds)
        group.create_array(
            "0", shape=shape, chunks=chunks, dtype=dtype, fill_value=0,
            dimension_names=dims, compressors=ZstdCodec(level=zstd_level),
        )
        group.attrs.update(
            {
                "ome": ome_metadata(ds, dtype),
                "atlinter_ray": {
                    "run": dict(run_info),
                    "software": f"atlinter_ray {__version__}",
                    "source": ds.images_url,
                    "axis": ds.axis,
                    "section_numbers": sorted(ds.section_numbers),
                },
            }
        )

    def open_array(self, dataset_id: str, mode: str = "r+") -> zarr.Array:
        """The dataset's image array (cached per store)."""
        key = f"{dataset_id}:{mode}"
        if key not in self._arrays:
            url = _join(self.image_url(dataset_id), "0")
            self._arrays[key] = zarr.open_array(url, mode=mode, storage_options=self._opts(url))
        return self._arrays[key]

    def write_slices(self, ds: Dataset, first: int, frames: np.ndarray) -> None:
        """Write ``(K, C, H, W)`` consecutive slices from ``first`` along the section axis.

        One call for a task's slices: zarr then encodes and stores their chunks
        concurrently, instead of paying its per-call overhead slice by slice.
        """
        arr = self.open_array(ds.id)
        index: list[Any] = [slice(None)] * arr.ndim
        axis = arr.ndim - 3 + ds.axis_index
        index[axis] = slice(first, first + len(frames))
        block = frames if ds.channels > 1 else frames[:, 0]
        arr[tuple(index)] = np.moveaxis(block, 0, axis)

    def image_attrs(self, dataset_id: str) -> dict[str, Any]:
        """The image group's attributes (``ome`` metadata, ``atlinter_ray`` provenance)."""
        url = self.image_url(dataset_id)
        return dict(zarr.open_group(url, mode="r", storage_options=self._opts(url)).attrs)

    def read_volume(self, dataset_id: str) -> np.ndarray:
        """The whole image ``([C,] Z, Y, X)``; for small volumes, tests and evaluation."""
        return self.open_array(dataset_id, mode="r")[...]

    # -- markers and provenance -----------------------------------------------------
    def mark_done(self, task_id: str, record: Mapping[str, Any]) -> None:
        """Record that a task's slices are all written (atomically)."""
        path = self._marker_path(task_id)
        self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
        write_atomic(self.fs, path, json.dumps(record, sort_keys=True).encode())

    def done_records(self, dataset_id: str) -> dict[str, dict[str, Any]]:
        """Markers of the dataset's finished tasks, by task id (one listing)."""
        folder = self._fs_path("_progress", dataset_id)
        try:
            paths = [p for p in self.fs.ls(folder, detail=False) if p.endswith(".json")]
        except FileNotFoundError:
            return {}
        records = {}
        for blob in self.fs.cat(paths).values():
            record = json.loads(blob)
            records[record["task_id"]] = record
        return records

    def finalize(self, ds: Dataset, records: Mapping[str, Mapping[str, Any]]) -> None:
        """Merge the tasks' provenance into the image attributes (slice order)."""
        slices = sorted(
            (s for r in records.values() for s in r["slices"]), key=lambda s: s["slice"]
        )
        group = zarr.open_group(self.image_url(ds.id), mode="r+",
                                storage_options=self._opts(self.image_url(ds.id)))
        meta = dict(group.attrs["atlinter_ray"])
        meta["provenance"] = slices
        group.attrs["atlinter_ray"] = meta

    def write_bytes(self, name: str, data: bytes) -> str:
        """Write a small file (summary, picture) under the root; return its URL."""
        path = self._fs_path(name)
        self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
        write_atomic(self.fs, path, data)
        return _join(self.root, name)

    def read_bytes(self, name: str) -> bytes | None:
        """A small file written by :meth:`write_bytes`, or None when there is none."""
        try:
            return bytes(self.fs.cat_file(self._fs_path(name)))
        except FileNotFoundError:
            return None

    def _opts(self, url: str) -> dict[str, Any] | None:
        # zarr rejects storage_options for plain local paths
        return self.storage_options if "://" in url else None


def _array_layout(ds: Dataset) -> tuple[tuple[int, ...], tuple[int, ...], list[str]]:
    shape = list(ds.reference_shape)
    chunks = list(ds.reference_shape)
    chunks[ds.axis_index] = 1
    dims = list(_SPACE_AXES)
    if ds.channels > 1:
        return (ds.channels, *shape), (ds.channels, *chunks), ["c", *dims]
    return tuple(shape), tuple(chunks), dims


def ome_metadata(ds: Dataset, dtype: str) -> dict[str, Any]:
    """OME-Zarr 0.5 ``ome`` attributes: axes, scale in micrometres, RGB channels."""
    voxel = float(ds.metadata.get("voxel_size_um", 25.0))
    axes: list[dict[str, str]] = [
        {"name": n, "type": "space", "unit": "micrometer"} for n in _SPACE_AXES
    ]
    scale = [voxel] * 3
    meta: dict[str, Any] = {"version": "0.5"}
    if ds.channels > 1:
        axes.insert(0, {"name": "c", "type": "channel"})
        scale.insert(0, 1.0)
        top = float(np.iinfo(dtype).max) if np.dtype(dtype).kind == "u" else 1.0
        meta["omero"] = {
            "channels": [
                {"label": label, "color": color, "active": True,
                 "window": {"min": 0.0, "max": top, "start": 0.0, "end": top}}
                for label, color in (("red", "FF0000"), ("green", "00FF00"),
                                     ("blue", "0000FF"))
            ]
        }
    meta["multiscales"] = [
        {
            "name": ds.id,
            "axes": axes,
            "datasets": [
                {"path": "0",
                 "coordinateTransformations": [{"type": "scale", "scale": scale}]}
            ],
        }
    ]
    return meta
