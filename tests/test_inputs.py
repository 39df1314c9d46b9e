"""Hundreds of datasets: validated in parallel, every bad one listed, or skipped on request."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import s3fs

from atlinter_ray.config import Config, DataConfig
from atlinter_ray.errors import DatasetError, StorageError
from atlinter_ray.identity import fingerprint
from atlinter_ray.inputs import load_inputs
from atlinter_ray.pipeline import run
from atlinter_ray.testing.datasets import real_volume, sections_of, write_dataset

SECTIONS = [4, 20, 40, 60, 86]


def _manifest(tmp_path: Path, good: int, bad: dict[str, str]) -> Path:
    volume = real_volume()
    urls = [str(write_dataset(tmp_path / "in", f"gene{i:03d}", sections_of(volume, SECTIONS, "coronal"),
                              SECTIONS, reference_shape=list(volume.shape)))
            for i in range(good)]
    for name, problem in bad.items():
        images = sections_of(volume, SECTIONS, "coronal")
        meta = {"section_numbers": SECTIONS, "axis": "coronal", "reference_shape": list(volume.shape)}
        if problem == "duplicate":
            meta["section_numbers"] = [4, 20, 20, 60, 86]
        np.save(tmp_path / "in" / f"{name}.npy", images)
        (tmp_path / "in" / f"{name}.json").write_text(json.dumps(meta))
        if problem == "missing":
            (tmp_path / "in" / f"{name}.npy").unlink()
        urls.append(str(tmp_path / "in" / f"{name}.npy"))
    manifest = tmp_path / "genes.txt"
    manifest.write_text("\n".join(urls) + "\n")
    return manifest


def test_every_invalid_dataset_is_listed_or_skipped_on_request(tmp_path: Path) -> None:
    manifest = _manifest(tmp_path, 30, {"dupes": "duplicate", "gone": "missing"})
    data = DataConfig(manifest=str(manifest))
    with pytest.raises(DatasetError) as refused:
        load_inputs(data)
    message = str(refused.value)
    assert message.startswith("2 of 32 datasets are invalid")
    assert "dupes.json: field 'section_numbers': duplicate section numbers [20]" in message
    assert "gone.npy: image file not found" in message and "data.skip_invalid=true" in message
    data.skip_invalid = True
    inputs = load_inputs(data)
    assert len(inputs.datasets) == 30 and set(inputs.skipped) == {
        str(tmp_path / "in" / "dupes.npy"), str(tmp_path / "in" / "gone.npy")}
    first = inputs.datasets[0]
    assert inputs.fingerprints[first.id] == fingerprint(first)  # parallel = one at a time


def test_skipped_datasets_are_reported_and_the_rest_complete(tmp_path: Path) -> None:
    cfg = Config()
    cfg.data.manifest = str(_manifest(tmp_path, 3, {"dupes": "duplicate"}))
    cfg.data.skip_invalid = True
    cfg.output.root, cfg.model.name = str(tmp_path / "out"), "linear"
    cfg.run.serial, cfg.run.progress = True, False
    summary = run(cfg)
    assert summary.ok and summary.complete == ["gene000", "gene001", "gene002"]
    assert list(summary.skipped_datasets) == [str(tmp_path / "in" / "dupes.npy")]
    assert "SKIPPED" in summary.to_text() and "duplicate section numbers" in summary.to_text()


@pytest.mark.parametrize("failing", ["gene1.npy", "gene1.json"])
def test_a_failing_store_is_never_taken_for_invalid_data(faulty_s3, tmp_path: Path,
                                                        failing: str) -> None:
    """skip_invalid skips bad datasets, not good ones the store failed to serve."""
    fs = s3fs.S3FileSystem(**faulty_s3.direct, skip_instance_cache=True)
    volume = real_volume()
    for i in range(3):
        write_dataset(tmp_path, f"gene{i}", sections_of(volume, SECTIONS, "coronal"), SECTIONS,
                      reference_shape=list(volume.shape))
    fs.put(str(tmp_path) + "/", f"atlas-in/{failing[:-4]}-down/", recursive=True)
    cfg = Config()
    cfg.data.root, cfg.data.genes = f"s3://atlas-in/{failing[:-4]}-down", ["gene0", "gene1", "gene2"]
    cfg.data.storage_options = {**faulty_s3.options,
                                "config_kwargs": {"retries": {"max_attempts": 1}}}
    cfg.data.skip_invalid = True
    cfg.output.root, cfg.model.name = str(tmp_path / "out"), "linear"
    cfg.run.serial, cfg.run.progress = True, False
    faulty_s3.proxy.add("503", path=rf"/{failing.replace('.', '[.]')}$")
    with pytest.raises(StorageError) as failed:
        run(cfg)
    message = str(failed.value)
    assert f"{cfg.data.root}/gene1" in message and "Service Unavailable" in message
    assert "rerun" in message and failed.value.exit_status == 1
    assert not (tmp_path / "out").exists()
