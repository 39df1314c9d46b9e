"""The align job: outputs the interpolation job reads, resume, bad input, Ray."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest

from atlinter_ray.align.config import AlignConfig, AlignOutputConfig, RegistrationConfig, Transform
from atlinter_ray.align.job import run_align
from atlinter_ray.align.registration import apply_field, fill_values
from atlinter_ray.config import DataConfig, ResourcesConfig, RunConfig
from atlinter_ray.dataset import load_dataset
from atlinter_ray.dtypes import to_dtype
from atlinter_ray.errors import DatasetError, DatasetNotFoundError, StoreError
from atlinter_ray.testing.align_data import reference_volume, residual, write_misaligned
from atlinter_ray.testing.datasets import write_dataset

GENES = ["cor_grey", "cor_rgb", "sag_grey"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Three misaligned experiments of the sample volume and the volume as the Nissl."""
    root = tmp_path_factory.mktemp("align-inputs")
    volume = reference_volume()
    np.save(root / "nissl.npy", volume)
    fields = {
        "cor_grey": write_misaligned(root, "cor_grey", volume, "coronal", [30, 45, 60], seed=1),
        "cor_rgb": write_misaligned(root, "cor_rgb", volume, "coronal", [40, 50], rgb=True, seed=5),
        "sag_grey": write_misaligned(root, "sag_grey", volume, "sagittal", [30, 38], seed=9),
    }
    return {"root": root, "volume": volume, "fields": fields}


def _config(inputs: dict, out: Path, genes=GENES, serial=True, **registration) -> AlignConfig:
    return AlignConfig(
        data=DataConfig(root=str(inputs["root"]), genes=list(genes)),
        reference=str(inputs["root"] / "nissl.npy"),
        registration=RegistrationConfig(**registration),
        output=AlignOutputConfig(root=str(out)),
        resources=ResourcesConfig(max_workers=2, local_cpus=2),
        run=RunConfig(serial=serial, progress=False),
    )


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != "align_summary.json"}


@pytest.fixture(scope="module")
def aligned(inputs: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("aligned")
    summary = run_align(_config(inputs, out))
    return {"out": out, "summary": summary, "files": _files(out)}


def test_every_experiment_is_aligned_in_the_layout_the_interpolation_job_reads(
    inputs: dict, aligned: dict
) -> None:
    out, summary = aligned["out"], aligned["summary"]
    assert summary.ok and summary.count("done") == 3
    for gene in GENES:
        ds_in = load_dataset(str(inputs["root"] / gene))
        ds_out = load_dataset(str(out / gene))
        assert (ds_out.section_numbers, ds_out.axis, ds_out.dtype, ds_out.channels) == (
            ds_in.section_numbers, ds_in.axis, ds_in.dtype, ds_in.channels)
        meta = json.loads((out / f"{gene}.json").read_text())
        record = meta["alignment"]
        assert [s["status"] for s in record["sections"]] == ["registered"] * len(ds_in.section_numbers)
        sim = record["similarity"]
        assert sim["after"]["ncc"] > sim["before"]["ncc"] + 0.05
        assert sim["after"]["mi"] > sim["before"]["mi"]
        # the saved transforms undo the known deformation
        fields = np.load(out / "transforms" / f"{gene}.npy")
        volume = inputs["volume"]
        for k, s in enumerate(ds_in.section_numbers):
            axis = 0 if ds_in.axis == "coronal" else 2
            tissue = np.take(volume, s, axis=axis) > 12
            applied = inputs["fields"][gene][k]
            error = residual(fields[k], applied)[tissue].mean()
            assert error < 0.15 * np.hypot(applied[..., 0], applied[..., 1])[tissue].mean()
        picture = cv2.imdecode(np.frombuffer((out / "overlays" / f"{gene}.png").read_bytes(),
                                             np.uint8), cv2.IMREAD_COLOR)
        assert picture.shape[1] >= 4 * ds_in.image_shape[1]


def test_reapplying_the_saved_transforms_gives_the_aligned_bytes(inputs: dict, aligned: dict) -> None:
    out = aligned["out"]
    for gene in GENES:
        images = np.load(inputs["root"] / f"{gene}.npy")
        fields = np.load(out / "transforms" / f"{gene}.npy")
        again = []
        for image, field in zip(images, fields):
            chw = image[None] if image.ndim == 2 else np.moveaxis(image, -1, 0)
            moved = to_dtype(apply_field(chw, field, fill_values(chw, RegistrationConfig().fill)),
                             "uint8")
            again.append(moved[0] if image.ndim == 2 else np.moveaxis(moved, 0, -1))
        np.testing.assert_array_equal(np.stack(again), np.load(out / f"{gene}.npy"))


def test_a_rerun_skips_everything_and_changes_no_byte(inputs: dict, aligned: dict) -> None:
    summary = run_align(_config(inputs, aligned["out"]))
    assert summary.count("skipped") == 3 and summary.count("done") == 0
    assert _files(aligned["out"]) == aligned["files"]
    saved = json.loads((aligned["out"] / "align_summary.json").read_text())
    assert saved["skipped"] == 3 and saved["experiments"][0]["similarity"]


@pytest.mark.slow
@pytest.mark.ray
def test_two_ray_workers_write_the_same_bytes_as_one_process(inputs: dict, aligned: dict,
                                                             tmp_path: Path, ray_cluster) -> None:
    cfg = _config(inputs, tmp_path, serial=False)
    # resources=gpu_cluster's per-actor request (4 CPUs, a GPU) does not fit this 2-CPU
    # cluster: align actors ask for one CPU and no GPU whatever the interpolation asks
    cfg.resources = replace(cfg.resources, cpus_per_worker=4, gpus_per_worker=1, start_timeout_s=60)
    summary = run_align(cfg)
    assert summary.count("done") == 3
    assert _files(tmp_path) == aligned["files"]


def test_a_nrrd_reference_aligns_like_the_same_volume_as_npy(inputs: dict, aligned: dict,
                                                              tmp_path: Path) -> None:
    import nrrd

    nrrd.write(str(tmp_path / "nissl.nrrd"), inputs["volume"], {"encoding": "gzip"})
    cfg = _config(inputs, tmp_path / "out", genes=["cor_rgb"])
    summary = run_align(replace(cfg, reference=str(tmp_path / "nissl.nrrd")))
    assert summary.ok
    converted = tmp_path / "out" / "reference" / "nissl.npy"
    np.testing.assert_array_equal(np.load(converted), inputs["volume"])
    assert (tmp_path / "out" / "cor_rgb.npy").read_bytes() == aligned["files"]["cor_rgb.npy"]
    assert summary.reference["npy"].endswith("reference/nissl.npy")


def test_a_section_beyond_the_reference_is_passed_through_and_recorded(
    inputs: dict, tmp_path: Path
) -> None:
    volume = inputs["volume"]
    images = np.load(inputs["root"] / "cor_grey.npy")
    write_dataset(tmp_path, "beyond", images, [30, 45, 95], reference_shape=list(volume.shape))
    cfg = _config(inputs, tmp_path / "out", genes=["beyond"])
    summary = run_align(replace(cfg, data=replace(cfg.data, root=str(tmp_path))))
    (result,) = summary.results
    assert result.status == "done" and result.registered == 2
    assert result.passed_through == ({"section": 95, "reason": "beyond the reference"},)
    out = np.load(tmp_path / "out" / "beyond.npy")
    np.testing.assert_array_equal(out[2], images[2])
    meta = json.loads((tmp_path / "out" / "beyond.json").read_text())
    assert meta["alignment"]["sections"][2] == {"section": 95, "status": "passed_through",
                                                "reason": "beyond the reference"}
    assert not np.load(tmp_path / "out" / "transforms" / "beyond.npy")[2].any()
    assert "section 95 passed through: beyond the reference" in summary.to_text()


def test_a_changed_input_is_aligned_again(inputs: dict, tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    for suffix in (".npy", ".json"):
        (src / f"cor_rgb{suffix}").write_bytes((inputs["root"] / f"cor_rgb{suffix}").read_bytes())
    cfg = _config(inputs, tmp_path / "out", genes=["cor_rgb"])
    cfg = replace(cfg, data=replace(cfg.data, root=str(src)))
    first = (run_align(cfg), (tmp_path / "out" / "cor_rgb.npy").read_bytes())
    images = np.load(src / "cor_rgb.npy")
    np.save(src / "cor_rgb.npy", images[::-1].copy())  # same shape, other content
    second = run_align(cfg)
    assert first[0].count("done") == 1 and second.count("done") == 1
    assert (tmp_path / "out" / "cor_rgb.npy").read_bytes() != first[1]


def test_other_settings_are_refused_unless_overwrite(inputs: dict, aligned: dict) -> None:
    cfg = _config(inputs, aligned["out"], transform=Transform.affine)
    with pytest.raises(StoreError, match=r"other settings: cor_grey \(differs in .*transform"):
        run_align(cfg)
    assert _files(aligned["out"]) == aligned["files"]


def test_overwrite_aligns_again_with_the_new_settings(inputs: dict, aligned: dict,
                                                      tmp_path: Path) -> None:
    for name, data in aligned["files"].items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
    cfg = _config(inputs, tmp_path, genes=["cor_grey"], transform=Transform.affine)
    summary = run_align(replace(cfg, output=replace(cfg.output, overwrite=True)))
    assert summary.count("done") == 1
    meta = json.loads((tmp_path / "cor_grey.json").read_text())
    assert meta["alignment"]["settings"]["transform"] == "affine"


@pytest.mark.parametrize("problem", ["shape", "missing", "garbage_nrrd", "dataset"])
def test_bad_input_is_refused_before_any_work(inputs: dict, tmp_path: Path, problem: str) -> None:
    cfg = _config(inputs, tmp_path / "out")
    if problem == "shape":
        np.save(tmp_path / "small.npy", inputs["volume"][:, :40])
        cfg = replace(cfg, reference=str(tmp_path / "small.npy"))
        error, match = DatasetError, r"small.npy: field 'reference': volume shape \(91, 40, 77\)"
    elif problem == "missing":
        cfg = replace(cfg, reference=str(tmp_path / "absent.nrrd"))
        error, match = DatasetNotFoundError, "absent.nrrd"
    elif problem == "garbage_nrrd":
        (tmp_path / "bad.nrrd").write_bytes(b"NRRD0004\ntype: float\nsizes: 1 2\n\x00\x01garbage")
        cfg = replace(cfg, reference=str(tmp_path / "bad.nrrd"))
        error, match = DatasetError, "bad.nrrd"
    else:
        (tmp_path / "in").mkdir()
        (tmp_path / "in" / "broken.npy").write_bytes(b"not an npy file")
        (tmp_path / "in" / "broken.json").write_text('{"section_numbers": [1, 2], "axis": "coronal"}')
        cfg = replace(cfg, data=replace(cfg.data, root=str(tmp_path / "in"), genes=["broken"]))
        error, match = DatasetError, "broken.npy: unreadable"
    with pytest.raises(error, match=match):
        run_align(cfg)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.json"))


_JOB = [sys.executable, "-m", "atlinter_ray.align"]


@pytest.mark.slow
def test_a_killed_run_resumes_and_ends_with_the_same_bytes(inputs: dict, tmp_path: Path) -> None:
    volume = reference_volume((91, 160, 228))  # larger sections: a run long enough to kill
    src = tmp_path / "in"
    src.mkdir()
    np.save(src / "nissl.npy", volume)
    genes = [f"g{i}" for i in range(4)]
    for i, gene in enumerate(genes):
        write_misaligned(src, gene, volume, "coronal", [30 + 5 * i, 50 + 5 * i], rgb=i % 2 == 1, seed=i)
    args = [f"data.root={src}", f"data.genes=[{','.join(genes)}]", f"reference={src}/nissl.npy",
            "run.serial=true", "run.progress=false"]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    clean = subprocess.run([*_JOB, *args, f"output.root={tmp_path / 'clean'}"], env=env,
                           capture_output=True, text=True, timeout=600)
    assert clean.returncode == 0, clean.stderr
    out = tmp_path / "killed"
    proc = subprocess.Popen([*_JOB, *args, f"output.root={out}"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not list(out.glob("g*.json")) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    complete_at_kill = len(list(out.glob("g*.json")))
    assert 1 <= complete_at_kill < len(genes), "the kill must land mid-run"
    rerun = subprocess.run([*_JOB, *args, f"output.root={out}"], env=env, capture_output=True,
                           text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    summary = json.loads((out / "align_summary.json").read_text())
    assert summary["skipped"] == complete_at_kill
    assert summary["aligned"] == len(genes) - complete_at_kill
    assert _files(out) == _files(tmp_path / "clean")
    assert not list(out.rglob(".*tmp-*"))


def test_the_command_line_exits_2_on_bad_input_and_writes_nothing(inputs: dict, tmp_path: Path) -> None:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    done = subprocess.run(
        [*_JOB, f"data.root={inputs['root']}", "data.genes=[cor_grey]",
         f"reference={tmp_path}/nope.npy", f"output.root={tmp_path / 'out'}", "run.serial=true"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 2, done.stderr
    assert "nope.npy" in done.stderr
    assert not any((tmp_path / "out").rglob("*.json")) if (tmp_path / "out").exists() else True


def test_inputs_reference_and_output_on_s3(inputs: dict, aligned: dict, tmp_path: Path,
                                           s3_server: dict) -> None:
    import fsspec
    import nrrd

    fs = fsspec.filesystem("s3", **s3_server)
    for suffix in (".npy", ".json"):
        fs.pipe_file(f"atlas-in/align/cor_rgb{suffix}", (inputs["root"] / f"cor_rgb{suffix}").read_bytes())
    nrrd.write(str(tmp_path / "nissl.nrrd"), inputs["volume"], {"encoding": "gzip"})
    fs.put_file(str(tmp_path / "nissl.nrrd"), "atlas-in/align/nissl.nrrd")
    cfg = AlignConfig(
        data=DataConfig(root="s3://atlas-in/align", genes=["cor_rgb"], storage_options=s3_server),
        reference="s3://atlas-in/align/nissl.nrrd",
        output=AlignOutputConfig(root="s3://atlas-out/aligned", storage_options=s3_server),
        run=RunConfig(serial=True, progress=False),
    )
    summary = run_align(cfg)
    assert summary.count("done") == 1
    assert fs.cat_file("atlas-out/aligned/cor_rgb.npy") == aligned["files"]["cor_rgb.npy"]
    assert fs.cat_file("atlas-out/aligned/transforms/cor_rgb.npy") == aligned["files"][
        "transforms/cor_rgb.npy"]
    assert "testing-secret-value" not in fs.cat_file("atlas-out/aligned/align_summary.json").decode()
    fs.invalidate_cache()
    assert run_align(cfg).count("skipped") == 1
