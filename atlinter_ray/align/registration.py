"""Registration of one section to its Nissl slice with ANTsPy: arrays in, arrays out.

The predecessor's align stage, one section at a time::

    section (C, H, W) ──> moving image: RGB -> 1 - gray, grayscale as is (``contrast``)
    Nissl slice       ──> fixed image: divided by the volume's own maximum (as align.py did)
                          ants.registration(fixed, moving, type_of_transform)
                          every stage composed into one dense field u (H, W, 2)
    aligned[c](x) = section[c](x + u(x))   for each channel c; outside the section: fill

The field is the whole transform: ``u[..., 0]`` moves along rows, ``u[..., 1]`` along
columns, in pixels. :func:`apply_field` reapplies a saved field and gives the bytes the
job wrote. It samples as ITK's linear interpolator does (a point up to half a pixel past
the border takes the border value, farther out the fill), so it matches
``ants.apply_transforms`` to float precision.

Determinism: ANTs samples the affine metric at random points, and its threads sum in an
order that changes from run to run. With a fixed seed and one ITK thread a registration
gives the same bytes in every process. ITK reads its thread count once per process, so
:func:`make_deterministic` must run before the process's first registration (the align
workers call it when they start).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from atlinter_ray.align.config import ANTS_TRANSFORMS, Contrast, Fill, Transform
from atlinter_ray.dtypes import to_dtype
from atlinter_ray.metrics import mutual_information, ncc

ITK_THREADS = "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"
REGISTERED = "registered"
PASSED_THROUGH = "passed_through"


@dataclass(frozen=True, slots=True)
class SectionResult:
    """One section after alignment: its image, its transform and how well it fits."""

    aligned: np.ndarray  # (C, H, W) in the section's dtype
    field: np.ndarray  # (H, W, 2) float32 pixels; zero when passed through
    record: dict[str, Any]  # status, reason, similarity before / after
    #: The Nissl slice and the registration images (H, W) before and after, for the
    #: picture; None when passed through.
    nissl: np.ndarray | None = None
    before: np.ndarray | None = None
    after: np.ndarray | None = None


def make_deterministic(seed: int) -> None:
    """One ITK thread and a fixed ANTs seed for every later registration in this process."""
    os.environ[ITK_THREADS] = "1"
    import ants.config

    ants.config.set_ants_deterministic(True, seed)


def to_gray(image: np.ndarray, peak: float) -> np.ndarray:
    """``(C, H, W)`` -> ``(H, W)`` float32 in [0, 1]; RGB through skimage's ``rgb2gray``.

    Computed in float64, then rounded once, as the predecessor's images were.
    """
    scaled: np.ndarray = image.astype(np.float64) / peak
    if scaled.shape[0] == 1:
        return np.asarray(scaled[0], dtype=np.float32)
    from skimage.color import rgb2gray

    return np.asarray(rgb2gray(np.moveaxis(scaled, 0, -1)), dtype=np.float32)


def registration_image(section: np.ndarray, peak: float, contrast: Contrast) -> np.ndarray:
    """The ``(H, W)`` float32 image ANTs registers, made from ``section`` as ``contrast`` says.

    ``auto`` gives ANTs what atlinter's ``align.py`` gave it: ``1 - gray`` of an RGB
    section, the raw values of a grayscale one (mutual information does not depend on
    their scale); ``as_is`` and ``inverted`` are gray (or ``1 - gray``) in [0, 1].
    """
    if contrast == Contrast.auto and section.shape[0] == 1:
        return np.asarray(section[0], dtype=np.float32)
    gray = to_gray(section, peak)
    invert = contrast == Contrast.inverted or (contrast == Contrast.auto and section.shape[0] == 3)
    return np.asarray(np.float32(1.0) - gray, dtype=np.float32) if invert else gray


def fill_values(section: np.ndarray, fill: Fill) -> list[float]:
    """The value per channel that fills pixels brought in from outside the section."""
    corner = [float(plane[0, 0]) for plane in section]
    if fill == Fill.corner or (fill == Fill.atlinter and section.shape[0] == 3):
        return corner
    return [0.0] * section.shape[0]


def register(
    fixed: np.ndarray, moving: np.ndarray, transform: Transform, params: Mapping[str, Any]
) -> np.ndarray:
    """The dense field ``(H, W, 2)`` float32 that carries ``moving`` onto ``fixed``."""
    import ants

    f = ants.from_numpy(np.ascontiguousarray(fixed, dtype=np.float32))
    m = ants.from_numpy(np.ascontiguousarray(moving, dtype=np.float32))
    kind = ANTS_TRANSFORMS[transform]
    with tempfile.TemporaryDirectory(prefix="atlinter-align-") as tmp:  # ANTs' files go here
        out = ants.registration(
            fixed=f, moving=m, type_of_transform=kind, outprefix=f"{tmp}/reg", **dict(params)
        )
        composed = ants.apply_transforms(
            fixed=f, moving=m, transformlist=out["fwdtransforms"], compose=f"{tmp}/field"
        )
        field = np.asarray(ants.image_read(composed).numpy(), dtype=np.float32)
    if field.shape != (*fixed.shape, 2) or not np.isfinite(field).all():
        raise RuntimeError(
            f"ANTs {kind} gave a transform of shape {field.shape} with non-finite values "
            f"(expected {(*fixed.shape, 2)}): the registration diverged; try "
            "registration.transform=affine or other registration.params"
        )
    return field


def apply_field(section: np.ndarray, field: np.ndarray, fill: Sequence[float]) -> np.ndarray:
    """``section`` ``(C, H, W)`` sampled at ``x + field(x)`` (float64), ``fill`` outside."""
    from scipy import ndimage

    _, h, w = section.shape
    rows, cols = np.mgrid[0:h, 0:w].astype(np.float64)
    r = rows + field[..., 0]
    c = cols + field[..., 1]
    # ITK's image extends half a pixel past the outer pixel centres, clamped there
    inside = (r >= -0.5) & (r <= h - 0.5) & (c >= -0.5) & (c <= w - 0.5)
    coords = np.stack([np.clip(r, 0, h - 1), np.clip(c, 0, w - 1)])
    out = np.empty(section.shape, dtype=np.float64)
    for k, plane in enumerate(section):
        out[k] = ndimage.map_coordinates(plane.astype(np.float64), coords, order=1, mode="nearest")
        out[k][~inside] = fill[k]
    return out


def similarity(fixed: np.ndarray, moving: np.ndarray) -> dict[str, float]:
    """NCC and mutual information of a registration image against its Nissl slice."""
    return {"ncc": round(ncc(fixed, moving), 6), "mi": round(mutual_information(fixed, moving), 6)}


def align_section(
    section: np.ndarray,
    peak: float,
    nissl: np.ndarray | None,
    transform: Transform,
    params: Mapping[str, Any],
    fill: Fill,
    contrast: Contrast,
) -> SectionResult:
    """Register ``section`` ``(C, H, W)`` to ``nissl`` ``(H, W)`` in [0, 1] and move it there.

    ``nissl`` None (the section lies beyond the reference) or a blank image on either side
    passes the section through unchanged, with the reason in its record.
    """
    zero = np.zeros((*section.shape[1:], 2), dtype=np.float32)
    if nissl is None:
        return SectionResult(section, zero, {"status": PASSED_THROUGH, "reason": "beyond the reference"})
    moving = registration_image(section, peak, contrast)
    for name, image in (("section", moving), ("Nissl slice", nissl)):
        if float(image.std()) == 0.0:
            return SectionResult(section, zero, {"status": PASSED_THROUGH, "reason": f"blank {name}"})
    field = register(nissl, moving, transform, params)
    aligned = to_dtype(apply_field(section, field, fill_values(section, fill)), section.dtype.str)
    after = registration_image(aligned, peak, contrast)
    record = {
        "status": REGISTERED,
        "before": similarity(nissl, moving),
        "after": similarity(nissl, after),
    }
    return SectionResult(aligned, field, record, nissl, moving, after)
