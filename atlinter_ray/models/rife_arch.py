"""The RIFE networks in plain PyTorch: the predecessor's RIFE_HD, RIFE HDv3 and RIFE 4.x.

Layer shapes and parameter names follow the released ``flownet.pkl`` / ``contextnet.pkl``
/ ``unet.pkl`` files so they load with strict key matching; the wrappers that load them
and drive them are in :mod:`atlinter_ray.models.rife`. See that module for the
architectures' provenance and what each file holds.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor


def backward_warp(image: Tensor, flow: Tensor) -> Tensor:
    """Sample ``image`` at ``(x + flow_x, y + flow_y)``, bilinear, border-clamped; float32.

    The grid is built as RIFE builds it (``linspace(-1, 1)`` plus the flow scaled by
    ``2 / (size - 1)``, ``align_corners=True``) so results match the originals. Grid,
    flow and sampling are float32 whatever the autocast precision: a bf16 grid is off
    by up to half a pixel at 512 px, and autocast would not widen it by itself.
    """
    flow = flow.float()
    n, _, h, w = flow.shape
    gx = torch.linspace(-1.0, 1.0, w, device=flow.device).view(1, 1, 1, w).expand(n, 1, h, w)
    gy = torch.linspace(-1.0, 1.0, h, device=flow.device).view(1, 1, h, 1).expand(n, 1, h, w)
    fx = flow[:, 0:1] / ((image.shape[3] - 1.0) / 2.0)
    fy = flow[:, 1:2] / ((image.shape[2] - 1.0) / 2.0)
    grid = torch.cat([gx + fx, gy + fy], 1).permute(0, 2, 3, 1)
    with torch.autocast(image.device.type, enabled=False):
        return F.grid_sample(
            image.float(), grid, mode="bilinear", padding_mode="border", align_corners=True
        )


def _resize(x: Tensor, factor: float) -> Tensor:
    """Bilinear resize by ``factor`` with RIFE's coordinate mapping."""
    if factor == 1:
        return x
    return F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)


def _swap(flow: Tensor) -> Tensor:
    """Swap the (t->0, t->1) halves of a 4-channel bidirectional flow."""
    return torch.cat((flow[:, 2:4], flow[:, :2]), 1)


def _average(out: Tensor, rev: Tensor) -> Tensor:
    """Mean of a block's flow+mask output and its output on the swapped pair (ensemble)."""
    return torch.cat(((out[:, :4] + _swap(rev[:, :4])) / 2, (out[:, 4:5] - rev[:, 4:5]) / 2), 1)


def _conv(
    cin: int, cout: int, k: int = 3, s: int = 1, p: int = 1, *, bias: bool = True,
    bn: bool = False, act: str | None = "prelu",
) -> nn.Sequential:
    """Conv2d (+ BatchNorm) (+ PReLU / LeakyReLU(0.2)) as an indexed Sequential."""
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, s, p, bias=bias)]
    if bn:
        layers.append(nn.BatchNorm2d(cout))
    if act == "prelu":
        layers.append(nn.PReLU(cout))
    elif act == "leaky":
        layers.append(nn.LeakyReLU(0.2))
    return nn.Sequential(*layers)


def _deconv(cin: int, cout: int) -> nn.ConvTranspose2d:
    """4x4 stride-2 transposed conv (x2 upsampling)."""
    return nn.ConvTranspose2d(cin, cout, 4, 2, 1)


def _deconv_prelu(cin: int, cout: int) -> nn.Sequential:
    """:func:`_deconv` followed by PReLU, as an indexed Sequential."""
    return nn.Sequential(_deconv(cin, cout), nn.PReLU(cout))


# ----------------------------------------------------------------------- RIFE_HD
class _SEResBlock(nn.Module):
    """Residual block with squeeze-excitation gating (RIFE_HD's IFNet/Context/Fusion)."""

    def __init__(self, cin: int, cout: int, stride: int, k: int, bn: bool) -> None:
        super().__init__()
        self.conv0 = (
            nn.Identity() if cin == cout and stride == 1
            else nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        )
        self.conv1 = _conv(cin, cout, k, stride, k // 2, bias=not bn, bn=bn)
        self.conv2 = _conv(cout, cout, 3, 1, 1, bias=not bn, bn=bn, act=None)
        self.relu1 = nn.PReLU(1)
        self.relu2 = nn.PReLU(cout)
        self.fc1 = nn.Conv2d(cout, 16, 1, bias=False)
        self.fc2 = nn.Conv2d(16, cout, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """``prelu(conv2(conv1(x)) * gate + shortcut(x))``."""
        y = self.conv0(x)
        x = self.conv2(self.conv1(x))
        gate = torch.sigmoid(self.fc2(self.relu1(self.fc1(x.mean(3, True).mean(2, True)))))
        out: Tensor = self.relu2(x * gate + y)
        return out


class _HDBlock(nn.Module):
    """One coarse-to-fine flow block of RIFE_HD's IFNet."""

    def __init__(self, cin: int, scale: int, c: int) -> None:
        super().__init__()
        self.scale = scale
        self.conv0 = _conv(cin, c, 5, 2, 2, bias=False, bn=True)
        for i in range(6):
            setattr(self, f"res{i}", _SEResBlock(c, c, 1, 5, bn=True))
        self.conv1 = nn.Conv2d(c, 8, 3, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        """2-channel flow at the input's resolution (values not rescaled)."""
        x = self.conv0(_resize(x, 1.0 / self.scale))
        for i in range(6):
            x = getattr(self, f"res{i}")(x)
        return _resize(F.pixel_shuffle(self.conv1(x), 2), self.scale)


class HDFlowNet(nn.Module):
    """RIFE_HD's IFNet: symmetric flow at half resolution (``flownet.pkl``)."""

    def __init__(self) -> None:
        super().__init__()
        self.block0 = _HDBlock(6, 8, 192)
        self.block1 = _HDBlock(8, 4, 128)
        self.block2 = _HDBlock(8, 2, 96)
        self.block3 = _HDBlock(8, 1, 48)

    def forward(self, x: Tensor, scale: float = 1.0) -> Tensor:
        """Flow (half-resolution pixels) from ``cat(img0, img1)`` at full resolution."""
        x = _resize(x, 0.5 * scale)
        x0, x1 = x[:, :3], x[:, 3:]
        flow = self.block0(x).float()  # flows accumulate in float32 under autocast
        for block in (self.block1, self.block2, self.block3):
            flow = flow + block(
                torch.cat((backward_warp(x0, flow), backward_warp(x1, -flow), flow), 1)
            ).float()
        return _resize(flow, 1.0 / scale) / scale


class HDContextNet(nn.Module):
    """RIFE_HD's context pyramid, warped by the flow (``contextnet.pkl``)."""

    def __init__(self, c: int = 32) -> None:
        super().__init__()
        self.conv0 = _conv(3, c, 3, 2, 1)
        self.conv1 = _SEResBlock(c, c, 2, 3, bn=False)
        self.conv2 = _SEResBlock(c, 2 * c, 2, 3, bn=False)
        self.conv3 = _SEResBlock(2 * c, 4 * c, 2, 3, bn=False)
        self.conv4 = _SEResBlock(4 * c, 8 * c, 2, 3, bn=False)

    def forward(self, x: Tensor, flow: Tensor) -> list[Tensor]:
        """Four features at 1/4..1/32 resolution, each warped by the resized flow."""
        x = self.conv0(x)
        feats = []
        for layer in (self.conv1, self.conv2, self.conv3, self.conv4):
            x = layer(x)
            flow = _resize(flow, 0.5) * 0.5
            feats.append(backward_warp(x, flow))
        return feats


class HDFusionNet(nn.Module):
    """RIFE_HD's refinement U-Net (``unet.pkl``): residual and blend mask."""

    def __init__(self, c: int = 32) -> None:
        super().__init__()
        self.conv0 = _conv(8, c, 3, 2, 1)
        self.down0 = _SEResBlock(c, 2 * c, 2, 3, bn=False)
        self.down1 = _SEResBlock(4 * c, 4 * c, 2, 3, bn=False)
        self.down2 = _SEResBlock(8 * c, 8 * c, 2, 3, bn=False)
        self.down3 = _SEResBlock(16 * c, 16 * c, 2, 3, bn=False)
        self.up0 = _deconv_prelu(32 * c, 8 * c)
        self.up1 = _deconv_prelu(16 * c, 4 * c)
        self.up2 = _deconv_prelu(8 * c, 2 * c)
        self.up3 = _deconv_prelu(4 * c, c)
        self.conv = nn.Conv2d(c, 16, 3, 1, 1)

    def forward(
        self, w0: Tensor, w1: Tensor, flow: Tensor, c0: list[Tensor], c1: list[Tensor]
    ) -> Tensor:
        """4-channel refinement (3 residual + 1 mask logits) at full resolution."""
        s0 = self.down0(self.conv0(torch.cat((w0, w1, flow), 1)))
        s1 = self.down1(torch.cat((s0, c0[0], c1[0]), 1))
        s2 = self.down2(torch.cat((s1, c0[1], c1[1]), 1))
        s3 = self.down3(torch.cat((s2, c0[2], c1[2]), 1))
        x = self.up0(torch.cat((s3, c0[3], c1[3]), 1))
        x = self.up1(torch.cat((x, s2), 1))
        x = self.up2(torch.cat((x, s1), 1))
        x = self.up3(torch.cat((x, s0), 1))
        return F.pixel_shuffle(self.conv(x), 2)


class RifeHDNet(nn.Module):
    """The three RIFE_HD networks together; ``forward`` is atlinter's ``inference``."""

    def __init__(self) -> None:
        super().__init__()
        self.flownet = HDFlowNet()
        self.contextnet = HDContextNet()
        self.fusionnet = HDFusionNet()

    def forward(self, img0: Tensor, img1: Tensor, scale: float = 1.0) -> Tensor:
        """Midpoint frame in [0, 1]."""
        flow = self.flownet(torch.cat((img0, img1), 1), scale)
        c0 = self.contextnet(img0, flow)
        c1 = self.contextnet(img1, -flow)
        flow = _resize(flow, 2.0) * 2.0
        w0, w1 = backward_warp(img0, flow), backward_warp(img1, -flow)
        refine = self.fusionnet(w0, w1, flow, c0, c1)
        res = torch.sigmoid(refine[:, :3]) * 2 - 1
        mask = torch.sigmoid(refine[:, 3:4])
        return torch.clamp(w0 * mask + w1 * (1 - mask) + res, 0, 1)


# ------------------------------------------------------------------------ RIFE v3
class _V3Block(nn.Module):
    """HDv3 IFBlock: flow (4 ch) and mask heads by transposed convolutions."""

    def __init__(self, cin: int, c: int) -> None:
        super().__init__()
        self.conv0 = nn.Sequential(_conv(cin, c // 2, 3, 2, 1), _conv(c // 2, c, 3, 2, 1))
        for i in range(4):
            setattr(self, f"convblock{i}", nn.Sequential(_conv(c, c), _conv(c, c)))
        self.conv1 = nn.Sequential(_deconv(c, c // 2), nn.PReLU(c // 2), _deconv(c // 2, 4))
        self.conv2 = nn.Sequential(_deconv(c, c // 2), nn.PReLU(c // 2), _deconv(c // 2, 1))

    def forward(self, x: Tensor, flow: Tensor, scale: float) -> tuple[Tensor, Tensor]:
        """Flow and mask increments at the input's resolution."""
        x = _resize(x, 1.0 / scale)
        flow = _resize(flow, 1.0 / scale) * (1.0 / scale)
        feat = self.conv0(torch.cat((x, flow), 1))
        for i in range(4):
            feat = getattr(self, f"convblock{i}")(feat) + feat
        return _resize(self.conv1(feat), scale) * scale, _resize(self.conv2(feat), scale)


class RifeV3Net(nn.Module):
    """RIFE HDv3's IFNet (3 blocks, each averaged over both directions); midpoint."""

    def __init__(self, c: int = 90) -> None:
        super().__init__()
        self.block0 = _V3Block(7 + 4, c)
        self.block1 = _V3Block(7 + 4, c)
        self.block2 = _V3Block(7 + 4, c)

    def forward(self, img0: Tensor, img1: Tensor, scale: float = 1.0) -> Tensor:
        """Midpoint frame (``merged[2]`` of the original)."""
        n, _, h, w = img0.shape
        flow = img0.new_zeros((n, 4, h, w), dtype=torch.float32)
        mask = img0.new_zeros((n, 1, h, w), dtype=torch.float32)
        w0, w1 = img0, img1
        for block, s in zip((self.block0, self.block1, self.block2), (4, 2, 1)):
            f0, m0 = block(torch.cat((w0, w1, mask), 1), flow, s / scale)
            f1, m1 = block(torch.cat((w1, w0, -mask), 1), _swap(flow), s / scale)
            flow = flow + (f0.float() + _swap(f1.float())) / 2
            mask = mask + (m0.float() - m1.float()) / 2
            w0, w1 = backward_warp(img0, flow[:, :2]), backward_warp(img1, flow[:, 2:4])
        m = torch.sigmoid(mask)
        return w0 * m + w1 * (1 - m)


# ------------------------------------------------------------------------ RIFE v4
class _ResConv(nn.Module):
    """``leaky(conv(x) * beta + x)`` (RIFE 4.2x)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 1, 1)
        self.beta = nn.Parameter(torch.ones((1, c, 1, 1)))

    def forward(self, x: Tensor) -> Tensor:
        """Scaled residual convolution."""
        return F.leaky_relu(self.conv(x) * self.beta + x, 0.2)


class _Head(nn.Module):
    """RIFE 4.2x per-image feature encoder (``encode``): 4 channels, full resolution."""

    def __init__(self) -> None:
        super().__init__()
        self.cnn0 = nn.Conv2d(3, 16, 3, 2, 1)
        self.cnn1 = nn.Conv2d(16, 16, 3, 1, 1)
        self.cnn2 = nn.Conv2d(16, 16, 3, 1, 1)
        self.cnn3 = nn.ConvTranspose2d(16, 4, 4, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        """Features of one image."""
        x = F.leaky_relu(self.cnn0(x), 0.2)
        x = F.leaky_relu(self.cnn1(x), 0.2)
        x = F.leaky_relu(self.cnn2(x), 0.2)
        features: Tensor = self.cnn3(x)
        return features


class _V4Block(nn.Module):
    """RIFE 4.x IFBlock; ``modern`` selects the 4.2x form (ResConv, PixelShuffle head)."""

    def __init__(self, cin: int, c: int, modern: bool, out: int) -> None:
        super().__init__()
        act = "leaky" if modern else "prelu"
        self.modern = modern
        self.conv0 = nn.Sequential(
            _conv(cin, c // 2, 3, 2, 1, act=act), _conv(c // 2, c, 3, 2, 1, act=act)
        )
        self.lastconv: nn.Module
        if modern:
            self.convblock = nn.Sequential(*[_ResConv(c) for _ in range(8)])
            self.lastconv = nn.Sequential(_deconv(c, 4 * out), nn.PixelShuffle(2))
        else:
            self.convblock = nn.Sequential(*[_conv(c, c) for _ in range(8)])
            self.lastconv = _deconv(c, out)

    def forward(self, x: Tensor, flow: Tensor | None, scale: float) -> Tensor:
        """Flow (4), mask logits (1) and, for 4.2x, features, at the input resolution."""
        x = _resize(x, 1.0 / scale)
        if flow is not None:
            x = torch.cat((x, _resize(flow, 1.0 / scale) * (1.0 / scale)), 1)
        feat = self.conv0(x)
        feat = self.convblock(feat) if self.modern else self.convblock(feat) + feat
        up = scale if self.modern else scale * 2
        tmp = _resize(self.lastconv(feat), up)
        return torch.cat((tmp[:, :4] * up, tmp[:, 4:]), 1)


class RifeV4Net(nn.Module):
    """RIFE 4.x IFNet with a timestep input: 4.0 layout or 4.2x (``modern``) layout."""

    def __init__(self, widths: tuple[int, ...], modern: bool, feat: int = 8) -> None:
        super().__init__()
        self.modern = modern
        self.scales = tuple(2 ** i for i in reversed(range(len(widths))))
        enc = 8 if modern else 0  # two 4-channel encoded images
        out = 5 + (feat if modern else 0)
        for i, c in enumerate(widths):
            cin = 7 + enc if i == 0 else 8 + 4 + enc + (feat if modern else 0)
            setattr(self, f"block{i}", _V4Block(cin, c, modern, out))
        if modern:
            self.encode = _Head()

    def forward(
        self, img0: Tensor, img1: Tensor, t: Tensor, scale: float = 1.0, ensemble: bool = False
    ) -> Tensor:
        """Frame at ``t`` (``(B,)``) between ``img0`` and ``img1``.

        ``ensemble`` (4.0 layout only, as in the original) runs every block on the
        swapped pair at ``1 - t`` too and averages the two flow and mask increments.
        """
        n, _, h, w = img0.shape
        ts = t.to(img0.dtype).view(n, 1, 1, 1).expand(n, 1, h, w)
        extra: tuple[Tensor, ...] = ()
        if self.modern:
            e0, e1 = self.encode(img0), self.encode(img1)
            extra = (e0, e1)
        blocks = [getattr(self, f"block{i}") for i in range(len(self.scales))]
        s = self.scales[0] / scale
        out = blocks[0](torch.cat((img0, img1, *extra, ts), 1), None, s)
        if ensemble:
            out = _average(out, blocks[0](torch.cat((img1, img0, 1 - ts), 1), None, s))
        flow, mask, feat = out[:, :4].float(), out[:, 4:5].float(), out[:, 5:]
        w0, w1 = backward_warp(img0, flow[:, :2]), backward_warp(img1, flow[:, 2:4])
        for block, level in zip(blocks[1:], self.scales[1:]):
            s = level / scale
            if self.modern:
                extra = (backward_warp(e0, flow[:, :2]), backward_warp(e1, flow[:, 2:4]))
                x = torch.cat((w0, w1, *extra, ts, mask, feat), 1)
            else:
                x = torch.cat((w0, w1, ts, mask), 1)
            out = block(x, flow, s)
            if ensemble:
                x = torch.cat((w1, w0, 1 - ts, -mask), 1)
                out = _average(out, block(x, _swap(flow), s))
            flow = flow + out[:, :4].float()
            mask = out[:, 4:5].float() if self.modern else mask + out[:, 4:5].float()
            feat = out[:, 5:]
            w0, w1 = backward_warp(img0, flow[:, :2]), backward_warp(img1, flow[:, 2:4])
        m = torch.sigmoid(mask)
        return w0 * m + w1 * (1 - m)
