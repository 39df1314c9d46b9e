"""Allen Brain Institute API client: RMA queries, section image downloads.

What the Allen API gives (Allen Mouse Brain Atlas, product ``Mouse``)::

    Gene ──< SectionDataSet (one ISH experiment in one plane) ──< SectionImage

Transport is ``requests`` (a session per client, connection reuse) with urllib3's
``Retry``: 5xx, 429 (honouring ``Retry-After``), timeouts and connection errors are
retried with exponential backoff; other 4xx fail at once, and so does a host name that
does not resolve (offline, or a wrong ``api_url``: retrying cannot help, and six tries
took 33 s to say so). Every request also goes
through a :class:`RateLimiter`, whose budget the whole job shares.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self
from urllib.parse import quote, urlsplit

import cv2
import numpy as np
import requests
from requests.adapters import HTTPAdapter
from urllib3.connectionpool import ConnectionPool
from urllib3.exceptions import MaxRetryError, NameResolutionError
from urllib3.response import BaseHTTPResponse
from urllib3.util.retry import Retry

from atlinter_ray.allen.geometry import get_plane
from atlinter_ray.errors import AtlinterRayError, ConfigError

#: Default public API root.
DEFAULT_API_URL = "http://api.brain-map.org"
#: The 25 µm Nissl volume of the reference space, as Allen ships it (gzip NRRD).
DEFAULT_NISSL_URL = (
    "http://download.alleninstitute.org/informatics-archive/current-release/mouse_ccf/"
    "ara_nissl/ara_nissl_25.nrrd"
)
_GENE_SYMBOL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-/()@+]*$")


class AllenApiError(AtlinterRayError, ConnectionError):
    """The Allen API failed (after retries) or answered with an error envelope."""

    exit_status = 1


class UnknownGeneError(ConfigError):
    """A gene symbol is not a gene of the Allen Mouse Brain Atlas."""


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


# ---------------------------------------------------------------------------- images


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


_RETRY_STATUS = frozenset({429, 500, 502, 503, 504})


class _Retry(Retry):
    """urllib3's ``Retry``, except that a host name that does not resolve fails at once."""

    def increment(
        self,
        method: str | None = None,
        url: str | None = None,
        response: BaseHTTPResponse | None = None,
        error: Exception | None = None,
        _pool: ConnectionPool | None = None,
        _stacktrace: TracebackType | None = None,
    ) -> Self:
        """Give up on a DNS failure; count and back off on anything else, as urllib3 does."""
        if isinstance(error, NameResolutionError):
            raise MaxRetryError(_pool, url or "", error) from error  # type: ignore[arg-type]
        return super().increment(method, url, response, error, _pool, _stacktrace)


def unresolved_host(exc: BaseException) -> str | None:
    """The host name whose lookup failed somewhere in ``exc``'s causes, or None."""
    seen: set[int] = set()
    todo: list[Any] = [exc]
    while todo:
        item = todo.pop()
        if not isinstance(item, BaseException) or id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, NameResolutionError):
            return str(getattr(item.conn, "host", "")) or "the server"
        todo += [*item.args, getattr(item, "reason", None), item.__cause__, item.__context__]
    return None


def retry_policy(retries: int, backoff_s: float, cap_s: float = 30.0) -> Retry:
    """urllib3's retry policy for GETs: 5xx, 429 (its ``Retry-After`` honoured), timeouts."""
    return _Retry(
        total=retries,
        backoff_factor=backoff_s,
        backoff_max=cap_s,
        status_forcelist=_RETRY_STATUS,
        allowed_methods=frozenset({"GET"}),
        respect_retry_after_header=True,
        raise_on_status=False,
    )


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
        self.timeout_s = float(timeout_s)
        self.page_size = int(page_size)
        self.limiter = RateLimiter(max_requests_per_second)
        self.session = requests.Session()
        adapter = HTTPAdapter(max_retries=retry_policy(self.retries, float(backoff_s)))
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)

    def get(self, url: str) -> bytes:
        """GET ``url``; urllib3 retries transient failures; AllenApiError when out of retries.

        The rate limiter spaces requests; retries of one request are spaced by the backoff
        (or the server's ``Retry-After``) on top of it.
        """
        self.limiter.acquire()
        attempts = self.retries + 1  # an exception comes after every retry is spent
        try:
            response = self.session.get(url, timeout=self.timeout_s)
        except requests.RequestException as exc:
            host = unresolved_host(exc)
            if host is not None:
                raise AllenApiError(
                    f"cannot reach {host} (the name does not resolve: offline, or a wrong "
                    f"api_url={urlsplit(url)._replace(path='', query='').geturl()}); nothing "
                    "was downloaded. Fix: check the network, then rerun"
                ) from None
            last = f"{type(exc).__name__}: {exc}"
        else:
            if response.status_code == 200:
                return response.content
            last = f"HTTP {response.status_code} {response.reason}"
            retries = getattr(response.raw, "retries", None)
            attempts = 1 + (len(retries.history) if retries is not None else 0)
        raise AllenApiError(
            f"GET {url} failed after {attempts} attempt(s): {last}; check the network and "
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
