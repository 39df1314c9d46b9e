"""The download job's configuration schema (``conf/download.yaml``); no Hydra import."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from atlinter_ray.allen.client import DEFAULT_API_URL, DEFAULT_NISSL_URL, check_gene_symbol
from atlinter_ray.allen.geometry import SectionPoint, get_plane
from atlinter_ray.errors import ConfigError
from atlinter_ray.planning import as_choice


@dataclass
class DownloadConfig:
    """Everything the download job needs (the schema of ``conf/download.yaml``).

    Keep credentials out of it: s3fs reads ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``
    (or ``AWS_PROFILE``) from the environment.
    """

    genes: list[str] = field(default_factory=lambda: ["Gad1"])
    #: ``coronal`` and/or ``sagittal``.
    planes: list[str] = field(default_factory=lambda: ["coronal", "sagittal"])
    #: Each step halves the section image's width and height (Allen ``downsample``). Full
    #: resolution (0, as the predecessor) is 0.645, 1.049 or 1.63 µm/pixel depending on the
    #: scanner, so 4 gives 10.3, 16.8 or 26.1 µm/pixel (the last coarser than the 25 µm
    #: atlas: use 3 for such experiments).
    downsample: int = 4
    #: Which image point places a section along the plane normal: ``top_left`` (pixel
    #: (0, 0), the predecessor's rule), ``centre`` or ``tissue`` (see the manual's
    #: docs/jobs/download.md for what each costs).
    section_point: SectionPoint = SectionPoint.top_left
    #: Local folder or fsspec URL (``s3://bucket/prefix``) receiving the files.
    output: str = "data/allen"
    #: fsspec options for ``output`` (endpoint_url, ...). Keep secrets in env vars.
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)
    api_url: str = DEFAULT_API_URL
    #: Experiments downloaded at once (Ray actors).
    concurrency: int = 4
    #: Image downloads in flight per experiment.
    image_threads: int = 2
    #: Requests per second over the whole job; <= 0 for no limit.
    max_requests_per_second: float = 5.0
    #: Retries per request, on 5xx, 429, timeouts and connection errors.
    retries: int = 5
    #: First retry delay; doubles each retry (capped at 30 s); a 429's Retry-After wins.
    backoff_s: float = 1.0
    #: Seconds per request.
    timeout_s: float = 60.0
    #: Rows per RMA query page.
    page_size: int = 2000
    #: Run experiments on Ray actors; False runs them one by one in this process.
    use_ray: bool = True
    #: CPUs each download actor asks Ray for.
    worker_cpus: float = 0.25
    #: Also fetch the Nissl volume the align job registers sections to, into ``output``.
    nissl: bool = False
    #: Where the Nissl volume is (Allen's 25 µm ``ara_nissl_25.nrrd``; a mirror, another URL).
    nissl_url: str = DEFAULT_NISSL_URL
    #: Print the traceback of an unexpected failure (secret values still removed).
    debug: bool = False

    def __post_init__(self) -> None:
        """Normalise sequences and check every value."""
        genes = [self.genes] if isinstance(self.genes, str) else list(self.genes)
        planes = [self.planes] if isinstance(self.planes, str) else list(self.planes)
        self.genes, self.planes = genes, planes
        self.storage_options = dict(self.storage_options or {})
        self.section_point = as_choice(SectionPoint, self.section_point, "section_point")
        if not genes and not self.nissl:
            raise ConfigError(
                "download config: `genes` is empty; list at least one gene symbol (or set "
                "nissl=true to fetch only the Nissl volume)"
            )
        for gene in genes:
            check_gene_symbol(gene)
        if not planes:
            raise ConfigError("download config: `planes` is empty; use coronal and/or sagittal")
        for plane in planes:
            get_plane(plane)
        checks = {
            "downsample": 0 <= self.downsample <= 8,
            "concurrency": self.concurrency >= 1,
            "image_threads": self.image_threads >= 1,
            "retries": self.retries >= 0,
            "backoff_s": self.backoff_s >= 0,
            "timeout_s": self.timeout_s > 0,
            "page_size": self.page_size >= 1,
            "worker_cpus": self.worker_cpus >= 0,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            values = ", ".join(f"{n}={getattr(self, n)!r}" for n in bad)
            raise ConfigError(
                f"download config: invalid {values}; downsample is 0..8, concurrency, "
                "image_threads and page_size >= 1, retries/backoff_s/worker_cpus >= 0, "
                "timeout_s > 0"
            )
