"""Reference volumes for the reference-guided mode: validation and slice reads.

With ``interpolation.reference`` set, predicted gene slices are made from known
sections moved along the flow between the reference's slices
(:mod:`atlinter_ray.models.reference_guided`). The reference is the whole volume the
datasets live in, in reference orientation, by path or URL, as users have it:

- a ``.npy``: shape ``reference_shape`` (grayscale, the normal case, e.g. the Nissl) or
  ``reference_shape + (3,)`` (RGB); either works with grayscale and RGB genes, since
  only its flow is used;
- a ``.nrrd`` as the Allen Institute ships the Nissl (``ara_nissl_25.nrrd``), read in
  reference orientation (:mod:`atlinter_ray.nrrd_volume`): its header is checked first,
  then it is rewritten once as a ``.npy`` in a cache folder (the interpolation job's
  ``<output.root>/_reference/``), reused while the file's sha256 is unchanged;
- an OME-Zarr (``.zarr``, e.g. another run's output): its full-resolution array ``0``,
  ``reference_shape`` or channels first ``(C,) + reference_shape``.

:func:`prepare_reference` validates it on the driver before any Ray work (shape found
and expected, named with the file and the fix); workers read only the slices a task
needs with :func:`read_reference_slices`: seeks for coronal slices (contiguous planes), a
memory map (local files) or a bounded stream of planes (other URLs) for sagittal ones,
chunk reads for OME-Zarr.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import fsspec
import numpy as np
import zarr

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
from atlinter_ray.files import file_sha256, is_local, write_atomic
from atlinter_ray.nrrd_volume import nrrd_to_npy, read_nrrd_info

log = logging.getLogger(__name__)
FIELD = "interpolation.reference"
#: File endings of the reference formats, for messages.
FORMATS = ".npy, .nrrd or OME-Zarr (.zarr)"
#: Bytes of leading-axis planes held at once when streaming a remote volume.
STREAM_BLOCK_BYTES = 16 * 1024**2


@dataclass(frozen=True, slots=True)
class ReferenceVolume:
    """Validated description of a reference volume (no pixel data)."""

    #: The reference as the user gave it (provenance, messages).
    url: str
    shape: tuple[int, int, int]
    channels: int
    #: The volume's dtype in native byte order.
    dtype: str
    #: The ``.npy`` header, or None for an OME-Zarr.
    layout: NpyLayout | None
    #: Value of full intensity: the integer maximum, or the largest value of float data
    #: (it only scales the flow models' input).
    peak: float = 1.0
    storage_options: Mapping[str, Any] = field(default_factory=dict)
    #: Where the slices are read when not at ``url``: the ``.npy`` a ``.nrrd`` was
    #: rewritten as, or an OME-Zarr's full-resolution array.
    data_url: str = ""

    @property
    def source(self) -> str:
        """The URL the slices are read from."""
        return self.data_url or self.url


def _is_zarr(url: str) -> bool:
    """True for an OME-Zarr (or zarr array) URL."""
    return url.rstrip("/").endswith((".zarr", ".zarr/0"))


def prepare_reference(
    url: str,
    datasets: Sequence[Dataset],
    storage_options: Mapping[str, Any] | None,
    cache_root: str,
    cache_storage_options: Mapping[str, Any] | None = None,
    setting: str = FIELD,
) -> ReferenceVolume:
    """The validated reference at ``url`` in any format (see the module).

    A ``.nrrd`` is checked from its header first, then rewritten once under
    ``cache_root`` (reused while its sha256 is unchanged).
    """
    opts = dict(storage_options or {})
    if _is_zarr(url):
        return load_zarr_reference(url, datasets, opts, setting)
    if not url.endswith(".nrrd"):
        return load_reference(url, datasets, opts, setting)
    try:
        info = read_nrrd_info(url, opts)
        _check_shape(url, info.shape, datasets, setting)
        sha = file_sha256(url, opts)
    except DatasetNotFoundError as exc:
        raise _not_found(url, setting) from exc
    stem = url.rstrip("/").rsplit("/", 1)[-1][: -len(".nrrd")]
    npy_url = f"{cache_root.rstrip('/')}/{stem}-{sha[:16]}.npy"
    cache_opts = dict(cache_storage_options or {})
    cache_nrrd_as_npy(url, opts, sha, npy_url, cache_opts)
    ref = load_reference(npy_url, datasets, cache_opts, setting)
    return replace(ref, url=url, data_url=npy_url)


def cache_nrrd_as_npy(
    url: str, opts: Mapping[str, Any], sha: str, npy_url: str, npy_opts: Mapping[str, Any]
) -> None:
    """Rewrite the ``.nrrd`` at ``url`` (sha256 ``sha``) as ``npy_url``, unless already done.

    A ``.json`` beside the copy records the source's hash and the copy's size, so a
    changed source or a torn copy is rewritten and an unchanged one is reused.
    """
    fs, path = fsspec.core.url_to_fs(npy_url, **npy_opts)
    marker = path[: -len(".npy")] + ".json"
    try:
        cached = json.loads(fs.cat_file(marker))
        fresh = cached.get("sha256") == sha and cached.get("npy_bytes") == fs.size(path)
    except (FileNotFoundError, ValueError, AttributeError):
        fresh = False
    if not fresh:
        log.info("rewriting %s as %s (once; reruns reuse it)", url, npy_url)
        nrrd_to_npy(url, dict(opts), npy_url, dict(npy_opts))
        write_atomic(fs, marker, json.dumps(
            {"source": url, "sha256": sha, "npy_bytes": fs.size(path)}).encode())


def load_zarr_reference(
    url: str, datasets: Sequence[Dataset], storage_options: Mapping[str, Any],
    setting: str = FIELD,
) -> ReferenceVolume:
    """Open and validate an OME-Zarr reference (its array ``0``, or the array at ``url``)."""
    array_url = url.rstrip("/") if url.rstrip("/").endswith("/0") else f"{url.rstrip('/')}/0"
    try:
        array = zarr.open_array(array_url, mode="r", storage_options=dict(storage_options) or None)
    except (FileNotFoundError, zarr.errors.NodeNotFoundError) as exc:
        raise DatasetNotFoundError(
            f"{url}: field {setting!r}: no OME-Zarr array at {array_url}. Fix: give the path "
            "or URL of an OME-Zarr whose full-resolution array is '0' (storage options come "
            f"from data.storage_options), or set {setting}=null."
        ) from exc
    shape, dtype = tuple(int(n) for n in array.shape), np.dtype(array.dtype)
    channels, spatial = (shape[0], shape[1:]) if len(shape) == 4 else (1, shape)
    if channels not in (1, 3) or len(spatial) != 3:
        raise field_error(url, setting, f"array shape {shape} is not a volume",
                          "give a (D0, D1, D2) or channels-first (C, D0, D1, D2) array, "
                          "C being 1 or 3")
    _check_shape(url, spatial if channels == 1 else (*spatial, 3), datasets, setting)
    if dtype.name not in SUPPORTED_DTYPES:
        raise field_error(url, setting, f"unsupported dtype {dtype.name}",
                          f"convert the volume to one of {', '.join(SUPPORTED_DTYPES)}")
    ref = ReferenceVolume(
        url=url, shape=(spatial[0], spatial[1], spatial[2]), channels=channels,
        dtype=dtype.name, layout=None, storage_options=dict(storage_options),
        data_url=array_url,
    )
    return replace(ref, peak=_peak(ref, url, setting))


def _check_shape(
    url: str, shape: tuple[int, ...], datasets: Sequence[Dataset], setting: str
) -> None:
    """A DatasetError naming the file, both shapes and the fix when they differ."""
    for ds in datasets:
        if shape not in (ds.reference_shape, (*ds.reference_shape, 3)):
            raise field_error(
                url, setting,
                f"volume shape {shape} does not match dataset {ds.id}'s reference shape "
                f"{ds.reference_shape}",
                f"give the whole reference volume in reference orientation, shape "
                f"{ds.reference_shape} (grayscale) or {(*ds.reference_shape, 3)} (RGB)",
            )


def _not_found(url: str, setting: str) -> DatasetNotFoundError:
    """The error for a reference that does not exist."""
    return DatasetNotFoundError(
        f"{url}: field {setting!r}: reference volume not found. Fix: give the path or "
        f"URL of an existing {FORMATS} (storage options come from data.storage_options), "
        f"or set {setting}=null."
    )


def _peak(ref: ReferenceVolume, url: str, setting: str) -> float:
    """Full intensity: the integer maximum, or the largest (finite) value of float data."""
    dtype = np.dtype(ref.dtype)
    if dtype.kind == "u":
        return float(np.iinfo(dtype).max)
    return finite_peak(
        _iter_planes(ref),
        lambda i: field_error(url, setting, f"slice {i} along axis 0 contains NaN or inf",
                              "replace non-finite values (e.g. numpy.nan_to_num) and re-save"),
    )


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
        raise field_error(url, setting, f"not a {FORMATS} file",
                          "give the reference volume in one of these formats "
                          "(e.g. numpy.save it as .npy)")
    try:
        layout = read_npy_header(url, opts)
    except DatasetNotFoundError as exc:
        raise _not_found(url, setting) from exc
    except DatasetError as exc:
        raise DatasetError(f"{setting}: {exc}") from exc
    shape, dtype = layout.shape, layout.dtype
    if dtype.name not in SUPPORTED_DTYPES:
        raise field_error(url, setting, f"unsupported dtype {dtype.name}",
                          f"convert the volume to one of {', '.join(SUPPORTED_DTYPES)}")
    _check_shape(url, shape, datasets, setting)
    ref = ReferenceVolume(
        url=url, shape=(shape[0], shape[1], shape[2]), channels=3 if len(shape) == 4 else 1,
        dtype=dtype.name, layout=layout, storage_options=opts,
    )
    return replace(ref, peak=_peak(ref, url, setting))


def read_reference_slices(
    ref: ReferenceVolume, axis_index: int, slices: Sequence[int]
) -> np.ndarray:
    """Reference slices ``(k, C, H, W)`` along ``axis_index`` (0 or 2), stored dtype."""
    if axis_index not in (0, 2):
        raise ValueError(f"reference slices along axis {axis_index}: only 0 and 2 exist")
    if ref.layout is None:
        return _zarr_slices(ref, axis_index, slices)
    if axis_index == 0:
        return read_planes(ref.source, ref.storage_options, ref.layout, slices)
    fs, path = fsspec.core.url_to_fs(ref.source, **ref.storage_options)
    if is_local(fs):
        volume = np.load(path, mmap_mode="r")  # strided read: only the wanted columns
        picked = np.take(volume, list(slices), axis=2)  # (D0, D1, k[, 3])
        return np.ascontiguousarray(_columns_to_kchw(picked, ref.channels), dtype=ref.dtype)
    d0, d1, _ = ref.shape
    out = np.empty((len(slices), ref.channels, d0, d1), dtype=ref.dtype)
    start = 0
    for block in iter_plane_blocks(ref):  # (b, C, D1, D2)
        out[:, :, start : start + len(block)] = np.moveaxis(
            block[..., list(slices)], -1, 0
        ).swapaxes(1, 2)
        start += len(block)
    return out


def _zarr_slices(ref: ReferenceVolume, axis_index: int, slices: Sequence[int]) -> np.ndarray:
    """Slices ``(k, C, H, W)`` of an OME-Zarr reference (chunk reads)."""
    array = zarr.open_array(ref.source, mode="r",
                            storage_options=dict(ref.storage_options) or None)
    lead: tuple[slice, ...] = (slice(None),) if array.ndim == 4 else ()
    planes = []
    for s in slices:
        index = (s,) if axis_index == 0 else (slice(None), slice(None), s)
        planes.append(np.asarray(array[lead + index]))
    picked = np.stack(planes)
    if picked.ndim == 3:  # (k, H, W)
        picked = picked[:, None]
    return np.ascontiguousarray(picked, dtype=ref.dtype)


def _columns_to_kchw(picked: np.ndarray, channels: int) -> np.ndarray:
    """``(D0, D1, k[, C])`` columns of a channels-last volume -> ``(k, C, D0, D1)``."""
    if channels == 1:
        return np.moveaxis(picked, 2, 0)[:, None]
    return np.transpose(picked, (2, 3, 0, 1))


def iter_plane_blocks(ref: ReferenceVolume) -> Iterator[np.ndarray]:
    """Every leading-axis plane ``(b, C, D1, D2)``, ``STREAM_BLOCK_BYTES`` at a time."""
    d0, d1, d2 = ref.shape
    per_block = max(1, STREAM_BLOCK_BYTES // (d1 * d2 * ref.channels * np.dtype(ref.dtype).itemsize))
    for start in range(0, d0, per_block):
        planes = range(start, min(start + per_block, d0))
        if ref.layout is None:
            yield _zarr_slices(ref, 0, planes)
        else:
            yield read_planes(ref.source, ref.storage_options, ref.layout, planes)


def _iter_planes(ref: ReferenceVolume) -> Iterator[np.ndarray]:
    """Every leading-axis plane ``(C, D1, D2)`` in file order, a block at a time."""
    for block in iter_plane_blocks(ref):
        yield from block
