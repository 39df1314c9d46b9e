"""Make the predecessor (BlueBrain ``atlinter`` 0.2.3) importable as a test oracle.

The sdist is downloaded once from PyPI through :mod:`tests.pypi` and unpacked into the
test cache; its ``src`` folder goes on ``sys.path``. The cached files are never edited:
the few things atlinter imports that cannot load beside torch 2.13 are replaced, at run
time only, by small modules in ``sys.modules`` (facts in
``shared/reference/atlinter-checkpoints/README.md`` section 6):

- ``torchvision`` (always): ``transforms.ToTensor`` re-implemented with torchvision's
  ndarray semantics, ``transforms.ColorJitter`` that refuses to be built, and an empty
  ``torchvision.models`` (``rife/loss.py`` imports it for an unused VGG loss).
- ``scipy.interpolate`` / ``scipy.ndimage`` only when scipy does not import; calling
  anything in them raises.
- ``mxnet`` and ``atlinter.vendor.MaskFlowNet.{network,predict_new_data}`` only when
  mxnet does not import (absent, or mxnet 1.9 under numpy 2), so
  ``atlinter.optical_flow`` imports (its ``RAFTNet`` helpers work; the MaskFlowNet
  class exists but cannot be built).

Usage::

    atlinter = import_predecessor()
    from atlinter.pair_interpolation import GeneInterpolate, LinearPairInterpolationModel
"""

from __future__ import annotations

import argparse
import importlib
import sys
import types
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

PREDECESSOR_SPEC = "atlinter==0.2.3"

# Names of modules this loader put in sys.modules (stubs), for tests that want to know.
STUBBED: list[str] = []
# The ``atlinter`` module import_predecessor prepared (stubs installed, origin checked).
_prepared: types.ModuleType | None = None


def predecessor_src() -> Path:
    """Download/unpack the predecessor's sdist (cached) and return its ``src`` folder."""
    from atlinter_ray.testing import pypi

    unpacked = pypi.extract(PREDECESSOR_SPEC, sdist=True)
    src = unpacked / "atlinter-0.2.3" / "src"
    if not (src / "atlinter" / "__init__.py").is_file():
        raise FileNotFoundError(
            f"{src}/atlinter/__init__.py is missing from the unpacked sdist of "
            f"{PREDECESSOR_SPEC}; delete {unpacked.parent} and run again to re-download"
        )
    return src


class _Unavailable:
    """Stand-in for an object of a stubbed package: any call raises a clear error."""

    def __init__(self, what: str) -> None:
        """Remember the dotted name this stand-in replaces."""
        self._what = what

    def __getattr__(self, attr: str) -> _Unavailable:
        """Attribute chains (``network.config.Reader``) stay stand-ins until called."""
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Unavailable(f"{self._what}.{attr}")

    def __call__(self, *args: Any, **kwargs: Any) -> NoReturn:
        """Raise: the real package is not importable in this environment."""
        raise RuntimeError(
            f"{self._what} is a stub installed by atlinter_ray.testing.predecessor (the real package "
            "is not importable here); the oracle path you used needs the real package"
        )


def _stub_module(name: str, doc: str, **attrs: Any) -> types.ModuleType:
    """Create a module holding ``attrs``, register it in ``sys.modules`` and remember it."""
    module = types.ModuleType(name, doc)
    vars(module).update(attrs)
    sys.modules[name] = module
    STUBBED.append(name)
    return module


def _lazy_failing_getattr(prefix: str) -> Any:
    """Module ``__getattr__`` that hands out raising callables for public names."""

    def __getattr__(attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Unavailable(f"{prefix}.{attr}")

    return __getattr__


class ToTensor:
    """torchvision's ``ToTensor`` for ndarrays: HWC -> CHW tensor, uint8 divided by 255.

    Same semantics as torchvision 0.x ``F.to_tensor`` on a numpy array: a 2-D array gets
    a trailing channel axis, the array is transposed (2, 0, 1) whatever its sizes (so
    atlinter's CAIN RGB path, which passes CHW, gets torchvision's (W, C, H) result), a
    uint8 array becomes the default float dtype divided by 255, any other dtype is
    returned as is (not divided).
    """

    def __call__(self, pic: np.ndarray) -> Any:
        """Convert one HW or HWC ndarray to a CHW tensor."""
        import torch

        if not isinstance(pic, np.ndarray):
            raise TypeError(
                f"atlinter_ray.testing.predecessor ToTensor stub accepts numpy arrays only, got "
                f"{type(pic).__name__}; convert PIL images with np.asarray first"
            )
        if pic.ndim not in {2, 3}:
            raise ValueError(f"pic should be 2/3 dimensional. Got {pic.ndim} dimensions.")
        if pic.ndim == 2:
            pic = pic[:, :, None]
        img = torch.from_numpy(pic.transpose((2, 0, 1))).contiguous()
        if isinstance(img, torch.ByteTensor):
            return img.to(dtype=torch.get_default_dtype()).div(255)
        return img

    def __repr__(self) -> str:
        """Show the class name like torchvision does."""
        return f"{self.__class__.__name__}()"


class ColorJitter:
    """Placeholder for ``torchvision.transforms.ColorJitter`` (RAFT's training augmentor)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """Refuse to build: RAFT's data augmentation is not part of any oracle."""
        _Unavailable("torchvision.transforms.ColorJitter")()


def _install_torchvision() -> None:
    """Put the small ``torchvision`` replacement in ``sys.modules``."""
    torchvision = _stub_module(
        "torchvision", "atlinter oracle stub of torchvision",
        __version__="0.0.0+atlinter-oracle-stub",
    )
    transforms = _stub_module(
        "torchvision.transforms", "ToTensor/ColorJitter stub",
        ToTensor=ToTensor, ColorJitter=ColorJitter,
    )
    models = _stub_module("torchvision.models", "empty: only rife's unused VGG loss uses it")
    vars(torchvision).update(transforms=transforms, models=models)


def _importable(name: str) -> bool:
    """True when ``name`` imports (mxnet 1.9 is installed but fails under numpy 2)."""
    try:
        importlib.import_module(name)
    except Exception:  # noqa: BLE001 - any failure means "use the stub"
        return False
    return True


def _install_scipy_if_missing() -> None:
    """Stub ``scipy.interpolate`` and ``scipy.ndimage`` when scipy does not import."""
    if _importable("scipy.interpolate") and _importable("scipy.ndimage"):
        return
    scipy = _stub_module("scipy", "atlinter oracle stub of scipy")
    for sub in ("interpolate", "ndimage"):
        module = _stub_module(
            f"scipy.{sub}", f"stub of scipy.{sub}", __getattr__=_lazy_failing_getattr(f"scipy.{sub}")
        )
        setattr(scipy, sub, module)


def _install_mxnet_if_missing() -> None:
    """Stub ``mxnet`` and atlinter's MaskFlowNet modules when mxnet does not import."""
    if _importable("mxnet"):
        return
    _stub_module("mxnet", "atlinter oracle stub of mxnet", __getattr__=_lazy_failing_getattr("mxnet"))
    # Import the real (mxnet-free) package first, then hang the stubs under it.
    package = importlib.import_module("atlinter.vendor.MaskFlowNet")
    for sub in ("network", "predict_new_data"):
        name = f"atlinter.vendor.MaskFlowNet.{sub}"
        stub = _stub_module(name, "stub: needs mxnet", __getattr__=_lazy_failing_getattr(name))
        setattr(package, sub, stub)


def import_predecessor() -> types.ModuleType:
    """Return the predecessor's ``atlinter`` package, importable with its submodules."""
    global _prepared
    loaded = sys.modules.get("atlinter")
    if loaded is not None and loaded is _prepared:
        return loaded
    src = str(predecessor_src())
    if src not in sys.path:
        sys.path.insert(0, src)
    if "torchvision" not in sys.modules:
        _install_torchvision()
    _install_scipy_if_missing()
    atlinter = importlib.import_module("atlinter")
    origin = atlinter.__file__
    if origin is None or not str(Path(origin).resolve()).startswith(str(Path(src).resolve())):
        raise ImportError(
            f"'atlinter' was imported from {atlinter.__file__}, not from the oracle sdist "
            f"in {src}; uninstall that copy (pip uninstall atlinter) so tests use 0.2.3"
        )
    _install_mxnet_if_missing()
    _prepared = atlinter
    return atlinter


def predecessor_raft(small: bool) -> Any:
    """The predecessor's RAFT (a ``DataParallel``) with random weights and BatchNorm statistics."""
    import torch

    import_predecessor()
    from atlinter.vendor.RAFT.raft import RAFT as PredecessorRAFT

    torch.manual_seed(10 + small)
    net = torch.nn.DataParallel(
        PredecessorRAFT(argparse.Namespace(small=small, mixed_precision=False))
    )
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.get_buffer("running_mean").uniform_(-0.5, 0.5)
                m.get_buffer("running_var").uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return net


def predecessor_rife_hd(folder: Path) -> Any:
    """The predecessor's RIFE_HD ``Model`` with random weights (eval mode); its three files
    are written to ``folder`` as released (``module.`` keys, torch's legacy format)."""
    import torch

    from atlinter_ray.testing.rife_wheels import randomise

    import_predecessor()
    from atlinter.vendor.rife.RIFE_HD import Model

    torch.manual_seed(0)
    model = Model()
    nets = {"flownet.pkl": model.flownet, "contextnet.pkl": model.contextnet,
            "unet.pkl": model.fusionnet}
    folder.mkdir(parents=True, exist_ok=True)
    for seed, (file, net) in enumerate(nets.items()):
        randomise(net, seed)
        state = {f"module.{k}": v for k, v in net.state_dict().items()}
        torch.save(state, folder / file, _use_new_zipfile_serialization=False)
    model.eval()
    return model


def predecessor_cain(path: Path) -> Any:
    """The predecessor's CAIN in ``DataParallel`` with its own random initialisation, in
    training mode as atlinter ran it; saved to ``path`` as the released file."""
    import torch

    import_predecessor()
    from atlinter.vendor.cain.cain import CAIN

    torch.manual_seed(0)
    net = torch.nn.DataParallel(CAIN())
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": net.state_dict()}, path, _use_new_zipfile_serialization=False)
    return net


class CainOracleFixes:
    """The two changes without which atlinter's ``CAINPairInterpolationModel`` cannot run.

    ``GeneInterpolate`` hands it sections of its float64 volume, which its ``ToTensor``
    leaves float64, so the float32 network fails ("Input type (double) and bias type
    (float)"): inputs are cast to float32 here. Its RGB path passes CHW arrays to
    ``ToTensor``, which takes them as HWC and builds ``(1, W, 3, H)``: :meth:`to_tensor`
    keeps CHW instead, the layout the code meant. Nothing else changes.
    """

    def __init__(self, net: Any) -> None:
        """Wrap the predecessor's CAIN network ``net``."""
        self.net = net

    def __call__(self, a: Any, b: Any) -> Any:
        """The network on float32 inputs."""
        return self.net(a.float(), b.float())

    @staticmethod
    def to_tensor(image: np.ndarray) -> Any:
        """HW -> (1, H, W); CHW stays CHW. Always a copy, as torchvision's is for
        transposed input: CAIN subtracts the mean from its inputs in place."""
        import torch

        return torch.from_numpy(np.array(image[None] if image.ndim == 2 else image))


def predecessor_cain_model(net: Any) -> Any:
    """atlinter's ``CAINPairInterpolationModel`` around ``net``, with :class:`CainOracleFixes`."""
    import_predecessor()
    from atlinter.pair_interpolation import CAINPairInterpolationModel

    fixes = CainOracleFixes(net)
    model = CAINPairInterpolationModel(fixes)
    model.to_tensor = fixes.to_tensor
    return model


def predecessor_volume(
    images: np.ndarray, sections: list[int], axis: str, volume_shape: tuple[int, ...],
    model: Any,
) -> np.ndarray:
    """atlinter's ``GeneInterpolate(GeneDataset(...), model).predict_volume()`` (no gradients)."""
    import torch

    import_predecessor()
    from atlinter.data import GeneDataset
    from atlinter.pair_interpolation import GeneInterpolate

    gene = GeneDataset(images, sections, axis, volume_shape)
    with torch.no_grad():
        volume: np.ndarray = GeneInterpolate(gene, model).predict_volume()
    return volume
