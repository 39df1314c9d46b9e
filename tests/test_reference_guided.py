"""Reference-guided prediction on synthetic shifted data, with a real flow estimator (DIS)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from atlinter_ray.models.base import build_model
from atlinter_ray.models.flow import warp
from atlinter_ray.models.reference_guided import (
    GuideSlices,
    nearest_known,
    predict_from_reference,
    predict_two_sided,
)

SHIFT = (5.0, -3.0)  # (x, y) pixels: unequal and of opposite signs, so a swap shows


def _texture(seed: int, h: int = 96, w: int = 128) -> np.ndarray:
    """Smooth random texture in [0, 255] (blurred noise: good for optical flow)."""
    noise = np.random.default_rng(seed).random((h, w)).astype(np.float32)
    smooth = cv2.GaussianBlur(noise, (0, 0), 2.0)
    smooth -= smooth.min()
    return smooth * (255.0 / smooth.max())


def _moved(image: np.ndarray, shift: tuple[float, float]) -> np.ndarray:
    """``image`` sampled at ``x + shift``: the slice where everything moved by ``-shift``."""
    flow = np.empty((2, *image.shape), np.float32)
    flow[0], flow[1] = shift
    return warp(image[None], flow)[0]


def test_nearest_known_prefers_the_lower_section_on_ties() -> None:
    assert nearest_known(12, [8, 16, 24]) == 8
    assert nearest_known(13, [24, 8, 16]) == 16
    assert nearest_known(0, [8, 16]) == 8 and nearest_known(40, [8, 16]) == 16
    with pytest.raises(ValueError, match="no known sections"):
        nearest_known(3, [])


def test_known_gene_section_moves_along_the_reference_flow() -> None:
    ref_known, gene_known = _texture(0), _texture(1)
    ref_target = _moved(ref_known, SHIFT)  # ref_target(x) = ref_known(x + SHIFT)
    truth = _moved(gene_known, SHIFT)  # the gene moved with the tissue
    estimator = build_model("dis", preset="medium")
    predicted = predict_from_reference(
        estimator,
        ref_target[None, None],
        ref_known[None, None],
        gene_known[None, None],
        reference_peak=255.0,
    )
    assert predicted.shape == (1, 1, 96, 128) and predicted.dtype == np.float32
    inner = (slice(12, -12), slice(12, -12))
    error = np.abs(predicted[0, 0] - truth)[inner].mean()
    unmoved = np.abs(gene_known - truth)[inner].mean()
    assert error < 0.1 * unmoved, (error, unmoved)
    # The predecessor's warp (x - F, x read as rows) moves the section the wrong way.
    swapped = np.empty((2, 96, 128), np.float32)
    swapped[0], swapped[1] = -SHIFT[1], -SHIFT[0]
    wrong = np.abs(warp(gene_known[None], swapped)[0] - truth)[inner].mean()
    assert wrong > 5 * error


def test_rgb_gene_with_grayscale_reference_in_a_batch() -> None:
    ref_known = np.stack([_texture(2), _texture(3)])[:, None]
    ref_target = np.stack([_moved(r[0], SHIFT) for r in ref_known])[:, None]
    gene = np.stack([np.stack([_texture(s + c) for c in range(3)]) for s in (10, 20)])
    predicted = predict_from_reference(
        build_model("dis"), ref_target, ref_known, gene, reference_peak=255.0
    )
    truth = np.stack([[_moved(ch, SHIFT) for ch in g] for g in gene])
    inner = (Ellipsis, slice(12, -12), slice(12, -12))
    assert predicted.shape == (2, 3, 96, 128)
    assert np.abs(predicted - truth)[inner].mean() < 0.1 * np.abs(gene - truth)[inner].mean()


def test_shape_mismatches_are_clear_errors() -> None:
    ref = np.zeros((1, 1, 32, 32), np.float32)
    with pytest.raises(ValueError, match="same count and the same H, W"):
        predict_from_reference(build_model("dis"), ref, ref, np.zeros((1, 1, 32, 40)))
    with pytest.raises(ValueError, match="differ in shape"):
        predict_from_reference(build_model("dis"), ref, ref[..., :16], ref)


def _gap(shift: tuple[float, float]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray,
                                             np.ndarray, np.ndarray]:
    """Reference and gene at a gap's left bound, middle and right bound: everything
    moves by ``shift`` from one bound to the middle, and again to the other bound."""
    back = (-shift[0], -shift[1])
    ref, gene = _texture(4), _texture(5)
    return (_moved(ref, back), ref, _moved(ref, shift),
            _moved(gene, back), gene, _moved(gene, shift))


def test_two_sided_is_the_nearest_only_prediction_at_either_section() -> None:
    ref_l, ref_m, ref_r, gene_l, _, gene_r = _gap(SHIFT)
    estimator = build_model("dis", preset="medium")
    for t, ref_s in ((0.0, ref_l), (1.0, ref_r)):
        # the slice to predict is a bound itself, its reference slice that bound's
        guide = GuideSlices(ref_s[None, None], ref_l[None], ref_r[None], peak=255.0)
        two, _ = predict_two_sided(estimator, guide, gene_l[None], gene_r[None], [t])
        nearest = gene_l if t == 0 else gene_r
        one = predict_from_reference(estimator, ref_s[None, None], ref_s[None, None],
                                     nearest[None, None], reference_peak=255.0)
        np.testing.assert_array_equal(two, one)


def test_two_sided_blends_both_sections_symmetrically_at_mid_gap() -> None:
    ref_l, ref_m, ref_r, gene_l, truth, gene_r = _gap(SHIFT)
    estimator = build_model("dis", preset="medium")
    guide = GuideSlices(ref_m[None, None], ref_l[None], ref_r[None], peak=255.0)
    frame, disagreement = predict_two_sided(estimator, guide, gene_l[None], gene_r[None], [0.5])
    # swapping the bounds (and t -> 1 - t) swaps the two weights: the same frame
    mirror = GuideSlices(ref_m[None, None], ref_r[None], ref_l[None], peak=255.0)
    swapped, _ = predict_two_sided(estimator, mirror, gene_r[None], gene_l[None], [0.5])
    np.testing.assert_allclose(frame, swapped, rtol=0, atol=1e-3)
    # both warped sections land on the truth inside the image; the blend too, and
    # there it is the plain mean of the two nearest-only predictions
    inner = (slice(16, -16), slice(16, -16))
    sides = [predict_from_reference(estimator, ref_m[None, None], r[None, None],
                                    g[None, None], reference_peak=255.0)[0, 0]
             for r, g in ((ref_l, gene_l), (ref_r, gene_r))]
    np.testing.assert_allclose(frame[0, 0][inner], (sides[0] + sides[1])[inner] / 2, atol=1.0)
    error = np.abs(frame[0, 0] - truth)[inner].mean()
    assert error < 0.05 * np.abs(gene_l - truth)[inner].mean(), error
    assert disagreement.shape == (1, 96, 128) and disagreement[0][inner].mean() < 2.0
    # at the border each side replicates a different edge: the blend is not the mean there
    assert np.abs(frame[0, 0] - (sides[0] + sides[1]) / 2).max() > 1.0


@pytest.mark.parametrize("name", ["deepflow", "tvl1"])
def test_two_sided_runs_on_any_classical_estimator(name: str) -> None:
    ref_l, ref_m, ref_r, gene_l, truth, gene_r = _gap(SHIFT)
    guide = GuideSlices(ref_m[None, None], ref_l[None], ref_r[None], peak=255.0)
    frame, _ = predict_two_sided(build_model(name), guide, gene_l[None], gene_r[None], [0.5])
    inner = (slice(16, -16), slice(16, -16))
    error = np.abs(frame[0, 0] - truth)[inner].mean()
    assert error < 0.1 * np.abs(gene_l - truth)[inner].mean(), error


def test_a_learned_estimator_guides_fusion_on_the_reference(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import torch

    from atlinter_ray.models.base import Neighbour
    from atlinter_ray.testing.predecessor import predecessor_raft

    checkpoint = tmp_path / "raft-small.pth"
    torch.save(predecessor_raft(True).state_dict(), checkpoint)
    fusion = build_model("fusion", members=["dis"], reference_flow="raft_small",
                         reference_params={"checkpoint": str(checkpoint)}, trust=1.0)
    assert fusion.reference_estimator().name == "raft_small"  # type: ignore[union-attr]
    ref_l, ref_m, ref_r, gene_l, truth, gene_r = _gap(SHIFT)
    guide = GuideSlices(ref_m[None, None], ref_l[None], ref_r[None], 255.0)
    frames = fusion.interpolate_reference(  # type: ignore[union-attr]
        gene_l[None], gene_r[None], np.array([0.5], np.float32), 255.0,
        Neighbour(gene_l[None]), None, guide)
    assert frames.shape == (1, 1, 96, 128) and np.isfinite(frames).all()
