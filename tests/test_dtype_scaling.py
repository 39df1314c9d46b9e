"""``output.dtype_scaling=full_range``: a dataset's range mapped onto an integer dtype's, on request."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from atlinter_ray.cli import guarded, interpolate
from atlinter_ray.config import Config
from atlinter_ray.dataset import load_dataset
from atlinter_ray.dtypes import SCALING_KEY, output_dtype, output_scale, to_dtype
from atlinter_ray.errors import StoreError
from atlinter_ray.models.torch_runtime import to_dtype_tensor
from atlinter_ray.pipeline import run
from atlinter_ray.store import VolumeStore
from atlinter_ray.testing.datasets import write_dataset

SHAPE = (20, 12, 16)
SECTIONS = [2, 9, 17]


def _ramp(dtype: type = np.float32, top: float = 1.0) -> np.ndarray:
    """Three 12x16 sections whose values run over [0, top]."""
    return np.linspace(0.0, top, 3 * 12 * 16).reshape(3, 12, 16).astype(dtype)


def _config(tmp_path: Path, images: np.ndarray, dtype: str, scaling: str, **meta) -> Config:
    cfg = Config()
    cfg.data.datasets = [str(write_dataset(tmp_path / "in", "gene", images, SECTIONS, **meta))]
    cfg.data.reference_shape = list(SHAPE)
    cfg.model.name = "linear"
    cfg.output.root = str(tmp_path / "out")
    cfg.output.dtype, cfg.output.dtype_scaling = dtype, scaling
    cfg.output.pyramid_min = 8  # a level 1 of 10x6x8
    cfg.run.serial, cfg.run.progress = True, False
    return cfg


def test_float_data_scaled_onto_uint8_uses_the_whole_range_and_records_the_scale(
    tmp_path: Path, capsys
) -> None:
    """Float images in [0, 1] as uint8 with full_range: 0..255, exit 0, scale in the metadata."""
    images = _ramp()
    cfg = _config(tmp_path, images, "uint8", "full_range")
    guarded(interpolate)(OmegaConf.structured(cfg))  # exits only on failure
    assert "complete 1" in capsys.readouterr().out
    store = VolumeStore(cfg.output.root)
    volume = store.read_volume("gene")
    assert volume.dtype == np.uint8 and volume.min() == 0 and volume.max() == 255
    assert len(np.unique(volume)) > 200  # grey levels kept, not posterized to {0, 1}
    record = store.image_attrs("gene")["atlinter_ray"]["run"][SCALING_KEY]
    assert record["scale"] == 255.0 and record["offset"] == 0.0
    # known sections map back to within half a quantisation step
    back = (volume[SECTIONS].astype(np.float64) - record["offset"]) / record["scale"]
    assert np.abs(back - images).max() <= 0.5 / 255 + 1e-7
    # the pyramid is made of the stored (scaled) values
    assert store.read_volume("gene", "1").max() > 200


def test_resuming_with_another_scaling_is_another_run(tmp_path: Path) -> None:
    """12-bit images in uint16: full_range then none must not mix in one volume."""
    images = _ramp(np.uint16, 4095.0)
    cfg = _config(tmp_path, images, "uint16", "full_range", intensity_max=4095.0)
    assert run(cfg).ok
    store = VolumeStore(cfg.output.root)
    scale = 65535.0 / 4095.0
    assert store.image_attrs("gene")["atlinter_ray"]["run"][SCALING_KEY]["scale"] == scale
    volume = store.read_volume("gene")
    np.testing.assert_array_equal(volume[SECTIONS], np.rint(images * np.float32(scale)))
    assert volume.max() == 65535
    cfg.output.dtype_scaling = "none"  # values as they are: another run's bytes
    with pytest.raises(StoreError, match="was written by a different run"):
        run(cfg)
    # and the other way round
    cfg.output.root = str(tmp_path / "plain")
    assert run(cfg).ok
    assert SCALING_KEY not in VolumeStore(cfg.output.root).image_attrs("gene")["atlinter_ray"]["run"]
    cfg.output.dtype_scaling = "full_range"
    with pytest.raises(StoreError, match="was written by a different run"):
        run(cfg)


def test_scaling_applies_only_to_integer_outputs(tmp_path: Path) -> None:
    """A float output keeps the values; an integer output gets max / peak; checks skipped."""
    ds = load_dataset(str(write_dataset(tmp_path, "g", _ramp(), SECTIONS)), SHAPE)
    assert output_scale(ds, "float32", "full_range") == 1.0
    assert output_scale(ds, "uint8", "none") == 1.0
    assert output_scale(ds, "uint16", "full_range") == 65535.0
    assert output_dtype(ds, "uint8", "full_range") == "uint8"
    wide = load_dataset(str(write_dataset(tmp_path, "w", _ramp(np.uint16, 65535.0), SECTIONS)),
                        SHAPE)
    assert output_dtype(wide, "uint8", "full_range") == "uint8"  # 0..65535 onto 0..255
    assert output_scale(wide, "uint8", "full_range") == 255.0 / 65535.0
    np.testing.assert_array_equal(to_dtype(np.array([0, 257, 65535], np.uint16), "uint8",
                                           255.0 / 65535.0), [0, 1, 255])


@pytest.mark.parametrize("source", ["float32", "float64", "uint8", "uint16"])
@pytest.mark.parametrize("dtype", ["uint8", "uint16", "int16"])
def test_scaled_casts_on_host_and_device_write_the_same_bytes(source: str, dtype: str) -> None:
    """The worker converts on the host or the device: the same scaled bytes either way."""
    rng = np.random.default_rng(0)
    top = 1.0 if source.startswith("float") else float(np.iinfo(source).max)
    x = (rng.random((4, 3, 33, 17)) * top * 1.1).astype(source)  # some values clip
    # unscaled, only model frames (floats) are cast on the device
    for scale in (255.0, 65535.0 / 4095.0, 1.0 / 3.0) + ((1.0,) if top == 1.0 else ()):
        np.testing.assert_array_equal(
            to_dtype_tensor(torch.from_numpy(x), dtype, scale).numpy(), to_dtype(x, dtype, scale))


def test_scores_of_a_scaled_run_compare_with_the_truth_in_its_units(tmp_path: Path) -> None:
    """Scoring maps stored values back: a scaled uint8 run scores as the float run, to a step."""
    rng = np.random.default_rng(1)
    truth = np.clip(np.linspace(0.1, 0.9, SHAPE[0])[:, None, None]
                    + rng.normal(0, 0.05, SHAPE), 0, 1).astype(np.float32)
    np.savez(tmp_path / "truth.npz", volume=truth)
    scores = {}
    for dtype, scaling in (("float32", "none"), ("uint8", "full_range")):
        cfg = _config(tmp_path / dtype, truth[SECTIONS], dtype, scaling)
        cfg.data.truth = {"gene": str(tmp_path / "truth.npz")}
        summary = run(cfg)
        assert summary.ok
        scores[dtype] = summary.scores["gene"]
    for who in ("model", "linear"):
        plain, scaled = scores["float32"][who], scores["uint8"][who]
        assert plain["mae"] > 0.01
        assert abs(plain["mae"] - scaled["mae"]) <= 0.5 / 255, (who, plain, scaled)
    assert (tmp_path / "uint8" / "out" / "gene.montage.png").exists()
