"""The evaluation job: held-out sections, per-model / per-gap scores, plots, bad configs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from atlinter_ray.cli import conf_dir, register_configs
from atlinter_ray.errors import ConfigError, UnknownModelError
from atlinter_ray.evaluation.config import EvaluateConfig
from atlinter_ray.evaluation.holdout import panel_slices, plan_holdout, slice_geometry
from atlinter_ray.evaluation.job import evaluate
from atlinter_ray.evaluation.report import format_table
from atlinter_ray.evaluation.workers import EDGE_COPY
from atlinter_ray.metrics import psnr, ssim
from atlinter_ray.models import base
from atlinter_ray.models.classical import LinearInterpolator
from atlinter_ray.planning import EDGE
from atlinter_ray.sample import sample_truth
from atlinter_ray.testing.datasets import real_volume, sections_of, write_dataset

REPO = Path(__file__).resolve().parents[1]
SAMPLE_SECTIONS = list(range(1, 90, 4))  # the bundled sample's known sections
IRREGULAR = [3, 9, 14, 22, 27, 36, 40, 52, 57, 63, 71, 80, 86]


def _sample_config(tmp_path: Path, **values: object) -> EvaluateConfig:
    register_configs()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg: EvaluateConfig = OmegaConf.to_object(compose("evaluate"))  # type: ignore[assignment]
    cfg.output_root = str(tmp_path / "eval")
    cfg.serial = True
    for key, value in values.items():
        setattr(cfg, key, value)
    return cfg


def _decode(path: Path) -> np.ndarray:
    img = cv2.imdecode(np.frombuffer(path.read_bytes(), np.uint8), cv2.IMREAD_COLOR)
    assert img is not None, f"{path} is not a decodable PNG"
    return img


def test_every_k_keeps_every_kth_section_and_edges_apart() -> None:
    tasks = plan_holdout("g", SAMPLE_SECTIONS, "every_k", 2)
    assert [(t.left, t.right) for t in tasks] == [(s, s + 8) for s in range(1, 89, 8)]
    assert all([j.slice for j in t.jobs] == [t.left + 4] for t in tasks)
    assert {j.t for t in tasks for j in t.jobs} == {0.5}
    assert {slice_geometry(t, t.jobs[0]) for t in tasks} == {(8, 4)}
    three = plan_holdout("g", SAMPLE_SECTIONS, "every_k", 3)  # 23 sections: 22 is left over
    interior, edge = three[:-1], three[-1]
    assert [j.slice for j in interior[0].jobs] == [5, 9]
    assert [slice_geometry(interior[0], j) for j in interior[0].jobs] == [(12, 4), (12, 4)]
    assert (edge.left, edge.right, [(j.slice, j.status, j.source) for j in edge.jobs]) == (
        85, None, [(89, EDGE, 85)])
    assert slice_geometry(edge, edge.jobs[0]) == (None, 4)


def test_leave_one_out_predicts_each_interior_section_from_its_neighbours() -> None:
    tasks = plan_holdout("g", IRREGULAR, "leave_one_out")
    interior = [t for t in tasks if t.predicted]
    assert [(t.left, t.jobs[0].slice, t.right) for t in interior] == list(
        zip(IRREGULAR, IRREGULAR[1:], IRREGULAR[2:]))
    assert interior[0].jobs[0].t == pytest.approx((9 - 3) / (14 - 3))
    edges = [t for t in tasks if not t.predicted]
    assert [(j.slice, j.source) for t in edges for j in t.jobs] == [(3, 9), (86, 80)]
    assert len({t.task_id for t in tasks}) == len(tasks)
    picked = panel_slices(interior, 3)
    assert sum(len(v) for v in picked.values()) == 3 and set(picked) <= {t.task_id for t in interior}


def test_bad_config_fails_before_any_work(tmp_path: Path) -> None:
    missing = str(tmp_path / "no-such-data")  # a data error would show the check came late
    for values, error, text in (
        ({"models": ["linear", "nope"]}, UnknownModelError, "unknown model 'nope'"),
        ({"k": 1}, ConfigError, "k=1"),
        ({"k": [2, 0]}, ConfigError, "integer k >= 2"),
        ({"holdout": "every_other"}, ConfigError, "holdout='every_other'"),
        ({"models": []}, ConfigError, "at least one model"),
        ({"params": {"dis": {"preset": "x"}}}, ValueError, "preset='x'"),
    ):
        cfg = _sample_config(tmp_path, **values)
        cfg.data.root, cfg.data.genes = missing, ["g"]
        with pytest.raises(error, match=text):
            evaluate(cfg)
    assert not (tmp_path / "eval").exists()
    cfg = _sample_config(tmp_path, k=30)  # 23 sections: nothing left between kept ones
    with pytest.raises(ConfigError, match="no held-out section between two kept ones"):
        evaluate(cfg)
    assert not (tmp_path / "eval").exists()


def test_midpoint_only_model_needs_dyadic_positions(tmp_path: Path, monkeypatch) -> None:
    class MidpointLinear(LinearInterpolator):
        arbitrary_t = False

    monkeypatch.setitem(base._REGISTRY, "midpoint_linear", MidpointLinear)
    with pytest.raises(ConfigError, match="'midpoint_linear' predicts midpoints only"):
        evaluate(_sample_config(tmp_path, models=["midpoint_linear"], k=3))
    assert not (tmp_path / "eval").exists()
    report = evaluate(_sample_config(tmp_path, models=["linear", "midpoint_linear"], k=3,
                                     placement="atlinter", panel_slices=0))
    assert report["by_gap"]["midpoint_linear"] == report["by_gap"]["linear"]  # bisection == blend


@pytest.mark.slow
def test_sample_scores_rank_models_and_write_plots(tmp_path: Path) -> None:
    report = evaluate(_sample_config(tmp_path, models=["linear", "dis"], k=[2, 4]))
    assert report["models"] == ["linear", "dis"] and report["k"] == [2, 4]
    assert set(report["by_gap"]["linear"]) == {"8", "16"}
    assert report["by_gap"]["linear"]["8"]["slices"] == 11
    assert report["by_gap"]["linear"]["16"]["slices"] == 15  # 5 gaps x 3 held out
    assert set(report["by_distance"]["dis"]) == {"4", "8"}
    assert report["edge"]["overall"]["slices"] == 2  # k=4 keeps up to 81: 85, 89 are edges
    assert not report["failures"]
    # linear at gap 8, straight from the truth volume: (v[s-4] + v[s+4]) / 2 against v[s]
    truth = sample_truth()
    held = report["datasets"]["mni152_t1"][0]["held_out"]
    blends = [np.rint((truth[s - 4].astype(float) + truth[s + 4]) / 2).astype(np.uint8) for s in held]
    expected = np.mean([psnr(b, truth[s]) for b, s in zip(blends, held)])
    got = report["by_gap"]["linear"]["8"]
    assert got["psnr"] == pytest.approx(expected, abs=1e-3) and 17 < got["psnr"] < 19.5
    assert got["ssim"] == pytest.approx(np.mean([ssim(b, truth[s]) for b, s in zip(blends, held)]), abs=1e-3)
    for gap in ("8", "16"):  # the flow model beats linear on every metric at every gap
        dis, lin = report["by_gap"]["dis"][gap], report["by_gap"]["linear"][gap]
        assert dis["psnr"] > lin["psnr"] + 0.5 and dis["ssim"] > lin["ssim"] and dis["mae"] < lin["mae"]
    assert report["by_gap"]["linear"]["16"]["psnr"] < got["psnr"]  # wider gaps are harder
    written = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert written["by_gap"] == report["by_gap"] and len(written["slices"]) == 2 * (11 + 15) + 2
    assert written["per_dataset"]["mni152_t1"]["by_gap"] == report["by_gap"]
    plot = _decode(tmp_path / "eval" / "metrics.png")
    panel = _decode(tmp_path / "eval" / "mni152_t1.panel.png")
    assert plot.shape[0] > 300 and plot.shape[1] > 600 and plot.std() > 10
    assert panel.shape[1] > panel.shape[0] > 200  # 3 rows x (truth + 2 x (prediction, error))
    assert "| dis | 8 | 11 |" in format_table(report)


def test_leave_one_out_on_irregular_sections_reports_gaps_and_edges(tmp_path: Path) -> None:
    volume = real_volume()
    write_dataset(tmp_path / "in", "irr", sections_of(volume, IRREGULAR, "coronal"), IRREGULAR,
                  reference_shape=list(volume.shape))
    cfg = _sample_config(tmp_path, models=["linear"], holdout="leave_one_out", panel_slices=0)
    cfg.data.root, cfg.data.genes = str(tmp_path / "in"), ["irr"]
    report = evaluate(cfg)
    gaps = sorted({str(r - left) for left, r in zip(IRREGULAR, IRREGULAR[2:])}, key=int)
    assert list(report["by_gap"]["linear"]) == gaps
    assert sum(v["slices"] for v in report["by_gap"]["linear"].values()) == len(IRREGULAR) - 2
    rows = {r["slice"]: r for r in report["slices"]}
    assert (rows[22]["left"], rows[22]["right"], rows[22]["gap"], rows[22]["distance"]) == (14, 27, 13, 5)
    assert rows[3]["model"] == EDGE_COPY and rows[3]["gap"] is None
    assert rows[3]["psnr"] == pytest.approx(psnr(volume[9], volume[3]))
    assert report["edge"]["overall"]["slices"] == 2 and report["k"] is None
    assert not (tmp_path / "eval" / "irr.panel.png").exists()
    assert (tmp_path / "eval" / "metrics.png").is_file()


@pytest.mark.ray
@pytest.mark.slow
def test_ray_actor_pool_gives_the_serial_scores(ray_cluster, tmp_path: Path) -> None:
    serial = evaluate(_sample_config(tmp_path / "serial", models=["linear", "dis"], panel_slices=2))
    cfg = _sample_config(tmp_path / "ray", models=["linear", "dis"], panel_slices=2, serial=False)
    cfg.resources.min_workers = cfg.resources.max_workers = 2
    on_ray = evaluate(cfg)
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in serial["slices"]]
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in on_ray["slices"]] == strip
    assert (tmp_path / "ray" / "eval" / "mni152_t1.panel.png").read_bytes() == (
        tmp_path / "serial" / "eval" / "mni152_t1.panel.png").read_bytes()


@pytest.mark.slow
def test_job_runs_and_exits_2_on_bad_config(tmp_path: Path) -> None:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    job = [sys.executable, str(REPO / "jobs" / "evaluate.py"), "serial=true",
           f"output_root={tmp_path / 'eval'}"]
    done = subprocess.run([*job, "models=[linear]"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "| linear | 8 | 11 |" in done.stdout and (tmp_path / "eval" / "evaluation.json").is_file()
    bad = subprocess.run([*job, "k=1", f"output_root={tmp_path / 'bad'}"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "k=1" in bad.stdout + bad.stderr
    assert not (tmp_path / "bad").exists()


def test_metrics_plot_shows_every_slice_on_whole_slice_axes() -> None:
    """One dot per slice and model, one tick per gap measured: readable with a single gap."""
    from matplotlib.collections import PathCollection
    from matplotlib.figure import Figure

    from atlinter_ray.evaluation.report import _strip

    rows = [{"model": m, "gap": 8, "distance": 1 + s % 4, "psnr": 20.0 + s, "ssim": 0.5, "mae": 3.0}
            for m in ("dis", "linear") for s in range(5)]
    rows.append({"model": "dis", "gap": 8, "distance": 2, "psnr": float("inf"), "ssim": 1.0, "mae": 0.0})
    ax = Figure().subplots()
    _strip(ax, rows, "gap", "psnr", ["dis", "linear"])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["8"]
    dots = [c.get_offsets() for c in ax.collections if isinstance(c, PathCollection)]
    assert sorted(len(d) for d in dots) == [5, 5]  # the identical slice (inf dB) is left out
    assert np.allclose(sorted(np.concatenate(dots)[:, 1]), sorted([20.0 + s for s in range(5)] * 2))
    ax = Figure().subplots()
    _strip(ax, rows, "distance", "mae", ["dis", "linear"])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "2", "3", "4"]
