"""Output dtypes: which dtype a dataset's volume is written in, and the cast into it."""

from __future__ import annotations

import numpy as np

from atlinter_ray.dataset import Dataset
from atlinter_ray.errors import ConfigError


def output_dtype(ds: Dataset, requested: str | None) -> str:
    """The output dtype: as configured, else the input's."""
    if requested:
        try:
            return np.dtype(requested).name
        except TypeError as exc:
            raise ConfigError(f"output.dtype={requested!r} is not a numpy dtype") from exc
    return ds.dtype


def to_dtype(frames: np.ndarray, dtype: str) -> np.ndarray:
    """Cast model output to the output dtype: round and clip for integers."""
    dt = np.dtype(dtype)
    if frames.dtype == dt or dt.kind not in "ui":
        return frames.astype(dt, copy=False)
    info = np.iinfo(dt)
    values = np.rint(frames) if frames.dtype.kind == "f" else frames
    clipped: np.ndarray = np.clip(values, info.min, info.max)
    return clipped.astype(dt)
