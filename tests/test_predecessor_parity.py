"""``model=linear placement=atlinter`` reproduces atlinter 0.2.3 value for value."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from atlinter_ray.config import Config
from atlinter_ray.pipeline import run
from atlinter_ray.store import VolumeStore
from atlinter_ray.testing.datasets import real_volume, sections_of, write_dataset
from atlinter_ray.testing.predecessor import import_predecessor

# Irregular spacing: gaps of 2, 3, 5, 8, 17, 17, 5, 10 (no gap of 1: atlinter crashes there)
SECTIONS = [3, 5, 8, 13, 21, 38, 55, 60, 70]


def _ours(tmp_path: Path, volume: np.ndarray, axis: str, dtype: str | None, serial: bool) -> np.ndarray:
    images = sections_of(volume, SECTIONS, axis)
    write_dataset(tmp_path / "in", "gene", images, SECTIONS, axis=axis,
                  reference_shape=list(volume.shape[:3]))
    cfg = Config()
    cfg.data.root, cfg.data.genes = str(tmp_path / "in"), ["gene"]
    cfg.model.name, cfg.model.params = "linear", {}
    cfg.interpolation.placement, cfg.interpolation.edge = "atlinter", "copy"
    cfg.output.root, cfg.output.dtype = str(tmp_path / f"out-{dtype}"), dtype
    cfg.run.serial, cfg.run.progress = serial, False
    cfg.resources.local_cpus = 2
    assert run(cfg).ok
    out = VolumeStore(cfg.output.root).read_volume("gene")
    return np.moveaxis(out, 0, -1) if volume.ndim == 4 else out


def _theirs(volume: np.ndarray, axis: str) -> np.ndarray:
    import_predecessor()
    from atlinter.data import GeneDataset
    from atlinter.pair_interpolation import GeneInterpolate, LinearPairInterpolationModel

    gene = GeneDataset(sections_of(volume, SECTIONS, axis), SECTIONS, axis, volume.shape)
    return GeneInterpolate(gene, LinearPairInterpolationModel()).predict_volume()


@pytest.mark.ray
@pytest.mark.parametrize(
    "axis,rgb", [("coronal", False), ("sagittal", False), ("coronal", True), ("sagittal", True)]
)
def test_linear_atlinter_matches_predecessor(ray_cluster, tmp_path: Path, axis: str, rgb: bool) -> None:
    volume = real_volume(rgb)
    theirs = _theirs(volume, axis)
    ours = _ours(tmp_path, volume, axis, None, serial=False)  # uint8, like the input
    assert ours.dtype == np.uint8 and ours.shape == theirs.shape
    np.testing.assert_array_equal(ours, np.rint(theirs))
    # float output carries the predecessor's values exactly (dyadic blends are exact)
    ours32 = _ours(tmp_path, volume, axis, "float32", serial=True)
    np.testing.assert_array_equal(ours32, theirs.astype(np.float32))
