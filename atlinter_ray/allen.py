"""Allen Brain Institute API client and the pure geometry that maps sections into the atlas.

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

Conventions copied from the predecessor (atlinter 0.2.3, which used atldld 0.2.2):

* a section's position along the plane normal is the reference coordinate (``p`` for
  coronal, ``r`` for sagittal) of its image pixel ``(0, 0)``; its slice index in the
  25 µm atlas is that coordinate ``// 25``. atldld asked the API's ``image_to_reference``
  service for it; we compute the composition atldld's documentation describes locally
  from ``tsv`` and ``tvr``, saving one request per image;
* the whole reference plane at that coordinate is mapped into the image and sampled
  with bilinear interpolation, the outside filled with the image's top-left colour.
  atldld built a dense displacement field from the transform of the image the API's
  ``reference_to_image`` service picked; we use the section image's own ``alignment2d``
  and one :func:`cv2.warpAffine`, the same map since the map is affine.

Reference planes at 25 µm: coronal ``(320, 456)`` (rows ``i``, columns ``r``), sagittal
``(528, 320)`` (rows ``p``, columns ``i``), the layout the predecessor's ``GeneDataset``
reads.

Transport is ``requests`` (a session per client, connection reuse). Every request goes
through a :class:`RateLimiter` and is retried with exponential backoff on 5xx, 429,
timeouts and connection errors; other 4xx fail at once.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import cv2
import numpy as np
import requests

from atlinter_ray.errors import AtlinterRayError, ConfigError, DatasetError

#: Side of a reference-space voxel in µm.
VOXEL_UM = 25.0
#: Default public API root.
DEFAULT_API_URL = "http://api.brain-map.org"
_GENE_SYMBOL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-/()@+]*$")


class AllenApiError(AtlinterRayError, ConnectionError):
    """The Allen API failed (after retries) or answered with an error envelope."""


class UnknownGeneError(ConfigError):
    """A gene symbol is not a gene of the Allen Mouse Brain Atlas."""


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


# --------------------------------------------------------------------------- queries


def check_gene_symbol(gene: str) -> str:
    """Return ``gene`` if it is a plausible symbol; raise ConfigError otherwise."""
    if not isinstance(gene, str) or not _GENE_SYMBOL.match(gene):
        raise ConfigError(
            f"gene {gene!r} is not a valid gene symbol (letters, digits and ._-/()@+ only); "
            "fix the `genes` list in the download config"
        )
    return gene


def gene_criteria(gene: str, *, case_insensitive: bool = False) -> str:
    """RMA criteria selecting the Mouse Brain Atlas gene with acronym ``gene``."""
    op = "$il" if case_insensitive else "$eq"
    return (
        f"model::Gene,rma::criteria,[acronym{op}'{check_gene_symbol(gene)}'],"
        "products[abbreviation$eq'Mouse']"
    )


def experiments_criteria(gene: str, plane: str) -> str:
    """RMA criteria for the passed ISH experiments of ``gene`` in ``plane``, with 3D transforms."""
    return (
        "model::SectionDataSet,rma::criteria,[failed$eq'false'],"
        "products[abbreviation$eq'Mouse'],"
        f"plane_of_section[name$eq'{get_plane(plane).name}'],"
        f"genes[acronym$eq'{check_gene_symbol(gene)}'],rma::include,alignment3d"
    )


def section_images_criteria(experiment_id: int) -> str:
    """RMA criteria for the section images of one experiment, with 2D transforms."""
    return (
        "model::SectionImage,rma::criteria,"
        f"section_data_set[id$eq{int(experiment_id)}],rma::include,alignment2d"
    )


def query_url(api_url: str, criteria: str, *, start_row: int = 0, num_rows: int = 2000) -> str:
    """The ``query.json`` URL for ``criteria``, one page of ``num_rows`` from ``start_row``."""
    options = f",rma::options[start_row$eq{start_row}][num_rows$eq{num_rows}]"
    return f"{api_url.rstrip('/')}/api/v2/data/query.json?criteria=" + quote(
        criteria + options, safe=":,[]$'=()"
    )


def section_image_url(api_url: str, image_id: int, downsample: int) -> str:
    """The section image download URL, downsampled ``downsample`` times by 2."""
    return (
        f"{api_url.rstrip('/')}/api/v2/section_image_download/{int(image_id)}"
        f"?downsample={int(downsample)}"
    )


@dataclass(frozen=True, slots=True)
class RmaPage:
    """One page of an RMA answer."""

    rows: list[dict[str, Any]]
    start_row: int
    total_rows: int


def parse_rma_response(payload: Any, url: str) -> RmaPage:
    """Check the RMA envelope ``{"success", "start_row", "total_rows", "msg"}``; return its page."""
    if not isinstance(payload, dict) or "success" not in payload or "msg" not in payload:
        raise AllenApiError(
            f"{url} did not answer with an RMA envelope (keys success, msg); "
            "check that api_url points at the Allen API root"
        )
    if payload["success"] is not True:
        raise AllenApiError(f"the Allen API refused {url}: {payload['msg']}")
    rows = payload["msg"]
    if not isinstance(rows, list):
        raise AllenApiError(f"{url}: field msg should be a list of rows, got {type(rows).__name__}")
    return RmaPage(
        rows=rows,
        start_row=int(payload.get("start_row", 0)),
        total_rows=int(payload.get("total_rows", len(rows))),
    )


# -------------------------------------------------------------------------- geometry


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


def slice_index(coordinate_um: float) -> int:
    """The 25 µm reference slice holding ``coordinate_um`` (the predecessor's ``// 25``)."""
    return int(coordinate_um // VOXEL_UM)


def plane_to_image(
    plane: str, coordinate_um: float, trv: np.ndarray, tvs: np.ndarray, downsample: int
) -> np.ndarray:
    """(2, 3) affine map from reference-plane pixel (col, row) to downsampled image (x, y).

    Full-resolution pixel ``x`` lies at ``(x + 0.5) / 2**downsample - 0.5`` in the
    downsampled image (pixel centres), so ``downsample=0`` is exactly the predecessor's map.
    """
    c = VOXEL_UM
    if get_plane(plane).name == "coronal":  # rows i, columns r, p fixed
        dst_to_pir = np.array([[0, 0, coordinate_um], [0, c, 0], [c, 0, 0], [0, 0, 1.0]])
    else:  # sagittal: rows p, columns i, r fixed
        dst_to_pir = np.array([[0, c, 0], [c, 0, 0], [0, 0, coordinate_um], [0, 0, 1.0]])
    volume_xy1 = np.vstack([(trv @ dst_to_pir)[:2], [0, 0, 1.0]])
    full_res = tvs @ volume_xy1
    scale = 2.0 ** -int(downsample)
    matrix = full_res * scale
    matrix[:, 2] += 0.5 * scale - 0.5
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


def decode_image(data: bytes, where: str) -> np.ndarray:
    """Decode a downloaded JPEG/PNG into uint8 RGB ``(H, W, 3)`` or grayscale ``(H, W)``."""
    img = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None:
        head = data[:80]
        raise AllenApiError(
            f"{where} is not a decodable image ({len(data)} bytes, starting {head!r}); "
            "the API may have answered with an error page"
        )
    if img.dtype != np.uint8:
        raise AllenApiError(f"{where}: expected an 8-bit image, got {img.dtype}")
    if img.ndim == 3 and img.shape[2] == 4:
        img = cv2.cvtColor(img, cv2.COLOR_BGRA2RGB)
    elif img.ndim == 3:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    return np.ascontiguousarray(img)


# ------------------------------------------------------------------------- transport


class RateLimiter:
    """Spaces calls at least ``1 / max_per_second`` apart (thread-safe); <= 0 disables it."""

    def __init__(
        self,
        max_per_second: float,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        """Allow ``max_per_second`` acquisitions per second."""
        self.interval = 1.0 / max_per_second if max_per_second > 0 else 0.0
        self._clock, self._sleep = clock, sleep
        self._next = 0.0
        self._lock = threading.Lock()

    def acquire(self) -> None:
        """Block until the next call is allowed."""
        if self.interval == 0.0:
            return
        with self._lock:
            now = self._clock()
            start = max(now, self._next)
            self._next = start + self.interval
        if start > now:
            self._sleep(start - now)


def backoff_delay(attempt: int, base_s: float, cap_s: float = 30.0) -> float:
    """Seconds to wait before retry ``attempt`` (1-based): ``base * 2**(attempt-1)``, capped."""
    return min(cap_s, base_s * 2.0 ** (attempt - 1))


_RETRY_STATUS = frozenset({429, 500, 502, 503, 504})


class AllenClient:
    """Talks to the Allen API: paged RMA queries and section image downloads."""

    def __init__(
        self,
        api_url: str = DEFAULT_API_URL,
        *,
        max_requests_per_second: float = 5.0,
        retries: int = 5,
        backoff_s: float = 1.0,
        timeout_s: float = 60.0,
        page_size: int = 2000,
    ) -> None:
        """Create a client for ``api_url`` with its own session and rate limiter."""
        self.api_url = api_url.rstrip("/")
        self.retries = int(retries)
        self.backoff_s = float(backoff_s)
        self.timeout_s = float(timeout_s)
        self.page_size = int(page_size)
        self.limiter = RateLimiter(max_requests_per_second)
        self.session = requests.Session()

    def get(self, url: str) -> bytes:
        """GET ``url``; retry transient failures; raise AllenApiError when out of retries."""
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(backoff_delay(attempt, self.backoff_s))
            self.limiter.acquire()
            try:
                response = self.session.get(url, timeout=self.timeout_s)
            except (requests.ConnectionError, requests.Timeout) as exc:
                last = f"{type(exc).__name__}: {exc}"
                continue
            if response.status_code == 200:
                return response.content
            last = f"HTTP {response.status_code} {response.reason}"
            if response.status_code not in _RETRY_STATUS:
                break
        raise AllenApiError(
            f"GET {url} failed after {attempt + 1} attempt(s): {last}; check the network and "
            "api_url, or raise `retries`/`backoff_s` if the API is overloaded"
        )

    def query(self, criteria: str) -> list[dict[str, Any]]:
        """All rows of an RMA query, following ``start_row``/``total_rows`` paging."""
        rows: list[dict[str, Any]] = []
        while True:
            url = query_url(self.api_url, criteria, start_row=len(rows), num_rows=self.page_size)
            try:
                payload = json.loads(self.get(url))
            except ValueError as exc:
                raise AllenApiError(f"{url} did not answer with JSON: {exc}") from None
            page = parse_rma_response(payload, url)
            rows.extend(page.rows)
            if not page.rows or len(rows) >= page.total_rows:
                return rows

    def gene_exists(self, gene: str) -> bool:
        """Whether ``gene`` is an exact Mouse Brain Atlas gene acronym."""
        return bool(self.query(gene_criteria(gene)))

    def similar_genes(self, gene: str) -> list[str]:
        """Acronyms equal to ``gene`` ignoring case (for 'did you mean')."""
        return sorted(
            {str(r.get("acronym")) for r in self.query(gene_criteria(gene, case_insensitive=True))}
        )

    def experiments(self, gene: str, plane: str) -> list[dict[str, Any]]:
        """SectionDataSet rows (with ``alignment3d``) of ``gene`` in ``plane``."""
        return self.query(experiments_criteria(gene, plane))

    def section_images(self, experiment_id: int) -> list[dict[str, Any]]:
        """SectionImage rows (with ``alignment2d``) of one experiment."""
        return self.query(section_images_criteria(experiment_id))

    def section_image(self, image_id: int, downsample: int) -> np.ndarray:
        """Download and decode one section image at ``downsample``."""
        url = section_image_url(self.api_url, image_id, downsample)
        return decode_image(self.get(url), f"section image {image_id} ({url})")

    def close(self) -> None:
        """Close the HTTP session."""
        self.session.close()
