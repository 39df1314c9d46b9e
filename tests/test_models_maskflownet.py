"""MaskFlowNet in torch against the predecessor's MXNet MaskFlowNet, and the .params reader.

The oracle is real: mxnet 1.9.1 in an isolated venv (:mod:`tests.mxnet_env`) builds a
random-weight ``maskflownet.params`` with atlinter's own network code and saves it the
way the original was saved (``ParameterDict.save(strip_prefix=...)``, legacy Gluon
names; its size equals the original's 82,646,478 bytes), then runs atlinter's
``MaskFlowNet.preprocess_images`` + ``predict_flow`` on small image pairs. Our model
reads the same file with our own reader and must give the same flows within 1e-3 px.
"""

from __future__ import annotations

import hashlib
import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from atlinter_ray.errors import CheckpointError
from atlinter_ray.models import FlowEstimator, build_model
from atlinter_ray.models.maskflownet import (
    DeformConv2d,
    MaskFlownetNet,
    correlation,
    legacy_names,
    upsample,
    warp,
)
from atlinter_ray.models.mxnet_params import params_from_bytes, parse_ndarray_list, read_params
from atlinter_ray.testing.mxnet_env import run_oracle, write_ndarray_list

ORIGINAL_SIZE = 82_646_478  # bytes of atlinter's maskflownet.params (its DVC record)
ATOL, RTOL = 1e-3, 1e-4


def _smooth_pair(
    rng: np.random.Generator, h: int, w: int, channels: int
) -> tuple[np.ndarray, np.ndarray]:
    """Two uint8 HW(C) images: a blurred random texture and a shifted, rescaled copy."""
    noise = torch.from_numpy(rng.uniform(0, 1, (1, channels, h + 16, w + 16)).astype(np.float32))
    blurred = F.avg_pool2d(F.avg_pool2d(noise, 5, 1, 2), 5, 1, 2)[0].numpy()
    blurred = (blurred - blurred.min()) / (blurred.max() - blurred.min())
    a = np.rint(blurred[:, 8 : 8 + h, 8 : 8 + w] * 255).astype(np.uint8)
    b = np.rint(blurred[:, 5 : 5 + h, 10 : 10 + w] * 240 + 8).astype(np.uint8)
    if channels == 1:
        return a[0], b[0]
    return a.transpose(1, 2, 0), b.transpose(1, 2, 0)


def _cases() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Image pairs in atlinter's layout: (H, W) or (H, W, 3)."""
    rng = np.random.default_rng(7)
    a, b = _smooth_pair(rng, 64, 96, 3)  # resized to 64 x 128 inside
    g1, g2 = _smooth_pair(rng, 128, 128, 1)  # already a multiple of 64: no resize
    f1, f2 = _smooth_pair(rng, 70, 100, 1)
    return {
        "rgb": (a, b),
        "rgb_swapped": (b, a),
        "gray": (g1, g2),
        # floats in [0, 1]: atlinter truncates them to 8 bits first
        "float01": ((f1 / 255.0 * 0.93 + 0.011), (f2 / 255.0 * 0.97 + 0.004)),
    }


def _nchw(image: np.ndarray) -> np.ndarray:
    """One atlinter-layout image as our (1, C, H, W) float32 batch."""
    image = np.asarray(image, dtype=np.float32)
    return (image[None, None] if image.ndim == 2 else image.transpose(2, 0, 1)[None]).copy()


@pytest.fixture(scope="session")
def oracle(tmp_path_factory):
    """Random-weight params saved by mxnet, and the predecessor's flows for every case."""
    root = tmp_path_factory.mktemp("maskflownet")
    params = root / "maskflownet.params"
    run_oracle("make-params", str(params), "--seed", "3", "--flow-gain", "1.0")
    cases = _cases()
    arrays = {f"{k}_{n}": v for n, pair in cases.items() for k, v in zip("ab", pair)}
    np.savez(root / "cases.npz", **arrays)
    run_oracle("predict", str(params), str(root / "cases.npz"), str(root / "flows.npz"))
    flows = np.load(root / "flows.npz")
    return {"params": params, "cases": cases, "flows": {n: flows[n] for n in flows.files}}


@pytest.fixture(scope="session")
def model(oracle):
    """Our MaskFlowNet on the CPU, loaded from the mxnet-written file."""
    return build_model("maskflownet", checkpoint=str(oracle["params"]), device="cpu", batch_size=2)


@pytest.fixture(scope="session")
def mxnet_files(tmp_path_factory):
    """NDArray list files written by mxnet.nd.save, and the arrays they hold."""
    root = tmp_path_factory.mktemp("ndarrays")
    run_oracle("save-arrays", str(root))
    return root


# --- the .params reader, against files written by real mxnet -----------------------


@pytest.mark.slow
def test_reader_matches_mxnet_for_every_dtype(mxnet_files) -> None:
    arrays, digest = read_params(str(mxnet_files / "dict.params"))
    expected = np.load(mxnet_files / "dict.npz")
    assert sorted(arrays) == sorted(expected.files)
    for name in expected.files:
        assert arrays[name].dtype == expected[name].dtype, name
        assert arrays[name].shape == expected[name].shape, name
        np.testing.assert_array_equal(arrays[name], expected[name], err_msg=name)
    assert digest == hashlib.sha256((mxnet_files / "dict.params").read_bytes()).hexdigest()


@pytest.mark.slow
def test_reader_unnamed_list_and_numpy_shape_records(mxnet_files) -> None:
    names, arrays = parse_ndarray_list((mxnet_files / "list.params").read_bytes())
    expected = np.load(mxnet_files / "dict.npz")
    assert names == []
    np.testing.assert_array_equal(arrays[0], expected["f32"])
    np.testing.assert_array_equal(arrays[1], expected["conv"])
    with pytest.raises(CheckpointError, match="unnamed"):
        params_from_bytes((mxnet_files / "list.params").read_bytes())
    arrays, _ = read_params(str(mxnet_files / "npshape.params"))
    assert arrays["scalar"].shape == () and arrays["scalar"] == np.float32(3.5)
    assert arrays["empty"].shape == (0, 3)


@pytest.mark.slow
def test_test_writer_reproduces_mxnet_bytes(mxnet_files, tmp_path) -> None:
    expected = np.load(mxnet_files / "float32.npz")
    write_ndarray_list(tmp_path / "ours.params", {k: expected[k] for k in ("f32", "conv")})
    assert (tmp_path / "ours.params").read_bytes() == (mxnet_files / "float32.params").read_bytes()


@pytest.mark.slow
@pytest.mark.parametrize(
    "cut", [0, 5, 20, 30, 60, 200, -30, -3], ids=lambda c: f"cut{c}"
)
def test_reader_reports_truncated_files(mxnet_files, tmp_path, cut: int) -> None:
    data = (mxnet_files / "dict.params").read_bytes()
    path = tmp_path / "short.params"
    path.write_bytes(data[:cut] if cut >= 0 else data[:cut])
    with pytest.raises(CheckpointError, match="truncated"):
        read_params(str(path))


@pytest.mark.slow
def test_reader_reports_corrupt_files(mxnet_files, tmp_path) -> None:
    data = (mxnet_files / "dict.params").read_bytes()
    path = tmp_path / "bad.params"
    path.write_bytes(data + b"\x00\x01")
    with pytest.raises(CheckpointError, match="2 unexpected bytes"):
        read_params(str(path))
    path.write_bytes(struct.pack("<Q", 0x113) + data[8:])
    with pytest.raises(CheckpointError, match="not an MXNet NDArray list file"):
        read_params(str(path))
    path.write_bytes(data[:24] + struct.pack("<I", 0xF993FAC9) + struct.pack("<i", 2) + data[32:])
    with pytest.raises(CheckpointError, match="csr"):
        read_params(str(path))
    with pytest.raises(CheckpointError, match="file not found"):
        read_params(str(tmp_path / "absent.params"))


def test_reader_hints_at_torch_checkpoints(tmp_path) -> None:
    torch.save({"w": torch.zeros(2)}, tmp_path / "model.pth")
    with pytest.raises(CheckpointError, match="torch checkpoint"):
        read_params(str(tmp_path / "model.pth"))


# --- conformance with the predecessor -----------------------------------------------


@pytest.mark.slow
def test_original_layout_and_size(oracle) -> None:
    assert oracle["params"].stat().st_size == ORIGINAL_SIZE
    arrays, _ = read_params(str(oracle["params"]))
    assert set(arrays) == set(legacy_names(MaskFlownetNet()))
    assert len(arrays) == 270 and sum(a.size for a in arrays.values()) == 20_655_716


@pytest.mark.slow
@pytest.mark.parametrize("case", ["rgb", "gray"])
def test_flow_matches_predecessor(oracle, model, case: str) -> None:
    a, b = oracle["cases"][case]
    expected = oracle["flows"][case]
    ours = model.flow(_nchw(a), _nchw(b), peak=255.0)[0]
    assert ours.shape == expected.shape == (2, *a.shape[:2])
    assert np.abs(expected).max() > 2.0  # random flows of several pixels, both signs
    np.testing.assert_allclose(ours, expected, atol=ATOL, rtol=RTOL)


@pytest.mark.slow
def test_batched_pairs_match_predecessor(oracle, model) -> None:
    a, b = oracle["cases"]["rgb"]
    batch_a = np.concatenate([_nchw(a), _nchw(b)])
    batch_b = np.concatenate([_nchw(b), _nchw(a)])
    ours = model.flow(batch_a, batch_b, peak=255.0)
    np.testing.assert_allclose(ours[0], oracle["flows"]["rgb"], atol=ATOL, rtol=RTOL)
    np.testing.assert_allclose(ours[1], oracle["flows"]["rgb_swapped"], atol=ATOL, rtol=RTOL)


@pytest.mark.slow
def test_float_input_with_8bit_truncation_matches_predecessor(oracle) -> None:
    a, b = oracle["cases"]["float01"]
    quantized = build_model(
        "maskflownet", checkpoint=str(oracle["params"]), device="cpu", quantize_8bit=True
    )
    ours = quantized.flow(_nchw(a), _nchw(b), peak=1.0)[0]
    np.testing.assert_allclose(ours, oracle["flows"]["float01"], atol=ATOL, rtol=RTOL)
    assert quantized.provenance()["quantize_8bit"] is True


@pytest.mark.slow
def test_registry_and_provenance(oracle, model) -> None:
    assert isinstance(model, FlowEstimator)
    record = model.provenance()
    assert record["model"] == "maskflownet"
    assert record["checkpoint_sha256"] == hashlib.sha256(oracle["params"].read_bytes()).hexdigest()


# --- checkpoint mismatches -----------------------------------------------------------


@pytest.mark.slow
def test_mismatched_file_names_missing_and_unexpected_arrays(oracle, tmp_path) -> None:
    arrays, _ = read_params(str(oracle["params"]))
    arrays.pop("maskflownet_s0_deform5weight")
    arrays["maskflownet_s0_deform9weight"] = np.zeros((1,), np.float32)
    write_ndarray_list(tmp_path / "bad.params", arrays)
    with pytest.raises(CheckpointError) as info:
        build_model("maskflownet", checkpoint=str(tmp_path / "bad.params"), device="cpu")
    message = str(info.value)
    assert "1 missing arrays: maskflownet_s0_deform5weight" in message
    assert "1 unexpected arrays: maskflownet_s0_deform9weight" in message


@pytest.mark.slow
def test_misshaped_array_is_named(oracle, tmp_path) -> None:
    arrays, _ = read_params(str(oracle["params"]))
    arrays["dc_conv7bias"] = np.zeros((3,), np.float32)
    write_ndarray_list(tmp_path / "bad.params", arrays)
    with pytest.raises(CheckpointError, match=r"dc_conv7.bias \(file \(3,\), model \(2,\)\)"):
        build_model("maskflownet", checkpoint=str(tmp_path / "bad.params"), device="cpu")


@pytest.mark.slow
def test_save_parameters_names_load_the_same_weights(oracle, model, tmp_path) -> None:
    arrays, _ = read_params(str(oracle["params"]))
    mapping = legacy_names(MaskFlownetNet())
    write_ndarray_list(tmp_path / "new.params", {mapping[k]: v for k, v in arrays.items()})
    other = build_model("maskflownet", checkpoint=str(tmp_path / "new.params"), device="cpu")
    mine, theirs = model.module.state_dict(), other.module.state_dict()
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)


# --- the MXNet kernels, in plain torch -------------------------------------------------


def test_deformable_conv_with_zero_or_integer_offsets_is_a_shifted_conv() -> None:
    torch.manual_seed(0)
    layer = DeformConv2d(4)
    with torch.no_grad():
        layer.weight.normal_()
        layer.bias.normal_()
    x = torch.randn(2, 4, 7, 9)
    zero = torch.zeros(2, 2, 7, 9)
    expected = F.conv2d(x, layer.weight, layer.bias, padding=1)
    torch.testing.assert_close(layer(x, zero), expected, atol=1e-5, rtol=1e-5)
    # offset (dy, dx) = (1, -2): sample x at (y + 1, x - 2), zero outside
    shift = torch.zeros_like(zero)
    shift[:, 0], shift[:, 1] = 1.0, -2.0
    full = F.conv2d(F.pad(x, (3, 3, 3, 3)), layer.weight, layer.bias)
    expected = full[:, :, 2 + 1 : 2 + 1 + 7, 2 - 2 : 2 - 2 + 9]
    torch.testing.assert_close(layer(x, shift), expected, atol=1e-5, rtol=1e-5)


def test_deformable_conv_clamps_inside_the_last_row_and_zeroes_outside() -> None:
    layer = DeformConv2d(1)
    with torch.no_grad():
        layer.weight.zero_()
        layer.weight[0, 0, 1, 1] = 1.0  # centre tap only: output = the sample itself
    x = torch.arange(1.0, 21.0).view(1, 1, 4, 5)
    offset = torch.zeros(1, 2, 4, 5)
    offset[:, 0] = 0.5  # half a row down: the last row stays itself (DCN v1 rule)
    out = layer(x, offset)[0, 0]
    torch.testing.assert_close(out[:3], (x[0, 0, :3] + x[0, 0, 1:]) / 2)
    torch.testing.assert_close(out[3], x[0, 0, 3])
    offset[:, 0] = -0.5  # half a row up: the first row is outside, hence zero
    out = layer(x, offset)[0, 0]
    assert torch.all(out[0] == 0)
    torch.testing.assert_close(out[1:], (x[0, 0, :3] + x[0, 0, 1:]) / 2)


def test_correlation_channels_are_dy_major_and_divided_by_channels() -> None:
    torch.manual_seed(1)
    f1, f2 = torch.randn(1, 3, 5, 6), torch.randn(1, 3, 5, 6)
    out = correlation(f1, f2, md=2)
    assert out.shape == (1, 25, 5, 6)
    dy, dx = 1, -2
    channel = (dy + 2) * 5 + (dx + 2)
    y, x = 2, 3
    expected = (f1[0, :, y, x] * f2[0, :, y + dy, x + dx]).sum() / 3
    torch.testing.assert_close(out[0, channel, y, x], expected)
    assert out[0, channel, 4, 3] == 0  # y + dy is outside: zero


def test_upsample_interpolates_linearly_and_keeps_constants() -> None:
    x = torch.tensor([[[[0.0, 4.0], [8.0, 12.0]]]])
    up = upsample(x, 2)
    expected = torch.tensor(
        [
            [0.0, 2.0, 4.0, 4.0],
            [4.0, 6.0, 8.0, 8.0],
            [8.0, 10.0, 12.0, 12.0],
            [8.0, 10.0, 12.0, 12.0],
        ]
    )
    torch.testing.assert_close(up[0, 0], expected)
    constant = upsample(torch.full((1, 2, 3, 5), 7.0), 4)
    torch.testing.assert_close(constant, torch.full((1, 2, 12, 20), 7.0))


def test_warp_follows_opencv_convention() -> None:
    image = torch.arange(20.0).view(1, 1, 4, 5)
    flow = torch.zeros(1, 2, 4, 5)
    flow[:, 1] = 1.0  # dx = +1: output(x) = image(x + 1), zero past the right edge
    out = warp(image, flow)[0, 0]
    torch.testing.assert_close(out[:, :4], image[0, 0, :, 1:])
    assert torch.all(out[:, 4] == 0)
