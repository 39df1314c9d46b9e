"""Image-quality metrics for predicted slices against held-out true sections.

Pure functions over numpy arrays; nothing here knows about Ray, stores or models.

Conventions
-----------
- **Layout.** One slice is ``(H, W)`` (grayscale) or ``(H, W, C)`` with the channels
  last (RGB), the predecessor's and the input datasets' layout. A stack of slices
  ``(N, H, W[, C])`` is scored with :func:`score_stack`, one score per slice.
- **Arithmetic.** Both arrays are converted to float64 before any arithmetic, so uint8
  inputs never wrap around and a float64 prediction can be scored against uint8 truth.
- **Data range** (the ``L`` of PSNR and of SSIM's constants ``(0.01 L)^2``,
  ``(0.03 L)^2``). When ``data_range`` is ``None`` it comes from the dtype of
  ``truth``: the dtype's peak for unsigned integers (255 for uint8, 65535 for
  uint16), ``max - min`` of the dtype for signed integers (as scikit-image does), 1
  for bool. Float truth has no natural range, so ``data_range`` must then be given
  (1.0 for images in ``[0, 1]``, 255.0 for float images in uint8 units). The range is
  never estimated from the data, so a dark slice is not scored on an easier scale. The
  jobs pass a dataset's stated full intensity (``Dataset.peak``: the integer dtype's
  maximum, 1.0 for float images, or the json's ``intensity_max``).
- **SSIM** is scikit-image's ``structural_similarity`` with the settings of Wang et
  al. (2004): an 11x11 Gaussian window (sigma 1.5, ``use_sample_covariance=False``),
  averaged over the image and, for RGB, over channels (``channel_axis``). Slices must
  be at least 11 pixels on each side.
- **Perfect scores.** Identical images give ``psnr == inf``, ``ssim == 1.0`` and
  ``mae == 0.0``.
- **Registration similarity.** :func:`ncc` and :func:`mutual_information` compare two
  ``(H, W)`` images of different contrasts (a section and its Nissl slice, for the align
  job); both are unchanged by scaling either image's intensities.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from skimage.metrics import structural_similarity

from atlinter_ray.errors import ConfigError, DatasetError

#: SSIM Gaussian window settings (Wang et al. 2004); the window spans 11 pixels.
SSIM_SIGMA = 1.5
SSIM_MIN_SIDE = 11


@dataclass(frozen=True, slots=True)
class SliceScores:
    """The three scores of one predicted slice against its true section."""

    psnr: float
    ssim: float
    mae: float


def resolve_data_range(truth: np.ndarray, data_range: float | None = None) -> float:
    """Return the data range: the given one, else the peak of ``truth``'s integer dtype."""
    if data_range is not None:
        value = float(data_range)
        if not math.isfinite(value) or value <= 0:
            raise ConfigError(
                f"metrics: data_range={data_range!r} must be a finite positive number "
                "(e.g. 255.0 for uint8 units, 1.0 for images in [0, 1])"
            )
        return value
    dtype = np.asarray(truth).dtype
    if dtype == np.bool_:
        return 1.0
    if np.issubdtype(dtype, np.unsignedinteger):
        return float(np.iinfo(dtype).max)
    if np.issubdtype(dtype, np.signedinteger):
        info = np.iinfo(dtype)
        return float(info.max) - float(info.min)
    raise ConfigError(
        f"metrics: truth has dtype {dtype}, which has no natural data range; pass "
        "data_range explicitly (1.0 for images in [0, 1], 255.0 for uint8 units)"
    )


def _as_pair(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Check shapes and return both arrays as float64."""
    pred_arr = np.asarray(pred)
    truth_arr = np.asarray(truth)
    if pred_arr.shape != truth_arr.shape:
        raise DatasetError(
            f"metrics: prediction shape {pred_arr.shape} differs from truth shape "
            f"{truth_arr.shape}; score each predicted slice against the true section "
            "of the same slice number, in the same (H, W[, C]) layout"
        )
    if pred_arr.size == 0:
        raise DatasetError(
            f"metrics: prediction and truth are empty (shape {pred_arr.shape}); "
            "pass at least one pixel"
        )
    return pred_arr.astype(np.float64, copy=False), truth_arr.astype(np.float64, copy=False)


def mse(pred: np.ndarray, truth: np.ndarray) -> float:
    """Return the mean squared error, computed in float64."""
    p, t = _as_pair(pred, truth)
    return float(np.mean((p - t) ** 2))


def mae(pred: np.ndarray, truth: np.ndarray) -> float:
    """Return the mean absolute error in the images' own units, computed in float64."""
    p, t = _as_pair(pred, truth)
    return float(np.mean(np.abs(p - t)))


def psnr(pred: np.ndarray, truth: np.ndarray, data_range: float | None = None) -> float:
    """Return the peak signal-to-noise ratio in dB: ``10 log10(L^2 / MSE)``, inf if equal."""
    value_range = resolve_data_range(truth, data_range)
    error = mse(pred, truth)
    if error == 0.0:
        return math.inf
    return float(10.0 * math.log10(value_range**2 / error))


def _channel_axis(ndim: int, channel_axis: int | None) -> int | None:
    """Return the channel axis for a slice of ``ndim`` dimensions (None for grayscale)."""
    if ndim == 2:
        if channel_axis is not None:
            raise ConfigError(
                f"metrics: channel_axis={channel_axis} given for a 2-D (grayscale) "
                "slice; leave channel_axis as None"
            )
        return None
    if ndim == 3:
        return -1 if channel_axis is None else channel_axis
    raise DatasetError(
        f"metrics: SSIM scores one slice of shape (H, W) or (H, W, C), got {ndim} "
        "dimensions; use score_stack for a stack of slices"
    )


def ssim(
    pred: np.ndarray,
    truth: np.ndarray,
    data_range: float | None = None,
    channel_axis: int | None = None,
) -> float:
    """Return the mean structural similarity of one slice (1.0 when identical).

    ``channel_axis`` defaults to the last axis for 3-D slices (RGB ``(H, W, 3)``).
    """
    value_range = resolve_data_range(truth, data_range)
    p, t = _as_pair(pred, truth)
    axis = _channel_axis(p.ndim, channel_axis)
    spatial = [n for i, n in enumerate(p.shape) if axis is None or i != axis % p.ndim]
    if min(spatial) < SSIM_MIN_SIDE:
        raise DatasetError(
            f"metrics: slice of shape {p.shape} is too small for SSIM's "
            f"{SSIM_MIN_SIDE}x{SSIM_MIN_SIDE} Gaussian window; score slices at least "
            f"{SSIM_MIN_SIDE} pixels on each side (or check channel_axis={channel_axis})"
        )
    value = structural_similarity(  # type: ignore[no-untyped-call]  # unannotated in scikit-image
        t,
        p,
        data_range=value_range,
        channel_axis=axis,
        gaussian_weights=True,
        sigma=SSIM_SIGMA,
        use_sample_covariance=False,
    )
    return float(value)


def score_slice(
    pred: np.ndarray,
    truth: np.ndarray,
    data_range: float | None = None,
    channel_axis: int | None = None,
) -> SliceScores:
    """Return PSNR, SSIM and MAE of one predicted slice against its true section."""
    return SliceScores(
        psnr=psnr(pred, truth, data_range),
        ssim=ssim(pred, truth, data_range, channel_axis),
        mae=mae(pred, truth),
    )


def score_stack(
    pred: np.ndarray, truth: np.ndarray, data_range: float | None = None
) -> list[SliceScores]:
    """Score a stack ``(N, H, W[, C])`` slice by slice; RGB channels are last."""
    p = np.asarray(pred)
    t = np.asarray(truth)
    if p.shape != t.shape or p.ndim not in {3, 4}:
        raise DatasetError(
            f"metrics: score_stack needs two stacks of equal shape (N, H, W) or "
            f"(N, H, W, C); got prediction {p.shape} and truth {t.shape}"
        )
    value_range = resolve_data_range(t, data_range)
    return [score_slice(p[i], t[i], value_range) for i in range(p.shape[0])]


def summarize(scores: Sequence[SliceScores]) -> dict[str, Any]:
    """Mean PSNR (finite slices only), SSIM and MAE of scored slices, and how many."""
    finite = [s.psnr for s in scores if math.isfinite(s.psnr)]
    return {
        "psnr": round(float(np.mean(finite)), 4) if finite else math.inf,
        "ssim": round(float(np.mean([s.ssim for s in scores])), 4),
        "mae": round(float(np.mean([s.mae for s in scores])), 4),
        "slices": len(scores),
    }


def ncc(a: np.ndarray, b: np.ndarray) -> float:
    """Normalised cross-correlation of two images, -1..1 (0 when either is constant).

    Global (one mean and spread per image): 1 means one image's intensities are an exact
    increasing linear function of the other's.
    """
    x = np.asarray(a, dtype=np.float64).ravel()
    y = np.asarray(b, dtype=np.float64).ravel()
    x = x - x.mean()
    y = y - y.mean()
    denom = math.sqrt(float(np.dot(x, x)) * float(np.dot(y, y)))
    return float(np.dot(x, y)) / denom if denom > 0 else 0.0


def mutual_information(a: np.ndarray, b: np.ndarray, bins: int = 32) -> float:
    """Mutual information (nats) of two images' intensities, from a ``bins`` x ``bins`` histogram.

    The criterion ANTs' ``mattes`` metric maximises (there with Parzen windows): it rewards
    any consistent mapping between intensities, so it scores an ISH section against a
    Nissl slice, whose contrasts differ.
    """
    joint, _, _ = np.histogram2d(
        np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel(), bins
    )
    p = joint / joint.sum()
    outer = p.sum(axis=1, keepdims=True) @ p.sum(axis=0, keepdims=True)
    nz = p > 0
    return float((p[nz] * np.log(p[nz] / outer[nz])).sum())
