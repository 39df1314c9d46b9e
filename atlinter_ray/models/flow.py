"""Turn a flow estimator into a pair interpolator that works at any ``t``.

The frame at ``t`` samples both ends along the flows and blends them by ``t``::

    frame_t(x) = (1 - t) * a(x + t * F_ba(x)) + t * b(x + (1 - t) * F_ab(x))

with OpenCV's convention ``a(x) ≈ b(x + F_ab(x))``. The flows are evaluated at the
target pixel rather than traced back along the motion path, the usual first-order
approximation for the small displacements between neighbouring sections. Warping is
bilinear with replicated borders: OpenCV's ``remap`` for host (numpy) estimators, and
for estimators that run on a torch device (RAFT, MaskFlowNet) :func:`warp_tensor` on that
device, which computes what ``remap`` computes value for value (same coordinates, same
fused multiply-adds), so frames do not depend on where the warp ran.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from atlinter_ray.models.base import FlowEstimator, PairInterpolator

if TYPE_CHECKING:
    import torch


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


def _fma(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``a * b + c`` rounded once to float32, as OpenCV's fused multiply-add.

    The float64 product of two float32 values is exact, so only the sum is rounded
    twice (to float64, then float32), which differs from one rounding in about one
    case in 2**29.
    """
    return (a.double() * b.double() + c.double()).float()


def warp_tensor(images: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """:func:`warp` on a torch device: ``images`` ``(M, C, H, W)``, ``flow`` ``(M, 2, H, W)``.

    Bilinear sampling with replicated borders at float32 ``x + flow``, each corner pair
    blended by ``fma(alpha, right - left, left)`` and the two rows by ``fma(beta, ...)``:
    OpenCV's own arithmetic, so the result equals :func:`warp`'s.
    """
    import torch

    m, c, h, w = images.shape
    flow = flow.float()
    gy = torch.arange(h, dtype=torch.float32, device=images.device).view(1, h, 1)
    gx = torch.arange(w, dtype=torch.float32, device=images.device).view(1, 1, w)
    map_x, map_y = gx + flow[:, 0], gy + flow[:, 1]
    fx, fy = torch.floor(map_x), torch.floor(map_y)
    alpha, beta = (map_x - fx).unsqueeze(1), (map_y - fy).unsqueeze(1)
    x0, y0 = fx.long(), fy.long()
    cols = (x0.clamp(0, w - 1), (x0 + 1).clamp(0, w - 1))
    rows = (y0.clamp(0, h - 1) * w, (y0 + 1).clamp(0, h - 1) * w)
    flat = images.float().reshape(m, c, h * w)

    def tap(row: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
        index = (row + col).view(m, 1, h * w).expand(m, c, h * w)
        return flat.gather(2, index).view(m, c, h, w)

    p00, p01 = tap(rows[0], cols[0]), tap(rows[0], cols[1])
    p10, p11 = tap(rows[1], cols[0]), tap(rows[1], cols[1])
    top = _fma(alpha, p01 - p00, p00)
    bottom = _fma(alpha, p11 - p10, p10)
    return _fma(beta, bottom - top, top)


class FlowInterpolator(PairInterpolator):
    """Pair interpolator built on any :class:`FlowEstimator` (any ``t``)."""

    arbitrary_t = True

    def __init__(self, estimator: FlowEstimator) -> None:
        self.estimator = estimator
        self.device = estimator.device

    def interpolate(
        self, a: np.ndarray, b: np.ndarray, t: np.ndarray, peak: float = 1.0
    ) -> np.ndarray:
        """Frames ``(N, K, C, H, W)``: flows both ways once per pair, one warp per t."""
        n = a.shape[0]
        ts = np.asarray(t, dtype=np.float32).reshape(-1)
        out = self.interpolate_items(a, b, np.repeat(np.arange(n), len(ts)), np.tile(ts, n), peak)
        frames: np.ndarray = out.reshape(n, len(ts), *out.shape[1:])
        return frames

    def interpolate_items(
        self, a: Any, b: Any, pair: np.ndarray, t: np.ndarray, peak: float = 1.0
    ) -> Any:
        """Frames ``(M, C, H, W)``: both flows once per distinct pair, one warp per item.

        Host arrays are warped with OpenCV; device tensors on their device.
        """
        pair = np.asarray(pair, dtype=np.int64)
        ts = np.asarray(t, dtype=np.float32).reshape(-1)
        used, slot = np.unique(pair, return_inverse=True)
        if isinstance(a, np.ndarray):
            flows = self.estimator.flow(
                np.concatenate([a[used], b[used]]), np.concatenate([b[used], a[used]]), peak=peak
            )
            f_ab, f_ba = flows[: len(used)], flows[len(used) :]
            out = np.empty((len(pair), *a.shape[1:]), dtype=np.float32)
            for m, (i, tk) in enumerate(zip(pair, ts)):
                from_a = warp(a[i], tk * f_ba[slot[m]])
                from_b = warp(b[i], (1.0 - tk) * f_ab[slot[m]])
                out[m] = (1.0 - tk) * from_a + tk * from_b
            return out
        return self._warp_on_device(a, b, pair, slot, used, ts, peak)

    def _warp_on_device(
        self, a: torch.Tensor, b: torch.Tensor, pair: np.ndarray, slot: np.ndarray,
        used: np.ndarray, ts: np.ndarray, peak: float,
    ) -> torch.Tensor:
        """:meth:`interpolate_items` for frames on a torch device (flows from a torch model)."""
        import torch

        from atlinter_ray.models.torch_runtime import to_device

        a, b = a.float(), b.float()
        dev_used = to_device(used, a.device)
        flows = self.estimator.flow(
            torch.cat([a[dev_used], b[dev_used]]), torch.cat([b[dev_used], a[dev_used]]), peak=peak
        )
        f_ab, f_ba = flows[: len(used)], flows[len(used) :]
        idx, sl = to_device(pair, a.device), to_device(slot.astype(np.int64), a.device)
        tk = to_device(ts, a.device).view(-1, 1, 1, 1)
        from_a = warp_tensor(a[idx], tk * f_ba[sl])
        from_b = warp_tensor(b[idx], (1.0 - tk) * f_ab[sl])
        frames: torch.Tensor = (1.0 - tk) * from_a + tk * from_b
        return frames

    def provenance(self) -> dict[str, Any]:
        """The wrapped estimator's provenance."""
        return self.estimator.provenance()
