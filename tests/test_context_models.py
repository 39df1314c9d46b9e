"""Context models (curved trajectories, fusion), their planning, and the tuning stage."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from atlinter_ray import tuning as tuning_mod
from atlinter_ray.config import Config
from atlinter_ray.engine import build_interpolator, predict_gap
from atlinter_ray.errors import ConfigError
from atlinter_ray.evaluation.config import EvaluateConfig
from atlinter_ray.evaluation.holdout import kept_sections, plan_holdout
from atlinter_ray.evaluation.job import evaluate
from atlinter_ray.metrics import psnr, ssim
from atlinter_ray.models.base import FlowEstimator, Neighbour
from atlinter_ray.models.context import FusionInterpolator, curvature_shift
from atlinter_ray.pipeline import run
from atlinter_ray.planning import plan_dataset
from atlinter_ray.store import VolumeStore
from atlinter_ray.testing.datasets import real_volume, sections_of, write_dataset
from atlinter_ray.tuning import TuneJob, TuneSpec, TuneWorker


def texture(h: int = 64, w: int = 160, seed: int = 0) -> np.ndarray:
    """A smooth random texture in [0, 255] (float32)."""
    noise = np.random.default_rng(seed).random((h, w)).astype(np.float32)
    img = cv2.GaussianBlur(noise, (0, 0), 3.0)
    return (img - img.min()) / (img.max() - img.min()) * 255


def shifted(img: np.ndarray, dx: float) -> np.ndarray:
    """``img`` moved right by ``dx`` pixels (periodic, sub-pixel), as ``(1, H, W)``."""
    m = np.float32([[1, 0, dx], [0, 1, 0]])
    return cv2.warpAffine(img, m, img.shape[::-1], flags=cv2.INTER_CUBIC,
                          borderMode=cv2.BORDER_WRAP)[None]


def test_planning_lists_context_sections_and_still_writes_only_its_slices() -> None:
    tasks = plan_dataset("d", [3, 11, 19, 27], 30, context=1)
    gaps = {t.task_id: t for t in tasks if t.predicted}
    assert gaps["d/3-11"].context == (19,)
    assert gaps["d/11-19"].context == (3, 27)
    assert gaps["d/19-27"].context == (11,)
    assert gaps["d/11-19"].sources == (3, 11, 19, 27)
    assert [j.slice for j in gaps["d/11-19"].jobs] == list(range(11, 19))
    plain = plan_dataset("d", [3, 11, 19, 27], 30)
    assert [t.jobs for t in plain] == [t.jobs for t in tasks]
    assert all(t.context == () for t in plain)


def test_curvature_shift_is_exact_for_a_parabola_on_irregular_sections() -> None:
    """x(z) = z^2 sampled at z = -2, 0, 3, 4: the shift puts t=1/3 on the curve."""
    def x(z: float) -> float:
        return z * z

    ones = np.ones((2, 1, 1), np.float32)
    f_ab, f_ba = (x(3) - x(0)) * ones, (x(0) - x(3)) * ones
    before = ((x(-2) - x(0)) * ones, 3 / 2)   # flow a -> p, pair gap / distance
    after = ((x(4) - x(3)) * ones, 3 / 1)
    t = 1 / 3
    chord = x(0) + t * (x(3) - x(0))
    delta = curvature_shift(t, f_ab, f_ba, before, after)
    assert chord + delta[0, 0, 0] == pytest.approx(x(1), abs=1e-5)
    assert abs(chord - x(1)) > 1.5


def test_curved_trajectory_recovered_better_than_two_section_flow() -> None:
    """A texture moving on a parabola: the four-section model lands where it is."""
    img = texture()
    pos = lambda z: 0.06 * z * z  # noqa: E731
    z = [0, 8, 16, 24]
    sec = {s: shifted(img, pos(s)) for s in z}
    curved = build_interpolator("curved")
    straight = build_interpolator("dis")
    truth = shifted(img, pos(12))[0]
    crop = (slice(8, -8), slice(40, -40))
    got_c = curved.interpolate_context(  # type: ignore[attr-defined]
        sec[8], sec[16], np.array([0.5]), 255.0, Neighbour(sec[0]), Neighbour(sec[24]))[0, 0]
    got_s = straight.interpolate(sec[8][None], sec[16][None], np.array([0.5]), 255.0)[0, 0, 0]
    err_c = np.abs(got_c - truth)[crop].mean()
    err_s = np.abs(got_s - truth)[crop].mean()
    assert err_c < 0.5 * err_s, (err_c, err_s)


class BrokenFlow(FlowEstimator):
    """A flow estimator gone wrong: large random displacements."""

    name = "broken"

    def flow(self, a: np.ndarray, b: np.ndarray, peak: float = 1.0) -> np.ndarray:
        rng = np.random.default_rng(1)
        return rng.normal(0, 6, (a.shape[0], 2, *a.shape[-2:])).astype(np.float32)


def test_fusion_follows_the_consistent_estimator_where_one_is_corrupted() -> None:
    volume = real_volume()
    a, b, truth = volume[40][None], volume[48][None], volume[44]
    good = build_interpolator("fusion", params={"members": ["dis"], "curved": False})
    fused = build_interpolator("fusion", params={"members": ["dis", "farneback"],
                                                 "curved": False})
    assert isinstance(fused, FusionInterpolator)
    fused.estimators["farneback"] = BrokenFlow()
    t = np.array([0.5])
    ref = good.interpolate(a[None].astype(np.float32), b[None].astype(np.float32), t, 255.0)
    got = fused.interpolate(a[None].astype(np.float32), b[None].astype(np.float32), t, 255.0)
    broken = build_interpolator("fusion", params={"members": ["farneback"], "curved": False})
    broken.estimators["farneback"] = BrokenFlow()  # type: ignore[attr-defined]
    bad = broken.interpolate(a[None].astype(np.float32), b[None].astype(np.float32), t, 255.0)
    mean = (ref + bad) / 2
    q = lambda f: np.clip(np.rint(f[0, 0, 0]), 0, 255).astype(np.uint8)  # noqa: E731
    assert psnr(q(got), truth) > psnr(q(mean), truth) + 1.0
    assert psnr(q(got), truth) > psnr(q(ref), truth) - 0.3


def test_fusion_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="members"):
        build_interpolator("fusion", params={"members": []})
    with pytest.raises(ConfigError, match="not a flow model"):
        build_interpolator("fusion", params={"members": ["dis", "linear"]})
    with pytest.raises(ConfigError, match="member_params"):
        build_interpolator("fusion", params={"members": ["dis"], "member_params": {"tvl1": {}}})


def _sample_dataset(folder: Path, every: int = 8) -> tuple[np.ndarray, list[int]]:
    volume = real_volume()
    known = list(range(1, volume.shape[0], every))
    write_dataset(folder, "gene", sections_of(volume, known, "coronal"), known,
                  reference_shape=list(volume.shape))
    return volume, known


def test_tuning_is_cached_by_content_and_reruns_do_not_tune(tmp_path: Path, monkeypatch) -> None:
    _sample_dataset(tmp_path / "in")
    from atlinter_ray.inputs import load_datasets

    cfg = Config()
    cfg.data.root, cfg.data.genes = str(tmp_path / "in"), ["gene"]
    ds = load_datasets(cfg.data)[0]
    spec = TuneSpec("fusion", None, {"members": ["dis", "farneback"], "tune": True},
                    {ds.id: ds}, str(tmp_path / "out"))
    calls = []
    original = FusionInterpolator.tune

    def counting(self, *args, **kwargs):
        calls.append(args[1])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(FusionInterpolator, "tune", counting)
    job = TuneJob(ds.id, tuple(ds.section_numbers))
    first = TuneWorker(spec).run([job])[0]
    second = TuneWorker(spec).run([job])[0]
    assert first.status == second.status == "done"
    assert not first.result["cached"] and second.result["cached"]
    assert len(calls) == 1
    assert {k: v for k, v in first.result.items() if k != "cached"} == {
        k: v for k, v in second.result.items() if k != "cached"}
    assert first.result["seconds"] > 0 and first.result["scores"]
    # other sections (another holdout) or other settings: a new key, tuned again
    fewer = TuneWorker(spec).run([TuneJob(ds.id, tuple(ds.section_numbers[:-1]))])[0]
    assert not fewer.result["cached"] and fewer.result["key"] != first.result["key"]
    assert len(calls) == 2


def test_evaluation_tunes_on_kept_sections_only(tmp_path: Path, monkeypatch) -> None:
    """Every section the tuning stage reads is a kept one: never a held-out slice."""
    _, known = _sample_dataset(tmp_path / "in", every=4)
    tasks = plan_holdout("gene", known, "every_k", 2, context=1)
    held = {j.slice for t in tasks for j in t.jobs}
    assert not held & set(kept_sections(tasks))
    assert all(not held & set(t.context) for t in tasks)
    read: list[tuple[int, ...]] = []
    original = tuning_mod.read_sections
    monkeypatch.setattr(tuning_mod, "read_sections",
                        lambda ds, numbers: read.append(tuple(numbers)) or original(ds, numbers))
    cfg = EvaluateConfig()
    cfg.data.root, cfg.data.genes = str(tmp_path / "in"), ["gene"]
    cfg.models = ["dis", "fusion"]
    cfg.params = {"fusion": {"members": ["dis", "farneback"], "tune": True}}
    cfg.k, cfg.serial, cfg.panel_slices = 2, True, 0
    cfg.output_root = str(tmp_path / "eval")
    report = evaluate(cfg)
    assert read and all(not held & set(r) for r in read)
    assert set(read[0]) == set(kept_sections(tasks))
    assert report["tuning"]["fusion"]["gene/k=2"]["members"]
    assert not report["failures"]
    assert {r["model"] for r in report["slices"]} >= {"dis", "fusion"}
    assert report["seconds_per_slice"]["fusion"] > 0


@pytest.mark.ray
def test_fusion_with_tuning_runs_through_the_ray_pipeline(ray_cluster, tmp_path: Path) -> None:
    volume, known = _sample_dataset(tmp_path / "in")
    cfg = Config()
    cfg.data.root, cfg.data.genes = str(tmp_path / "in"), ["gene"]
    cfg.model.name = "fusion"
    cfg.model.params = {"members": ["dis", "farneback"], "tune": True}
    cfg.output.root, cfg.output.quicklook = str(tmp_path / "out"), False
    cfg.resources.min_workers = cfg.resources.max_workers = 1
    cfg.run.progress = False
    summary = run(cfg)
    assert summary.ok, summary.failures
    assert summary.tuning["gene"]["cached"] is False
    out = VolumeStore(cfg.output.root).read_volume("gene")
    np.testing.assert_array_equal(out[known], volume[known])
    attrs = VolumeStore(cfg.output.root).image_attrs("gene")["atlinter_ray"]
    record = next(p for p in attrs["provenance"] if p["slice"] == 13)
    assert record["model"] == "fusion" and record["context"] == [1, 25]
    assert record["tuned"]["key"] == summary.tuning["gene"]["key"]
    cached = VolumeStore(cfg.output.root).read_bytes(
        f"_tuning/gene/{summary.tuning['gene']['key']}.json")
    assert cached is not None and json.loads(cached)["members"] == record["tuned"]["members"]
    # the image is lost (an overwrite=true rerun would only resume this run): rebuilt,
    # with the tuning taken from the cache
    shutil.rmtree(tmp_path / "out" / "gene.ome.zarr")
    again = run(cfg)
    assert again.ok and again.tasks_done == summary.tasks_done
    assert again.tuning["gene"]["cached"] is True


@pytest.mark.slow
def test_fusion_beats_the_best_single_model_on_a_real_volume_at_gap_8() -> None:
    """The bundled MNI152 volume, a known section every 8 slices, every slice in between."""
    volume = real_volume()
    known = list(range(0, volume.shape[0], 8))
    tasks = [t for t in plan_dataset("mni", known, volume.shape[0], context=1) if t.predicted]

    def scores(name: str) -> tuple[float, float]:
        model = build_interpolator(name)
        rows = []
        for task in tasks:
            sections = {s: volume[s][None] for s in (task.left, task.right, *task.context)}
            frames = predict_gap(model, sections, task, 255.0).frames[0, :, 0]
            pred = np.clip(np.rint(frames), 0, 255).astype(np.uint8)
            rows += [(psnr(pred[k], volume[j.slice]), ssim(pred[k], volume[j.slice]))
                     for k, j in enumerate(task.predicted)]
        return tuple(np.mean(rows, axis=0))  # type: ignore[return-value]

    single = {name: scores(name) for name in ("dis", "deepflow", "tvl1")}
    best = max(single.values())
    fused = scores("fusion")
    assert fused[0] >= best[0] + 0.25, (fused, single)
    assert fused[1] >= max(s[1] for s in single.values()) - 0.005, (fused, single)
