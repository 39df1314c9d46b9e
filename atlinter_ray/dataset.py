"""Gene datasets: the predecessor's ``<experiment>.npy`` + ``<experiment>.json`` layout.

A dataset is one gene experiment: section images, the reference-space slice number
of each section, the section axis and the reference volume shape. :func:`load_dataset`
validates everything it can before any Ray work starts and returns a small, frozen
:class:`Dataset` descriptor; workers then read only the sections they need with
:func:`read_sections` (a seek into the ``.npy`` file), so a volume is never held in
memory, let alone in float64 as the predecessor did.

Images are stored ``(n, H, W)`` (grayscale) or ``(n, H, W, 3)`` (RGB) in the order of
``section_numbers``; ``(H, W)`` is the reference plane for the axis: for ``coronal``
(axis 0 of the 25 µm CCF, 528 × 320 × 456) images are 320 × 456, for ``sagittal``
(axis 2) they are 528 × 320. The json may carry ``reference_shape`` (our extension)
for volumes that are not the CCF.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import fsspec
import numpy as np

from atlinter_ray.errors import DatasetError, DatasetNotFoundError

#: Section axis name -> index of that axis in the reference volume.
AXES: dict[str, int] = {"coronal": 0, "sagittal": 2}
CCF_25UM_SHAPE: tuple[int, int, int] = (528, 320, 456)
SUPPORTED_DTYPES = ("uint8", "uint16", "float32", "float64")
_NPY_HEADER_MAX = 65536


@dataclass(frozen=True, slots=True)
class Dataset:
    """Validated description of one gene experiment (no pixel data)."""

    id: str
    images_url: str
    metadata_url: str
    section_numbers: tuple[int, ...]
    axis: str
    reference_shape: tuple[int, int, int]
    channels: int
    dtype: str
    data_offset: int
    #: Value of full intensity: the integer maximum, or the largest value of float data.
    peak: float = 1.0
    storage_options: Mapping[str, Any] = field(default_factory=dict)
    metadata: Mapping[str, Any] = field(default_factory=dict)

    @property
    def axis_index(self) -> int:
        """Index of the section axis in the reference volume."""
        return AXES[self.axis]

    @property
    def n_slices(self) -> int:
        """Number of slices along the section axis."""
        return self.reference_shape[self.axis_index]

    @property
    def image_shape(self) -> tuple[int, int]:
        """``(H, W)`` of one section: the reference plane for the axis."""
        shape = list(self.reference_shape)
        del shape[self.axis_index]
        return shape[0], shape[1]

    @property
    def section_bytes(self) -> int:
        """Size in bytes of one stored section image."""
        h, w = self.image_shape
        return h * w * self.channels * np.dtype(self.dtype).itemsize


def dataset_urls(url: str) -> tuple[str, str, str]:
    """``(id, images_url, metadata_url)`` for a dataset given by any of its paths."""
    base = url
    for suffix in (".npy", ".json"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
    dataset_id = base.rstrip("/").rsplit("/", 1)[-1]
    return dataset_id, base + ".npy", base + ".json"


def field_error(url: str, field_name: str, problem: str, fix: str) -> DatasetError:
    """The error for a bad ``field_name`` of the file at ``url``: what, where and the fix."""
    return DatasetError(f"{url}: field {field_name!r}: {problem}. Fix: {fix}.")


def _read_metadata(url: str, storage_options: Mapping[str, Any]) -> dict[str, Any]:
    try:
        with fsspec.open(url, "rt", **storage_options) as f:
            text = f.read()
    except FileNotFoundError as exc:
        raise DatasetNotFoundError(
            f"{url}: metadata file not found. Fix: put <experiment>.json with "
            "'section_numbers' and 'axis' next to <experiment>.npy."
        ) from exc
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetError(
            f"{url}: not valid JSON ({exc}). Fix: rewrite the file as a JSON object "
            "with 'section_numbers' and 'axis'."
        ) from exc
    if not isinstance(meta, dict):
        raise DatasetError(f"{url}: expected a JSON object, found {type(meta).__name__}.")
    return meta


def read_npy_header(
    url: str, storage_options: Mapping[str, Any]
) -> tuple[tuple[int, ...], np.dtype, int, int]:
    """Shape, dtype, data offset and file size of a ``.npy`` file, reading its header."""
    try:
        fs, path = fsspec.core.url_to_fs(url, **storage_options)
        size = fs.size(path)
        with fs.open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            shape, fortran, dtype = read_header(f, max_header_size=_NPY_HEADER_MAX)
            offset = f.tell()
    except FileNotFoundError as exc:
        raise DatasetNotFoundError(
            f"{url}: image file not found. Fix: check data.root / data.genes, or the "
            "dataset URL; images must be <experiment>.npy next to <experiment>.json."
        ) from exc
    except (ValueError, EOFError, OSError) as exc:
        raise DatasetError(
            f"{url}: unreadable .npy file ({exc}). Fix: re-save the array with "
            "numpy.save."
        ) from exc
    if fortran:
        raise field_error(url, "fortran_order", "Fortran-ordered arrays are not supported",
                    "re-save with numpy.save(np.ascontiguousarray(images))")
    return tuple(shape), dtype, offset, size


def _check_sections(url: str, sections: Any, n: int, n_slices: int, axis: str) -> None:
    if not isinstance(sections, list) or not all(
        isinstance(s, int) and not isinstance(s, bool) for s in sections
    ):
        raise field_error(url, "section_numbers", "must be a list of integers",
                    "write the reference-space slice index of each image")
    if len(sections) != n:
        raise field_error(url, "section_numbers",
                    f"{len(sections)} numbers for {n} images in the .npy file",
                    "give exactly one section number per image, in image order")
    if len(sections) < 2:
        raise field_error(url, "section_numbers", f"only {len(sections)} section(s)",
                    "interpolation needs at least two known sections")
    dupes = sorted({s for s in sections if sections.count(s) > 1})
    if dupes:
        raise field_error(url, "section_numbers", f"duplicate section numbers {dupes}",
                    "keep one image per section number")
    bad = [s for s in sections if s < 0 or s >= n_slices]
    if bad:
        raise field_error(url, "section_numbers",
                    f"{bad} outside 0..{n_slices - 1} along the {axis} axis",
                    "check the slice numbers or data.reference_shape")


def finite_peak(planes: Iterable[np.ndarray], non_finite: Callable[[int], DatasetError]) -> float:
    """Largest value of float planes scanned one at a time; ``non_finite(i)`` on NaN/inf."""
    peak = 0.0
    for i, plane in enumerate(planes):
        if not np.isfinite(plane).all():
            raise non_finite(i)
        peak = max(peak, float(plane.max()))
    return peak if peak > 0 else 1.0


def _float_peak(ds: Dataset) -> float:
    """Scan float images section by section (bounded memory): reject NaN/inf, find max."""
    return finite_peak(
        iter_sections(ds),
        lambda i: field_error(ds.images_url, f"images[{i}]",
                              f"section {ds.section_numbers[i]} contains NaN or inf",
                              "replace non-finite values (e.g. numpy.nan_to_num) and re-save"),
    )


def load_dataset(
    url: str,
    reference_shape: tuple[int, int, int] | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> Dataset:
    """Open and validate the dataset at ``url`` (``.npy``, ``.json`` or their stem).

    ``reference_shape`` applies unless the json gives its own; default: the 25 µm CCF.
    Raises :class:`~atlinter_ray.errors.DatasetError` naming the file, the field and
    the fix for every problem found.
    """
    opts = dict(storage_options or {})
    dataset_id, images_url, metadata_url = dataset_urls(url)
    meta = _read_metadata(metadata_url, opts)

    axis = meta.get("axis")
    if axis not in AXES:
        raise field_error(metadata_url, "axis", f"unknown axis {axis!r}",
                    f"use one of {sorted(AXES)}")
    ref = meta.get("reference_shape", reference_shape or CCF_25UM_SHAPE)
    if (not isinstance(ref, (list, tuple)) or len(ref) != 3
            or not all(isinstance(v, int) and v > 0 for v in ref)):
        raise field_error(metadata_url, "reference_shape", f"invalid shape {ref!r}",
                    "give three positive integers (AP, DV, LR)")
    ref = tuple(int(v) for v in ref)

    shape, dtype, offset, size = read_npy_header(images_url, opts)
    if dtype.name not in SUPPORTED_DTYPES:
        raise field_error(images_url, "dtype", f"unsupported dtype {dtype.name}",
                    f"convert the images to one of {', '.join(SUPPORTED_DTYPES)}")
    if len(shape) == 4 and shape[3] == 3:
        channels = 3
    elif len(shape) == 3:
        channels = 1
    else:
        raise field_error(images_url, "shape", f"images have shape {shape}",
                    "store (n, H, W) grayscale or (n, H, W, 3) RGB sections")
    ds = Dataset(
        id=dataset_id,
        images_url=images_url,
        metadata_url=metadata_url,
        section_numbers=tuple(meta.get("section_numbers") or ()),
        axis=axis,
        reference_shape=ref,
        channels=channels,
        dtype=dtype.name,
        data_offset=offset,
        storage_options=opts,
        metadata={k: v for k, v in meta.items() if k not in ("section_numbers",)},
    )
    if tuple(shape[1:3]) != ds.image_shape:
        raise field_error(images_url, "shape",
                    f"images are {shape[1]}x{shape[2]} but the {axis} plane of a "
                    f"{ref} reference is {ds.image_shape[0]}x{ds.image_shape[1]}",
                    "align the sections to the reference space, or set "
                    "data.reference_shape (or 'reference_shape' in the json)")
    _check_sections(metadata_url, meta.get("section_numbers"), shape[0], ds.n_slices, axis)
    expected = offset + shape[0] * ds.section_bytes
    if size < expected:
        raise field_error(images_url, "data", f"file is truncated: {size} bytes, "
                    f"{expected} expected for shape {shape}", "download or save it again")
    if dtype.kind == "u":
        return replace(ds, peak=float(np.iinfo(dtype).max))
    return replace(ds, peak=_float_peak(ds))


def read_planes(
    url: str,
    storage_options: Mapping[str, Any],
    data_offset: int,
    plane: tuple[int, int, int],
    dtype: str,
    indices: Sequence[int],
) -> np.ndarray:
    """Read whole leading-axis planes ``(C, H, W)`` of a C-ordered ``.npy`` by seeking."""
    channels, h, w = plane
    nbytes = channels * h * w * np.dtype(dtype).itemsize
    out = np.empty((len(indices), channels, h, w), dtype=dtype)
    with fsspec.open(url, "rb", **storage_options) as f:
        for k, i in enumerate(indices):
            f.seek(data_offset + i * nbytes)
            out[k] = _to_chw(np.frombuffer(f.read(nbytes), dtype=dtype), channels, h, w)
    return out


def read_sections(ds: Dataset, section_numbers: list[int] | tuple[int, ...]) -> np.ndarray:
    """Read the given known sections as ``(k, C, H, W)`` in the stored dtype."""
    index = {s: i for i, s in enumerate(ds.section_numbers)}
    return read_planes(ds.images_url, ds.storage_options, ds.data_offset,
                       (ds.channels, *ds.image_shape), ds.dtype,
                       [index[s] for s in section_numbers])


def iter_sections(ds: Dataset, batch: int = 8) -> Iterator[np.ndarray]:
    """Yield every stored section ``(C, H, W)`` in file order, a few at a time."""
    for start in range(0, len(ds.section_numbers), batch):
        yield from read_sections(ds, ds.section_numbers[start : start + batch])


def _to_chw(raw: np.ndarray, channels: int, h: int, w: int) -> np.ndarray:
    if channels == 1:
        return raw.reshape(1, h, w)
    return np.moveaxis(raw.reshape(h, w, channels), -1, 0)


def section_volume_bytes(ds: Dataset) -> int:
    """Bytes of the whole reconstructed volume in the stored dtype (for planning)."""
    return math.prod(ds.reference_shape) * ds.channels * np.dtype(ds.dtype).itemsize
