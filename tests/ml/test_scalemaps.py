"""Scale maps of learned methods and the per-order choice of smoothing and strength (known answers)."""
from __future__ import annotations

import numpy as np
import pytest

from bids_dmri_ldm.ml.data import RishScan
from bids_dmri_ldm.ml.inference import Translation
from bids_dmri_ldm.ml.scalemaps import (
    GLOBAL_SIGMA,
    calibrate_scale_smoothing,
    learned_scale_maps,
    per_order,
)

SHAPE = (16, 18, 14)
BOX = [[0, 16], [0, 18], [0, 14]]
GRID = (16, 16, 16)


def _rish(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    g = np.meshgrid(*[np.linspace(-1, 1, n) for n in SHAPE], indexing="ij")
    mask = (g[0] ** 2 + g[1] ** 2 + g[2] ** 2) < 0.7
    wave = 1 + 0.3 * np.sin(3 * g[0]) + 0.05 * rng.standard_normal(SHAPE)
    rish = np.stack([2.0 * wave, 0.3 * wave ** 2, 0.05 * wave ** 3], -1).astype(np.float32)
    return np.where(mask[..., None], rish, 0).astype(np.float32), mask


@pytest.mark.parametrize("sigma", [0.0, 2.0, GLOBAL_SIGMA])
def test_a_uniform_ratio_gives_lambda_k_whatever_the_smoothing(sigma):
    ref, mask = _rish()
    k = np.array([0.9, 0.8, 0.7], np.float32)
    lam = learned_scale_maps(ref * k ** 2, ref, mask, BOX, GRID, sigma)
    np.testing.assert_allclose(lam[mask], np.broadcast_to(k, lam[mask].shape), rtol=1e-4)
    assert np.all(lam[~mask] == 1.0)
    weak = learned_scale_maps(ref * k ** 2, ref, mask, BOX, GRID, sigma, strength=[1.0, 0.5, 0.0])
    np.testing.assert_allclose(weak[mask], np.broadcast_to(k ** np.array([1.0, 0.5, 0.0]), weak[mask].shape),
                               rtol=1e-4)


def test_global_sigma_is_one_factor_per_order():
    ref, mask = _rish()
    pred = ref * np.random.default_rng(3).uniform(0.5, 1.5, ref.shape).astype(np.float32)
    lam = learned_scale_maps(pred, ref, mask, BOX, GRID, GLOBAL_SIGMA)
    expected = np.sqrt(pred[mask].sum(axis=0, dtype=np.float64) / ref[mask].sum(axis=0, dtype=np.float64))
    np.testing.assert_allclose(lam[mask], np.broadcast_to(expected, lam[mask].shape), rtol=1e-4)
    with pytest.raises(ValueError, match="1 or 3 values"):
        per_order([1.0, 2.0], 3)


def test_calibration_keeps_a_right_model_and_falls_back_to_identity_for_a_wrong_order():
    """7T = 3T x (0.9, 0.8, 0.7)^2 on another grid: a model predicting orders 0 and 2 right and
    order 4 three times too large gets full strength for L0/L2 and strength 0 (identity) for L4."""
    rish3, mask3 = _rish(1)
    affine3 = np.diag([2.0, 2.0, 2.0, 1.0])
    k = np.array([0.9, 0.8, 0.7], np.float32)
    # the 7T scan: the same head on a shifted grid (world positions preserved by the affines)
    affine7 = affine3.copy()
    affine7[:3, 3] = [2.0, -2.0, 0.0]
    rish7 = np.roll(rish3 * k ** 2, shift=(-1, 1, 0), axis=(0, 1, 2))
    mask7 = np.roll(mask3, shift=(-1, 1, 0), axis=(0, 1, 2))
    wrong = np.array([1.0, 1.0, 3.0 / 0.49], np.float32)  # L4 predicted as 3 x the 3T RISH

    def translate(rish, mask):
        return Translation(rish * k ** 2 * wrong, None, rish, {"CropBox": BOX})

    result = calibrate_scale_smoothing(translate, [(RishScan(rish3, mask3, affine3), RishScan(rish7, mask7, affine7))],
                                       GRID)
    assert result["strength"][:2] == [1.0, 1.0] and result["strength"][2] == 0.0
    nmse = np.asarray(result["nmse"])  # (sigma, strength, order)
    assert nmse[..., :2][:, -1].min() < 1e-3  # the right orders at full strength: nearly exact
    assert nmse.shape == (len(result["candidates"]), len(result["strengths"]), 3)
