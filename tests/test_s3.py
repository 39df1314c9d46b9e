"""``s3://`` in and out, against real S3-protocol servers (moto, SeaweedFS) on loopback."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import s3fs

from atlinter_ray.config import Config
from atlinter_ray.errors import StorageCredentialsError
from atlinter_ray.layout import DEFAULT_SLAB
from atlinter_ray.pipeline import run
from atlinter_ray.store import VolumeStore
from atlinter_ray.testing.datasets import real_volume, sections_of, write_dataset

SECTIONS = [3, 11, 19, 27, 35, 43, 51, 59, 67, 75, 83]
#: Requests of this one-gene job beyond its tasks' six each: 50 on moto, measured (the
#: driver's input checks ~10, the montage's level-0 reads 9, array and group metadata 10,
#: listings 5, lease 3-4, the final fence 1, the pyramid's one object, pictures, sidecar
#: and summary 4); a slow run adds 2 per lease renewal (every 20 s).
PER_GENE_REQUESTS = 56


@pytest.mark.ray
def test_pipeline_reads_and_writes_s3(ray_cluster, s3_servers) -> None:
    """A job in and out of S3, through the proxy that records every request it makes."""
    s3_server = s3_servers.options
    fs = s3fs.S3FileSystem(**s3_servers.direct)
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
    s3_servers.proxy.seen.clear()
    summary = run(cfg)
    assert summary.ok and summary.slices_written == 91
    requests = list(s3_servers.proxy.seen)
    tasks = -(-91 // DEFAULT_SLAB)  # one per slab
    # requests are what an object store bills and waits on: each task reads the sections
    # it needs in one ranged GET, without a HEAD; finishing reads each level-0 shard back
    # once to prove its checksum, and the montage reads the two slabs of one gap (each
    # shard's index, then its 3 x 3 inner chunks by byte range)
    npy = [m for m, path in requests if path.startswith("/atlas-in/genes/g1.npy")]
    # the driver's checks (header, size, content hash) take 3 HEADs and 2 GETs
    assert npy.count("HEAD") <= 3 and npy.count("GET") <= tasks + 2
    level0 = [path for m, path in requests
              if m == "GET" and path.startswith("/atlas-out/run1/g1.ome.zarr/0/c/")]
    assert len(level0) <= tasks + 2 * (1 + 9)
    # a task costs six requests whatever K is (its input GET above, its shard, the fence's
    # read of the lease right before its marker, its marker carrying its reduction, and
    # finishing's reads of both marker and shard); each pyramid level is
    # one object; the rest is per gene (metadata, lease, listings, pictures, summary)
    out = [(m, path) for m, path in requests if path.startswith("/atlas-out/run1/")]
    shards = [p for m, p in out if m == "PUT" and "/g1.ome.zarr/0/c/" in p]
    markers = [m for m, p in out if "/_progress/" in p and "list-type" not in p]
    assert len(shards) == tasks and sorted(markers) == ["GET"] * tasks + ["PUT"] * tasks
    fences = [p for m, p in out if m == "GET" and p.endswith("/_lease.json")]
    assert len(fences) >= tasks + 1  # every marker and the final metadata fenced
    levels = len(VolumeStore(cfg.output.root, s3_server).image_attrs("g1")["ome"][
        "multiscales"][0]["datasets"])
    pyramid = [p for m, p in out if m == "PUT" and re.search(r"/g1\.ome\.zarr/[1-9]/c/", p)]
    assert len(pyramid) == levels - 1
    per_gene = len(requests) - 6 * tasks
    assert per_gene <= PER_GENE_REQUESTS, (per_gene, sorted(requests))
    out = VolumeStore(cfg.output.root, s3_server).read_volume("g1")
    np.testing.assert_array_equal(out[SECTIONS], volume[SECTIONS])
    assert fs.exists("atlas-out/run1/g1.quicklook.png")
    (generation,) = fs.ls("atlas-out/run1/_progress/g1")  # markers of one image generation
    # one object per task: its marker, which carries its reduction
    assert sorted(p.rsplit(".", 1)[1] for p in fs.ls(generation)) == ["done"] * tasks
    text = fs.cat_file("atlas-out/run1/run_summary.json").decode()
    assert "testing-secret-value" not in text and "testing-key" not in text
    # resume on S3: everything is skipped
    again = run(cfg)
    assert again.tasks_skipped == tasks and again.tasks_done == 0


@pytest.mark.parametrize("s3_servers", ["seaweedfs"], indirect=True)
def test_a_wrong_output_secret_stops_the_job_before_any_work(s3_servers, tmp_path) -> None:
    """On a server that checks signatures, the job stops at its first request (the lease),
    with an error that names the credential settings and not the secret, writing nothing."""
    volume = real_volume()
    npy = write_dataset(tmp_path / "in", "g1", sections_of(volume, SECTIONS, "coronal"),
                        SECTIONS, reference_shape=list(volume.shape))
    cfg = Config()
    cfg.data.root, cfg.data.genes = str(npy.parent), ["g1"]
    cfg.output.root = "s3://atlas-out/wrong-secret"
    cfg.output.storage_options = {**s3_servers.direct, "secret": "not-the-secret"}
    cfg.model.name, cfg.model.params = "linear", {}
    cfg.run.progress = False
    with pytest.raises(StorageCredentialsError) as err:
        run(cfg)
    assert err.value.exit_status == 2
    message = str(err.value)
    assert "SignatureDoesNotMatch" in message and "AWS_ACCESS_KEY_ID" in message
    assert "not-the-secret" not in message
    assert s3fs.S3FileSystem(**s3_servers.direct, skip_instance_cache=True).find(
        "atlas-out/wrong-secret") == []
