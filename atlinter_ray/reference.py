"""Reference volumes for the reference-guided mode: validation and slice reads.

With ``interpolation.reference`` set, every predicted gene slice ``s`` is its nearest
known section moved along the flow between the reference's slices ``s`` and that
section (:mod:`atlinter_ray.models.reference_guided`). The reference is a plain
``.npy`` in reference orientation, the whole volume the datasets live in: shape
``reference_shape`` (grayscale, the normal case, e.g. the Nissl) or
``reference_shape + (3,)`` (RGB); either works with grayscale and RGB genes, since
only its flow is used. :func:`load_reference` validates it on the driver before any
Ray work; workers read only the slices a task needs with
:func:`read_reference_slices`: seeks for coronal slices (contiguous planes), a
memory map (local files) or a bounded stream of planes (other URLs) for sagittal ones.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import fsspec
import numpy as np

from atlinter_ray.dataset import (
    SUPPORTED_DTYPES,
    Dataset,
    NpyLayout,
    field_error,
    finite_peak,
    read_npy_header,
    read_planes,
)
from atlinter_ray.errors import DatasetError, DatasetNotFoundError
from atlinter_ray.files import is_local

FIELD = "interpolation.reference"
#: Bytes of leading-axis planes held at once when streaming a remote volume.
STREAM_BLOCK_BYTES = 16 * 1024**2


@dataclass(frozen=True, slots=True)
class ReferenceVolume:
    """Validated description of a reference volume ``.npy`` (no pixel data)."""

    url: str
    shape: tuple[int, int, int]
    channels: int
    #: The volume's dtype in native byte order.
    dtype: str
    layout: NpyLayout
    #: Value of full intensity: the integer maximum, or the largest value of float data
    #: (it only scales the flow models' input).
    peak: float = 1.0
    storage_options: Mapping[str, Any] = field(default_factory=dict)


def reference_provenance(url: str) -> dict[str, str]:
    """What a reference-guided run records per predicted slice and in its fingerprint."""
    return {"mode": "reference-guided", "reference": url}


def load_reference(
    url: str,
    datasets: Sequence[Dataset],
    storage_options: Mapping[str, Any] | None = None,
    setting: str = FIELD,
) -> ReferenceVolume:
    """Open and validate the reference volume at ``url`` against every dataset's shape.

    Errors name ``setting``, the setting that gave ``url``.
    """
    opts = dict(storage_options or {})
    if not url.endswith(".npy"):
        raise field_error(url, setting, "not a .npy file",
                          "save the reference volume with numpy.save and give its .npy path")
    try:
        layout = read_npy_header(url, opts)
    except DatasetNotFoundError as exc:
        raise DatasetNotFoundError(
            f"{url}: field {setting!r}: reference volume not found. Fix: give the path or "
            "URL of an existing .npy (storage options come from data.storage_options), "
            f"or set {setting}=null."
        ) from exc
    except DatasetError as exc:
        raise DatasetError(f"{setting}: {exc}") from exc
    shape, dtype = layout.shape, layout.dtype
    if dtype.name not in SUPPORTED_DTYPES:
        raise field_error(url, setting, f"unsupported dtype {dtype.name}",
                          f"convert the volume to one of {', '.join(SUPPORTED_DTYPES)}")
    for ds in datasets:
        if shape not in (ds.reference_shape, (*ds.reference_shape, 3)):
            raise field_error(
                url, setting,
                f"volume shape {shape} does not match dataset {ds.id}'s reference shape "
                f"{ds.reference_shape}",
                f"give the whole reference volume in reference orientation, shape "
                f"{ds.reference_shape} (grayscale) or {(*ds.reference_shape, 3)} (RGB)",
            )
    ref = ReferenceVolume(
        url=url, shape=(shape[0], shape[1], shape[2]), channels=3 if len(shape) == 4 else 1,
        dtype=dtype.name, layout=layout, storage_options=opts,
    )
    if dtype.kind == "u":
        peak = float(np.iinfo(dtype).max)
    else:
        peak = finite_peak(
            _iter_planes(ref),
            lambda i: field_error(url, setting, f"slice {i} along axis 0 contains NaN or inf",
                                  "replace non-finite values (e.g. numpy.nan_to_num) "
                                  "and re-save"),
        )
    return replace(ref, peak=peak)


def read_reference_slices(
    ref: ReferenceVolume, axis_index: int, slices: Sequence[int]
) -> np.ndarray:
    """Reference slices ``(k, C, H, W)`` along ``axis_index`` (0 or 2), stored dtype."""
    if axis_index == 0:
        return read_planes(ref.url, ref.storage_options, ref.layout, slices)
    if axis_index != 2:
        raise ValueError(f"reference slices along axis {axis_index}: only 0 and 2 exist")
    fs, path = fsspec.core.url_to_fs(ref.url, **ref.storage_options)
    if is_local(fs):
        volume = np.load(path, mmap_mode="r")  # strided read: only the wanted columns
        picked = np.take(volume, list(slices), axis=2)  # (D0, D1, k[, 3])
        return np.ascontiguousarray(_columns_to_kchw(picked, ref.channels), dtype=ref.dtype)
    d0, d1, _ = ref.shape
    out = np.empty((len(slices), ref.channels, d0, d1), dtype=ref.dtype)
    start = 0
    for block in _iter_plane_blocks(ref):  # (b, C, D1, D2)
        out[:, :, start : start + len(block)] = np.moveaxis(
            block[..., list(slices)], -1, 0
        ).swapaxes(1, 2)
        start += len(block)
    return out


def _columns_to_kchw(picked: np.ndarray, channels: int) -> np.ndarray:
    """``(D0, D1, k[, C])`` columns of a channels-last volume -> ``(k, C, D0, D1)``."""
    if channels == 1:
        return np.moveaxis(picked, 2, 0)[:, None]
    return np.transpose(picked, (2, 3, 0, 1))


def _iter_plane_blocks(ref: ReferenceVolume) -> Iterator[np.ndarray]:
    """Every leading-axis plane ``(b, C, D1, D2)``, ``STREAM_BLOCK_BYTES`` at a time."""
    d0, d1, d2 = ref.shape
    per_block = max(1, STREAM_BLOCK_BYTES // (d1 * d2 * ref.channels * np.dtype(ref.dtype).itemsize))
    for start in range(0, d0, per_block):
        yield read_planes(ref.url, ref.storage_options, ref.layout,
                          range(start, min(start + per_block, d0)))


def _iter_planes(ref: ReferenceVolume) -> Iterator[np.ndarray]:
    """Every leading-axis plane ``(C, D1, D2)`` in file order, a block at a time."""
    for block in _iter_plane_blocks(ref):
        yield from block
