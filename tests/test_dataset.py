"""Loading and validating datasets: every bad input is a clear error before any work."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from atlinter_ray.cli import guarded, interpolate
from atlinter_ray.config import Config
from atlinter_ray.dataset import load_dataset, read_sections
from atlinter_ray.dtypes import output_dtype
from atlinter_ray.errors import DatasetError, DatasetNotFoundError
from atlinter_ray.pipeline import run
from atlinter_ray.testing.datasets import write_dataset

SHAPE = (20, 12, 16)  # reference shape used here: coronal plane 12x16


def _good(tmp_path: Path, **changes) -> Path:
    images = changes.pop("images", np.arange(3 * 12 * 16, dtype=np.uint8).reshape(3, 12, 16))
    sections = changes.pop("section_numbers", [2, 9, 17])
    return write_dataset(tmp_path, "gene", images, sections, **changes)


def test_loads_grayscale_and_rgb_and_reads_single_sections(tmp_path: Path) -> None:
    path = _good(tmp_path)
    ds = load_dataset(str(path), SHAPE)
    assert (ds.id, ds.axis, ds.channels, ds.dtype) == ("gene", "coronal", 1, "uint8")
    assert ds.image_shape == (12, 16) and ds.n_slices == 20
    images = np.load(path)
    np.testing.assert_array_equal(read_sections(ds, [17, 2])[:, 0], images[[2, 0]])
    rgb = np.random.default_rng(0).integers(0, 255, (2, 20, 12, 3), dtype=np.uint8)
    sag = write_dataset(tmp_path, "rgb", rgb, [3, 10], axis="sagittal")
    ds = load_dataset(str(sag).removesuffix(".npy"), SHAPE)
    assert ds.channels == 3 and ds.image_shape == (20, 12)
    np.testing.assert_array_equal(read_sections(ds, [10])[0], rgb[1].transpose(2, 0, 1))
    assert pickle.loads(pickle.dumps(ds)) == ds  # how Ray ships it to workers


def test_json_reference_shape_overrides_the_default(tmp_path: Path) -> None:
    path = _good(tmp_path, reference_shape=list(SHAPE))
    assert load_dataset(str(path)).reference_shape == SHAPE


def _rewrite_npy(path: Path, data: bytes) -> None:
    path.write_bytes(data)


BAD_CASES = {
    "count": (dict(section_numbers=[2, 9]), "gene.json", "section_numbers", "one section number per image"),
    "duplicate": (dict(section_numbers=[2, 9, 9]), "gene.json", "section_numbers", "duplicate"),
    "negative": (dict(section_numbers=[-1, 9, 17]), "gene.json", "section_numbers", "outside"),
    "out of range": (dict(section_numbers=[2, 9, 20]), "gene.json", "section_numbers", "outside"),
    "not integers": (dict(section_numbers=[2, 9.5, 17]), "gene.json", "section_numbers", "integers"),
    "axis": (dict(axis="transverse"), "gene.json", "axis", "use one of"),
    "plane": (dict(images=np.zeros((3, 16, 12), np.uint8)), "gene.npy", "shape", "align the sections"),
    "nan": (dict(images=np.where(np.eye(12, 16)[None] > 0, np.nan, 1.0).repeat(3, 0).astype(np.float32)),
            "gene.npy", "images[0]", "NaN or inf"),
    "inf": (dict(images=np.full((3, 12, 16), np.inf, np.float64)), "gene.npy", "images[0]", "NaN or inf"),
    "dtype": (dict(images=np.zeros((3, 12, 16), np.int64)), "gene.npy", "dtype", "convert the images"),
    "one section": (dict(images=np.zeros((1, 12, 16), np.uint8), section_numbers=[4]),
                    "gene.json", "section_numbers", "at least two"),
    "rgba": (dict(images=np.zeros((3, 12, 16, 4), np.uint8)), "gene.npy", "shape", "(n, H, W, 3)"),
    "voxel list": (dict(voxel_size_um=[25, 25, 25]), "gene.json", "voxel_size_um", "one positive number"),
    "voxel zero": (dict(voxel_size_um=0), "gene.json", "voxel_size_um", "one positive number"),
    "float above 1": (dict(images=np.full((3, 12, 16), 2.5, np.float32)), "gene.json",
                      "intensity_max", "values up to 2.5"),
    "above stated": (dict(images=np.full((3, 12, 16), 300.0), intensity_max=255.0), "gene.json",
                     "intensity_max", "values up to 300"),
    "intensity_max": (dict(intensity_max=300), "gene.json", "intensity_max", "at most 255"),
}


def assert_refused(tmp_path: Path, path: Path, file: str, field: str, hint: str, capsys) -> None:
    """Loading ``path`` fails naming file, field and fix; the job exits 2, writing nothing."""
    with pytest.raises(DatasetError) as err:
        load_dataset(str(path), SHAPE)
    message = str(err.value)
    assert file in message and repr(field) in message and hint in message
    assert "Fix:" in message
    # the job: exit status 2 with that message on stderr, nothing written or marked done
    cfg = _config(tmp_path, path)
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        guarded(interpolate)(OmegaConf.structured(cfg))
    assert stop.value.code == 2
    out = capsys.readouterr()
    assert message in out.err and message not in out.out
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_names_file_field_and_fix(tmp_path: Path, case: str, capsys) -> None:
    changes, file, field, hint = BAD_CASES[case]
    assert_refused(tmp_path, _good(tmp_path, **changes), file, field, hint, capsys)


def test_missing_axis_says_missing(tmp_path: Path, capsys) -> None:
    path = _good(tmp_path)
    meta = tmp_path / "gene.json"
    meta.write_text(json.dumps({"section_numbers": [2, 9, 17]}))
    assert_refused(tmp_path, path, "gene.json", "axis", "missing", capsys)


def test_header_claiming_a_billion_images_blames_the_npy(tmp_path: Path, capsys) -> None:
    """The json's three section numbers are right; the .npy header is what is wrong."""
    path = _good(tmp_path)
    data = np.load(path)
    with open(path, "wb") as f:
        header = {"descr": "|u1", "fortran_order": False, "shape": (10**9, 12, 16)}
        np.lib.format.write_array_header_1_0(f, header)
        f.write(data.tobytes())
    assert_refused(tmp_path, path, "gene.npy", "data", "header", capsys)


def test_byte_order_is_read_not_reinterpreted(tmp_path: Path) -> None:
    """``>u2`` and ``>f4`` files give the values numpy reads, in native order."""
    values = np.arange(3 * 12 * 16, dtype=np.uint16).reshape(3, 12, 16) * 37
    assert values[0, 0, 1] == 37 and values.max() > 255
    for stored, expected in ((">u2", values), (">f4", values / values.max()),
                             (">f8", values / values.max()), ("<u2", values)):
        path = _good(tmp_path, images=expected.astype(stored))
        ds = load_dataset(str(path), SHAPE)
        assert ds.dtype == np.dtype(stored).newbyteorder("=").name
        assert ds.layout.stored == np.dtype(stored).str
        got = read_sections(ds, [9, 2])[:, 0]
        assert got.dtype.isnative
        np.testing.assert_array_equal(got, expected[[1, 0]].astype(ds.dtype))
    assert load_dataset(str(_good(tmp_path, images=values.astype(">f4") / 65535)), SHAPE).peak == 1.0


def test_fortran_order_is_read_locally(tmp_path: Path) -> None:
    rgb = np.random.default_rng(0).integers(0, 255, (3, 12, 16, 3), dtype=np.uint8)
    for images in (rgb, rgb[..., 0], rgb.astype(">u2")):
        path = _good(tmp_path, images=np.asfortranarray(images))
        assert np.load(path).flags.f_contiguous and np.load(path).ndim == images.ndim
        ds = load_dataset(str(path), SHAPE)
        assert ds.layout.fortran
        got = read_sections(ds, [17, 2])
        want = images[[2, 0]]
        want = want[:, None] if want.ndim == 3 else np.moveaxis(want, -1, 1)
        np.testing.assert_array_equal(got, want)


def test_fortran_order_on_remote_storage_is_refused_with_the_fix() -> None:
    import fsspec

    fs = fsspec.filesystem("memory")
    images = np.asfortranarray(np.zeros((3, 12, 16), np.uint8))
    with fs.open("/i10/gene.npy", "wb") as f:
        np.save(f, images)
    fs.pipe("/i10/gene.json", json.dumps({"section_numbers": [2, 9, 17], "axis": "coronal"}).encode())
    with pytest.raises(DatasetError) as err:
        load_dataset("memory://i10/gene", SHAPE)
    assert "'fortran_order'" in str(err.value) and "ascontiguousarray" in str(err.value)


def test_full_intensity_is_stated_never_estimated(tmp_path: Path) -> None:
    """Floats in [0, 1] stay as they are (full intensity 1.0, whatever their maximum)."""
    dim = np.full((3, 12, 16), 0.2, np.float32)
    assert load_dataset(str(_good(tmp_path, images=dim)), SHAPE).peak == 1.0
    units = np.full((3, 12, 16), 200.0)
    assert load_dataset(str(_good(tmp_path, images=units, intensity_max=255)), SHAPE).peak == 255.0
    twelve_bit = np.full((3, 12, 16), 4000, np.uint16)
    assert load_dataset(str(_good(tmp_path, images=twelve_bit, intensity_max=4095)), SHAPE).peak == 4095.0
    assert load_dataset(str(_good(tmp_path, images=twelve_bit)), SHAPE).peak == 65535.0


def test_truncated_and_unreadable_files(tmp_path: Path) -> None:
    path = _good(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(DatasetError, match=r"gene\.npy.*truncated"):
        load_dataset(str(path), SHAPE)
    path.write_bytes(b"this is not a numpy file at all" * 10)
    with pytest.raises(DatasetError, match=r"gene\.npy: unreadable \.npy"):
        load_dataset(str(path), SHAPE)
    (tmp_path / "gene.json").write_text("{not json")
    with pytest.raises(DatasetError, match=r"gene\.json: not valid JSON"):
        load_dataset(str(path), SHAPE)


def test_missing_files_are_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="metadata file not found"):
        load_dataset(str(tmp_path / "nothing.npy"))
    (tmp_path / "lonely.json").write_text(json.dumps({"section_numbers": [1, 2], "axis": "coronal"}))
    with pytest.raises(FileNotFoundError, match=r"lonely\.npy: image file not found"):
        load_dataset(str(tmp_path / "lonely"))


def _config(tmp_path: Path, *paths: Path) -> Config:
    cfg = Config()
    cfg.data.datasets = [str(p) for p in paths]
    cfg.data.reference_shape = list(SHAPE)
    cfg.output.root = str(tmp_path / "out")
    cfg.run.serial, cfg.run.progress = True, False
    return cfg


def test_a_bad_dataset_stops_the_run_before_any_work(tmp_path: Path) -> None:
    good = _good(tmp_path)
    bad = write_dataset(tmp_path, "broken", np.zeros((3, 12, 16), np.uint8), [2, 9, 9])
    cfg = _config(tmp_path, good, bad)
    with pytest.raises(DatasetError, match="duplicate"):
        run(cfg)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("images", "dtype", "hint"),
    [(np.zeros((3, 12, 16), np.uint8), "int8", "0..255 (uint8): its largest value is 127"),
     (np.zeros((3, 12, 16), np.uint16), "float16", "0..65535 (uint16): its largest value is 65504"),
     (np.zeros((3, 12, 16), np.uint8), "bool", "it is not a number type")],
)
def test_output_dtype_that_would_clip_is_refused_before_anything_is_written(
    tmp_path: Path, images: np.ndarray, dtype: str, hint: str, capsys
) -> None:
    cfg = _config(tmp_path, _good(tmp_path, images=images))
    cfg.output.dtype = dtype
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        guarded(interpolate)(OmegaConf.structured(cfg))
    err = capsys.readouterr().err
    assert stop.value.code == 2 and f"output.dtype={dtype!r} cannot hold" in err and hint in err
    assert "Fix: leave output.dtype unset" in err
    assert not (tmp_path / "out").exists()
    ds = load_dataset(cfg.data.datasets[0], SHAPE)
    assert output_dtype(ds, "float32") == "float32" and output_dtype(ds, None) == ds.dtype
    assert output_dtype(ds, "uint16") == "uint16"  # holds 0..255 and 0..65535


@pytest.mark.parametrize("dtype", ["uint8", "uint16"])
def test_an_integer_output_that_would_posterize_float_data_is_refused(
    tmp_path: Path, dtype: str, capsys
) -> None:
    """Float images in [0, 1] written as integers would become 0 or 1: exit 2, nothing written."""
    ramp = np.linspace(0.0, 1.0, 3 * 12 * 16, dtype=np.float32).reshape(3, 12, 16)
    cfg = _config(tmp_path, _good(tmp_path, images=ramp))
    cfg.output.dtype = dtype
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        guarded(interpolate)(OmegaConf.structured(cfg))
    err = capsys.readouterr().err
    assert stop.value.code == 2, err
    assert f"output.dtype={dtype!r} would round dataset gene's float32 values 0..1" in err
    assert "2 grey level(s)" in err and "Fix: leave output.dtype unset" in err
    assert "'intensity_max'" in err
    assert not (tmp_path / "out").exists()
    # float data in 8-bit units (stated full intensity 255) keeps its levels as integers
    eight_bit = load_dataset(str(_good(tmp_path / "b", images=ramp * 255,
                                       intensity_max=255.0)), SHAPE)
    assert output_dtype(eight_bit, dtype) == dtype


@pytest.mark.parametrize(("case", "hint"), [
    ("unknown id", "data.truth names ['other']"),
    ("wrong shape", "field 'volume': shape (20, 12, 15)"),
    ("missing", "file not found"),
    ("not npz", "not an .npz holding 'volume'"),
])
def test_truth_is_checked_before_anything_is_written(tmp_path: Path, case: str, hint: str,
                                                     capsys) -> None:
    cfg = _config(tmp_path, _good(tmp_path))
    truth = tmp_path / "truth.npz"
    np.savez(truth, volume=np.zeros(SHAPE[:2] + (15,), np.uint8))
    if case == "not npz":
        truth.write_bytes(b"not a zip file")
    path = str(tmp_path / "absent.npz") if case == "missing" else str(truth)
    cfg.data.truth = {"other" if case == "unknown id" else "gene": path}
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        guarded(interpolate)(OmegaConf.structured(cfg))
    assert stop.value.code == 2 and hint in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    np.savez(truth, volume=np.zeros(SHAPE, np.uint8))  # the right shape: the run scores
    cfg.data.truth = {"gene": str(truth)}
    assert "gene" in run(cfg).scores


def test_a_npy_cut_short_after_validation_is_an_error_naming_it(tmp_path: Path) -> None:
    """A file shortened while the job runs (rewritten by hand) must not give planes of zeros."""
    images = np.arange(4 * 6 * 5, dtype=np.uint8).reshape(4, 6, 5)
    path = write_dataset(tmp_path, "g", images, [0, 8, 16, 24])
    ds = load_dataset(str(path), (32, 6, 5), {})
    np.testing.assert_array_equal(read_sections(ds, [8, 16])[:, 0], images[1:3])
    path.write_bytes(path.read_bytes()[:-20])  # the last plane is cut short
    with pytest.raises(DatasetError, match=r"g\.npy: planes 2\.\.3 end past the end of the file"):
        read_sections(ds, [16, 24])
