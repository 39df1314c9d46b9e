"""Pure geometry that maps Allen section images into the 25 µm reference space.

What the Allen API gives (Allen Mouse Brain Atlas, product ``Mouse``)::

    Gene ──< SectionDataSet (one ISH experiment in one plane) ──< SectionImage

    SectionDataSet.alignment3d   tvr_00..11  volume µm -> reference µm
                                 trv_00..11  reference µm -> volume µm
    SectionDataSet               section_thickness (µm), reference_space_id
    SectionImage.alignment2d     tsv_00..05  image pixel -> volume µm
                                 tvs_00..05  volume µm -> image pixel
    SectionImage                 section_number

A 3D matrix is stored row-major as a 3x3 linear part (``_00``..``_08``) followed by a
translation (``_09``..``_11``); a 2D matrix as a 2x2 linear part (``_00``..``_03``) and a
translation (``_04``, ``_05``). A reference point ``(p, i, r)`` in µm (anterior->posterior,
superior->inferior, left->right) maps to a full-resolution image pixel ``(x, y)`` by
``(x, y) = tvs · (trv · (p, i, r, 1))[:2]``; the dropped third volume coordinate is
``section_number * section_thickness``.

Full-resolution section images are 0.645, 1.049 or 1.63 µm per pixel, depending on the
scanner (the SectionImage's ``resolution``). The image service cuts JPEG2000 resolution
levels: sample ``n`` of level ``d`` (``downsample=d``) lies on full-resolution pixel
``2**d * n`` (the wavelet's low-pass filter is centred on the even samples), so the
full-resolution transforms hold at every level after scaling by ``2**-d``, with no
half-pixel shift.

Conventions copied from the predecessor (atlinter 0.2.3, which used atldld 0.2.2):

* a section's position along the plane normal is the reference coordinate (``p`` for
  coronal, ``r`` for sagittal) of its image pixel ``(0, 0)``; its slice index in the
  25 µm atlas is that coordinate ``// 25``. atldld asked the API's ``image_to_reference``
  service for it; we compute the composition atldld's documentation describes locally
  from ``tsv`` and ``tvr``, saving one request per image. Sections are cut at a slight
  tilt to the reference planes, so the top-left pixel, usually outside the tissue, can
  lie slices away from it: :class:`SectionPoint` offers the image centre or the
  tissue's centroid instead (:func:`section_point`);
* the whole reference plane at that coordinate is mapped into the image and sampled
  with bilinear interpolation, the outside filled with the image's top-left colour.
  atldld built a dense displacement field from the transform of the image the API's
  ``reference_to_image`` service picked; we use the section image's own ``alignment2d``
  and one :func:`cv2.warpAffine`, the same map since the map is affine.

Reference planes at 25 µm: coronal ``(320, 456)`` (rows ``i``, columns ``r``), sagittal
``(528, 320)`` (rows ``p``, columns ``i``), the layout the predecessor's ``GeneDataset``
reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import cv2
import numpy as np

from atlinter_ray.errors import ConfigError, DatasetError

#: Side of a reference-space voxel in µm.
VOXEL_UM = 25.0


class MissingTransformError(DatasetError):
    """An experiment or section image has no alignment matrix in the Allen API."""


@dataclass(frozen=True, slots=True)
class Plane:
    """One sectioning plane: API names and the reference-plane geometry."""

    name: str
    #: ``plane_of_section_id`` in the API.
    plane_id: int
    #: (rows, columns) of one section in the 25 µm reference space.
    shape: tuple[int, int]
    #: Number of reference slices along the plane normal.
    n_slices: int
    #: Index of the normal axis in (p, i, r).
    normal_axis: int


PLANES: dict[str, Plane] = {
    "coronal": Plane("coronal", 1, (320, 456), 528, 0),
    "sagittal": Plane("sagittal", 2, (528, 320), 456, 2),
}


def get_plane(name: str) -> Plane:
    """Return the :class:`Plane` called ``name``; unknown names raise ConfigError."""
    try:
        return PLANES[name]
    except KeyError:
        raise ConfigError(
            f"plane {name!r} is not supported: choose one of {sorted(PLANES)}"
        ) from None


def _matrix(fields: Any, prefix: str, size: int, where: str) -> np.ndarray:
    """Read ``prefix_00..`` from an alignment record into a (size, size+1) matrix."""
    n_linear = size * size
    names = [f"{prefix}_{k:02d}" for k in range(n_linear + size)]
    if not isinstance(fields, dict):
        raise MissingTransformError(
            f"{where} has no alignment{size}d record in the Allen API, so it cannot be "
            "placed in the reference space; drop this experiment from the run or report it "
            "to the Allen Institute"
        )
    values = [fields.get(n) for n in names]
    missing = [n for n, v in zip(names, values, strict=True) if v is None]
    if missing:
        raise MissingTransformError(
            f"{where}: alignment{size}d lacks {', '.join(missing)}, so it cannot be placed in "
            "the reference space; drop this experiment from the run"
        )
    values_f = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(values_f)):
        raise MissingTransformError(f"{where}: alignment{size}d {prefix} has non-finite values")
    return np.hstack(
        [values_f[:n_linear].reshape(size, size), values_f[n_linear:].reshape(size, 1)]
    )


def affine_3d(alignment3d: Any, direction: str, where: str) -> np.ndarray:
    """The (3, 4) matrix ``direction`` (``tvr`` or ``trv``) of an experiment's alignment3d."""
    return _matrix(alignment3d, direction, 3, where)


def affine_2d(alignment2d: Any, direction: str, where: str) -> np.ndarray:
    """The (2, 3) matrix ``direction`` (``tsv`` or ``tvs``) of a section image's alignment2d."""
    return _matrix(alignment2d, direction, 2, where)


def section_coordinate(
    tsv: np.ndarray,
    tvr: np.ndarray,
    section_number: float,
    section_thickness: float,
    plane: str,
    xy: tuple[float, float] = (0.0, 0.0),
) -> float:
    """Reference coordinate (µm) along the plane normal of full-resolution image pixel ``xy``."""
    vx, vy = tsv @ np.array([xy[0], xy[1], 1.0])
    pir = tvr @ np.array([vx, vy, section_number * section_thickness, 1.0])
    return float(pir[get_plane(plane).normal_axis])


class SectionPoint(StrEnum):
    """Which image point places a section along the plane normal (``section_point``)."""

    #: Pixel (0, 0), the predecessor's rule; known before the image is downloaded.
    top_left = "top_left"
    #: The centre of the image.
    centre = "centre"
    #: The centroid of the tissue (pixels darker than the background, Otsu's threshold).
    tissue = "tissue"


def section_point(image: np.ndarray, rule: SectionPoint | str, downsample: int) -> tuple[float, float]:
    """Full-resolution pixel ``(x, y)`` that places the section, from its downloaded image.

    ``tissue`` falls back to the centre when the image has no two tones to tell apart.
    """
    rule = SectionPoint(rule)
    if rule == SectionPoint.top_left:
        return 0.0, 0.0
    scale = 2.0 ** int(downsample)
    h, w = image.shape[:2]
    centre = ((w - 1) * scale / 2, (h - 1) * scale / 2)
    if rule == SectionPoint.centre:
        return centre
    gray = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    if gray.min() == gray.max():
        return centre
    _, tissue = cv2.threshold(gray, 0, 1, cv2.THRESH_BINARY_INV | cv2.THRESH_OTSU)
    rows, cols = np.nonzero(tissue)
    return float(cols.mean()) * scale, float(rows.mean()) * scale


def slice_index(coordinate_um: float) -> int:
    """The 25 µm reference slice holding ``coordinate_um`` (the predecessor's ``// 25``)."""
    return int(coordinate_um // VOXEL_UM)


def plane_to_image(
    plane: str, coordinate_um: float, trv: np.ndarray, tvs: np.ndarray, downsample: int
) -> np.ndarray:
    """(2, 3) affine map from reference-plane pixel (col, row) to downsampled image (x, y).

    Full-resolution pixel ``x`` is pixel ``x / 2**downsample`` of the downsampled image
    (JPEG2000 levels, see the module docstring); ``downsample=0`` is the predecessor's map.
    """
    c = VOXEL_UM
    if get_plane(plane).name == "coronal":  # rows i, columns r, p fixed
        dst_to_pir = np.array([[0, 0, coordinate_um], [0, c, 0], [c, 0, 0], [0, 0, 1.0]])
    else:  # sagittal: rows p, columns i, r fixed
        dst_to_pir = np.array([[0, c, 0], [c, 0, 0], [0, 0, coordinate_um], [0, 0, 1.0]])
    volume_xy1 = np.vstack([(trv @ dst_to_pir)[:2], [0, 0, 1.0]])
    full_res = tvs @ volume_xy1
    matrix: np.ndarray = full_res * 2.0 ** -int(downsample)
    return matrix


def warp_to_reference(image: np.ndarray, matrix: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Sample ``image`` on the reference plane: ``out[row, col] = image[matrix @ (col, row, 1)]``.

    Bilinear, the outside filled with the image's top-left colour (as the predecessor did).
    """
    fill = image[0, 0].tolist() if image.ndim == 3 else float(image[0, 0])
    if isinstance(fill, list):
        fill = fill + [0] * (4 - len(fill))
    return cv2.warpAffine(
        image,
        matrix.astype(np.float64),
        (shape[1], shape[0]),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=fill,
    )
