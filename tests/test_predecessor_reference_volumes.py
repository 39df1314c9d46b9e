"""RAFT and MaskFlowNet: ``placement=atlinter`` gives atlinter 0.2.3's whole volume.

The predecessor drove its flow models over a volume in one way only:
``GeneOpticalFlow(gene, reference, model).predict_volume()``, every unknown slice (edges
included) its nearest known section warped along the flow between two reference slices.
That is our reference-guided mode with ``interpolation.placement=atlinter`` (its warp and
input rule) and ``interpolation.edge=reference`` (its edge slices).

Oracles: the predecessor's own ``GeneOpticalFlow`` with its ``RAFTNet`` (large, random
weights, as ``raft-things.pth``); for MaskFlowNet, whose mxnet cannot share a process
with zarr 3, the flows of its own ``MaskFlowNet.preprocess_images`` + ``predict_flow``
come from the isolated mxnet venv and are handed back to ``GeneOpticalFlow`` by pair.
Slices are at least 128 px (below that the predecessor's RAFT returned NaN flow) and not
multiples of 8 or 32.

Tolerance in pixels of flow: the largest difference of the two volumes divided by the
largest step between neighbouring pixels of the known sections (how far a bilinear warp
of those sections moves per pixel of flow): <= 2e-4 px for RAFT, <= 1e-3 px for
MaskFlowNet, the bounds of their frame-by-frame tests.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from atlinter_ray.config import Config
from atlinter_ray.pipeline import run
from atlinter_ray.store import VolumeStore
from atlinter_ray.testing.datasets import write_dataset
from atlinter_ray.testing.mxnet_env import random_params, run_oracle
from atlinter_ray.testing.predecessor import import_predecessor, predecessor_raft

SECTIONS = [1, 3]  # predicted: 0 (an edge) and 2


def textured_volume(shape: tuple[int, int, int], rgb: bool, seed: int) -> np.ndarray:
    """A smooth texture in [0, 1] drifting by about a pixel per slice along axis 0."""
    rng = np.random.default_rng(seed)
    n, h, w = shape
    base = torch.from_numpy(rng.random((1, 3 if rgb else 1, (h + 2 * n) // 6, (w + 2 * n) // 6)))
    big = torch.nn.functional.interpolate(base, size=(h + 2 * n, w + 2 * n), mode="bicubic")
    big = big.clamp(0, 1).numpy()[0]
    planes = np.stack([big[:, k : k + h, 2 * k : 2 * k + w] for k in range(n)])
    return np.moveaxis(planes, 1, -1) if rgb else planes[:, 0]


def along(volume: np.ndarray, axis: str) -> np.ndarray:
    """A volume whose axis 0 is the section axis, put in reference orientation."""
    return volume if axis == "coronal" else np.moveaxis(volume, 0, 2)


def flow_px(ours: np.ndarray, theirs: np.ndarray, known: np.ndarray) -> float:
    """Largest difference in pixels of flow (see the module docstring)."""
    step = max(np.abs(np.diff(known, axis=a)).max() for a in (1, 2))
    return float(np.abs(ours - theirs).max() / step)


def ours(tmp_path: Path, name: str, checkpoint: str, gene: np.ndarray, reference: np.ndarray,
         axis: str) -> np.ndarray:
    """The whole job, reference-guided, atlinter placement and edges: volume, channels last."""
    shape = reference.shape[:3]
    images = np.stack([np.take(gene, s, axis=0 if axis == "coronal" else 2) for s in SECTIONS])
    write_dataset(tmp_path / "in", "gene", images, SECTIONS, axis=axis, reference_shape=list(shape))
    np.save(tmp_path / "nissl.npy", reference)
    cfg = Config()
    cfg.data.root, cfg.data.genes = str(tmp_path / "in"), ["gene"]
    cfg.model.name, cfg.model.checkpoint = name, checkpoint
    cfg.model.params = {"device": "cpu"}
    cfg.interpolation.reference = str(tmp_path / "nissl.npy")
    cfg.interpolation.placement, cfg.interpolation.edge = "atlinter", "reference"
    cfg.output.root = str(tmp_path / "out")
    cfg.run.serial, cfg.run.progress = True, False
    assert run(cfg).ok
    volume = VolumeStore(cfg.output.root).read_volume("gene")
    return np.moveaxis(volume, 0, -1) if gene.ndim == 4 else volume


def theirs(gene: np.ndarray, reference: np.ndarray, axis: str, model: Any) -> np.ndarray:
    """atlinter's ``GeneOpticalFlow(...).predict_volume()`` on the known sections of ``gene``."""
    import_predecessor()
    from atlinter.data import GeneDataset
    from atlinter.optical_flow import GeneOpticalFlow

    images = np.stack([np.take(gene, s, axis=0 if axis == "coronal" else 2) for s in SECTIONS])
    dataset = GeneDataset(images, SECTIONS, axis, gene.shape)
    with torch.no_grad():
        return GeneOpticalFlow(dataset, reference, model).predict_volume()


def known_sections(volume: np.ndarray, axis: str) -> np.ndarray:
    """The known sections of a reference-oriented volume, section axis first."""
    return np.stack([np.take(volume, s, axis=0 if axis == "coronal" else 2) for s in SECTIONS])


def test_raft_gives_the_predecessors_volume(tmp_path: Path) -> None:
    """Coronal, grey gene in float64, uint8 reference, 129 x 140 slices."""
    torch.set_num_threads(2)
    net = predecessor_raft(small=False)
    torch.save(net.state_dict(), tmp_path / "raft-things.pth")
    import_predecessor()
    from atlinter.optical_flow import RAFTNet

    oracle = RAFTNet.__new__(RAFTNet)  # its __init__ loads with weights_only=False
    oracle.device, oracle.model = "cpu", net.module.eval()
    shape = (4, 129, 140)
    reference = np.rint(textured_volume(shape, rgb=False, seed=1) * 255).astype(np.uint8)
    gene = textured_volume(shape, rgb=False, seed=2)
    expected = theirs(gene, reference, "coronal", oracle)
    got = ours(tmp_path, "raft", str(tmp_path / "raft-things.pth"), gene, reference, "coronal")
    assert got.dtype == np.float64 and got.shape == expected.shape
    predicted = np.delete(expected, SECTIONS, axis=0)
    assert (predicted > 0).mean() > 0.2  # flows keep much of each section inside the image
    error = flow_px(got, expected, known_sections(gene, "coronal"))
    print(f"RAFT volume: {error:.2e} px")
    assert error <= 2e-4


class ReplayedFlow:
    """An atlinter ``OpticalFlow`` whose ``predict_flow`` returns flows computed elsewhere.

    ``GeneOpticalFlow`` calls ``preprocess_images`` then ``predict_flow`` for each pair;
    the flow of a pair comes from the predecessor's MaskFlowNet (both of its steps) run
    on exactly these two reference slices in the mxnet venv.
    """

    def __init__(self, flows: dict[str, np.ndarray]) -> None:
        """``flows``: :func:`pair_key` of the two slices -> the predecessor's flow."""
        self.flows = flows

    @staticmethod
    def preprocess_images(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Nothing: the mxnet process ran the predecessor's own preprocessing."""
        return a, b

    def predict_flow(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """The predecessor's flow for this pair."""
        return self.flows[pair_key(a, b)]

    def warp_image(self, flow: np.ndarray, image: np.ndarray) -> np.ndarray:
        """The predecessor's own ``OpticalFlow.warp_image``."""
        from atlinter.optical_flow import OpticalFlow

        return OpticalFlow.warp_image(flow, image)


def pair_key(a: np.ndarray, b: np.ndarray) -> str:
    """A key for a pair of slices."""
    return hashlib.sha256(a.tobytes() + b"|" + b.tobytes()).hexdigest()


def test_maskflownet_gives_the_predecessors_volume(tmp_path: Path) -> None:
    """Sagittal, RGB gene in float32, float reference in [0, 1] (the 8-bit rule), 130 x 150."""
    shape = (4, 130, 150)  # section axis first; sagittal: the reference's axis 2
    reference = along(textured_volume(shape, rgb=False, seed=3), "sagittal").astype(np.float32)
    gene = along(textured_volume(shape, rgb=True, seed=4), "sagittal").astype(np.float32)
    planes = np.moveaxis(reference, 2, 0)
    pairs = {}
    for s in range(shape[0]):
        if s not in SECTIONS:
            k = min(SECTIONS, key=lambda known: abs(known - s))
            pairs[pair_key(planes[s], planes[k])] = (planes[s], planes[k])
    names = sorted(pairs)
    cases = {f"a_{i}": pairs[key][0] for i, key in enumerate(names)}
    cases |= {f"b_{i}": pairs[key][1] for i, key in enumerate(names)}
    np.savez(tmp_path / "cases.npz", **cases)
    params = random_params()
    run_oracle("predict", str(params), str(tmp_path / "cases.npz"), str(tmp_path / "flows.npz"))
    flows = np.load(tmp_path / "flows.npz")
    replay = ReplayedFlow({key: flows[str(i)] for i, key in enumerate(names)})
    expected = theirs(gene, reference, "sagittal", replay)
    got = ours(tmp_path, "maskflownet", str(params), gene, reference, "sagittal")
    assert got.dtype == np.float32 and got.shape == expected.shape
    assert (np.delete(expected, SECTIONS, axis=2) > 0).mean() > 0.2
    error = flow_px(got, expected, known_sections(gene, "sagittal"))
    print(f"MaskFlowNet volume: {error:.2e} px")
    assert error <= 1e-3
