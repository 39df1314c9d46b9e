"""scripts/make_sample.py: NIfTI-1 parsing, reorientation and section picking."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from atlinter_ray.testing.pypi import load_source

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "make_sample.py"
make_sample = load_source("make_sample", SCRIPT)


def _nifti1(volume: np.ndarray, affine: np.ndarray, endian: str = "<") -> bytes:
    """Encode a 3-D int16 volume as a single-file NIfTI-1 image."""
    header = bytearray(352)
    header[0:4] = np.array(348, endian + "i4").tobytes()
    dim = np.array([3, *volume.shape, 1, 1, 1, 1], endian + "i2")
    header[40:56] = dim.tobytes()
    header[70:74] = np.array([4, 16], endian + "i2").tobytes()  # int16
    header[76:108] = np.ones(8, endian + "f4").tobytes()
    header[108:120] = np.array([352, 1, 0], endian + "f4").tobytes()
    header[254:256] = np.array(1, endian + "i2").tobytes()  # sform_code
    header[280:328] = affine[:3].astype(endian + "f4").tobytes()
    header[344:348] = b"n+1\x00"
    return bytes(header) + volume.astype(endian + "i2").tobytes(order="F")


@pytest.mark.parametrize("endian", ["<", ">"])
def test_read_nifti1_round_trips_voxels_and_affine(endian: str) -> None:
    volume = np.arange(2 * 3 * 4, dtype=np.int16).reshape(2, 3, 4)
    affine = np.array([[2, 0, 0, -5], [0, 2, 0, -6], [0, 0, 2, -7], [0, 0, 0, 1]], float)
    out, got = make_sample.read_nifti1(_nifti1(volume, affine, endian))
    np.testing.assert_array_equal(out, volume)
    np.testing.assert_array_equal(got, affine)
    with pytest.raises(ValueError, match="magic"):
        make_sample.read_nifti1(_nifti1(volume, affine, endian)[:344] + b"xxxx" * 2)


def test_reorientation_puts_anterior_dorsal_first_and_right_last() -> None:
    ras = np.zeros((5, 6, 7))
    ras[4, 5, 6] = 1.0  # most right, most anterior, most superior voxel
    out = make_sample.to_ap_dv_lr(ras, np.eye(4))
    assert out.shape == (6, 7, 5)
    assert np.argwhere(out == 1).tolist() == [[0, 0, 4]]
    # The same anatomy stored left-posterior-inferior (all axes flipped) and with the
    # voxel axes permuted (y, z, x) must land in the same place.
    lpi = ras[::-1, ::-1, ::-1]
    flip = np.diag([-1.0, -1.0, -1.0, 1.0])
    np.testing.assert_array_equal(make_sample.to_ap_dv_lr(lpi, flip), out)
    yzx = np.transpose(ras, (1, 2, 0))
    perm = np.zeros((4, 4))
    perm[1, 0] = perm[2, 1] = perm[0, 2] = perm[3, 3] = 1.0  # voxel (j, k, i) -> world
    np.testing.assert_array_equal(make_sample.to_ap_dv_lr(yzx, perm), out)


def test_block_mean_crop_and_sections() -> None:
    volume = np.arange(5 * 4 * 4, dtype=float).reshape(5, 4, 4)
    small = make_sample.block_mean(volume, 2)
    assert small.shape == (2, 2, 2)
    assert small[0, 0, 0] == volume[:2, :2, :2].mean()
    brain = np.zeros((10, 10, 10))
    brain[3:6, 4:5, 2:9] = 100
    cropped = make_sample.crop_to_foreground(brain, 8, (0, 2, 1))
    assert cropped.shape == (3, 5, 9)
    assert make_sample.known_sections(91, 4) == list(range(1, 91, 4))
    assert make_sample.known_sections(9, 4) == [0, 4, 8]
    assert make_sample.to_uint8(np.array([0.0, 20.0, 100.0])).tolist() == [0, 51, 255]
