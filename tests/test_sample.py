"""The bundled MNI152 sample: files present, metadata consistent, orientation CCF-like."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from atlinter_ray.errors import DatasetNotFoundError
from atlinter_ray.sample import (
    _sample_file,
    sample_dataset_path,
    sample_metadata_path,
    sample_truth,
)


@pytest.fixture(scope="module")
def sample() -> tuple[np.ndarray, dict, np.ndarray]:
    """Sections, metadata and truth volume of the bundled sample."""
    sections = np.load(sample_dataset_path())
    meta = json.loads(Path(sample_metadata_path()).read_text())
    return sections, meta, sample_truth()


def test_files_are_bundled_and_small() -> None:
    folder = Path(sample_dataset_path()).parent
    assert folder.name == "sample" and folder.parent.name == "atlinter_ray"
    names = {"mni152_t1.npy", "mni152_t1.json", "mni152_t1_truth.npz", "LICENSE_MNI152.txt"}
    assert names <= {p.name for p in folder.iterdir()}
    assert sum((folder / n).stat().st_size for n in names) < 1.5 * 1024**2
    licence = (folder / "LICENSE_MNI152.txt").read_text()
    assert "Louis Collins" in licence and "McGill University" in licence
    assert "Permission to use, copy, modify, and distribute" in licence


def test_metadata_is_consistent(sample) -> None:
    sections, meta, truth = sample
    assert set(meta) == {"section_numbers", "axis", "reference_shape", "voxel_size_um"}
    assert meta["voxel_size_um"] == 2000.0
    assert meta["axis"] == "coronal"
    numbers = meta["section_numbers"]
    assert all(isinstance(n, int) for n in numbers)
    assert numbers == sorted(set(numbers))
    assert np.all(np.diff(numbers) == 4)
    assert 0 <= numbers[0] and numbers[-1] < meta["reference_shape"][0]
    assert sections.dtype == np.uint8 and truth.dtype == np.uint8
    assert sections.shape == (len(numbers), *meta["reference_shape"][1:])
    assert list(truth.shape) == meta["reference_shape"]


def test_truth_at_known_sections_equals_the_sections(sample) -> None:
    sections, meta, truth = sample
    np.testing.assert_array_equal(truth[meta["section_numbers"]], sections)
    assert truth.max() == 255 and truth.min() == 0


def test_orientation_is_ap_dv_lr(sample) -> None:
    _, _, truth = sample
    depth, height, _ = truth.shape
    brain = truth > 8
    # The brainstem and cerebellum fill the bottom (ventral) rows, well behind the
    # middle; the dorsal rows are the dome of the cortex, centred. Flipping AP moves
    # the ventral centre to the front, flipping DV swaps the two.
    ventral_ap = np.nonzero(brain[:, int(0.85 * height) :, :])[0].mean() / depth
    dorsal_ap = np.nonzero(brain[:, : int(0.15 * height), :])[0].mean() / depth
    assert ventral_ap > 0.62
    assert dorsal_ap < 0.60
    # The symmetric template mirrors onto itself across axis 2 (left-right).
    mirrored = truth[:, :, ::-1].astype(float)
    assert np.corrcoef(truth.astype(float).ravel(), mirrored.ravel())[0, 1] > 0.9


def test_missing_sample_file_is_a_clear_error() -> None:
    with pytest.raises(DatasetNotFoundError, match="scripts/make_sample.py") as info:
        _sample_file("no_such_file.npy")
    assert isinstance(info.value, FileNotFoundError)
