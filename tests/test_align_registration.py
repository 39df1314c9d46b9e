"""Registration of one section to its Nissl slice (ANTsPy), without Ray or files."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest

from atlinter_ray.align.config import Contrast, Fill, Transform, ants_params
from atlinter_ray.align.registration import (
    PASSED_THROUGH,
    REGISTERED,
    align_section,
    apply_field,
    fill_values,
    make_deterministic,
    register,
    registration_image,
    to_gray,
)
from atlinter_ray.errors import ConfigError
from atlinter_ray.testing.align_data import (
    AXES,
    misaligned_section,
    reference_volume,
    residual,
)

SLICE = {"coronal": 45, "sagittal": 38}


@pytest.fixture(scope="module", autouse=True)
def deterministic() -> None:
    make_deterministic(1)


def _chw(image: np.ndarray) -> np.ndarray:
    return image[None] if image.ndim == 2 else np.moveaxis(image, -1, 0)


def _nissl(volume: np.ndarray, axis: str, number: int) -> np.ndarray:
    return to_gray(np.take(volume, number, axis=AXES[axis])[None], float(volume.max()))


def _align(volume, axis, rgb, transform=Transform.syn, amplitude=3.0):
    image, applied = misaligned_section(volume, axis, SLICE[axis], amplitude, seed=3, rgb=rgb)
    section = _chw(image)
    out = align_section(section, 255.0, _nissl(volume, axis, SLICE[axis]), transform, {},
                        Fill.atlinter, Contrast.auto)
    tissue = _nissl(volume, axis, SLICE[axis]) > 0.05
    return section, applied, out, tissue


@pytest.mark.parametrize("axis", ["coronal", "sagittal"])
@pytest.mark.parametrize("rgb", [False, True], ids=["grey", "rgb"])
def test_a_known_deformation_of_a_real_slice_is_recovered(axis: str, rgb: bool) -> None:
    volume = reference_volume()
    section, applied, out, tissue = _align(volume, axis, rgb)
    error = residual(out.field, applied)[tissue].mean()
    moved = np.hypot(applied[..., 0], applied[..., 1])[tissue].mean()
    assert moved > 2.0
    assert error < 0.12 * moved, (error, moved)  # SyN leaves 4-7 % of a ~3 px deformation
    assert out.record["status"] == REGISTERED
    assert out.record["after"]["ncc"] > out.record["before"]["ncc"] + 0.05
    assert out.record["after"]["mi"] > out.record["before"]["mi"]
    assert out.aligned.shape == section.shape and out.aligned.dtype == np.uint8


@pytest.mark.slow
def test_a_real_slice_at_the_ccf_plane_size_is_registered_back() -> None:
    volume = reference_volume((91, 320, 456))
    _, applied, out, tissue = _align(volume, "coronal", rgb=True, amplitude=8.0)
    error = residual(out.field, applied)[tissue].mean()
    moved = np.hypot(applied[..., 0], applied[..., 1])[tissue].mean()
    assert moved > 6.0
    assert error < 0.15 * moved, (error, moved)  # measured 11 %


@pytest.mark.parametrize("transform", [Transform.affine, Transform.rigid, Transform.syn_only,
                                       Transform.syn_ra, Transform.translation])
def test_every_other_transform_runs_and_reduces_the_error(transform: Transform) -> None:
    volume = reference_volume()
    _, applied, out, tissue = _align(volume, "coronal", rgb=False, transform=transform)
    error = residual(out.field, applied)[tissue].mean()
    moved = np.hypot(applied[..., 0], applied[..., 1])[tissue].mean()
    assert error < 0.8 * moved, (transform, error, moved)
    if transform in (Transform.translation, Transform.rigid):
        # a linear transform has a constant Jacobian: its field is affine in x
        rows, cols = np.mgrid[0 : out.field.shape[0], 0 : out.field.shape[1]]
        design = np.stack([np.ones(rows.size), rows.ravel(), cols.ravel()], 1)
        for k in range(2):
            fit = np.linalg.lstsq(design, out.field[..., k].ravel(), rcond=None)[0]
            assert np.abs(design @ fit - out.field[..., k].ravel()).max() < 1e-3


def test_apply_field_matches_ants_apply_transforms() -> None:
    import ants

    volume = reference_volume()
    image, _ = misaligned_section(volume, "coronal", 45, 3.0, seed=1, rgb=False)
    fixed = _nissl(volume, "coronal", 45)
    field = register(fixed, image.astype(np.float32), Transform.syn, {})
    vector = ants.from_numpy(field, has_components=True)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        ants.image_write(vector, f"{tmp}/field.nii.gz")
        theirs = ants.apply_transforms(
            fixed=ants.from_numpy(fixed), moving=ants.from_numpy(image.astype(np.float32)),
            transformlist=[f"{tmp}/field.nii.gz"], defaultvalue=7.0,
        ).numpy()
    ours = apply_field(image[None].astype(np.float32), field, [7.0])[0]
    assert np.abs(ours - theirs).max() < 1e-3
    assert (theirs == 7.0).any()  # the fill was exercised


def test_fill_and_contrast_follow_the_predecessor() -> None:
    rgb = np.zeros((3, 4, 5), np.uint8)
    rgb[:, 0, 0] = (240, 230, 220)
    grey = np.full((1, 4, 5), 9, np.uint8)
    assert fill_values(rgb, Fill.atlinter) == [240.0, 230.0, 220.0]
    assert fill_values(grey, Fill.atlinter) == [0.0]
    assert fill_values(grey, Fill.corner) == [9.0]
    assert fill_values(rgb, Fill.zero) == [0.0, 0.0, 0.0]
    # RGB: 1 - rgb2gray; grayscale: the raw values, as atlinter's align.py gave ANTs
    from skimage.color import rgb2gray

    expected = 1 - rgb2gray(np.moveaxis(rgb, 0, -1)).astype(np.float32)
    np.testing.assert_allclose(registration_image(rgb, 255.0, Contrast.auto), expected, atol=1e-6)
    np.testing.assert_array_equal(registration_image(grey, 255.0, Contrast.auto), grey[0])
    np.testing.assert_allclose(registration_image(grey, 255.0, Contrast.inverted), 1 - 9 / 255, atol=1e-6)


def test_sections_without_a_nissl_slice_or_blank_pass_through_unchanged() -> None:
    section = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(1, 6, 4)
    beyond = align_section(section, 255.0, None, Transform.syn, {}, Fill.atlinter, Contrast.auto)
    blank = align_section(np.zeros_like(section), 255.0, np.ones((6, 4), np.float32),
                          Transform.syn, {}, Fill.atlinter, Contrast.auto)
    for out, reason in ((beyond, "beyond the reference"), (blank, "blank section")):
        assert out.record == {"status": PASSED_THROUGH, "reason": reason}
        assert not out.field.any() and out.field.shape == (6, 4, 2)
    np.testing.assert_array_equal(beyond.aligned, section)


def test_registration_params_are_checked_and_passed_to_ants() -> None:
    assert ants_params({"reg_iterations": [20, 10, 0], "grad_step": 1}) == {
        "reg_iterations": (20, 10, 0), "grad_step": 1.0}
    with pytest.raises(ConfigError, match="unknown .*'iterations'.*choose from"):
        ants_params({"iterations": [1]})
    with pytest.raises(ConfigError, match="list of integers"):
        ants_params({"reg_iterations": "40x20"})
    volume = reference_volume()
    image, applied = misaligned_section(volume, "coronal", 45, 3.0, seed=1, rgb=False)
    fixed = _nissl(volume, "coronal", 45)
    quick = register(fixed, image.astype(np.float32), Transform.syn,
                     ants_params({"reg_iterations": [1, 0, 0]}))
    full = register(fixed, image.astype(np.float32), Transform.syn, {})
    tissue = fixed > 0.05
    assert residual(quick, applied)[tissue].mean() > 1.5 * residual(full, applied)[tissue].mean()


_IN_ANOTHER_PROCESS = """
import hashlib, json, sys
import numpy as np
from atlinter_ray.align.config import Contrast, Fill, Transform
from atlinter_ray.align.registration import align_section, make_deterministic, to_gray
from atlinter_ray.testing.align_data import misaligned_section, reference_volume
make_deterministic(1)
volume = reference_volume()
image, _ = misaligned_section(volume, "sagittal", 38, 3.0, seed=3, rgb=True)
nissl = to_gray(np.take(volume, 38, axis=2)[None], float(volume.max()))
out = align_section(np.moveaxis(image, -1, 0), 255.0, nissl, Transform.syn, {}, Fill.atlinter,
                    Contrast.auto)
print(json.dumps([hashlib.sha256(out.aligned.tobytes()).hexdigest(),
                  hashlib.sha256(out.field.tobytes()).hexdigest()]))
"""


def test_a_registration_gives_the_same_bytes_in_every_process() -> None:
    runs = [json.loads(subprocess.run([sys.executable, "-c", _IN_ANOTHER_PROCESS], check=True,
                                      capture_output=True, text=True).stdout.splitlines()[-1])
            for _ in range(2)]
    volume = reference_volume()
    _, _, out, _ = _align(volume, "sagittal", rgb=True)
    here = [hashlib.sha256(out.aligned.tobytes()).hexdigest(),
            hashlib.sha256(out.field.tobytes()).hexdigest()]
    assert runs[0] == runs[1] == here
