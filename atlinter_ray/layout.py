"""How an output image is laid out: arrays, chunks, shards, codecs, pyramid, OME metadata.

Level ``"0"`` is the full-resolution volume in reference orientation, ``([C,] z, y, x)``.
Tasks write it concurrently, so one rule holds whatever the configuration: **along the
section axis an object (chunk, or shard when sharding) is one slice deep**, hence every
object belongs to exactly one task (tasks own whole slices) and no two writers ever
touch the same object (writers sharing a shard lose data). In the section plane:

* default: one chunk = one whole slice, one object per slice;
* ``output.chunks=[h, w]``: tiles of ``h x w`` (viewers read only the tiles they show);
  with ``output.shards=true`` the tiles of one slice are packed into one shard object,
  so an object store holds one object per slice again (zarr's sharding codec).

zarr's guidance for object stores (chunks of about 1 MB and more, few objects) is met
as far as the one-slice rule allows: a 320 x 456 RGB uint8 slice is 438 kB raw. Chunks
are compressed with Zstandard (``output.zstd_level``, default 1: see
``benchmarks/bench_scale.py`` for the measured write cost per level).

Levels ``"1"``, ``"2"``... are the multiscale pyramid (2x2x2 means, until the largest
side is at most ``output.pyramid_min``), written once per dataset by its finishing
job (a single writer; level 1 from the in-plane :func:`pair_sums` each task stored, see
:mod:`atlinter_ray.finishing`), in cubic chunks of :data:`PYRAMID_CHUNK` = 128: for a
528 x 320 x 456 RGB volume, 16 objects above level 0 instead of 75 with 64-voxel
chunks (requests on an object store); writing them took the same time on local disk
(0.85-0.87 s for the whole finishing pass either way, ``benchmarks/bench_scale.py``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numcodecs
import numpy as np

from atlinter_ray.dataset import Dataset
from atlinter_ray.errors import ConfigError

SPACE_AXES = ("z", "y", "x")
#: Chunk side of the pyramid levels (every spatial axis).
PYRAMID_CHUNK = 128


@dataclass(frozen=True, slots=True)
class Layout:
    """The configurable part of an image's layout (``output.chunks/shards/...``)."""

    #: In-plane chunk ``(h, w)``; None: the whole slice.
    chunks: tuple[int, int] | None = None
    #: Pack the in-plane chunks of a slice into one shard object.
    shards: bool = False
    zstd_level: int = 1
    #: Pyramid levels are added until the largest side is at most this; 0: no pyramid.
    pyramid_min: int = 64

    def check(self) -> None:
        """Refuse settings that cannot work, naming the key and the fix."""
        if not 1 <= self.zstd_level <= 22:
            raise ConfigError(
                f"output.zstd_level={self.zstd_level}: choose 1 (fast) to 22 (small)"
            )
        if self.chunks is not None and (
            len(self.chunks) != 2 or not all(isinstance(v, int) and v > 0 for v in self.chunks)
        ):
            raise ConfigError(
                f"output.chunks={list(self.chunks)}: give the in-plane chunk as two "
                "positive sizes [h, w], or null for whole slices"
            )
        if self.shards and self.chunks is None:
            raise ConfigError(
                "output.shards=true needs output.chunks=[h, w] (the tiles inside each "
                "one-slice shard); with whole-slice chunks a shard would add nothing"
            )
        if self.pyramid_min < 0:
            raise ConfigError(
                f"output.pyramid_min={self.pyramid_min}: give a size >= 1, or 0 for no pyramid"
            )

    def to_json(self) -> dict[str, Any]:
        """Plain-JSON form (recorded in the image's metadata)."""
        return {"chunks": None if self.chunks is None else list(self.chunks),
                "shards": self.shards, "zstd_level": self.zstd_level,
                "pyramid_min": self.pyramid_min}


DEFAULT_LAYOUT = Layout()


@dataclass(frozen=True, slots=True)
class ArraySpec:
    """Shape, object grid and dimension names of level 0."""

    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    #: Shard shape (one slice deep), or None without sharding.
    shards: tuple[int, ...] | None
    dims: tuple[str, ...]


def array_spec(ds: Dataset, layout: Layout) -> ArraySpec:
    """Level 0 of ``ds`` under ``layout``: objects are one slice deep along the section axis."""
    shape = list(ds.reference_shape)
    plane = [n for i, n in enumerate(shape) if i != ds.axis_index]
    inner = list(layout.chunks) if layout.chunks else plane
    inner = [min(c, n) for c, n in zip(inner, plane)]
    outer = [math.ceil(n / c) * c for c, n in zip(inner, plane)]  # whole tiles per shard
    chunks, shards = list(inner), list(outer)
    chunks.insert(ds.axis_index, 1)
    shards.insert(ds.axis_index, 1)
    lead = (ds.channels,) if ds.channels > 1 else ()
    dims = (("c",) if lead else ()) + SPACE_AXES
    return ArraySpec(
        shape=(*lead, *shape),
        chunks=(*lead, *chunks),
        shards=(*lead, *shards) if layout.shards else None,
        dims=dims,
    )


def as_slab(ds: Dataset, frames: np.ndarray) -> np.ndarray:
    """``(K, C, H, W)`` consecutive slices in the image's array order ``([C,] z, y, x)``."""
    slab: np.ndarray = np.moveaxis(frames if ds.channels > 1 else frames[:, 0],
                                   0, ds.axis_index + (1 if ds.channels > 1 else 0))
    return slab


def pyramid_shapes(shape: Sequence[int], channels: int, minimum: int) -> list[tuple[int, ...]]:
    """Shapes of levels 1, 2, ...: spatial sides halved (rounded up) while any side > ``minimum``."""
    if minimum <= 0:
        return []
    space = list(shape[-3:])
    lead = tuple(shape[:-3])
    levels = []
    while max(space) > minimum:
        space = [math.ceil(n / 2) for n in space]
        levels.append((*lead, *space))
    assert not lead or lead == (channels,)
    return levels


def pyramid_chunks(shape: Sequence[int]) -> tuple[int, ...]:
    """Chunk shape of a pyramid level: all channels, :data:`PYRAMID_CHUNK` per spatial side."""
    lead = tuple(shape[:-3])
    return (*lead, *(min(PYRAMID_CHUNK, n) for n in shape[-3:]))


def pair_sums(block: np.ndarray, axes: Sequence[int]) -> np.ndarray:
    """Sums of neighbour pairs along ``axes`` (an odd side counts its edge twice).

    Integers of up to 16 bits are summed in a type that holds eight of them exactly
    (uint16 for uint8, else int32), so the sums do not depend on their order: a task
    can sum its slices in-plane and finishing pair them across tasks (level 1 of the
    pyramid) with the same result as one 2x2x2 pass. Floats are summed in their own type.
    """
    wide = block.dtype
    if block.dtype.kind in "ui" and block.dtype.itemsize <= 2:
        unsigned8 = block.dtype.kind == "u" and block.dtype.itemsize == 1
        wide = np.dtype(np.uint16 if unsigned8 else np.int32)
    total = block
    for axis in axes:
        if total.shape[axis] % 2:
            pad = [(0, 0)] * total.ndim
            pad[axis] = (0, 1)
            total = np.pad(total, pad, mode="edge")
        even = [slice(None)] * total.ndim
        odd = list(even)
        even[axis], odd[axis] = slice(0, None, 2), slice(1, None, 2)
        if total.dtype == wide:
            total = total[tuple(even)] + total[tuple(odd)]
        else:  # widened at the first step, where the data is already halved
            summed = total[tuple(even)].astype(wide)
            summed += total[tuple(odd)]
            total = summed
    return total


def mean_of_eight(total: np.ndarray, dtype: np.dtype[Any]) -> np.ndarray:
    """The mean of 2x2x2 :func:`pair_sums` in ``dtype``; integers rounded half to even.

    An integer mean of eight values of up to 16 bits is exact in float32, so this is
    ``np.rint`` of the float32 mean, byte for byte, without the float pass.
    """
    if total.dtype.kind == "f":
        mean: np.ndarray = (total * total.dtype.type(0.125)).astype(dtype)
        return mean
    quotient, rest = total >> 3, total & 7  # floor division by 8 and its remainder
    quotient += (rest > 4) | ((rest == 4) & (quotient & 1).astype(bool))
    return quotient.astype(dtype)


def downsample2(block: np.ndarray) -> np.ndarray:
    """2x2x2 mean of the last three axes (odd sides: the edge repeated), in ``block``'s dtype."""
    return mean_of_eight(pair_sums(block, (-1, -2, -3)), block.dtype)


def ome_metadata(ds: Dataset, dtype: str, levels: int = 1) -> dict[str, Any]:
    """OME-Zarr 0.5 ``ome`` attributes: axes, per-level scale in micrometres, RGB channels."""
    voxel = float(ds.metadata.get("voxel_size_um", 25.0))
    axes: list[dict[str, str]] = [
        {"name": n, "type": "space", "unit": "micrometer"} for n in SPACE_AXES
    ]
    meta: dict[str, Any] = {"version": "0.5"}
    lead: list[float] = []
    if ds.channels > 1:
        axes.insert(0, {"name": "c", "type": "channel"})
        lead = [1.0]
        top = float(np.iinfo(dtype).max) if np.dtype(dtype).kind == "u" else 1.0
        meta["omero"] = {
            "channels": [
                {"label": label, "color": color, "active": True,
                 "window": {"min": 0.0, "max": top, "start": 0.0, "end": top}}
                for label, color in (("red", "FF0000"), ("green", "00FF00"),
                                     ("blue", "0000FF"))
            ]
        }
    datasets = []
    for level in range(levels):
        scale = lead + [voxel * 2**level] * 3
        transforms: list[dict[str, Any]] = [{"type": "scale", "scale": scale}]
        if level:  # a coarse voxel's centre sits half a coarse voxel in
            shift = voxel * (2**level - 1) / 2
            transforms.append({"type": "translation",
                               "translation": [0.0] * len(lead) + [shift] * 3})
        datasets.append({"path": str(level), "coordinateTransformations": transforms})
    meta["multiscales"] = [{"name": ds.id, "axes": axes, "datasets": datasets}]
    return meta


def chunk_key(index: Sequence[int]) -> str:
    """Zarr v3's default chunk key (``c/0/12/0/0``) of a chunk grid index."""
    return "c/" + "/".join(str(i) for i in index)


def key_slice(key: str, axis_index: int) -> int:
    """The slice a level-0 object holds (objects are one slice deep along the section axis)."""
    grid = key.split("/")[1:]
    return int(grid[len(grid) - 3 + axis_index])


class ChunkEncoder:
    """Encodes level-0 chunks exactly as zarr would, without zarr's per-chunk cost.

    Only for the layout this package writes without sharding (bytes codec, then
    Zstandard); :func:`direct_encoder` returns None for anything else, and zarr writes.
    Measured per 320 x 456 RGB uint8 slice at zstd level 1 (compression alone 0.9-1.2
    ms; ``benchmarks/bench_scale.py --profile-writes``): one whole-slice chunk 2.2 ms
    here against 2.4 ms through zarr, nine 128 x 128 tiles 2.6 ms against 9.4 ms (zarr
    adds about 0.8 ms per chunk). The rest is the file system (a folder per slice, as
    zarr's keys want: about 0.25 ms). A test checks the bytes are zarr's.
    """

    def __init__(self, dtype: np.dtype[Any], level: int, checksum: bool) -> None:
        self.dtype = dtype.newbyteorder("<") if dtype.itemsize > 1 else dtype
        self.codec = numcodecs.Zstd(level=level, checksum=checksum)

    def encode(self, chunk: np.ndarray) -> bytes:
        """Compressed bytes of one full chunk (C order, little endian)."""
        data = np.ascontiguousarray(chunk, dtype=self.dtype)
        return bytes(self.codec.encode(data))


def direct_encoder(metadata: Any) -> ChunkEncoder | None:
    """A :class:`ChunkEncoder` for a zarr v3 array's metadata, or None if zarr must write."""
    from zarr.codecs import BytesCodec, ZstdCodec
    from zarr.core.chunk_key_encodings import DefaultChunkKeyEncoding

    codecs = list(getattr(metadata, "codecs", ()))
    encoding = getattr(metadata, "chunk_key_encoding", None)
    if (
        len(codecs) != 2
        or not isinstance(codecs[0], BytesCodec)
        or getattr(codecs[0].endian, "value", "little") != "little"
        or not isinstance(codecs[1], ZstdCodec)
        or not isinstance(encoding, DefaultChunkKeyEncoding)
        or encoding.separator != "/"
    ):
        return None
    dtype = metadata.dtype.to_native_dtype()
    return ChunkEncoder(np.dtype(dtype), codecs[1].level, codecs[1].checksum)
