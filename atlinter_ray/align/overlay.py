"""The picture of one aligned experiment: a row per section, four tiles per row.

::

    [ section 120 as read ][ Nissl slice 120 ][ overlay before ][ overlay after ]

An overlay puts the Nissl in magenta and the section's registration image (what ANTs
saw: ``1 - gray`` for RGB) in green: where they agree the picture turns grey, where
they do not the colours separate, so a reader sees at a glance what the registration
moved. Each row is labelled with the section number and the NCC before -> after.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

#: Tiles are magnified (whole pixels) until they are at least this tall.
_MIN_TILE = 160
_GAP = 6
_LABEL = 18


@dataclass(frozen=True, slots=True)
class OverlayRow:
    """What one row of the picture shows."""

    image: np.ndarray  # (C, H, W) as read, any dtype
    peak: float
    nissl: np.ndarray  # (H, W) float in [0, 1]
    before: np.ndarray  # (H, W) float in [0, 1], the registration image
    after: np.ndarray
    label: str


def _grey(plane: np.ndarray) -> np.ndarray:
    """A float image scaled to its own 0..1 range, as uint8."""
    lo, hi = float(plane.min()), float(plane.max())
    scaled = (plane - lo) / (hi - lo) if hi > lo else np.zeros_like(plane)
    return (np.clip(scaled, 0, 1) * 255).astype(np.uint8)


def _overlay(nissl: np.ndarray, moving: np.ndarray) -> np.ndarray:
    """BGR: the Nissl in magenta, the section in green."""
    n, m = _grey(nissl), _grey(moving)
    return np.stack([n, m, n], axis=-1)


def _as_bgr(image: np.ndarray, peak: float) -> np.ndarray:
    """A ``(C, H, W)`` section as an 8-bit BGR picture."""
    img = image.astype(np.float32) * (255.0 / peak)
    img = np.clip(img, 0, 255).astype(np.uint8)
    return np.moveaxis(img, 0, -1)[..., ::-1] if img.shape[0] == 3 else img[0][..., None].repeat(3, -1)


def overlay_png(rows: Sequence[OverlayRow]) -> bytes:
    """PNG bytes of the picture: one row per section, section | Nissl | before | after."""
    if not rows:
        raise ValueError("overlay_png needs at least one row")
    h = rows[0].nissl.shape[0]
    zoom = max(1, -(-_MIN_TILE // h))
    lines = []
    for row in rows:
        nissl = _grey(row.nissl)[..., None].repeat(3, -1)
        tiles = [_as_bgr(row.image, row.peak), nissl,
                 _overlay(row.nissl, row.before), _overlay(row.nissl, row.after)]
        tiles = [t.repeat(zoom, 0).repeat(zoom, 1) for t in tiles]
        strip = np.concatenate([np.pad(t, ((0, 0), (0, _GAP), (0, 0))) for t in tiles], axis=1)
        head = np.zeros((_LABEL, strip.shape[1], 3), np.uint8)
        cv2.putText(head, row.label, (4, 13), cv2.FONT_HERSHEY_SIMPLEX, 0.42, (0, 255, 255), 1)
        lines.append(np.concatenate([head, strip, np.zeros((_GAP, strip.shape[1], 3), np.uint8)]))
    ok, png = cv2.imencode(".png", np.concatenate(lines, axis=0))
    if not ok:
        raise RuntimeError("OpenCV could not encode the alignment picture")
    return png.tobytes()
