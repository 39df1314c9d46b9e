"""Gene symbol in, reconstructed volume out: download (with the Nissl) -> align -> interpolate.

All against the local fake Allen API, whose Nissl volume shows each section's square a
few voxels away from where the section's own transforms put it: the align job has to
move it there.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from atlinter_ray.align.config import AlignConfig, AlignOutputConfig, Contrast
from atlinter_ray.align.job import run_align
from atlinter_ray.align.registration import registration_image
from atlinter_ray.allen.config import DownloadConfig
from atlinter_ray.allen.job import run_download
from atlinter_ray.config import (
    Config,
    DataConfig,
    InterpolationConfig,
    ModelConfig,
    OutputConfig,
    RunConfig,
)
from atlinter_ray.dataset import load_dataset
from atlinter_ray.errors import DatasetError
from atlinter_ray.nrrd_volume import read_nrrd_info
from atlinter_ray.pipeline import run as run_interpolation
from atlinter_ray.testing.allen_server import NISSL_PATH, AllenServer


@pytest.fixture
def server():
    with AllenServer() as srv:
        yield srv


def _download(srv: AllenServer, out: Path, **overrides) -> object:
    values = dict(genes=["Gad1"], planes=["coronal"], downsample=2, output=str(out),
                  api_url=srv.url, use_ray=False, max_requests_per_second=0, backoff_s=0.01,
                  timeout_s=30.0, nissl=True, nissl_url=srv.url + NISSL_PATH)
    values.update(overrides)
    return run_download(DownloadConfig(**values))


def _centroid(image: np.ndarray) -> np.ndarray:
    """Centre of the bright square of a registration image (H, W)."""
    mask = image > (image.min() + image.max()) / 2
    return np.argwhere(mask).mean(axis=0)


def test_the_nissl_is_downloaded_once_as_allen_ships_it(server: AllenServer, tmp_path: Path) -> None:
    first = _download(server, tmp_path, genes=[])
    assert first.nissl["status"] == "done"
    assert read_nrrd_info(str(tmp_path / "ara_nissl_25.nrrd"), {}).shape == (528, 320, 456)
    marker = json.loads((tmp_path / "ara_nissl_25.nrrd.json").read_text())
    assert marker["bytes"] == (tmp_path / "ara_nissl_25.nrrd").stat().st_size
    server.reset_log()
    again = _download(server, tmp_path, genes=[])
    assert again.nissl["status"] == "skipped" and server.count("ara_nissl") == 0


def test_a_broken_nissl_download_writes_nothing(server: AllenServer, tmp_path: Path) -> None:
    server.nissl = b"NRRD0004\ntype: uint8\ndimension: 3\nsizes: 528 320 456\nencoding: gzip\n\nno gzip"
    with pytest.raises(DatasetError, match="ara_nissl_25.nrrd: the NRRD data cannot be read"):
        _download(server, tmp_path, genes=[])
    assert not (tmp_path / "ara_nissl_25.nrrd").exists()


@pytest.mark.slow
def test_download_align_interpolate(server: AllenServer, tmp_path: Path, ray_cluster) -> None:
    _download(server, tmp_path / "allen")
    eid = "1001"
    summary = run_align(AlignConfig(
        data=DataConfig(root=str(tmp_path / "allen"), genes=[eid]),
        reference=str(tmp_path / "allen" / "ara_nissl_25.nrrd"),
        output=AlignOutputConfig(root=str(tmp_path / "aligned")),
        run=RunConfig(progress=False),
    ))
    assert summary.ok and summary.count("done") == 1
    # every section's square now sits where the Nissl shows it
    raw = load_dataset(str(tmp_path / "allen" / eid))
    aligned = np.load(tmp_path / "aligned" / f"{eid}.npy")
    before = np.load(tmp_path / "allen" / f"{eid}.npy")
    nissl = np.load(tmp_path / "aligned" / "reference" / "ara_nissl_25.npy", mmap_mode="r")
    for k, s in enumerate(raw.section_numbers):
        target = _centroid(np.asarray(nissl[s], dtype=np.float32))
        was = _centroid(registration_image(np.moveaxis(before[k], -1, 0), 255.0, Contrast.auto))
        now = _centroid(registration_image(np.moveaxis(aligned[k], -1, 0), 255.0, Contrast.auto))
        # the download leaves each square ~2.7 px from the Nissl's (NISSL_SHIFT, less the
        # half-pixel conventions of the warp); the alignment closes the gap, to within
        # 0.36 px on the fake server's anti-aliased squares (measured)
        assert np.linalg.norm(was - target) > 2.0, (k, was, target)
        assert np.linalg.norm(now - target) < 0.4, (k, now, target)
    # and the interpolation job reconstructs the aligned experiment, here guided by the
    # Nissl volume the align job rewrote as .npy
    result = run_interpolation(Config(
        data=DataConfig(root=str(tmp_path / "aligned"), genes=[eid]),
        model=ModelConfig(name="dis"),
        interpolation=InterpolationConfig(reference=summary.reference["npy"]),
        output=OutputConfig(root=str(tmp_path / "volumes")),
        run=RunConfig(progress=False),
    ))
    assert result.ok and result.datasets == [eid] and result.tasks_failed == 0
    assert result.slices_written > 0
