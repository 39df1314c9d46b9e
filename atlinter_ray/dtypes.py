"""Output dtypes: which dtype a dataset's volume is written in, and the cast into it."""

from __future__ import annotations

import numpy as np

from atlinter_ray.dataset import Dataset
from atlinter_ray.errors import ConfigError

#: The fewest grey levels (full intensity of float data) an integer output may keep: 8 bits.
MIN_LEVELS = 255.0


def output_dtype(ds: Dataset, requested: str | None) -> str:
    """The output dtype: as configured, else the input's.

    A configured dtype must hold the dataset's whole range ``[0, full intensity]``, so
    writing never clips a measured value (``int8`` for uint8 data would), and an integer
    dtype must keep float data's grey levels: values are written as they are, rounded to
    whole numbers, so float data whose full intensity is below :data:`MIN_LEVELS` (e.g.
    images in [0, 1], which would become 0 or 1) is refused, never silently posterized.
    """
    if not requested:
        return ds.dtype
    try:
        dt = np.dtype(requested)
    except TypeError as exc:
        raise ConfigError(f"output.dtype={requested!r} is not a numpy dtype") from exc
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
            "state that full intensity as 'intensity_max' in the dataset's json"
        )
    return dt.name


def to_dtype(frames: np.ndarray, dtype: str) -> np.ndarray:
    """Cast model output to the output dtype: round and clip for integers."""
    dt = np.dtype(dtype)
    if frames.dtype == dt or dt.kind not in "ui":
        return frames.astype(dt, copy=False)
    info = np.iinfo(dt)
    values = np.rint(frames) if frames.dtype.kind == "f" else frames
    clipped: np.ndarray = np.clip(values, info.min, info.max)
    return clipped.astype(dt)
