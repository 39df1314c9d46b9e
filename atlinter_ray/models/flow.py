"""Turn a flow estimator into a pair interpolator that works at any ``t``.

The frame at ``t`` samples both ends along the flows and blends them by ``t``::

    frame_t(x) = (1 - t) * a(x + t * F_ba(x)) + t * b(x + (1 - t) * F_ab(x))

with OpenCV's convention ``a(x) ≈ b(x + F_ab(x))``. The flows are evaluated at the
target pixel rather than traced back along the motion path, the usual first-order
approximation for the small displacements between neighbouring sections. Warping is
OpenCV's bilinear ``remap`` with replicated borders.
"""

from __future__ import annotations

import functools
from typing import Any

import cv2
import numpy as np

from atlinter_ray.models.base import FlowEstimator, PairInterpolator


@functools.lru_cache(maxsize=4)
def _pixel_grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column coordinates of an ``h`` x ``w`` image (cached: reused every warp)."""
    gy, gx = np.mgrid[0:h, 0:w].astype(np.float32)
    return gy, gx


def warp(images: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """Sample ``images`` ``(C, H, W)`` at ``x + flow(x)``; ``flow`` is ``(2, H, W)``."""
    gy, gx = _pixel_grid(*images.shape[-2:])
    map_x = gx + flow[0].astype(np.float32, copy=False)
    map_y = gy + flow[1].astype(np.float32, copy=False)
    return np.stack(
        [
            cv2.remap(
                channel.astype(np.float32, copy=False),
                map_x,
                map_y,
                interpolation=cv2.INTER_LINEAR,
                borderMode=cv2.BORDER_REPLICATE,
            )
            for channel in images
        ]
    )


class FlowInterpolator(PairInterpolator):
    """Pair interpolator built on any :class:`FlowEstimator` (any ``t``)."""

    arbitrary_t = True

    def __init__(self, estimator: FlowEstimator) -> None:
        self.estimator = estimator

    def interpolate(
        self, a: np.ndarray, b: np.ndarray, t: np.ndarray, peak: float = 1.0
    ) -> np.ndarray:
        """Frames ``(N, K, C, H, W)``: flows both ways once per pair, one warp per t."""
        n = a.shape[0]
        flows = self.estimator.flow(
            np.concatenate([a, b]), np.concatenate([b, a]), peak=peak
        )
        f_ab, f_ba = flows[:n], flows[n:]
        out = np.empty((n, len(t), *a.shape[1:]), dtype=np.float32)
        for i in range(n):
            for k, tk in enumerate(np.asarray(t, dtype=np.float32)):
                from_a = warp(a[i], tk * f_ba[i])
                from_b = warp(b[i], (1.0 - tk) * f_ab[i])
                out[i, k] = (1.0 - tk) * from_a + tk * from_b
        return out

    def provenance(self) -> dict[str, Any]:
        """The wrapped estimator's provenance."""
        return self.estimator.provenance()
