"""Models that need no download: linear blending and OpenCV optical flow.

``linear`` generalises the predecessor's mean of the two ends to any ``t``; on
integer data at the dyadic positions of ``placement=atlinter`` it is exact in
float32, so it reproduces the predecessor value for value. The flow models run
OpenCV's dense optical flow (contrib build) on an 8-bit luminance image and let
:class:`~atlinter_ray.models.flow.FlowInterpolator` warp and blend every channel.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import cv2
import numpy as np

from atlinter_ray.errors import ConfigError
from atlinter_ray.models.base import FlowEstimator, PairInterpolator, register_model


@register_model("linear")
class LinearInterpolator(PairInterpolator):
    """``(1 - t) * a + t * b``: the predecessor's mean, at any ``t``."""

    arbitrary_t = True

    def interpolate(
        self, a: np.ndarray, b: np.ndarray, t: np.ndarray, peak: float = 1.0
    ) -> np.ndarray:
        """Blend each pair at every position in ``t``."""
        ts = np.asarray(t, dtype=np.float32)
        frames = np.empty((a.shape[0], len(ts), *a.shape[1:]), dtype=_blend_type(a, b))
        scratch = np.empty(b.shape, dtype=frames.dtype)
        for k, tk in enumerate(ts):
            _blend_into(frames[:, k], a, b, tk, scratch)
        return frames

    def interpolate_items(
        self, a: Any, b: Any, pair: np.ndarray, t: np.ndarray, peak: float = 1.0
    ) -> Any:
        """Item ``m`` is pair ``pair[m]`` at ``t[m]``, each blended straight into the output."""
        frames = np.empty((len(pair), *a.shape[1:]), dtype=_blend_type(a, b))
        scratch = np.empty(a.shape[1:], dtype=frames.dtype)
        for m, (i, tm) in enumerate(zip(np.asarray(pair), np.asarray(t, dtype=np.float32))):
            _blend_into(frames[m], a[i], b[i], tm, scratch)
        return frames


def _blend_type(a: np.ndarray, b: np.ndarray) -> np.dtype[Any]:
    """The type ``(1 - t) * a + t * b`` has for float32 ``t``."""
    return np.result_type(a.dtype, b.dtype, np.float32)


def _blend_into(out: np.ndarray, a: np.ndarray, b: np.ndarray, t: np.float32,
                scratch: np.ndarray) -> None:
    """``out = (1 - t) * a + t * b``, the broadcast expression's arithmetic without its
    temporaries (they cost two thirds of the CPU time on full-size frames)."""
    np.multiply(a, np.float32(1.0) - t, out=out)
    np.multiply(b, t, out=scratch)
    out += scratch


def to_gray_u8(images: np.ndarray, peak: float) -> np.ndarray:
    """``(N, C, H, W)`` in ``[0, peak]`` -> ``(N, H, W)`` uint8 luminance for OpenCV."""
    gray = images.mean(axis=1) if images.shape[1] > 1 else images[:, 0]
    return np.clip(np.rint(gray * (255.0 / peak)), 0, 255).astype(np.uint8)


def _dense(algorithm: cv2.DenseOpticalFlow) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """``algorithm.calc`` with no initial flow (OpenCV allocates the result)."""

    def calc(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        # cv2's stub makes ``flow`` required; None is OpenCV's "no initial flow" (DIS
        # would start from a given one).
        flow: np.ndarray = algorithm.calc(x, y, None)  # type: ignore[call-overload]
        return flow

    return calc


class OpenCVFlow(FlowEstimator):
    """Dense flow from an OpenCV estimator on 8-bit luminance images."""

    def __init__(self, compute: Callable[[np.ndarray, np.ndarray], np.ndarray]):
        self._compute = compute

    def flow(self, a: np.ndarray, b: np.ndarray, peak: float = 1.0) -> np.ndarray:
        """Flow ``(N, 2, H, W)`` for each pair."""
        ga, gb = to_gray_u8(a, peak), to_gray_u8(b, peak)
        return np.stack(
            [np.moveaxis(self._compute(x, y), -1, 0) for x, y in zip(ga, gb)]
        ).astype(np.float32)

    def provenance(self) -> dict[str, Any]:
        """Name only: classical models have no checkpoint."""
        return {"model": self.name, "checkpoint_sha256": None}


@register_model("dis")
class DISFlow(OpenCVFlow):
    """OpenCV's DIS optical flow (fast, robust); ``preset``: ultrafast/fast/medium."""

    _PRESETS = {
        "ultrafast": cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST,
        "fast": cv2.DISOPTICAL_FLOW_PRESET_FAST,
        "medium": cv2.DISOPTICAL_FLOW_PRESET_MEDIUM,
    }

    def __init__(self, preset: str = "medium") -> None:
        if preset not in self._PRESETS:
            raise ConfigError(
                f"model.params.preset={preset!r}: choose one of {sorted(self._PRESETS)}"
            )
        super().__init__(_dense(cv2.DISOpticalFlow.create(self._PRESETS[preset])))


@register_model("farneback")
class FarnebackFlow(OpenCVFlow):
    """Gunnar Farneback's polynomial-expansion flow (OpenCV defaults for sections)."""

    def __init__(
        self,
        pyr_scale: float = 0.5,
        levels: int = 5,
        winsize: int = 15,
        iterations: int = 3,
        poly_n: int = 5,
        poly_sigma: float = 1.2,
    ) -> None:
        args = (pyr_scale, levels, winsize, iterations, poly_n, poly_sigma, 0)

        def calc(x: np.ndarray, y: np.ndarray) -> np.ndarray:
            # None for ``flow``: OpenCV allocates it (flags=0).
            flow: np.ndarray = cv2.calcOpticalFlowFarneback(x, y, None, *args)
            return flow

        super().__init__(calc)


@register_model("deepflow")
class DeepFlow(OpenCVFlow):
    """DeepFlow (Weinzaepfel et al. 2013) from OpenCV contrib: slow, accurate."""

    def __init__(self) -> None:
        super().__init__(_dense(cv2.optflow.createOptFlow_DeepFlow()))


@register_model("tvl1")
class TVL1Flow(OpenCVFlow):
    """Dual TV-L1 optical flow from OpenCV contrib."""

    def __init__(self) -> None:
        super().__init__(_dense(cv2.optflow.DualTVL1OpticalFlow.create()))
