"""Sections with a known misalignment, for the align tests and benchmark.

The reference ("Nissl") is a real volume, the bundled MNI152 sample (optionally
resampled to the 25 µm CCF planes). Each section is one of its slices moved by a known
smooth field ``d`` (an affine part plus a low-frequency wave, a few pixels): ``section(y)
= reference(y + d(y))``. A perfect registration gives the field ``u`` with
``u(x) + d(x + u(x)) = 0``; :func:`residual` measures how far a recovered ``u`` is from
that, in pixels, to compare with the applied ``|d|``. RGB sections look like ISH on a
slide: tinted, dark tissue on a light background.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from atlinter_ray.align.registration import apply_field
from atlinter_ray.dtypes import to_dtype
from atlinter_ray.testing.datasets import real_volume, write_dataset

AXES = {"coronal": 0, "sagittal": 2}
_TINT = np.array([1.0, 0.8, 0.55])


def smooth_field(h: int, w: int, amplitude: float, seed: int) -> np.ndarray:
    """A known deformation ``(h, w, 2)`` in pixels: a shift, a shear and a wave."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:h, 0:w].astype(np.float64)
    field = np.zeros((h, w, 2))
    for k in range(2):
        a, b, p, q = rng.uniform(-1, 1, 4)
        field[..., k] = 0.6 * np.sin(2 * np.pi * (cols / w * a + p))
        field[..., k] += 0.6 * np.cos(2 * np.pi * (rows / h * b + q))
    field[..., 0] += 0.4
    field[..., 1] -= 0.3
    return amplitude * field


def residual(recovered: np.ndarray, applied: np.ndarray) -> np.ndarray:
    """Per-pixel error ``|u(x) + d(x + u(x))|`` of a recovered field against the applied one."""
    from scipy import ndimage

    h, w = applied.shape[:2]
    rows, cols = np.mgrid[0:h, 0:w].astype(np.float64)
    points = [rows + recovered[..., 0], cols + recovered[..., 1]]
    moved = np.stack(
        [ndimage.map_coordinates(applied[..., k], points, order=1, mode="nearest") for k in range(2)],
        axis=-1,
    )
    error = recovered + moved
    return np.asarray(np.hypot(error[..., 0], error[..., 1]))


def reference_volume(shape: tuple[int, int, int] | None = None) -> np.ndarray:
    """The sample volume ``(D0, D1, D2)`` uint8, resampled to ``shape`` if given."""
    volume = real_volume()
    if shape is None or tuple(shape) == volume.shape:
        return volume
    from scipy import ndimage

    zoom = [t / s for t, s in zip(shape, volume.shape)]
    resampled: np.ndarray = ndimage.zoom(volume.astype(np.float32), zoom, order=1)
    return to_dtype(resampled, "uint8")


def misaligned_section(
    reference: np.ndarray, axis: str, number: int, amplitude: float, seed: int, rgb: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Slice ``number`` of ``reference`` moved by a known field: ``(image, field)``.

    The image is ``(H, W)`` uint8, or ``(H, W, 3)`` for RGB (dark tissue on a light slide).
    """
    plane = np.take(reference, number, axis=AXES[axis]).astype(np.float64)
    field = smooth_field(plane.shape[0], plane.shape[1], amplitude, seed)
    moved = apply_field(plane[None], field, [0.0])[0]
    if not rgb:
        return to_dtype(moved, "uint8"), field
    return to_dtype(255.0 - moved[..., None] * _TINT, "uint8"), field


def write_misaligned(
    folder: Path,
    name: str,
    reference: np.ndarray,
    axis: str,
    numbers: list[int],
    amplitude: float = 3.0,
    rgb: bool = False,
    seed: int = 0,
    **extra: Any,
) -> np.ndarray:
    """Write a dataset of misaligned sections; return the applied fields ``(n, H, W, 2)``."""
    pairs = [misaligned_section(reference, axis, s, amplitude, seed + i, rgb)
             for i, s in enumerate(numbers)]
    write_dataset(folder, name, np.stack([p[0] for p in pairs]), numbers, axis,
                  reference_shape=list(reference.shape), **extra)
    return np.stack([p[1] for p in pairs])
