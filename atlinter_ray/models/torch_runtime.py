"""Run a torch ``nn.Module`` as a model of our protocols (device, precision, batches, tiles).

Every learned model subclasses :class:`TorchPairInterpolator` or
:class:`TorchFlowEstimator` and writes only its tensor forward; this module does the rest
once for all of them:

* **device**: ``"auto"`` takes ``cuda:0`` when CUDA is available (a Ray actor with
  ``num_gpus=1`` sees only its own GPU through ``CUDA_VISIBLE_DEVICES``), else the CPU;
* **precision**: ``fp32`` (default; on CUDA TF32 is then turned off, so fp32 means
  IEEE float32 convolutions and matrix products), ``fp16`` (CUDA only) or ``bf16``
  through ``torch.autocast``. Autocast does not keep sampling grids, flows or
  coordinates in float32 by itself: the models build those in float32 explicitly.
  Every batch's output is checked finite; a low-precision batch that is not is
  recomputed in float32 (counted in :attr:`TorchRuntime.fp32_reruns`), and a float32
  one that is not raises :class:`NonFiniteOutputError` instead of being written;
* **values**: frames in ``[0, peak]`` (host arrays or device tensors of any dtype:
  uint8 frames travel as uint8, through page-locked memory on CUDA) become float32
  tensors on the device in the model's range (``input_range``, 1 for RIFE, 255 for
  RAFT); a grayscale batch (C=1) is expanded to the model's 3 channels and its output
  averaged back to one. Frames stay on the device between calls (bisection levels,
  warps) until the caller converts and fetches them;
* **shape**: each batch is padded at the bottom/right to the model's ``multiple`` (zeros,
  as the predecessor does) and cropped back; on CUDA a short last batch is padded to a
  power of two so that cuDNN's autotuned kernels are reused;
* **memory**: ``batch_size`` pairs per forward, and optional ``tile`` (pixels, square)
  with ``tile_overlap`` for images too large for memory: tiles are run independently and
  blended with linear ramps across their overlaps. Unset on CUDA, both are chosen from
  the free memory (:meth:`TorchRuntime._plan`); out of memory halves the batch and
  retries.

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

import functools
import hashlib
import logging
from abc import abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import nullcontext
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from atlinter_ray.errors import CheckpointError, ConfigError, NonFiniteOutputError
from atlinter_ray.models.base import FlowEstimator, PairInterpolator
from atlinter_ray.models.checkpoint import load_strict, read_checkpoint, unwrap_state_dict

log = logging.getLogger(__name__)

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
#: Largest batch the free-memory rule picks.
MAX_AUTO_BATCH = 256
#: Batch size on the CPU when none is set (larger batches gain nothing there).
CPU_BATCH = 4
#: Messages of CUDA errors that leave the process's CUDA context unusable (older torch
#: raises them as plain RuntimeError; newer as torch.AcceleratorError).
_FATAL_MARKERS = ("CUDA error", "CUBLAS_STATUS", "CUDNN_STATUS", "cuDNN error",
                  "device-side assert", "illegal memory access", "CUDA driver error")


def check_runtime_settings(
    device: str, precision: str, batch_size: int | None, tile: int | None, tile_overlap: int
) -> None:
    """Refuse settings no device can run, without touching any device (the driver's check)."""
    if precision not in PRECISIONS:
        raise ConfigError(
            f"model.params.precision={precision!r}: choose one of {sorted(PRECISIONS)}"
        )
    if device != "auto":
        try:
            kind = torch.device(device).type
        except RuntimeError as exc:
            raise ConfigError(
                f"model.params.device={device!r} is not a device name; use auto, cpu or cuda[:i]"
            ) from exc
        if precision == "fp16" and kind == "cpu":
            raise ConfigError(
                "model.params.precision=fp16 needs a CUDA device (CPU half kernels are slow "
                "or missing); use fp32 or bf16 on the CPU"
            )
    if batch_size is not None and batch_size < 1:
        raise ConfigError(f"model.params.batch_size={batch_size}: must be at least 1 (or unset: auto)")
    if tile is not None and (tile < 1 or tile_overlap < 0 or tile_overlap >= tile):
        raise ConfigError(
            f"model.params.tile={tile}, model.params.tile_overlap={tile_overlap}: need "
            "tile >= 1 and 0 <= tile_overlap < tile"
        )


def strict_fp32() -> None:
    """Turn TF32 off for CUDA matrix products and convolutions (IEEE float32).

    Torch 2.9+ has one ``fp32_precision`` switch per backend and refuses a mix with the
    older ``allow_tf32`` flags, so the newer API is used where it exists.
    """
    if hasattr(torch.backends, "fp32_precision"):
        torch.backends.fp32_precision = "ieee"
        torch.backends.cuda.matmul.fp32_precision = "ieee"
        # cudnn's ``conv`` lives on the module object torch swaps in, unseen by mypy
        torch.backends.cudnn.conv.fp32_precision = "ieee"  # type: ignore[attr-defined]
    else:  # pragma: no cover  (torch < 2.9)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False


def is_fatal_device_error(exc: BaseException) -> bool:
    """True for a CUDA error after which this process must not run more work.

    An illegal address or a device-side assert poisons the CUDA context: every later
    call fails too. Out-of-memory is not fatal (the runtime halves the batch).
    """
    if isinstance(exc, torch.OutOfMemoryError):
        return False
    if isinstance(exc, getattr(torch, "AcceleratorError", ())):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in _FATAL_MARKERS)


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
    """Device, precision, batching, padding, tiling and transfers shared by every torch model.

    ``batch_size`` and ``tile`` left unset (None) are chosen on a CUDA device from its
    free memory the first time an image size is seen (:meth:`_plan`); on the CPU they
    are 4 pairs and no tiles.
    """

    def __init__(
        self,
        *,
        device: str = "auto",
        precision: str = "fp32",
        batch_size: int | None = None,
        tile: int | None = None,
        tile_overlap: int = 64,
        channels_last: bool = False,
    ) -> None:
        check_runtime_settings(device, precision, batch_size, tile, tile_overlap)
        self.device = select_device(device)
        if precision == "fp16" and self.device.type != "cuda":
            raise ConfigError(
                "model.params.precision=fp16 needs a CUDA device (CPU half kernels are slow "
                "or missing); use fp32 or bf16 on the CPU"
            )
        self.cuda = self.device.type == "cuda"
        self.precision = precision
        self.auto_batch = batch_size is None
        self.batch_size = batch_size or (MAX_AUTO_BATCH if self.cuda else CPU_BATCH)
        self.auto_tile = tile is None and self.cuda
        self.tile = tile
        self.tile_overlap = tile_overlap
        self.channels_last = channels_last
        #: Items recomputed in float32 because the low-precision forward was not finite.
        self.fp32_reruns = 0
        self._planned: set[tuple[int, int]] = set()
        if self.cuda and precision == "fp32":
            strict_fp32()

    def prepare(self, module: nn.Module) -> nn.Module:
        """Move ``module`` to the device, in eval mode (forwards run in inference mode)."""
        module = module.to(self.device).eval()
        if self.cuda:
            torch.backends.cudnn.benchmark = True  # batches repeat the same shapes
        if self.channels_last:
            # Module.to accepts memory_format; torch's overloads leave it out
            module = module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        # Autocast caches its low-precision copy of a weight only for leaves that require
        # grad; frozen ones would be cast again at every use (RAFT's update block 20 times
        # a forward). Forwards run under inference_mode, so no graph is ever recorded.
        keep_cache = self.precision != "fp32"
        for p in module.parameters():
            p.requires_grad_(keep_cache)
        return module

    def autocast(self, enabled: bool = True) -> Any:
        """The autocast context for the chosen precision (none for fp32 or ``enabled=False``)."""
        if self.precision == "fp32" or not enabled:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=PRECISIONS[self.precision])

    def upload(self, x: np.ndarray | torch.Tensor) -> torch.Tensor:
        """A host array on the device in its own dtype (uint8 stays uint8: 4x less to move)."""
        return to_device(x, self.device)

    def regions(self, h: int, w: int, multiple: int) -> Iterator[tuple[slice, slice, torch.Tensor]]:
        """Tiles ``(rows, cols, weights)`` covering an ``h`` x ``w`` image."""
        if self.tile is None or (h <= self.tile and w <= self.tile):
            yield slice(0, h), slice(0, w), torch.ones((h, w), device=self.device)
            return
        tile = -(-self.tile // multiple) * multiple
        ys, xs = _axis_starts(h, tile, self.tile_overlap), _axis_starts(w, tile, self.tile_overlap)
        for y in ys:
            th = min(tile, h)
            wy = _ramp(th, self.tile_overlap, y > 0, y + th < h)
            for x in xs:
                tw = min(tile, w)
                wx = _ramp(tw, self.tile_overlap, x > 0, x + tw < w)
                weight = torch.from_numpy(wy[:, None] * wx[None, :]).to(self.device)
                yield slice(y, y + th), slice(x, x + tw), weight

    def run(
        self,
        forward: Callable[..., torch.Tensor],
        images: Sequence[torch.Tensor],
        index: Sequence[torch.Tensor],
        scalars: torch.Tensor | None,
        out_channels: int,
        multiple: int,
    ) -> torch.Tensor:
        """Apply ``forward`` to batches of items; return ``(M, out_channels, H, W)`` float32.

        Item ``m`` takes ``images[j][index[j][m]]`` for every input ``j`` (device tensors
        in the network's range and channels) and, when ``scalars`` is given,
        ``scalars[m]`` as a last ``(B,)`` tensor argument. The result stays on the device.
        """
        h, w = images[0].shape[-2:]
        self._plan(forward, images, index, scalars, multiple)
        count = len(index[0])
        out = torch.zeros((count, out_channels, h, w), dtype=torch.float32, device=self.device)
        total = torch.zeros((h, w), dtype=torch.float32, device=self.device)
        batch = functools.partial(self._batch, forward, images, index, scalars, multiple=multiple)
        checks: list[tuple[torch.Tensor, slice]] = []
        for rows, cols, weight in self.regions(h, w, multiple):
            start = 0
            while start < count:
                sel = slice(start, min(start + self.batch_size, count))
                try:
                    result = batch(sel, rows, cols)
                except torch.OutOfMemoryError:
                    if self.batch_size == 1:
                        raise
                    self._halve_batch()
                    continue
                if self.tile is not None:  # blended: checked before it is mixed in
                    rerun = functools.partial(batch, sel, rows, cols, fp32=True)
                    out[sel, :, rows, cols] += self._finite(result, rerun) * weight
                else:
                    out[sel, :, rows, cols] = result
                    checks.append((torch.isfinite(result).all(), sel))
                start = sel.stop
            total[rows, cols] += weight
        if self.tile is not None:
            out /= total
        elif checks:  # one synchronisation for the whole call, not one per batch
            flags = torch.stack([f for f, _ in checks]).cpu()
            for ok, (_, sel) in zip(flags.tolist(), checks):
                if not ok:
                    rerun = functools.partial(batch, sel, slice(0, h), slice(0, w), fp32=True)
                    out[sel] = self._finite(out[sel], rerun)
        return out

    def _finite(self, result: torch.Tensor, fp32: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``result`` if finite; else its float32 recomputation (``fp32()``), if that is."""
        if bool(torch.isfinite(result).all()):
            return result
        if self.precision != "fp32":
            log.warning(
                "%s output of %d item(s) is not finite; recomputing them in fp32",
                self.precision, len(result),
            )
            self.fp32_reruns += len(result)
            result = fp32()
            if bool(torch.isfinite(result).all()):
                return result
        raise NonFiniteOutputError(
            f"the model gave NaN or inf in float32 for {len(result)} item(s) of "
            f"{tuple(result.shape[-2:])} pixels (inputs finite); check the checkpoint, "
            "or the model's limits on image size"
        )

    def _batch(
        self,
        forward: Callable[..., torch.Tensor],
        images: Sequence[torch.Tensor],
        index: Sequence[torch.Tensor],
        scalars: torch.Tensor | None,
        sel: slice,
        rows: slice,
        cols: slice,
        *,
        multiple: int,
        fp32: bool = False,
    ) -> torch.Tensor:
        """One forward over items ``sel`` of one region (``fp32``: without autocast); cropped."""
        th, tw = rows.stop - rows.start, cols.stop - cols.start
        pad = (0, (-tw) % multiple, 0, (-th) % multiple)
        n = sel.stop - sel.start
        # On CUDA a short last batch is padded to a power of two: cuDNN's autotuned
        # kernels are kept per shape, so few distinct shapes keep them all reused.
        fill = min(_next_pow2(n), self.batch_size) - n if self.cuda else 0
        args = []
        for img, idx in zip(images, index):
            picked = idx[sel]
            if fill:
                picked = torch.cat([picked, picked[-1:].expand(fill)])
            x = F.pad(img[picked][:, :, rows, cols], pad)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            args.append(x)
        if scalars is not None:
            s = scalars[sel]
            args.append(torch.cat([s, s[-1:].expand(fill)]) if fill else s)
        with torch.inference_mode(), self.autocast(enabled=not fp32):
            result = forward(*args)
        return result[:n, :, :th, :tw].float()

    def _halve_batch(self) -> None:
        """Out of device memory: free the cache and go on with half the batch."""
        if self.cuda:
            torch.cuda.empty_cache()
        self.batch_size = max(1, self.batch_size // 2)
        log.warning("out of device memory; batch_size is now %d", self.batch_size)

    def _plan(
        self,
        forward: Callable[..., torch.Tensor],
        images: Sequence[torch.Tensor],
        index: Sequence[torch.Tensor],
        scalars: torch.Tensor | None,
        multiple: int,
    ) -> None:
        """Choose unset tile and batch size from free GPU memory, once per image size.

        One item is run alone and its peak memory measured; the batch takes at most
        half the memory left free (the rest is for the frames of a batch of tasks and
        fragmentation), up to 256 pairs, a power of two. An image whose one item does
        not fit is tiled, the tile halved until one fits.
        """
        h, w = images[0].shape[-2:]
        if not self.cuda or not (self.auto_batch or self.auto_tile) or (h, w) in self._planned:
            return
        self._planned.add((h, w))
        one = [idx[:1] for idx in index]
        first = None if scalars is None else scalars[:1]
        while True:
            size = max(h, w) if self.tile is None else self.tile
            rows, cols = slice(0, min(h, size)), slice(0, min(w, size))
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            free, _ = torch.cuda.mem_get_info(self.device)
            base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            saved, self.batch_size = self.batch_size, 1
            try:
                self._batch(forward, images, one, first, slice(0, 1), rows, cols, multiple=multiple)
                per_item = max(torch.cuda.max_memory_allocated(self.device) - base, 1)
            except torch.OutOfMemoryError:
                per_item = None
            finally:
                self.batch_size = saved
            budget = free // 2
            if per_item is not None and per_item <= budget:
                break
            if not self.auto_tile or size <= 2 * multiple:
                raise torch.OutOfMemoryError(
                    f"one {min(h, size)}x{min(w, size)} item needs more than half of the "
                    f"{free / 2**30:.1f} GiB free on {self.device}; set model.params.tile"
                )
            self.tile = max(size // 2, 2 * multiple)
            log.info("%dx%d images do not fit %s whole: tile %d px", h, w, self.device, self.tile)
        if self.auto_batch:
            self.batch_size = max(1, min(MAX_AUTO_BATCH, _prev_pow2(budget // per_item)))
        log.info(
            "%s: %.0f MiB per item at %dx%d; batch_size %d, tile %s",
            self.device, per_item / 2**20, h, w, self.batch_size, self.tile,
        )


def to_device(x: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """``x`` on ``device`` in its own dtype; from the host through page-locked memory on
    CUDA, without blocking the host (the copy is ordered on the current stream)."""
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    host = torch.from_numpy(np.ascontiguousarray(x))
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def download(x: torch.Tensor) -> tuple[torch.Tensor, Callable[[], None]]:
    """Start copying ``x`` to the host; return the host tensor and a wait for the copy.

    On CUDA the copy lands in page-locked memory without blocking the host; whoever
    reads the host tensor calls the wait first (an io thread, not the main thread).
    """
    if x.device.type != "cuda":
        return x, lambda: None
    host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
    host.copy_(x, non_blocking=True)
    done = torch.cuda.Event()  # type: ignore[no-untyped-call]  # torch leaves __new__ unannotated
    done.record()
    return host, done.synchronize


_TORCH_DTYPES = {"uint8": torch.uint8, "uint16": torch.uint16, "int16": torch.int16,
                 "int32": torch.int32, "float32": torch.float32, "float64": torch.float64}
#: Output dtypes that :func:`to_dtype_tensor` converts to on the device.
DEVICE_DTYPES = tuple(_TORCH_DTYPES)


def to_dtype_tensor(frames: torch.Tensor, dtype: str, scale: float = 1.0) -> torch.Tensor:
    """:func:`atlinter_ray.dtypes.to_dtype` on the device: scale, round and clip for integers.

    Same arithmetic (the product in at least float32, round half to even, clip, cast),
    so the same bytes.
    """
    dt = np.dtype(dtype)
    target = _TORCH_DTYPES.get(dt.name)
    if target is None:
        raise ValueError(f"output dtype {dtype} is converted on the host")
    if scale != 1.0:
        frames = frames.to(torch.promote_types(frames.dtype, torch.float32)) * scale
    if frames.dtype == target or dt.kind not in "ui":
        return frames.to(target)
    info = np.iinfo(dt)
    values = torch.round(frames) if frames.is_floating_point() else frames
    return values.clamp(info.min, info.max).to(target)


def _next_pow2(n: int) -> int:
    """The smallest power of two >= ``n``."""
    return 1 << max(n - 1, 0).bit_length()


def _prev_pow2(n: int) -> int:
    """The largest power of two <= ``n`` (1 for n < 1)."""
    return 1 << max(n.bit_length() - 1, 0)


def _to_model_channels(x: torch.Tensor, channels: int, what: str) -> torch.Tensor:
    """Repeat a grayscale batch to the model's channel count; refuse other mismatches."""
    if x.ndim != 4:
        raise ValueError(f"{what}: expected a (N, C, H, W) batch, got shape {tuple(x.shape)}")
    c = x.shape[1]
    if c == channels:
        return x
    if c == 1:
        return x.expand(-1, channels, -1, -1)
    raise ValueError(
        f"{what}: the model takes {channels} channel(s) (or 1, repeated), got {c}"
    )


def as_numpy(x: torch.Tensor) -> np.ndarray:
    """A device tensor as a host array (waits for the device)."""
    return x.detach().cpu().numpy()


class _TorchModel:
    """What both torch base classes share: the module, the runtime and provenance."""

    #: Pad H and W up to a multiple of this before the forward (a model whose
    #: checkpoint decides it sets it per instance).
    multiple: int = 32
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
        batch_size: int | None = None,
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

    @property
    def device(self) -> torch.device:
        """Where the network runs; the engine keeps this model's frames there."""
        return self.runtime.device

    def _tensor(self, x: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Frames in data units as a float32 device tensor."""
        return self.runtime.upload(x).float()

    def _scaled(self, x: torch.Tensor, peak: float, what: str) -> torch.Tensor:
        """Input batch in the network's channels and value range."""
        if peak <= 0:
            raise ValueError(f"peak must be positive, got {peak}")
        scale = float(np.float32(self.input_range / peak))
        return _to_model_channels(x.float() * scale, self.in_channels, what)

    def _unscaled(self, out: torch.Tensor, peak: float, channels: int) -> torch.Tensor:
        """Network output in data units with the caller's channel count."""
        out = out * float(np.float32(peak / self.input_range))
        if channels == 1 and self.in_channels != 1:
            out = out.mean(dim=1, keepdim=True)
        return out

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
        """Frames ``(N, K, C, H, W)`` between each pair at every one of the K positions.

        Host arrays in, host array out; device tensors in, a device tensor out.
        """
        if a.shape != b.shape:
            raise ValueError(f"a and b must have the same shape, got {a.shape} and {b.shape}")
        ts = np.asarray(t, dtype=np.float32).reshape(-1)
        n = a.shape[0]
        out = self.interpolate_items(
            a, b, np.repeat(np.arange(n), len(ts)), np.tile(ts, n), peak
        )
        out = out.reshape(n, len(ts), *out.shape[1:])
        return as_numpy(out) if isinstance(a, np.ndarray) else out

    def interpolate_items(
        self, a: Any, b: Any, pair: np.ndarray, t: np.ndarray, peak: float = 1.0
    ) -> torch.Tensor:
        """Frames ``(M, C, H, W)`` on the device: item ``m`` is pair ``pair[m]`` at ``t[m]``."""
        ts = np.asarray(t, dtype=np.float32).reshape(-1)
        if not self.arbitrary_t and np.any(ts != 0.5):
            raise ValueError(
                f"model {self.name!r} predicts the midpoint only (t=0.5), got t={ts.tolist()}; "
                "the engine drives midpoint-only models by bisection"
            )
        x0 = self._scaled(self._tensor(a), peak, "a")
        x1 = self._scaled(self._tensor(b), peak, "b")
        idx = self.runtime.upload(np.asarray(pair, dtype=np.int64))
        out = self.runtime.run(
            self.forward, [x0, x1], [idx, idx], self.runtime.upload(ts),
            self.in_channels, self.multiple,
        )
        return self._unscaled(out, peak, a.shape[1])


class TorchFlowEstimator(_TorchModel, FlowEstimator):
    """A flow estimator whose subclass writes only :meth:`forward` on tensors."""

    @abstractmethod
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Flow ``(B, 2, H, W)`` (x then y, pixels) from ``a`` to ``b``, padded inputs."""

    def flow(self, a: Any, b: Any, peak: float = 1.0) -> Any:
        """Flow ``(N, 2, H, W)`` float32 from each ``a`` to its ``b`` (OpenCV's convention).

        Host arrays in, host array out; device tensors in, a device tensor out.
        """
        if a.shape != b.shape:
            raise ValueError(f"a and b must have the same shape, got {a.shape} and {b.shape}")
        x0 = self._scaled(self._tensor(a), peak, "a")
        x1 = self._scaled(self._tensor(b), peak, "b")
        idx = torch.arange(a.shape[0], device=self.device)
        out = self.runtime.run(self.forward, [x0, x1], [idx, idx], None, 2, self.multiple)
        return as_numpy(out) if isinstance(a, np.ndarray) else out
