"""Output dtypes: which dtype a dataset's volume is written in, and the cast into it.

Values are written as they are (rounded for integer dtypes), unless the user asks for
``output.dtype_scaling=full_range``: then a dataset written in an integer dtype has its
full intensity range ``[0, peak]`` mapped linearly onto ``[0, the dtype's maximum]``::

    stored = round(value * scale + offset)      value = (stored - offset) / scale
    scale  = dtype maximum / peak                offset = 0

``peak`` is the dataset's stated full intensity (the json's ``intensity_max``, else 1.0
for float images or the integer dtype's maximum), known without reading the images;
values above it clip at the dtype's maximum, as they would without scaling. The scale
and offset are part of the run's identity and recorded in the image's metadata
(:func:`scaling_record`), so a user (and scoring, and the pictures) can map back.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Any

import numpy as np

from atlinter_ray.dataset import Dataset
from atlinter_ray.errors import ConfigError

#: The fewest grey levels (full intensity of float data) an integer output may keep: 8 bits.
MIN_LEVELS = 255.0
#: Where the scaling is recorded in an image's run record (``atlinter_ray.run``).
SCALING_KEY = "intensity_scaling"


class DtypeScaling(StrEnum):
    """``output.dtype_scaling``: how values reach an integer output dtype."""

    #: Written as they are, rounded: a dtype that would clip or posterize is refused.
    none = "none"
    #: The dataset's full intensity range ``[0, peak]`` onto the dtype's ``[0, max]``.
    full_range = "full_range"


def output_scale(ds: Dataset, dtype: str, scaling: DtypeScaling | str) -> float:
    """The factor values are multiplied by before the cast to ``dtype`` (1.0: none)."""
    dt = np.dtype(dtype)
    if DtypeScaling(scaling) is DtypeScaling.none or dt.kind not in "iu":
        return 1.0
    return float(np.iinfo(dt).max) / ds.peak


def scaling_record(scale: float) -> dict[str, Any]:
    """The run record's entry for a scaled image: how to map stored values back."""
    return {"scale": scale, "offset": 0.0,
            "stored": "round(value * scale + offset)", "value": "(stored - offset) / scale"}


def recorded_scale(meta: Mapping[str, Any]) -> float:
    """The scale an image's ``atlinter_ray`` record says its values were written with."""
    record = (meta.get("run") or {}).get(SCALING_KEY)
    return float(record["scale"]) if record else 1.0


def in_data_units(stored: np.ndarray, scale: float) -> np.ndarray:
    """Stored values mapped back to the data's units (unchanged when not scaled)."""
    return stored if scale == 1.0 else stored / scale


def output_dtype(ds: Dataset, requested: str | None,
                 scaling: DtypeScaling | str = DtypeScaling.none) -> str:
    """The output dtype: as configured, else the input's.

    A configured dtype must hold the dataset's whole range ``[0, full intensity]``, so
    writing never clips a measured value (``int8`` for uint8 data would), and an integer
    dtype must keep float data's grey levels: values are written as they are, rounded to
    whole numbers, so float data whose full intensity is below :data:`MIN_LEVELS` (e.g.
    images in [0, 1], which would become 0 or 1) is refused, never silently posterized.
    With ``scaling=full_range`` an integer dtype takes the range scaled onto its own
    (:func:`output_scale`), so neither check applies.
    """
    if not requested:
        return ds.dtype
    try:
        dt = np.dtype(requested)
    except TypeError as exc:
        raise ConfigError(f"output.dtype={requested!r} is not a numpy dtype") from exc
    if dt.kind in "iu" and DtypeScaling(scaling) is DtypeScaling.full_range:
        return dt.name
    if dt.kind in "iu":
        top = float(np.iinfo(dt).max)
    elif dt.kind == "f":
        top = float(np.finfo(dt).max)
    else:
        top = 0.0
    if top < ds.peak:
        holds = "it is not a number type" if top == 0.0 else f"its largest value is {top:g}"
        raise ConfigError(
            f"output.dtype={requested!r} cannot hold dataset {ds.id}'s values 0..{ds.peak:g} "
            f"({ds.dtype}): {holds}, so values would be clipped. Fix: leave output.dtype "
            f"unset (the input's, {ds.dtype}) or choose one that holds 0..{ds.peak:g} "
            "(e.g. float32)"
        )
    if dt.kind in "iu" and np.dtype(ds.dtype).kind == "f" and ds.peak < MIN_LEVELS:
        raise ConfigError(
            f"output.dtype={requested!r} would round dataset {ds.id}'s {ds.dtype} values "
            f"0..{ds.peak:g} to whole numbers, leaving {int(ds.peak) + 1} grey level(s); "
            "values are written as they are, never rescaled. Fix: leave output.dtype unset "
            f"(the input's, {ds.dtype}) or choose a float dtype (float32, float16); or give "
            f"the images in {dt.name} units (e.g. multiplied by {np.iinfo(dt).max}) and "
            "state that full intensity as 'intensity_max' in the dataset's json; or set "
            f"output.dtype_scaling=full_range to map 0..{ds.peak:g} onto 0.."
            f"{np.iinfo(dt).max} (recorded in the image's metadata)"
        )
    return dt.name


def to_dtype(frames: np.ndarray, dtype: str, scale: float = 1.0) -> np.ndarray:
    """Cast model output to the output dtype: scale (see :func:`scaled`), round and clip for integers."""
    dt = np.dtype(dtype)
    if scale != 1.0:
        frames = scaled(frames, scale)
    if frames.dtype == dt or dt.kind not in "ui":
        return frames.astype(dt, copy=False)
    info = np.iinfo(dt)
    if frames.dtype.kind == "f":  # rint makes a new array, clipped in place
        values: np.ndarray = np.rint(frames)
        np.clip(values, info.min, info.max, out=values)
        return values.astype(dt)
    clipped: np.ndarray = np.clip(frames, info.min, info.max)
    return clipped.astype(dt)


def scaled(frames: np.ndarray, scale: float) -> np.ndarray:
    """``frames * scale`` in at least float32 (float64 input stays float64).

    One rule on the host and the device (:func:`~atlinter_ray.models.torch_runtime.to_dtype_tensor`),
    so both write the same bytes.
    """
    wide = frames.astype(np.result_type(frames.dtype, np.float32), copy=False)
    out: np.ndarray = wide * wide.dtype.type(scale)
    return out
