"""The output store: zarr's shard bytes without zarr's cost, images bound to their runs, leases."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numcodecs
import numpy as np
import pytest
import zarr

from atlinter_ray.config import Config
from atlinter_ray.dataset import load_dataset
from atlinter_ray.errors import (
    ConfigError,
    IncompleteOutputError,
    OutputBusyError,
    StorageCredentialsError,
    StoreError,
)
from atlinter_ray.identity import fingerprint
from atlinter_ray.layout import DEFAULT_SLAB, Layout, array_spec, shard_encoder
from atlinter_ray.ledger import object_sum
from atlinter_ray.objects import s3_settings
from atlinter_ray.pipeline import layout_of
from atlinter_ray.store import VolumeStore, decode_marker
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
@pytest.mark.parametrize("rgb, dtype, chunks, slab, level", [
    (False, "uint8", None, 8, 3), (True, "uint8", (32, 32), 8, -3),
    (False, "uint16", (32, 40), 5, 3), (True, "float32", (50, 30), 16, 1),
])
def test_shard_writes_are_the_shards_zarr_writes(
    tmp_path: Path, axis: str, rgb: bool, dtype: str, chunks: tuple[int, int] | None,
    slab: int, level: int,
) -> None:
    ds = _dataset(tmp_path, axis=axis, rgb=rgb, dtype=dtype)
    store = VolumeStore(str(tmp_path / "out"))
    layout = Layout(slab=slab, chunks=chunks, zstd_level=level)
    store.prepare_image(ds, dtype, {"model": "linear"}, _fp(ds), layout)
    rng = np.random.default_rng(0)
    h, w = ds.image_shape
    n = ds.n_slices
    last = (n - 1) // slab * slab  # the last slab is short: the shard is padded with zeros
    frames = (rng.random((2 * slab + n - last, ds.channels, h, w)) * 200).astype(dtype)
    frames[slab] = 0  # an all-zero slice is stored too: a missing object is a lost one
    objects = store.write_slices(ds, slab, frames[: 2 * slab])
    objects |= store.write_slices(ds, last, frames[2 * slab:])
    # the same slices written by zarr itself into a twin array
    spec = array_spec(ds, layout)
    twin = zarr.create_array(str(tmp_path / "twin"), shape=spec.shape, chunks=spec.chunks,
                             shards=spec.shards, dtype=dtype, fill_value=0,
                             compressors=zarr.codecs.ZstdCodec(level=level),
                             config={"write_empty_chunks": True})
    assert store.open_array(ds.id).metadata.codecs[0].codecs[-1].level == level
    axis_index = twin.ndim - 3 + ds.axis_index
    for first, block in ((slab, frames[: 2 * slab]), (last, frames[2 * slab:])):
        index = [slice(None)] * twin.ndim
        index[axis_index] = slice(first, first + len(block))
        twin[tuple(index)] = np.moveaxis(block if rgb else block[:, 0], 0, axis_index)
    ours = tmp_path / "out" / "g.ome.zarr" / "0"
    twins = sorted(p.relative_to(tmp_path / "twin").as_posix()
                   for p in (tmp_path / "twin" / "c").rglob("*") if p.is_file())
    lead = "0/" if rgb else ""
    grid = ["1", "2", str(last // slab)] if axis == "coronal" else ["0/0/1", "0/0/2",
                                                                     f"0/0/{last // slab}"]
    expected = sorted(f"c/{lead}{g}" + ("/0/0" if axis == "coronal" else "") for g in grid)
    assert sorted(objects) == twins == expected  # one object per slab
    cells = int(np.prod([s // c for s, c in zip(spec.shards, spec.chunks)]))
    decoder = shard_encoder(twin.metadata)
    for key in twins:
        mine, theirs = (ours / key).read_bytes(), (tmp_path / "twin" / key).read_bytes()
        assert objects[key] == object_sum(mine)  # size and CRC32C of the bytes stored
        # the same inner chunks in the same order (zarr's Morton order), each the same
        # bytes once decompressed (Zstandard builds may pick other matches), then the index
        mine_at, theirs_at = _shard_index(mine, cells), _shard_index(theirs, cells)
        assert (np.argsort(mine_at[:, 0]) == np.argsort(theirs_at[:, 0])).all(), key
        for (a, n), (b, m) in zip(mine_at, theirs_at):
            assert _unzstd(mine[a : a + n]) == _unzstd(theirs[b : b + m]), key
        assert (mine_at.sum(axis=1)).max() == len(mine) - 16 * cells - 4  # then the index
        # our reader decodes zarr's shards as ours
        np.testing.assert_array_equal(decoder.decode(theirs), decoder.decode(mine))
    # zarr reads our shards (and checks each index's CRC32C) as its own, and our reader
    # reads them as zarr does
    np.testing.assert_array_equal(np.asarray(store.open_array(ds.id)[...]), twin[...])
    np.testing.assert_array_equal(store.read_volume(ds.id), twin[...])
    with pytest.raises(ValueError, match="CRC32C"):
        decoder.decode(mine[:-5] + b"x" + mine[-4:])  # a torn index


def _shard_index(shard: bytes, cells: int) -> np.ndarray:
    """``(offset, size)`` of each inner chunk, from the index at the end of a shard."""
    return np.frombuffer(shard[-4 - 16 * cells : -4], dtype="<u8").reshape(cells, 2)


def _unzstd(blob: bytes) -> bytes:
    return bytes(numcodecs.Zstd().decode(blob))


def test_a_shard_with_empty_inner_chunks_reads_as_zeros_there(tmp_path: Path) -> None:
    """zarr leaves inner chunks of only the fill value out of a shard; they read as zeros."""
    twin = zarr.create_array(str(tmp_path / "twin"), shape=(8, 64, 64), chunks=(8, 32, 32),
                             shards=(8, 64, 64), dtype="uint16", fill_value=0,
                             compressors=zarr.codecs.ZstdCodec(level=1))
    block = np.zeros((8, 64, 64), np.uint16)
    block[:, 40:, 3:9] = 1234  # one inner chunk of four holds data
    twin[...] = block
    blob = (tmp_path / "twin" / "c" / "0" / "0" / "0").read_bytes()
    assert (_shard_index(blob, 4) == 2**64 - 1).sum() == 6  # three are left out
    np.testing.assert_array_equal(shard_encoder(twin.metadata).decode(blob), block)


def test_writes_must_cover_whole_slabs_and_old_settings_are_refused(tmp_path: Path) -> None:
    ds = _dataset(tmp_path)
    store = VolumeStore(str(tmp_path / "out"))
    store.prepare_image(ds, "uint8", {"model": "linear"}, _fp(ds), Layout(slab=8))
    frames = np.ones((8, 1, *ds.image_shape), np.uint8)
    with pytest.raises(ValueError, match="not whole slabs of 8"):
        store.write_slices(ds, 4, frames)  # two writers would share slabs 0 and 1
    with pytest.raises(ValueError, match="not whole slabs of 8"):
        store.write_slices(ds, 8, frames[:5])
    with pytest.raises(ConfigError, match="output.slab=0"):
        Layout(slab=0).check()
    cfg = Config()
    cfg.output.shards = True
    with pytest.raises(ConfigError, match="output.shards=True is no longer a setting.*output.slab"):
        layout_of(cfg)


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


def test_a_marker_is_one_object_with_its_reduction_and_a_torn_one_reads_as_absent(
    tmp_path: Path,
) -> None:
    ds = _dataset(tmp_path)
    store = VolumeStore(str(tmp_path / "out"))
    identity = prepare_image(store, ds).identity
    reduction = bytes(range(256)) * 40  # any bytes: carried as they are
    store.mark_done(identity, "g/0-7", {"slices": [], "objects": {"c/0/0/0": 12}}, reduction)
    store.mark_done(identity, "g/8-15", {"slices": [], "objects": {}})  # none carried
    folder = tmp_path / "out" / "_progress" / "g" / identity.generation
    assert sorted(p.name for p in folder.iterdir()) == ["0-7.done", "8-15.done"]
    head = (folder / "0-7.done").read_bytes().split(b"\n", 1)[0]  # the record: a JSON line
    assert json.loads(head)["objects"] == {"c/0/0/0": 12}
    markers = store.done_markers("g", identity)
    assert markers["g/0-7"].reduction == reduction and markers["g/8-15"].reduction is None
    assert "reduction" not in markers["g/0-7"].record
    assert store.done_records("g", identity)["g/0-7"]["objects"] == {"c/0/0/0": 12}
    whole = (folder / "0-7.done").read_bytes()
    flipped = whole[:-1] + bytes([whole[-1] ^ 1])  # a damaged reduction: its CRC32C fails
    for torn in (whole[: len(whole) // 2], whole[:-1], whole + b"x", flipped, head, b"",
                 b"[]\n"):
        (folder / "0-7.done").write_bytes(torn)
        assert decode_marker(torn) is None
        assert set(store.done_markers("g", identity)) == {"g/8-15"}  # its task is redone
    assert store.done_task_ids("g", identity) == {"g/0-7", "g/8-15"}  # a listing of keys
    store.drop_markers(identity, ["g/0-7", "g/8-15"])
    assert list(folder.iterdir()) == []


def test_a_pyramid_level_is_one_object_read_by_inner_chunk(tmp_path: Path) -> None:
    """Levels 1.. have one writer (finishing): each is one shard, its inner chunks those of
    level 0, and zarr reads it as it reads level 0."""
    ds = _dataset(tmp_path, axis="sagittal")
    layout = Layout(slab=4, chunks=(8, 8))
    level0 = array_spec(ds, layout)
    assert level0.shards[-1] == 4 and level0.chunks[-1] == 4
    space = [-(-n // 2) for n in ds.reference_shape]
    spec = array_spec(ds, layout, space)
    assert spec.chunks == level0.chunks
    assert [-(-n // s) for n, s in zip(spec.shape, spec.shards)] == [1, 1, 1]  # one object
    store = VolumeStore(str(tmp_path / "out"))
    prepare_image(store, ds, layout=layout)
    store.create_level(ds, "1", spec, "uint8", 1)
    block = np.random.default_rng(1).integers(0, 255, spec.shape, dtype=np.uint8)
    assert list(store.write_slabs(ds, "1", 0, block)) == ["c/0/0/0"]
    np.testing.assert_array_equal(np.asarray(store.open_array(ds.id, "1")[...]), block)
    np.testing.assert_array_equal(store.read_volume(ds.id, "1"), block)


def test_a_half_made_image_is_made_again(tmp_path: Path) -> None:
    ds = _dataset(tmp_path)
    store = VolumeStore(str(tmp_path / "out"))
    state = prepare_image(store, ds)
    store.write_slices(ds, 0, np.ones((DEFAULT_SLAB, 1, *ds.image_shape), np.uint8))
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
    first = store.lease(ttl_s=6.0)  # renews every 2 s
    first.acquire()
    try:
        # a second driver watches the record, sees it renewed, and is refused
        with pytest.raises(OutputBusyError, match="is being written by another driver"):
            store.lease(ttl_s=60.0).acquire()
        # the first driver freezes (its heartbeat stops): a driver that watches the record
        # unchanged for its own TTL (seconds of its own clock) takes it over
        first._stop.set()
        assert first._thread is not None
        first._thread.join()
        second = store.lease(ttl_s=3.0)
        second.acquire()
        assert second.token.epoch == first.token.epoch + 1
        first._stop.clear()
        assert not first._renew()  # what its heartbeat finds when it wakes up
        with pytest.raises(IncompleteOutputError, match="lost its lease"):
            first.check()
        second.release()
        assert json.loads(store.objects.get("_lease.json") or b"{}")["released"]
    finally:
        first._stop.set()
        store.objects.delete(["_lease.json"])


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
