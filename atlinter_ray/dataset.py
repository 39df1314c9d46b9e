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
(axis 2) they are 528 × 320. The json may carry ``reference_shape`` and
``voxel_size_um`` (our extensions) for volumes that are not the CCF.

Any ``.npy`` numpy writes is read as numpy reads it: either byte order (``>u2`` is
converted to native order on read, never reinterpreted) and C or Fortran order (a
Fortran-ordered file is memory-mapped when local; remote ones are refused with the fix,
since one section of such a file is spread over the whole file).

Full intensity (``Dataset.peak``; the models scale by it, PSNR/SSIM use it as the data
range) is stated, never estimated from the data: the dtype's maximum for integers
(255, 65535) and 1.0 for floats, whose images are taken as they are in ``[0, 1]``, the
predecessor's range. A json ``intensity_max`` (our extension) states another one (e.g.
255.0 for float images in 8-bit units, 4095 for 12-bit data in uint16); float values
above full intensity are refused.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np

from atlinter_ray.errors import DatasetError, DatasetNotFoundError
from atlinter_ray.files import is_local

#: Section axis name -> index of that axis in the reference volume.
AXES: dict[str, int] = {"coronal": 0, "sagittal": 2}
CCF_25UM_SHAPE: tuple[int, int, int] = (528, 320, 456)
SUPPORTED_DTYPES = ("uint8", "uint16", "float32", "float64")
_NPY_HEADER_MAX = 65536
#: numpy's ``.npy`` header functions, untyped: their stubs differ between numpy 2.3 and 2.4.
NPY_FORMAT: Any = np.lib.format


@dataclass(frozen=True, slots=True)
class NpyLayout:
    """How a ``.npy`` file stores its array, from its header."""

    shape: tuple[int, ...]
    #: The stored dtype with its byte order (``dtype.str``: ``<u2``, ``>f4``, ``|u1``).
    stored: str
    offset: int
    fortran: bool
    file_size: int

    @property
    def dtype(self) -> np.dtype[Any]:
        """The stored dtype in native byte order: what reads return."""
        return np.dtype(self.stored).newbyteorder("=")


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
    #: The images' dtype in native byte order (``uint16`` for a ``>u2`` file).
    dtype: str
    layout: NpyLayout
    #: Full intensity: ``intensity_max`` from the json, else the integer dtype's maximum,
    #: 1.0 for float images (see the module docstring).
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


def read_npy_header(url: str, storage_options: Mapping[str, Any]) -> NpyLayout:
    """The layout of the ``.npy`` file at ``url``, reading only its header."""
    try:
        fs, path = fsspec.core.url_to_fs(url, **storage_options)
        size = fs.size(path)
        with fs.open(path, "rb", block_size=_NPY_HEADER_MAX) as f:  # no 50 MB read-ahead
            version = NPY_FORMAT.read_magic(f)
            read_header = (
                NPY_FORMAT.read_array_header_1_0
                if version == (1, 0)
                else NPY_FORMAT.read_array_header_2_0
            )
            shape, fortran, dtype = read_header(f, max_header_size=_NPY_HEADER_MAX)
            offset = f.tell()
    except FileNotFoundError as exc:
        raise DatasetNotFoundError(
            f"{url}: image file not found. Fix: check data.root / data.genes, or the "
            "dataset URL; images must be <experiment>.npy next to <experiment>.json."
        ) from exc
    except (ValueError, EOFError, IsADirectoryError) as exc:
        # any other OSError is a failing store, not a bad file: it propagates
        raise DatasetError(
            f"{url}: unreadable .npy file ({exc}). Fix: re-save the array with "
            "numpy.save."
        ) from exc
    layout = NpyLayout(tuple(shape), dtype.str, offset, bool(fortran), size)
    expected = offset + math.prod(layout.shape) * dtype.itemsize
    if size < expected:
        raise field_error(url, "data", f"file is truncated or its header is wrong: {size} "
                          f"bytes, but the header's shape {layout.shape} of {dtype.name} "
                          f"needs {expected}", "download or save the .npy file again")
    if fortran and not is_local(fs):
        raise field_error(url, "fortran_order", "a Fortran-ordered array on remote "
                          "storage: each section is spread over the whole file",
                          "re-save it C-ordered with numpy.save(path, "
                          "numpy.ascontiguousarray(array)), or read it from a local path")
    return layout


def _check_sections(
    url: str, sections: Any, n: int, n_slices: int, axis: str, outside_ok: bool = False
) -> None:
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
    if bad and not outside_ok:
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


def _intensity_max(url: str, meta: Mapping[str, Any], dtype: np.dtype[Any]) -> float:
    """Full intensity: the json's ``intensity_max``, else 1.0 (floats) or the dtype's maximum."""
    default = float(np.iinfo(dtype).max) if dtype.kind == "u" else 1.0
    value = meta.get("intensity_max", default)
    top = np.iinfo(dtype).max if dtype.kind == "u" else math.inf
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or not 0 < value <= top or not math.isfinite(value)):
        raise field_error(url, "intensity_max", f"{value!r} is not a full intensity for "
                          f"{dtype.name} images", f"give a positive number (at most {top} "
                          "for this dtype), e.g. 255.0 for float images in 8-bit units, or "
                          "leave it out (float images are then taken in [0, 1])")
    return float(value)


def _check_float_range(ds: Dataset) -> None:
    """Scan float images section by section (bounded memory): finite and <= full intensity."""
    brightest = finite_peak(
        iter_sections(ds),
        lambda i: field_error(ds.images_url, f"images[{i}]",
                              f"section {ds.section_numbers[i]} contains NaN or inf",
                              "replace non-finite values (e.g. numpy.nan_to_num) and re-save"),
    )
    if brightest > ds.peak:
        stated = "intensity_max" in ds.metadata
        raise field_error(
            ds.metadata_url, "intensity_max",
            f"{ds.images_url} holds float values up to {brightest:g}, above full intensity "
            f"{ds.peak:g} ({'as stated' if stated else 'float images are taken in [0, 1]'})",
            "state the images' full intensity as 'intensity_max' in the json (e.g. 255.0 "
            "for 8-bit units), or scale the images to [0, 1]; it is never guessed from the "
            "data, so every run and every score uses the same scale",
        )


def load_dataset(
    url: str,
    reference_shape: tuple[int, int, int] | None = None,
    storage_options: Mapping[str, Any] | None = None,
    outside_ok: bool = False,
) -> Dataset:
    """Open and validate the dataset at ``url`` (``.npy``, ``.json`` or their stem).

    ``reference_shape`` applies unless the json gives its own; default: the 25 µm CCF.
    ``outside_ok`` accepts section numbers beyond the reference (the align job passes
    such sections through, as the predecessor did); the interpolation job refuses them.
    Raises :class:`~atlinter_ray.errors.DatasetError` naming the file, the field and
    the fix for every problem found.
    """
    opts = dict(storage_options or {})
    dataset_id, images_url, metadata_url = dataset_urls(url)
    meta = _read_metadata(metadata_url, opts)

    axis = meta.get("axis")
    if axis is None:
        raise field_error(metadata_url, "axis", "missing",
                          f'add "axis": one of {sorted(AXES)} (the sectioning plane)')
    if axis not in AXES:
        raise field_error(metadata_url, "axis", f"unknown axis {axis!r}",
                    f"use one of {sorted(AXES)}")
    ref = meta.get("reference_shape", reference_shape or CCF_25UM_SHAPE)
    if (not isinstance(ref, (list, tuple)) or len(ref) != 3
            or not all(isinstance(v, int) and v > 0 for v in ref)):
        raise field_error(metadata_url, "reference_shape", f"invalid shape {ref!r}",
                    "give three positive integers (AP, DV, LR)")
    ref = tuple(int(v) for v in ref)
    voxel = meta.get("voxel_size_um", 25.0)
    if (isinstance(voxel, bool) or not isinstance(voxel, (int, float))
            or not math.isfinite(voxel) or voxel <= 0):
        raise field_error(metadata_url, "voxel_size_um", f"{voxel!r} is not a voxel size",
                          "give one positive number of micrometres (the volume's voxels "
                          "are cubes), e.g. 25.0 for the CCF")

    layout = read_npy_header(images_url, opts)
    shape, dtype = layout.shape, layout.dtype
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
        layout=layout,
        peak=_intensity_max(metadata_url, meta, dtype),
        storage_options=opts,
        metadata={k: v for k, v in meta.items() if k not in ("section_numbers",)},
    )
    if tuple(shape[1:3]) != ds.image_shape:
        raise field_error(images_url, "shape",
                    f"images are {shape[1]}x{shape[2]} but the {axis} plane of a "
                    f"{ref} reference is {ds.image_shape[0]}x{ds.image_shape[1]}",
                    "align the sections to the reference space, or set "
                    "data.reference_shape (or 'reference_shape' in the json)")
    _check_sections(metadata_url, meta.get("section_numbers"), shape[0], ds.n_slices, axis,
                    outside_ok)
    if dtype.kind == "f":
        _check_float_range(ds)
    return ds


def read_planes(
    url: str,
    storage_options: Mapping[str, Any],
    layout: NpyLayout,
    indices: Sequence[int],
) -> np.ndarray:
    """Whole leading-axis planes ``(k, C, H, W)`` of a ``.npy``, native byte order.

    C-ordered files are read by seeking to each plane; Fortran-ordered ones (local only,
    see :func:`read_npy_header`) through a memory map.
    """
    h, w = layout.shape[1:3]
    channels = layout.shape[3] if len(layout.shape) == 4 else 1
    out = np.empty((len(indices), channels, h, w), dtype=layout.dtype)
    if layout.fortran:
        _, path = fsspec.core.url_to_fs(url, **storage_options)
        array = np.memmap(path, np.dtype(layout.stored), "r", layout.offset,
                          layout.shape, order="F")
        for k, i in enumerate(indices):
            plane = array[i]
            out[k] = plane[None] if channels == 1 else np.moveaxis(plane, -1, 0)
        return out
    stored = np.dtype(layout.stored)
    nbytes = channels * h * w * stored.itemsize
    fs, path = fsspec.core.url_to_fs(url, **storage_options)
    # one ranged read per run of neighbouring planes, all in one batch (concurrent on
    # object stores): no HEAD, no read-ahead (s3fs's file object would fetch its 50 MB
    # block after each plane), a task's two bounding sections in one GET
    runs = _runs(indices)
    blobs = fs.cat_ranges([path] * len(runs), [layout.offset + a * nbytes for a, _ in runs],
                          [layout.offset + (b + 1) * nbytes for _, b in runs], on_error="raise")
    k = 0
    for (a, b), blob in zip(runs, blobs):
        if len(blob) != (b - a + 1) * nbytes:
            raise DatasetError(
                f"{url}: planes {a}..{b} end past the end of the file, which is shorter "
                f"than its header's shape {layout.shape} says. Fix: write the file again "
                "(numpy.save) or restore it from its source."
            )
        for j in range(b - a + 1):
            out[k] = _to_chw(np.frombuffer(blob, stored, channels * h * w, j * nbytes),
                             channels, h, w)
            k += 1
    return out


def _runs(indices: Sequence[int]) -> list[tuple[int, int]]:
    """``indices`` as runs ``(first, last)`` of consecutive increasing values, in order."""
    runs: list[tuple[int, int]] = []
    for i in indices:
        if runs and i == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], i)
        else:
            runs.append((i, i))
    return runs


def read_sections(ds: Dataset, section_numbers: list[int] | tuple[int, ...]) -> np.ndarray:
    """Read the given known sections as ``(k, C, H, W)`` in the images' dtype."""
    index = {s: i for i, s in enumerate(ds.section_numbers)}
    return read_planes(ds.images_url, ds.storage_options, ds.layout,
                       [index[s] for s in section_numbers])


def iter_sections(ds: Dataset, batch: int = 8) -> Iterator[np.ndarray]:
    """Yield every stored section ``(C, H, W)`` in file order, a few at a time."""
    for start in range(0, len(ds.section_numbers), batch):
        yield from read_sections(ds, ds.section_numbers[start : start + batch])


def _to_chw(raw: np.ndarray, channels: int, h: int, w: int) -> np.ndarray:
    if channels == 1:
        return raw.reshape(1, h, w)
    return np.moveaxis(raw.reshape(h, w, channels), -1, 0)

