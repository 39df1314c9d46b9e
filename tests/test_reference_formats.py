"""References as users have them: .nrrd (as Allen ships the Nissl), .npy, OME-Zarr."""

from __future__ import annotations

from pathlib import Path

import nrrd
import numpy as np
import pytest
import zarr

from atlinter_ray.dataset import load_dataset
from atlinter_ray.errors import DatasetError, DatasetNotFoundError
from atlinter_ray.reference import prepare_reference, read_reference_slices
from atlinter_ray.testing.datasets import real_volume, sections_of, write_dataset


def _dataset(tmp_path: Path, volume: np.ndarray):  # type: ignore[no-untyped-def]
    write_dataset(tmp_path / "in", "g", sections_of(volume, [1, 9], "coronal"), [1, 9],
                  reference_shape=list(volume.shape[:3]))
    return load_dataset(str(tmp_path / "in" / "g"))


def _check_slices(ref, volume: np.ndarray) -> None:  # type: ignore[no-untyped-def]
    """Coronal and sagittal slices read from ``ref`` are ``volume``'s, ``(k, C, H, W)``."""
    wanted = [40, 3, 76]
    for axis in (0, 2):
        got = read_reference_slices(ref, axis, wanted)
        planes = np.stack([np.take(volume, s, axis=axis) for s in wanted])
        expected = planes[:, None] if planes.ndim == 3 else np.moveaxis(planes, -1, 1)
        np.testing.assert_array_equal(got, expected)


def test_an_allen_style_nrrd_reads_in_reference_orientation_and_is_rewritten_once(
    tmp_path: Path,
) -> None:
    volume = real_volume()  # (AP, DV, LR) = (91, 79, 77)
    url = str(tmp_path / "ara_nissl.nrrd")
    nrrd.write(url, volume)  # as Allen writes: sizes "91 79 77", the first axis fastest
    assert list(nrrd.read_header(url)["sizes"]) == [91, 79, 77]
    with open(url, "rb") as f:
        assert b"sizes: 91 79 77" in f.read(400)
    cache = str(tmp_path / "out" / "_reference")
    ref = prepare_reference(url, [_dataset(tmp_path, volume)], {}, cache)
    assert (ref.url, ref.shape, ref.channels, ref.peak) == (url, (91, 79, 77), 1, 255.0)
    assert ref.source.startswith(cache) and ref.source.endswith(".npy")
    _check_slices(ref, volume)
    stamp = Path(ref.source).stat().st_mtime_ns
    again = prepare_reference(url, [_dataset(tmp_path, volume)], {}, cache)
    assert again.source == ref.source and Path(ref.source).stat().st_mtime_ns == stamp
    # another volume under the same name is rewritten, not read from the old copy
    nrrd.write(url, volume[::-1].copy())
    changed = prepare_reference(url, [_dataset(tmp_path, volume)], {}, cache)
    assert changed.source != ref.source
    _check_slices(changed, volume[::-1])


def test_a_nrrd_in_another_orientation_is_refused_before_it_is_read(tmp_path: Path) -> None:
    volume = real_volume()
    url = str(tmp_path / "nissl.nrrd")
    nrrd.write(url, volume.transpose(2, 1, 0).copy())  # LR, DV, AP
    cache = tmp_path / "cache"
    with pytest.raises(DatasetError, match=(
            r"nissl\.nrrd: field 'interpolation\.reference': volume shape \(77, 79, 91\) "
            r"does not match dataset g's reference shape \(91, 79, 77\)\. Fix: give the "
            r"whole reference volume in reference orientation")):
        prepare_reference(url, [_dataset(tmp_path, volume)], {}, str(cache))
    assert not cache.exists()
    with pytest.raises(DatasetNotFoundError, match=r"absent\.nrrd: .*not found.*\.nrrd"):
        prepare_reference(str(tmp_path / "absent.nrrd"), [_dataset(tmp_path, volume)], {},
                          str(cache))


@pytest.mark.parametrize("rgb", [False, True])
def test_an_ome_zarr_reference_reads_its_full_resolution_array(
    tmp_path: Path, rgb: bool
) -> None:
    volume = real_volume(rgb=rgb)
    stored = np.moveaxis(volume, -1, 0) if rgb else volume  # channels first, as we write
    url = str(tmp_path / "nissl.ome.zarr")
    group = zarr.open_group(url, mode="w")
    array = group.create_array("0", shape=stored.shape, dtype=stored.dtype,
                               chunks=(1, *stored.shape[1:]) if not rgb else (3, 1, 79, 77))
    array[...] = stored
    ref = prepare_reference(url, [_dataset(tmp_path, volume)], {}, str(tmp_path / "c"))
    assert (ref.shape, ref.channels, ref.peak) == ((91, 79, 77), 3 if rgb else 1, 255.0)
    _check_slices(ref, volume)
    assert not (tmp_path / "c").exists()


def test_a_bad_ome_zarr_reference_is_a_clear_error(tmp_path: Path) -> None:
    volume = real_volume()
    ds = _dataset(tmp_path, volume)
    with pytest.raises(DatasetNotFoundError, match=r"absent\.zarr: .*no OME-Zarr array"):
        prepare_reference(str(tmp_path / "absent.zarr"), [ds], {}, str(tmp_path / "c"))
    url = str(tmp_path / "cut.zarr")
    zarr.open_group(url, mode="w").create_array("0", data=volume[:, :, :-1])
    with pytest.raises(DatasetError, match=r"cut\.zarr: .*volume shape \(91, 79, 76\) does "
                                           r"not match"):
        prepare_reference(url, [ds], {}, str(tmp_path / "c"))
    with pytest.raises(DatasetError, match=r"nissl\.tif: .*not a \.npy, \.nrrd or OME-Zarr"):
        prepare_reference(str(tmp_path / "nissl.tif"), [ds], {}, str(tmp_path / "c"))
