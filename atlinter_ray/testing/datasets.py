"""Small real-looking datasets in the predecessor's layout, for tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from atlinter_ray.dataset import Dataset
from atlinter_ray.identity import fingerprint
from atlinter_ray.layout import DEFAULT_LAYOUT, Layout
from atlinter_ray.sample import sample_truth
from atlinter_ray.store import ImageState, VolumeStore


def write_dataset(
    folder: Path,
    name: str,
    images: np.ndarray,
    section_numbers: list[int],
    axis: str = "coronal",
    **extra: Any,
) -> Path:
    """Write ``<folder>/<name>.npy`` + ``.json``; return the ``.npy`` path."""
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / f"{name}.npy", images)
    (folder / f"{name}.json").write_text(
        json.dumps({"section_numbers": section_numbers, "axis": axis, **extra})
    )
    return folder / f"{name}.npy"


def real_volume(rgb: bool = False) -> np.ndarray:
    """The bundled sample's true volume (91, 79, 77) uint8, or a tinted RGB version."""
    volume = sample_truth()
    if not rgb:
        return volume
    tint = np.array([1.0, 0.8, 0.55], dtype=np.float32)
    return np.clip(volume[..., None] * tint, 0, 255).astype(np.uint8)


def sample_on_s3(options: dict[str, Any], prefix: str, sections: list[int]) -> str:
    """The bundled sample (RGB, coronal) at ``sections`` as dataset ``g`` under
    ``s3://<prefix>`` (s3fs ``options``); return that folder's URL."""
    import s3fs

    fs = s3fs.S3FileSystem(**options, skip_instance_cache=True)
    volume = real_volume(rgb=True)
    with fs.open(f"{prefix}/g.npy", "wb") as f:
        np.save(f, sections_of(volume, sections, "coronal"))
    fs.pipe_file(f"{prefix}/g.json", json.dumps(
        {"section_numbers": sections, "axis": "coronal",
         "reference_shape": list(volume.shape[:3])}).encode())
    return f"s3://{prefix}"


def sections_of(volume: np.ndarray, sections: list[int], axis: str) -> np.ndarray:
    """Known sections of ``volume`` along ``axis``, in the predecessor's layout."""
    index = {"coronal": 0, "sagittal": 2}[axis]
    return np.stack([np.take(volume, s, axis=index) for s in sections])


def prepare_image(
    store: VolumeStore, ds: Dataset, dtype: str = "uint8", run_info: dict[str, Any] | None = None,
    layout: Layout = DEFAULT_LAYOUT,
) -> ImageState:
    """Create (or resume) ``ds``'s output image as the driver does, fingerprint included."""
    return store.prepare_image(ds, dtype, run_info or {"model": "linear"}, fingerprint(ds),
                               layout)
