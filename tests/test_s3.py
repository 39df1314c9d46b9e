"""``s3://`` in and out, against a real S3-protocol server (moto) on loopback."""

from __future__ import annotations

import json

import numpy as np
import pytest
import s3fs

from atlinter_ray.config import Config
from atlinter_ray.pipeline import run
from atlinter_ray.store import VolumeStore
from atlinter_ray.testing.datasets import real_volume, sections_of

SECTIONS = [3, 11, 19, 27, 35, 43, 51, 59, 67, 75, 83]


@pytest.mark.ray
def test_pipeline_reads_and_writes_s3(ray_cluster, s3_server) -> None:
    fs = s3fs.S3FileSystem(**s3_server)
    volume = real_volume()
    with fs.open("atlas-in/genes/g1.npy", "wb") as f:
        np.save(f, sections_of(volume, SECTIONS, "coronal"))
    fs.pipe_file("atlas-in/genes/g1.json", json.dumps(
        {"section_numbers": SECTIONS, "axis": "coronal", "reference_shape": list(volume.shape)}).encode())
    cfg = Config()
    cfg.data.root, cfg.data.genes = "s3://atlas-in/genes", ["g1"]
    cfg.data.storage_options = dict(s3_server)
    cfg.output.root, cfg.output.storage_options = "s3://atlas-out/run1", dict(s3_server)
    cfg.model.name, cfg.model.params = "farneback", {}
    cfg.run.progress = False
    summary = run(cfg)
    assert summary.ok and summary.slices_written == 91
    out = VolumeStore(cfg.output.root, s3_server).read_volume("g1")
    np.testing.assert_array_equal(out[SECTIONS], volume[SECTIONS])
    assert fs.exists("atlas-out/run1/g1.quicklook.png")
    (generation,) = fs.ls("atlas-out/run1/_progress/g1")  # markers of one image generation
    assert len(fs.ls(generation)) == len(SECTIONS) + 1
    text = fs.cat_file("atlas-out/run1/run_summary.json").decode()
    assert "testing-secret-value" not in text and "testing-key" not in text
    # resume on S3: everything is skipped
    again = run(cfg)
    assert again.tasks_skipped == len(SECTIONS) + 1 and again.tasks_done == 0
