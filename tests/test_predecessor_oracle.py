"""The predecessor loader: atlinter 0.2.3 imports and its linear path runs."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from atlinter_ray.testing.predecessor import STUBBED, ToTensor, import_predecessor, predecessor_src


@pytest.fixture(scope="module")
def atlinter():
    """The predecessor's package, loaded once for this module."""
    return import_predecessor()


def test_loads_the_sdist_and_is_idempotent(atlinter) -> None:
    assert atlinter.__version__ == "0.2.3"
    assert Path(atlinter.__file__).resolve().is_relative_to(predecessor_src().resolve())
    assert import_predecessor() is atlinter
    assert "torchvision" in STUBBED and sys.modules["torchvision"].__version__.endswith(
        "stub"
    )


def test_totensor_stub_matches_torchvision_semantics() -> None:
    to_tensor = ToTensor()
    rgb = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 10
    out = to_tensor(rgb)
    assert out.shape == (3, 2, 3) and out.dtype == torch.get_default_dtype()
    np.testing.assert_allclose(out.numpy(), rgb.transpose(2, 0, 1) / 255, rtol=1e-6)
    gray = np.full((4, 5), 7.5, dtype=np.float32)  # float: not divided
    out = to_tensor(gray)
    assert out.shape == (1, 4, 5) and float(out.max()) == 7.5
    # CHW input is taken as HWC, as torchvision does: atlinter's CAIN RGB quirk.
    assert to_tensor(np.zeros((3, 4, 5), np.uint8)).shape == (5, 3, 4)
    with pytest.raises(ValueError, match="2/3 dimensional"):
        to_tensor(np.zeros((1, 2, 3, 4), np.uint8))


def test_linear_grayscale_coronal_volume(atlinter) -> None:
    from atlinter.data import GeneDataset
    from atlinter.pair_interpolation import GeneInterpolate, LinearPairInterpolationModel

    rng = np.random.default_rng(0)
    sections = rng.integers(0, 256, size=(3, 5, 6)).astype(np.uint8)
    dataset = GeneDataset(sections, [1, 5, 7], "coronal", (10, 5, 6))
    volume = GeneInterpolate(dataset, LinearPairInterpolationModel()).predict_volume()
    a, b, c = (s.astype(np.float64) for s in sections)
    assert volume.shape == (10, 5, 6)
    np.testing.assert_array_equal(volume[0], a)  # edge: nearest known
    np.testing.assert_array_equal(volume[1], a)
    np.testing.assert_allclose(volume[2], 0.75 * a + 0.25 * b)  # gap 4: exact quarters
    np.testing.assert_allclose(volume[3], 0.5 * a + 0.5 * b)
    np.testing.assert_allclose(volume[4], 0.25 * a + 0.75 * b)
    np.testing.assert_array_equal(volume[5], b)
    np.testing.assert_allclose(volume[6], 0.5 * b + 0.5 * c)
    np.testing.assert_array_equal(volume[9], c)


def test_linear_rgb_sagittal_volume(atlinter) -> None:
    from atlinter.data import GeneDataset
    from atlinter.pair_interpolation import GeneInterpolate, LinearPairInterpolationModel

    rng = np.random.default_rng(1)
    sections = rng.integers(0, 256, size=(2, 5, 4, 3)).astype(np.uint8)
    dataset = GeneDataset(sections, [2, 4], "sagittal", (5, 4, 6, 3))
    volume = GeneInterpolate(dataset, LinearPairInterpolationModel()).predict_volume()
    assert volume.shape == (5, 4, 6, 3)
    np.testing.assert_array_equal(volume[:, :, 2], sections[0])
    np.testing.assert_allclose(volume[:, :, 3], sections.astype(np.float64).mean(axis=0))
    np.testing.assert_array_equal(volume[:, :, 5], sections[1])


def test_vendored_torch_models_import(atlinter) -> None:
    rife = importlib.import_module("atlinter.vendor.rife.RIFE_HD")
    cain = importlib.import_module("atlinter.vendor.cain.cain")
    raft = importlib.import_module("atlinter.vendor.RAFT.raft")
    assert issubclass(cain.CAIN, torch.nn.Module)
    assert issubclass(raft.RAFT, torch.nn.Module)
    assert callable(rife.Model)
    optical_flow = importlib.import_module("atlinter.optical_flow")
    assert hasattr(optical_flow, "RAFTNet")


def test_mxnet_stub_only_when_mxnet_is_absent(atlinter) -> None:
    optical_flow = importlib.import_module("atlinter.optical_flow")
    if "mxnet" in STUBBED:
        with pytest.raises(RuntimeError, match="stub installed by atlinter_ray.testing.predecessor"):
            optical_flow.MaskFlowNet("maskflownet.params")
    else:
        assert importlib.util.find_spec("mxnet") is not None
        assert "atlinter.vendor.MaskFlowNet.network" not in STUBBED


def test_predecessor_linear_on_the_bundled_sample(atlinter) -> None:
    """On gaps of 4 (= 2^2) atlinter's bisection lands on the true positions exactly."""
    import json

    from atlinter.data import GeneDataset
    from atlinter.pair_interpolation import GeneInterpolate, LinearPairInterpolationModel

    from atlinter_ray.metrics import psnr
    from atlinter_ray.sample import sample_dataset_path, sample_metadata_path, sample_truth

    sections = np.load(sample_dataset_path())
    meta = json.loads(Path(sample_metadata_path()).read_text())
    truth = sample_truth()
    numbers = meta["section_numbers"]
    dataset = GeneDataset(sections, numbers, "coronal", tuple(meta["reference_shape"]))
    volume = GeneInterpolate(dataset, LinearPairInterpolationModel()).predict_volume()
    held_out = []
    for left, right in zip(numbers[:-1], numbers[1:]):
        a, b = truth[left].astype(np.float64), truth[right].astype(np.float64)
        for s in range(left + 1, right):
            t = (s - left) / (right - left)
            np.testing.assert_allclose(volume[s], (1 - t) * a + t * b, atol=1e-9)
            held_out.append(psnr(volume[s], truth[s]))
    np.testing.assert_array_equal(volume[0], truth[numbers[0]])  # edge: nearest copy
    assert 20.0 < float(np.mean(held_out)) < 30.0  # 23.97 dB when measured
