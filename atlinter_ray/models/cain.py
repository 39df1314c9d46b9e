"""CAIN (Choi et al., AAAI 2020): channel-attention frame interpolation, midpoint only.

Loads the original ``pretrained_cain.pth`` unchanged: a legacy-format torch file
holding ``{"state_dict": ...}`` saved from ``DataParallel(CAIN())`` (every key starts
with ``module.encoder.interpolate.``); the module tree below keeps those names, so a
wrong file is reported with the file's own key names.

Forward (``a``, ``b`` in ``[0, 1]``, 3 channels)::

    m_a, m_b = mean_hw(a), mean_hw(b)                 # per image and channel
    fa, fb = pixel_unshuffle(a - m_a, 8), pixel_unshuffle(b - m_b, 8)   # 192 ch
    x = headConv(cat(fa, fb))                          # 3x3, zero padding, 384 -> 192
    feats = tailConv(body(x) + x)                      # 5 groups of 12 RCABs
    out = pixel_shuffle(feats, 8) + (m_a + m_b) / 2

A group is ``x + conv(RCAB^12(x))``; an RCAB is ``x + CA(conv(lrelu(conv(x))))`` with
reflection-padded 3x3 convs, LeakyReLU(0.2) and channel attention
``y * sigmoid(W2 relu(W1 mean_hw(y)))``.

Padding: the predecessor never called ``.eval()``, so CAIN ran in training mode, which
skips its internal padding and needs H and W divisible by 8. Our default ``pad_to=8``
reproduces those numbers exactly on such sizes and, for other sizes, reflection-pads
(centred, after the mean is taken, as CAIN does) instead of failing; ``pad_to=128`` is
CAIN's own eval-mode padding. Grayscale input is repeated to 3 channels and the output
averaged back, as the predecessor does; its RGB path, which built a ``(1, W, 3, H)``
tensor, is not reproduced: RGB batches go in as proper ``(N, 3, H, W)``. The output is
not clipped (the predecessor did not clip either).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from atlinter_ray.errors import ConfigError
from atlinter_ray.models.base import register_model
from atlinter_ray.models.torch_runtime import TorchPairInterpolator, load_weights

#: Space-to-depth factor of the encoder (3 shuffles by 2 in the paper).
SHUFFLE = 8


class ReflectConv(nn.Module):
    """3x3 conv after one pixel of reflection padding (checkpoint key ``conv``)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reflection-pad by one pixel, then convolve."""
        out: torch.Tensor = self.conv(F.pad(x, (1, 1, 1, 1), mode="reflect"))
        return out


class ChannelAttention(nn.Module):
    """Scale each channel by a gate computed from the channel means."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        self.conv_du = nn.Sequential(
            nn.Conv2d(channels, channels // reduction, kernel_size=1),
            nn.ReLU(),
            nn.Conv2d(channels // reduction, channels, kernel_size=1),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x * gate(mean_hw(x))``."""
        out: torch.Tensor = x * self.conv_du(x.mean(dim=(2, 3), keepdim=True))
        return out


class RCAB(nn.Module):
    """Residual channel-attention block: ``x + CA(conv(lrelu(conv(x))))``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            ReflectConv(channels),
            nn.LeakyReLU(0.2),
            ReflectConv(channels),
            ChannelAttention(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual update."""
        out: torch.Tensor = x + self.body(x)
        return out


class ResidualGroup(nn.Module):
    """``blocks`` RCABs and a closing conv, with a skip over the whole group."""

    def __init__(self, channels: int, blocks: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            *(RCAB(channels) for _ in range(blocks)), ReflectConv(channels)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual update."""
        out: torch.Tensor = x + self.body(x)
        return out


class Fusion(nn.Module):
    """CAIN's feature fusion: head conv, residual groups, tail conv."""

    def __init__(self, channels: int = 3 * SHUFFLE**2, groups: int = 5, blocks: int = 12):
        super().__init__()
        self.headConv = nn.Conv2d(2 * channels, channels, kernel_size=3, padding=1)
        self.body = nn.Sequential(*(ResidualGroup(channels, blocks) for _ in range(groups)))
        self.tailConv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, fa: torch.Tensor, fb: torch.Tensor) -> torch.Tensor:
        """Fused features of two space-to-depth images."""
        x = self.headConv(torch.cat([fa, fb], dim=1))
        out: torch.Tensor = self.tailConv(self.body(x) + x)
        return out


class Encoder(nn.Module):
    """Holds the fusion network under the checkpoint's ``encoder.interpolate`` name."""

    def __init__(self) -> None:
        super().__init__()
        self.interpolate = Fusion()


class CAINNet(nn.Module):
    """The CAIN network on ``(B, 3, H, W)`` tensors in ``[0, 1]``.

    ``pad_to``: H and W are reflection-padded (centred) up to a multiple of this, after
    the per-image mean is removed, and the output is cropped back. 8 is the smallest
    the network accepts (and what the predecessor ran); 128 is CAIN's eval mode.
    """

    def __init__(self, pad_to: int = SHUFFLE) -> None:
        super().__init__()
        if pad_to < 1 or pad_to % SHUFFLE:
            raise ValueError(f"pad_to={pad_to}: must be a positive multiple of {SHUFFLE}")
        self.pad_to = pad_to
        self.encoder = Encoder()

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """The predicted midpoint frame, same shape as ``a``."""
        h, w = a.shape[-2:]
        ph, pw = (-h) % self.pad_to, (-w) % self.pad_to
        if ph - ph // 2 >= h or pw - pw // 2 >= w:
            raise ValueError(
                f"CAIN: image {h}x{w} is too small to reflection-pad to a multiple of "
                f"{self.pad_to}; use a smaller pad_to or larger images"
            )
        pad = (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)
        m_a = a.mean(dim=(2, 3), keepdim=True)
        m_b = b.mean(dim=(2, 3), keepdim=True)
        fa, fb = a - m_a, b - m_b
        if ph or pw:
            fa, fb = F.pad(fa, pad, mode="reflect"), F.pad(fb, pad, mode="reflect")
        feats = self.encoder.interpolate(
            F.pixel_unshuffle(fa, SHUFFLE), F.pixel_unshuffle(fb, SHUFFLE)
        )
        out = F.pixel_shuffle(feats, SHUFFLE)
        out = out[..., pad[2] : pad[2] + h, pad[0] : pad[0] + w]
        return out + (m_a + m_b) / 2


@register_model("cain")
class CAIN(TorchPairInterpolator):
    """CAIN midpoint interpolator from the original ``pretrained_cain.pth``.

    Example::

        model = build_model("cain", checkpoint="pretrained_cain.pth", device="cpu")
        mid = model.interpolate(a, b, np.array([0.5]), peak=255.0)  # (N, 1, C, H, W)

    Args:
        checkpoint: path or fsspec URL of ``pretrained_cain.pth`` (required).
        pad_to: reflection padding multiple, 8 (default, the predecessor's numbers) or
            a larger multiple of 8 such as 128 (CAIN's eval mode).
        storage_options: fsspec options for a remote ``checkpoint``.
        **runtime: device, precision, batch_size, tile, tile_overlap, channels_last
            (see :class:`~atlinter_ray.models.torch_runtime.TorchRuntime`).
    """

    arbitrary_t = False
    #: CAIN pads itself (after taking the mean), so the runtime must not.
    multiple = 1
    in_channels = 3
    input_range = 1.0

    def __init__(
        self,
        checkpoint: str | None = None,
        pad_to: int = SHUFFLE,
        storage_options: dict[str, Any] | None = None,
        **runtime: Any,
    ) -> None:
        if not checkpoint:
            raise ConfigError(
                f"model {self.name!r} needs model.checkpoint: the path or URL of the "
                "original pretrained_cain.pth file"
            )
        net = CAINNet(pad_to=pad_to)
        digest = load_weights(net, checkpoint, storage_options=storage_options)
        super().__init__(net, digest, **runtime)

    def forward(self, a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Midpoint frames (``t`` is 0.5 throughout: the base class checks it)."""
        frames: torch.Tensor = self.module(a, b)
        return frames
