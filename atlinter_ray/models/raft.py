"""RAFT (Teed & Deng, ECCV 2020) optical flow, large (``raft``) and small (``raft_small``).

Loads the original ``raft-things.pth`` / ``raft-small.pth`` unchanged: zip-format
files holding the state dict of ``DataParallel(RAFT(args))`` (every key starts with
``module.``). The module tree keeps the file's key names; in the large model's context
encoder the strided blocks' ``norm3`` and ``downsample.1`` are one BatchNorm, so the
file stores it twice (sharing storage) and the model expects both keys, as the original.

Forward on ``(B, 3, H, W)`` in ``[0, 255]``, H and W multiples of 8::

    fmap1, fmap2 = fnet(2 * a / 255 - 1), fnet(2 * b / 255 - 1)   # stride 8, per sample
    h, ctx = split(cnet(a)) -> tanh(h), relu(ctx)                  # hidden, context
    corr = pyramid of avg-pooled fmap1 . fmap2 / sqrt(C)           # 4 levels
    coords = grid (x, y) at stride 8
    repeat iters times:
        h, delta = update(h, ctx, lookup(corr, coords), coords - grid)
        coords += delta
    flow = upsample8(coords - grid)      # convex (large) or bilinear (small)

The lookup samples each level at ``coords / 2**level + (dx, dy)`` for integer offsets in
``[-r, r]`` (r = 4 large, 3 small), bilinear with zeros outside; the ``(2r+1)**2``
channels run with the x offset as the slow index (the original's order, which the
weights depend on).

**Flow convention.** RAFT's flow is ``coords1 - coords0``: the feature of ``a`` at
``x`` is matched in ``b`` at ``x + F(x)``, so ``a(x) ≈ b(x + F(x))`` with channel 0 the x
(column) and channel 1 the y (row) displacement: exactly our (OpenCV's) convention,
so the flow is returned as RAFT computes it, no sign flip or channel swap. (The
predecessor's ``warp_image`` read channel 0 as rows and sampled at ``x - F``; that is
its bug, not RAFT's convention.)

Differences from the predecessor, none of which changes its numbers on valid input:

* input is scaled as ``x * 255 / peak`` in float; the predecessor truncated float
  input in ``[0, 1]`` to uint8 steps first (its numbers are reproduced exactly on
  integer-valued input, e.g. uint8 data with ``peak=255``);
* images are zero-padded at the bottom/right to a multiple of 8 and the flow cropped,
  as the predecessor did (the runtime does this), and further to 64 px a side
  (:data:`MIN_SIDE`) when smaller, where the original stopped with "Output size is too
  small";
* the correlation lookup maps pixel to grid coordinates with ``align_corners=False``,
  so a pyramid level one pixel wide (images under 128 px) samples correctly where the
  original divided by zero and returned NaN;
* the convex-upsampling mask is computed once, after the last iteration, instead of at
  every iteration (the same result, ~10 % less work); pairs run batched.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from atlinter_ray.errors import ConfigError
from atlinter_ray.models.base import register_model
from atlinter_ray.models.torch_runtime import TorchFlowEstimator, load_weights

#: Default number of refinement iterations (the predecessor's choice).
ITERS = 20
#: Smallest side the network runs on: the pyramid pools the 1/8-scale features 3 times.
MIN_SIDE = 64
#: Levels of the correlation pyramid.
CORR_LEVELS = 4


def _norm(kind: str, channels: int) -> nn.Module:
    """The normalisation layer RAFT's encoders use: batch, instance (no affine) or none."""
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "instance":
        return nn.InstanceNorm2d(channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r}: use batch, instance or none")


class ResidualBlock(nn.Module):
    """Two 3x3 convs with norm and ReLU; a strided block projects its shortcut."""

    def __init__(self, cin: int, cout: int, norm: str, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, stride=stride)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.norm1, self.norm2 = _norm(norm, cout), _norm(norm, cout)
        self.downsample: nn.Module | None = None
        if stride != 1:
            # One module under two names, as in the checkpoint.
            self.norm3 = _norm(norm, cout)
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride), self.norm3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``relu(shortcut(x) + relu(n2(c2(relu(n1(c1(x)))))))``."""
        y = F.relu(self.norm1(self.conv1(x)))
        y = F.relu(self.norm2(self.conv2(y)))
        if self.downsample is not None:
            x = self.downsample(x)
        return F.relu(x + y)


class BottleneckBlock(nn.Module):
    """1x1 - 3x3 - 1x1 bottleneck (a quarter of the width inside), used by small RAFT."""

    def __init__(self, cin: int, cout: int, norm: str, stride: int = 1) -> None:
        super().__init__()
        mid = cout // 4
        self.conv1 = nn.Conv2d(cin, mid, 1)
        self.conv2 = nn.Conv2d(mid, mid, 3, padding=1, stride=stride)
        self.conv3 = nn.Conv2d(mid, cout, 1)
        self.norm1, self.norm2, self.norm3 = _norm(norm, mid), _norm(norm, mid), _norm(norm, cout)
        self.downsample: nn.Module | None = None
        if stride != 1:
            self.norm4 = _norm(norm, cout)
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride), self.norm4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Bottleneck residual update."""
        y = F.relu(self.norm1(self.conv1(x)))
        y = F.relu(self.norm2(self.conv2(y)))
        y = F.relu(self.norm3(self.conv3(y)))
        if self.downsample is not None:
            x = self.downsample(x)
        return F.relu(x + y)


class Encoder(nn.Module):
    """Feature/context encoder: 7x7 stride-2 stem, three stages (strides 1, 2, 2), 1x1 out."""

    def __init__(self, widths: tuple[int, int, int, int], out: int, norm: str, small: bool):
        super().__init__()
        block = BottleneckBlock if small else ResidualBlock
        stem, w1, w2, w3 = widths
        self.conv1 = nn.Conv2d(3, stem, 7, stride=2, padding=3)
        self.norm1 = _norm(norm, stem)
        self.layer1 = nn.Sequential(block(stem, w1, norm), block(w1, w1, norm))
        self.layer2 = nn.Sequential(block(w1, w2, norm, 2), block(w2, w2, norm))
        self.layer3 = nn.Sequential(block(w2, w3, norm, 2), block(w3, w3, norm))
        self.conv2 = nn.Conv2d(w3, out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Features at stride 8."""
        x = F.relu(self.norm1(self.conv1(x)))
        features: torch.Tensor = self.conv2(self.layer3(self.layer2(self.layer1(x))))
        return features


def _gru_step(
    h: torch.Tensor, x: torch.Tensor, convz: nn.Module, convr: nn.Module, convq: nn.Module
) -> torch.Tensor:
    """One convolutional GRU update of the hidden state ``h`` from input ``x``."""
    hx = torch.cat([h, x], dim=1)
    z = torch.sigmoid(convz(hx))
    r = torch.sigmoid(convr(hx))
    q = torch.tanh(convq(torch.cat([r * h, x], dim=1)))
    return (1 - z) * h + z * q


class SepConvGRU(nn.Module):
    """Large RAFT's GRU: a (1x5) update, then a (5x1) update."""

    def __init__(self, hidden: int, inp: int) -> None:
        super().__init__()
        c = hidden + inp
        # (1x5) gates, then (5x1) gates, built in the original's order
        self.convz1 = nn.Conv2d(c, hidden, (1, 5), padding=(0, 2))
        self.convz2 = nn.Conv2d(c, hidden, (5, 1), padding=(2, 0))
        self.convr1 = nn.Conv2d(c, hidden, (1, 5), padding=(0, 2))
        self.convr2 = nn.Conv2d(c, hidden, (5, 1), padding=(2, 0))
        self.convq1 = nn.Conv2d(c, hidden, (1, 5), padding=(0, 2))
        self.convq2 = nn.Conv2d(c, hidden, (5, 1), padding=(2, 0))

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Horizontal then vertical GRU update."""
        h = _gru_step(h, x, self.convz1, self.convr1, self.convq1)
        return _gru_step(h, x, self.convz2, self.convr2, self.convq2)


class ConvGRU(nn.Module):
    """Small RAFT's GRU with 3x3 gates."""

    def __init__(self, hidden: int, inp: int) -> None:
        super().__init__()
        c = hidden + inp
        self.convz = nn.Conv2d(c, hidden, 3, padding=1)
        self.convr = nn.Conv2d(c, hidden, 3, padding=1)
        self.convq = nn.Conv2d(c, hidden, 3, padding=1)

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """One GRU update."""
        return _gru_step(h, x, self.convz, self.convr, self.convq)


class MotionEncoder(nn.Module):
    """Encodes correlation and current flow; appends the raw flow (2 channels)."""

    def __init__(self, corr_planes: int, small: bool) -> None:
        super().__init__()
        if small:
            self.convc1 = nn.Conv2d(corr_planes, 96, 1)
            self.convc2: nn.Module | None = None
            self.convf1 = nn.Conv2d(2, 64, 7, padding=3)
            self.convf2 = nn.Conv2d(64, 32, 3, padding=1)
            self.conv = nn.Conv2d(96 + 32, 80, 3, padding=1)
        else:
            self.convc1 = nn.Conv2d(corr_planes, 256, 1)
            self.convc2 = nn.Conv2d(256, 192, 3, padding=1)
            self.convf1 = nn.Conv2d(2, 128, 7, padding=3)
            self.convf2 = nn.Conv2d(128, 64, 3, padding=1)
            self.conv = nn.Conv2d(192 + 64, 128 - 2, 3, padding=1)

    def forward(self, flow: torch.Tensor, corr: torch.Tensor) -> torch.Tensor:
        """Motion features ``(B, out + 2, h, w)``."""
        c = F.relu(self.convc1(corr))
        if self.convc2 is not None:
            c = F.relu(self.convc2(c))
        f = F.relu(self.convf2(F.relu(self.convf1(flow))))
        return torch.cat([F.relu(self.conv(torch.cat([c, f], dim=1))), flow], dim=1)


class FlowHead(nn.Module):
    """Two 3x3 convs from the hidden state to a flow update."""

    def __init__(self, hidden: int, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(hidden, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2, 3, padding=1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """``(B, 2, h, w)`` flow update."""
        update: torch.Tensor = self.conv2(F.relu(self.conv1(h)))
        return update


class UpdateBlock(nn.Module):
    """Motion encoder, GRU and flow head; the large model also has the upsampling mask."""

    def __init__(self, corr_planes: int, hidden: int, context: int, small: bool) -> None:
        super().__init__()
        self.encoder = MotionEncoder(corr_planes, small)
        motion = 82 if small else 128
        if small:
            self.gru: nn.Module = ConvGRU(hidden, context + motion)
            self.flow_head = FlowHead(hidden, 128)
            self.mask: nn.Module | None = None
        else:
            self.gru = SepConvGRU(hidden, context + motion)
            self.flow_head = FlowHead(hidden, 256)
            self.mask = nn.Sequential(
                nn.Conv2d(hidden, 256, 3, padding=1), nn.ReLU(), nn.Conv2d(256, 64 * 9, 1)
            )

    def forward(
        self, h: torch.Tensor, ctx: torch.Tensor, corr: torch.Tensor, flow: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """New hidden state and flow update."""
        h = self.gru(h, torch.cat([ctx, self.encoder(flow, corr)], dim=1))
        return h, self.flow_head(h)


def pixel_grid(n: int, h: int, w: int, device: torch.device) -> torch.Tensor:
    """``(n, 2, h, w)`` pixel coordinates, channel 0 = x (column), 1 = y (row)."""
    ys, xs = torch.meshgrid(
        torch.arange(h, device=device, dtype=torch.float32),
        torch.arange(w, device=device, dtype=torch.float32),
        indexing="ij",
    )
    return torch.stack([xs, ys])[None].expand(n, 2, h, w)


class CorrPyramid:
    """All-pairs correlation of two feature maps, pooled into levels, with windowed lookup."""

    def __init__(self, f1: torch.Tensor, f2: torch.Tensor, radius: int) -> None:
        n, c, h, w = f1.shape
        corr = torch.bmm(f1.reshape(n, c, h * w).transpose(1, 2), f2.reshape(n, c, h * w))
        corr = (corr / torch.sqrt(torch.tensor(float(c)))).reshape(n * h * w, 1, h, w)
        self.levels = [corr]
        for _ in range(CORR_LEVELS - 1):
            corr = F.avg_pool2d(corr, 2, stride=2)
            self.levels.append(corr)
        self.radius = radius
        # Level sizes (x, y) as device tensors once: built inside the lookup they were
        # 4 host-device copies per iteration, 80 synchronisations per forward.
        self.sizes = [
            torch.tensor([c.shape[-1], c.shape[-2]], dtype=torch.float32).to(f1.device)
            for c in self.levels
        ]
        d = torch.arange(-radius, radius + 1, device=f1.device, dtype=torch.float32)
        # window[i, j] = (x offset d[i], y offset d[j]): x is the slow channel index.
        dx, dy = torch.meshgrid(d, d, indexing="ij")
        self.window = torch.stack([dx, dy], dim=-1)[None]  # (1, 2r+1, 2r+1, 2)

    def __call__(self, coords: torch.Tensor) -> torch.Tensor:
        """Correlation windows around ``coords`` ``(n, 2, h, w)``: ``(n, L*(2r+1)^2, h, w)``."""
        n, _, h, w = coords.shape
        centre = coords.permute(0, 2, 3, 1).reshape(n * h * w, 1, 1, 2)
        out = []
        for level, (corr, size) in enumerate(zip(self.levels, self.sizes)):
            pos = centre / 2**level + self.window  # pixel coordinates (x, y)
            grid = (2 * pos + 1) / size - 1  # align_corners=False: valid for any size
            sampled = F.grid_sample(corr, grid, mode="bilinear", align_corners=False)
            out.append(sampled.reshape(n, h, w, -1))
        return torch.cat(out, dim=-1).permute(0, 3, 1, 2).contiguous()


def convex_upsample(flow: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Upsample flow ``(n, 2, h, w)`` by 8: each fine pixel a convex mix of 3x3 coarse ones."""
    n, _, h, w = flow.shape
    weights = torch.softmax(mask.reshape(n, 1, 9, 8, 8, h, w), dim=2)
    patches = F.unfold(8 * flow, kernel_size=3, padding=1).reshape(n, 2, 9, 1, 1, h, w)
    fine = (weights * patches).sum(dim=2)  # (n, 2, 8 rows, 8 cols, h, w)
    return fine.permute(0, 1, 4, 2, 5, 3).reshape(n, 2, 8 * h, 8 * w)


class RAFTNet(nn.Module):
    """RAFT on ``(B, 3, H, W)`` tensors in ``[0, 255]``, H and W multiples of 8."""

    def __init__(self, small: bool = False, iters: int = ITERS) -> None:
        super().__init__()
        if iters < 1:
            raise ValueError(f"iters={iters}: RAFT needs at least one iteration")
        self.small, self.iters = small, iters
        if small:
            self.hidden, self.context, self.radius = 96, 64, 3
            widths = (32, 32, 64, 96)
            self.fnet = Encoder(widths, 128, "instance", small=True)
            self.cnet = Encoder(widths, self.hidden + self.context, "none", small=True)
        else:
            self.hidden, self.context, self.radius = 128, 128, 4
            widths = (64, 64, 96, 128)
            self.fnet = Encoder(widths, 256, "instance", small=False)
            self.cnet = Encoder(widths, self.hidden + self.context, "batch", small=False)
        planes = CORR_LEVELS * (2 * self.radius + 1) ** 2
        self.update_block = UpdateBlock(planes, self.hidden, self.context, small)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Flow ``(B, 2, H, W)`` from ``a`` to ``b``: ``a(x) ≈ b(x + F(x))``, x first."""
        n, _, hh, ww = a.shape
        if hh % 8 or ww % 8:
            raise ValueError(f"RAFT: H and W must be multiples of 8, got {hh}x{ww}")
        a, b = 2 * (a / 255.0) - 1, 2 * (b / 255.0) - 1
        fmaps = self.fnet(torch.cat([a, b])).float()
        with torch.autocast(a.device.type, enabled=False):  # correlation stays float32
            corr = CorrPyramid(fmaps[:n], fmaps[n:], self.radius)
        h, ctx = torch.split(self.cnet(a), [self.hidden, self.context], dim=1)
        h, ctx = torch.tanh(h), torch.relu(ctx)
        grid = pixel_grid(n, hh // 8, ww // 8, a.device)
        coords = grid.clone()
        for _ in range(self.iters):
            flow = coords - grid
            h, delta = self.update_block(h, ctx, corr(coords), flow)
            coords = coords + delta.float()
        flow = coords - grid
        if self.update_block.mask is None:
            return 8 * F.interpolate(flow, scale_factor=8, mode="bilinear", align_corners=True)
        return convex_upsample(flow, 0.25 * self.update_block.mask(h).float())


class _RAFT(TorchFlowEstimator):
    """RAFT flow estimator from an original checkpoint (shared by both sizes)."""

    small: ClassVar[bool] = False
    multiple = 8
    in_channels = 3
    input_range = 255.0

    def __init__(
        self,
        checkpoint: str | None = None,
        iters: int = ITERS,
        storage_options: dict[str, Any] | None = None,
        **runtime: Any,
    ) -> None:
        if not checkpoint:
            raise ConfigError(
                f"model {self.name!r} needs model.checkpoint: the path or URL of the "
                "original raft-things.pth or raft-small.pth file"
            )
        net = RAFTNet(small=self.small, iters=iters)
        digest = load_weights(net, checkpoint, storage_options=storage_options)
        super().__init__(net, digest, **runtime)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Flow from ``a`` to ``b`` on padded ``[0, 255]`` tensors (zero-padded to
        :data:`MIN_SIDE` when smaller, the flow cropped back)."""
        h, w = a.shape[-2:]
        pad = (0, max(MIN_SIDE - w, 0), 0, max(MIN_SIDE - h, 0))
        if any(pad):
            padded: torch.Tensor = self.module(F.pad(a, pad), F.pad(b, pad))
            return padded[..., :h, :w]
        flow: torch.Tensor = self.module(a, b)
        return flow

    def provenance(self) -> dict[str, Any]:
        """The runtime's provenance plus the iteration count."""
        return {**super().provenance(), "iters": self.module.iters}


@register_model("raft")
class RAFT(_RAFT):
    """RAFT large from the original ``raft-things.pth`` (or any large RAFT checkpoint).

    Example::

        model = build_model("raft", checkpoint="raft-things.pth", device="cpu")
        flow = model.flow(a, b, peak=255.0)  # (N, 2, H, W), a(x) ≈ b(x + flow(x))

    Args:
        checkpoint: path or fsspec URL of the ``.pth`` file (required).
        iters: refinement iterations (default 20, the predecessor's).
        storage_options: fsspec options for a remote ``checkpoint``.
        **runtime: device, precision, batch_size, tile, tile_overlap, channels_last
            (see :class:`~atlinter_ray.models.torch_runtime.TorchRuntime`).
    """

    small = False


@register_model("raft_small")
class RAFTSmall(_RAFT):
    """RAFT small from the original ``raft-small.pth``; arguments as :class:`RAFT`."""

    small = True
