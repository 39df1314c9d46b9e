"""Models that look beyond the two bounding sections: curved trajectories and fusion.

Both are :class:`~atlinter_ray.models.base.ContextInterpolator` s built on any flow
estimators of the registry (``dis``, ``deepflow``, ``tvl1``, ``farneback``, ``raft``,
``maskflownet``).

**Curved trajectories** (``curved``). Two-section flow moves every pixel on a straight
line from ``a`` to ``b``. With the known section before ``a`` (``p``) and the one after
``b`` (``n``), each trajectory is a Catmull-Rom (cubic Hermite) curve through four
sections instead. Its deviation from the straight chord at ``t`` is::

    delta(t) = -t (1 - t) * ((1 - t) * w_p * acc_a + t * w_n * acc_b)
    acc_a = F_ab + r_p * F_ap        acc_b = F_ba + r_n * F_bn        w = r / (1 + r)

where ``acc`` is the second difference of the trajectory at a section (the flows to its
two neighbours) and ``r`` the pair's gap over the neighbour's distance (1 on evenly
spaced sections, where ``w = 1/2``); the tangents are the three-point derivatives for
uneven spacing, so a parabola is followed exactly. Both ends are then sampled at the
straight-line positions minus ``delta``. A missing neighbour (first or last gap)
contributes no curvature, which gives back the two-section model.

**Fusion** (``fusion``). Several estimators predict the same slice; each pixel blends
them by confidence: the photometric disagreement of an estimator's two warped ends
``e = |a(x + d_a) - b(x + d_b)|`` (large where its flow is wrong or occluded), smoothed
over ``window`` pixels, gives the weight ``1 / (floor^2 + e^2)``. Where all agree this is
the plain mean, which already beats every member (averaging independent errors); where
one estimator breaks, it is ignored.

Measured on real volumes at gap 8 (``benchmarks/bench_context.py``; the table is in
docs/benchmarks/context-models.md): curved trajectories add 0.05-0.2 dB PSNR to their flow; fusion of DIS,
DeepFlow and TV-L1 with curved trajectories adds 0.4-0.8 dB over the best member.

**Stack-adaptive tuning** (:meth:`FusionInterpolator.tune`): the known sections of a
stack supervise the choice of members and trajectory. Each interior known section is
predicted from its two neighbours (twice the real gap), every subset of the members,
curved or straight, is scored, and the best replaces the default only when it wins by
``TUNE_MARGIN_DB``. Continuous settings (smoothing, blend weights) are not tuned: at
twice the gap they come out systematically too strong for the real gap.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from atlinter_ray.errors import ConfigError
from atlinter_ray.models.base import (
    ContextInterpolator,
    FlowEstimator,
    Neighbour,
    build_model,
    register_model,
)
from atlinter_ray.models.flow import warp

#: Extra PSNR (dB, at twice the gap) a tuned configuration needs to replace the default.
TUNE_MARGIN_DB = 0.1


def curvature_shift(
    t: float,
    f_ab: np.ndarray,
    f_ba: np.ndarray,
    before: tuple[np.ndarray, float] | None,
    after: tuple[np.ndarray, float] | None,
) -> np.ndarray:
    """``delta(t)`` ``(2, H, W)``: the curve's offset from the straight chord (see module)."""
    zero = np.zeros_like(f_ab)
    term_a = (f_ab + before[1] * before[0]) * (before[1] / (1 + before[1])) if before else zero
    term_b = (f_ba + after[1] * after[0]) * (after[1] / (1 + after[1])) if after else zero
    delta: np.ndarray = -t * (1.0 - t) * ((1.0 - t) * term_a + t * term_b)
    return delta


@dataclass(frozen=True, slots=True)
class _Flows:
    """One estimator's flows for a pair, and to each neighbour with its distance ratio."""

    f_ab: np.ndarray
    f_ba: np.ndarray
    before: tuple[np.ndarray, float] | None = None
    after: tuple[np.ndarray, float] | None = None

    @classmethod
    def of(cls, flows: np.ndarray, before: Neighbour | None, after: Neighbour | None) -> _Flows:
        """From :func:`pair_flows`' stack."""
        k = 2
        f_ap = f_bn = None
        if before is not None:
            f_ap, k = (flows[k], before.ratio), k + 1
        if after is not None:
            f_bn = (flows[k], after.ratio)
        return cls(flows[0], flows[1], f_ap, f_bn)

    def frame(
        self, a: np.ndarray, b: np.ndarray, t: float, curved: bool
    ) -> tuple[np.ndarray, np.ndarray]:
        """The frame at ``t`` and its photometric disagreement ``(H, W)``."""
        d_a, d_b = t * self.f_ba, (1.0 - t) * self.f_ab
        if curved:
            delta = curvature_shift(t, self.f_ab, self.f_ba, self.before, self.after)
            d_a, d_b = d_a - delta, d_b - delta
        wa, wb = warp(a, d_a), warp(b, d_b)
        return (1.0 - t) * wa + t * wb, np.abs(wa - wb).mean(axis=0)


def pair_flows(
    estimator: FlowEstimator,
    a: np.ndarray,
    b: np.ndarray,
    peak: float,
    before: Neighbour | None,
    after: Neighbour | None,
) -> np.ndarray:
    """``(F_ab, F_ba[, F_ap][, F_bn])`` stacked ``(M, 2, H, W)``, in one estimator call."""
    src, dst = [a, b], [b, a]
    if before is not None:
        src.append(a)
        dst.append(before.image.astype(np.float32, copy=False))
    if after is not None:
        src.append(b)
        dst.append(after.image.astype(np.float32, copy=False))
    flows: np.ndarray = estimator.flow(np.stack(src), np.stack(dst), peak=peak)
    return flows


def fuse(
    frames: Sequence[np.ndarray], errors: Sequence[np.ndarray], floor: float, window: float
) -> np.ndarray:
    """Blend ``frames`` ``(C, H, W)`` per pixel by ``1 / (floor^2 + smoothed error^2)``."""
    if len(frames) == 1:
        return frames[0]
    weights = [
        1.0 / (floor**2 + cv2.GaussianBlur(e * e, (0, 0), window)) for e in errors
    ]
    total = np.sum(weights, axis=0)
    fused: np.ndarray = np.sum([w[None] * f for w, f in zip(weights, frames)], axis=0)
    fused /= total[None]
    return fused


@register_model("fusion")
class FusionInterpolator(ContextInterpolator):
    """Per-pixel confidence fusion of several flow estimators, on curved trajectories.

    ``members``: registry names of flow estimators (default DIS, DeepFlow, TV-L1);
    ``member_params``: keyword settings per member name (e.g. ``{raft: {checkpoint:
    ...}}``); ``curved``: Catmull-Rom trajectories through four sections (default true);
    ``floor``: the disagreement (fraction of full intensity) under which members count
    as agreeing (default 0.02); ``window``: Gaussian sigma in pixels over which the
    disagreement is pooled (default 2.0); ``tune``: choose members and trajectory per
    stack from its known sections (a job stage; default false).
    """

    arbitrary_t = True

    def __init__(
        self,
        members: Sequence[str] = ("dis", "deepflow", "tvl1"),
        member_params: Mapping[str, Mapping[str, Any]] | None = None,
        curved: bool = True,
        floor: float = 0.02,
        window: float = 2.0,
        tune: bool = False,
    ) -> None:
        members = list(members)
        if not members or len(set(members)) != len(members):
            raise ConfigError(
                f"model.params.members={members}: name at least one flow model, each once "
                "(e.g. [dis,deepflow,tvl1])"
            )
        if floor <= 0 or window <= 0:
            raise ConfigError(
                f"model.params.floor={floor}, window={window}: both must be positive"
            )
        params = {k: dict(v) for k, v in (member_params or {}).items()}
        unknown = set(params) - set(members)
        if unknown:
            raise ConfigError(
                f"model.params.member_params names {sorted(unknown)}, which are not in "
                f"model.params.members={members}"
            )
        self.estimators: dict[str, FlowEstimator] = {}
        for m in members:
            est = build_model(m, **params.get(m, {}))
            if not isinstance(est, FlowEstimator):
                raise ConfigError(
                    f"model.params.members: {m!r} is not a flow model; choose flow models "
                    "(dis, deepflow, tvl1, farneback, raft, raft_small, maskflownet)"
                )
            self.estimators[m] = est
        self.members = members
        self.curved = bool(curved)
        self.floor = float(floor)
        self.window = float(window)
        self.tune_enabled = bool(tune)

    def interpolate_context(
        self,
        a: np.ndarray,
        b: np.ndarray,
        t: np.ndarray,
        peak: float,
        before: Neighbour | None,
        after: Neighbour | None,
    ) -> np.ndarray:
        """Frames ``(K, C, H, W)`` of the pair ``a``, ``b`` at positions ``t``."""
        a = a.astype(np.float32, copy=False)
        b = b.astype(np.float32, copy=False)
        flows = [
            _Flows.of(pair_flows(self.estimators[m], a, b, peak, before, after), before, after)
            for m in self.members
        ]
        return np.stack(
            [self._fused(flows, a, b, float(tk), peak) for tk in np.ravel(t)]
        ).astype(np.float32)

    def _fused(
        self, flows: Sequence[_Flows], a: np.ndarray, b: np.ndarray, t: float, peak: float
    ) -> np.ndarray:
        """One fused frame at ``t`` from every member's flows."""
        parts = [f.frame(a, b, t, self.curved) for f in flows]
        return fuse([p[0] for p in parts], [p[1] for p in parts],
                    self.floor * peak, self.window)

    def settings(self) -> dict[str, Any]:
        """The settings that define this model's output (provenance, tuning cache key)."""
        return {"members": list(self.members), "curved": self.curved,
                "floor": self.floor, "window": self.window}

    def provenance(self) -> dict[str, Any]:
        """Name and settings; members are classical or record their own checkpoints."""
        members = {m: e.provenance().get("checkpoint_sha256") for m, e in self.estimators.items()}
        return {"model": self.name, "checkpoint_sha256": None, **self.settings(),
                "member_checkpoints": members}

    def tune(
        self, sections: np.ndarray, numbers: Sequence[int], peak: float
    ) -> dict[str, Any]:
        """Choose members and trajectory for one stack from its known sections only.

        ``sections`` ``(n, C, H, W)`` at sorted ``numbers``. Section ``j`` is predicted
        from ``j - 1`` and ``j + 1`` (neighbours ``j - 3``, ``j + 3``); returns the
        chosen ``members`` and ``curved``, every configuration's mean PSNR and the
        seconds spent.
        """
        from atlinter_ray.metrics import psnr  # scikit-image: only where tuning runs

        start = time.perf_counter()
        z = list(numbers)
        n = len(z)
        if n < 3:
            return {"members": list(self.members), "curved": self.curved, "scores": {},
                    "targets": 0, "seconds": round(time.perf_counter() - start, 3)}
        imgs = sections.astype(np.float32, copy=False)
        pairs = [(i, i + 2) for i in range(n - 2)]
        # every member's flows both ways across each pair of sections two apart
        flows: dict[str, dict[tuple[int, int], np.ndarray]] = {}
        for m, est in self.estimators.items():
            src = np.stack([imgs[i] for i, j in pairs] + [imgs[j] for i, j in pairs])
            dst = np.stack([imgs[j] for i, j in pairs] + [imgs[i] for i, j in pairs])
            out = est.flow(src, dst, peak=peak)
            flows[m] = {p: out[k] for k, p in enumerate(pairs)}
            flows[m].update({(j, i): out[len(pairs) + k] for k, (i, j) in enumerate(pairs)})
        configs = [(subset, curved) for r in range(1, len(self.members) + 1)
                   for subset in itertools.combinations(self.members, r)
                   for curved in (True, False)]
        scores: dict[tuple[tuple[str, ...], bool], list[float]] = {c: [] for c in configs}
        for j in range(1, n - 1):
            lo, hi = j - 1, j + 1
            t = (z[j] - z[lo]) / (z[hi] - z[lo])
            per_member = {}
            for m in self.members:
                fm, gap = flows[m], z[hi] - z[lo]
                f = _Flows(
                    fm[(lo, hi)], fm[(hi, lo)],
                    (fm[(lo, lo - 2)], gap / (z[lo] - z[lo - 2])) if lo >= 2 else None,
                    (fm[(hi, hi + 2)], gap / (z[hi + 2] - z[hi])) if hi + 2 < n else None,
                )
                per_member[m] = {c: f.frame(imgs[lo], imgs[hi], t, c) for c in (True, False)}
            truth = imgs[j]
            for subset, curved in configs:
                parts = [per_member[m][curved] for m in subset]
                frame = fuse([p[0] for p in parts], [p[1] for p in parts],
                             self.floor * peak, self.window)
                scores[(subset, curved)].append(
                    psnr(np.clip(frame, 0, peak), truth, data_range=peak))
        mean = {c: float(np.mean(v)) for c, v in scores.items()}
        default = (tuple(self.members), self.curved)
        best = max(mean, key=lambda c: mean[c])
        chosen = best if mean[best] >= mean[default] + TUNE_MARGIN_DB else default
        return {
            "members": list(chosen[0]), "curved": chosen[1],
            "scores": {f"{'+'.join(c[0])}{' curved' if c[1] else ''}": round(v, 3)
                       for c, v in sorted(mean.items(), key=lambda kv: -kv[1])},
            "targets": n - 2,
            "seconds": round(time.perf_counter() - start, 3),
        }

    def tuned(self, result: Mapping[str, Any]) -> FusionInterpolator:
        """A copy of this model with a :meth:`tune` result applied."""
        clone = object.__new__(type(self))
        clone.__dict__.update(self.__dict__)
        clone.members = [m for m in result["members"] if m in self.estimators]
        clone.curved = bool(result["curved"])
        clone.tune_enabled = False
        return clone


@register_model("curved")
class CurvedFlow(FusionInterpolator):
    """One flow estimator on curved trajectories through four sections.

    ``flow``: the registry name of the flow estimator (default ``dis``); any other
    keyword is passed to it (e.g. ``preset=fast`` for DIS, ``checkpoint=`` for RAFT).
    """

    def __init__(self, flow: str = "dis", **flow_params: Any) -> None:
        super().__init__(members=[flow], member_params={flow: flow_params}, curved=True)
