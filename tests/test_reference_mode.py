"""The reference-guided mode as a job option, on the bundled real volume."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import fsspec
import numpy as np
import pytest
import zarr
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from atlinter_ray import reference as reference_module
from atlinter_ray.cli import conf_dir, register_configs
from atlinter_ray.config import Config
from atlinter_ray.dataset import load_dataset
from atlinter_ray.errors import ConfigError, DatasetError, DatasetNotFoundError, StoreError
from atlinter_ray.layout import DEFAULT_SLAB
from atlinter_ray.models.base import build_model
from atlinter_ray.models.reference_guided import GuideSlices, predict_two_sided
from atlinter_ray.pipeline import run
from atlinter_ray.reference import load_reference, read_reference_slices
from atlinter_ray.store import VolumeStore
from atlinter_ray.testing.datasets import real_volume, sections_of, write_dataset
from atlinter_ray.worker import to_dtype

REPO = Path(__file__).resolve().parents[1]
CORONAL = list(range(2, 91, 8))  # gaps of 8 slices
SAGITTAL = list(range(3, 77, 8))
AXIS = {"coronal": 0, "sagittal": 2}


def _setup(tmp_path: Path, gene: np.ndarray, sections: list[int], axis: str,
           reference: np.ndarray) -> Config:
    """A dataset of ``gene``'s sections along ``axis`` and ``reference`` saved as .npy."""
    write_dataset(tmp_path / "in", "gene", sections_of(gene, sections, axis), sections,
                  axis=axis, reference_shape=list(gene.shape[:3]))
    np.save(tmp_path / "nissl.npy", reference)
    cfg = Config()
    cfg.data.root, cfg.data.genes = str(tmp_path / "in"), ["gene"]
    cfg.output.root = str(tmp_path / "out")
    cfg.model.name, cfg.model.params = "dis", {"preset": "medium"}
    cfg.interpolation.reference = str(tmp_path / "nissl.npy")
    cfg.run.progress = False
    return cfg


def _chw(volume: np.ndarray, s: int, axis: str) -> np.ndarray:
    """Slice ``s`` along ``axis`` of a channels-last volume as ``(C, H, W)``."""
    plane = np.take(volume, s, axis=AXIS[axis])
    return plane[None] if plane.ndim == 2 else np.moveaxis(plane, -1, 0)


def _expected(gene: np.ndarray, reference: np.ndarray, sections: list[int], axis: str,
              peak: float) -> dict[int, np.ndarray]:
    """Every predicted slice computed directly from in-memory volumes (both bounds moved
    along the reference's flows), uint8 ``(C, H, W)``."""
    estimator = build_model("dis", preset="medium")
    out = {}
    for left, right in zip(sections, sections[1:]):
        for s in range(left + 1, right):
            guide = GuideSlices(_chw(reference, s, axis)[None], _chw(reference, left, axis),
                                _chw(reference, right, axis), peak)
            frame = predict_two_sided(estimator, guide, _chw(gene, left, axis),
                                      _chw(gene, right, axis), [(s - left) / (right - left)])
            out[s] = to_dtype(frame[0][0], "uint8")
    return out


def _output(tmp_path: Path, axis: str) -> tuple[np.ndarray, list[dict]]:
    """The written volume, channels last, and its per-slice provenance."""
    group = zarr.open_group(str(tmp_path / "out" / "gene.ome.zarr"), mode="r")
    volume = group["0"][...]
    if volume.ndim == 4:
        volume = np.moveaxis(volume, 0, -1)
    return volume, VolumeStore(str(tmp_path / "out")).image_attrs("gene")["atlinter_ray"]["provenance"]


def test_true_reference_beats_linear_and_fingerprints_the_run(tmp_path: Path) -> None:
    truth = real_volume()
    cfg = _setup(tmp_path, truth, CORONAL, "coronal", truth)
    np.savez(tmp_path / "truth.npz", volume=truth)
    cfg.data.truth = {"gene": str(tmp_path / "truth.npz")}
    cfg.run.serial = True
    summary = run(cfg)
    assert summary.ok and summary.model_calls == 7 * (len(CORONAL) - 1)  # one flow a slice
    scores = summary.scores["gene"]
    assert scores["model"]["psnr"] > scores["linear"]["psnr"] + 2, scores
    volume, provenance = _output(tmp_path, "coronal")
    for s, frame in _expected(truth, truth, CORONAL, "coronal", 255.0).items():
        np.testing.assert_array_equal(volume[s], frame[0], err_msg=f"slice {s}")
    np.testing.assert_array_equal(volume[CORONAL], truth[CORONAL])
    by_slice = {p["slice"]: p for p in provenance}
    assert by_slice[6] | {"software": ""} == {
        "slice": 6, "status": "predicted", "left": 2, "right": 10, "t": 0.5,
        "known": [2, 10], "model": "dis", "checkpoint_sha256": None, "software": "",
        "mode": "reference-guided", "reference": cfg.interpolation.reference,
    }
    assert by_slice[7]["known"] == [2, 10] and "mode" not in by_slice[10]
    # Resuming needs the same reference; another one is refused, naming the field.
    assert run(cfg).tasks_skipped == summary.tasks_total
    other = tmp_path / "other.npy"
    shutil.copy(cfg.interpolation.reference, other)
    cfg.interpolation.reference = str(other)
    with pytest.raises(StoreError, match=r"'reference': '.*other\.npy'"):
        run(cfg)


@pytest.mark.ray
def test_sagittal_rgb_gene_with_a_smoothed_float_reference_on_ray(
    ray_cluster, tmp_path: Path
) -> None:
    gene = real_volume(rgb=True)
    smooth = np.stack([cv2.GaussianBlur(p, (0, 0), 1.0) for p in real_volume()])
    reference = (3.0 * (smooth / 255.0) ** 0.7).astype(np.float32)  # other intensities
    cfg = _setup(tmp_path, gene, SAGITTAL, "sagittal", reference)
    cfg.resources.min_workers = cfg.resources.max_workers = 2
    summary = run(cfg)
    assert summary.ok and summary.tasks_done == -(-77 // DEFAULT_SLAB), summary.failures
    volume, provenance = _output(tmp_path, "sagittal")
    expected = _expected(gene, reference, SAGITTAL, "sagittal", float(reference.max()))
    for s, frame in expected.items():
        np.testing.assert_array_equal(volume[:, :, s], np.moveaxis(frame, 0, -1),
                                      err_msg=f"slice {s}")
    predicted, linear = list(expected), []
    for s in predicted:
        left = max(k for k in SAGITTAL if k < s)
        t = (s - left) / 8
        linear.append((1 - t) * gene[:, :, left] + t * gene[:, :, left + 8])
    ours = np.abs(volume[:, :, predicted].astype(float) - gene[:, :, predicted]).mean()
    base = np.abs(np.stack(linear, axis=2) - gene[:, :, predicted]).mean()
    assert ours < base, (ours, base)
    assert {p["mode"] for p in provenance if p["status"] == "predicted"} == {"reference-guided"}


@pytest.mark.parametrize("rgb", [False, True])
@pytest.mark.parametrize("where", ["local", "memory"])
def test_reference_slices_are_read_without_loading_the_volume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rgb: bool, where: str
) -> None:
    volume = real_volume(rgb=rgb)
    url = str(tmp_path / "ref.npy") if where == "local" else f"memory://refs/{rgb}/ref.npy"
    with fsspec.open(url, "wb") as f:
        np.save(f, volume)
    write_dataset(tmp_path, "g", sections_of(volume, [1, 5], "coronal"), [1, 5],
                  reference_shape=list(volume.shape[:3]))
    ref = load_reference(url, [load_dataset(str(tmp_path / "g"))])
    assert (ref.channels, ref.peak, ref.shape) == (3 if rgb else 1, 255.0, (91, 79, 77))
    monkeypatch.setattr(reference_module, "STREAM_BLOCK_BYTES", 79 * 77 * 3 * 7)  # ragged blocks
    for axis in ("coronal", "sagittal"):
        wanted = [40, 3, 76]
        got = read_reference_slices(ref, AXIS[axis], wanted)
        np.testing.assert_array_equal(got, np.stack([_chw(volume, s, axis) for s in wanted]))


def _bad_reference(tmp_path: Path, cfg: Config, kind: str) -> None:
    """Make the configured reference wrong in one way."""
    path = Path(cfg.interpolation.reference)
    volume = np.load(path)
    if kind == "missing":
        cfg.interpolation.reference = str(tmp_path / "absent.npy")
    elif kind == "shape":
        np.save(path, volume[:, :, :-1])
    elif kind == "dtype":
        np.save(path, volume.astype(np.int16))
    elif kind == "not npy":
        np.savez(tmp_path / "nissl.npz", volume=volume)
        cfg.interpolation.reference = str(tmp_path / "nissl.npz")
    elif kind == "nan":
        bad = volume.astype(np.float32)
        bad[50, 10, 10] = np.nan
        np.save(path, bad)
    elif kind == "pair model":
        cfg.model.name, cfg.model.params = "linear", {}
    elif kind == "edge without reference":
        cfg.interpolation.reference, cfg.interpolation.edge = None, "reference"


@pytest.mark.parametrize(
    ("kind", "error", "message"),
    [
        ("missing", DatasetNotFoundError, r"absent\.npy: field 'interpolation\.reference': "
                                          r"reference volume not found"),
        ("shape", DatasetError, r"nissl\.npy: field 'interpolation\.reference': volume shape "
                                r"\(91, 79, 76\) does not match dataset gene's reference "
                                r"shape \(91, 79, 77\)\. Fix: give the whole reference"),
        ("dtype", DatasetError, r"'interpolation\.reference': unsupported dtype int16"),
        ("not npy", DatasetError, r"nissl\.npz: field 'interpolation\.reference': not a \.npy"),
        ("nan", DatasetError, r"'interpolation\.reference': slice 50 along axis 0 contains NaN"),
        ("pair model", ConfigError, r"interpolation\.reference is set but model 'linear' is "
                                    r"a pair interpolator.*Fix: choose model=fusion"),
        ("edge without reference", ConfigError, r"interpolation\.edge=reference predicts "
                                                r".*Fix: set interpolation\.reference"),
    ],
)
def test_a_bad_reference_stops_the_run_before_any_work(
    tmp_path: Path, kind: str, error: type, message: str
) -> None:
    truth = real_volume()
    cfg = _setup(tmp_path, truth, CORONAL, "coronal", truth)
    cfg.run.serial = True
    _bad_reference(tmp_path, cfg, kind)
    with pytest.raises(error, match=message):
        run(cfg)
    assert not (tmp_path / "out").exists()


def test_the_job_takes_the_reference_as_an_override(tmp_path: Path) -> None:
    register_configs()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        assert OmegaConf.to_object(compose("config")).interpolation.reference is None
        cfg = compose("config", overrides=["model=dis", "interpolation.reference=/data/nissl.npy"])
        assert OmegaConf.to_object(cfg).interpolation.reference == "/data/nissl.npy"
    done = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "interpolate.py"), "model=dis",
         f"interpolation.reference={tmp_path / 'nissl.npy'}", f"output.root={tmp_path / 'out'}"],
        cwd=tmp_path, env={**os.environ, "RAY_AUTH_MODE": "disabled"},
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert "interpolation.reference" in done.stdout + done.stderr
    assert not (tmp_path / "out").exists()


def test_fusion_takes_an_nrrd_reference_end_to_end(tmp_path: Path) -> None:
    import nrrd

    truth = real_volume()
    cfg = _setup(tmp_path, truth, CORONAL, "coronal", truth)
    nrrd.write(str(tmp_path / "nissl.nrrd"), truth)
    cfg.interpolation.reference = str(tmp_path / "nissl.nrrd")
    cfg.model.name, cfg.model.params = "fusion", {"members": ["dis"]}
    np.savez(tmp_path / "truth.npz", volume=truth)
    cfg.data.truth = {"gene": str(tmp_path / "truth.npz")}
    cfg.run.serial = True
    summary = run(cfg)
    assert summary.ok, summary.failures
    scores = summary.scores["gene"]
    assert scores["model"]["psnr"] > scores["linear"]["psnr"] + 2, scores
    _, provenance = _output(tmp_path, "coronal")
    by_slice = {p["slice"]: p for p in provenance}
    assert by_slice[13]["known"] == [10, 18] and by_slice[13]["context"] == [2, 26]
    assert by_slice[13]["reference"] == cfg.interpolation.reference
    assert by_slice[13]["model"] == "fusion"
    assert len(list((tmp_path / "out" / "_reference").glob("nissl-*.npy"))) == 1
    assert run(cfg).tasks_skipped == summary.tasks_total  # resumes beside the cache
