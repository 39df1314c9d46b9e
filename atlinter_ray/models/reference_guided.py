"""The predecessor's reference-guided mode: move a known gene section along a reference's flow.

A reference volume (e.g. the Nissl stain in the same 25 µm space) is known at every
slice; the gene is known only at its sections. To predict gene slice ``s``, take the
nearest known section ``k``, estimate the flow between the reference's slices ``s`` and
``k``, and warp the gene section ``k`` with it::

    F = estimator.flow(ref[s], ref[k])      # ref[s](x) ≈ ref[k](x + F(x))
    gene[s](x) ≈ gene[k](x + F(x))          # = flow.warp(gene[k], F)

This is atlinter 0.2.3's ``GeneOpticalFlow.predict_slice``: same pair (target first,
nearest known second) and the same nearest-section rule (ties go to the lower
section number). By default, two deliberate differences:

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

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from atlinter_ray.errors import ConfigError
from atlinter_ray.models.base import FlowEstimator, PairInterpolator
from atlinter_ray.models.flow import FlowInterpolator, warp


def nearest_known(slice_number: int, known_sections: Sequence[int]) -> int:
    """The known section closest to ``slice_number``; a tie goes to the lower one."""
    if len(known_sections) == 0:
        raise ValueError("nearest_known: no known sections to choose from")
    return min(sorted(known_sections), key=lambda k: abs(k - slice_number))


def reference_estimator(model: PairInterpolator, model_name: str) -> FlowEstimator:
    """The flow estimator behind a built model, or a ConfigError for pair interpolators."""
    if isinstance(model, FlowInterpolator):
        return model.estimator
    raise ConfigError(
        f"interpolation.reference is set but model {model_name!r} is a pair interpolator "
        "(it predicts frames, not flow), so the reference cannot guide it. Fix: choose a "
        "flow model (dis, farneback, deepflow, tvl1, raft, raft_small, maskflownet) or "
        "set interpolation.reference=null"
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
