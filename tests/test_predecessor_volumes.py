"""``placement=atlinter`` gives atlinter 0.2.3's whole volume, for every model it had.

The oracle is the predecessor's own ``GeneInterpolate(...).predict_volume()`` with its own
pair models (``LinearPairInterpolationModel``, ``RIFEPairInterpolationModel`` on its
vendored RIFE_HD, ``CAINPairInterpolationModel`` on its vendored CAIN with the two fixes
it needs to run at all, see :class:`~atlinter_ray.testing.predecessor.CainOracleFixes`),
random weights written in the original file layouts. Ours is the whole job
(``pipeline.run``, in-process) on the same sections written as ``.npy`` + ``.json``.

Slices are 40 x 56 (multiples of 8, as atlinter's CAIN needs, but not of 32, so RIFE's
padded canvas matters), coronal and sagittal, grey and RGB, float32 and float64 in
[0, 1] (the range the predecessor's models were written for: on 0..255 data its RIFE_HD
clips every frame to [0, 1]). One case runs at the CCF's coronal size, 320 x 456.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from atlinter_ray.config import Config
from atlinter_ray.pipeline import run
from atlinter_ray.store import VolumeStore
from atlinter_ray.testing.datasets import write_dataset
from atlinter_ray.testing.predecessor import (
    import_predecessor,
    predecessor_cain,
    predecessor_cain_model,
    predecessor_rife_hd,
    predecessor_volume,
)

ATOL = 1e-5
SECTIONS = [2, 5, 9, 17]  # gaps 3, 4 and 8: bisection depths 2, 2 and 3
#: Reference shapes whose coronal / sagittal planes are 40 x 56, 20 slices along the axis.
SHAPES = {"coronal": (20, 40, 56), "sagittal": (40, 56, 20)}


@pytest.fixture(scope="module")
def oracles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str | None, Any]]:
    """Model name -> (our checkpoint, the predecessor's pair model on the same weights)."""
    torch.set_num_threads(2)
    import_predecessor()
    from atlinter.pair_interpolation import (
        LinearPairInterpolationModel,
        RIFEPairInterpolationModel,
    )

    root = tmp_path_factory.mktemp("checkpoints")
    rife = predecessor_rife_hd(root / "rife")
    cain = predecessor_cain(root / "pretrained_cain.pth")
    return {
        "linear": (None, LinearPairInterpolationModel()),
        "rife_hd": (str(root / "rife"), RIFEPairInterpolationModel(rife, torch.device("cpu"))),
        "cain": (str(root / "pretrained_cain.pth"), predecessor_cain_model(cain)),
    }


def smooth_sections(n: int, plane: tuple[int, int], rgb: bool, seed: int) -> np.ndarray:
    """``n`` smooth random images in [0, 1], ``(n, H, W)`` or ``(n, H, W, 3)`` float64."""
    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.random((n, 3 if rgb else 1, plane[0] // 5, plane[1] // 5)))
    fine = torch.nn.functional.interpolate(coarse, size=plane, mode="bicubic").clamp(0, 1)
    images = fine.numpy()
    return np.moveaxis(images, 1, -1) if rgb else images[:, 0]


def ours(tmp_path: Path, name: str, checkpoint: str | None, images: np.ndarray,
         sections: list[int], axis: str, shape: tuple[int, int, int], **json: Any) -> np.ndarray:
    """The whole job with ``placement=atlinter``: the written volume, channels last."""
    write_dataset(tmp_path / "in", "gene", images, sections, axis=axis,
                  reference_shape=list(shape), **json)
    cfg = Config()
    cfg.data.root, cfg.data.genes = str(tmp_path / "in"), ["gene"]
    cfg.model.name, cfg.model.checkpoint = name, checkpoint
    cfg.model.params = {} if name == "linear" else {"device": "cpu"}
    cfg.interpolation.placement = "atlinter"
    cfg.output.root = str(tmp_path / "out")
    cfg.run.serial, cfg.run.progress = True, False
    assert run(cfg).ok
    volume = VolumeStore(cfg.output.root).read_volume("gene")
    return np.moveaxis(volume, 0, -1) if images.ndim == 4 else volume


CASES = [
    ("rife_hd", "coronal", False, "float32"),
    ("rife_hd", "sagittal", True, "float32"),
    ("rife_hd", "coronal", True, "float64"),
    ("cain", "coronal", True, "float32"),
    ("cain", "sagittal", False, "float64"),
]


@pytest.mark.parametrize("name,axis,rgb,dtype", CASES)
def test_frame_models_give_the_predecessors_volume(
    oracles, tmp_path: Path, name: str, axis: str, rgb: bool, dtype: str
) -> None:
    checkpoint, pair_model = oracles[name]
    shape = SHAPES[axis]
    plane = shape[1:] if axis == "coronal" else shape[:2]
    images = smooth_sections(len(SECTIONS), plane, rgb, seed=len(name)).astype(dtype)
    volume_shape = (*shape, 3) if rgb else shape
    theirs = predecessor_volume(images, SECTIONS, axis, volume_shape, pair_model)
    mine = ours(tmp_path, name, checkpoint, images, SECTIONS, axis, shape)
    assert mine.shape == theirs.shape and mine.dtype == np.dtype(dtype)
    known = np.take(theirs, SECTIONS, axis=0 if axis == "coronal" else 2)
    assert np.abs(np.diff(known, axis=0)).max() > 0.1  # sections differ: real predictions
    np.testing.assert_allclose(mine, theirs, atol=ATOL, rtol=0)


def test_linear_float64_keeps_float64_values(oracles, tmp_path: Path) -> None:
    """Float64 data in other units (``intensity_max``) gives the predecessor's float64 values."""
    images = smooth_sections(len(SECTIONS), (40, 56), rgb=False, seed=7) * 999.0 + 1e-3
    theirs = predecessor_volume(images, SECTIONS, "coronal", SHAPES["coronal"],
                                oracles["linear"][1])
    mine = ours(tmp_path, "linear", None, images, SECTIONS, "coronal", SHAPES["coronal"],
                intensity_max=1000.0)
    assert mine.dtype == np.float64
    np.testing.assert_allclose(mine, theirs, atol=1e-9, rtol=0)


def test_padded_canvas_matters_at_this_size(oracles, tmp_path: Path) -> None:
    """Without the canvas (placement=exact pads every call) the volume differs: the test can fail."""
    from atlinter_ray.engine import predict
    from atlinter_ray.models.base import build_model

    checkpoint, _ = oracles["rife_hd"]
    model = build_model("rife_hd", checkpoint=checkpoint, device="cpu")
    a, b = smooth_sections(2, (40, 56), rgb=False, seed=3)[:, None, None].astype(np.float32)
    positions = [0.25, 0.5, 0.75]
    canvas = predict(model, a, b, positions, 1.0, canvas=32).frames
    per_call = predict(model, a, b, positions, 1.0).frames
    np.testing.assert_array_equal(canvas[:, 1], per_call[:, 1])  # level 1: same input
    assert np.abs(canvas[:, [0, 2]] - per_call[:, [0, 2]]).max() > 1e-3  # border carried


@pytest.mark.slow
def test_rife_hd_at_the_ccf_coronal_size(oracles, tmp_path: Path) -> None:
    checkpoint, pair_model = oracles["rife_hd"]
    shape, sections = (12, 320, 456), [1, 6, 10]
    images = smooth_sections(len(sections), shape[1:], rgb=False, seed=11).astype(np.float32)
    theirs = predecessor_volume(images, sections, "coronal", shape, pair_model)
    mine = ours(tmp_path, "rife_hd", checkpoint, images, sections, "coronal", shape)
    np.testing.assert_allclose(mine, theirs, atol=ATOL, rtol=0)
