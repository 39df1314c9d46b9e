"""The align job's defaults against the predecessor's own align code (atlinter 0.2.3).

``single_registration`` of atlinter's ``data/align.py`` runs unchanged, with atlannot
0.1.3's ANTs wrapper, under the same seed and one ITK thread as ours (without them ANTs
does not repeat itself, the predecessor included).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from atlinter_ray.align.config import AlignConfig, AlignOutputConfig, Contrast, Fill, Transform
from atlinter_ray.align.job import run_align
from atlinter_ray.align.registration import (
    align_section,
    apply_field,
    fill_values,
    make_deterministic,
    registration_image,
)
from atlinter_ray.config import DataConfig, ResourcesConfig, RunConfig
from atlinter_ray.testing.align_data import misaligned_section, reference_volume, write_misaligned
from atlinter_ray.testing.predecessor_align import predecessor_align


@pytest.mark.parametrize("axis,number", [("coronal", 45), ("sagittal", 38)])
@pytest.mark.parametrize("rgb", [False, True], ids=["grey", "rgb"])
def test_default_settings_give_the_predecessors_transform_and_sections(axis: str, number: int,
                                                                        rgb: bool) -> None:
    make_deterministic(1)
    align = predecessor_align()
    volume = reference_volume()
    nissl = volume / volume.max()  # what align.py does to the Nissl volume
    plane = nissl[number] if axis == "coronal" else nissl[:, :, number]
    image, _ = misaligned_section(volume, axis, number, 3.0, seed=4, rgb=rgb)
    section = image[None] if image.ndim == 2 else np.moveaxis(image, -1, 0)

    theirs = np.asarray(align.single_registration(plane, image))
    their_field = align.register(plane, registration_image(section, 255.0, Contrast.auto))
    ours = align_section(section, 255.0, plane.astype(np.float32), Transform.syn, {},
                         Fill.atlinter, Contrast.auto)

    # the same transform: ANTs called the same way on the same images
    np.testing.assert_allclose(ours.field, their_field[:, :, 0, 0, :], atol=1e-5)
    # the same sections before rounding: align.py truncates into the input dtype, we round
    exact = apply_field(section, ours.field, fill_values(section, Fill.atlinter))
    exact = exact[0] if image.ndim == 2 else np.moveaxis(exact, 0, -1)
    at_integer = np.abs(exact - np.round(exact)) < 1e-6  # float noise decides the floor there
    assert theirs.dtype == image.dtype
    assert ((theirs == np.floor(exact)) | at_integer).all()
    mine = ours.aligned[0] if image.ndim == 2 else np.moveaxis(ours.aligned, 0, -1)
    np.testing.assert_array_equal(mine, np.rint(exact).astype(np.uint8))
    assert np.abs(mine.astype(int) - theirs).max() <= 1


@pytest.mark.parametrize(("axis", "numbers", "dtype", "peak", "rgb"), [
    ("coronal", [45, 60], "uint8", 130, False),
    ("coronal", [45, 60], "uint8", 130, True),
    ("sagittal", [30, 38], "uint16", 3000, False),
], ids=["coronal-uint8-grey", "coronal-uint8-rgb", "sagittal-uint16-grey"])
def test_the_job_matches_the_predecessor_on_a_nissl_darker_than_its_dtype(
        tmp_path: Path, axis: str, numbers: list[int], dtype: str, peak: int, rgb: bool) -> None:
    """A Nissl peaking below its dtype's maximum: both divide it by its own maximum."""
    volume = reference_volume()
    dim = np.rint(volume.astype(np.float64) * (peak / 255)).astype(dtype)
    assert dim.max() == peak
    np.save(tmp_path / "nissl.npy", dim)
    write_misaligned(tmp_path, "gene", volume, axis, numbers, rgb=rgb, seed=4)
    cfg = AlignConfig(
        data=DataConfig(root=str(tmp_path), genes=["gene"]),
        reference=str(tmp_path / "nissl.npy"),
        output=AlignOutputConfig(root=str(tmp_path / "out")),
        resources=ResourcesConfig(max_workers=1, local_cpus=1),
        run=RunConfig(serial=True, progress=False),
    )
    assert run_align(cfg).count("done") == 1
    ours = np.load(tmp_path / "out" / "transforms" / "gene.npy")
    mine = np.load(tmp_path / "out" / "gene.npy")

    make_deterministic(1)
    align = predecessor_align()
    nissl = dim / dim.max()  # what align.py does to the Nissl volume
    gene = np.load(tmp_path / "gene.npy")
    for k, number in enumerate(numbers):
        plane = nissl[number] if axis == "coronal" else nissl[:, :, number]
        section = gene[k][None] if not rgb else np.moveaxis(gene[k], -1, 0)
        their_field = align.register(plane, registration_image(section, 255.0, Contrast.auto))
        np.testing.assert_allclose(ours[k], their_field[:, :, 0, 0, :], atol=1e-5)
        theirs = np.asarray(align.single_registration(plane, gene[k]))
        assert np.abs(mine[k].astype(int) - theirs).max() <= 1
