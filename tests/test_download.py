"""The Allen download job against a local fake Allen API (tests/allen_server.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import numpy as np
import pytest

from atlinter_ray.allen.client import (
    AllenApiError,
    RateLimiter,
    UnknownGeneError,
    parse_rma_response,
    query_url,
)
from atlinter_ray.allen.config import DownloadConfig
from atlinter_ray.allen.job import DownloadError, run_download
from atlinter_ray.dataset import load_dataset
from atlinter_ray.errors import ConfigError, StoreError
from atlinter_ray.files import write_atomic
from atlinter_ray.testing.allen_server import (
    AllenServer,
    Fault,
    Section,
    expected_slice,
    placing_pixel,
    projected_square_centre,
    tilted_datasets,
    true_coordinate,
)
from atlinter_ray.testing.ray_head import free_port

REPO = Path(__file__).resolve().parents[1]
SHAPES = {"coronal": (320, 456), "sagittal": (528, 320)}
EXPERIMENTS = {
    1001: ("Gad1", "coronal"),
    1002: ("Gad1", "sagittal"),
    2001: ("Vip", "coronal"),
    2002: ("Vip", "sagittal"),
}


@pytest.fixture
def server():
    """A fresh fake Allen API per test."""
    with AllenServer() as srv:
        yield srv


def config(srv: AllenServer, output: str | Path, **overrides) -> DownloadConfig:
    """A fast in-process config against ``srv``."""
    values = dict(
        genes=("Gad1", "Vip"),
        planes=("coronal", "sagittal"),
        downsample=2,
        output=str(output),
        api_url=srv.url,
        use_ray=False,
        max_requests_per_second=0,
        backoff_s=0.01,
        timeout_s=5.0,
        page_size=2,  # the 4-section experiment needs two pages
    )
    values.update(overrides)
    return DownloadConfig(**values)


def check_experiment(srv: AllenServer, volume: np.ndarray, meta: dict, experiment_id: int) -> None:
    """Fields, order and the place of every section's square against the ground truth."""
    gene, plane = EXPERIMENTS[experiment_id]
    dataset = srv.datasets[experiment_id]
    n_slices = 528 if plane == "coronal" else 456
    by_slice: dict[int, Section] = {}  # one section per slice, the lowest image id on ties
    for s in sorted(dataset.sections, key=lambda s: s.image_id):
        if expected_slice(s, plane) < n_slices:
            by_slice.setdefault(expected_slice(s, plane), s)
    inside = [by_slice[k] for k in sorted(by_slice)]
    assert volume.dtype == np.uint8
    assert volume.shape == (len(inside), *SHAPES[plane], 3)
    assert meta["axis"] == meta["plane"] == plane
    assert (
        meta["gene"] == gene and meta["experiment_id"] == experiment_id and meta["downsample"] == 2
    )
    assert meta["section_numbers"] == [expected_slice(s, plane) for s in inside]
    assert meta["image_ids"] == [s.image_id for s in inside]
    assert meta["image_shape"] == [*SHAPES[plane], 3]
    for k, section in enumerate(inside):
        red = (volume[k, ..., 0] > 120) & (volume[k, ..., 1] < 100)
        rows, cols = np.nonzero(red)
        lo_r, hi_r, lo_c, hi_c = section.box
        assert abs(rows.mean() - (lo_r + hi_r) / 2 / 25) < 0.75, (experiment_id, section.image_id)
        assert abs(cols.mean() - (lo_c + hi_c) / 2 / 25) < 0.75, (experiment_id, section.image_id)
        assert abs(red.sum() / ((hi_r - lo_r) * (hi_c - lo_c) / 625) - 1) < 0.1
        assert tuple(int(v) for v in volume[k, 0, 0]) == pytest.approx(
            (235, 230, 225), abs=6
        )  # RGB, not BGR


def read(out: Path, experiment_id: int) -> tuple[np.ndarray, dict]:
    """One experiment's array and metadata from a local output folder."""
    return np.load(out / f"{experiment_id}.npy"), json.loads(
        (out / f"{experiment_id}.json").read_text()
    )


# ------------------------------------------------------------------------ pure parts


def test_query_url_and_envelope():
    """Criteria are percent-encoded with paging options; error envelopes raise AllenApiError."""
    url = query_url(
        "http://h/", "model::Gene,rma::criteria,[acronym$eq'Gad 1']", start_row=4, num_rows=2
    )
    assert url.startswith("http://h/api/v2/data/query.json?criteria=model::Gene,rma::criteria,")
    assert "[acronym$eq'Gad%201']" in url and url.endswith("[start_row$eq4][num_rows$eq2]")
    page = parse_rma_response(
        {"success": True, "start_row": 4, "total_rows": 9, "msg": [{"id": 1}]}, url
    )
    assert (page.rows, page.start_row, page.total_rows) == ([{"id": 1}], 4, 9)
    with pytest.raises(AllenApiError, match="refused .*no such table"):
        parse_rma_response({"success": False, "msg": "no such table"}, url)
    with pytest.raises(AllenApiError, match="RMA envelope"):
        parse_rma_response(["not", "an", "envelope"], url)


def test_rate_limiter():
    """Ten calls at 5/s take 1.8 s of (fake) time."""
    now = [0.0]
    limiter = RateLimiter(5.0, clock=lambda: now[0], sleep=lambda s: now.__setitem__(0, now[0] + s))
    for _ in range(10):
        limiter.acquire()
    assert now[0] == pytest.approx(1.8)


def test_retry_after_of_a_429_is_honoured(server, tmp_path):
    """A 429 with ``Retry-After: 1`` is retried, and not before the server asked."""
    server.faults.append(Fault("model::SectionDataSet", status=429, times=1, retry_after="1"))
    stamps = []
    original = server.answer

    def stamped(url):
        if "model::SectionDataSet" in url:
            stamps.append(time.monotonic())
        return original(url)

    server.answer = stamped
    run_download(config(server, tmp_path, genes=("Gad1",), planes=("coronal",), backoff_s=0.0))
    assert len(stamps) == 2 and stamps[1] - stamps[0] >= 0.9  # backoff 0: the wait is Retry-After
    check_experiment(server, *read(tmp_path, 1001), 1001)


def test_config_validation():
    """Bad values and unknown keys name the field."""
    with pytest.raises(ConfigError, match="plane 'axial'"):
        DownloadConfig(genes=("Gad1",), planes=("axial",))
    with pytest.raises(ConfigError, match="concurrency=0"):
        DownloadConfig(genes=("Gad1",), concurrency=0)
    with pytest.raises(ConfigError, match="not a valid gene symbol"):
        DownloadConfig(genes=("Gad1']",))
    with pytest.raises(ConfigError, match=r"section_point='middle': choose one of"):
        DownloadConfig(genes=("Gad1",), section_point="middle")


def red_centre(section: np.ndarray) -> tuple[float, float]:
    """Row and column (voxels) of the centre of the red square in a warped section."""
    rows, cols = np.nonzero((section[..., 0] > 120) & (section[..., 1] < 100))
    return float(rows.mean()), float(cols.mean())


@pytest.mark.parametrize("rule", ["top_left", "centre", "tissue"])
def test_tilted_sections_are_placed_by_the_chosen_point(tmp_path: Path, rule: str) -> None:
    """Realistic tilts: each section's slice is the reference coordinate of the chosen image
    point, and its square lands where projecting the section onto that plane puts it.

    At ``downsample=3`` a half-pixel error in the downsampled geometry would move every
    square by 1.4 voxels; a transposed or inverted 3D matrix moves sections by slices.
    """
    with AllenServer(tilted_datasets()) as srv:
        run_download(config(srv, tmp_path, genes=("Pvalb",), downsample=3, section_point=rule))
        for eid in (4001, 4002):
            volume, meta = read(tmp_path, eid)
            dataset = srv.datasets[eid]
            truth = sorted((true_coordinate(dataset, s, placing_pixel(dataset, s, rule, 3)), s)
                           for s in dataset.sections)
            assert meta["section_point"] == rule
            assert meta["image_ids"] == [s.image_id for _, s in truth]
            tolerance = 10.0 if rule == "tissue" else 1e-3  # µm: the tissue is found in a JPEG
            assert meta["section_coordinates_um"] == pytest.approx([c for c, _ in truth],
                                                                   abs=tolerance)
            assert meta["section_numbers"] == [int(c // 25) for c, _ in truth]
            for k, (coordinate, section) in enumerate(truth):
                expected = projected_square_centre(dataset, section, coordinate)
                assert red_centre(volume[k]) == pytest.approx(expected, abs=0.5), (eid, k)


def test_the_placing_point_matters_on_tilted_sections(tmp_path: Path) -> None:
    """On these tilts the top-left corner lies 16-35 slices from the tissue."""
    with AllenServer(tilted_datasets()) as srv:
        placed = {}
        for rule in ("top_left", "tissue"):
            out = tmp_path / rule
            run_download(config(srv, out, genes=("Pvalb",), downsample=3, section_point=rule))
            placed[rule] = read(out, 4001)[1]["section_numbers"]
        with pytest.raises(StoreError, match="section_point"):
            run_download(config(srv, tmp_path / "tissue", genes=("Pvalb",), downsample=3))
    gaps = [a - b for a, b in zip(placed["top_left"], placed["tissue"])]
    assert all(15 < g < 40 for g in gaps), gaps


# ---------------------------------------------------------------------- job, in-process


def test_two_genes_both_planes(server, tmp_path):
    """Every experiment lands in the reference plane in order; paging and dropping work."""
    summary = run_download(config(server, tmp_path))
    assert sorted(summary.planned) == sorted(EXPERIMENTS) and not summary.skipped
    for eid in EXPERIMENTS:
        check_experiment(server, *read(tmp_path, eid), eid)
    assert read(tmp_path, 1001)[1]["dropped_sections"] == [
        {"image_id": 11003, "slice": 600, "reason": "outside the 528 coronal slices"}
    ]
    assert read(tmp_path, 2002)[1]["dropped_sections"] == [
        {"image_id": 22003, "slice": 128, "reason": "duplicate slice"}
    ]
    for eid in EXPERIMENTS:  # the pipeline's own loader accepts every file
        ds = load_dataset(str(tmp_path / f"{eid}.npy"))
        assert ds.axis == EXPERIMENTS[eid][1] and ds.channels == 3
    assert server.count("query.json") > 1 + 2 * 2 + 4  # paging asked for more than one page
    assert not list(tmp_path.glob(".*tmp*"))
    wrote = [ln for ln in summary.describe().splitlines() if ln.startswith("wrote ")]
    assert len(wrote) == len(EXPERIMENTS)  # the job names every file it wrote
    for eid in EXPERIMENTS:
        assert any(ln.endswith(f"{tmp_path}/{eid}.npy + .json") for ln in wrote), wrote


def test_rerun_skips_complete_experiments(server, tmp_path):
    """A second run downloads nothing; a lost .json redoes that experiment only."""
    cfg = config(server, tmp_path)
    run_download(cfg)
    first = (tmp_path / "1002.npy").read_bytes()
    server.reset_log()
    summary = run_download(cfg)
    assert sorted(summary.skipped) == sorted(EXPERIMENTS) and not summary.results
    assert server.count("section_image_download") == 0 and server.count("model::SectionImage") == 0
    (tmp_path / "2002.json").unlink()
    (tmp_path / "1002.npy").write_bytes(first[:100])  # truncated: size differs from the record
    server.reset_log()
    summary = run_download(cfg)
    assert sorted(r.experiment_id for r in summary.results) == [1002, 2002]
    assert server.count("section_image_download") == 6
    assert (tmp_path / "1002.npy").read_bytes() == first  # same bytes again
    with pytest.raises(StoreError, match="downsample/axis"):
        run_download(config(server, tmp_path, downsample=3))


def test_transient_errors_are_retried(server, tmp_path):
    """5xx answers and a timeout are retried with backoff until they succeed.

    The timeout is generous (a loaded machine answers well within it) and the slow answer
    far slower, so the counts below hold whatever else the machine is doing.
    """
    server.faults += [
        Fault("section_image_download/11000", status=503, times=2),
        Fault("model::SectionDataSet", status=502, times=1),
        Fault("section_image_download/21001", delay_s=120.0, times=1),
    ]
    run_download(
        config(server, tmp_path, genes=("Gad1", "Vip"), planes=("coronal",), timeout_s=5.0)
    )
    assert server.count("section_image_download/11000") == 3
    assert server.count("section_image_download/21001") == 2
    check_experiment(server, *read(tmp_path, 1001), 1001)
    check_experiment(server, *read(tmp_path, 2001), 2001)


def test_permanent_failure_marks_nothing_complete(server, tmp_path):
    """An image that always fails: clear error, its experiment unwritten, the others written."""
    server.faults.append(Fault("section_image_download/11002", status=500, times=None))
    with pytest.raises(DownloadError) as info:
        run_download(config(server, tmp_path, retries=2))
    assert list(info.value.failures) == [1001]
    message = str(info.value)
    assert "1001 (Gad1, coronal)" in message and "HTTP 500" in message and "3 attempt(s)" in message
    assert isinstance(info.value, RuntimeError)
    assert not (tmp_path / "1001.json").exists() and not (tmp_path / "1001.npy").exists()
    assert not list(tmp_path.glob(".*tmp*"))
    assert {p.name for p in tmp_path.glob("*.json")} == {"1002.json", "2001.json", "2002.json"}
    server.faults.clear()
    server.reset_log()
    summary = run_download(config(server, tmp_path))
    assert [r.experiment_id for r in summary.results] == [1001]
    check_experiment(server, *read(tmp_path, 1001), 1001)


def test_missing_transform(server, tmp_path):
    """Experiments with a missing 2D or 3D transform fail clearly before any image download."""
    with pytest.raises(DownloadError) as info:
        run_download(config(server, tmp_path, genes=("Badtx",)))
    failures = info.value.failures
    assert sorted(failures) == [3001, 3002]
    assert "MissingTransformError" in failures[3001] and "section image 31001" in failures[3001]
    assert "alignment2d" in failures[3001]
    assert "experiment 3002 (gene Badtx, coronal) has no alignment3d" in failures[3002]
    assert "no sagittal experiment for gene Badtx" in str(info.value)
    assert server.count("section_image_download") == 0
    assert not list(tmp_path.iterdir())


def test_unknown_gene_fails_before_any_download(server, tmp_path):
    """An unknown symbol is named, with a case hint when one exists, before any download."""
    with pytest.raises(UnknownGeneError) as info:
        run_download(config(server, tmp_path, genes=("Gad1", "Nosuch", "vip")))
    message = str(info.value)
    assert "'Nosuch'" in message and "check the symbol" in message
    assert "'vip' (did you mean 'Vip'?)" in message and "'Gad1'" not in message
    assert isinstance(info.value, ValueError)
    assert (
        server.count("model::SectionDataSet") == 0 and server.count("section_image_download") == 0
    )
    assert not list(tmp_path.iterdir())


def test_unreachable_api_is_a_clear_error(tmp_path):
    """A closed port: connection errors are retried, then reported with the URL."""
    port = free_port()
    cfg = DownloadConfig(
        genes=("Gad1",),
        output=str(tmp_path),
        api_url=f"http://127.0.0.1:{port}",
        use_ray=False,
        retries=1,
        backoff_s=0.01,
        timeout_s=1.0,
    )
    with pytest.raises(AllenApiError, match=rf"127.0.0.1:{port}/api/v2/data/query.json.*2 attempt"):
        run_download(cfg)


@pytest.mark.slow
def test_s3_output(server, s3_server):
    """Output to s3:// through fsspec (moto on loopback); rerun skips what is there."""
    import s3fs

    fs = s3fs.S3FileSystem(**s3_server)
    cfg = config(server, "s3://atlas-out/download", genes=("Vip",), storage_options=s3_server)
    run_download(cfg)
    fs.invalidate_cache()
    assert sorted(p.rsplit("/", 1)[1] for p in fs.ls("atlas-out/download")) == [
        "2001.json",
        "2001.npy",
        "2002.json",
        "2002.npy",
    ]
    with fs.open("atlas-out/download/2002.npy", "rb") as f:
        volume = np.load(f)
    check_experiment(server, volume, json.loads(fs.cat_file("atlas-out/download/2002.json")), 2002)
    server.reset_log()
    assert sorted(run_download(cfg).skipped) == [2001, 2002]
    assert server.count("section_image_download") == 0


# ------------------------------------------------------------------------ Ray, job


@pytest.mark.slow
@pytest.mark.ray
def test_ray_pool_matches_in_process(server, tmp_path, ray_cluster):
    """Actors on a real local cluster write the same bytes as the in-process path."""
    run_download(config(server, tmp_path / "serial"))
    server.reset_log()
    summary = run_download(
        config(
            server,
            tmp_path / "ray",
            use_ray=True,
            concurrency=2,
            worker_cpus=0.5,
            max_requests_per_second=200,
        )
    )
    assert sorted(r.experiment_id for r in summary.results if r.status == "done") == sorted(
        EXPERIMENTS
    )
    assert server.count("section_image_download") == 12
    for eid in EXPERIMENTS:
        for suffix in (".npy", ".json"):
            assert (tmp_path / "ray" / f"{eid}{suffix}").read_bytes() == (
                tmp_path / "serial" / f"{eid}{suffix}"
            ).read_bytes()
    server.faults.append(Fault("section_image_download/22001", status=500, times=None))
    (tmp_path / "ray" / "2002.json").unlink()
    server.reset_log()
    with pytest.raises(DownloadError, match="2002 \\(Vip, sagittal\\).*HTTP 500"):
        run_download(
            config(
                server, tmp_path / "ray", use_ray=True, concurrency=2, worker_cpus=0.5, retries=1
            )
        )
    # only the incomplete experiment was redone (its image list takes two pages of 2)
    assert server.count("model::SectionImage") == server.count("section_data_set[id$eq2002]") == 2


@pytest.mark.slow
def test_hydra_job_entry_point(server, tmp_path):
    """``python jobs/download.py`` with overrides runs the in-process path and prints a summary."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = tmp_path / "job"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "jobs" / "download.py"),
            "genes=[Vip]",
            "planes=[coronal]",
            f"output={out}",
            f"api_url={server.url}",
            "use_ray=false",
            "downsample=2",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "1 planned, 0 already complete, 1 downloaded, 0 failed" in proc.stdout
    check_experiment(server, *read(out, 2001), 2001)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job"]  # no config dump, no log file
    bad = subprocess.run(
        [
            sys.executable,
            str(REPO / "jobs" / "download.py"),
            "genes=[Nosuch]",
            f"output={out}",
            f"api_url={server.url}",
            "use_ray=false",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=120,
    )
    assert bad.returncode != 0 and "Nosuch" in bad.stderr and "check the symbol" in bad.stderr


def test_atomic_write_leaves_no_half_file(tmp_path, monkeypatch):
    """A write that dies before the move leaves neither the file nor its temporary."""
    fs = fsspec.filesystem("file")
    write_atomic(fs, f"{tmp_path}/a.json", b"{}")
    assert (tmp_path / "a.json").read_bytes() == b"{}"

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(type(fs), "mv", crash)
    with pytest.raises(OSError, match="disk full"):
        write_atomic(fs, f"{tmp_path}/b.npy", b"x" * 1000)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_offline_fails_on_the_first_dns_error_in_one_line_and_leaves_nothing(tmp_path):
    """A host name that does not resolve is not retried: one short line, no empty folder."""
    from atlinter_ray.allen.client import AllenApiError

    output = tmp_path / "data" / "allen"
    cfg = DownloadConfig(genes=["Gad1"], output=str(output), use_ray=False, retries=5,
                         backoff_s=30.0, api_url="http://no-such-host.invalid")
    with pytest.raises(AllenApiError) as info:
        run_download(cfg)  # six tries would wait 30 + 60 + ... s: the test would hang
    message = str(info.value)
    assert "cannot reach no-such-host.invalid" in message and "does not resolve" in message
    assert "\n" not in message and "criteria" not in message and len(message) < 250
    assert not (tmp_path / "data").exists()
