"""Finishing one dataset, on a worker, once all its tasks are done.

::

    the ledger: every planned task has a marker, and every
    object a marker names is stored with its size?               no ─> drop their markers,
                                                                       redo those tasks
    the tasks' reductions (in their markers), in slice order (level 0 read only for a
    marker without one)
        ├─> level 1 of the pyramid (2x2x2 means), then 2, 3 ... from it, in memory
        └─> the three mid planes of the quick-look
    quick-look and montage PNGs (atomic), provenance merged in slice order
    the ledger's finalize: multiscales of every level, provenance, every object of every
        level with its checksum, complete=<generation>  (last; fenced: refused if another
        driver took the lease over, and written only over the version of zarr.json read
        when finishing began: If-Match on object stores)

Only then is the dataset complete: a rerun proves every object of every level against
that record (:func:`atlinter_ray.ledger.recheck`) and, when all hold, does nothing.
Everything here runs where the store is, on a worker; the driver only receives a
:class:`FinishResult`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numcodecs
import numpy as np

from atlinter_ray import ledger
from atlinter_ray.dataset import Dataset
from atlinter_ray.dtypes import recorded_scale
from atlinter_ray.errors import is_storage_error
from atlinter_ray.identity import ImageIdentity
from atlinter_ray.layout import (
    Layout,
    array_spec,
    downsample2,
    mean_of_eight,
    ome_metadata,
    pair_sums,
    pyramid_shapes,
)
from atlinter_ray.lease import FenceToken
from atlinter_ray.quicklook import mid_positions, montage_gaps, montage_png, quicklook_png
from atlinter_ray.store import TaskMarker, VolumeStore

log = logging.getLogger(__name__)

#: Slices of level 0 read per step (an even number: level 1 halves it).
SLAB = 16


class UnreadableSlicesError(Exception):
    """Stored objects of these slices do not decode (a torn or foreign write)."""

    def __init__(self, slices: set[int]) -> None:
        super().__init__(f"slices {sorted(slices)} do not decode")
        self.slices = slices


@dataclass(frozen=True, slots=True)
class FinishJob:
    """What a worker needs to finish one dataset."""

    dataset_id: str
    identity: ImageIdentity
    task_ids: tuple[str, ...]
    quicklook: bool = True


@dataclass(slots=True)
class FinishResult:
    """What finishing a dataset found and did."""

    dataset_id: str
    status: str = "failed"  # "done" | "redo" | "failed"
    #: Tasks whose markers are missing or whose objects are not all stored.
    redo: tuple[str, ...] = ()
    error: str = ""
    storage_error: bool = False
    seconds: float = 0.0
    outputs: dict[str, str] = field(default_factory=dict)

    @property
    def done(self) -> bool:
        """True when the dataset is verified complete and its finishing work written."""
        return self.status == "done"


def finish_dataset(
    store: VolumeStore, ds: Dataset, job: FinishJob, fence: FenceToken | None = None
) -> FinishResult:
    """Verify the dataset's markers against the store, then write pyramid, pictures, metadata.

    ``fence`` is the driver's lease token (None: unfenced), checked before the metadata.
    """
    start = time.perf_counter()
    result = FinishResult(ds.id)
    try:
        markers, redo = ledger.unfinished_tasks(store, ds.id, job.identity, job.task_ids)
        records = {task_id: marker.record for task_id, marker in markers.items()}
        if not redo:
            try:
                result.outputs = _finish(store, ds, job, markers, fence)
                result.status = "done"
            except UnreadableSlicesError as exc:
                redo = sorted({task_id for task_id, record in records.items()
                               if set(range(*ledger.task_span(record))) & exc.slices})
        if redo:
            store.drop_markers(job.identity, [t for t in redo if t in records])
            log.warning("%s: %d task(s) lost their output and will be redone", ds.id, len(redo))
            result.status, result.redo = "redo", tuple(redo)
    except Exception as exc:  # reported, never hidden: the driver counts failures
        log.exception("finishing %s failed", ds.id)
        result.error = f"{type(exc).__name__}: {exc}"
        result.storage_error = is_storage_error(exc)
    result.seconds = time.perf_counter() - start
    return result


def _finish(
    store: VolumeStore, ds: Dataset, job: FinishJob, markers: Mapping[str, TaskMarker],
    fence: FenceToken | None,
) -> dict[str, str]:
    """Pyramid, pictures and metadata of a verified dataset; the metadata goes last."""
    records = {task_id: marker.record for task_id, marker in markers.items()}
    seen = store.metadata_version(ds.id)  # before it is read: any later change is refused
    meta = ledger.image_record_of(store, ds.id, job.identity)
    provenance = sorted((s for r in records.values() for s in r["slices"]),
                        key=lambda s: s["slice"])
    pyramid, planes = _pyramid(store, ds, Layout.from_json(meta["layout"]),
                               _reductions(store, ds, markers))
    outputs = {"image": store.image_url(ds.id)}
    if job.quicklook:
        status = [""] * ds.n_slices
        for s in provenance:
            status[s["slice"]] = s["status"]
        outputs["quicklook"] = store.write_bytes(f"{ds.id}.quicklook.png",
                                                 quicklook_png(ds, planes, status,
                                                               str(meta.get("run", {}).get("model", "")),
                                                               scale=recorded_scale(meta)))
        if montage_gaps(provenance):
            outputs["montage"] = store.write_bytes(
                f"{ds.id}.montage.png",
                montage_png(store, ds, provenance=provenance, scale=recorded_scale(meta)))
    dtype = str(store.open_array(ds.id).dtype)
    levels = 1 + len({key.split("/", 1)[0] for key in pyramid})
    meta["provenance"] = provenance
    ledger.finalize(store, ds.id, job.identity, meta, ome_metadata(ds, dtype, levels),
                    {**ledger.level0_inventory(records), **pyramid}, fence, seen)
    return outputs


@dataclass(frozen=True, slots=True)
class Reduction:
    """What finishing needs of consecutive slices, made where they are written.

    When the slices pair up among themselves along the section axis (``first`` even, and
    ``count`` even or reaching the volume's end, as every task of an even ``output.slab``
    does), ``level1`` is their part of pyramid level 1 (2x2x2 means, the image's dtype)
    and ``sums`` is None. Otherwise ``sums`` are the slices' in-plane pair sums
    (:func:`~atlinter_ray.layout.pair_sums`), in array order with the section axis
    ``count`` long, which finishing pairs across tasks into level 1. ``cuts[a]`` is the
    slices' part of the quick-look plane across reference axis ``a`` (for the section
    axis, the whole mid slice, when these slices hold it). A task stores its reduction
    in its marker, so finishing reads one small object per task instead of every slice
    of level 0.
    """

    first: int
    count: int
    sums: np.ndarray | None
    cuts: dict[int, np.ndarray]
    level1: np.ndarray | None = None

    def to_bytes(self) -> bytes:
        """A JSON header line (first, count, each array's dtype and shape), then the
        arrays' bytes compressed together (no archive format: a task's reduction is
        written and read once, and ``.npz`` cost twice the time)."""
        arrays = {name: a for name, a in (("sums", self.sums), ("level1", self.level1))
                  if a is not None}
        arrays.update({f"cut{a}": cut for a, cut in self.cuts.items()})
        head = {"first": self.first, "count": self.count,
                "arrays": [[name, a.dtype.str, list(a.shape)] for name, a in arrays.items()]}
        body = b"".join(np.ascontiguousarray(a).tobytes() for a in arrays.values())
        return json.dumps(head).encode() + b"\n" + bytes(_REDUCTION_CODEC.encode(body))

    @classmethod
    def from_bytes(cls, blob: bytes) -> Reduction:
        """Decode :meth:`to_bytes` (``ValueError`` when the bytes are not one)."""
        line, _, packed = blob.partition(b"\n")
        try:
            head = json.loads(line)
            # Blosc decodes torn bytes without a word: its header (16 bytes) ends with
            # the compressed size
            stated = int.from_bytes(packed[12:16], "little") if len(packed) >= 16 else -1
            if stated != len(packed):
                raise ValueError(f"{len(packed)} compressed bytes where the header says {stated}")
            body = memoryview(_REDUCTION_CODEC.decode(packed))
            arrays, at = {}, 0
            for name, dtype, shape in head["arrays"]:
                size = int(np.prod(shape)) * np.dtype(dtype).itemsize
                arrays[name] = np.frombuffer(body[at : at + size], dtype=dtype).reshape(shape)
                at += size
            if at != len(body):
                raise ValueError(f"{len(body) - at} bytes left over")
            sums, level1 = arrays.pop("sums", None), arrays.pop("level1", None)
            if (sums is None) == (level1 is None):
                raise ValueError("it holds neither sums nor a level-1 block, or both")
            return cls(int(head["first"]), int(head["count"]), sums,
                       {int(k[3:]): a for k, a in arrays.items()}, level1)
        except (RuntimeError, KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a reduction: {exc}") from exc


#: Byte-shuffled LZ4 (Blosc): on a 7-slice 320 x 456 task's 0.5 MB of uint16 sums,
#: 0.2 ms and 300 kB, where Zstandard level 1 took 1.3 ms for 340 kB.
_REDUCTION_CODEC = numcodecs.Blosc(cname="lz4", clevel=5, shuffle=numcodecs.Blosc.SHUFFLE,
                                   typesize=2)


def reduce_slab(ds: Dataset, slab: np.ndarray, first: int) -> Reduction:
    """The :class:`Reduction` of ``slab``: slices ``first..`` in array order ``([C,] z, y, x)``."""
    lead = slab.ndim - 3
    axis = lead + ds.axis_index
    count = slab.shape[axis]
    cuts = {}
    for a, mid in enumerate(mid_positions(ds)):
        if a != ds.axis_index:
            cuts[a] = np.take(slab, mid, axis=lead + a)
        elif first <= mid < first + count:
            cuts[a] = np.take(slab, mid - first, axis=axis)
    in_plane = [lead + a for a in range(3) if a != ds.axis_index]
    if first % 2 == 0 and (count % 2 == 0 or first + count == ds.n_slices):
        # summed in the order finishing sums the other kind, so the bytes are the same
        return Reduction(first, count, None, cuts,
                         mean_of_eight(pair_sums(slab, [*in_plane, axis]), slab.dtype))
    return Reduction(first, count, pair_sums(slab, in_plane), cuts)


def _reductions(
    store: VolumeStore, ds: Dataset, markers: Mapping[str, TaskMarker]
) -> Iterator[Reduction]:
    """Reductions of every slice in order: the tasks' own, or made from level 0 where a
    marker has none. Each is decoded only when its turn comes (the markers hold them
    compressed), so memory stays flat in the slices."""
    arr = store.open_array(ds.id)
    n = arr.shape[arr.ndim - 3 + ds.axis_index]
    ranges = sorted((first, stop - 1, task_id) for task_id, m in markers.items()
                    for first, stop in [ledger.task_span(m.record)])
    made = 0
    for lo, hi, task_id in ranges:
        if made < lo:
            yield from _reduce_level0(arr, ds, made, lo)
        reduction = _stored_reduction(markers[task_id].reduction, lo, hi)
        if reduction is None:
            log.info("%s: no reduction in the marker of %s; reading its slices", ds.id,
                     task_id)
            yield from _reduce_level0(arr, ds, lo, hi + 1)
        else:
            yield reduction
        made = hi + 1
    yield from _reduce_level0(arr, ds, made, n)


def _stored_reduction(blob: bytes | None, lo: int, hi: int) -> Reduction | None:
    """A stored reduction of slices ``lo..hi``, or None when lost, torn or of other slices."""
    if blob is None:
        return None
    try:
        reduction = Reduction.from_bytes(blob)
    except ValueError:
        return None
    return reduction if (reduction.first, reduction.count) == (lo, hi - lo + 1) else None


def _reduce_level0(arr: Any, ds: Dataset, start: int, stop: int) -> Iterator[Reduction]:
    """Reductions of slices ``start..stop-1`` read from level 0, :data:`SLAB` at a time."""
    axis = arr.ndim - 3 + ds.axis_index
    for first in range(start, stop, SLAB):
        index: list[Any] = [slice(None)] * arr.ndim
        index[axis] = slice(first, min(first + SLAB, stop))
        yield reduce_slab(ds, _read_slab(arr, index, axis), first)


def _pyramid(
    store: VolumeStore, ds: Dataset, layout: Layout, reductions: Iterable[Reduction]
) -> tuple[dict[str, dict[str, Any]], list[np.ndarray]]:
    """Level 1 from the reductions, levels 2.. from it; return ``(inventory, quick-look
    planes)``: the inventory names every object written (metadata included),
    ``{level/key: record}``."""
    arr = store.open_array(ds.id)
    lead = arr.ndim - 3
    axis = lead + ds.axis_index
    n = arr.shape[axis]
    shapes = pyramid_shapes(arr.shape, ds.channels, layout.pyramid_min)
    planes = [np.zeros(arr.shape[:lead + a] + arr.shape[lead + a + 1:], arr.dtype)
              for a in range(3)]
    level = np.zeros(shapes[0], arr.dtype) if shapes else None
    carry: np.ndarray | None = None  # the sums of a slice whose pair is in the next reduction
    for red in reductions:
        for a, cut in red.cuts.items():
            into: list[Any] = [slice(None)] * (arr.ndim - 1)
            if a != ds.axis_index:
                into[axis - (1 if a < ds.axis_index else 0)] = slice(red.first,
                                                                     red.first + red.count)
            planes[a][tuple(into)] = cut
        if level is None:
            continue
        if red.level1 is not None:  # the slices before it paired up: nothing is carried
            assert carry is None and red.first % 2 == 0, "a level-1 block out of step"
            into = [slice(None)] * arr.ndim
            into[axis] = slice(red.first // 2, red.first // 2 + red.level1.shape[axis])
            level[tuple(into)] = red.level1
            continue
        assert red.sums is not None
        sums, start = red.sums, red.first
        if carry is not None:
            sums, start = np.concatenate([carry, sums], axis=axis), start - 1
        carry = None
        if sums.shape[axis] % 2 and start + sums.shape[axis] < n:
            carry = np.take(sums, [sums.shape[axis] - 1], axis=axis)
            sums = np.take(sums, range(sums.shape[axis] - 1), axis=axis)
        if sums.shape[axis]:
            half: list[Any] = [slice(None)] * arr.ndim
            half[axis] = slice(start // 2, start // 2 + -(-sums.shape[axis] // 2))
            level[tuple(half)] = mean_of_eight(pair_sums(sums, (axis,)), arr.dtype)
    inventory = {}
    for number, shape in enumerate(shapes, start=1):
        assert level is not None
        if number > 1:
            level = downsample2(level)
        assert level.shape == shape
        inventory[f"{number}/zarr.json"] = store.create_level(
            ds, str(number), array_spec(ds, layout, shape[-3:]), str(arr.dtype),
            layout.zstd_level)
        written = store.write_slabs(ds, str(number), 0, level)
        inventory.update({f"{number}/{key}": entry for key, entry in written.items()})
    return inventory, planes


def _read_slab(arr: Any, index: list[Any], axis: int) -> np.ndarray:
    """Read slices ``index[axis]``; raise :class:`UnreadableSlicesError` naming any that fail."""
    try:
        return np.asarray(arr[tuple(index)])
    except (ValueError, RuntimeError, TypeError):  # what codecs raise on bad bytes
        bad = set()
        for s in range(index[axis].start, index[axis].stop):
            one = list(index)
            one[axis] = s
            try:
                arr[tuple(one)]
            except (ValueError, RuntimeError, TypeError):
                bad.add(s)
        if not bad:
            raise
        raise UnreadableSlicesError(bad) from None
