"""A small local stand-in for the Allen API, for the download tests.

It answers ``/api/v2/data/query.json?criteria=...`` for the Gene, SectionDataSet and
SectionImage models in the documented RMA envelope (``success``, ``id``, ``start_row``,
``num_rows``, ``total_rows``, ``msg``) with ``start_row``/``num_rows`` paging, and
``/api/v2/section_image_download/<id>?downsample=N`` with a JPEG, and
:data:`NISSL_PATH` with a CCF-sized gzip NRRD "Nissl" volume (:func:`nissl_volume`).

Every section image is rendered from the ground truth, not from the code under test:
a red square at a known place of the 25 µm reference plane on a light background. Each
section has its own 2D transform (scale, rotation, shift), so the raw images differ and
only a correct alignment puts every square back where it belongs. Downsampled images
are rendered as the image service's JPEG2000 levels are: pixel ``n`` of level ``d`` lies
on full-resolution pixel ``2**d * n``. :func:`tilted_datasets` adds experiments cut at
realistic tilts (non-symmetric 3D rotations, ``p`` decreasing with the section number),
where a transposed matrix, a wrong sign or the wrong placement point shows. Faults (an HTTP status
or a delay, for a number of requests or forever) are injected by URL substring, and every
request is logged (percent-decoded) so tests can count them.
"""

from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import cv2
import numpy as np

UM_PER_PX = 10.0  # full-resolution pixel size of the synthetic sections
THICKNESS = 25.0
_HOST = "127.0.0.1"  # the fake API listens on loopback only
BACKGROUND = (235, 230, 225)  # RGB
SQUARE = (200, 30, 40)  # RGB


@dataclass
class Section:
    """One synthetic section image and its ground truth."""

    image_id: int
    section_number: int
    #: full-res image pixel (u, v, 1) -> volume µm (x, y); None = missing alignment2d
    tsv: np.ndarray | None
    #: the square, in reference µm along the in-plane axes (rows axis lo/hi, cols axis lo/hi)
    box: tuple[float, float, float, float]
    full_shape: tuple[int, int]


@dataclass
class DataSet:
    """One synthetic ISH experiment."""

    experiment_id: int
    gene: str
    plane: str
    #: volume (x, y, z, 1) -> reference (p, i, r); None = missing alignment3d
    tvr: np.ndarray | None
    sections: list[Section] = field(default_factory=list)


def tsv_matrix(
    shift: tuple[float, float], angle_deg: float, scale: float = UM_PER_PX
) -> np.ndarray:
    """Image pixel -> volume µm: rotate, scale, then shift."""
    a = np.deg2rad(angle_deg)
    rot = scale * np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    return np.hstack([rot, np.array(shift, dtype=float).reshape(2, 1)])


def invert_affine(m: np.ndarray) -> np.ndarray:
    """Inverse of an (n, n+1) affine matrix."""
    n = m.shape[0]
    full = np.vstack([m, np.r_[np.zeros(n), 1.0]])
    return np.linalg.inv(full)[:n]


def tvr_for(plane: str, offset_um: float = 10.0) -> np.ndarray:
    """Volume -> reference for a plane: coronal x->r, y->i, z->p; sagittal x->p, y->i, z->r."""
    if plane == "coronal":
        return np.array([[0, 0, 1, offset_um], [0, 1, 0, 0], [1, 0, 0, 0]], dtype=float)
    return np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, offset_um]], dtype=float)


def expected_slice(section: Section, plane: str, offset_um: float = 10.0) -> int:
    """Ground-truth reference slice of a section (its normal coordinate // 25)."""
    return int((section.section_number * THICKNESS + offset_um) // 25)


def render(dataset: DataSet, section: Section, downsample: int) -> np.ndarray:
    """The RGB section image at ``downsample``, rendered from the ground truth.

    Pixel ``n`` is the square's coverage of the ``2**d`` x ``2**d`` full-resolution pixels
    centred on pixel ``2**d * n``: edges are anti-aliased, as a low-pass level is.
    """
    cover = square_coverage(dataset, section, downsample)[..., None]
    img = np.asarray(BACKGROUND, float) * (1 - cover) + np.asarray(SQUARE, float) * cover
    rgb: np.ndarray = np.rint(img).astype(np.uint8)
    return rgb


def _pir(dataset: DataSet, section: Section, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Reference ``(p, i, r)`` µm of full-resolution pixels ``(u, v)`` of a section."""
    assert dataset.tvr is not None and section.tsv is not None
    x = section.tsv[0, 0] * u + section.tsv[0, 1] * v + section.tsv[0, 2]
    y = section.tsv[1, 0] * u + section.tsv[1, 1] * v + section.tsv[1, 2]
    z = np.full_like(x, section.section_number * THICKNESS)
    pir: np.ndarray = np.einsum("ij,j...->i...", dataset.tvr, np.stack([x, y, z, np.ones_like(x)]))
    return pir


def square_coverage(dataset: DataSet, section: Section, downsample: int) -> np.ndarray:
    """The fraction of each pixel of the image at ``downsample`` that the square covers."""
    f = 2**downsample
    h, w = section.full_shape[0] // f, section.full_shape[1] // f
    sub = np.arange(f) - (f - 1) / 2  # full-resolution pixels around 2**d * n
    v = (np.arange(h)[:, None] * f + sub[None, :]).reshape(h, 1, f, 1)
    u = (np.arange(w)[:, None] * f + sub[None, :]).reshape(1, w, 1, f)
    u, v = np.broadcast_arrays(u, v)
    pir = _pir(dataset, section, u.astype(float), v.astype(float))
    rows_axis, cols_axis = IN_PLANE[dataset.plane]
    lo_r, hi_r, lo_c, hi_c = section.box
    inside = (
        (pir[rows_axis] >= lo_r)
        & (pir[rows_axis] < hi_r)
        & (pir[cols_axis] >= lo_c)
        & (pir[cols_axis] < hi_c)
    )
    coverage: np.ndarray = inside.mean(axis=(2, 3))
    return coverage


#: Reference axes (in p, i, r) along the rows and columns of each plane's images.
IN_PLANE = {"coronal": (1, 2), "sagittal": (0, 1)}
NORMAL = {"coronal": 0, "sagittal": 2}


def square_centre(dataset: DataSet, section: Section) -> tuple[float, float]:
    """Full-resolution pixel ``(u, v)`` of the square's centre (affine maps keep centroids)."""
    rows_axis, cols_axis = IN_PLANE[dataset.plane]
    lo_r, hi_r, lo_c, hi_c = section.box
    # in-plane reference coordinates are affine in (u, v): solve for the box's centre
    origin = _pir(dataset, section, np.array(0.0), np.array(0.0))
    du = _pir(dataset, section, np.array(1.0), np.array(0.0)) - origin
    dv = _pir(dataset, section, np.array(0.0), np.array(1.0)) - origin
    a = np.array([[du[rows_axis], dv[rows_axis]], [du[cols_axis], dv[cols_axis]]])
    b = np.array([(lo_r + hi_r) / 2 - origin[rows_axis], (lo_c + hi_c) / 2 - origin[cols_axis]])
    u, v = np.linalg.solve(a, b)
    return float(u), float(v)


def placing_pixel(dataset: DataSet, section: Section, rule: str, downsample: int) -> tuple[float, float]:
    """Full-resolution pixel ``(u, v)`` that places a section under ``rule`` (the square
    stands for the tissue)."""
    if rule == "top_left":
        return 0.0, 0.0
    if rule == "centre":
        f = 2**downsample
        h, w = section.full_shape[0] // f, section.full_shape[1] // f
        return (w - 1) * f / 2, (h - 1) * f / 2
    return square_centre(dataset, section)


def true_coordinate(dataset: DataSet, section: Section, uv: tuple[float, float]) -> float:
    """Reference coordinate (µm) along the plane normal of full-resolution pixel ``uv``."""
    pir = _pir(dataset, section, np.array(uv[0]), np.array(uv[1]))
    return float(pir[NORMAL[dataset.plane]])


def projected_square_centre(
    dataset: DataSet, section: Section, coordinate: float
) -> tuple[float, float]:
    """Where the square's centre lands, in 25 µm voxels (row, column), when the section is
    projected along the volume's z axis onto the reference plane at ``coordinate``."""
    assert dataset.tvr is not None and section.tsv is not None
    x, y = section.tsv @ np.array([*square_centre(dataset, section), 1.0])
    trv = invert_affine(dataset.tvr)
    normal = NORMAL[dataset.plane]
    in_plane = list(IN_PLANE[dataset.plane])
    # trv[:2] @ (p, i, r, 1) = (x, y) with the normal coordinate fixed: 2 equations, 2 unknowns
    a = trv[:2, in_plane]
    b = np.array([x, y]) - trv[:2, normal] * coordinate - trv[:2, 3]
    row_um, col_um = np.linalg.solve(a, b)
    return row_um / 25.0, col_um / 25.0


def alignment3d_record(tvr: np.ndarray) -> dict[str, float]:
    """The API's alignment3d fields for a volume -> reference matrix."""
    trv = invert_affine(tvr)
    rec = {}
    for name, m in (("tvr", tvr), ("trv", trv)):
        values = list(m[:, :3].ravel()) + list(m[:, 3])
        rec.update({f"{name}_{k:02d}": float(val) for k, val in enumerate(values)})
    rec["id"] = 1
    return rec


def alignment2d_record(tsv: np.ndarray) -> dict[str, float]:
    """The API's alignment2d fields for an image -> volume matrix."""
    tvs = invert_affine(tsv)
    rec = {}
    for name, m in (("tsv", tsv), ("tvs", tvs)):
        values = list(m[:, :2].ravel()) + list(m[:, 2])
        rec.update({f"{name}_{k:02d}": float(val) for k, val in enumerate(values)})
    return rec


def default_datasets() -> list[DataSet]:
    """Two genes in both planes, plus a gene whose experiments lack transforms."""

    def make(eid: int, gene: str, plane: str, numbers: list[int], first_image: int) -> DataSet:
        """One experiment with sections at ``numbers``, each shifted and rotated differently."""
        ds = DataSet(eid, gene, plane, tvr_for(plane))
        full_shape = (1000, 1400) if plane == "coronal" else (1000, 1500)
        for k, number in enumerate(numbers):
            shift = (-600.0 + 250.0 * k, -400.0 - 150.0 * k)
            if plane == "coronal":  # rows i (µm), cols r (µm)
                box = (3000.0, 4000.0, 3000.0 + 500.0 * k, 4250.0 + 500.0 * k)
            else:  # rows p, cols i
                box = (5000.0 + 600.0 * k, 6000.0 + 600.0 * k, 2500.0, 3500.0)
            ds.sections.append(
                Section(first_image + k, number, tsv_matrix(shift, 4.0 * k - 4.0), box, full_shape)
            )
        return ds

    gad_cor = make(1001, "Gad1", "coronal", [108, 100, 116, 600], 11000)  # 600 is past slice 527
    gad_sag = make(1002, "Gad1", "sagittal", [200, 204, 208], 12000)
    vip_cor = make(2001, "Vip", "coronal", [150, 158, 166], 21000)
    vip_sag = make(2002, "Vip", "sagittal", [120, 128, 136, 128], 22000)  # 22003 repeats 128
    bad_2d = make(3001, "Badtx", "coronal", [100, 108], 31000)
    bad_2d.sections[1].tsv = None
    bad_3d = make(3002, "Badtx", "coronal", [120, 128], 32000)
    bad_3d.tvr = None
    return [gad_cor, gad_sag, vip_cor, vip_sag, bad_2d, bad_3d]


def rotation(axis: int, degrees: float) -> np.ndarray:
    """A 3x3 rotation about coordinate axis ``axis``."""
    a = np.deg2rad(degrees)
    c, s_ = np.cos(a), np.sin(a)
    m = np.eye(3)
    j, k = [n for n in range(3) if n != axis]
    m[j, j], m[j, k], m[k, j], m[k, k] = c, -s_, s_, c
    return m


def tilted_datasets() -> list[DataSet]:
    """Gene ``Pvalb``, both planes, cut at tilts like real experiments' ``alignment3d``.

    The volume -> reference matrix is a plane's permutation with the normal reversed
    (``p`` or ``r`` decreases as the section number grows), a 2 % scale and rotations of
    a few degrees about two axes: no longer symmetric, so reading it transposed, or
    reading ``trv`` for ``tvr``, misplaces every section.
    """
    out = []
    for eid, plane, first_image in ((4001, "coronal", 41000), (4002, "sagittal", 42000)):
        if plane == "coronal":  # x -> r, y -> i, z -> -p
            base = np.array([[0, 0, -1.0], [0, 1.0, 0], [1.0, 0, 0]])
            offset = np.array([12600.0, 300.0, -200.0])
        else:  # x -> p, y -> i, z -> -r
            base = np.array([[1.0, 0, 0], [0, 1.0, 0], [0, 0, -1.0]])
            offset = np.array([-300.0, 250.0, 10800.0])
        linear = 1.02 * rotation(1, 5.0) @ rotation(0, -3.0) @ base
        tvr = np.hstack([linear, offset[:, None]])
        ds = DataSet(eid, "Pvalb", plane, tvr)
        full_shape = (1000, 1400) if plane == "coronal" else (1000, 1500)
        for k, number in enumerate([100, 108, 116]):
            shift = (-500.0 + 150.0 * k, -300.0 - 100.0 * k)
            if plane == "coronal":  # rows i, cols r: far from the image's top-left corner
                box = (4500.0, 5500.0, 6000.0 + 500.0 * k, 7250.0 + 500.0 * k)
            else:  # rows p, cols i
                box = (6000.0 + 600.0 * k, 7000.0 + 600.0 * k, 5000.0, 6000.0)
            ds.sections.append(
                Section(first_image + k, number, tsv_matrix(shift, 3.0 * k - 2.0), box, full_shape)
            )
        out.append(ds)
    return out


#: Where Allen serves the 25 µm Nissl volume (on its download host).
NISSL_PATH = "/informatics-archive/current-release/mouse_ccf/ara_nissl/ara_nissl_25.nrrd"
CCF_SHAPE = (528, 320, 456)
#: The fake Nissl shows each section's square this many voxels (rows, columns) away from
#: where the section's own transforms put it: a misalignment left for the align job.
NISSL_SHIFT = (2, 3)


def nissl_volume(datasets: list[DataSet], shift: tuple[int, int] = NISSL_SHIFT) -> np.ndarray:
    """A uint8 CCF-sized volume: a bright square on each section's slice, moved by ``shift``.

    Experiments that cannot be downloaded (a transform missing) are left out.
    """
    volume = np.full(CCF_SHAPE, 20, dtype=np.uint8)
    for d in datasets:
        coronal = d.plane == "coronal"
        complete = d.tvr is not None and all(s.tsv is not None for s in d.sections)
        for s in d.sections if complete else []:
            index = expected_slice(s, d.plane)
            if not 0 <= index < CCF_SHAPE[0 if coronal else 2]:
                continue
            lo_r, hi_r, lo_c, hi_c = (round(v / 25) for v in s.box)
            rows = slice(lo_r + shift[0], hi_r + shift[0])
            cols = slice(lo_c + shift[1], hi_c + shift[1])
            if coronal:
                volume[index, rows, cols] = 200
            else:
                volume[rows, cols, index] = 200
    return volume


def nrrd_bytes(volume: np.ndarray) -> bytes:
    """``volume`` as a gzip NRRD file with 25 µm voxels, the way Allen ships the CCF."""
    import tempfile

    import nrrd

    header = {"encoding": "gzip", "space": "left-posterior-superior",
              "space directions": np.eye(3) * 25.0}
    with tempfile.TemporaryDirectory() as tmp:
        nrrd.write(f"{tmp}/volume.nrrd", volume, header)
        with open(f"{tmp}/volume.nrrd", "rb") as f:
            return f.read()


@dataclass
class Fault:
    """Answer requests whose URL contains ``pattern`` with ``status`` (or delay them)."""

    pattern: str
    status: int = 503
    times: int | None = 1  # None: forever
    delay_s: float = 0.0
    #: ``Retry-After`` header sent with the status (e.g. "1" with a 429), or None.
    retry_after: str | None = None


class AllenServer:
    """The fake API on 127.0.0.1, on a free port, in a background thread."""

    def __init__(self, datasets: list[DataSet] | None = None) -> None:
        """Serve ``datasets`` (default :func:`default_datasets`)."""
        self.datasets = {d.experiment_id: d for d in (datasets or default_datasets())}
        self.images = {s.image_id: (d, s) for d in self.datasets.values() for s in d.sections}
        self.genes = sorted({d.gene for d in self.datasets.values()} | {"Sst"})
        self.requests: list[str] = []
        self.faults: list[Fault] = []
        #: The bytes served at NISSL_PATH; None: built from the datasets on first request.
        self.nissl: bytes | None = None
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer((_HOST, 0), self._handler())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def url(self) -> str:
        """Root URL, e.g. ``http://127.0.0.1:PORT``."""
        return f"http://{_HOST}:{self._httpd.server_port}"

    def __enter__(self) -> AllenServer:
        """Start serving."""
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        """Stop serving."""
        self._httpd.shutdown()
        self._httpd.server_close()

    def count(self, pattern: str) -> int:
        """How many requests so far had ``pattern`` in their URL."""
        with self._lock:
            return sum(pattern in r for r in self.requests)

    def reset_log(self) -> None:
        """Forget the request log."""
        with self._lock:
            self.requests.clear()

    # ------------------------------------------------------------------ answering

    def _fault_for(self, url: str) -> Fault | None:
        """Consume and return the first live fault matching ``url``."""
        with self._lock:
            self.requests.append(unquote(url))
            for fault in self.faults:
                if fault.pattern in url and (fault.times is None or fault.times > 0):
                    if fault.times is not None:
                        fault.times -= 1
                    return fault
        return None

    def answer(self, url: str) -> tuple[int, dict[str, str], bytes]:
        """(status, headers, body) for one GET: a matching fault, else the API's answer."""
        fault = self._fault_for(url)
        if fault is not None:
            time.sleep(fault.delay_s)
            if fault.delay_s == 0.0:
                headers = {"Content-Type": "text/html"}
                if fault.retry_after is not None:
                    headers["Retry-After"] = fault.retry_after
                return fault.status, headers, b"<html>Service Unavailable</html>"
        status, ctype, body = self._serve(url)
        return status, {"Content-Type": ctype}, body

    def _serve(self, url: str) -> tuple[int, str, bytes]:
        """(status, content type, body) of the API for one GET."""
        parts = urlsplit(url)
        query = parse_qs(parts.query)
        if parts.path == "/api/v2/data/query.json":
            return self._rma(query.get("criteria", [""])[0])
        if parts.path == NISSL_PATH:
            with self._lock:
                if self.nissl is None:
                    self.nissl = nrrd_bytes(nissl_volume(list(self.datasets.values())))
            return 200, "application/octet-stream", self.nissl
        match = re.fullmatch(r"/api/v2/section_image_download/(\d+)", parts.path)
        if match and int(match.group(1)) in self.images:
            dataset, section = self.images[int(match.group(1))]
            downsample = int(query.get("downsample", ["0"])[0])
            rgb = render(dataset, section, downsample)
            ok, jpg = cv2.imencode(
                ".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95]
            )
            return 200, "image/jpeg", jpg.tobytes()
        return 404, "text/html", b"<html>Not Found</html>"

    def _rma(self, criteria: str) -> tuple[int, str, bytes]:
        """Answer one RMA query in the documented envelope."""
        model = re.search(r"model::(\w+)", criteria)
        rows: list[dict[str, Any]]
        if model is None:
            return self._envelope(400, False, "criteria must name a model")
        name = model.group(1)
        if name == "Gene":
            m = re.search(r"\[acronym\$(eq|il)'([^']*)'\]", criteria)
            if m is None:
                return self._envelope(400, False, "Gene query without acronym")
            op, acr = m.groups()
            hits = [g for g in self.genes if (g == acr if op == "eq" else g.lower() == acr.lower())]
            rows = [
                {"id": 100 + self.genes.index(g), "acronym": g, "name": f"gene {g}"} for g in hits
            ]
        elif name == "SectionDataSet":
            gene = re.search(r"genes\[acronym\$eq'([^']*)'\]", criteria)
            plane = re.search(r"plane_of_section\[name\$eq'([^']*)'\]", criteria)
            with_3d = "rma::include,alignment3d" in criteria
            rows = []
            for d in self.datasets.values():
                if (gene is None or d.gene == gene.group(1)) and (
                    plane is None or d.plane == plane.group(1)
                ):
                    row: dict[str, Any] = {
                        "id": d.experiment_id,
                        "failed": False,
                        "plane_of_section_id": 1 if d.plane == "coronal" else 2,
                        "reference_space_id": 9 if d.plane == "coronal" else 10,
                        "section_thickness": THICKNESS,
                    }
                    if with_3d:
                        row["alignment3d"] = None if d.tvr is None else alignment3d_record(d.tvr)
                    rows.append(row)
        elif name == "SectionImage":
            m = re.search(r"section_data_set\[id\$eq(\d+)\]", criteria)
            found = self.datasets.get(int(m.group(1))) if m else None
            with_2d = "rma::include,alignment2d" in criteria
            rows = []
            if found is not None:
                for s in found.sections:
                    row = {
                        "id": s.image_id,
                        "data_set_id": found.experiment_id,
                        "section_number": s.section_number,
                    }
                    if with_2d:
                        row["alignment2d"] = None if s.tsv is None else alignment2d_record(s.tsv)
                    rows.append(row)
        else:
            return self._envelope(400, False, f"unknown model {name}")
        start = re.search(r"start_row\$eq(\d+)", criteria)
        num = re.search(r"num_rows\$eq(\d+)", criteria)
        start_row = int(start.group(1)) if start else 0
        num_rows = int(num.group(1)) if num else 50  # the API's default page
        return self._envelope(
            200, True, rows[start_row : start_row + num_rows], start_row, len(rows)
        )

    @staticmethod
    def _envelope(
        status: int, success: bool, msg: Any, start_row: int = 0, total: int = 0
    ) -> tuple[int, str, bytes]:
        """Serialise the RMA envelope."""
        body = {
            "success": success,
            "id": 0,
            "start_row": start_row,
            "num_rows": len(msg) if isinstance(msg, list) else 0,
            "total_rows": total,
            "msg": msg,
        }
        return status, "application/json", json.dumps(body).encode()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        """The request handler class bound to this server."""
        server = self

        class Handler(BaseHTTPRequestHandler):
            """Dispatch GETs to :meth:`AllenServer.answer`."""

            def do_GET(self) -> None:
                """Answer one GET."""
                status, headers, body = server.answer(self.path)
                try:
                    self.send_response(status)
                    for name, value in headers.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):  # client gave up (timeout test)
                    pass

            def log_message(self, *args: Any) -> None:
                """Stay quiet."""

        return Handler
