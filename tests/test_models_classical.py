"""Models that need no download, on a real slice moved by a known amount."""

from __future__ import annotations

import numpy as np
import pytest

from atlinter_ray.engine import build_interpolator, predict
from atlinter_ray.errors import ConfigError
from atlinter_ray.models import available_models, base, build_model
from atlinter_ray.models.base import PairInterpolator, register_model
from atlinter_ray.models.classical import LinearInterpolator
from atlinter_ray.testing.datasets import real_volume


def _shifted_pair(rgb: bool, shift: int = 6):
    """A real coronal slice, and copies shifted right by shift/2 (truth) and shift."""
    base = real_volume(rgb)[45].astype(np.float32)
    base = np.moveaxis(base, -1, 0) if rgb else base[None]
    base = np.pad(base, ((0, 0), (0, 0), (shift, shift)), mode="edge")
    a, mid, b = (np.roll(base, k, axis=2) for k in (0, shift // 2, shift))
    crop = np.s_[..., :, 2 * shift : -2 * shift]
    return a[None], b[None], mid[crop], crop


@pytest.mark.parametrize("name", ["dis", "farneback", "deepflow", "tvl1"])
@pytest.mark.parametrize("rgb", [False, True])
def test_flow_models_follow_motion_better_than_linear(name: str, rgb: bool) -> None:
    a, b, truth, crop = _shifted_pair(rgb)
    model = build_interpolator(name)
    frames = predict(model, a, b, [0.5], peak=255.0).frames
    assert frames.shape == (1, 1, *a.shape[1:])
    err_flow = np.abs(frames[0, 0][crop] - truth).mean()
    err_linear = np.abs(((a + b) / 2)[0][crop] - truth).mean()
    assert err_flow < 0.5 * err_linear


def test_linear_is_exact_at_dyadic_positions() -> None:
    rng = np.random.default_rng(1)
    a, b = (rng.integers(0, 256, (2, 1, 8, 8)).astype(np.float32) for _ in range(2))
    out = LinearInterpolator().interpolate(a, b, np.array([0.25, 0.5, 0.875], np.float32))
    for k, t in enumerate([0.25, 0.5, 0.875]):
        np.testing.assert_array_equal(out[:, k], ((1 - t) * a.astype(np.float64) + t * b).astype(np.float32))


class _MidpointOnly(PairInterpolator):
    """A midpoint-only model (the mean) that counts its calls, to test bisection."""

    arbitrary_t = False
    name = "midpoint-test"

    def __init__(self) -> None:
        self.pairs = 0

    def interpolate(self, a, b, t, peak=1.0):
        assert list(t) == [0.5]
        self.pairs += a.shape[0]
        return ((a + b) / 2)[:, None]


def test_bisection_drives_midpoint_models_with_only_needed_calls() -> None:
    model = _MidpointOnly()
    a = np.zeros((2, 1, 4, 4), np.float32)
    b = np.full((2, 1, 4, 4), 64.0, np.float32)
    out = predict(model, a, b, [0.125, 0.75], peak=255.0)
    np.testing.assert_array_equal(out.frames[:, 0], np.full((2, 1, 4, 4), 8.0))
    np.testing.assert_array_equal(out.frames[:, 1], np.full((2, 1, 4, 4), 48.0))
    assert out.model_calls == model.pairs == 2 * 4  # nodes 1/2, 1/4, 1/8, 3/4 per pair


def test_registry_refuses_a_class_that_is_not_a_model() -> None:
    with pytest.raises(TypeError, match="'not_a_model'.*neither a PairInterpolator"):
        register_model("not_a_model")(dict)
    assert "not_a_model" not in available_models()


def test_registry_lists_choices_and_rejects_bad_settings() -> None:
    assert {"linear", "dis", "farneback", "deepflow", "tvl1"} <= set(available_models())
    with pytest.raises(KeyError, match="choose one of: .*dis.*linear"):
        build_model("raft-huge")
    with pytest.raises(ConfigError, match="model.checkpoint"):
        build_interpolator("dis", checkpoint="/weights.pth")
    with pytest.raises(ValueError, match="preset"):
        build_interpolator("dis", params={"preset": "turbo"})


class _BrokenInside(LinearInterpolator):
    """A model whose constructor has a bug: a TypeError of its own, not the settings'."""

    def __init__(self, levels: int = 2) -> None:
        self.levels = len(levels)  # type: ignore[arg-type]


class _ForwardsKeywords(_BrokenInside):
    """A model that hands its keywords on to its base class, as the torch models do."""

    def __init__(self, **rest: object) -> None:
        super().__init__(**rest)  # type: ignore[arg-type]


def test_a_bug_in_a_model_constructor_is_ours_and_unknown_settings_are_the_users(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(base._REGISTRY, "broken_inside", _BrokenInside)
    monkeypatch.setitem(base._REGISTRY, "forwards", _ForwardsKeywords)
    with pytest.raises(TypeError, match="has no len") as bug:
        build_interpolator("broken_inside")
    assert not isinstance(bug.value, ConfigError)
    with pytest.raises(TypeError, match="has no len") as bug:
        build_interpolator("forwards", params={"levels": 3})
    assert not isinstance(bug.value, ConfigError)
    for name in ("broken_inside", "forwards", "dis"):
        with pytest.raises(ConfigError, match=r"does not accept these settings.*'levles'.*model\.params"):
            build_interpolator(name, params={"levles": 3})
    with pytest.raises(ConfigError, match="'flwo'"):  # a member model's settings
        build_interpolator("fusion", params={"members": ["dis"], "member_params": {"dis": {"flwo": 1}}})
