"""The Hydra job as users run it: overrides, many genes, exit codes, no leaked secrets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from atlinter_ray.cli import conf_dir, register_configs
from atlinter_ray.config import Config
from atlinter_ray.testing.datasets import real_volume, sections_of, write_dataset

REPO = Path(__file__).resolve().parents[1]


def _job(*overrides: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    return subprocess.run(
        [sys.executable, str(REPO / "jobs" / "interpolate.py"), *overrides],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
    )


def test_configs_compose_for_every_group_choice() -> None:
    register_configs()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        for model in ("dis", "farneback", "deepflow", "tvl1", "linear"):
            cfg = compose("config", overrides=[f"model={model}", "resources=gpu_cluster", "storage=s3"])
            obj = OmegaConf.to_object(cfg)
            assert isinstance(obj, Config) and obj.model.name == model
        assert obj.resources.gpus_per_worker == 1 and obj.output.root.startswith("s3://")
        default = OmegaConf.to_object(compose("config"))
        assert default.model.name == "dis" and default.data.genes == ["mni152_t1"]
        assert Path(default.data.root, "mni152_t1.npy").is_file()


def test_documented_model_options_override_without_plus() -> None:
    """``model.params.<option>=...`` works for every option a config group lists."""
    register_configs()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        for overrides, key, value in (
            (["model=dis", "model.params.preset=fast"], "preset", "fast"),
            (["model=rife_v4", "model.params.scale=0.5"], "scale", 0.5),
            (["model=fusion", "model.params.tune=true"], "tune", True),
            (["model=raft", "model.params.precision=bf16"], "precision", "bf16"),
        ):
            cfg = OmegaConf.to_object(compose("config", overrides=overrides))
            assert cfg.model.params[key] == value, overrides


@pytest.mark.slow
def test_default_job_on_the_sample_scores_against_truth(tmp_path: Path) -> None:
    secret = "do-not-print-this-secret"
    done = _job(f"output.root={tmp_path / 'vol'}", "run.serial=true", "run.progress=false",
                f"+output.storage_options.secret={secret}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "tasks: 6 (done 6, skipped 0, failed 0, retried 0)" in done.stdout  # 16-slice slabs
    assert "datasets: 1 (complete 1, incomplete 0, skipped 0)" in done.stdout
    lines = [ln for ln in done.stdout.splitlines() if "vs held-out truth" in ln]
    assert len(lines) == 2
    psnr = {ln.split(",")[1].split(":")[0].strip(): float(ln.split("PSNR")[1].split("dB")[0]) for ln in lines}
    assert psnr["model"] > psnr["linear"] > 15
    assert all(ln.endswith("(66 slices, gap 4)") for ln in lines), lines  # a score says its gap
    vol = tmp_path / "vol"
    for what, path in (("mni152_t1 quicklook", "mni152_t1.quicklook.png"),
                       ("mni152_t1 montage", "mni152_t1.montage.png"),
                       ("run summary", "run_summary.json")):  # every file written is named
        assert f"wrote {what}: {vol / path}" in done.stdout
        assert (vol / path).is_file()
    summary = (tmp_path / "vol" / "run_summary.json").read_text()
    assert secret not in summary and secret not in done.stdout + done.stderr
    assert json.loads(summary)["config"]["output"]["storage_options"]["secret"] == "***"
    assert not (tmp_path / ".hydra").exists() and not list(tmp_path.glob("outputs"))


@pytest.mark.slow
def test_many_genes_from_a_manifest_on_ray(tmp_path: Path) -> None:
    volume = real_volume()
    urls = []
    for name, sections in (("geneA", [2, 10, 18, 30, 44]), ("geneB", [5, 9, 40, 70])):
        urls.append(str(write_dataset(tmp_path / "data", name, sections_of(volume, sections, "coronal"),
                                      sections, reference_shape=list(volume.shape))))
    manifest = tmp_path / "genes.txt"
    manifest.write_text("# two experiments\n" + "\n".join(urls) + "\n")
    done = _job("data=allen", f"data.manifest={manifest}", "model=farneback",
                f"output.root={tmp_path / 'vol'}", "resources.local_cpus=2", "run.progress=false",
                cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "datasets: 2" in done.stdout and "failed 0" in done.stdout
    for name in ("geneA", "geneB"):
        assert (tmp_path / "vol" / f"{name}.ome.zarr" / "zarr.json").is_file()
        assert (tmp_path / "vol" / f"{name}.quicklook.png").is_file()


def test_bad_input_exits_nonzero_with_a_clear_message_and_writes_nothing(tmp_path: Path) -> None:
    write_dataset(tmp_path / "data", "bad", np.zeros((3, 79, 77), np.uint8), [1, 5, 5],
                  reference_shape=[91, 79, 77])
    done = _job("data=allen", f"data.root={tmp_path / 'data'}", "data.genes=[bad]",
                f"output.root={tmp_path / 'vol'}", "run.serial=true", cwd=tmp_path)
    assert done.returncode == 2
    assert "bad.json: field 'section_numbers': duplicate section numbers [5]" in done.stderr + done.stdout
    assert not (tmp_path / "vol").exists()
    unknown = _job("model.name=nope", f"output.root={tmp_path / 'vol'}", "run.serial=true", cwd=tmp_path)
    assert unknown.returncode == 2 and "unknown model 'nope'" in unknown.stderr + unknown.stdout


def test_module_entry_point_is_the_same_app(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "atlinter_ray", "--cfg", "job", "model=linear"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "name: linear" in done.stdout and "placement: exact" in done.stdout
