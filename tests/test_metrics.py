"""Image-quality metrics: perfect scores, analytic values, conventions and errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
from skimage.metrics import structural_similarity

from atlinter_ray.errors import ConfigError, DatasetError
from atlinter_ray.metrics import (
    SliceScores,
    mae,
    psnr,
    resolve_data_range,
    score_slice,
    score_stack,
    ssim,
)


def _image(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """A smooth-ish uint8 test image (a gradient plus noise) of the given shape."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(20, 200, shape[1])[None, :]
    base = np.broadcast_to(ramp, shape[:2])
    if len(shape) == 3:
        base = np.repeat(base[..., None], shape[2], axis=2)
    return np.clip(base + rng.normal(0, 10, shape), 0, 255).astype(np.uint8)


def test_identical_images_score_perfectly() -> None:
    gray = _image((32, 40))
    rgb = _image((32, 40, 3), seed=1)
    for img in (gray, rgb):
        assert psnr(img, img) == math.inf
        assert ssim(img, img) == pytest.approx(1.0)
        assert mae(img, img) == 0.0
    assert score_slice(gray, gray) == SliceScores(math.inf, pytest.approx(1.0), 0.0)


def test_psnr_matches_the_analytic_value_for_known_error() -> None:
    truth = np.full((16, 16), 100, dtype=np.uint8)
    signs = np.where((np.indices((16, 16)).sum(axis=0) % 2) == 0, 1, -1)
    pred = (truth.astype(int) + 10 * signs).astype(np.uint8)  # MSE exactly 100
    assert psnr(pred, truth) == pytest.approx(10 * math.log10(255**2 / 100))
    assert mae(pred, truth) == 10.0
    # uint8 arithmetic must not wrap: 90 - 100 counts as -10, not 246.
    assert mae(np.uint8(90) * np.ones((2, 2), np.uint8), 100 * np.ones((2, 2), np.uint8)) == 10.0


def test_psnr_of_gaussian_noise_on_unit_range() -> None:
    rng = np.random.default_rng(3)
    truth = rng.uniform(0.2, 0.8, size=(256, 256))
    sigma = 0.05
    pred = truth + rng.normal(0, sigma, truth.shape)
    expected = 20 * math.log10(1.0 / sigma)  # 26.02 dB
    assert psnr(pred, truth, data_range=1.0) == pytest.approx(expected, abs=0.05)
    assert mae(pred, truth) == pytest.approx(sigma * math.sqrt(2 / math.pi), rel=0.02)


def test_data_range_conventions() -> None:
    assert resolve_data_range(np.zeros(3, np.uint8)) == 255.0
    assert resolve_data_range(np.zeros(3, np.uint16)) == 65535.0
    assert resolve_data_range(np.zeros(3, np.int8)) == 255.0
    assert resolve_data_range(np.zeros(3, bool)) == 1.0
    assert resolve_data_range(np.zeros(3, np.float32), 2.0) == 2.0
    with pytest.raises(ConfigError, match="pass data_range explicitly"):
        resolve_data_range(np.zeros(3, np.float32))
    with pytest.raises(ConfigError, match="finite positive"):
        resolve_data_range(np.zeros(3, np.uint8), 0)
    # The range comes from truth's dtype: a float prediction against uint8 truth works.
    truth = _image((20, 20))
    shifted = truth.astype(np.float64) + 5.0
    assert psnr(shifted, truth) == pytest.approx(10 * math.log10(255**2 / 25), rel=0.05)


def test_ssim_is_skimage_with_wang_settings_and_uses_data_range() -> None:
    truth = _image((48, 48, 3), seed=4)
    noise = np.random.default_rng(5).integers(-30, 30, truth.shape)
    pred = np.clip(truth.astype(int) + noise, 0, 255)
    expected = structural_similarity(
        truth.astype(float),
        pred.astype(float),
        data_range=255,
        channel_axis=-1,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
    )
    value = ssim(pred.astype(np.uint8), truth)
    assert value == pytest.approx(expected)
    assert 0.0 < value < 0.99
    # Same values scaled to [0, 1] with data_range=1 give the same SSIM.
    assert ssim(pred / 255.0, truth / 255.0, data_range=1.0) == pytest.approx(value)
    # RGB with channels first, said explicitly.
    chw = ssim(np.moveaxis(pred, -1, 0), np.moveaxis(truth, -1, 0), 255, channel_axis=0)
    assert chw == pytest.approx(value)


def test_ssim_decreases_with_noise() -> None:
    truth = _image((40, 40), seed=6)
    rng = np.random.default_rng(7)
    scores = [
        ssim(np.clip(truth + rng.normal(0, s, truth.shape), 0, 255), truth)
        for s in (2, 10, 40)
    ]
    assert scores[0] > scores[1] > scores[2]


def test_errors_name_the_problem() -> None:
    with pytest.raises(DatasetError, match="differs from truth shape"):
        psnr(np.zeros((4, 4), np.uint8), np.zeros((4, 5), np.uint8))
    with pytest.raises(DatasetError, match="too small for SSIM"):
        ssim(np.zeros((8, 30), np.uint8), np.zeros((8, 30), np.uint8))
    with pytest.raises(ConfigError, match="leave channel_axis as None"):
        ssim(np.zeros((16, 16), np.uint8), np.zeros((16, 16), np.uint8), channel_axis=0)
    with pytest.raises(DatasetError, match="empty"):
        mae(np.zeros((0, 3)), np.zeros((0, 3)))


def test_score_stack_scores_each_slice() -> None:
    truth = np.stack([_image((24, 24), seed=s) for s in range(3)])
    pred = truth.copy()
    pred[1] = np.clip(pred[1].astype(int) + 4, 0, 255)
    scores = score_stack(pred, truth)
    assert len(scores) == 3
    assert scores[0].psnr == math.inf and scores[2].mae == 0.0
    assert scores[1].psnr == pytest.approx(psnr(pred[1], truth[1]))
    assert 0 < scores[1].mae <= 4
    with pytest.raises(DatasetError, match="score_stack"):
        score_stack(pred[0], truth[0])
