"""Quick-look pictures of an output image, provenance colour-coded.

:func:`quicklook_png` draws three orthogonal mid-volume views (from planes the
finishing pass collects while it streams the volume, so drawing reads nothing more). Each view that cuts
across the sections gets a strip along the section axis telling measured (green),
predicted (magenta) and edge-filled (grey) slices apart, so a reader sees at a glance
which parts of the volume are data and which are model.

:func:`montage_png` draws one gap as a strip of slices: a measured section, every
predicted slice after it, the next measured section, each under a bar of its status
colour, read from the provenance in the image's attributes::

    [ measured 41 ][ predicted 42 ][ predicted 43 ][ predicted 44 ][ measured 45 ]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import cv2
import numpy as np

from atlinter_ray.dataset import Dataset
from atlinter_ray.errors import ConfigError, StoreError
from atlinter_ray.planning import EDGE, MEASURED, PREDICTED
from atlinter_ray.store import VolumeStore

#: BGR colours (OpenCV order) of the provenance strip.
STATUS_COLOURS = {MEASURED: (0, 200, 0), PREDICTED: (200, 0, 200), EDGE: (128, 128, 128)}
_STRIP = 6
_GAP = 8
_NAMES = ("AP", "DV", "LR")
_MIN_HEIGHT = 300
#: Montage tiles are magnified (whole pixels) until they are at least this tall.
_MIN_TILE = 160


def _to_bgr(plane: np.ndarray, channels: int, peak: float) -> np.ndarray:
    """A 2-D (or channel-first RGB) plane as an 8-bit BGR picture."""
    img = np.moveaxis(plane, 0, -1)[..., ::-1] if channels > 1 else plane[..., None].repeat(3, -1)
    img = img.astype(np.float32)
    return np.clip(img * (255.0 / peak), 0, 255).astype(np.uint8)


def _view(arr: Any, ds: Dataset, axis: int, position: int) -> np.ndarray:
    """The plane at ``position`` along reference ``axis`` of an image array, as BGR."""
    index: list[Any] = [slice(None)] * arr.ndim
    index[arr.ndim - 3 + axis] = position
    return _plane_bgr(np.asarray(arr[tuple(index)]), ds, axis)


def _plane_bgr(plane: np.ndarray, ds: Dataset, axis: int) -> np.ndarray:
    """A plane across reference ``axis`` (``([C,] a, b)``) as BGR; sagittal: dorsal up."""
    img = _to_bgr(plane, ds.channels, ds.peak)
    return img.transpose(1, 0, 2) if axis == 2 else img


def mid_positions(ds: Dataset) -> tuple[int, int, int]:
    """Where the quick-look cuts the volume: the middle of each reference axis."""
    a, b, c = (n // 2 for n in ds.reference_shape)
    return a, b, c


def quicklook_png(ds: Dataset, planes: Sequence[np.ndarray], status: Sequence[str]) -> bytes:
    """PNG bytes of the three mid views of a volume, with provenance strips.

    ``planes[a]`` is the volume's plane at ``mid_positions(ds)[a]`` across reference
    axis ``a``, ``([C,] ...)`` in array order; ``status[s]`` the status of slice ``s``
    along the section axis (measured, predicted, edge-filled or empty).
    """
    views = []
    for axis in range(3):
        img = _plane_bgr(planes[axis], ds, axis)
        dims = [d for d in range(3) if d != axis]
        if axis == 2:  # the sagittal view was turned: dorsal up, anterior left
            dims = dims[::-1]
        zoom = max(1, _MIN_HEIGHT // max(ds.reference_shape))
        img = img.repeat(zoom, 0).repeat(zoom, 1)
        if ds.axis_index in dims:
            strip = np.array([STATUS_COLOURS.get(s, (0, 0, 0)) for s in status], np.uint8)
            strip = strip.repeat(zoom, 0)
            if dims[0] == ds.axis_index:  # sections run down the rows
                img = np.concatenate([np.repeat(strip[:, None], _STRIP, 1), img], axis=1)
            else:  # sections run along the columns
                img = np.concatenate([img, np.repeat(strip[None], _STRIP, 0)], axis=0)
        label = f"{_NAMES[axis]} {mid_positions(ds)[axis]}"
        cv2.putText(img, label, (8, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 255, 255), 1)
        views.append(img)
    height = max(v.shape[0] for v in views)
    padded = [np.pad(v, ((0, height - v.shape[0]), (0, _GAP), (0, 0))) for v in views]
    ok, png = cv2.imencode(".png", np.concatenate(padded, axis=1))
    if not ok:
        raise RuntimeError("OpenCV could not encode the quick-look PNG")
    return bytes(png.tobytes())


def montage_gaps(provenance: Sequence[Mapping[str, Any]]) -> list[tuple[int, int]]:
    """``(left, right)`` measured sections with only predicted slices between them."""
    status = {p["slice"]: p["status"] for p in provenance}
    measured = sorted(s for s, st in status.items() if st == MEASURED)
    return [
        (lo, hi) for lo, hi in zip(measured, measured[1:])
        if hi - lo > 1 and all(status.get(s) == PREDICTED for s in range(lo + 1, hi))
    ]


def montage_png(
    store: VolumeStore,
    ds: Dataset,
    left: int | None = None,
    provenance: Sequence[Mapping[str, Any]] | None = None,
) -> bytes:
    """PNG strip of one gap of a finished output image: measured, predicted..., measured.

    ``left`` names the gap by its left measured section; default: the gap nearest the
    middle of the volume. The statuses come from ``provenance``, by default the image's
    ``atlinter_ray.provenance`` attribute, which finishing writes once every task of
    the dataset is done.
    """
    url = store.image_url(ds.id)
    if provenance is None:
        provenance = store.image_attrs(ds.id).get("atlinter_ray", {}).get("provenance")
    if not provenance:
        raise StoreError(
            f"{url}: no 'atlinter_ray.provenance' attribute, so the run that writes it "
            "has not finished. Fix: rerun the same interpolation command to complete it."
        )
    gaps = montage_gaps(provenance)
    if not gaps:
        raise StoreError(f"{url}: no predicted slice lies between two measured sections")
    if left is None:
        middle = ds.n_slices / 2
        left, right = min(gaps, key=lambda g: (abs((g[0] + g[1]) / 2 - middle), g[0]))
    else:
        found = dict(gaps)
        if left not in found:
            raise ConfigError(
                f"montage of {url}: {left} is not a measured section followed by predicted "
                f"slices. Fix: choose one of {sorted(found)}"
            )
        right = found[left]
    by_slice = {p["slice"]: p for p in provenance}
    arr = store.open_array(ds.id)
    tiles = []
    for s in range(left, right + 1):
        img = _view(arr, ds, ds.axis_index, s)
        zoom = max(1, -(-_MIN_TILE // img.shape[0]))
        img = img.repeat(zoom, 0).repeat(zoom, 1)
        record = by_slice[s]
        bar = np.zeros((_STRIP * 3, img.shape[1], 3), np.uint8)
        bar[:] = STATUS_COLOURS.get(record["status"], (0, 0, 0))
        label = f"{s} {record['status']}"
        if record.get("t") is not None:
            label += f" t={record['t']:.2f}"
        cv2.putText(img, label, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 255, 255), 1)
        tiles.append(np.pad(np.concatenate([bar, img]), ((0, 0), (0, _GAP), (0, 0))))
    ok, png = cv2.imencode(".png", np.concatenate(tiles, axis=1)[:, :-_GAP])
    if not ok:
        raise RuntimeError("OpenCV could not encode the montage PNG")
    return png.tobytes()
