"""How an output image is laid out: shards, inner chunks, codecs, pyramid, OME metadata.

Level ``"0"`` is the full-resolution volume in reference orientation, ``([C,] z, y, x)``.
Tasks write it concurrently, so one rule holds whatever the configuration: **along the
section axis an object is one slab of** ``output.slab`` **slices deep** (K, default 16),
covering the whole section plane, and a task owns whole slabs
(:func:`~atlinter_ray.planning.plan_slabs`), so every object has exactly one writer
(writers sharing a shard lose data). Each object is a zarr v3 shard (``sharding_indexed``
codec); inside it, inner chunks of ``K x h x w`` (``output.chunks=[h, w]``, default
32 x 32) are what a reader fetches by byte range through the shard's index, so a viewer
drawing a plane across the sections reads only the inner chunks the plane cuts: for a
528 x 320 x 456 volume a sagittal plane reads 32/456 and an axial one 32/320 of level 0
(``benchmarks/bench_slab.py``), against every slice object of the one-slice-deep layout.
On an object store, a 528-slice volume is 33 objects at level 0 instead of 528.

Why K = 16 by default (``benchmarks/bench_scale.py``, ``benchmarks/bench_slab.py``): a
task costs an object store four requests whatever K is (its input read, its shard, its
marker, and finishing's read of the marker), so a job makes about ``4/K`` requests per
slice plus a few per gene: 0.34 at K = 16 against 0.59 at K = 8 for a 528-slice gene.
Larger slabs also repeat fewer model calls where a gap crosses a slab boundary. A task
holds K slices (16 RGB 320 x 456 float32 slices: 28 MB), and a coronal plane's reader
fetches one slab-deep row of inner chunks (1.3 MB of a grey gene).

The shard's index (offset and size of every inner chunk, little-endian uint64) carries
a CRC32C checksum of itself (zarr's default ``index_codecs``: bytes then ``crc32c``); the
inner chunks carry none. Chunks are compressed with Zstandard (``output.zstd_level``,
default 1). :class:`ShardEncoder` builds each shard in one pass, the shard zarr writes
(same inner chunks in the same order, same index; a test checks it against zarr), and
hands back its size for the task's marker. It compresses with one reused ``zstandard``
compressor per thread: creating a context per chunk, as zarr's codec does, cost about a
third more CPU on 32 x 32 tiles.

Levels ``"1"``, ``"2"``... are the multiscale pyramid (2x2x2 means, until the largest
side is at most ``output.pyramid_min``), written once per dataset by its finishing job
(a single writer; level 1 from each task's share of it, or from the in-plane
:func:`pair_sums` a task of an odd slab stored: see :mod:`atlinter_ray.finishing`).
Having one writer, each level is **one shard object** (the whole level), with the same
inner chunks as level 0 (K deep, ``h x w`` in-plane), so a viewer reads it by byte range
as it reads level 0, and the pyramid costs one PUT per level instead of one per slab (64
of a 528-slice gene's 543 requests at K = 8).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import google_crc32c
import numpy as np
import zstandard
from zarr.core.indexing import morton_order_iter

from atlinter_ray.dataset import Dataset
from atlinter_ray.errors import ConfigError

SPACE_AXES = ("z", "y", "x")
#: Slices per level-0 object along the section axis (``output.slab``).
DEFAULT_SLAB = 16
#: In-plane inner chunk ``(h, w)`` inside a shard (``output.chunks``).
DEFAULT_CHUNKS = (32, 32)
#: Zstandard's fastest level offered (``output.zstd_level``; 0 would mean its default, 3).
MIN_ZSTD_LEVEL = -7


@dataclass(frozen=True, slots=True)
class Layout:
    """The configurable part of an image's layout (``output.slab/chunks/...``)."""

    #: Slices per shard object along the section axis; a task owns whole slabs.
    slab: int = DEFAULT_SLAB
    #: In-plane inner chunk ``(h, w)`` inside each shard; None: the whole section plane.
    chunks: tuple[int, int] | None = DEFAULT_CHUNKS
    zstd_level: int = 1
    #: Pyramid levels are added until the largest side is at most this; 0: no pyramid.
    pyramid_min: int = 64

    def check(self) -> None:
        """Refuse settings that cannot work, naming the key and the fix."""
        if self.zstd_level == 0 or not MIN_ZSTD_LEVEL <= self.zstd_level <= 22:
            raise ConfigError(
                f"output.zstd_level={self.zstd_level}: choose 1 (fast) to 22 (small), or "
                f"-1 to {MIN_ZSTD_LEVEL} for Zstandard's faster modes (larger objects)"
            )
        if isinstance(self.slab, bool) or not isinstance(self.slab, int) or self.slab < 1:
            raise ConfigError(
                f"output.slab={self.slab!r}: give the slices per stored object along the "
                f"section axis as a positive integer (default {DEFAULT_SLAB})"
            )
        if self.chunks is not None and (
            len(self.chunks) != 2 or not all(isinstance(v, int) and v > 0 for v in self.chunks)
        ):
            raise ConfigError(
                f"output.chunks={list(self.chunks)}: give the in-plane inner chunk as two "
                "positive sizes [h, w], or null for whole section planes"
            )
        if self.pyramid_min < 0:
            raise ConfigError(
                f"output.pyramid_min={self.pyramid_min}: give a size >= 1, or 0 for no pyramid"
            )

    def to_json(self) -> dict[str, Any]:
        """Plain-JSON form (recorded in the image's metadata)."""
        return {"slab": self.slab, "chunks": None if self.chunks is None else list(self.chunks),
                "zstd_level": self.zstd_level, "pyramid_min": self.pyramid_min}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Layout:
        """The layout :meth:`to_json` recorded."""
        chunks = data.get("chunks")
        return cls(slab=int(data["slab"]), chunks=None if chunks is None else
                   (int(chunks[0]), int(chunks[1])), zstd_level=int(data["zstd_level"]),
                   pyramid_min=int(data["pyramid_min"]))


DEFAULT_LAYOUT = Layout()


@dataclass(frozen=True, slots=True)
class ArraySpec:
    """Shape, shard and inner-chunk shapes and dimension names of one level."""

    shape: tuple[int, ...]
    #: Inner chunk shape (what a reader fetches by byte range).
    chunks: tuple[int, ...]
    #: Shard shape: one stored object, the whole plane wide; one slab deep at level 0,
    #: the whole level at pyramid levels.
    shards: tuple[int, ...]
    dims: tuple[str, ...]


def array_spec(ds: Dataset, layout: Layout, space: Sequence[int] | None = None) -> ArraySpec:
    """A level of ``ds`` under ``layout``: level 0, or a pyramid level of ``(z, y, x)`` ``space``.

    Inner chunks are ``layout.slab`` slices deep along the section axis and
    ``layout.chunks`` in-plane. Level 0's shards are one slab deep (a task's object) and
    hold the whole plane; a pyramid level's one shard holds the whole level.
    """
    shape = list(space if space is not None else ds.reference_shape)
    plane = [n for i, n in enumerate(shape) if i != ds.axis_index]
    inner = list(layout.chunks) if layout.chunks else plane
    inner = [min(c, n) for c, n in zip(inner, plane)]
    outer = [math.ceil(n / c) * c for c, n in zip(inner, plane)]  # whole tiles per shard
    depth = min(layout.slab, shape[ds.axis_index])
    chunks, shards = list(inner), list(outer)
    chunks.insert(ds.axis_index, depth)
    shards.insert(ds.axis_index, depth if space is None
                  else math.ceil(shape[ds.axis_index] / depth) * depth)
    lead = (ds.channels,) if ds.channels > 1 else ()
    dims = (("c",) if lead else ()) + SPACE_AXES
    return ArraySpec(shape=(*lead, *shape), chunks=(*lead, *chunks),
                     shards=(*lead, *shards), dims=dims)


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


def key_slab(key: str, axis_index: int) -> int:
    """The slab (shard index along the section axis) a level-0 object key holds."""
    grid = key.split("/")[1:]
    return int(grid[len(grid) - 3 + axis_index])


class ShardEncoder:
    """Encodes whole shards as zarr's ``sharding_indexed`` codec stores them.

    Only for the layout this package creates (inner chunks: bytes codec then Zstandard;
    index: bytes codec then CRC32C, at the end of the shard); :func:`shard_encoder`
    refuses anything else. Every inner chunk is stored, zeros included, in zarr's order
    (Morton order of the chunk grid); the index lists ``(offset, size)`` per inner chunk
    in C order, little-endian uint64, followed by its CRC32C.
    """

    def __init__(self, shards: tuple[int, ...], chunks: tuple[int, ...],
                 dtype: np.dtype[Any], level: int, checksum: bool) -> None:
        self.shards, self.chunks = shards, chunks
        self.grid = tuple(s // c for s, c in zip(shards, chunks))
        self.dtype = dtype.newbyteorder("<") if dtype.itemsize > 1 else dtype
        self.level, self.checksum = level, checksum
        self._local = threading.local()

    def _compressor(self) -> zstandard.ZstdCompressor:
        """This thread's compressor (one is reused: creating one per chunk costs more
        than compressing a 32 x 32 tile; they are not thread-safe)."""
        if not hasattr(self._local, "zstd"):
            self._local.zstd = zstandard.ZstdCompressor(
                level=self.level, write_checksum=self.checksum, write_content_size=True)
        compressor: zstandard.ZstdCompressor = self._local.zstd
        return compressor

    def encode(self, block: np.ndarray) -> bytes:
        """Bytes of the shard holding ``block`` (its origin at the shard's; zeros beyond)."""
        if block.shape != self.shards:
            full = np.zeros(self.shards, dtype=self.dtype)
            full[tuple(slice(0, n) for n in block.shape)] = block
            block = full
        # one copy into (grid..., chunk...) order makes every inner chunk contiguous
        split = [n for pair in zip(self.grid, self.chunks) for n in pair]
        order = [*range(0, 2 * len(self.grid), 2), *range(1, 2 * len(self.grid), 2)]
        tiles = np.ascontiguousarray(block.reshape(split).transpose(order), dtype=self.dtype)
        parts: list[bytes] = []
        index = np.empty((*self.grid, 2), dtype="<u8")
        offset = 0
        compress = self._compressor().compress
        for cell in morton_order_iter(self.grid):
            blob = compress(tiles[cell].data)
            index[cell] = (offset, len(blob))
            offset += len(blob)
            parts.append(blob)
        table = index.tobytes()
        parts += [table, np.uint32(google_crc32c.value(table)).tobytes()]
        return b"".join(parts)

    def decode(self, blob: bytes) -> np.ndarray:
        """The shard's ``shards``-shaped block; ValueError when the bytes are not one.

        Inner chunks the index marks empty read as zeros (the fill value).
        """
        cells = int(np.prod(self.grid))
        if len(blob) < 16 * cells + 4:
            raise ValueError(f"a shard of {len(blob)} bytes cannot hold its index")
        table = blob[-4 - 16 * cells : -4]
        if np.uint32(google_crc32c.value(table)).tobytes() != blob[-4:]:
            raise ValueError("the shard's index fails its CRC32C")
        index = np.frombuffer(table, dtype="<u8").reshape(*self.grid, 2)
        block = np.zeros(self.shards, dtype=self.dtype)
        unzstd = zstandard.ZstdDecompressor()
        size = int(np.prod(self.chunks)) * self.dtype.itemsize
        for cell in np.ndindex(*self.grid):
            offset, nbytes = (int(v) for v in index[cell])
            if offset == nbytes == 2**64 - 1:
                continue
            raw = unzstd.decompress(blob[offset : offset + nbytes], max_output_size=size)
            where = tuple(slice(i * c, (i + 1) * c) for i, c in zip(cell, self.chunks))
            try:
                block[where] = np.frombuffer(raw, dtype=self.dtype).reshape(self.chunks)
            except ValueError as exc:
                raise ValueError(f"inner chunk {cell} holds {len(raw)} bytes: {exc}") from exc
        return block


def shard_encoder(metadata: Any) -> ShardEncoder:
    """A :class:`ShardEncoder` for a zarr v3 array's metadata; ValueError if not our layout."""
    from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec, ZstdCodec
    from zarr.codecs.sharding import ShardingCodecIndexLocation
    from zarr.core.chunk_key_encodings import DefaultChunkKeyEncoding

    codecs = list(getattr(metadata, "codecs", ()))
    sharding = codecs[0] if len(codecs) == 1 else None
    encoding = getattr(metadata, "chunk_key_encoding", None)

    def little(codec: Any) -> bool:
        return isinstance(codec, BytesCodec) and getattr(codec.endian, "value",
                                                         "little") == "little"

    if (
        not isinstance(sharding, ShardingCodec)
        or len(sharding.codecs) != 2 or not little(sharding.codecs[0])
        or not isinstance(sharding.codecs[1], ZstdCodec)
        or len(sharding.index_codecs) != 2 or not little(sharding.index_codecs[0])
        or not isinstance(sharding.index_codecs[1], Crc32cCodec)
        or sharding.index_location != ShardingCodecIndexLocation.end
        or not isinstance(encoding, DefaultChunkKeyEncoding) or encoding.separator != "/"
    ):
        raise ValueError(f"not a layout of this package: codecs {codecs}")
    zstd = sharding.codecs[1]
    return ShardEncoder(tuple(metadata.chunk_grid.chunk_shape), tuple(sharding.chunk_shape),
                        np.dtype(metadata.dtype.to_native_dtype()), zstd.level, zstd.checksum)
