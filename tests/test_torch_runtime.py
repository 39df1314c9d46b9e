"""The shared torch adapter: values, channels, padding, batching, tiling, precision."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from atlinter_ray.errors import CheckpointError, ConfigError
from atlinter_ray.models.torch_runtime import (
    TorchFlowEstimator,
    TorchPairInterpolator,
    TorchRuntime,
    combine_sha256,
    load_weights,
    select_device,
)

torch.set_num_threads(1)


class _Blur(TorchPairInterpolator):
    """Blend at t, then a learned 5x5 depthwise blur (border effects within 2 px)."""

    multiple = 16

    def forward(self, a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Blurred blend; records the padded shapes it saw."""
        self.seen.append(tuple(a.shape))
        tt = t[:, None, None, None]
        return self.module((1 - tt) * a + tt * b)


class _Midpoint(_Blur):
    """The same network declared midpoint-only."""

    arbitrary_t = False


class _Shift(TorchFlowEstimator):
    """A flow that is the image's first channel in x and its mean in y."""

    multiple = 8
    input_range = 255.0

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Two channels derived from ``a`` and ``b``."""
        return torch.cat([a[:, :1], (a - b).mean(1, keepdim=True)], 1)


def _blur_net() -> torch.nn.Conv2d:
    """A fixed random depthwise 5x5 conv over 3 channels."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 3, 5, padding=2, groups=3, bias=True)
    return conv


def _make(cls: type = _Blur, **kw) -> _Blur:
    """Build a test model with a fresh record of the shapes it saw."""
    model = cls(_blur_net(), "abc", device="cpu", **kw)
    model.seen = []
    return model


def _reference(a: np.ndarray, b: np.ndarray, t: np.ndarray, peak: float) -> np.ndarray:
    """The expected frames, computed directly in torch without the runtime."""
    net = _blur_net().eval()
    outs = []
    for i in range(a.shape[0]):
        for tk in t:
            x0 = torch.from_numpy(np.repeat(a[i : i + 1], 3, 1) / peak)
            x1 = torch.from_numpy(np.repeat(b[i : i + 1], 3, 1) / peak)
            h, w = x0.shape[-2:]
            pad = (0, (-w) % 16, 0, (-h) % 16)
            with torch.no_grad():
                y = net(F.pad((1 - tk) * x0 + tk * x1, pad))[..., :h, :w]
            outs.append(y.mean(1, keepdim=True).numpy() * peak)
    return np.concatenate(outs).reshape(a.shape[0], len(t), 1, *a.shape[2:])


@pytest.fixture
def pair() -> tuple[np.ndarray, np.ndarray]:
    """Two grayscale batches of 3 uint8-valued images, 37 x 53 (not multiples)."""
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (3, 1, 37, 53)).astype(np.float32)
    b = rng.integers(0, 256, (3, 1, 37, 53)).astype(np.float32)
    return a, b


def test_values_channels_padding(pair) -> None:
    a, b = pair
    model = _make(batch_size=2)
    t = np.array([0.25, 0.5], dtype=np.float32)
    out = model.interpolate(a, b, t, peak=255.0)
    assert out.shape == (3, 2, 1, 37, 53) and out.dtype == np.float32
    np.testing.assert_allclose(out, _reference(a, b, t, 255.0), atol=2e-4)
    # 6 items in batches of 2, each padded to 48 x 64 and repeated to 3 channels.
    assert model.seen == [(2, 3, 48, 64)] * 3


def test_batch_size_does_not_change_results(pair) -> None:
    a, b = pair
    t = np.array([0.3], dtype=np.float32)
    one = _make(batch_size=1).interpolate(a, b, t, peak=255.0)
    many = _make(batch_size=8).interpolate(a, b, t, peak=255.0)
    np.testing.assert_allclose(one, many, atol=1e-4)


def test_rgb_passes_through_without_averaging() -> None:
    rng = np.random.default_rng(1)
    a = rng.random((1, 3, 20, 20), dtype=np.float32)
    out = _make().interpolate(a, a, np.array([0.5]), peak=1.0)
    assert out.shape == (1, 1, 3, 20, 20)
    assert not np.allclose(out[0, 0, 0], out[0, 0, 1])


def test_tiles_reproduce_the_whole_image_away_from_tile_borders(pair) -> None:
    a, b = pair
    t = np.array([0.5], dtype=np.float32)
    whole = _make().interpolate(a, b, t, peak=255.0)
    model = _make(tile=16, tile_overlap=12, batch_size=3)
    tiled = model.interpolate(a, b, t, peak=255.0)
    # A 5x5 conv: the outer quarter of each overlap (3 px) hides its border effects.
    np.testing.assert_allclose(tiled, whole, atol=2e-4)
    assert {s[-2:] for s in model.seen} == {(16, 16)}
    assert len(model.seen) > 4


def test_midpoint_only_refuses_other_positions(pair) -> None:
    a, b = pair
    model = _make(_Midpoint)
    assert model.interpolate(a, b, np.array([0.5]), peak=255.0).shape[1] == 1
    with pytest.raises(ValueError, match="midpoint only"):
        model.interpolate(a, b, np.array([0.25]), peak=255.0)


def test_flow_estimator_scales_to_input_range_and_crops() -> None:
    a = np.full((2, 1, 10, 13), 0.5, np.float32)
    b = np.zeros_like(a)
    model = _Shift(torch.nn.Identity(), None, device="cpu")
    flow = model.flow(a, b, peak=1.0)
    assert flow.shape == (2, 2, 10, 13)
    np.testing.assert_allclose(flow, 127.5)


def test_shape_and_channel_errors(pair) -> None:
    a, b = pair
    model = _make()
    with pytest.raises(ValueError, match="same shape"):
        model.interpolate(a, b[:2], np.array([0.5]))
    with pytest.raises(ValueError, match="channel"):
        model.interpolate(a.repeat(2, 1), b.repeat(2, 1), np.array([0.5]))


def test_bf16_autocast_runs_close_to_fp32(pair) -> None:
    a, b = pair
    t = np.array([0.5], dtype=np.float32)
    ref = _make().interpolate(a, b, t, peak=255.0)
    out = _make(precision="bf16").interpolate(a, b, t, peak=255.0)
    assert out.dtype == np.float32
    assert np.abs(out - ref).max() < 3.0  # bf16 has 8 bits of mantissa: ~1% of 255


def test_configuration_errors() -> None:
    with pytest.raises(ConfigError, match="fp16 needs a CUDA"):
        TorchRuntime(device="cpu", precision="fp16")
    with pytest.raises(ConfigError, match="choose one of"):
        TorchRuntime(device="cpu", precision="fp64")
    with pytest.raises(ConfigError, match="batch_size"):
        TorchRuntime(device="cpu", batch_size=0)
    with pytest.raises(ConfigError, match="tile"):
        TorchRuntime(device="cpu", tile=32, tile_overlap=32)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            select_device("cuda")
        assert select_device("auto") == torch.device("cpu")
    with pytest.raises(ConfigError, match="not a device name"):
        select_device("gpu0")


def test_module_is_frozen_in_eval_mode() -> None:
    model = _make()
    assert not model.module.training
    assert not any(p.requires_grad for p in model.module.parameters())
    prov = model.provenance()
    expected = {"model": "_Blur", "checkpoint_sha256": "abc", "device": "cpu", "precision": "fp32"}
    assert prov == expected


def test_load_weights_is_strict_and_hashes(tmp_path) -> None:
    net = _blur_net()
    path = tmp_path / "w.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, path)
    fresh = torch.nn.Conv2d(3, 3, 5, padding=2, groups=3)
    digest = load_weights(fresh, str(path))
    import hashlib

    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert torch.equal(fresh.weight, net.weight)
    with pytest.raises(CheckpointError, match="unexpected keys: extra"):
        load_weights(fresh, str(path), remap=lambda s: {**s, "extra": torch.zeros(1)})
    assert combine_sha256({"b": "2", "a": "1"}) == combine_sha256({"a": "1", "b": "2"})
