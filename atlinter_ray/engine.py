"""Turn a model and two bounding sections into the frames a task needs.

Models with arbitrary ``t`` are asked for every position in one call. Midpoint-only
models are driven by bisection over only the tree nodes the positions need (see
:func:`atlinter_ray.planning.bisection_nodes`), one batched call per tree level.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from atlinter_ray.errors import ConfigError
from atlinter_ray.models.base import FlowEstimator, PairInterpolator, build_model
from atlinter_ray.models.flow import FlowInterpolator
from atlinter_ray.planning import bisection_nodes


@dataclass(frozen=True, slots=True)
class Prediction:
    """Frames ``(N, K, C, H, W)`` for N pairs at K positions, and the model calls spent."""

    frames: np.ndarray
    model_calls: int


def build_interpolator(
    name: str, checkpoint: str | None = None, params: Mapping[str, Any] | None = None
) -> PairInterpolator:
    """Build the configured model; flow estimators are wrapped to give frames at any t."""
    kwargs = dict(params or {})
    if checkpoint:
        kwargs["checkpoint"] = checkpoint
    try:
        model = build_model(name, **kwargs)
    except TypeError as exc:
        raise ConfigError(
            f"model {name!r} does not accept these settings ({exc}); check model.params "
            "and model.checkpoint (classical models take no checkpoint)"
        ) from exc
    if isinstance(model, FlowEstimator):
        return FlowInterpolator(model)
    return model


def predict(
    model: PairInterpolator,
    a: np.ndarray,
    b: np.ndarray,
    positions: Sequence[float],
    peak: float,
) -> Prediction:
    """Frames between each pair ``(a[i], b[i])`` at every position in ``positions``."""
    a = a.astype(np.float32, copy=False)
    b = b.astype(np.float32, copy=False)
    n = a.shape[0]
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


def _half_step(t: float) -> float:
    """Distance from dyadic node ``t`` to its two parents in the bisection tree."""
    _, den = float(t).as_integer_ratio()
    return 1.0 / den
