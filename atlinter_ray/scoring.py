"""Score a finished run's predicted slices against held-out truth, next to ``linear``.

Used when the configuration names a ground-truth volume for a dataset (the bundled
sample does): the driver reads back the predicted slices it wrote, scores them with
:mod:`atlinter_ray.metrics`, and predicts the same slices with ``linear`` in memory
so every run reports how much its model adds over the trivial one.
"""

from __future__ import annotations

import zipfile
from collections.abc import Mapping, Sequence
from typing import Any

import fsspec
import numpy as np

from atlinter_ray.dataset import NPY_FORMAT, Dataset, read_sections
from atlinter_ray.dtypes import in_data_units, recorded_scale, to_dtype
from atlinter_ray.engine import predict
from atlinter_ray.errors import DatasetError, DatasetNotFoundError
from atlinter_ray.metrics import score_stack, summarize
from atlinter_ray.models.classical import LinearInterpolator
from atlinter_ray.planning import plan_dataset
from atlinter_ray.store import VolumeStore


def check_truth(url: str, ds: Dataset, storage_options: Mapping[str, Any] | None = None) -> None:
    """Check a truth ``.npz`` before any work: it exists and its ``volume`` fits the dataset.

    Reads only the archive's directory and the array's ``.npy`` header.
    """
    expected = ds.reference_shape + ((ds.channels,) if ds.channels > 1 else ())
    try:
        with fsspec.open(url, "rb", **dict(storage_options or {})) as f, zipfile.ZipFile(f) as archive:
            with archive.open("volume.npy") as member:
                version = NPY_FORMAT.read_magic(member)
                read_header = (NPY_FORMAT.read_array_header_1_0 if version == (1, 0)
                               else NPY_FORMAT.read_array_header_2_0)
                shape = read_header(member)[0]
    except FileNotFoundError as exc:
        raise DatasetNotFoundError(
            f"{url}: data.truth for dataset {ds.id}: file not found. Fix: give the .npz of "
            "its true volume, or leave the dataset out of data.truth"
        ) from exc
    except (KeyError, ValueError, OSError, zipfile.BadZipFile) as exc:
        raise DatasetError(
            f"{url}: data.truth for dataset {ds.id}: not an .npz holding 'volume' ({exc}). "
            "Fix: save it with numpy.savez(path, volume=volume)"
        ) from exc
    if tuple(shape) != expected:
        raise DatasetError(
            f"{url}: field 'volume': shape {tuple(shape)}, expected {expected} for "
            f"dataset {ds.id}. Fix: give the truth in reference orientation, channels last"
        )


def load_truth(url: str, ds: Dataset, storage_options: Mapping[str, Any] | None = None) -> np.ndarray:
    """Read a truth volume (``.npz`` key ``volume``) and check it matches the dataset."""
    with fsspec.open(url, "rb", **dict(storage_options or {})) as f, np.load(f) as archive:
        volume: np.ndarray = archive["volume"]
    expected = ds.reference_shape + ((ds.channels,) if ds.channels > 1 else ())
    if volume.shape != expected:
        raise DatasetError(
            f"{url}: field 'volume': shape {volume.shape}, expected {expected} for "
            f"dataset {ds.id}. Fix: give the truth in reference orientation, channels last"
        )
    return volume


def take_slices(volume: np.ndarray, axis: int, slices: Sequence[int], channel_first: bool) -> np.ndarray:
    """``(N, H, W[, C])`` slices along reference ``axis`` of a volume."""
    if channel_first:
        volume = np.moveaxis(volume, 0, -1)
    return np.moveaxis(np.take(volume, list(slices), axis=axis), axis, 0)


def score_run(
    store: VolumeStore, ds: Dataset, truth: np.ndarray, placement: str
) -> dict[str, dict[str, float]]:
    """Scores of the run's predicted slices and of ``linear`` on the same slices.

    Both are compared with the truth in the data's units: values written scaled
    (``output.dtype_scaling``) are mapped back with the scale the image records, and
    ``linear`` goes through the same cast, so both carry the same quantisation.
    """
    tasks = plan_dataset(ds.id, ds.section_numbers, ds.n_slices, placement)
    predicted = [j.slice for t in tasks for j in t.predicted]
    scale = recorded_scale(store.image_attrs(ds.id).get("atlinter_ray", {}))
    volume = store.read_volume(ds.id)
    dtype = volume.dtype.name
    ours = in_data_units(take_slices(volume, ds.axis_index, predicted, ds.channels > 1), scale)
    true = take_slices(truth, ds.axis_index, predicted, False)
    linear = LinearInterpolator()
    frames = []
    for task in tasks:
        if task.predicted:
            a, b = read_sections(ds, task.pair)
            out = predict(linear, a[None], b[None], task.positions, ds.peak)
            frames.append(in_data_units(to_dtype(out.frames[0], dtype, scale), scale))
    base = np.concatenate(frames)  # (N, C, H, W)
    base = np.moveaxis(base, 1, -1) if ds.channels > 1 else base[:, 0]
    gaps = sorted({t.pair[1] - t.pair[0] for t in tasks if t.predicted})
    return {
        "model": {**summarize(score_stack(ours, true, ds.peak)), "gaps": gaps},
        "linear": {**summarize(score_stack(base, true, ds.peak)), "gaps": gaps},
    }

