"""Turn a model and two bounding sections into the frames a task needs.

Models with arbitrary ``t`` are asked for every position in one call. Midpoint-only
models are driven by bisection over only the tree nodes the positions need (see
:func:`atlinter_ray.planning.bisection_nodes`), one batched call per tree level. A
midpoint-only model paired with an arbitrary-t fallback (:class:`ExactFallback`,
``interpolation.exact_fallback``) keeps every dyadic position and hands the others
(t = 1/3, ...) to the fallback, so ``placement=exact`` works with RIFE_HD or CAIN.

With ``placement=atlinter`` a model may also ask for the predecessor's padded canvas
(:func:`atlinter_canvas`): atlinter 0.2.3 padded the two sections of a RIFE pair once,
with zeros at the bottom/right to a multiple of 32, bisected on that canvas (so the
padded border of each level's frames feeds the next level) and cropped at the end;
:func:`predict` does the same when given ``canvas``. Float64 sections stay float64
(the predecessor's volume was float64), so arithmetic models reproduce its values.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from atlinter_ray.errors import ConfigError
from atlinter_ray.models.base import FlowEstimator, PairInterpolator, build_model
from atlinter_ray.models.flow import FlowInterpolator
from atlinter_ray.planning import GapTask, Placement, bisection_nodes, is_dyadic


@dataclass(frozen=True, slots=True)
class Prediction:
    """Frames ``(N, K, C, H, W)`` for N pairs at K positions, and the model calls spent."""

    frames: np.ndarray
    model_calls: int


class ExactFallback(PairInterpolator):
    """A midpoint-only model for dyadic positions and an arbitrary-t model for the rest."""

    arbitrary_t = True

    def __init__(self, midpoint: PairInterpolator, fallback: PairInterpolator) -> None:
        self.midpoint = midpoint
        self.fallback = fallback
        self.name = midpoint.name  # type: ignore[misc]

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


def check_reachable(model: PairInterpolator, tasks: Sequence[GapTask]) -> None:
    """Refuse, before any work, positions that a midpoint-only model cannot reach."""
    if model.arbitrary_t:
        return
    for task in tasks:
        for job in task.predicted:
            if not is_dyadic(job.t):
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
    model: PairInterpolator, t: float, run_provenance: Mapping[str, Any]
) -> dict[str, Any]:
    """Provenance of the slice at ``t``: the producing model's with a fallback, else the run's."""
    if isinstance(model, ExactFallback):
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
    """Frames between each pair ``(a[i], b[i])`` at every position in ``positions``.

    ``canvas`` > 1 pads every pair once at the bottom/right with zeros to a multiple of
    it, predicts on that canvas and crops the frames (see :func:`atlinter_canvas`).
    Sections in float64 are kept in float64; any other dtype is computed in float32.
    """
    if canvas > 1:
        h, w = a.shape[-2:]
        pad = [(0, 0)] * (a.ndim - 2) + [(0, -h % canvas), (0, -w % canvas)]
        whole = predict(model, np.pad(a, pad), np.pad(b, pad), positions, peak)
        return Prediction(whole.frames[..., :h, :w], whole.model_calls)
    dtype = np.float64 if np.float64 in (a.dtype, b.dtype) else np.float32
    a = a.astype(dtype, copy=False)
    b = b.astype(dtype, copy=False)
    n = a.shape[0]
    if isinstance(model, ExactFallback):
        return _split(model, a, b, positions, peak)
    if model.arbitrary_t:
        frames = model.interpolate(a, b, np.asarray(positions, dtype=np.float32), peak)
        return Prediction(frames, n * len(positions))
    known: dict[float, np.ndarray] = {0.0: a, 1.0: b}
    calls = 0
    for level in bisection_nodes(positions):
        halves = [_half_step(t) for t in level]
        lefts = np.concatenate([known[t - h] for t, h in zip(level, halves)])
        rights = np.concatenate([known[t + h] for t, h in zip(level, halves)])
        mids = model.interpolate(lefts, rights, np.array([0.5], np.float32), peak)[:, 0]
        calls += mids.shape[0]
        for i, t in enumerate(level):
            known[t] = mids[i * n : (i + 1) * n]
    return Prediction(np.stack([known[t] for t in positions], axis=1), calls)


def _split(
    model: ExactFallback, a: np.ndarray, b: np.ndarray, positions: Sequence[float], peak: float
) -> Prediction:
    """Dyadic positions by bisection with the midpoint model, the others by the fallback."""
    frames = np.empty((a.shape[0], len(positions), *a.shape[1:]), a.dtype)
    calls = 0
    for sub in (model.midpoint, model.fallback):
        which = [k for k, t in enumerate(positions) if model.producer(t) is sub]
        if which:
            part = predict(sub, a, b, [positions[k] for k in which], peak)
            frames[:, which] = part.frames
            calls += part.model_calls
    return Prediction(frames, calls)


def _half_step(t: float) -> float:
    """Distance from dyadic node ``t`` to its two parents in the bisection tree."""
    _, den = float(t).as_integer_ratio()
    return 1.0 / den
