"""The view job: links and commands it prints, its HTTP server, and a real neuroglancer.

The neuroglancer test opens a real output (the pipeline run in-process on a real
volume) with the client from the ``neuroglancer`` package, in Debian's headless
Chromium (``apt-get install chromium chromium-driver``, as ``.ci/run`` does), and
checks the voxel size in the viewer's state and that the rendered panels show data.
"""

from __future__ import annotations

import json
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

from atlinter_ray.config import Config
from atlinter_ray.errors import ConfigError
from atlinter_ray.pipeline import run
from atlinter_ray.testing.datasets import real_volume, sections_of, write_dataset
from atlinter_ray.view import (
    CLIENT_PREFIX,
    ViewServer,
    find_images,
    instructions,
    napari_command,
    neuroglancer_state,
    neuroglancer_url,
)

SECTIONS = [6, 14, 22, 31, 40, 48, 57, 66, 75, 84]


@pytest.fixture(scope="module")
def output(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An output folder with one finished image (2 mm voxels), made by the pipeline."""
    tmp = tmp_path_factory.mktemp("view")
    volume = real_volume(rgb=False)
    write_dataset(tmp / "in", "gene", sections_of(volume, SECTIONS, "coronal"), SECTIONS,
                  reference_shape=list(volume.shape[:3]), voxel_size_um=2000.0)
    cfg = Config()
    cfg.data.root, cfg.data.genes = str(tmp / "in"), ["gene"]
    cfg.output.root = str(tmp / "out")
    cfg.model.name, cfg.run.serial, cfg.run.progress = "linear", True, False
    assert run(cfg).ok
    return tmp / "out"


@pytest.fixture
def server(output: Path) -> Iterator[ViewServer]:
    srv = ViewServer(output).start()
    yield srv
    srv.close()


def test_links_name_every_image_and_the_napari_plugin(tmp_path: Path) -> None:
    url = neuroglancer_url("http://127.0.0.1:8000/neuroglancer/v/view/",
                           ["http://127.0.0.1:8000/data/a.ome.zarr/", "http://127.0.0.1:8000/data/b.ome.zarr"])
    client, state = url.split("#!", 1)
    assert client == "http://127.0.0.1:8000/neuroglancer/v/view/"
    layers = json.loads(urllib.parse.unquote(state))["layers"]
    assert [(layer["name"], layer["source"]) for layer in layers] == [
        ("a", "zarr3://http://127.0.0.1:8000/data/a.ome.zarr/"),
        ("b", "zarr3://http://127.0.0.1:8000/data/b.ome.zarr/")]
    assert neuroglancer_state([])["layers"] == []
    # the builtin reader loses the voxel size: the command must name the plugin
    expected = "napari --plugin napari-ome-zarr 'out dir/x.ome.zarr'"
    assert napari_command(Path("out dir/x.ome.zarr")) == expected


def test_find_images_refuses_what_holds_no_image(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such folder"):
        find_images(tmp_path / "missing")
    with pytest.raises(ConfigError, match=r"holds no <experiment>\.ome\.zarr"):
        find_images(tmp_path)
    (tmp_path / "b.ome.zarr").mkdir()
    (tmp_path / "a.ome.zarr").mkdir()
    assert find_images(tmp_path) == [tmp_path / "a.ome.zarr", tmp_path / "b.ome.zarr"]
    assert find_images(tmp_path / "a.ome.zarr") == [tmp_path / "a.ome.zarr"]


def test_server_serves_the_output_with_cors_and_nothing_else(server: ViewServer, output: Path) -> None:
    image = output / "gene.ome.zarr"
    with urllib.request.urlopen(server.image_url(image) + "zarr.json") as answer:
        assert answer.headers["Access-Control-Allow-Origin"] == "*"
        assert json.loads(answer.read()) == json.loads((image / "zarr.json").read_text())
    with urllib.request.urlopen(server.base_url + CLIENT_PREFIX) as answer:
        assert b"<html" in answer.read().lower()
    for outside in ("/", "/data/../../etc/passwd", "/other/zarr.json"):
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(server.base_url + outside)
        assert err.value.code == 404, outside
    text = instructions(server, [image])
    assert server.base_url + CLIENT_PREFIX + "#!" in text
    assert f"napari --plugin napari-ome-zarr {image}" in text


def _chrome(tmp_path: Path):  # type: ignore[no-untyped-def]
    """Debian's headless Chromium driven by selenium (flags that work without a display)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    assert browser and driver, "needs Debian's chromium and chromium-driver " \
        "(apt-get install -y chromium chromium-driver; .ci/run installs them)"
    options = Options()
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path / 'chromium'}", "--window-size=800,600"):
        options.add_argument(flag)
    options.binary_location = browser
    return webdriver.Chrome(options=options, service=Service(driver))


def _data_pixels(png: bytes) -> tuple[int, int]:
    """Grey pixels that are neither the panels' background nor black or white, and their levels."""
    image = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)[40:]  # below the top bar
    grey = (image[..., 0] == image[..., 1]) & (image[..., 1] == image[..., 2])
    values = image[..., 0][grey]
    background = np.bincount(values).argmax()
    data = values[(values != background) & (values > 8) & (values < 247)]
    return int(data.size), len(np.unique(data))


@pytest.mark.slow
def test_neuroglancer_in_chromium_shows_the_output_at_its_voxel_size(
        server: ViewServer, output: Path, tmp_path: Path) -> None:
    assert server.client is not None, "the neuroglancer package is not installed"
    url = neuroglancer_url(server.base_url + CLIENT_PREFIX, [server.image_url(output / "gene.ome.zarr")])
    browser = _chrome(tmp_path)
    try:
        browser.get(url)
        state: dict[str, object] = {}
        pixels = levels = 0
        for _ in range(120):  # a loaded machine can take a minute to render
            text = browser.execute_script(
                "return window.viewer ? JSON.stringify(window.viewer.state.toJSON()) : null")
            state = json.loads(text) if text else {}
            pixels, levels = _data_pixels(browser.get_screenshot_as_png())
            if "dimensions" in state and pixels > 3000 and levels > 100:
                break
            time.sleep(1)
        # 2000 µm voxels, as neuroglancer states them (metres), on every axis
        assert state.get("dimensions") == {a: [0.002, "m"] for a in "zyx"}, state
        # a blank panel has only its background, the bounds and text; data has many greys
        assert pixels > 3000 and levels > 100, (pixels, levels)
    finally:
        browser.quit()


def test_napari_ome_zarr_reads_our_scale_and_units(output: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """napari's OME-Zarr plugin (the reader `napari --plugin napari-ome-zarr` uses; no Qt needed)."""
    from napari_ome_zarr import napari_get_reader

    image = str(output / "gene.ome.zarr")
    reader = napari_get_reader(image)
    assert reader is not None
    ((data, kwargs, kind),) = reader(image)
    assert kind == "image" and [level.shape for level in data] == [(91, 79, 77), (46, 40, 39)]
    assert list(kwargs["scale"]) == [2000.0, 2000.0, 2000.0]
    assert tuple(kwargs["units"]) == ("micrometer",) * 3 and tuple(kwargs["axis_labels"]) == ("z", "y", "x")
    # the plugin prints the root attributes: the provenance stays out of them (sidecar)
    printed = capfd.readouterr().out
    assert "micrometer" in printed and '"status"' not in printed and "'status'" not in printed
