"""Fusion with a reference: the reference-guided frame as a member, trusted per gap.

On the bundled real volume (coronal, a known section every 8 slices), with DIS as the
only pair member and the reference flow, so each case takes seconds.
"""

from __future__ import annotations

import numpy as np
import pytest

from atlinter_ray.errors import ConfigError
from atlinter_ray.metrics import psnr
from atlinter_ray.models.base import Neighbour, build_model
from atlinter_ray.models.context import FusionInterpolator
from atlinter_ray.models.reference_guided import (
    GuideSlices,
    predict_gap_from_reference,
    reference_estimator,
)
from atlinter_ray.testing.datasets import real_volume

GAP = 8


def _fusion(**params: object) -> FusionInterpolator:
    model = build_model("fusion", members=["dis"], **params)
    assert isinstance(model, FusionInterpolator)
    return model


def _stack_psnr(model: FusionInterpolator, gene: np.ndarray,
                reference: np.ndarray | None) -> float:
    """Mean PSNR of every slice between two known sections, with or without a reference."""
    g = gene.astype(np.float32)[:, None]
    known = list(range(2, len(gene), GAP))
    scores = []
    for i in range(len(known) - 1):
        lo, hi = known[i], known[i + 1]
        targets = list(range(lo + 1, hi))
        context = tuple(c for c in (known[i - 1] if i > 0 else None,
                                    known[i + 2] if i + 2 < len(known) else None)
                        if c is not None)
        if reference is None:
            before = Neighbour(g[known[i - 1]]) if i > 0 else None
            after = Neighbour(g[known[i + 2]]) if i + 2 < len(known) else None
            ts = np.array([(s - lo) / (hi - lo) for s in targets], np.float32)
            frames = model.interpolate_context(g[lo], g[hi], ts, 255.0, before, after)
        else:
            r = reference.astype(np.float32)[:, None]
            frames = predict_gap_from_reference(model, model.reference_estimator(), g, r,
                                                targets, (lo, hi), context, 255.0, 255.0)
        scores += [psnr(np.clip(f[0], 0, 255), gene[s].astype(np.float32), data_range=255)
                   for s, f in zip(targets, frames)]
    return float(np.mean(scores))


def test_a_noise_reference_falls_back_to_fusion_without_it() -> None:
    gene = real_volume()
    noise = np.random.default_rng(0).integers(0, 256, gene.shape).astype(np.uint8)
    model = _fusion()
    without = _stack_psnr(model, gene, None)
    with_noise = _stack_psnr(model, gene, noise)
    assert abs(with_noise - without) <= 0.05, (with_noise, without)


def test_a_true_reference_lifts_fusion_by_more_than_a_decibel() -> None:
    gene = real_volume()
    model = _fusion()
    without = _stack_psnr(model, gene, None)
    assert _stack_psnr(model, gene, gene) > without + 1.0, without


def test_trust_is_learned_from_the_known_sections() -> None:
    gene = real_volume().astype(np.float32)[:, None]
    noise = np.random.default_rng(1).random(gene.shape).astype(np.float32) * 255
    model = _fusion()
    p, lo, hi, n = 18, 26, 34, 42

    def learned(ref: np.ndarray) -> dict:
        guide = GuideSlices(ref[lo + 1 : hi], ref[lo], ref[hi], 255.0, ref[p], ref[n])
        return model.learn_trust(gene[lo], gene[hi], 255.0, Neighbour(gene[p]),
                                 Neighbour(gene[n]), guide)

    true, noisy = learned(gene), learned(noise)
    assert true["trust"] > 1 and noisy["trust"] == 0, (true, noisy)
    assert set(true["scores"]) == {"0.0", "0.25", "1.0", "4.0", "16.0", "64.0", "inf"}
    # without a section beyond either bound there is nothing to learn from
    guide = GuideSlices(gene[lo + 1 : hi], gene[lo], gene[hi], 255.0)
    assert model.learn_trust(gene[lo], gene[hi], 255.0, None, None, guide)["trust"] == 1.0


def test_zero_trust_is_fusion_without_the_reference_bit_for_bit() -> None:
    gene = real_volume().astype(np.float32)[:, None]
    model = _fusion(trust=0.0)
    ts = np.array([0.25, 0.5], np.float32)
    guide = GuideSlices(gene[[12, 14]], gene[10], gene[18], 255.0, gene[2], gene[26])
    before, after = Neighbour(gene[2]), Neighbour(gene[26])
    np.testing.assert_array_equal(
        model.interpolate_reference(gene[10], gene[18], ts, 255.0, before, after, guide),
        model.interpolate_context(gene[10], gene[18], ts, 255.0, before, after),
    )


def test_fusion_and_curved_take_a_reference_pair_models_do_not() -> None:
    fusion = build_model("fusion", members=["dis", "tvl1"], reference_flow="deepflow")
    assert reference_estimator(fusion, "fusion").name == "deepflow"  # type: ignore[arg-type]
    own = _fusion()  # by default the first member's estimator, shared
    assert reference_estimator(own, "fusion") is own.estimators["dis"]
    curved = build_model("curved", flow="tvl1")
    assert reference_estimator(curved, "curved").name == "tvl1"  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"'linear' is a pair interpolator.*model=fusion"):
        reference_estimator(build_model("linear"), "linear")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"model.params.trust=-1.0"):
        _fusion(trust=-1.0)
    with pytest.raises(ConfigError, match=r"reference_flow='linear' is not a flow model"):
        _fusion(reference_flow="linear")
