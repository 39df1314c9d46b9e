"""RAFT conformance: our large and small RAFT on the original checkpoint layout vs the predecessor.

Checkpoints are built independently of our code: the predecessor's own vendored
``RAFT`` with random weights (BatchNorm statistics randomised too, so eval-mode BN
matters), wrapped in ``DataParallel`` and saved with ``torch.save`` (zip format), like
the released ``raft-things.pth`` / ``raft-small.pth``. The predecessor runs through its
own ``RAFTNet.preprocess_images`` / ``predict_flow`` (pad to 8, 20 iterations).
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from atlinter_ray.errors import CheckpointError, ConfigError
from atlinter_ray.models.base import build_model
from atlinter_ray.models.raft import CorrPyramid, pixel_grid
from atlinter_ray.testing.predecessor import predecessor_raft

ATOL = 2e-4  # pixels; flows here span about +-20 (large) and +-40 (small) pixels
NAMES = {False: "raft", True: "raft_small"}


@pytest.fixture(scope="module", params=[False, True], ids=["large", "small"])
def case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """(small, predecessor RAFTNet, checkpoint path, our model) for each size."""
    torch.set_num_threads(1)
    small = request.param
    net = predecessor_raft(small)
    path = tmp_path_factory.mktemp("raft") / ("raft-small.pth" if small else "raft-things.pth")
    torch.save(net.state_dict(), path)
    from atlinter.optical_flow import RAFTNet as PredecessorRAFTNet

    # Its __init__ hard-codes the large model: set the fields predict_flow uses.
    oracle = PredecessorRAFTNet.__new__(PredecessorRAFTNet)
    oracle.device, oracle.model = "cpu", net.module.eval()
    model = build_model(NAMES[small], checkpoint=str(path), device="cpu", batch_size=2)
    return small, oracle, path, model


def _oracle_flow(oracle, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The predecessor's flow for one pair of HW or HWC images."""
    with torch.no_grad():
        return oracle.predict_flow(*oracle.preprocess_images(a, b))


def _pair(seed: int, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """A uint8 image and a shifted copy with a bit of noise."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, shape, dtype=np.uint8)
    b = np.roll(a, (3, -2), (0, 1)).astype(np.int16) + rng.integers(-8, 9, shape)
    return a, np.clip(b, 0, 255).astype(np.uint8)


def test_checkpoint_layout(case) -> None:
    small, _, path, model = case
    state = torch.load(path, weights_only=True)
    assert zipfile.is_zipfile(path) and all(k.startswith("module.") for k in state)
    assert len(state) == (106 if small else 179)
    assert model.name == NAMES[small] and model.provenance()["iters"] == 20


def test_rgb_matches_predecessor(case) -> None:
    """Sizes not divisible by 8: both pad at the bottom/right and crop the flow."""
    _, oracle, _, model = case
    a, b = _pair(1, (124, 156, 3))
    expected = _oracle_flow(oracle, a, b)
    ours = model.flow(
        a.transpose(2, 0, 1)[None].astype(np.float32),
        b.transpose(2, 0, 1)[None].astype(np.float32),
        peak=255.0,
    )
    assert ours.shape == (1, 2, 124, 156) and ours.dtype == np.float32
    assert np.abs(expected).max() > 5  # the random network predicts real displacements
    np.testing.assert_allclose(ours[0], expected, atol=ATOL, rtol=0)


@pytest.mark.slow
def test_grayscale_batch_matches_predecessor(case) -> None:
    _, oracle, _, model = case
    pairs = [_pair(seed, (128, 160)) for seed in (2, 3)]
    expected = np.stack([_oracle_flow(oracle, a, b) for a, b in pairs])
    a = np.stack([p[0] for p in pairs])[:, None].astype(np.float32) / 255
    b = np.stack([p[1] for p in pairs])[:, None].astype(np.float32) / 255
    ours = model.flow(a, b, peak=1.0)  # [0, 1] data: scaled to 0..255 by peak
    np.testing.assert_allclose(ours, expected, atol=ATOL, rtol=0)


def test_iterations_are_configurable(case) -> None:
    small, oracle, path, _ = case
    a, b = _pair(4, (128, 128, 3))
    ta, tb = (torch.from_numpy(x.transpose(2, 0, 1)[None].astype(np.float32)) for x in (a, b))
    with torch.no_grad():
        _, expected = oracle.model(ta, tb, iters=3, test_mode=True)
    model = build_model(NAMES[small], checkpoint=str(path), device="cpu", iters=3)
    ours = model.flow(ta.numpy(), tb.numpy(), peak=255.0)
    np.testing.assert_allclose(ours, expected.numpy(), atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="iters"):
        build_model(NAMES[small], checkpoint=str(path), device="cpu", iters=0)


@pytest.mark.parametrize("shape", [(64, 96), (40, 56), (8, 12)])
def test_small_images_give_finite_flow(case, shape: tuple[int, int]) -> None:
    """Under 128 px the coarsest level is 1 px wide: the original returned NaN there; under
    64 px it stopped ("Output size is too small"): we zero-pad to 64 and crop the flow."""
    _, _, _, model = case
    a, b = _pair(5, shape)
    flow = model.flow(a[None, None].astype(np.float32), b[None, None].astype(np.float32), 255.0)
    assert flow.shape == (1, 2, *shape) and np.isfinite(flow).all()


def test_lookup_follows_our_flow_convention() -> None:
    """Where ``b`` is ``a`` moved by (sx, sy), the lookup at ``x + (sx, sy)`` peaks at its centre.

    That is ``a(x) = b(x + F(x))`` with channel 0 the x displacement: RAFT's
    ``coords1 - coords0`` is already our (OpenCV's) convention.
    """
    torch.manual_seed(0)
    sx, sy, r = 3, -2, 4
    f1 = torch.randn(1, 256, 16, 20)
    f2 = torch.roll(f1, shifts=(sy, sx), dims=(2, 3))  # b(x + s) = a(x)
    corr = CorrPyramid(f1, f2, radius=r)
    grid = pixel_grid(1, 16, 20, f1.device)
    coords = grid + torch.tensor([sx, sy], dtype=torch.float32).view(1, 2, 1, 1)
    level0 = corr(coords)[0, : (2 * r + 1) ** 2, 4:-4, 4:-4]  # away from the wrap-around
    assert (level0.argmax(dim=0) == r * (2 * r + 1) + r).all()  # offset (0, 0)
    # Channel order: x offset is the slow index (k = (dx + r) * (2r + 1) + (dy + r)).
    at_grid = corr(grid)[0, : (2 * r + 1) ** 2, 4:-4, 4:-4]
    assert (at_grid.argmax(dim=0) == (sx + r) * (2 * r + 1) + (sy + r)).all()


def test_wrong_file_names_missing_unexpected_and_misshaped_keys(case, tmp_path: Path) -> None:
    small, _, path, _ = case
    other = NAMES[not small]
    with pytest.raises(CheckpointError) as err:
        build_model(other, checkpoint=str(path), device="cpu")
    message = str(err.value)
    assert str(path) in message and "RAFTNet architecture" in message
    missing, unexpected = (103, 30) if small else (30, 103)  # bottleneck vs basic blocks
    assert f"{missing} missing keys: cnet.layer1.0." in message
    assert f"{unexpected} unexpected keys: cnet.layer1.0." in message
    assert "75 shape mismatches: cnet.conv1.bias" in message


def test_both_names_of_the_shared_batchnorm_are_required(tmp_path: Path) -> None:
    """The large file stores cnet's strided-block BN as norm3 and downsample.1."""
    state = dict(predecessor_raft(small=False).state_dict())
    aliases = [k for k in state if ".downsample.1." in k]
    assert len(aliases) == 10 and all(k.startswith("module.cnet.") for k in aliases)
    del state["module.cnet.layer2.0.downsample.1.running_var"]
    path = tmp_path / "raft-things.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"missing keys: cnet\.layer2\.0\.downsample\.1"):
        build_model("raft", checkpoint=str(path), device="cpu")


class _RunsCode:
    """Pickles into a call of ``os.system``: what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_runs_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"module.fnet.conv1.weight": _RunsCode(marker)}, path)
    with pytest.raises(CheckpointError, match="refused") as err:
        build_model("raft_small", checkpoint=str(path), device="cpu")
    assert not marker.exists()
    assert "holds posix.system" in str(err.value) and "weights_only" not in str(err.value)


@pytest.mark.parametrize("content", [os.urandom(4096), b"hello\n" * 50, b""],
                         ids=["random bytes", "text", "empty"])
def test_a_file_that_is_no_checkpoint_is_called_so(tmp_path: Path, content: bytes) -> None:
    """Never "could run code", never torch's advice to load with weights_only=False."""
    path = tmp_path / "raft-small.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as err:
        build_model("raft_small", checkpoint=str(path), device="cpu")
    message = str(err.value)
    assert f"checkpoint {path}: not a torch checkpoint" in message and "Fix:" in message
    assert "weights_only" not in message and "run code" not in message


def test_a_cut_checkpoint_is_corrupt(case, tmp_path: Path) -> None:
    _, _, source, _ = case
    data = source.read_bytes()
    path = tmp_path / source.name
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="unreadable or truncated: a corrupt torch") as err:
        build_model(NAMES[case[0]], checkpoint=str(path), device="cpu")
    assert "weights_only" not in str(err.value)


@pytest.mark.parametrize("name", ["raft", "raft_small"])
def test_checkpoint_is_required(name: str) -> None:
    with pytest.raises(ConfigError, match="model.checkpoint"):
        build_model(name, device="cpu")
