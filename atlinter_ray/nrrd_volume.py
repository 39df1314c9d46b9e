"""NRRD volumes as the Allen Institute ships the CCF (``ara_nissl_25.nrrd``), via pynrrd.

Allen's 25 µm volumes list ``sizes: 528 320 456`` with the first axis fastest in the file.
pynrrd's default (Fortran) index order returns them with shape ``(528, 320, 456)``:
anterior-posterior × dorsal-ventral × left-right, the reference orientation every part of
this package uses, as the predecessor read it (``nrrd.read(path)``). :func:`nrrd_to_npy`
rewrites such a volume as a C-ordered ``.npy``, which workers can read slice by slice
(:mod:`atlinter_ray.reference`) instead of decompressing the whole volume each.
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np

from atlinter_ray.dataset import NPY_FORMAT, SUPPORTED_DTYPES
from atlinter_ray.errors import DatasetError, DatasetNotFoundError
from atlinter_ray.files import open_atomic

#: Bytes hashed per read when streaming a file through sha256.


@dataclass(frozen=True, slots=True)
class NrrdInfo:
    """What a NRRD header says about its volume."""

    shape: tuple[int, ...]
    #: The NRRD ``type`` field (``float``, ``unsigned char``, ...).
    type: str
    encoding: str


def _header(fh: Any, url: str) -> dict[str, Any]:
    """The parsed header of an open NRRD file, or a DatasetError naming the file."""
    import nrrd

    try:
        header: dict[str, Any] = nrrd.read_header(fh)
    except (nrrd.NRRDError, UnicodeDecodeError, ValueError) as exc:
        raise DatasetError(
            f"{url}: not a readable NRRD file ({exc}). Fix: download the volume again "
            "(Allen ships ara_nissl_25.nrrd), or save it as .npy with numpy.save."
        ) from exc
    if "data file" in header or "datafile" in header:
        raise DatasetError(
            f"{url}: a detached NRRD header (its data lies in another file). Fix: give a "
            ".nrrd with the data attached, or a .npy."
        )
    return header


def read_nrrd_info(url: str, storage_options: Mapping[str, Any]) -> NrrdInfo:
    """Shape, dtype and encoding of the NRRD volume at ``url``, from its header only."""
    try:
        with fsspec.open(url, "rb", **storage_options) as f:
            header = _header(f, url)
    except FileNotFoundError as exc:
        raise DatasetNotFoundError(
            f"{url}: NRRD volume not found. Fix: check the path or URL (the download job "
            "fetches the Nissl with nissl=true)."
        ) from exc
    shape = tuple(int(s) for s in header["sizes"])
    return NrrdInfo(shape=shape, type=str(header.get("type", "")),
                    encoding=str(header.get("encoding", "")))


def read_nrrd(data: bytes, url: str) -> np.ndarray:
    """The whole volume in ``data`` (a NRRD file's bytes), in reference orientation."""
    import nrrd

    fh = io.BytesIO(data)
    header = _header(fh, url)
    try:
        volume = nrrd.read_data(header, fh)
    except (nrrd.NRRDError, ValueError, EOFError, OSError, zlib.error) as exc:  # truncated, bad gzip
        raise DatasetError(
            f"{url}: the NRRD data cannot be read ({exc}). Fix: download the file again."
        ) from exc
    return np.asarray(volume)


def nrrd_to_npy(
    url: str,
    storage_options: Mapping[str, Any],
    out_url: str,
    out_storage_options: Mapping[str, Any],
) -> tuple[tuple[int, ...], str]:
    """Rewrite the NRRD volume at ``url`` as a C-ordered ``.npy`` at ``out_url``, atomically.

    The volume is written a leading-axis plane at a time, so the rewrite holds one copy of
    it in memory. Types numpy's ``.npy`` readers here do not take (int16, ...) become float32.
    """
    try:
        with fsspec.open(url, "rb", **storage_options) as f:
            data = f.read()
    except FileNotFoundError as exc:
        raise DatasetNotFoundError(f"{url}: NRRD volume not found. Fix: check the path or URL.") from exc
    volume = read_nrrd(data, url)
    del data
    dtype = volume.dtype.newbyteorder("=")
    if dtype.name not in SUPPORTED_DTYPES:
        dtype = np.dtype(np.float32)
    header = {"descr": NPY_FORMAT.dtype_to_descr(dtype), "fortran_order": False,
              "shape": volume.shape}
    fs, path = fsspec.core.url_to_fs(out_url, **dict(out_storage_options))
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with open_atomic(fs, path) as f:
        NPY_FORMAT.write_array_header_1_0(f, header)
        for plane in volume:
            f.write(np.ascontiguousarray(plane, dtype=dtype).tobytes())
    return volume.shape, dtype.name
