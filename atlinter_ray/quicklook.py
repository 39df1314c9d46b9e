"""Quick-look picture: three orthogonal mid-volume views, provenance colour-coded.

Each view that cuts across the sections gets a strip along the section axis telling
measured (green), predicted (magenta) and edge-filled (grey) slices apart, so a
reader sees at a glance which parts of the volume are data and which are model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import cv2
import numpy as np

from atlinter_ray.dataset import Dataset
from atlinter_ray.planning import EDGE, MEASURED, PREDICTED
from atlinter_ray.store import VolumeStore

#: BGR colours (OpenCV order) of the provenance strip.
STATUS_COLOURS = {MEASURED: (0, 200, 0), PREDICTED: (200, 0, 200), EDGE: (128, 128, 128)}
_STRIP = 6
_GAP = 8
_NAMES = ("AP", "DV", "LR")
_MIN_HEIGHT = 300


def _to_bgr(plane: np.ndarray, channels: int, peak: float) -> np.ndarray:
    """A 2-D (or channel-first RGB) plane as an 8-bit BGR picture."""
    img = np.moveaxis(plane, 0, -1)[..., ::-1] if channels > 1 else plane[..., None].repeat(3, -1)
    img = img.astype(np.float32)
    return np.clip(img * (255.0 / peak), 0, 255).astype(np.uint8)


def quicklook_png(
    store: VolumeStore, ds: Dataset, records: Mapping[str, Mapping[str, Any]]
) -> bytes:
    """PNG bytes of the three mid views of the dataset's output image."""
    arr = store.open_array(ds.id, mode="r")
    status = np.full(ds.n_slices, "", dtype=object)
    for record in records.values():
        for s in record["slices"]:
            status[s["slice"]] = s["status"]
    lead = arr.ndim - 3
    views = []
    for axis in range(3):
        index: list[Any] = [slice(None)] * arr.ndim
        index[lead + axis] = ds.reference_shape[axis] // 2
        img = _to_bgr(np.asarray(arr[tuple(index)]), ds.channels, ds.peak)
        dims = [d for d in range(3) if d != axis]
        if axis == 2:  # sagittal view: dorsal up, anterior left
            img, dims = img.transpose(1, 0, 2), dims[::-1]
        zoom = max(1, _MIN_HEIGHT // max(ds.reference_shape))
        img = img.repeat(zoom, 0).repeat(zoom, 1)
        if ds.axis_index in dims:
            strip = np.array([STATUS_COLOURS.get(s, (0, 0, 0)) for s in status], np.uint8)
            strip = strip.repeat(zoom, 0)
            if dims[0] == ds.axis_index:  # sections run down the rows
                img = np.concatenate([np.repeat(strip[:, None], _STRIP, 1), img], axis=1)
            else:  # sections run along the columns
                img = np.concatenate([img, np.repeat(strip[None], _STRIP, 0)], axis=0)
        label = f"{_NAMES[axis]} {ds.reference_shape[axis] // 2}"
        cv2.putText(img, label, (8, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 255, 255), 1)
        views.append(img)
    height = max(v.shape[0] for v in views)
    padded = [np.pad(v, ((0, height - v.shape[0]), (0, _GAP), (0, 0))) for v in views]
    ok, png = cv2.imencode(".png", np.concatenate(padded, axis=1))
    if not ok:
        raise RuntimeError("OpenCV could not encode the quick-look PNG")
    return png.tobytes()
