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
from atlinter_ray.quicklook import ERROR_SCALE, STATUS_COLOURS, montage_gaps, montage_png
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


def _first_row_of(img: np.ndarray, colour: tuple[int, int, int], column: int) -> int:
    """The first row whose pixel at ``column`` has ``colour`` (BGR)."""
    return next(r for r in range(img.shape[0]) if tuple(int(v) for v in img[r, column]) == colour)


def test_montage_strips_one_gap_from_the_provenance(tmp_path: Path) -> None:
    store, name = _reconstruct(tmp_path, rgb=True)
    ds = load_dataset(str(tmp_path / "in" / name))
    provenance = store.image_attrs(name)["atlinter_ray"]["provenance"]
    assert montage_gaps(provenance) == list(zip(SECTIONS, SECTIONS[1:]))
    png = montage_png(store, ds, date="2026-01-02")  # default: the gap nearest the middle, 40 -> 48
    img = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    tiles = 48 - 40 + 1
    tile_w = (img.shape[1] + 8) // tiles
    assert tile_w * tiles - 8 == img.shape[1] and tile_w - 8 == 77 * 3  # zoomed x3, gaps of 8
    top = _first_row_of(img, STATUS_COLOURS[MEASURED], 5)  # below the title and the legend
    assert top > 40
    bars = [tuple(int(v) for v in img[top + 2, i * tile_w + 5]) for i in range(tiles)]
    assert bars == [STATUS_COLOURS[MEASURED]] + [STATUS_COLOURS[PREDICTED]] * 7 + [STATUS_COLOURS[MEASURED]]
    last = img[top + 18:, (tiles - 1) * tile_w :][40:, :, ::-1]  # the right measured section, RGB
    truth = real_volume(rgb=True)[48].repeat(3, 0).repeat(3, 1)
    np.testing.assert_array_equal(last, truth[40:])  # below the label
    assert img.shape[0] == top + 18 + truth.shape[0]  # no truth given: one row
    first = montage_png(store, ds, left=6)
    assert cv2.imdecode(np.frombuffer(first, np.uint8), cv2.IMREAD_COLOR).shape[1] == 9 * tile_w - 8
    with pytest.raises(ConfigError, match=r"choose one of \[6, 14"):
        montage_png(store, ds, left=7)


def test_montage_with_truth_adds_the_true_slices_and_the_error(tmp_path: Path) -> None:
    store, name = _reconstruct(tmp_path, rgb=False)
    ds = load_dataset(str(tmp_path / "in" / name))
    volume = real_volume(rgb=False)
    png = montage_png(store, ds, truth=volume)
    img = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    tile_h, tile_w = 79 * 3, 77 * 3  # 40 -> 48, zoomed x3
    top = _first_row_of(img, STATUS_COLOURS[MEASURED], 5) + 18  # first tile row, below its bars
    truth_top, error_top = top + tile_h + 8, top + 2 * (tile_h + 8)
    # the truth row holds the true slices (below the row's label), grey as BGR
    step = tile_w + 8
    for k, s in enumerate(range(40, 49)):
        shown = img[truth_top + 40 : truth_top + tile_h, k * step : k * step + tile_w, 0]
        np.testing.assert_array_equal(shown, volume[s].repeat(3, 0).repeat(3, 1)[40:])
    # the error of a measured section is 0; of a predicted one, |pred - truth| on the scale
    zero = cv2.applyColorMap(np.zeros((1, 1), np.uint8), cv2.COLORMAP_INFERNO)[0, 0]
    measured = img[error_top + 40 : error_top + tile_h, 8 * step : 8 * step + tile_w]
    assert (measured == zero).all()
    predicted = store.read_volume(name)[44].astype(float)
    level = np.clip(np.abs(predicted - volume[44]) * 255 / (ERROR_SCALE * 255), 0, 255).astype(np.uint8)
    expected = cv2.applyColorMap(level, cv2.COLORMAP_INFERNO).repeat(3, 0).repeat(3, 1)
    np.testing.assert_array_equal(img[error_top + 40 : error_top + tile_h, 4 * step : 4 * step + tile_w],
                                  expected[40:])
    assert img.shape[0] > error_top + tile_h  # the colour bar below


def test_montage_refuses_an_unfinished_image(tmp_path: Path) -> None:
    volume = real_volume()
    write_dataset(tmp_path / "in", "g", sections_of(volume, SECTIONS, "coronal"), SECTIONS,
                  reference_shape=list(volume.shape))
    ds = load_dataset(str(tmp_path / "in" / "g"))
    store = VolumeStore(str(tmp_path / "out"))
    prepare_image(store, ds)
    with pytest.raises(StoreError, match="rerun the same interpolation command"):
        montage_png(store, ds)


def test_quicklook_has_a_title_a_legend_and_a_scale_bar(tmp_path: Path) -> None:
    from atlinter_ray.quicklook import _length, _nice_length, title

    store, name = _reconstruct(tmp_path, rgb=False, voxel_size_um=2000.0)
    ds = load_dataset(str(tmp_path / "in" / name))
    assert title(ds, "linear", "2026-01-02") == "graygene  |  model linear  |  2026-01-02"
    img = cv2.imread(str(tmp_path / "out" / f"{name}.quicklook.png"))
    head = img[:46]
    for colour in STATUS_COLOURS.values():  # the legend's squares
        assert (head == colour).all(axis=-1).sum() >= 100, colour
    # the first (coronal) view: 77 x 79 voxels of 2 mm, zoomed x3; a white scale bar of
    # 20 mm (30 px) sits in its bottom right corner
    view = img[-79 * 3:, : 77 * 3]
    white = (view == 255).all(axis=-1)
    rows = np.flatnonzero(white[:, -45:].sum(axis=1) == 31)
    assert len(rows) == 4, rows  # a 4-px bar spanning 20 mm / (2000 µm / 3) = 30 px (+1)
    assert _nice_length(38_500) == 20_000 and _nice_length(900) == 500
    assert (_length(500), _length(20_000), _length(2_250)) == ("500 µm", "20 mm", "2.25 mm")
