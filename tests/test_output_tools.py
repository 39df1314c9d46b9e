"""Outputs open in the field's tools (ome-zarr's reader) and draw as a montage of one gap."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import zarr

from atlinter_ray.config import Config
from atlinter_ray.dataset import load_dataset
from atlinter_ray.errors import ConfigError, StoreError
from atlinter_ray.pipeline import run
from atlinter_ray.planning import MEASURED, PREDICTED
from atlinter_ray.quicklook import STATUS_COLOURS, montage_gaps, montage_png
from atlinter_ray.store import VolumeStore
from atlinter_ray.testing.datasets import prepare_image, real_volume, sections_of, write_dataset

SECTIONS = [6, 14, 22, 31, 40, 48, 57, 66, 75, 84]


def _reconstruct(tmp_path: Path, rgb: bool, **meta: object) -> tuple[VolumeStore, str]:
    """Run the main pipeline in-process with ``linear``; return its store and the image id."""
    volume = real_volume(rgb=rgb)
    name = "rgbgene" if rgb else "graygene"
    write_dataset(tmp_path / "in", name, sections_of(volume, SECTIONS, "coronal"), SECTIONS,
                  reference_shape=list(volume.shape[:3]), **meta)
    cfg = Config()
    cfg.data.root, cfg.data.genes = str(tmp_path / "in"), [name]
    cfg.output.root = str(tmp_path / "out")
    cfg.model.name, cfg.run.serial, cfg.run.progress = "linear", True, False
    assert run(cfg).ok
    return VolumeStore(cfg.output.root), name


@pytest.mark.parametrize("rgb", [False, True])
def test_ome_zarr_reader_opens_the_output(tmp_path: Path, rgb: bool) -> None:
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Multiscales, Reader
    from ome_zarr_models.v05 import Image

    store, name = _reconstruct(tmp_path, rgb, voxel_size_um=2000.0)
    location = parse_url(store.image_url(name))
    assert location is not None and location.version == "0.5"
    node = next(iter(Reader(location)()))
    assert any(isinstance(spec, Multiscales) for spec in node.specs)
    space = [{"name": n, "type": "space", "unit": "micrometer"} for n in "zyx"]
    axes = [{"name": "c", "type": "channel"}, *space] if rgb else space
    assert node.metadata["axes"] == axes
    lead = [1.0] if rgb else []
    assert node.metadata["coordinateTransformations"] == [
        [{"type": "scale", "scale": lead + [2000.0] * 3}],
        [{"type": "scale", "scale": lead + [4000.0] * 3},
         {"type": "translation", "translation": [0.0] * len(lead) + [1000.0] * 3}],
    ]
    expected = (3, 91, 79, 77) if rgb else (91, 79, 77)
    assert len(node.data) == 2 and node.data[0].shape == expected  # a pyramid: 91 > 64
    assert node.data[1].shape == expected[:-3] + (46, 40, 39)
    full = store.read_volume(name)
    np.testing.assert_array_equal(np.asarray(node.data[0]), full)
    # level 1 is the 2x2x2 mean of level 0 (compared where the blocks are whole)
    even = full[..., :90, :78, :76].astype(float)
    means = even.reshape(*even.shape[:-3], 45, 2, 39, 2, 38, 2).mean(axis=(-5, -3, -1))
    np.testing.assert_array_equal(np.asarray(node.data[1])[..., :45, :39, :38], np.rint(means))
    if rgb:
        assert node.metadata["channel_names"] == ["red", "green", "blue"]
    # the same image against the OME-Zarr 0.5 schema (pydantic models of the spec)
    image = Image.from_zarr(zarr.open_group(store.image_url(name), mode="r"))
    assert [a.name for a in image.attributes.ome.multiscales[0].axes] == [a["name"] for a in axes]


def test_montage_strips_one_gap_from_the_provenance(tmp_path: Path) -> None:
    store, name = _reconstruct(tmp_path, rgb=True)
    ds = load_dataset(str(tmp_path / "in" / name))
    provenance = store.image_attrs(name)["atlinter_ray"]["provenance"]
    assert montage_gaps(provenance) == list(zip(SECTIONS, SECTIONS[1:]))
    png = montage_png(store, ds)  # default: the gap nearest the middle, 40 -> 48
    img = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    tiles = 48 - 40 + 1
    tile_w = (img.shape[1] + 8) // tiles
    assert tile_w * tiles - 8 == img.shape[1] and tile_w - 8 == 77 * 3  # zoomed x3, gaps of 8
    bars = [tuple(int(v) for v in img[2, i * tile_w + 5]) for i in range(tiles)]
    assert bars == [STATUS_COLOURS[MEASURED]] + [STATUS_COLOURS[PREDICTED]] * 7 + [STATUS_COLOURS[MEASURED]]
    last = img[18:, (tiles - 1) * tile_w :][40:, :, ::-1]  # the right measured section, RGB
    truth = real_volume(rgb=True)[48].repeat(3, 0).repeat(3, 1)
    np.testing.assert_array_equal(last, truth[40:])  # below the label
    first = montage_png(store, ds, left=6)
    assert cv2.imdecode(np.frombuffer(first, np.uint8), cv2.IMREAD_COLOR).shape[1] == 9 * tile_w - 8
    with pytest.raises(ConfigError, match=r"choose one of \[6, 14"):
        montage_png(store, ds, left=7)


def test_montage_refuses_an_unfinished_image(tmp_path: Path) -> None:
    volume = real_volume()
    write_dataset(tmp_path / "in", "g", sections_of(volume, SECTIONS, "coronal"), SECTIONS,
                  reference_shape=list(volume.shape))
    ds = load_dataset(str(tmp_path / "in" / "g"))
    store = VolumeStore(str(tmp_path / "out"))
    prepare_image(store, ds)
    with pytest.raises(StoreError, match="rerun the same interpolation command"):
        montage_png(store, ds)
