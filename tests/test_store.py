"""The output store: zarr's bytes without zarr's cost, images bound to their runs, leases."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from atlinter_ray.dataset import load_dataset
from atlinter_ray.errors import (
    ConfigError,
    IncompleteOutputError,
    OutputBusyError,
    StorageCredentialsError,
    StoreError,
)
from atlinter_ray.identity import fingerprint
from atlinter_ray.layout import Layout, array_spec
from atlinter_ray.objects import s3_settings
from atlinter_ray.store import VolumeStore
from atlinter_ray.testing.datasets import prepare_image, real_volume, sections_of, write_dataset

SECTIONS = [4, 10, 16, 23, 30, 37, 45, 52, 60, 66, 72, 80, 86]


def _dataset(tmp_path: Path, sections: list[int] = SECTIONS, axis: str = "coronal",
             rgb: bool = False, dtype: str = "uint8", name: str = "g"):
    volume = real_volume(rgb=rgb).astype(dtype)
    sections = [s for s in sections if s < volume.shape[{"coronal": 0, "sagittal": 2}[axis]]]
    extra = {"intensity_max": 255.0} if dtype.startswith("float") else {}
    write_dataset(tmp_path / "in", name, sections_of(volume, sections, axis), sections, axis,
                  reference_shape=list(volume.shape[:3]), **extra)
    return load_dataset(str(tmp_path / "in" / name))


def _fp(ds):
    return fingerprint(ds)


@pytest.mark.parametrize("axis", ["coronal", "sagittal"])
@pytest.mark.parametrize("rgb, dtype, chunks", [
    (False, "uint8", None), (True, "uint8", None), (False, "uint16", (32, 40)),
    (True, "float32", (50, 30)),
])
def test_direct_chunk_writes_are_the_bytes_zarr_writes(
    tmp_path: Path, axis: str, rgb: bool, dtype: str, chunks: tuple[int, int] | None
) -> None:
    ds = _dataset(tmp_path, axis=axis, rgb=rgb, dtype=dtype)
    store = VolumeStore(str(tmp_path / "out"))
    layout = Layout(chunks=chunks, zstd_level=3)
    store.prepare_image(ds, dtype, {"model": "linear"}, _fp(ds), layout)
    rng = np.random.default_rng(0)
    h, w = ds.image_shape
    frames = (rng.random((5, ds.channels, h, w)) * 200).astype(dtype)
    frames[2] = 0  # an all-zero slice is stored too: a missing object is a lost one
    objects = store.write_slices(ds, 7, frames)
    # the same slices written by zarr itself into a twin array
    spec = array_spec(ds, layout)
    twin = zarr.create_array(str(tmp_path / "twin"), shape=spec.shape, chunks=spec.chunks,
                             dtype=dtype, fill_value=0, compressors=zarr.codecs.ZstdCodec(level=3),
                             config={"write_empty_chunks": True})
    axis_index = twin.ndim - 3 + ds.axis_index
    index = [slice(None)] * twin.ndim
    index[axis_index] = slice(7, 12)
    twin[tuple(index)] = np.moveaxis(frames if rgb else frames[:, 0], 0, axis_index)
    ours = tmp_path / "out" / "g.ome.zarr" / "0"
    twins = sorted(p.relative_to(tmp_path / "twin").as_posix()
                   for p in (tmp_path / "twin" / "c").rglob("*") if p.is_file())
    assert sorted(objects) == twins and len(twins) == 5 * (1 if chunks is None else
                                                           len(list(_grid(ds, chunks))))
    for key in twins:
        assert (ours / key).read_bytes() == (tmp_path / "twin" / key).read_bytes(), key
        assert objects[key] == (ours / key).stat().st_size
    np.testing.assert_array_equal(store.read_volume(ds.id)[tuple(index)], twin[tuple(index)])


def _grid(ds, chunks):
    h, w = ds.image_shape
    return [(i, j) for i in range(-(-h // chunks[0])) for j in range(-(-w // chunks[1]))]


def test_sharded_layout_stores_one_object_per_slice(tmp_path: Path) -> None:
    ds = _dataset(tmp_path, rgb=True)
    store = VolumeStore(str(tmp_path / "out"))
    layout = Layout(chunks=(32, 32), shards=True)
    store.prepare_image(ds, "uint8", {"model": "linear"}, _fp(ds), layout)
    frames = np.random.default_rng(1).integers(0, 255, (3, 3, *ds.image_shape), dtype=np.uint8)
    objects = store.write_slices(ds, 20, frames)
    assert sorted(objects) == ["c/0/20/0/0", "c/0/21/0/0", "c/0/22/0/0"]  # one shard per slice
    assert set(store.stored_objects(ds.id)) == set(objects)
    assert all(v is None for v in objects.values())  # zarr wrote them: sizes unknown
    np.testing.assert_array_equal(store.read_volume(ds.id)[:, 20:23], np.moveaxis(frames, 0, 1))
    with pytest.raises(Exception, match="output.shards=true needs output.chunks"):
        Layout(shards=True).check()


def test_markers_count_only_for_their_image_generation(tmp_path: Path) -> None:
    ds = _dataset(tmp_path)
    store = VolumeStore(str(tmp_path / "out"))
    first = prepare_image(store, ds)
    assert first.created and not first.complete
    store.mark_done(first.identity, "g/4-10", {"slices": [], "objects": {}})
    assert store.done_task_ids("g", first.identity) == {"g/4-10"}
    assert prepare_image(store, ds).identity == first.identity  # resumed: same generation
    # the image is lost (a colleague's rm, a lifecycle rule), its markers are not
    import shutil

    shutil.rmtree(tmp_path / "out" / "g.ome.zarr")
    second = prepare_image(store, ds)
    assert second.created and second.identity.generation != first.identity.generation
    assert store.done_task_ids("g", second.identity) == set()
    assert not (tmp_path / "out" / "_progress" / "g" / first.identity.generation).exists()
    # a marker carrying another fingerprint (or generation) is never believed
    store.mark_done(second.identity, "g/4-10", {"slices": [], "objects": {}})
    other = type(second.identity)(second.identity.generation, "0" * 64)
    assert store.done_records("g", other) == {}
    assert set(store.done_records("g", second.identity)) == {"g/4-10"}


def test_a_half_made_image_is_made_again(tmp_path: Path) -> None:
    ds = _dataset(tmp_path)
    store = VolumeStore(str(tmp_path / "out"))
    state = prepare_image(store, ds)
    store.write_slices(ds, 0, np.ones((2, 1, *ds.image_shape), np.uint8))
    (tmp_path / "out" / "g.ome.zarr" / "zarr.json").unlink()  # killed before the metadata
    again = prepare_image(store, ds)
    assert again.created and again.identity.generation != state.identity.generation
    assert store.stored_objects(ds.id) == {}  # the old generation's chunks are gone


def test_changed_input_is_refused_naming_the_change(tmp_path: Path) -> None:
    ds = _dataset(tmp_path)
    store = VolumeStore(str(tmp_path / "out"))
    prepare_image(store, ds)
    fewer = _dataset(tmp_path, [s for s in SECTIONS if s != 45])
    with pytest.raises(StoreError, match=r"section numbers \(removed \[45\], added \[\]\).*"
                                         r"output.overwrite=true"):
        prepare_image(store, fewer)
    _dataset(tmp_path)  # the same sections again...
    images = np.load(tmp_path / "in" / "g.npy")
    images[3, 10, 10] ^= 1  # ...and one pixel changed
    np.save(tmp_path / "in" / "g.npy", images)
    with pytest.raises(StoreError, match="the content of the .npy images changed"):
        prepare_image(store, load_dataset(str(tmp_path / "in" / "g")))


def test_overwrite_replaces_another_run_and_resumes_its_own(tmp_path: Path) -> None:
    ds = _dataset(tmp_path)
    store = VolumeStore(str(tmp_path / "out"))
    first = store.prepare_image(ds, "uint8", {"model": "linear"}, _fp(ds))
    with pytest.raises(StoreError, match="different run"):
        store.prepare_image(ds, "uint8", {"model": "dis"}, _fp(ds))
    other = store.prepare_image(ds, "uint8", {"model": "dis"}, _fp(ds), overwrite=True)
    assert other.created and other.identity.generation != first.identity.generation
    again = store.prepare_image(ds, "uint8", {"model": "dis"}, _fp(ds), overwrite=True)
    assert not again.created and again.identity == other.identity


def _holder(root: Path) -> subprocess.Popen:
    code = ("import sys, time; from atlinter_ray.store import VolumeStore; "
            f"VolumeStore({str(root)!r}).lease().acquire(); print('held', flush=True); "
            "time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_driver_is_refused_and_a_dead_ones_lock_is_free(tmp_path: Path) -> None:
    root = tmp_path / "out"
    holder = _holder(root)
    try:
        with pytest.raises(OutputBusyError, match=rf"another driver \(pid {holder.pid} .*"
                                                  "another output.root"):
            VolumeStore(str(root)).lease().acquire()
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait()
    with VolumeStore(str(root)).lease():  # the OS dropped the dead driver's lock
        pass


def test_object_store_lease_is_exclusive_expires_and_is_lost(s3_servers) -> None:
    """On moto and on SeaweedFS (whose 412 has no <Condition>): a conflict is OutputBusyError."""
    store = VolumeStore("s3://atlas-out/lease-test", s3_servers.direct)
    first = store.lease(ttl_s=600)
    first.acquire()
    try:
        with pytest.raises(OutputBusyError, match="last heartbeat"):
            store.lease(ttl_s=600).acquire()
        # the first driver freezes (its heartbeat stops); to a driver that waits 1 s for a
        # heartbeat its lease has expired, and is taken
        first._stop.set()
        time.sleep(1.5)
        second = store.lease(ttl_s=1.0)
        second.acquire()
        first._stop.clear()
        assert not first._renew()  # what its heartbeat finds when it wakes up
        with pytest.raises(IncompleteOutputError, match="lost its lease"):
            first.check()
        second.release()
        assert store.objects.get("_lease.json") is None
    finally:
        first._stop.set()


def test_two_takers_of_an_expired_lease_one_wins(s3_servers) -> None:
    """The takeover is an If-Match PUT: the slower taker of the same version is refused."""
    store = VolumeStore("s3://atlas-out/lease-race", s3_servers.direct)
    stale = store.lease()
    stale._put(None)  # a record nobody renews
    _, etag = stale._read()
    winner, loser = store.lease(), store.lease()
    winner._put(etag)
    with pytest.raises(FileExistsError):
        loser._put(etag)  # the version both read is gone
    assert stale._read()[0]["owner"] == winner.owner
    store.objects.delete(["_lease.json"])


@pytest.mark.parametrize("s3_servers", ["seaweedfs"], indirect=True)
def test_a_wrong_secret_fails_clearly_naming_the_credentials(s3_servers) -> None:
    """SeaweedFS checks signatures (moto takes any): a wrong secret is refused at the lease,
    before any work, with the variables to fix and without the secret."""
    store = VolumeStore("s3://atlas-out/creds", {**s3_servers.direct, "secret": "wrong-secret"})
    with pytest.raises(StorageCredentialsError) as err:
        store.lease().acquire()
    message = str(err.value)
    assert "SignatureDoesNotMatch" in message and "AWS_SECRET_ACCESS_KEY" in message
    assert "output.storage_options.key / .secret" in message and "wrong-secret" not in message
    assert VolumeStore("s3://atlas-out/creds", s3_servers.direct).read_bytes("_lease.json") is None


@pytest.mark.parametrize("s3_servers", ["seaweedfs"], indirect=True)
def test_credentials_from_the_environment_are_used_and_checked(s3_servers, monkeypatch) -> None:
    """Without key/secret in storage_options the AWS_* variables sign the requests."""
    options = {"endpoint_url": s3_servers.direct["endpoint_url"]}
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_servers.key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_servers.secret)
    store = VolumeStore("s3://atlas-out/env-creds", options)
    store.write_bytes("note.txt", b"signed with the environment's key")
    assert store.read_bytes("note.txt") == b"signed with the environment's key"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "a-wrong-secret")
    with pytest.raises(StorageCredentialsError, match="AWS_SECRET_ACCESS_KEY"):
        VolumeStore("s3://atlas-out/env-creds", options).read_bytes("note.txt")


def test_s3fs_style_options_become_obstore_settings() -> None:
    config, client, retry = s3_settings({
        "key": "k", "secret": "s", "endpoint_url": "http://127.0.0.1:9000",
        "client_kwargs": {"region_name": "eu-west-1"}, "max_concurrency": 4,
        "config_kwargs": {"retries": {"max_attempts": 1}, "read_timeout": 20}})
    assert config == {"access_key_id": "k", "secret_access_key": "s",
                      "endpoint": "http://127.0.0.1:9000", "region": "eu-west-1"}
    assert client["allow_http"] is True and client["read_timeout"].total_seconds() == 20
    assert retry == {"max_retries": 0}
    with pytest.raises(ConfigError, match=r"output.storage_options.profile is not an S3 option"):
        s3_settings({"profile": "default"})
    with pytest.raises(ConfigError, match=r"config_kwargs.signature_version"):
        s3_settings({"config_kwargs": {"signature_version": "s3v4"}})


@pytest.mark.parametrize("dtype", ["uint8", "int8", "uint16", "int16", "float32"])
def test_pyramid_means_are_the_float32_means_rounded_half_to_even(dtype: str) -> None:
    from atlinter_ray.layout import downsample2

    rng = np.random.default_rng(2)
    info = np.iinfo(dtype) if dtype != "float32" else None
    for low, high in ((0, 3), (-2, 1), (None, None)):  # few values (many ties), full range
        if info is None:
            block = rng.random((3, 7, 10, 9)).astype(dtype)
        else:
            low = info.min if low is None else max(low, info.min)
            high = info.max if high is None else high
            block = rng.integers(low, high, (3, 7, 10, 9), endpoint=True).astype(dtype)
        padded = np.pad(block, [(0, 0), (0, 1), (0, 0), (0, 1)], mode="edge")
        mean = padded.reshape(3, 4, 2, 5, 2, 5, 2).astype(np.float32).mean(axis=(2, 4, 6))
        assert downsample2(block).dtype == block.dtype
        if info is None:  # float sums in another order: equal to rounding
            np.testing.assert_allclose(downsample2(block), mean, rtol=1e-6)
        else:
            np.testing.assert_array_equal(downsample2(block), np.rint(mean).astype(dtype))
