"""Run a torch ``nn.Module`` as a model of our protocols (device, precision, batches, tiles).

Every learned model subclasses :class:`TorchPairInterpolator` or
:class:`TorchFlowEstimator` and writes only its tensor forward; this module does the rest
once for all of them:

* **device**: ``"auto"`` takes ``cuda:0`` when CUDA is available (a Ray actor with
  ``num_gpus=1`` sees only its own GPU through ``CUDA_VISIBLE_DEVICES``), else the CPU;
* **precision**: ``fp32`` (default), ``fp16`` (CUDA only) or ``bf16`` through
  ``torch.autocast``, so numerically sensitive ops (``grid_sample``, softmax) stay in
  float32; outputs always come back float32;
* **values**: our ``(N, C, H, W)`` float32 arrays in ``[0, peak]`` become tensors in the
  model's range (``input_range``, 1 for RIFE, 255 for RAFT); a grayscale batch (C=1)
  is repeated to the model's 3 channels and its output averaged back to one;
* **shape**: each batch is padded at the bottom/right to the model's ``multiple`` (zeros,
  as the predecessor does) and cropped back;
* **memory**: ``batch_size`` pairs per forward, and optional ``tile`` (pixels, square)
  with ``tile_overlap`` for images too large for the device: tiles are run
  independently and blended with linear ramps across their overlaps.

A forward always runs under ``torch.inference_mode()`` with the module in eval mode.

Example::

    class Mean(TorchPairInterpolator):
        multiple = 1
        def forward(self, a, b, t):
            return (1 - t[:, None, None, None]) * a + t[:, None, None, None] * b

    model = Mean(torch.nn.Identity(), checkpoint_sha256=None, batch_size=8)
    frames = model.interpolate(a, b, np.array([0.25, 0.5]), peak=255.0)  # (N,2,C,H,W)
"""

from __future__ import annotations

import hashlib
from abc import abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import nullcontext
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from atlinter_ray.errors import CheckpointError, ConfigError
from atlinter_ray.models.base import FlowEstimator, PairInterpolator
from atlinter_ray.models.checkpoint import load_strict, read_checkpoint, unwrap_state_dict

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def select_device(device: str = "auto") -> torch.device:
    """Resolve ``"auto"`` (CUDA when available, else CPU) or an explicit device name."""
    if device == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise ConfigError(
            f"model.params.device={device!r} is not a device name; use auto, cpu or cuda[:i]"
        ) from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"model.params.device={device!r} but CUDA is not available here; use auto or cpu "
            "(or give the Ray workers GPUs with resources.gpus_per_worker)"
        )
    return resolved


def load_weights(
    module: nn.Module,
    url: str,
    *,
    storage_options: Mapping[str, Any] | None = None,
    remap: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
) -> str:
    """Load the checkpoint at ``url`` strictly into ``module``; return its sha256.

    ``remap`` turns the unwrapped state dict (``module.`` already stripped) into the
    module's key names, e.g. to drop training-only entries.
    """
    obj, digest = read_checkpoint(url, storage_options)
    state = unwrap_state_dict(obj, url)
    if remap is not None:
        state = remap(state)
    bad = sorted(k for k, v in state.items() if not isinstance(v, torch.Tensor))
    if bad:
        raise CheckpointError(
            f"checkpoint {url}: entries that are not tensors: {', '.join(bad[:10])}"
        )
    load_strict(module, state, url)
    return digest


def combine_sha256(digests: Mapping[str, str]) -> str:
    """One sha256 for a checkpoint made of several files (``name -> sha256``)."""
    text = "".join(f"{name} {digests[name]}\n" for name in sorted(digests))
    return hashlib.sha256(text.encode()).hexdigest()


def _axis_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of ``tile`` pixels covering ``size`` with ``overlap``."""
    if size <= tile:
        return [0]
    stride = max(tile - overlap, 1)
    starts = list(range(0, size - tile, stride))
    return starts + [size - tile]


def _ramp(length: int, overlap: int, lead: bool, trail: bool) -> np.ndarray:
    """Blend weights along one axis, feathered where a neighbouring tile overlaps.

    Inside an overlap the outer quarter gets weight 0 (a tile's own border effects
    never reach the output), then the weight ramps linearly to 1 over the middle half.
    """
    w = np.ones(length, dtype=np.float32)
    n = min(overlap, length)
    margin = n // 4
    ramp = np.clip(
        (np.arange(n, dtype=np.float32) - margin + 1.0) / (n - 2 * margin + 1.0), 0.0, 1.0
    )
    if lead and n:
        w[:n] = np.minimum(w[:n], ramp)
    if trail and n:
        w[length - n :] = np.minimum(w[length - n :], ramp[::-1])
    return w


class TorchRuntime:
    """Device, precision, batching, padding and tiling shared by every torch model."""

    def __init__(
        self,
        *,
        device: str = "auto",
        precision: str = "fp32",
        batch_size: int = 4,
        tile: int | None = None,
        tile_overlap: int = 64,
        channels_last: bool = False,
    ) -> None:
        if precision not in PRECISIONS:
            raise ConfigError(
                f"model.params.precision={precision!r}: choose one of {sorted(PRECISIONS)}"
            )
        self.device = select_device(device)
        if precision == "fp16" and self.device.type != "cuda":
            raise ConfigError(
                "model.params.precision=fp16 needs a CUDA device (CPU half kernels are slow "
                "or missing); use fp32 or bf16 on the CPU"
            )
        if batch_size < 1:
            raise ConfigError(f"model.batch_size={batch_size}: must be at least 1")
        if tile is not None and (tile < 1 or tile_overlap < 0 or tile_overlap >= tile):
            raise ConfigError(
                f"model.tile={tile}, model.tile_overlap={tile_overlap}: need "
                "tile >= 1 and 0 <= tile_overlap < tile"
            )
        self.precision = precision
        self.batch_size = batch_size
        self.tile = tile
        self.tile_overlap = tile_overlap
        self.channels_last = channels_last

    def prepare(self, module: nn.Module) -> nn.Module:
        """Move ``module`` to the device, in eval mode, without gradients."""
        module = module.to(self.device).eval()
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # batches repeat the same shapes
        if self.channels_last:
            module = module.to(memory_format=torch.channels_last)
        for p in module.parameters():
            p.requires_grad_(False)
        return module

    def autocast(self) -> Any:
        """The autocast context for the chosen precision (none for fp32)."""
        if self.precision == "fp32":
            return nullcontext()
        return torch.autocast(self.device.type, dtype=PRECISIONS[self.precision])

    def tensor(self, x: np.ndarray) -> torch.Tensor:
        """A float32 ``(B, C, H, W)`` numpy batch as a tensor on the device."""
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self.device)
        if self.channels_last:
            t = t.contiguous(memory_format=torch.channels_last)
        return t

    def regions(self, h: int, w: int, multiple: int) -> Iterator[tuple[slice, slice, np.ndarray]]:
        """Tiles ``(rows, cols, weights)`` covering an ``h`` x ``w`` image."""
        if self.tile is None or (h <= self.tile and w <= self.tile):
            yield slice(0, h), slice(0, w), np.ones((h, w), dtype=np.float32)
            return
        tile = -(-self.tile // multiple) * multiple
        ys, xs = _axis_starts(h, tile, self.tile_overlap), _axis_starts(w, tile, self.tile_overlap)
        for y in ys:
            th = min(tile, h)
            wy = _ramp(th, self.tile_overlap, y > 0, y + th < h)
            for x in xs:
                tw = min(tile, w)
                wx = _ramp(tw, self.tile_overlap, x > 0, x + tw < w)
                yield slice(y, y + th), slice(x, x + tw), wy[:, None] * wx[None, :]

    def run(
        self,
        forward: Callable[..., torch.Tensor],
        images: Sequence[np.ndarray],
        index: Sequence[np.ndarray],
        scalars: np.ndarray | None,
        out_channels: int,
        multiple: int,
    ) -> np.ndarray:
        """Apply ``forward`` to batches of items; return ``(M, out_channels, H, W)``.

        Item ``m`` takes ``images[j][index[j][m]]`` for every input ``j`` and, when
        ``scalars`` is given, ``scalars[m]`` as a last ``(B,)`` tensor argument.
        """
        h, w = images[0].shape[-2:]
        count = len(index[0])
        out = np.zeros((count, out_channels, h, w), dtype=np.float32)
        total = np.zeros((h, w), dtype=np.float32)
        for rows, cols, weight in self.regions(h, w, multiple):
            th, tw = rows.stop - rows.start, cols.stop - cols.start
            pad = (0, (-tw) % multiple, 0, (-th) % multiple)
            for start in range(0, count, self.batch_size):
                sel = slice(start, min(start + self.batch_size, count))
                args = [
                    F.pad(self.tensor(img[idx[sel], :, rows, cols]), pad)
                    for img, idx in zip(images, index)
                ]
                if scalars is not None:
                    args.append(torch.from_numpy(scalars[sel].astype(np.float32)).to(self.device))
                with torch.inference_mode(), self.autocast():
                    result = forward(*args)
                result = result[..., :th, :tw].float().cpu().numpy()
                if self.tile is not None:
                    out[sel, :, rows, cols] += result * weight
                else:
                    out[sel, :, rows, cols] = result
            total[rows, cols] += weight
        if self.tile is not None:
            out /= total
        return out


def _to_model_channels(x: np.ndarray, channels: int, what: str) -> np.ndarray:
    """Repeat a grayscale batch to the model's channel count; refuse other mismatches."""
    if x.ndim != 4:
        raise ValueError(f"{what}: expected a (N, C, H, W) batch, got shape {x.shape}")
    c = x.shape[1]
    if c == channels:
        return x
    if c == 1:
        return np.repeat(x, channels, axis=1)
    raise ValueError(
        f"{what}: the model takes {channels} channel(s) (or 1, repeated), got {c}"
    )


class _TorchModel:
    """What both torch base classes share: the module, the runtime and provenance."""

    #: Pad H and W up to a multiple of this before the forward.
    multiple: ClassVar[int] = 32
    #: Channels the network takes (grayscale input is repeated to this).
    in_channels: ClassVar[int] = 3
    #: The network's full intensity: inputs in [0, peak] are scaled to [0, input_range].
    input_range: ClassVar[float] = 1.0

    def __init__(
        self,
        module: nn.Module,
        checkpoint_sha256: str | None,
        *,
        device: str = "auto",
        precision: str = "fp32",
        batch_size: int = 4,
        tile: int | None = None,
        tile_overlap: int = 64,
        channels_last: bool = False,
    ) -> None:
        self.runtime = TorchRuntime(
            device=device,
            precision=precision,
            batch_size=batch_size,
            tile=tile,
            tile_overlap=tile_overlap,
            channels_last=channels_last,
        )
        self.module = self.runtime.prepare(module)
        self.checkpoint_sha256 = checkpoint_sha256

    def _scaled(self, x: np.ndarray, peak: float, what: str) -> np.ndarray:
        """Input batch in the network's channels and value range."""
        if peak <= 0:
            raise ValueError(f"peak must be positive, got {peak}")
        x = _to_model_channels(np.asarray(x, dtype=np.float32), self.in_channels, what)
        return x * np.float32(self.input_range / peak)

    def provenance(self) -> dict[str, Any]:
        """Model name, checkpoint hash, device and precision."""
        return {
            "model": getattr(self, "name", "") or type(self).__name__,
            "checkpoint_sha256": self.checkpoint_sha256,
            "device": str(self.runtime.device),
            "precision": self.runtime.precision,
        }


class TorchPairInterpolator(_TorchModel, PairInterpolator):
    """A pair interpolator whose subclass writes only :meth:`forward` on tensors."""

    @abstractmethod
    def forward(self, a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Frames ``(B, C, H, W)`` in the input range from padded ``a``, ``b``; ``t`` ``(B,)``."""

    def interpolate(
        self, a: np.ndarray, b: np.ndarray, t: np.ndarray, peak: float = 1.0
    ) -> np.ndarray:
        """Frames ``(N, K, C, H, W)`` between each pair at every one of the K positions."""
        if a.shape != b.shape:
            raise ValueError(f"a and b must have the same shape, got {a.shape} and {b.shape}")
        ts = np.asarray(t, dtype=np.float32).reshape(-1)
        if not self.arbitrary_t and np.any(ts != 0.5):
            raise ValueError(
                f"model {self.name!r} predicts the midpoint only (t=0.5), got t={ts.tolist()}; "
                "the engine drives midpoint-only models by bisection"
            )
        n, c = a.shape[:2]
        x0, x1 = self._scaled(a, peak, "a"), self._scaled(b, peak, "b")
        pair = np.repeat(np.arange(n), len(ts))
        out = self.runtime.run(
            self.forward, [x0, x1], [pair, pair], np.tile(ts, n), self.in_channels, self.multiple
        )
        out *= np.float32(peak / self.input_range)
        if c == 1 and self.in_channels != 1:
            out = out.mean(axis=1, keepdims=True)
        return out.reshape(n, len(ts), c, *a.shape[2:])


class TorchFlowEstimator(_TorchModel, FlowEstimator):
    """A flow estimator whose subclass writes only :meth:`forward` on tensors."""

    @abstractmethod
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Flow ``(B, 2, H, W)`` (x then y, pixels) from ``a`` to ``b``, padded inputs."""

    def flow(self, a: np.ndarray, b: np.ndarray, peak: float = 1.0) -> np.ndarray:
        """Flow ``(N, 2, H, W)`` from each ``a`` to its ``b`` (OpenCV's convention)."""
        if a.shape != b.shape:
            raise ValueError(f"a and b must have the same shape, got {a.shape} and {b.shape}")
        x0, x1 = self._scaled(a, peak, "a"), self._scaled(b, peak, "b")
        idx = np.arange(a.shape[0])
        return self.runtime.run(self.forward, [x0, x1], [idx, idx], None, 2, self.multiple)
