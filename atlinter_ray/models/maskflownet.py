"""MaskFlowNet (Zhao et al., CVPR 2020) in plain PyTorch, loading the original MXNet weights.

This is the two-stage ``MaskFlownet`` network that the predecessor (atlinter 0.2.3)
runs through its vendored MXNet code, with the same pre- and post-processing, so the
original ``maskflownet.params`` gives the original flows (within 1e-3 px; see
``tests/test_models_maskflownet.py``). MXNet is never imported: the ``.params`` file
is read by :mod:`atlinter_ray.models.mxnet_params`.

Pipeline of one pair (what :meth:`MaskFlowNet.forward` does)::

    a, b in [0, 1], RGB (grayscale repeated)       optional: floor(255 x) / 255
      -> subtract the per-channel mean of a and b together
      -> bilinear resize (align_corners) to multiples of 64 when needed
      -> MaskFlownet_S: shared 6-level pyramid, correlation (max displacement 4),
         deformable-conv warping gated by a learned mask, dense decoders
      -> MaskFlownet: second pyramid on (a, 0) and (b warped by stage-1 flow,
         occlusion mask), correlation (max displacement 2), refined flows
      -> flow at 1/4 resolution x 20, upsampled x4 (triangle deconvolution)
      -> resized back (values scaled by the size ratio), channels (dy, dx) -> (dx, dy)

The flow follows OpenCV's convention ``a(x) ≈ b(x + F_ab(x))`` (channel 0 = x): that
is what MaskFlowNet's own ``Reconstruction2D`` warp assumes, so no sign change is
needed; only the channel order is flipped.

MXNet kernels reproduced in plain torch (each checked against mxnet 1.9.1):

* ``Correlation`` (kernel 1, stride 1): channel ``(dy+md)(2md+1) + (dx+md)`` holds
  ``sum_c f1(y, x) f2(y+dy, x+dx) / C``; outside the image is zero.
* ``DeformableConvolution`` (3x3, pad 1, one offset group): every tap is offset by the
  same (dy, dx); a sample whose position lies outside ``[0, H) x [0, W)`` is zero and
  one inside the last row/column is clamped to it (DCN v1's bilinear rule, not
  zero-padded bilinear).
* ``BilinearSampler`` (warp): bilinear with zero padding, pixel-exact grid.
* ``Upsample(f)``: edge-pad bottom/right, transposed conv with the separable
  triangle kernel ``1 - |c - i| / (c + 1)`` (size ``2f - 1``, stride f, pad f - 1),
  drop the last row and column.

Weights: Gluon's legacy names (``maskflownet_s0_hybridsequential0_conv1aweight``)
are mapped to module keys (``MaskFlownet_S.conv1a.0.weight``) by replaying Gluon's
naming over this module's layers, in the original's creation order; files saved
with ``save_parameters()`` (keys already equal to the module's) load as well.

Example::

    model = build_model("maskflownet", checkpoint="data/checkpoints/maskflownet.params")
    flow = model.flow(a, b, peak=255.0)  # (N, 2, H, W), x then y, pixels
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from atlinter_ray.errors import CheckpointError
from atlinter_ray.models.base import register_model
from atlinter_ray.models.checkpoint import describe_mismatch, load_strict
from atlinter_ray.models.mxnet_params import read_params
from atlinter_ray.models.torch_runtime import TorchFlowEstimator

#: Flow values of the network are in units of 20 pixels.
FLOW_SCALE = 20.0
#: Feature strides of pyramid levels 6 (coarsest) to 2.
STRIDES = (64, 32, 16, 8, 4)
#: Pyramid widths, levels 1 to 6.
PYRAMID = (16, 32, 64, 96, 128, 196)
#: Output widths of the five densely connected decoder convs of every level.
DENSE = (128, 128, 96, 64, 32)
#: The network's input size must be a multiple of this (the coarsest stride).
SIZE_MULTIPLE = 64
#: Width of the upsampled decoder features (``upfeat*``).
UPFEAT = 16


def _leaky(x: torch.Tensor) -> torch.Tensor:
    """MaskFlowNet's activation: LeakyReLU with slope 0.1."""
    return F.leaky_relu(x, 0.1)


def _conv(
    cin: int, cout: int, stride: int = 1, dilation: int = 1, act: bool = True
) -> nn.Sequential:
    """A 3x3 conv (+ LeakyReLU), wrapped like Gluon's ``HybridSequential`` (key ``.0.``)."""
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation)
    ]
    if act:
        layers.append(nn.LeakyReLU(0.1, inplace=True))
    return nn.Sequential(*layers)


def _deconv(cin: int, cout: int) -> nn.Sequential:
    """A 4x4 stride-2 transposed conv + LeakyReLU (``upfeat*``)."""
    return nn.Sequential(
        nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1), nn.LeakyReLU(0.1, inplace=True)
    )


def correlation(f1: torch.Tensor, f2: torch.Tensor, md: int) -> torch.Tensor:
    """FlowNet correlation, kernel 1: ``(N, (2md+1)^2, H, W)``, dy-major channels, / C.

    One vectorised product per row offset ``dy`` (all ``dx`` at once through an
    ``unfold`` view) rather than one per displacement: few, large ops. Always float32:
    in fp16 the sum of up to 196 products of bright features overflows before the
    division by C.
    """
    if f1.dtype != torch.float32 or f2.dtype != torch.float32:
        with torch.autocast(f1.device.type, enabled=False):
            return correlation(f1.float(), f2.float(), md)
    n, c, h, w = f1.shape
    side = 2 * md + 1
    a = f1.permute(0, 2, 3, 1).unsqueeze(-1)  # (N, H, W, C, 1)
    b = F.pad(f2, (md, md, md, md)).permute(0, 2, 3, 1)  # (N, H + 2md, W + 2md, C)
    out = f1.new_empty((n, h, w, side, side))
    for dy in range(side):
        band = b[:, dy : dy + h].unfold(2, side, 1)  # (N, H, W, C, dx)
        out[:, :, :, dy] = (a * band).sum(3)
    return out.view(n, h, w, side * side).permute(0, 3, 1, 2) / c


def _normalised(coord: torch.Tensor, size: int) -> torch.Tensor:
    """Pixel coordinates as ``grid_sample``'s [-1, 1] (align_corners=True)."""
    if size == 1:
        return torch.zeros_like(coord)
    return coord * (2.0 / (size - 1)) - 1.0


def _coords(n: int, device: torch.device) -> torch.Tensor:
    """``0 .. n-1`` as float32 (in bf16 ``arange`` is off by a pixel above 256)."""
    return torch.arange(n, dtype=torch.float32, device=device)


def warp(x: torch.Tensor, flow_yx: torch.Tensor) -> torch.Tensor:
    """Sample ``x`` at ``p + flow(p)`` (flow channels dy, dx), zero outside (MXNet's warp).

    Coordinates, flow and sampling in float32 whatever the autocast precision.
    """
    n, _, h, w = x.shape
    flow_yx = flow_yx.float()
    ys = _coords(h, x.device).view(1, h, 1)
    xs = _coords(w, x.device).view(1, 1, w)
    grid = torch.stack(
        [_normalised(xs + flow_yx[:, 1], w), _normalised(ys + flow_yx[:, 0], h)], dim=-1
    )
    with torch.autocast(x.device.type, enabled=False):
        return F.grid_sample(
            x.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=True
        )


def upsample(x: torch.Tensor, factor: int) -> torch.Tensor:
    """MaskFlowNet's ``Upsample``: separable triangle-kernel transposed conv, per channel.

    Float32 whatever the autocast precision: it upsamples flows (units of 20 px).
    """
    n, c, h, w = x.shape
    size = 2 * factor - 1
    centre = size // 2
    taps = 1.0 - (centre - _coords(size, x.device)).abs() / (centre + 1)
    kernel = (taps[:, None] * taps[None, :]).view(1, 1, size, size)
    with torch.autocast(x.device.type, enabled=False):
        y = F.pad(x.float().reshape(n * c, 1, h, w), (0, 1, 0, 1), mode="replicate")
        y = F.conv_transpose2d(y, kernel, stride=factor, padding=factor - 1)
    return y[..., :-1, :-1].reshape(n, c, h * factor, w * factor)


class DeformConv2d(nn.Module):
    """3x3 deformable conv whose 9 taps share one offset per pixel (MXNet DCN v1 sampling)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(channels, channels, 3, 3))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor, offset_yx: torch.Tensor) -> torch.Tensor:
        """Convolve ``x`` sampled at ``p + tap + offset(p)``; ``offset_yx`` is ``(N, 2, H, W)``."""
        n, c, h, w = x.shape
        offset_yx = offset_yx.float()  # sampling positions in float32 whatever autocast does
        taps = _coords(3, x.device) - 1.0
        ys = _coords(h, x.device).view(1, 1, 1, h, 1)
        xs = _coords(w, x.device).view(1, 1, 1, 1, w)
        # (N, 3 rows of taps, 3 columns of taps, H, W) sampling positions, row-major taps
        py = ys + taps.view(1, 3, 1, 1, 1) + offset_yx[:, 0].view(n, 1, 1, h, w)
        px = xs + taps.view(1, 1, 3, 1, 1) + offset_yx[:, 1].view(n, 1, 1, h, w)
        py, px = torch.broadcast_tensors(py, px)  # type: ignore[no-untyped-call]  # unannotated in torch
        inside = (py >= 0) & (py < h) & (px >= 0) & (px < w)
        grid = torch.stack(
            [_normalised(px.clamp(0, w - 1), w), _normalised(py.clamp(0, h - 1), h)], dim=-1
        ).reshape(n, 9 * h, w, 2)
        with torch.autocast(x.device.type, enabled=False):
            sampled = F.grid_sample(
                x.float(), grid, mode="bilinear", padding_mode="border", align_corners=True
            ).reshape(n, c, 9, h, w)
        cols = (sampled * inside.reshape(n, 1, 9, h, w).float()).reshape(n, c * 9, h * w)
        out = torch.matmul(self.weight.reshape(self.weight.shape[0], c * 9), cols)
        return out.reshape(n, -1, h, w) + self.bias.view(1, -1, 1, 1)


def _offset(flow: torch.Tensor, stride: int) -> torch.Tensor:
    """A level's flow (units of 20 px at full resolution) as pixels at that level."""
    return flow * FLOW_SCALE / stride


class _Base(nn.Module):
    """Layers both stages share in name and shape: pyramid, dense decoders, heads."""

    #: Built by :meth:`_decoders` with the other levels' heads; level 6 is called by name.
    pred_flow6: nn.Conv2d

    def _pyramid(self, names: str, cin: int) -> None:
        """Three convs per level (``conv1a``/``conv1b``/``conv1c``...), first stride 2."""
        for level, cout in enumerate(PYRAMID, start=1):
            for k, suffix in enumerate(names):
                setattr(self, f"conv{level}{suffix}", _conv(cin, cout, stride=2 if k == 0 else 1))
                cin = cout

    def _decoders(self, level_inputs: tuple[int, ...]) -> None:
        """Dense decoders of levels 6..2, dilated context convs, upfeat and flow heads."""
        for level, cin in zip((6, 5, 4, 3, 2), level_inputs):
            for k, cout in enumerate(DENSE):
                setattr(self, f"conv{level}_{k}", _conv(cin, cout))
                cin += cout
        cin = level_inputs[-1] + sum(DENSE)
        for k, (cout, dil) in enumerate(
            zip((128, 128, 128, 96, 64, 32), (1, 2, 4, 8, 16, 1)), start=1
        ):
            setattr(self, f"dc_conv{k}", _conv(cin, cout, dilation=dil))
            cin = cout
        self.dc_conv7 = nn.Conv2d(32, 2, 3, padding=1)
        ends = [c + sum(DENSE) for c in level_inputs]
        for level, cin in zip((5, 4, 3, 2), ends):
            setattr(self, f"upfeat{level}", _deconv(cin, UPFEAT))
        for level, cin in zip((6, 5, 4, 3, 2), ends):
            setattr(self, f"pred_flow{level}", nn.Conv2d(cin, 2, 3, padding=1))

    def _dense(self, level: int, parts: list[torch.Tensor]) -> torch.Tensor:
        """Densely connected decoder on ``cat(parts)``: each conv's output is prepended.

        One buffer holds the final ``[conv4, conv3, ..., conv0, *parts]`` stack and is
        filled from the end, instead of concatenating (copying) it five times.
        """
        first = parts[0]
        width = sum(p.shape[1] for p in parts)
        total = width + sum(DENSE)
        buf = first.new_empty((first.shape[0], total, *first.shape[2:]))
        start = total - width
        for p in parts:
            buf[:, start : start + p.shape[1]] = p
            start += p.shape[1]
        start = total - width
        for k, cout in enumerate(DENSE):
            y = getattr(self, f"conv{level}_{k}")(buf[:, start:])
            start -= cout
            buf[:, start : start + cout] = y
        return buf

    def _context(self, x: torch.Tensor) -> torch.Tensor:
        """Dilated context network: a residual flow at level 2."""
        for k in range(1, 7):
            x = getattr(self, f"dc_conv{k}")(x)
        residual: torch.Tensor = self.dc_conv7(x)
        return residual

    def _features(self, x: torch.Tensor, names: str) -> list[torch.Tensor]:
        """Pyramid features of levels 1..6."""
        feats = []
        for level in range(1, 7):
            for suffix in names:
                x = getattr(self, f"conv{level}{suffix}")(x)
            feats.append(x)
        return feats


class MaskFlownetS(_Base):
    """First stage: asymmetric occlusion-aware feature matching (md = 4)."""

    md = 4
    #: Built in :meth:`__init__` with the other levels' masks.
    pred_mask6: nn.Conv2d

    def __init__(self) -> None:
        super().__init__()
        corr = (2 * self.md + 1) ** 2
        # Creation order = Gluon's hybridsequential numbering; keep it.
        self._pyramid("abc", 3)
        self._decoders((corr,) + tuple(corr + c + UPFEAT + 2 for c in PYRAMID[4:0:-1]))
        ends = [corr + sum(DENSE)] + [corr + c + UPFEAT + 2 + sum(DENSE) for c in PYRAMID[4:1:-1]]
        for level, cin in zip((6, 5, 4, 3), ends):
            setattr(self, f"pred_mask{level}", nn.Conv2d(cin, 1, 3, padding=1))
        for level, c in zip((5, 4, 3, 2), PYRAMID[4:0:-1]):
            setattr(self, f"deform{level}", DeformConv2d(c))
        for level, c in zip((5, 4, 3, 2), PYRAMID[4:0:-1]):
            setattr(self, f"conv{level}f", _conv(UPFEAT, c, act=False))

    def forward(self, im1: torch.Tensor, im2: torch.Tensor) -> dict[str, Any]:
        """Flows of levels 6..2 (units of 20 px, dy/dx), features, and stage-2 inputs."""
        n = im1.shape[0]
        both = self._features(torch.cat([im1, im2]), "abc")
        c1 = [f[:n] for f in both]
        c2 = [f[n:] for f in both]
        x = self._dense(6, [_leaky(correlation(c1[5], c2[5], self.md))])
        flow = self.pred_flow6(x).float()  # flows accumulate in float32 under autocast
        mask = self.pred_mask6(x)
        flows = [flow]
        for level in (5, 4, 3, 2):
            i = level - 1
            feat = getattr(self, f"upfeat{level}")(x)
            flow = upsample(flow, 2)
            mask = upsample(mask, 2)
            warped = getattr(self, f"deform{level}")(c2[i], _offset(flow, STRIDES[6 - level]))
            warped = _leaky(warped * torch.sigmoid(mask) + getattr(self, f"conv{level}f")(feat))
            corr = _leaky(correlation(c1[i], warped, self.md))
            x = self._dense(level, [corr, c1[i], feat, flow])
            flow = flow + getattr(self, f"pred_flow{level}")(x).float()
            if level > 2:
                mask = getattr(self, f"pred_mask{level}")(x)
            flows.append(flow)
        flow = flow + self._context(x).float()
        flows[-1] = flow
        occlusion = torch.sigmoid(upsample(mask, 4)) - 0.5
        im2_warped = warp(im2, upsample(flow, 4) * FLOW_SCALE)
        return {
            "flows": flows,
            "c1": c1,
            # The original passes image 1's features at levels 2 and 3 (c12, c13) as
            # "image 2" features to the second stage; reproduce it.
            "c2": [c2[0], c1[1], c1[2], c2[3], c2[4], c2[5]],
            "im1": torch.cat([im1, torch.zeros_like(occlusion)], dim=1),
            "im2": torch.cat([im2_warped, occlusion], dim=1),
        }


class MaskFlownetNet(_Base):
    """Both stages: ``MaskFlownet_S`` then the refinement stage (md = 2)."""

    md = 2

    def __init__(self) -> None:
        super().__init__()
        corr = (2 * self.md + 1) ** 2
        self.MaskFlownet_S = MaskFlownetS()
        self._pyramid("xyz", 4)
        self._decoders(
            (2 * corr + 2,) + tuple(c + UPFEAT + 2 * corr + 4 for c in PYRAMID[4:0:-1])
        )
        for level, c in zip((6, 5, 4, 3, 2), PYRAMID[5:0:-1]):
            setattr(self, f"deform{level}", DeformConv2d(c))

    def forward(self, im1: torch.Tensor, im2: torch.Tensor) -> torch.Tensor:
        """Flow ``(N, 2, H/4, W/4)`` in pixels of the input, channels (dy, dx)."""
        s = self.MaskFlownet_S(im1, im2)
        n = im1.shape[0]
        both = self._features(torch.cat([s["im1"], s["im2"]]), "xyz")
        c3 = [f[:n] for f in both]
        c4 = [f[n:] for f in both]
        c1, c2, stage1 = s["c1"], s["c2"], s["flows"]
        flow: torch.Tensor = stage1[0]
        x = self._dense(6, [*self._correlations(6, flow, c1, c2, c3, c4), flow])
        flow = flow + self.pred_flow6(x).float()
        for level in (5, 4, 3, 2):
            i = level - 1
            feat = getattr(self, f"upfeat{level}")(x)
            flow = upsample(flow, 2)
            corr_u, corr_v = self._correlations(level, flow, c1, c2, c3, c4)
            x = self._dense(level, [c1[i], feat, corr_u, corr_v, flow, stage1[6 - level]])
            flow = flow + getattr(self, f"pred_flow{level}")(x).float()
        flow = flow + self._context(x).float()
        return flow * FLOW_SCALE

    def _correlations(
        self,
        level: int,
        flow: torch.Tensor,
        c1: list[torch.Tensor],
        c2: list[torch.Tensor],
        c3: list[torch.Tensor],
        c4: list[torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A level's two correlations: of stage 1's features (image 2's deformed by
        ``flow``), and of this stage's own."""
        i = level - 1
        warped = _leaky(getattr(self, f"deform{level}")(c2[i], _offset(flow, STRIDES[6 - level])))
        return (
            _leaky(correlation(c1[i], warped, self.md)),
            _leaky(correlation(c3[i], c4[i], self.md)),
        )


def legacy_names(net: MaskFlownetNet) -> dict[str, str]:
    """Gluon legacy parameter name -> module key, replaying Gluon's prefix counters.

    Inside each stage's name scope every ``HybridSequential`` gets the next
    ``hybridsequential<i>_`` prefix in creation order; other layers use their own
    prefix. The top-level ``maskflownet0_`` is stripped, the first stage keeps
    ``maskflownet_s0_``.
    """
    names: dict[str, str] = {}
    for scope, module, path in (
        ("maskflownet_s0_", net.MaskFlownet_S, "MaskFlownet_S."),
        ("", net, ""),
    ):
        counter = 0
        for child_name, child in module.named_children():
            if isinstance(child, MaskFlownetS):
                continue
            if isinstance(child, nn.Sequential):
                prefix = f"{scope}hybridsequential{counter}_{child_name}"
                counter += 1
                params = child[0].named_parameters()
                key = f"{path}{child_name}.0."
            else:
                prefix = f"{scope}{child_name}"
                params = child.named_parameters()
                key = f"{path}{child_name}."
            for pname, _ in params:
                names[prefix + pname] = key + pname
    return names


def remap_params(
    net: MaskFlownetNet, arrays: Mapping[str, np.ndarray], url: str
) -> dict[str, torch.Tensor]:
    """The file's arrays under module keys; a mismatch names keys as the file spells them."""
    if arrays and all("." in k for k in arrays):  # save_parameters(): structural names
        return {k: torch.from_numpy(np.asarray(v, dtype=np.float32)) for k, v in arrays.items()}
    mapping = legacy_names(net)
    missing = sorted(set(mapping) - set(arrays))
    unexpected = sorted(set(arrays) - set(mapping))
    if missing or unexpected:
        listing = describe_mismatch(missing_arrays=missing, unexpected_arrays=unexpected)
        raise CheckpointError(
            f"checkpoint {url} does not match the MaskFlownet architecture (legacy Gluon "
            f"names): {listing}. model.name=maskflownet takes the original "
            "maskflownet.params (MaskFlownet, both stages)"
        )
    return {
        mapping[k]: torch.from_numpy(np.asarray(v, dtype=np.float32)) for k, v in arrays.items()
    }


def load_network(
    url: str, storage_options: Mapping[str, Any] | None = None
) -> tuple[MaskFlownetNet, str]:
    """Build the network and load the original ``.params`` strictly; return it and sha256."""
    arrays, digest = read_params(url, storage_options)
    net = MaskFlownetNet()
    load_strict(net, remap_params(net, arrays, url), url)
    return net, digest


@register_model("maskflownet")
class MaskFlowNet(TorchFlowEstimator):
    """MaskFlowNet flow estimator with atlinter's preprocessing; OpenCV flow convention.

    Args:
        checkpoint: path or fsspec URL of the original ``maskflownet.params``.
        storage_options: fsspec options for ``checkpoint`` (default none).
        quantize_8bit: truncate inputs to 8 bits (``floor(255 x) / 255``) as atlinter
            does for float images in [0, 1] (default False: use the values as given).
        **runtime: ``device``, ``precision``, ``batch_size``, ``tile``,
            ``tile_overlap``, ``channels_last`` of :class:`TorchRuntime`.
    """

    #: No padding: the forward resizes to multiples of 64 itself, as the original.
    multiple = 1
    in_channels = 3
    input_range = 1.0

    def __init__(
        self,
        checkpoint: str,
        *,
        storage_options: Mapping[str, Any] | None = None,
        quantize_8bit: bool = False,
        **runtime: Any,
    ) -> None:
        net, digest = load_network(checkpoint, storage_options)
        super().__init__(net, digest, **runtime)
        self.quantize_8bit = quantize_8bit

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Flow ``(B, 2, H, W)`` (x, y in pixels) from ``a`` to ``b``, both in [0, 1]."""
        if self.quantize_8bit:
            a = torch.floor(a.clamp(0, 1) * 255) / 255
            b = torch.floor(b.clamp(0, 1) * 255) / 255
        mean = torch.cat([a, b], dim=2).mean(dim=(2, 3), keepdim=True)
        a, b = a - mean, b - mean
        h, w = a.shape[-2:]
        hp, wp = -(-h // SIZE_MULTIPLE) * SIZE_MULTIPLE, -(-w // SIZE_MULTIPLE) * SIZE_MULTIPLE
        if (hp, wp) != (h, w):
            a = F.interpolate(a, size=(hp, wp), mode="bilinear", align_corners=True)
            b = F.interpolate(b, size=(hp, wp), mode="bilinear", align_corners=True)
        flow = upsample(self.module(a, b), 4)
        if (hp, wp) != (h, w):
            flow = F.interpolate(flow, size=(h, w), mode="bilinear", align_corners=True)
            # per-channel scalars: a small tensor built here would be a host-device copy
            flow = torch.cat([flow[:, :1] * (h / hp), flow[:, 1:] * (w / wp)], dim=1)
        return flow.flip(1)

    def provenance(self) -> dict[str, Any]:
        """The runtime's provenance plus the 8-bit quantisation flag."""
        return {**super().provenance(), "quantize_8bit": self.quantize_8bit}
