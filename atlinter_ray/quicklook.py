"""Quick-look pictures of an output image, provenance colour-coded, for QC.

:func:`quicklook_png` draws three orthogonal mid-volume views (from planes the
finishing pass collects while it streams the volume, so drawing reads nothing more),
under a title (dataset, model, date) and a legend. Each view that cuts across the
sections gets a strip along the section axis telling measured (green), predicted
(magenta) and edge-filled (grey) slices apart, so a reader sees at a glance which parts
of the volume are data and which are model; each view names its plane and position in
millimetres and carries a scale bar::

    atlinter_ray  gene  |  model dis  |  2026-12-06
    ■ measured  ■ predicted  ■ edge-filled
    [ coronal, AP 2.25 mm ][ horizontal, DV 1.95 mm ][ sagittal, LR 1.90 mm ]
      ▮ strip                                     ▬ strip        ━━ 20 mm

:func:`montage_png` draws one gap as a row of slices: a measured section, every
predicted slice after it, the next measured section, each under a bar of its status
colour, read from the provenance in the image's attributes. Given the true volume it
adds the true slices and the absolute error, on a fixed colour scale (0 to half
of full intensity, stated on its colour bar)::

    prediction [ measured 41 ][ predicted 42 t=0.25 ][ ... ][ measured 45 ]
    truth      [ 41 ][ 42 ][ ... ][ 45 ]
    |error|    [ 0  ][ .. ][ ... ][ 0  ]    colour bar 0 .. peak/2
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from typing import Any

import cv2
import numpy as np

from atlinter_ray.dataset import Dataset
from atlinter_ray.dtypes import in_data_units, recorded_scale
from atlinter_ray.errors import ConfigError, StoreError
from atlinter_ray.planning import EDGE, MEASURED, PREDICTED
from atlinter_ray.store import VolumeStore

#: BGR colours (OpenCV order) of the provenance strip.
STATUS_COLOURS = {MEASURED: (0, 200, 0), PREDICTED: (200, 0, 200), EDGE: (128, 128, 128)}
#: The montage's error scale: black at 0, the brightest colour at this share of full
#: intensity and above (fixed, so montages of different runs compare).
ERROR_SCALE = 0.5
_STRIP = 6
_GAP = 8
_NAMES = ("AP", "DV", "LR")
_PLANES = ("coronal", "horizontal", "sagittal")
_MIN_HEIGHT = 300
#: Montage tiles are magnified (whole pixels) until they are at least this tall.
_MIN_TILE = 160
_FONT = cv2.FONT_HERSHEY_SIMPLEX
_TEXT = (255, 255, 255)
_LABEL = (0, 255, 255)
#: Height of a line of header text, in pixels.
_LINE = 20


def _to_bgr(plane: np.ndarray, channels: int, peak: float) -> np.ndarray:
    """A 2-D (or channel-first RGB) plane as an 8-bit BGR picture."""
    img = np.moveaxis(plane, 0, -1)[..., ::-1] if channels > 1 else plane[..., None].repeat(3, -1)
    img = img.astype(np.float32)
    return np.clip(img * (255.0 / peak), 0, 255).astype(np.uint8)


def _view(arr: Any, ds: Dataset, axis: int, position: int) -> np.ndarray:
    """The plane at ``position`` along reference ``axis`` of an image array, as BGR."""
    return _plane_bgr(_plane(arr, axis, position), ds, axis)


def _plane(arr: Any, axis: int, position: int) -> np.ndarray:
    """The raw plane at ``position`` along reference ``axis`` of a ``([C,] Z, Y, X)`` array."""
    plane: np.ndarray = np.take(_planes(arr, axis, position, position + 1), 0,
                                axis=arr.ndim - 3 + axis)
    return plane


def _planes(arr: Any, axis: int, start: int, stop: int) -> np.ndarray:
    """Planes ``start`` to ``stop - 1`` along reference ``axis``, read at once (a slab-deep
    inner chunk is then read and decoded once, not once per plane)."""
    index: list[Any] = [slice(None)] * arr.ndim
    index[arr.ndim - 3 + axis] = slice(start, stop)
    return np.asarray(arr[tuple(index)])


def _plane_bgr(plane: np.ndarray, ds: Dataset, axis: int, scale: float = 1.0) -> np.ndarray:
    """A plane across reference ``axis`` (``([C,] a, b)``, written times ``scale``) as BGR.

    Sagittal planes are turned: dorsal up.
    """
    img = _to_bgr(plane, ds.channels, ds.peak * scale)
    return img.transpose(1, 0, 2) if axis == 2 else img


def voxel_um(ds: Dataset) -> float:
    """The dataset's voxel size in micrometres (25 for the CCF)."""
    return float(ds.metadata.get("voxel_size_um", 25.0))


def _length(um: float) -> str:
    """A length as people write it: ``500 µm``, ``2 mm``, ``2.25 mm``."""
    return f"{um:g} µm" if um < 1000 else f"{um / 1000:.3g} mm"


def _text_width(text: str, scale: float) -> int:
    """Width in pixels of ``text`` as :func:`_put` draws it."""
    (w, _), _ = cv2.getTextSize(text.replace("µ", "u"), _FONT, scale, 1)
    return int(w)


def _put(img: np.ndarray, text: str, org: tuple[int, int], scale: float = 0.45,
         colour: tuple[int, int, int] = _TEXT) -> None:
    """Draw ``text`` at ``org`` (baseline left); ``µ`` is drawn as a ``u`` with a tail."""
    x, y = org
    for k, part in enumerate(text.split("µ")):
        if k:
            cv2.putText(img, "u", (x, y), _FONT, scale, colour, 1, cv2.LINE_AA)
            cv2.line(img, (x + 1, y - int(10 * scale)), (x + 1, y + int(8 * scale)), colour, 1)
            x += _text_width("u", scale)
        cv2.putText(img, part, (x, y), _FONT, scale, colour, 1, cv2.LINE_AA)
        x += _text_width(part, scale)


def _nice_length(max_um: float) -> float:
    """The largest 1, 2 or 5 times a power of ten that is at most ``max_um``."""
    power = 10.0 ** np.floor(np.log10(max_um))
    return float(max(m * power for m in (1, 2, 5) if m * power <= max_um))


def _scale_bar(img: np.ndarray, um_per_px: float) -> None:
    """A white bar about a quarter of the view wide, labelled, at the bottom right."""
    length_um = _nice_length(img.shape[1] * um_per_px / 4)
    px = max(1, round(length_um / um_per_px))
    x1, y = img.shape[1] - 10, img.shape[0] - 10
    cv2.rectangle(img, (x1 - px, y - 3), (x1, y), _TEXT, -1)
    label = _length(length_um)
    _put(img, label, (x1 - px // 2 - _text_width(label, 0.4) // 2, y - 7), 0.4)


def _legend(width: int) -> np.ndarray:
    """One line: a square of each status colour and its name."""
    band = np.zeros((_LINE, width, 3), np.uint8)
    x = 8
    for status in (MEASURED, PREDICTED, EDGE):
        cv2.rectangle(band, (x, 5), (x + 10, 15), STATUS_COLOURS[status], -1)
        _put(band, status, (x + 15, 15), 0.42)
        x += 15 + _text_width(status, 0.42) + 18
    return band


def _header(width: int, lines: Sequence[str]) -> np.ndarray:
    """A black band with one line of text per entry of ``lines``."""
    band = np.zeros((_LINE * len(lines) + 6, width, 3), np.uint8)
    for k, line in enumerate(lines):
        _put(band, line, (8, _LINE * (k + 1)), 0.5)
    return band


def title(ds: Dataset, model: str, date: str | None = None) -> str:
    """The pictures' title: dataset, model and date (today, UTC, by default)."""
    day = date or datetime.datetime.now(datetime.UTC).date().isoformat()
    return f"{ds.id}  |  model {model or '?'}  |  {day}"


def _encode(img: np.ndarray, what: str) -> bytes:
    """PNG bytes of a BGR picture."""
    ok, png = cv2.imencode(".png", img)
    if not ok:
        raise RuntimeError(f"OpenCV could not encode the {what} PNG")
    return bytes(png.tobytes())


def mid_positions(ds: Dataset) -> tuple[int, int, int]:
    """Where the quick-look cuts the volume: the middle of each reference axis."""
    a, b, c = (n // 2 for n in ds.reference_shape)
    return a, b, c


def quicklook_png(ds: Dataset, planes: Sequence[np.ndarray], status: Sequence[str],
                  model: str = "", date: str | None = None, scale: float = 1.0) -> bytes:
    """PNG bytes of the three mid views of a volume, with provenance strips.

    ``planes[a]`` is the volume's plane at ``mid_positions(ds)[a]`` across reference
    axis ``a``, ``([C,] ...)`` in array order; ``status[s]`` the status of slice ``s``
    along the section axis (measured, predicted, edge-filled or empty). ``model`` and
    ``date`` (default: today) go into the title; ``scale`` is the one the values were
    written with (``output.dtype_scaling``).
    """
    views = []
    zoom = max(1, _MIN_HEIGHT // max(ds.reference_shape))
    for axis in range(3):
        img = _plane_bgr(planes[axis], ds, axis, scale)
        dims = [d for d in range(3) if d != axis]
        if axis == 2:  # the sagittal view was turned: dorsal up, anterior left
            dims = dims[::-1]
        img = np.ascontiguousarray(img.repeat(zoom, 0).repeat(zoom, 1))
        _scale_bar(img, voxel_um(ds) / zoom)
        if ds.axis_index in dims:
            strip = np.array([STATUS_COLOURS.get(s, (0, 0, 0)) for s in status], np.uint8)
            strip = strip.repeat(zoom, 0)
            if dims[0] == ds.axis_index:  # sections run down the rows
                img = np.concatenate([np.repeat(strip[:, None], _STRIP, 1), img], axis=1)
            else:  # sections run along the columns
                img = np.concatenate([img, np.repeat(strip[None], _STRIP, 0)], axis=0)
        position = _length(mid_positions(ds)[axis] * voxel_um(ds))
        label = np.zeros((_LINE, img.shape[1], 3), np.uint8)
        _put(label, f"{_PLANES[axis]}, {_NAMES[axis]} {position}", (4, 14), 0.42, _LABEL)
        views.append(np.concatenate([label, img]))
    height = max(v.shape[0] for v in views)
    body = np.concatenate([np.pad(v, ((0, height - v.shape[0]), (0, _GAP), (0, 0))) for v in views],
                          axis=1)
    head = _header(body.shape[1], [title(ds, model, date)])
    return _encode(np.concatenate([head, _legend(body.shape[1]), body]), "quick-look")


def montage_gaps(provenance: Sequence[Mapping[str, Any]]) -> list[tuple[int, int]]:
    """``(left, right)`` measured sections with only predicted slices between them."""
    status = {p["slice"]: p["status"] for p in provenance}
    measured = sorted(s for s, st in status.items() if st == MEASURED)
    return [
        (lo, hi) for lo, hi in zip(measured, measured[1:])
        if hi - lo > 1 and all(status.get(s) == PREDICTED for s in range(lo + 1, hi))
    ]


def _error_bgr(pred: np.ndarray, true: np.ndarray, ds: Dataset, axis: int) -> np.ndarray:
    """|pred - true| (channels averaged) on the fixed scale, as a BGR colour-map picture."""
    diff = np.abs(pred.astype(np.float32) - true.astype(np.float32))
    if ds.channels > 1:
        diff = diff.mean(axis=0)
    level = np.clip(diff * (255.0 / (ERROR_SCALE * ds.peak)), 0, 255).astype(np.uint8)
    img = cv2.applyColorMap(level, cv2.COLORMAP_INFERNO)
    return np.ascontiguousarray(img.transpose(1, 0, 2)) if axis == 2 else img


def _colour_bar(width: int, peak: float) -> np.ndarray:
    """The error scale: the colour map from 0 to ``ERROR_SCALE`` of full intensity, labelled."""
    band = np.zeros((_LINE + 4, width, 3), np.uint8)
    label = "|error|: 0"
    _put(band, label, (8, 16), 0.42)
    x0 = 14 + _text_width(label, 0.42)
    bar_w = min(256, max(64, width - x0 - 200))
    ramp = cv2.applyColorMap(np.linspace(0, 255, bar_w).astype(np.uint8)[None], cv2.COLORMAP_INFERNO)
    band[6:18, x0:x0 + bar_w] = ramp.repeat(12, 0)
    _put(band, f"{ERROR_SCALE * peak:g} and above ({ERROR_SCALE:.0%} of full intensity)",
         (x0 + bar_w + 6, 16), 0.42)
    return band


def montage_png(
    store: VolumeStore,
    ds: Dataset,
    left: int | None = None,
    provenance: Sequence[Mapping[str, Any]] | None = None,
    truth: np.ndarray | None = None,
    date: str | None = None,
    scale: float | None = None,
) -> bytes:
    """PNG of one gap of a finished output image: measured, predicted..., measured.

    ``left`` names the gap by its left measured section; default: the gap nearest the
    middle of the volume. The statuses come from ``provenance``, by default the image's
    ``atlinter_ray.provenance`` attribute, which finishing writes once every task of
    the dataset is done. ``truth`` (the whole true volume, reference orientation,
    channels last) adds a row of true slices and one of absolute error, in the data's
    units: ``scale`` (by default the one the image records) maps the stored values back.
    """
    url = store.image_url(ds.id)
    if provenance is None or scale is None:
        record = store.image_attrs(ds.id).get("atlinter_ray", {})
        provenance = record.get("provenance") if provenance is None else provenance
        scale = recorded_scale(record) if scale is None else scale
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
    axis = ds.axis_index
    block = _planes(store.open_array(ds.id), axis, left, right + 1)
    rows: list[list[np.ndarray]] = [[], [], []] if truth is not None else [[]]
    for s in range(left, right + 1):
        raw = np.take(block, s - left, axis=block.ndim - 3 + axis)
        img = _plane_bgr(raw, ds, axis, scale)
        zoom = max(1, -(-_MIN_TILE // img.shape[0]))
        record = by_slice[s]
        bar = np.zeros((_STRIP * 3, img.shape[1] * zoom, 3), np.uint8)
        bar[:] = STATUS_COLOURS.get(record["status"], (0, 0, 0))
        label = f"{s} {record['status']}"
        if record.get("t") is not None:
            label += f" t={record['t']:.2f}"
        tiles = [img]
        if truth is not None:
            true = np.moveaxis(np.take(truth, s, axis=axis), -1, 0) if ds.channels > 1 \
                else np.take(truth, s, axis=axis)
            tiles += [_plane_bgr(true, ds, axis),
                      _error_bgr(in_data_units(raw, scale), true, ds, axis)]
        for k, (row, tile) in enumerate(zip(rows, tiles)):
            tile = np.ascontiguousarray(tile.repeat(zoom, 0).repeat(zoom, 1))
            if k == 0:
                _put(tile, label, (4, 14), 0.4, _LABEL)
                tile = np.concatenate([bar, tile])
            elif s == left:
                _put(tile, ("truth", "|error|")[k - 1], (4, 14), 0.4, _LABEL)
            row.append(np.pad(tile, ((0, _GAP), (0, _GAP), (0, 0))))
    body = np.concatenate([np.concatenate(row, axis=1) for row in rows])[:-_GAP, :-_GAP]
    model = next((str(by_slice[s].get("model")) for s in range(left + 1, right)
                  if by_slice[s].get("model")), "")
    head = _header(body.shape[1], [title(ds, model, date),
                                   f"gap {right - left}: slices {left} to {right}"])
    parts = [head, _legend(body.shape[1]), body]
    if truth is not None:
        parts.append(_colour_bar(body.shape[1], ds.peak))
    return _encode(np.concatenate(parts), "montage")
