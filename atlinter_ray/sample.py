"""The bundled sample dataset: sparse "coronal" sections of the MNI152 2009a T1 template.

A real volume small enough to ship in the wheel, used as the Quick start's default
input and as held-out truth in tests. ``atlinter_ray/sample/`` holds, in the
predecessor's layout plus our ``reference_shape`` field:

- ``mni152_t1.npy``: known sections, ``(n, D1, D2)`` uint8;
- ``mni152_t1.json``: ``section_numbers``, ``axis`` ("coronal"), ``reference_shape``;
- ``mni152_t1_truth.npz``: the whole volume ``(D0, D1, D2)`` uint8, key ``volume``;
- ``LICENSE_MNI152.txt``: the template's licence and attribution.

The volume is oriented like the CCF (axis 0 anterior->posterior, axis 1 dorsal->ventral,
axis 2 left->right), 2 mm voxels, with one known section every 4 slices. It is built
by ``scripts/make_sample.py``.

Example::

    >>> import numpy as np
    >>> from atlinter_ray.sample import sample_dataset_path, sample_truth
    >>> sections = np.load(sample_dataset_path())
    >>> sample_truth().shape[1:] == sections.shape[1:]
    True
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

import numpy as np

from atlinter_ray.errors import DatasetNotFoundError

SAMPLE_NAME = "mni152_t1"


def _sample_file(name: str) -> Path:
    """Return the on-disk path of one bundled sample file, or raise a clear error."""
    resource = files("atlinter_ray") / "sample" / name
    path = Path(str(resource))
    if not path.is_file():
        raise DatasetNotFoundError(
            f"bundled sample file {path} is missing; reinstall atlinter_ray from a "
            "checkout or wheel that includes package data (atlinter_ray/sample/*), or "
            "regenerate it with `python scripts/make_sample.py`"
        )
    return path


def sample_dataset_path() -> str:
    """Return the path of the bundled sample's section images (``mni152_t1.npy``)."""
    return str(_sample_file(f"{SAMPLE_NAME}.npy"))


def sample_metadata_path() -> str:
    """Return the path of the bundled sample's metadata (``mni152_t1.json``)."""
    return str(_sample_file(f"{SAMPLE_NAME}.json"))


def sample_truth() -> np.ndarray:
    """Return the sample's whole volume ``(D0, D1, D2)`` uint8, the held-out truth."""
    with np.load(_sample_file(f"{SAMPLE_NAME}_truth.npz")) as archive:
        volume: np.ndarray = archive["volume"]
        return volume
