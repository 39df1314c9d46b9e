"""CAIN conformance: our network on the original checkpoint layout vs the predecessor.

The checkpoint is built independently of our code: the predecessor's own vendored
``CAIN`` with random weights, wrapped in ``DataParallel`` and saved as
``{"state_dict": ...}`` in torch's legacy (non-zip) format, like the released
``pretrained_cain.pth``. Tolerance 1e-5 (float32 vs float64 differ by <= 1.5e-6).
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from atlinter_ray.errors import CheckpointError, ConfigError
from atlinter_ray.models.base import build_model
from atlinter_ray.models.cain import CAIN
from atlinter_ray.testing.predecessor import predecessor_cain

ATOL = 1e-5


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``{"state_dict": DataParallel keys}`` in the legacy format of the original file."""
    return tmp_path_factory.mktemp("cain") / "pretrained_cain.pth"


@pytest.fixture(scope="module")
def oracle(checkpoint: Path) -> torch.nn.DataParallel:
    """The predecessor's CAIN with random weights (training mode, as atlinter ran it)."""
    torch.set_num_threads(1)
    return predecessor_cain(checkpoint)


@pytest.fixture(scope="module")
def model(oracle: torch.nn.DataParallel, checkpoint: Path) -> CAIN:
    """Our CAIN loaded from that file through the registry."""
    return build_model("cain", checkpoint=str(checkpoint), device="cpu")


def _predecessor_frame(oracle: torch.nn.DataParallel, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The predecessor network's output on NCHW float32 arrays (it edits inputs: copies)."""
    with torch.no_grad():
        out, _ = oracle(torch.from_numpy(a.copy()), torch.from_numpy(b.copy()))
    return out.numpy()


def test_checkpoint_is_in_the_original_layout(checkpoint: Path, model: CAIN) -> None:
    obj = torch.load(checkpoint, weights_only=True)
    assert not zipfile.is_zipfile(checkpoint)  # legacy serialization, as released
    assert list(obj) == ["state_dict"] and len(obj["state_dict"]) == 494
    assert all(k.startswith("module.encoder.interpolate.") for k in obj["state_dict"])
    assert model.name == "cain" and model.arbitrary_t is False
    assert model.provenance()["checkpoint_sha256"] == hashlib.sha256(
        checkpoint.read_bytes()
    ).hexdigest()


def test_grayscale_matches_predecessor_wrapper(oracle, model: CAIN) -> None:
    from atlinter.pair_interpolation import CAINPairInterpolationModel

    rng = np.random.default_rng(1)
    a, b = rng.random((2, 64, 96), dtype=np.float32)
    expected = CAINPairInterpolationModel(oracle).interpolate(a.copy(), b.copy())
    ours = model.interpolate(a[None, None], b[None, None], np.array([0.5]))
    assert ours.shape == (1, 1, 1, 64, 96) and ours.dtype == np.float32
    assert np.abs(expected - (a + b) / 2).max() > 0.05  # the network does something
    np.testing.assert_allclose(ours[0, 0, 0], expected, atol=ATOL, rtol=0)


def test_uint8_grayscale_with_peak_255(oracle, model: CAIN) -> None:
    """atlinter's ToTensor divides uint8 by 255; we divide by ``peak``, then scale back."""
    from atlinter.pair_interpolation import CAINPairInterpolationModel

    rng = np.random.default_rng(2)
    a, b = rng.integers(0, 256, (2, 64, 96), dtype=np.uint8)
    expected = CAINPairInterpolationModel(oracle).interpolate(a, b)
    ours = model.interpolate(
        a[None, None].astype(np.float32), b[None, None].astype(np.float32), [0.5], peak=255.0
    )
    np.testing.assert_allclose(ours[0, 0, 0] / 255.0, expected, atol=ATOL, rtol=0)


def test_rgb_batch_matches_predecessor_network(oracle, model: CAIN) -> None:
    """RGB in proper (N, 3, H, W) layout: the predecessor's wrapper built (1, W, 3, H)."""
    rng = np.random.default_rng(3)
    a, b = rng.random((2, 2, 3, 64, 96), dtype=np.float32)
    expected = _predecessor_frame(oracle, a, b)
    ours = model.interpolate(a, b, np.array([0.5]))
    assert ours.shape == (2, 1, 3, 64, 96)
    np.testing.assert_allclose(ours[:, 0], expected, atol=ATOL, rtol=0)


def test_pad_to_128_matches_cain_eval_mode(oracle, checkpoint: Path) -> None:
    rng = np.random.default_rng(4)
    a, b = rng.random((2, 1, 3, 60, 90), dtype=np.float32)
    oracle.eval()
    try:
        expected = _predecessor_frame(oracle, a, b)
    finally:
        oracle.train()
    model = build_model("cain", checkpoint=str(checkpoint), device="cpu", pad_to=128)
    ours = model.interpolate(a, b, np.array([0.5]))
    np.testing.assert_allclose(ours[:, 0], expected, atol=ATOL, rtol=0)


def test_sizes_not_divisible_by_8_are_reflection_padded(oracle, model: CAIN) -> None:
    """Where the predecessor failed, we pad (after the mean, centred) and crop."""
    rng = np.random.default_rng(5)
    a, b = rng.random((2, 1, 3, 61, 90), dtype=np.float32)
    with pytest.raises(RuntimeError):  # the predecessor's training-mode path
        _predecessor_frame(oracle, a, b)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    ma, mb = ta.mean((2, 3), keepdim=True), tb.mean((2, 3), keepdim=True)
    pad = (3, 3, 1, 2)  # 61x90 -> 64x96
    with torch.no_grad():
        feats = oracle.module.encoder(
            F.pad(ta - ma, pad, mode="reflect"), F.pad(tb - mb, pad, mode="reflect")
        )
        expected = oracle.module.decoder(feats)[..., 1:62, 3:93] + (ma + mb) / 2
    ours = model.interpolate(a, b, np.array([0.5]))
    np.testing.assert_allclose(ours[:, 0], expected.numpy(), atol=ATOL, rtol=0)


def test_midpoint_only(model: CAIN) -> None:
    x = np.zeros((1, 1, 64, 96), np.float32)
    with pytest.raises(ValueError, match="midpoint"):
        model.interpolate(x, x, np.array([0.25]))


def test_wrong_file_names_missing_and_unexpected_keys(oracle, tmp_path: Path) -> None:
    state = dict(oracle.state_dict())
    del state["module.encoder.interpolate.tailConv.bias"]
    state["module.encoder.interpolate.extra.weight"] = torch.zeros(3)
    path = tmp_path / "wrong.pth"
    torch.save({"state_dict": state}, path)
    with pytest.raises(CheckpointError) as err:
        build_model("cain", checkpoint=str(path), device="cpu")
    message = str(err.value)
    assert "missing keys: encoder.interpolate.tailConv.bias" in message
    assert "unexpected keys: encoder.interpolate.extra.weight" in message


class _RunsCode:
    """Pickles into a call of ``os.system``: what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_runs_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"x": _RunsCode(marker)}}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="refused"):
        build_model("cain", checkpoint=str(path), device="cpu")
    assert not marker.exists()


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        build_model("cain", checkpoint=str(tmp_path / "absent.pth"), device="cpu")


def test_checkpoint_is_required() -> None:
    with pytest.raises(ConfigError, match="model.checkpoint"):
        build_model("cain", device="cpu")
