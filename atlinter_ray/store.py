"""Output store: one OME-Zarr 0.5 image per dataset, its task markers, small files.

Layout under the output root (a local path, ``s3://`` or any fsspec URL)::

    <root>/<dataset>.ome.zarr/                   OME-Zarr 0.5 image (Zarr v3)
        atlinter_ray.json                        our image record, written first
        zarr.json                                group metadata, written last
        0/ 1/ 2/ ...                             level 0 and the pyramid (layout.py)
    <root>/_progress/<dataset>/<generation>/<lo>-<hi>.json    one task's done marker
                                           .../<lo>-<hi>.sums    its reduction (finishing)
    <root>/<dataset>.quicklook.png, <dataset>.montage.png
    <root>/run_summary.json
    <root>/.atlinter_ray.lock or _lease.json     the driver's lease (lease.py)

An image is ours when it holds our image record (``atlinter_ray.json``), written
first when we create it: then our leftovers and the dataset's old markers are removed,
the arrays are created, and the group's ``zarr.json`` (with the run, the input
fingerprint, the layout and a fresh generation id) is written last, so an image of ours
without it is a half-made one and is made again. An image without our record, whatever
its ``zarr.json`` holds, is someone else's: refused, or replaced with
``output.overwrite``. What a task commits and how a dataset is proved complete is
:mod:`atlinter_ray.ledger`'s. Every object is read and written through
:mod:`atlinter_ray.objects` (obstore on ``s3://``, fsspec elsewhere).

Every object a task owns is stored, even when it holds only zeros (a task encodes and
stores its whole shards itself, :meth:`VolumeStore.write_slabs`), so a claimed object
that is missing is a lost one. Listings are always fresh, since other processes write
under the same prefixes.
"""

from __future__ import annotations

import json
import logging
import posixpath
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr
import zstandard
from zarr.codecs import ZstdCodec

from atlinter_ray import __version__
from atlinter_ray.dataset import Dataset
from atlinter_ray.errors import DamagedObjectError, StoreError, SupersededError
from atlinter_ray.identity import ImageIdentity, InputFingerprint, new_generation
from atlinter_ray.layout import (
    DEFAULT_LAYOUT,
    ArraySpec,
    Layout,
    ShardEncoder,
    array_spec,
    as_slab,
    chunk_key,
    ome_metadata,
    shard_encoder,
)
from atlinter_ray.lease import OutputLease
from atlinter_ray.ledger import IMAGE_RECORD, Verdict, claim_image, image_owner, object_sum
from atlinter_ray.objects import open_objects

log = logging.getLogger(__name__)

#: Suffix of a task's reduction, stored beside its marker (``<lo>-<hi>.json``).
REDUCTION_SUFFIX = ".sums"


def _join(root: str, *parts: str) -> str:
    return posixpath.join(root.rstrip("/"), *parts)


#: Parts of an image's ``atlinter_ray`` record kept out of its OME metadata (which every
#: viewer parses, and napari-ome-zarr prints), in a sidecar beside the image
#: (:func:`sidecar_name`): the per-slice provenance and the object inventory.
SIDECAR_KEYS = ("provenance", "objects")


def sidecar_name(dataset_id: str) -> str:
    """The sidecar of an image, under the output root: ``<experiment>.provenance.json``."""
    return f"{dataset_id}.provenance.json"


@dataclass(frozen=True, slots=True)
class ImageState:
    """An image ready for tasks: its identity, and whether a run already finished it."""

    identity: ImageIdentity
    complete: bool
    created: bool
    #: The complete record's inventory: ``{level/key: {"size", "crc32c"}}`` of every
    #: object of every level, as written when the image was completed.
    objects: Mapping[str, Mapping[str, Any]] | None = None


class VolumeStore:
    """Reads and writes the output images, task markers and small files under one root."""

    def __init__(self, root: str, storage_options: Mapping[str, Any] | None = None):
        self.root = root.rstrip("/")
        self.storage_options = dict(storage_options or {})
        self.objects = open_objects(self.root, self.storage_options)
        self._arrays: dict[str, Any] = {}
        self._encoders: dict[str, ShardEncoder] = {}

    # -- locations ------------------------------------------------------------------
    def image_url(self, dataset_id: str) -> str:
        """URL of the dataset's OME-Zarr image."""
        return _join(self.root, f"{dataset_id}.ome.zarr")

    def image_key(self, dataset_id: str) -> str:
        """The key of the dataset's image folder under the root."""
        return self._image_path(dataset_id)

    def _fs_path(self, *parts: str) -> str:
        """The key of an object or folder under the root."""
        return posixpath.join(*parts)

    def _image_path(self, dataset_id: str, *parts: str) -> str:
        return self._fs_path(f"{dataset_id}.ome.zarr", *parts)

    def _progress_path(self, dataset_id: str, *parts: str) -> str:
        return self._fs_path("_progress", dataset_id, *parts)

    def _marker_path(self, identity: ImageIdentity, task_id: str, suffix: str = ".json") -> str:
        dataset_id, bounds = task_id.rsplit("/", 1)
        return self._progress_path(dataset_id, identity.generation, f"{bounds}{suffix}")

    # -- images ---------------------------------------------------------------------
    def prepare_image(
        self,
        ds: Dataset,
        dtype: str,
        run_info: Mapping[str, Any],
        fingerprint: InputFingerprint,
        layout: Layout = DEFAULT_LAYOUT,
        overwrite: bool = False,
    ) -> ImageState:
        """Resume the dataset's image if this run made it, else create it (:meth:`check_image`)."""
        state = self.check_image(ds, run_info, fingerprint, layout, overwrite)
        return state or self.create_image(ds, dtype, run_info, fingerprint, layout)

    def check_image(
        self,
        ds: Dataset,
        run_info: Mapping[str, Any],
        fingerprint: InputFingerprint,
        layout: Layout = DEFAULT_LAYOUT,
        overwrite: bool = False,
    ) -> ImageState | None:
        """The state of an image this run can resume, or None when one must be created.

        ``run_info`` names what produces the bytes (model, checkpoint hash, placement,
        edge policy, dtype), ``fingerprint`` the input, ``layout`` the arrays. An image
        made by another run or from other input is refused (a resume would mix two
        reconstructions in one volume), or replaced with ``overwrite``; an image of
        this very run is resumed either way, so ``overwrite`` jobs resume too. An image
        without our record (:mod:`atlinter_ray.ledger`) is someone else's: refused, or
        replaced with ``overwrite``. Reads only: nothing is written before every dataset
        has been checked.
        """
        url = self.image_url(ds.id)
        owner = image_owner(self.objects, self._image_path(ds.id), ds.id)
        if owner is Verdict.FOREIGN:
            if not overwrite:
                raise StoreError(
                    f"{url} exists but was not written by atlinter_ray (it holds no "
                    "atlinter_ray.json record of ours), so it is left untouched. Fix: choose "
                    "another output.root, or set output.overwrite=true to replace it."
                )
            log.warning("%s: replacing an image that is not ours (output.overwrite=true)", url)
            return None
        meta = self._image_meta(ds.id) if owner is Verdict.OK else None
        if meta is None:
            return None
        previous = meta.get("input") or {}
        same_run = meta.get("run") == dict(run_info) and meta.get("layout") == layout.to_json()
        if same_run and previous == fingerprint.to_json():
            identity = ImageIdentity(meta["generation"], fingerprint.digest)
            complete = meta.get("complete") == meta["generation"]
            return ImageState(identity, complete, False, meta.get("objects") if complete else None)
        if not overwrite:
            raise StoreError(self._conflict(url, meta, run_info, fingerprint, layout))
        log.warning("%s: replacing the image of another run (output.overwrite=true)", url)
        return None

    def _conflict(
        self,
        url: str,
        meta: Mapping[str, Any],
        run_info: Mapping[str, Any],
        fingerprint: InputFingerprint,
        layout: Layout,
    ) -> str:
        """Why an existing image cannot be resumed by this run, and the fix."""
        fix = ("Fix: choose another output.root, or set output.overwrite=true to replace "
               "it.")
        if meta.get("run") != dict(run_info):
            return (f"{url} was written by a different run ({meta.get('run')}); this run is "
                    f"{dict(run_info)}. {fix}")
        if meta.get("layout") != layout.to_json():
            return (f"{url} was written with another layout ({meta.get('layout')}); this "
                    f"run asks for {layout.to_json()}. {fix}")
        try:
            changed = InputFingerprint.from_json(meta["input"]).differences(fingerprint)
        except (KeyError, TypeError):
            changed = ["the input it records is unreadable"]
        return (f"{url} was made from other input: {'; '.join(changed) or 'its fingerprint'} "
                f"changed since. Its done markers describe slices of the old input. {fix}")

    def _image_meta(self, dataset_id: str) -> dict[str, Any] | None:
        """The image's ``atlinter_ray`` attributes, or None when it has no group metadata."""
        blob = self.objects.get(self._image_path(dataset_id, "zarr.json"))
        if blob is None:
            return None
        try:
            meta = json.loads(blob)["attributes"]["atlinter_ray"]
        except (ValueError, KeyError, TypeError):
            return None  # torn: our half-made image, made again
        if not isinstance(meta, dict) or "generation" not in meta:
            return None
        return self._with_sidecar(dataset_id, meta) if meta.get("complete") else meta

    def create_image(
        self,
        ds: Dataset,
        dtype: str,
        run_info: Mapping[str, Any],
        fingerprint: InputFingerprint,
        layout: Layout,
    ) -> ImageState:
        """Claim the image (our record first), remove its other objects and the dataset's
        markers, create the arrays, write the group metadata last."""
        image = self._image_path(ds.id)
        claim_image(self.objects, image, ds.id)
        for path in (self._image_path(ds.id, "zarr.json"), self._progress_path(ds.id)):
            self.objects.delete_prefix(path)
        record = self._image_path(ds.id, IMAGE_RECORD)
        self.objects.delete([key for key in self.objects.sizes(image) if key != record])
        self._arrays = {k: v for k, v in self._arrays.items() if not k.startswith(f"{ds.id}:")}
        self.create_level(ds, "0", array_spec(ds, layout), dtype, layout.zstd_level)
        generation = new_generation()
        group, options = self.zarr_location(ds.id)
        zarr.create_group(
            group, zarr_format=3, storage_options=options,
            attributes={
                "ome": ome_metadata(ds, dtype),
                "atlinter_ray": {
                    "generation": generation,
                    "run": dict(run_info),
                    "input": fingerprint.to_json(),
                    "layout": layout.to_json(),
                    "software": f"atlinter_ray {__version__}",
                    "source": ds.images_url,
                    "axis": ds.axis,
                    "section_numbers": sorted(ds.section_numbers),
                },
            },
        )
        return ImageState(ImageIdentity(generation, fingerprint.digest), False, True)

    def open_array(self, dataset_id: str, level: str = "0", mode: str = "r") -> Any:
        """One level of the dataset's image (cached per store); writes store every chunk."""
        key = f"{dataset_id}:{level}:{mode}"
        if key not in self._arrays:
            location, options = self.zarr_location(dataset_id, level)
            config = {"write_empty_chunks": True} if mode != "r" else None
            self._arrays[key] = zarr.open_array(
                location, mode=mode, storage_options=options, config=config
            )
        return self._arrays[key]

    def create_level(self, ds: Dataset, level: str, spec: ArraySpec, dtype: str,
                     zstd_level: int) -> dict[str, Any]:
        """Create (or replace) one level's array: sharded as ``spec`` says, Zstandard inside;
        return the record (:func:`~atlinter_ray.ledger.object_sum`) of its ``zarr.json``."""
        location, options = self.zarr_location(ds.id, level)
        zarr.create_array(
            location, shape=spec.shape, chunks=spec.chunks, shards=spec.shards, dtype=dtype,
            fill_value=0, dimension_names=spec.dims, compressors=ZstdCodec(level=zstd_level),
            zarr_format=3, overwrite=True, storage_options=options,
        )
        for cache in (self._arrays, self._encoders):
            for key in [k for k in cache if k.startswith(f"{ds.id}:{level}:")]:
                del cache[key]
        return object_sum(self.objects.get(self._image_path(ds.id, level, "zarr.json")) or b"")

    def write_slices(self, ds: Dataset, first: int, frames: np.ndarray) -> dict[str, dict[str, Any]]:
        """Write ``(K, C, H, W)`` consecutive slices from ``first`` (whole slabs) to level 0."""
        return self.write_slabs(ds, "0", first, as_slab(ds, frames))

    def write_slabs(
        self, ds: Dataset, level: str, first: int, block: np.ndarray
    ) -> dict[str, dict[str, Any]]:
        """Write whole slabs of one level from slice ``first``; return each object's record
        ``{object key: {"size", "crc32c"}}`` (:func:`~atlinter_ray.ledger.object_sum`).

        ``block`` is in array order ``([C,] z, y, x)`` and starts at a slab boundary; it
        ends at one too, or at the end of the array. Each slab is one shard object,
        encoded here (:class:`~atlinter_ray.layout.ShardEncoder`) and stored in one batch.
        """
        arr = self.open_array(ds.id, level, mode="r+")
        encoder = self._encoder(ds.id, level, arr)
        axis = arr.ndim - 3 + ds.axis_index
        depth, count, total = encoder.shards[axis], block.shape[axis], arr.shape[axis]
        if first % depth or (count % depth and first + count != total):
            raise ValueError(f"slices {first}..{first + count - 1} of {ds.id} level {level} "
                             f"are not whole slabs of {depth}")
        blobs = {}
        for start in range(0, count, depth):
            grid = [0] * arr.ndim
            grid[axis] = (first + start) // depth
            part = np.take(block, range(start, min(start + depth, count)), axis=axis)
            blobs[chunk_key(grid)] = encoder.encode(part)
        self._put_many(self._image_path(ds.id, level), blobs)
        return {key: object_sum(blob) for key, blob in blobs.items()}

    def _encoder(self, dataset_id: str, level: str, arr: Any) -> ShardEncoder:
        """The shard encoder of one level's array (cached); StoreError if not our layout."""
        cache = f"{dataset_id}:{level}:encoder"
        if cache not in self._encoders:
            try:
                self._encoders[cache] = shard_encoder(arr.metadata)
            except ValueError as exc:
                raise StoreError(
                    f"{_join(self.image_url(dataset_id), level)} is not laid out as this "
                    f"version writes ({exc}). Fix: rerun with output.overwrite=true to make "
                    "it again."
                ) from exc
        return self._encoders[cache]

    def _put_many(self, folder: str, blobs: Mapping[str, bytes]) -> None:
        """Store objects under ``folder`` (concurrently where the store can)."""
        self.objects.put_many({_join(folder, key): blob for key, blob in blobs.items()})

    def stored_objects(self, dataset_id: str, level: str = "0") -> dict[str, int]:
        """``{object key: size}`` of every stored object of one level (a fresh listing)."""
        folder = self._image_path(dataset_id, level) + "/"
        found = self.objects.sizes(folder + "c")
        return {key[len(folder):]: size for key, size in found.items() if key.startswith(folder)}

    def image_attrs(self, dataset_id: str) -> dict[str, Any]:
        """The image group's attributes (``ome`` metadata, ``atlinter_ray`` record), with the
        record's provenance and object inventory read back from its sidecar."""
        group, options = self.zarr_location(dataset_id)
        attrs = dict(zarr.open_group(group, mode="r", storage_options=options).attrs)
        ours = attrs.get("atlinter_ray")
        if isinstance(ours, dict):
            attrs["atlinter_ray"] = self._with_sidecar(dataset_id, ours)
        return attrs

    def metadata_version(self, dataset_id: str) -> str | None:
        """The ETag of the image's ``zarr.json`` now (None where the store has none)."""
        found = self.objects.get_tagged(self._image_path(dataset_id, "zarr.json"))
        return None if found is None else found[1]

    def update_attrs(self, dataset_id: str, attrs: Mapping[str, Any],
                     if_match: str | None = None) -> None:
        """Replace top-level attributes of the image group (one metadata write).

        The bulky parts of the ``atlinter_ray`` record (:data:`SIDECAR_KEYS`) go to the
        image's sidecar, written first, so the OME metadata that viewers parse stays lean.
        With ``if_match`` (an ETag of :meth:`metadata_version`), ``zarr.json`` is written
        only over that version (If-Match); another version raises
        :class:`~atlinter_ray.errors.SupersededError`.
        """
        attrs = dict(attrs)
        ours = attrs.get("atlinter_ray")
        if isinstance(ours, Mapping) and any(k in ours for k in SIDECAR_KEYS):
            side = {"generation": ours.get("generation"), **{k: ours[k] for k in SIDECAR_KEYS if k in ours}}
            self.write_bytes(sidecar_name(dataset_id), json.dumps(side, separators=(",", ":")).encode())
            attrs["atlinter_ray"] = {k: v for k, v in ours.items() if k not in SIDECAR_KEYS}
        if if_match is not None:
            self._put_group_attrs(dataset_id, attrs, if_match)
            return
        group, options = self.zarr_location(dataset_id)
        zarr.open_group(group, mode="r+", storage_options=options).attrs.update(attrs)

    def _put_group_attrs(self, dataset_id: str, attrs: Mapping[str, Any], if_match: str) -> None:
        """Merge ``attrs`` into ``zarr.json`` (as zarr writes it) with If-Match ``if_match``."""
        key = self._image_path(dataset_id, "zarr.json")
        found = self.objects.get_tagged(key)
        meta = json.loads(found[0]) if found is not None else {}
        meta["attributes"] = {**meta.get("attributes", {}), **attrs}
        try:
            if found is None or found[1] != if_match:
                raise FileExistsError(key)
            self.objects.put_if(key, json.dumps(meta, indent=2, allow_nan=True).encode(),
                                if_match)
        except FileExistsError:
            raise SupersededError(
                f"{self.image_url(dataset_id)}: not marked complete: its metadata changed "
                "while this run finished it (another driver wrote it). Fix: make sure one "
                "job at a time writes this output.root, then rerun the same command."
            ) from None

    def _with_sidecar(self, dataset_id: str, meta: dict[str, Any]) -> dict[str, Any]:
        """``meta`` with its sidecar's records merged in, when they are of its generation."""
        blob = self.read_bytes(sidecar_name(dataset_id))
        try:
            side = json.loads(blob) if blob is not None else {}
        except ValueError:
            return meta  # torn: as if absent (finishing writes it again)
        if not isinstance(side, dict) or side.get("generation") != meta.get("generation"):
            return meta
        return {**meta, **{k: side[k] for k in SIDECAR_KEYS if k in side}}

    def read_volume(self, dataset_id: str, level: str = "0") -> np.ndarray:
        """One whole level ``([C,] Z, Y, X)``; for scoring, tests and evaluation.

        Its shards are fetched in one batch and decoded here
        (:meth:`~atlinter_ray.layout.ShardEncoder.decode`): zarr's reader pays a fixed
        cost per inner chunk, 3.5 s for a full-size grey gene against 1.2 s here
        (``benchmarks/bench_slab.py``). A missing shard reads as zeros, as in zarr; one
        that does not decode raises :class:`~atlinter_ray.errors.DamagedObjectError`.
        """
        arr = self.open_array(dataset_id, level)
        encoder = self._encoder(dataset_id, level, arr)
        grid = [-(-n // s) for n, s in zip(arr.shape, encoder.shards)]
        keys = {chunk_key(cell): cell for cell in np.ndindex(*grid)}
        folder = self._image_path(dataset_id, level)
        found = self.objects.get_many([_join(folder, key) for key in keys])
        padded = np.zeros([g * s for g, s in zip(grid, encoder.shards)], dtype=arr.dtype)
        for key, cell in keys.items():
            blob = found.get(_join(folder, key))
            if blob is not None:
                where = tuple(slice(i * s, (i + 1) * s) for i, s in zip(cell, encoder.shards))
                try:
                    padded[where] = encoder.decode(blob)
                except (ValueError, zstandard.ZstdError) as exc:
                    raise DamagedObjectError(
                        f"{_join(self.image_url(dataset_id), level, key)} does not decode "
                        f"({exc}): it was damaged after it was written. Fix: rerun the same "
                        "command; it proves every object and redoes the damaged ones."
                    ) from exc
        volume: np.ndarray = padded[tuple(slice(0, n) for n in arr.shape)]
        return volume

    # -- markers ----------------------------------------------------------------------
    def mark_done(self, identity: ImageIdentity, task_id: str, record: Mapping[str, Any]) -> None:
        """Record, under the image's generation, that a task's objects are all written."""
        path = self._marker_path(identity, task_id)
        body = {**record, "task_id": task_id, "generation": identity.generation,
                "fingerprint": identity.fingerprint}
        self.objects.put(path, json.dumps(body, sort_keys=True).encode())

    def done_task_ids(self, dataset_id: str, identity: ImageIdentity) -> set[str]:
        """Ids of the tasks with a marker under the image's generation (one fresh listing)."""
        return {f"{dataset_id}/{posixpath.basename(p)[:-5]}"
                for p in self._marker_files(dataset_id, identity)}

    def done_records(self, dataset_id: str, identity: ImageIdentity) -> dict[str, dict[str, Any]]:
        """Markers written for this exact image and input, by task id."""
        paths = self._marker_files(dataset_id, identity)
        records = {}
        for blob in self.objects.get_many(paths).values():
            record = json.loads(blob)
            if (record.get("generation"), record.get("fingerprint")) == (
                    identity.generation, identity.fingerprint):
                records[record["task_id"]] = record
        return records

    def write_reduction(self, identity: ImageIdentity, task_id: str, blob: bytes) -> None:
        """Store a task's reduction (:mod:`atlinter_ray.finishing`) beside its marker, before it."""
        self.objects.put(self._marker_path(identity, task_id, REDUCTION_SUFFIX), blob)

    def read_reductions(self, identity: ImageIdentity, task_ids: Iterable[str]) -> dict[str, bytes]:
        """The stored reductions of ``task_ids`` (in one concurrent batch); lost ones left out."""
        paths = {self._marker_path(identity, t, REDUCTION_SUFFIX): t for t in task_ids}
        return {paths[p]: blob for p, blob in self.objects.get_many(list(paths)).items()}

    def drop_markers(self, identity: ImageIdentity, task_ids: Iterable[str]) -> None:
        """Remove tasks' markers and reductions (their objects were found missing: redo them)."""
        self.objects.delete([self._marker_path(identity, t, suffix) for t in task_ids
                             for suffix in (".json", REDUCTION_SUFFIX)])

    def _marker_files(self, dataset_id: str, identity: ImageIdentity) -> list[str]:
        folder = self._progress_path(dataset_id, identity.generation)
        return [key for key in self.objects.sizes(folder) if key.endswith(".json")]

    # -- small files and the lease ----------------------------------------------------
    def lease(self, ttl_s: float = 60.0) -> OutputLease:
        """The lease that makes this driver the only writer of the root (not yet taken)."""
        return OutputLease(self.objects, ttl_s)

    def write_bytes(self, name: str, data: bytes) -> str:
        """Write a small file (summary, picture) under the root, atomically; return its URL."""
        self.objects.put(self._fs_path(name), data)
        return _join(self.root, name)

    def read_bytes(self, name: str) -> bytes | None:
        """A small file written by :meth:`write_bytes`, or None when there is none."""
        return self.objects.get(self._fs_path(name))

    def zarr_location(self, dataset_id: str, *level: str) -> tuple[Any, dict[str, Any] | None]:
        """What zarr opens for the image (or one of its levels): ``(store or URL, options)``."""
        return self.objects.zarr_location(self._image_path(dataset_id, *level))
