"""Turn a model and pairs of bounding sections into the frames their tasks need.

Pairs may come from different tasks and want different positions: every (pair,
position) item of a call goes to the model together, so one forward batches across
tasks. Models with arbitrary ``t`` get all items in one call. Midpoint-only models are
driven by bisection over only the tree nodes each pair's positions need (see
:func:`atlinter_ray.planning.bisection_nodes`), one batched call per tree depth across
all pairs. A midpoint-only model paired with an arbitrary-t fallback
(:class:`ExactFallback`, ``interpolation.exact_fallback``) keeps every dyadic position
and hands the others (t = 1/3, ...) to the fallback, so ``placement=exact`` works with
RIFE_HD or CAIN.

Frames stay where the model keeps them (:attr:`PairInterpolator.device`): numpy arrays
for host models, tensors on the model's device for torch models, so bisection levels
never travel back to the host.

With ``placement=atlinter`` a model may also ask for the predecessor's padded canvas
(:func:`atlinter_canvas`): atlinter 0.2.3 padded the two sections of a RIFE pair once,
with zeros at the bottom/right to a multiple of 32, bisected on that canvas (so the
padded border of each level's frames feeds the next level) and cropped at the end;
:func:`predict_pairs` does the same when given ``canvas``. Float64 sections stay float64
on the host (the predecessor's volume was float64), so arithmetic models reproduce its
values.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from atlinter_ray.errors import ConfigError
from atlinter_ray.models.base import (
    ContextInterpolator,
    FlowEstimator,
    Neighbour,
    PairInterpolator,
    build_model,
    is_torch_model,
)
from atlinter_ray.models.flow import FlowInterpolator
from atlinter_ray.planning import GapTask, Placement, bisection_nodes, is_dyadic


@dataclass(frozen=True, slots=True)
class Prediction:
    """Frames ``(N, K, C, H, W)`` for N pairs at K positions, and the model calls spent."""

    frames: np.ndarray
    model_calls: int


@dataclass(frozen=True, slots=True)
class PairsPrediction:
    """Per pair: frames ``(K_i, C, H, W)`` (array or device tensor) and model calls spent."""

    frames: list[Any]
    model_calls: list[int]


class ExactFallback(PairInterpolator):
    """A midpoint-only model for dyadic positions and an arbitrary-t model for the rest."""

    arbitrary_t = True

    def __init__(self, midpoint: PairInterpolator, fallback: PairInterpolator) -> None:
        self.midpoint = midpoint
        self.fallback = fallback
        self.name = midpoint.name
        self.device = midpoint.device

    def producer(self, t: float) -> PairInterpolator:
        """The model that predicts position ``t``."""
        return self.midpoint if is_dyadic(t) else self.fallback

    def interpolate(
        self, a: np.ndarray, b: np.ndarray, t: np.ndarray, peak: float = 1.0
    ) -> np.ndarray:
        """Frames ``(N, K, C, H, W)``, each position from its :meth:`producer`."""
        return predict(self, a, b, [float(x) for x in np.ravel(t)], peak).frames

    def provenance(self) -> dict[str, Any]:
        """The midpoint model's provenance, with the fallback's under ``exact_fallback``."""
        return {**self.midpoint.provenance(), "exact_fallback": self.fallback.provenance()}


#: Python's own words when a call's arguments do not fit the callee's parameters.
_BINDING = re.compile(
    r"unexpected keyword argument|missing \d+ required|got multiple values for argument"
    r"|takes (?:from )?\d+ (?:to \d+ )?positional argument"
)


def is_settings_mismatch(exc: TypeError) -> bool:
    """True when ``exc`` says the given keywords do not fit a model's constructor.

    Such an error is raised in the frame that makes the call, before the callee runs:
    :func:`build_model` (the settings against the registered class) or a model's
    ``__init__`` handing its ``**kwargs`` on (to its base class or a member model). Any
    other ``TypeError`` (one raised inside a constructor's work) is a bug of ours.
    """
    tb = exc.__traceback__
    if tb is None or not _BINDING.search(str(exc)):
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    caller = tb.tb_frame.f_code.co_name
    return caller == build_model.__name__ or (caller == "__init__" and "__init__()" in str(exc))


def _build(
    name: str, checkpoint: str | None, params: Mapping[str, Any] | None, key: str
) -> PairInterpolator:
    """One model by name (configured under ``key``); flow estimators give frames at any t."""
    kwargs = dict(params or {})
    if checkpoint:
        kwargs["checkpoint"] = checkpoint
    try:
        model = build_model(name, **kwargs)
    except TypeError as exc:
        if not is_settings_mismatch(exc):
            raise  # a bug inside the constructor: ours, not the user's settings
        raise ConfigError(
            f"model {name!r} does not accept these settings ({exc}); check {key}.params "
            f"and {key}.checkpoint (classical models take no checkpoint)"
        ) from exc
    if isinstance(model, FlowEstimator):
        return FlowInterpolator(model)
    return model


def build_interpolator(
    name: str,
    checkpoint: str | None = None,
    params: Mapping[str, Any] | None = None,
    exact_fallback: Mapping[str, Any] | None = None,
) -> PairInterpolator:
    """Build the configured model, with its ``exact_fallback`` when it is midpoint-only.

    ``exact_fallback`` is ``interpolation.exact_fallback`` as a mapping (``name``,
    ``checkpoint``, ``params``); it is ignored for models that take any t.
    """
    model = _build(name, checkpoint, params, "model")
    fb = dict(exact_fallback or {})
    if model.arbitrary_t or not fb.get("name"):
        return model
    key = "interpolation.exact_fallback"
    fallback = _build(fb["name"], fb.get("checkpoint"), fb.get("params"), key)
    if not fallback.arbitrary_t:
        raise ConfigError(
            f"{key}.name={fb['name']!r} predicts midpoints only too; choose a model "
            "with arbitrary t (e.g. dis, farneback, rife_v4, raft)"
        )
    return ExactFallback(model, fallback)


def build_for_validation(
    name: str,
    checkpoint: str | None = None,
    params: Mapping[str, Any] | None = None,
    exact_fallback: Mapping[str, Any] | None = None,
) -> PairInterpolator:
    """Build the configured model as the driver checks it: torch models on the CPU in fp32.

    The driver (often a head node without a GPU) only proves that the name, settings and
    checkpoint are valid; ``device`` and ``precision`` are for the workers, so they are
    checked without touching a device (:func:`check_runtime_settings`) and the model is
    built on the CPU in fp32, where it always can be.
    """
    fb = dict(exact_fallback or {})
    if fb.get("name"):
        fb["params"] = _on_cpu(fb["name"], fb.get("params"), "interpolation.exact_fallback")
    return build_interpolator(name, checkpoint, _on_cpu(name, params, "model"), fb)


def _on_cpu(name: str, params: Mapping[str, Any] | None, key: str) -> dict[str, Any]:
    """``params`` with device cpu and precision fp32, after checking them, for torch models."""
    out = dict(params or {})
    if not is_torch_model(name):
        return out
    from atlinter_ray.models.torch_runtime import check_runtime_settings

    try:
        check_runtime_settings(
            str(out.get("device", "auto")), str(out.get("precision", "fp32")),
            out.get("batch_size"), out.get("tile"), int(out.get("tile_overlap", 64)),
        )
    except ConfigError as exc:
        raise ConfigError(str(exc).replace("model.params.", f"{key}.params.")) from exc
    return {**out, "device": "cpu", "precision": "fp32"}


def check_reachable(model: PairInterpolator, tasks: Sequence[GapTask]) -> None:
    """Refuse, before any work, positions that a midpoint-only model cannot reach."""
    if model.arbitrary_t:
        return
    for task in tasks:
        for job in task.predicted:
            if job.t is not None and not is_dyadic(job.t):
                raise ConfigError(
                    f"model {model.name!r} predicts midpoints only, but slice {job.slice} of "
                    f"{task.dataset_id} sits at t={job.t:.4g} between sections {task.left} "
                    f"and {task.right} (interpolation.placement=exact). Fix: set "
                    "interpolation.exact_fallback.name to a model with arbitrary t (e.g. "
                    "dis, or rife_v4 with its checkpoint), or interpolation.placement=atlinter"
                )


def atlinter_canvas(model: PairInterpolator, placement: Placement | str) -> int:
    """The padding multiple :func:`predict` bisects on: the model's with ``atlinter``, else 1."""
    if placement != Placement.atlinter:
        return 1
    inner = model.midpoint if isinstance(model, ExactFallback) else model
    return inner.atlinter_canvas


def slice_provenance(
    model: PairInterpolator, t: float | None, run_provenance: Mapping[str, Any]
) -> dict[str, Any]:
    """Provenance of the slice at ``t``: the producing model's with a fallback, else the run's.

    ``t`` is None for slices predicted without a position (reference-guided edges).
    """
    if isinstance(model, ExactFallback) and t is not None:
        return model.producer(t).provenance()
    return dict(run_provenance)


def predict(
    model: PairInterpolator,
    a: np.ndarray,
    b: np.ndarray,
    positions: Sequence[float],
    peak: float,
    canvas: int = 1,
) -> Prediction:
    """Frames between each pair ``(a[i], b[i])`` at every position in ``positions`` (host)."""
    result = predict_pairs(model, a, b, [tuple(positions)] * a.shape[0], peak, canvas)
    frames = np.stack([_host(f) for f in result.frames])
    return Prediction(frames, sum(result.model_calls))


def predict_pairs(
    model: PairInterpolator,
    a: Any,
    b: Any,
    positions: Sequence[Sequence[float]],
    peak: float,
    canvas: int = 1,
) -> PairsPrediction:
    """Frames between each pair ``(a[i], b[i])`` at its own ``positions[i]``.

    ``a`` and ``b`` are ``(N, C, H, W)`` frames in data units, host arrays or tensors
    on ``model.device``; the frames come back in the same place. ``canvas`` > 1 pads
    every pair once at the bottom/right with zeros to a multiple of it, predicts on
    that canvas and crops the frames (see :func:`atlinter_canvas`). On the host,
    float64 sections are kept in float64; anything else is computed in float32.
    """
    a, b = _as_input(model, a), _as_input(model, b)
    if canvas > 1:
        h, w = a.shape[-2:]
        whole = predict_pairs(
            model, _pad(a, -h % canvas, -w % canvas), _pad(b, -h % canvas, -w % canvas),
            positions, peak,
        )
        return PairsPrediction([f[..., :h, :w] for f in whole.frames], whole.model_calls)
    n = a.shape[0]
    if isinstance(model, ExactFallback):
        return _split(model, a, b, positions, peak)
    if model.arbitrary_t:
        pair = np.repeat(np.arange(n), [len(p) for p in positions])
        ts = np.array([x for p in positions for x in p], dtype=np.float32)
        if not len(pair):
            return PairsPrediction([a[:0] for _ in range(n)], [0] * n)
        frames = model.interpolate_items(a, b, pair, ts, peak)
        bounds = np.cumsum([0, *(len(p) for p in positions)])
        return PairsPrediction(
            [frames[bounds[i] : bounds[i + 1]] for i in range(n)], [len(p) for p in positions]
        )
    known: dict[tuple[int, float], Any] = {}
    for i in range(n):
        known[i, 0.0], known[i, 1.0] = a[i], b[i]
    calls = [0] * n
    levels = [bisection_nodes(p) for p in positions]
    for depth in range(max((len(lv) for lv in levels), default=0)):
        items = [(i, t) for i, lv in enumerate(levels) if depth < len(lv) for t in lv[depth]]
        lefts = _stack(model, [known[i, t - _half_step(t)] for i, t in items])
        rights = _stack(model, [known[i, t + _half_step(t)] for i, t in items])
        mids = model.interpolate_items(
            lefts, rights, np.arange(len(items)), np.full(len(items), 0.5, np.float32), peak
        )
        for m, (i, t) in enumerate(items):
            known[i, t] = mids[m]
            calls[i] += 1
    frames = [_stack(model, [known[i, t] for t in p]) if p else a[:0] for i, p in enumerate(positions)]
    return PairsPrediction(frames, calls)


def model_context(model: PairInterpolator) -> int:
    """Known sections the model reads on each side beyond a gap's bounds (planning)."""
    return model.context if isinstance(model, ContextInterpolator) else 0


def predict_gap(
    model: PairInterpolator,
    sections: Mapping[int, np.ndarray],
    task: GapTask,
    peak: float,
    canvas: int = 1,
) -> Prediction:
    """Frames ``(1, K, C, H, W)`` of one task's predicted slices from its read ``sections``.

    ``sections`` maps section number to ``(C, H, W)`` and holds at least the task's
    :attr:`~atlinter_ray.planning.GapTask.sources`; a context model also gets the
    task's ``context`` sections as neighbours. ``canvas`` as for :func:`predict`.
    """
    left, right = task.pair
    positions = task.positions
    a, b = sections[left], sections[right]
    if not isinstance(model, ContextInterpolator):
        return predict(model, a[None], b[None], positions, peak, canvas)
    gap = right - left
    before = [s for s in task.context if s < left]
    after = [s for s in task.context if s > right]
    frames = model.interpolate_context(
        a.astype(np.float32, copy=False), b.astype(np.float32, copy=False),
        np.asarray(positions, np.float32), peak,
        Neighbour(sections[before[-1]], gap / (left - before[-1])) if before else None,
        Neighbour(sections[after[0]], gap / (after[0] - right)) if after else None,
    )
    return Prediction(frames[None], len(positions))


def _split(
    model: ExactFallback, a: Any, b: Any, positions: Sequence[Sequence[float]], peak: float
) -> PairsPrediction:
    """Dyadic positions by bisection with the midpoint model, the others by the fallback."""
    frames: list[list[Any]] = [[None] * len(p) for p in positions]
    calls = [0] * len(positions)
    for sub in (model.midpoint, model.fallback):
        which = [[k for k, t in enumerate(p) if model.producer(t) is sub] for p in positions]
        if not any(which):
            continue
        part = predict_pairs(
            sub, a, b, [[p[k] for k in w] for p, w in zip(positions, which)], peak
        )
        for i, w in enumerate(which):
            got = _as_input(model, part.frames[i])
            for j, k in enumerate(w):
                frames[i][k] = got[j]
            calls[i] += part.model_calls[i]
    return PairsPrediction(
        [_stack(model, f) if f else a[:0] for f in frames], calls
    )


def _pad(x: Any, rows: int, cols: int) -> Any:
    """``x`` with ``rows`` and ``cols`` of zeros added at the bottom and right."""
    if isinstance(x, np.ndarray):
        return np.pad(x, [(0, 0)] * (x.ndim - 2) + [(0, rows), (0, cols)])
    import torch.nn.functional as F

    return F.pad(x, (0, cols, 0, rows))


def _as_input(model: PairInterpolator, x: Any) -> Any:
    """Frames where ``model`` wants them: numpy for host models (float64 kept, else
    float32), else float32 on its device."""
    if model.device is None:
        x = _host(x)
        return x.astype(np.float64 if x.dtype == np.float64 else np.float32, copy=False)
    import torch

    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    return x.to(model.device).float()


def _host(x: Any) -> np.ndarray:
    """A host array of ``x`` (numpy, or a tensor fetched from its device)."""
    return x if isinstance(x, np.ndarray) else x.detach().cpu().numpy()


def _stack(model: PairInterpolator, frames: Sequence[Any]) -> Any:
    """Stack frames of one kind (arrays, or tensors on the model's device)."""
    if model.device is None:
        return np.stack(frames)
    import torch

    return torch.stack(list(frames))


def _half_step(t: float) -> float:
    """Distance from dyadic node ``t`` to its two parents in the bisection tree."""
    _, den = float(t).as_integer_ratio()
    return 1.0 / den
