"""Reference-guided prediction: move known gene sections along a reference's flow.

A reference volume (e.g. the Nissl stain in the same 25 µm space) is known at every
slice; the gene is known only at its sections. The flow between the reference's slices
``s`` and ``k`` moves the gene section ``k`` to slice ``s``::

    F = estimator.flow(ref[s], ref[k])      # ref[s](x) ≈ ref[k](x + F(x))
    gene[s](x) ≈ gene[k](x + F(x))          # = flow.warp(gene[k], F)

**Two-sided** (the default, :func:`predict_two_sided`): both bounding sections ``l`` and
``r`` are moved to ``s`` and blended per pixel, each with the weight::

    w_l = (1 - t) / ((floor^2 + res_l^2) * (1 + fb_l^2))      (w_r alike, with t)

``t`` the position of ``s`` in the gap; ``res_l = |ref[s] - ref[l](x + F_sl)|`` the
reference's own residual after the warp (where the flow failed to match the reference,
a fraction of its full intensity) and ``fb_l = |F_sl(x) + F_ls(x + F_sl(x))|`` the
forward-backward inconsistency in pixels (occlusions, flow errors), both pooled over
``window`` pixels. At a known section (``t = 0``) this is the nearest-only prediction.
The frame comes with an error estimate, the disagreement of the two warped sections and
the blended reference residual in quadrature, by which
:class:`~atlinter_ray.models.context.FusionInterpolator` weighs it against its own
members: where the reference's flow cannot explain the reference, it is not used.

**Nearest-only** (:func:`predict_from_reference`; ``interpolation.placement=atlinter``
and edge slices): the nearest known section alone. This is atlinter 0.2.3's
``GeneOpticalFlow.predict_slice``: same pair (target first, nearest known second) and
the same nearest-section rule (ties go to the lower section number). Without
``atlinter``, two deliberate differences:

* The predecessor's ``OpticalFlow.warp_image`` sampled ``gene[k]`` at
  ``(row - F[0], col - F[1])``, reading the x displacement as rows and with the sign
  reversed, although its RAFT and MaskFlowNet return ``(dx, dy)`` in the convention
  above; the result was shifted the wrong way. We warp with ``x + F(x)``, x first.
* Outside the image we replicate the border (:func:`~atlinter_ray.models.flow.warp`);
  the predecessor's ``map_coordinates`` filled zeros.

With ``atlinter=True`` (``interpolation.placement=atlinter``) the predecessor's volume is
reproduced instead: its warp (:func:`predecessor_warp`, scipy's ``map_coordinates`` in
float64, zeros outside) and its input rule (:func:`predecessor_flow_inputs`: a target
slice whose values are all <= 1 sends both slices to the flow model as
``uint8(255 x)``, truncated). Its edge slices, predicted from the nearest known
section too, are ``interpolation.edge=reference``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import cv2
import numpy as np
from scipy import ndimage

from atlinter_ray.errors import ConfigError
from atlinter_ray.models.base import FlowEstimator, Neighbour, PairInterpolator
from atlinter_ray.models.flow import FlowInterpolator, warp

#: Reference residual (fraction of full intensity) under which a warp counts as exact.
FLOOR = 0.02
#: Gaussian sigma (pixels) over which residuals and inconsistencies are pooled.
WINDOW = 2.0


@dataclass(frozen=True, slots=True)
class GuideSlices:
    """The reference around one gap: ``(Cr, H, W)`` slices at the known sections used
    (``left``, ``right``, and the context ``before``/``after`` when read), ``targets``
    ``(K, Cr, H, W)`` at the slices to predict, and the reference's full intensity."""

    targets: np.ndarray
    left: np.ndarray
    right: np.ndarray
    peak: float = 1.0
    before: np.ndarray | None = None
    after: np.ndarray | None = None


@runtime_checkable
class ReferenceAware(Protocol):
    """A model that takes the reference itself (fusion, curved): it blends its own flows."""

    def reference_estimator(self) -> FlowEstimator:
        """The flow estimator it runs on the reference."""

    def interpolate_reference(
        self, a: np.ndarray, b: np.ndarray, t: np.ndarray, peak: float,
        before: Neighbour | None, after: Neighbour | None, guide: GuideSlices,
    ) -> np.ndarray:
        """Frames ``(K, C, H, W)`` of the pair at ``t``, guided by the reference."""


def nearest_known(slice_number: int, known_sections: Sequence[int]) -> int:
    """The known section closest to ``slice_number``; a tie goes to the lower one."""
    if len(known_sections) == 0:
        raise ValueError("nearest_known: no known sections to choose from")
    return min(sorted(known_sections), key=lambda k: abs(k - slice_number))


def reference_estimator(model: PairInterpolator, model_name: str) -> FlowEstimator:
    """The flow estimator a model runs on the reference, or a ConfigError for pair
    interpolators (they predict frames, not flow)."""
    if isinstance(model, FlowInterpolator):
        return model.estimator
    if isinstance(model, ReferenceAware):
        return model.reference_estimator()
    raise ConfigError(
        f"interpolation.reference is set but model {model_name!r} is a pair interpolator "
        "(it predicts frames, not flow), so the reference cannot guide it. Fix: choose "
        "model=fusion (recommended: it blends the reference with the gene's own flows), "
        "curved or a flow model (dis, farneback, deepflow, tvl1, raft, raft_small, "
        "maskflownet), or set interpolation.reference=null"
    )


def predecessor_flow_inputs(
    target: np.ndarray, known: np.ndarray, peak: float
) -> tuple[np.ndarray, np.ndarray, float]:
    """The predecessor's flow-model inputs for one pair: ``uint8(255 x)`` when the target's
    values are all <= 1 (its ``np.max(img1) <= 1`` rule), else the slices as they are."""
    if target.max() <= 1:
        return (target * 255).astype(np.uint8), (known * 255).astype(np.uint8), 255.0
    return target, known, peak


def predecessor_warp(section: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """atlinter's ``warp_image``: each channel of ``(C, H, W)`` sampled at ``(row, col) - flow``
    (flow channel 0 taken as rows), bilinear in float64, zeros outside."""
    coords = np.mgrid[: section.shape[1], : section.shape[2]] - flow
    return np.stack([
        ndimage.map_coordinates(channel.astype(np.float64), coords, order=1)
        for channel in section
    ])


def predict_from_reference(
    estimator: FlowEstimator,
    reference_target: np.ndarray,
    reference_known: np.ndarray,
    known: np.ndarray,
    reference_peak: float = 1.0,
    atlinter: bool = False,
) -> np.ndarray:
    """Warp each known gene section along the flow between its two reference slices.

    Args:
        estimator: any flow estimator (RAFT, MaskFlowNet, DIS, ...).
        reference_target: ``(N, Cr, H, W)`` reference slices at the slices to predict.
        reference_known: ``(N, Cr, H, W)`` reference slices at the known sections used.
        known: ``(N, C, H, W)`` gene sections at those known sections.
        reference_peak: full intensity of the reference data (e.g. 255 for uint8).
        atlinter: reproduce the predecessor's inputs and warp (see the module docstring).

    Returns:
        ``(N, C, H, W)`` predicted gene slices in the units of ``known``: float32, or
        float64 with ``atlinter``.
    """
    if reference_target.shape != reference_known.shape:
        raise ValueError(
            f"reference slices differ in shape: {reference_target.shape} (targets) vs "
            f"{reference_known.shape} (known sections)"
        )
    if reference_target.ndim != 4 or known.ndim != 4:
        raise ValueError(
            f"expected (N, C, H, W) batches, got reference {reference_target.shape} and "
            f"gene {known.shape}"
        )
    if known.shape[0] != reference_target.shape[0] or known.shape[2:] != reference_target.shape[2:]:
        raise ValueError(
            f"gene sections {known.shape} and reference slices {reference_target.shape} "
            "must have the same count and the same H, W (both in reference space)"
        )
    if not atlinter:
        flows = estimator.flow(
            reference_target.astype(np.float32, copy=False),
            reference_known.astype(np.float32, copy=False),
            peak=reference_peak,
        )
        return np.stack([warp(section, flow) for section, flow in zip(known, flows)])
    frames = []
    for target, source, section in zip(reference_target, reference_known, known):
        x, y, peak = predecessor_flow_inputs(target, source, reference_peak)
        flow = estimator.flow(x[None].astype(np.float32), y[None].astype(np.float32), peak)[0]
        frames.append(predecessor_warp(section, flow))
    return np.stack(frames)


def _pooled(x: np.ndarray, window: float) -> np.ndarray:
    """``x`` ``(H, W)`` smoothed by a Gaussian of sigma ``window`` pixels."""
    out: np.ndarray = cv2.GaussianBlur(x.astype(np.float32, copy=False), (0, 0), window)
    return out


def _trust(
    flow: np.ndarray, back: np.ndarray, target: np.ndarray, source: np.ndarray,
    peak: float, floor: float, window: float,
) -> tuple[np.ndarray, np.ndarray]:
    """``1 / ((floor^2 + res^2) (1 + fb^2))`` ``(H, W)`` of one warp of the reference, and
    its pooled residual ``res`` (a fraction of the reference's full intensity)."""
    res = np.abs(target - warp(source, flow)).mean(axis=0) / peak
    res2 = _pooled(res * res, window)
    fb = flow + warp(back, flow)
    trust: np.ndarray = 1.0 / ((floor**2 + res2) * (1.0 + _pooled(fb[0] ** 2 + fb[1] ** 2, window)))
    return trust, res2


def predict_two_sided(
    estimator: FlowEstimator,
    guide: GuideSlices,
    left: np.ndarray,
    right: np.ndarray,
    t: Sequence[float] | np.ndarray,
    peak: float = 1.0,
    floor: float = FLOOR,
    window: float = WINDOW,
) -> tuple[np.ndarray, np.ndarray]:
    """Both bounding gene sections moved along the reference's flows and blended.

    Args:
        estimator: any flow estimator (DIS, DeepFlow, TV-L1, RAFT, MaskFlowNet, ...).
        guide: the reference at the targets and at both bounds.
        left, right: ``(C, H, W)`` gene sections at the bounds.
        t: position of each target in the gap (0 at ``left``, 1 at ``right``).
        peak: the gene's full intensity.

    Returns:
        ``(K, C, H, W)`` float32 frames and their ``(K, H, W)`` error estimate in the
        gene's units: the disagreement of the two warped sections and the reference's
        own residual (as a fraction of ``peak``) in quadrature (see the module docstring
        for the weights).
    """
    ts = np.asarray(t, dtype=np.float64).reshape(-1)
    targets = guide.targets.astype(np.float32, copy=False)
    k = len(targets)
    if k != len(ts):
        raise ValueError(f"{k} reference targets for {len(ts)} positions")
    ref_l = guide.left.astype(np.float32, copy=False)
    ref_r = guide.right.astype(np.float32, copy=False)
    bounds_l, bounds_r = np.repeat(ref_l[None], k, 0), np.repeat(ref_r[None], k, 0)
    flows = estimator.flow(
        np.concatenate([targets, targets, bounds_l, bounds_r]),
        np.concatenate([bounds_l, bounds_r, targets, targets]),
        peak=guide.peak,
    )
    f_sl, f_sr, f_ls, f_rs = flows[:k], flows[k : 2 * k], flows[2 * k : 3 * k], flows[3 * k :]
    left = left.astype(np.float32, copy=False)
    right = right.astype(np.float32, copy=False)
    frames, errors = [], []
    for i, tk in enumerate(ts):
        from_l, from_r = warp(left, f_sl[i]), warp(right, f_sr[i])
        trust_l, res_l = _trust(f_sl[i], f_ls[i], targets[i], ref_l, guide.peak, floor, window)
        trust_r, res_r = _trust(f_sr[i], f_rs[i], targets[i], ref_r, guide.peak, floor, window)
        w_l, w_r = (1.0 - tk) * trust_l, tk * trust_r
        total = w_l + w_r
        frames.append((w_l[None] * from_l + w_r[None] * from_r) / total[None])
        res2 = (w_l * res_l + w_r * res_r) / total
        errors.append(np.sqrt(np.abs(from_l - from_r).mean(axis=0) ** 2 + peak**2 * res2))
    return np.stack(frames).astype(np.float32), np.stack(errors).astype(np.float32)


def predict_gap_from_reference(
    model: PairInterpolator,
    estimator: FlowEstimator,
    sections: Mapping[int, np.ndarray],
    reference: Mapping[int, np.ndarray],
    targets: Sequence[int],
    bounds: Sequence[int],
    context: Sequence[int],
    peak: float,
    reference_peak: float,
    atlinter: bool = False,
) -> np.ndarray:
    """Frames ``(K, C, H, W)`` of one task's ``targets`` (slice numbers) from the reference.

    ``sections``/``reference``: gene and reference slices ``(C, H, W)`` by slice number
    (every target, bound and context section). Nearest-only with ``atlinter`` or a single
    bound (edge slices); otherwise the model's own reference blend (fusion, curved) or
    the two-sided prediction with ``estimator``.
    """
    slices = list(targets)
    if atlinter or len(bounds) == 1:
        nearest = [nearest_known(s, bounds) for s in slices]
        return predict_from_reference(
            estimator,
            np.stack([reference[s] for s in slices]),
            np.stack([reference[k] for k in nearest]),
            np.stack([sections[k] for k in nearest]),
            reference_peak,
            atlinter=atlinter,
        )
    lo, hi = bounds
    ts = np.array([(s - lo) / (hi - lo) for s in slices], dtype=np.float32)
    before = max((c for c in context if c < lo), default=None)
    after = min((c for c in context if c > hi), default=None)
    guide = GuideSlices(
        targets=np.stack([reference[s] for s in slices]), left=reference[lo],
        right=reference[hi], peak=reference_peak,
        before=None if before is None else reference[before],
        after=None if after is None else reference[after],
    )
    if isinstance(model, ReferenceAware):
        return model.interpolate_reference(
            sections[lo], sections[hi], ts, peak,
            None if before is None else Neighbour(sections[before], (hi - lo) / (lo - before)),
            None if after is None else Neighbour(sections[after], (hi - lo) / (after - hi)),
            guide,
        )
    return predict_two_sided(estimator, guide, sections[lo], sections[hi], ts, peak)[0]


def reference_known(slice_number: int, bounds: Sequence[int], atlinter: bool) -> int | list[int]:
    """The known sections a reference-guided slice is made from (its provenance)."""
    if atlinter or len(bounds) == 1:
        return nearest_known(slice_number, bounds)
    return list(bounds)
