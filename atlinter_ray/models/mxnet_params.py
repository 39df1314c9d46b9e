"""Read MXNet NDArray list files (Gluon ``.params``) without MXNet.

MXNet 1.x saves a list of arrays (``mx.nd.save``, ``ParameterDict.save``,
``Block.save_parameters``) in one little-endian binary layout, checked against
mxnet 1.9.1's ``NDArray::Save``/``Load``, ``Tuple::Save`` and ``Context::Save``::

    u64 0x112 (list magic) | u64 0 (reserved) | u64 N
    N records, one per array:
        u32 magic: 0xF993FAC9 (V2), 0xF993FACA (V3, NumPy shape semantics),
                   0xF993FAC8 (V1), anything else = legacy (the u32 is ndim)
        V2/V3: i32 storage type (0 = dense)
        shape: V1/V2/V3: i32 ndim + ndim x i64; legacy: ndim x u32
               no data follows when the shape is unknown (V2/V1/legacy ndim 0,
               V3 ndim -1); V3 ndim 0 is a scalar holding one element
        i32 dev_type, i32 dev_id | i32 type flag | raw C-order data
    u64 K (K == N, or 0 for an unnamed list) | K x (u64 length, UTF-8 bytes)

MXNet itself is never imported: mxnet 1.9.1 needs numpy <= 1.23.5 and cannot share a
process with zarr 3. Every malformed input (bad magic, truncation, trailing bytes,
sparse storage, unknown dtype, duplicate names) is a :class:`CheckpointError` naming
the file, the byte offset and the array.

Example::

    arrays, sha256 = read_params("maskflownet.params")
    arrays["dc_conv7weight"].shape  # (2, 32, 3, 3)
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import Any

import numpy as np

from atlinter_ray.errors import CheckpointError
from atlinter_ray.models.checkpoint import fetch_bytes

LIST_MAGIC = 0x112
NDARRAY_V1_MAGIC = 0xF993FAC8
NDARRAY_V2_MAGIC = 0xF993FAC9
NDARRAY_V3_MAGIC = 0xF993FACA

# mshadow type flags -> little-endian numpy dtypes.
DTYPES: dict[int, np.dtype] = {
    0: np.dtype("<f4"),
    1: np.dtype("<f8"),
    2: np.dtype("<f2"),
    3: np.dtype("u1"),
    4: np.dtype("<i4"),
    5: np.dtype("i1"),
    6: np.dtype("<i8"),
    7: np.dtype("?"),
}
_STORAGE_NAMES = {1: "row_sparse", 2: "csr"}


class _Cursor:
    """Reads little-endian fields from a byte buffer; truncation is a clear error."""

    def __init__(self, data: bytes, url: str) -> None:
        self.data = memoryview(data)
        self.pos = 0
        self.url = url

    def take(self, size: int, what: str) -> memoryview:
        """The next ``size`` bytes, or a truncation error naming ``what``."""
        end = self.pos + size
        if size < 0 or end > len(self.data):
            raise CheckpointError(
                f"MXNet params file {self.url} is truncated: needs {size} bytes for "
                f"{what} at byte {self.pos}, but the file has {len(self.data)} bytes; "
                "download the file again"
            )
        chunk = self.data[self.pos : end]
        self.pos = end
        return chunk

    def unpack(self, fmt: str, what: str) -> tuple[Any, ...]:
        """Unpack the struct format ``fmt`` (little-endian) read for ``what``."""
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt), what))

    def u64(self, what: str) -> int:
        """One unsigned 64-bit integer."""
        value: int = self.unpack("Q", what)[0]
        return value


def _read_shape(cur: _Cursor, magic: int, what: str) -> tuple[int, ...] | None:
    """A record's shape, or None when it marks an empty ("none") array."""
    if magic in (NDARRAY_V1_MAGIC, NDARRAY_V2_MAGIC, NDARRAY_V3_MAGIC):
        (ndim,) = cur.unpack("i", f"{what} ndim")
        if magic == NDARRAY_V3_MAGIC and ndim == -1:
            return None
        if magic != NDARRAY_V3_MAGIC and ndim == 0:
            return None
        if not 0 <= ndim <= 32:
            raise CheckpointError(
                f"MXNet params file {cur.url}: {what} has ndim {ndim} at byte "
                f"{cur.pos - 4}; the file is corrupt"
            )
        dims = cur.unpack(f"{ndim}q", f"{what} shape") if ndim else ()
    else:  # legacy record: the u32 already read is ndim, dims are u32
        ndim = magic
        if ndim > 32:
            raise CheckpointError(
                f"MXNet params file {cur.url}: {what} starts with 0x{magic:08X} at byte "
                f"{cur.pos - 4}, which is neither an NDArray magic number nor a rank; "
                "the file is corrupt"
            )
        if ndim == 0:
            return None
        dims = cur.unpack(f"{ndim}I", f"{what} shape")
    if any(d < 0 for d in dims):
        raise CheckpointError(
            f"MXNet params file {cur.url}: {what} has unknown dimensions {dims}; "
            "only fully known shapes can hold data"
        )
    return tuple(int(d) for d in dims)


def _read_array(cur: _Cursor, index: int) -> np.ndarray:
    """One NDArray record as a numpy array (an empty float32 array for "none")."""
    what = f"array {index}"
    start = cur.pos
    (magic,) = cur.unpack("I", f"{what} magic")
    if magic in (NDARRAY_V2_MAGIC, NDARRAY_V3_MAGIC):
        (stype,) = cur.unpack("i", f"{what} storage type")
        if stype != 0:
            kind = _STORAGE_NAMES.get(stype, f"storage type {stype}")
            raise CheckpointError(
                f"MXNet params file {cur.url}: {what} (byte {start}) is {kind}; only "
                "dense arrays are supported (save it with .tostype('default'))"
            )
    shape = _read_shape(cur, magic, what)
    if shape is None:
        return np.empty((0,), dtype=np.float32)
    cur.unpack("ii", f"{what} context")
    (flag,) = cur.unpack("i", f"{what} type flag")
    if flag not in DTYPES:
        raise CheckpointError(
            f"MXNet params file {cur.url}: {what} (byte {start}) has type flag {flag}; "
            f"supported: {', '.join(f'{k}={v.name}' for k, v in DTYPES.items())}"
        )
    dtype = DTYPES[flag]
    count = int(np.prod(shape, dtype=np.int64))
    raw = cur.take(count * dtype.itemsize, f"{what} data ({shape}, {dtype.name})")
    return np.frombuffer(raw, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


def parse_ndarray_list(data: bytes, url: str = "<bytes>") -> tuple[list[str], list[np.ndarray]]:
    """Names (empty for an unnamed list) and arrays of an NDArray list file's bytes."""
    cur = _Cursor(data, url)
    if len(data) < 8:
        raise CheckpointError(
            f"MXNet params file {url} is truncated: {len(data)} bytes, shorter than its "
            "header; download the file again"
        )
    (magic,) = cur.unpack("Q", "list magic")
    if magic != LIST_MAGIC:
        hint = ""
        if bytes(data[:2]) == b"PK" or bytes(data[:1]) == b"\x80":
            hint = " (it looks like a torch checkpoint: check model.name)"
        raise CheckpointError(
            f"{url} is not an MXNet NDArray list file: magic 0x{magic:X}, expected "
            f"0x{LIST_MAGIC:X}{hint}"
        )
    cur.u64("reserved field")
    count = cur.u64("array count")
    if count > len(data):  # every record takes several bytes
        raise CheckpointError(
            f"MXNet params file {url} claims {count} arrays in {len(data)} bytes; the "
            "file is corrupt"
        )
    arrays = [_read_array(cur, i) for i in range(count)]
    n_names = cur.u64("name count")
    if n_names not in (0, count):
        raise CheckpointError(
            f"MXNet params file {url} has {count} arrays but {n_names} names; the file "
            "is corrupt"
        )
    names = []
    for i in range(n_names):
        length = cur.u64(f"length of name {i}")
        raw = bytes(cur.take(length, f"name {i}"))
        try:
            names.append(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise CheckpointError(
                f"MXNet params file {url}: name {i} is not UTF-8 ({exc}); the file is "
                "corrupt"
            ) from exc
    if cur.pos != len(data):
        raise CheckpointError(
            f"MXNet params file {url} has {len(data) - cur.pos} unexpected bytes after "
            f"its last name (byte {cur.pos}); the file is corrupt or not a params file"
        )
    return names, arrays


def params_from_bytes(data: bytes, url: str = "<bytes>") -> dict[str, np.ndarray]:
    """Name -> array of a named NDArray list file's bytes (a Gluon ``.params``)."""
    names, arrays = parse_ndarray_list(data, url)
    if arrays and not names:
        raise CheckpointError(
            f"MXNet params file {url} holds {len(arrays)} unnamed arrays (saved from a "
            "list); parameters need names: save a dict"
        )
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise CheckpointError(
            f"MXNet params file {url} repeats the names {', '.join(duplicates[:10])}"
        )
    return dict(zip(names, arrays))


def read_params(
    url: str, storage_options: Mapping[str, Any] | None = None
) -> tuple[dict[str, np.ndarray], str]:
    """Read a ``.params`` file from a path or fsspec URL; return its arrays and sha256."""
    data, digest = fetch_bytes(url, storage_options, "maskflownet.params")
    return params_from_bytes(data, url), digest
