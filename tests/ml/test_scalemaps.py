"""Scale maps of learned methods and the per-order choice of smoothing and strength (known answers)."""
from __future__ import annotations

import numpy as np
import pytest

from bids_dmri_ldm.ml.data import RishScan
from bids_dmri_ldm.ml.inference import Translation
from bids_dmri_ldm.ml.scalemaps import (
    BRAIN_WIDE_GAIN,
    GLOBAL_SIGMA,
    MAP_GAIN,
    calibrate_scale_smoothing,
    interior_of_both,
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


def _field() -> np.ndarray:
    """A smooth spatial 3T->7T change, 0.8 to 1.2 along the first axis ``(X, Y, Z, 1)``."""
    return np.linspace(0.8, 1.2, SHAPE[0], dtype=np.float32)[:, None, None, None] * np.ones(SHAPE + (1,), np.float32)


def _shifted_pair(k):
    """The same head at 3T and, 7T = 3T x k^2 (``k`` per order, times :func:`_field` for orders 0
    and 2), on a shifted grid (world positions kept by the affines)."""
    rish3, mask3 = _rish(1)
    affine3 = np.diag([2.0, 2.0, 2.0, 1.0])
    affine7 = affine3.copy()
    affine7[:3, 3] = [2.0, -2.0, 0.0]
    rish7 = np.roll(rish3 * _ratio(k) ** 2, shift=(-1, 1, 0), axis=(0, 1, 2))
    mask7 = np.roll(mask3, shift=(-1, 1, 0), axis=(0, 1, 2))
    return RishScan(rish3, mask3, affine3), RishScan(rish7, mask7, affine7)


def _ratio(k) -> np.ndarray:
    ratio = np.broadcast_to(np.asarray(k, np.float32), SHAPE + (3,)).copy()
    ratio[..., [0, 1]] *= _field()
    return ratio


def test_calibration_keeps_a_right_model_and_uses_one_factor_for_an_order_it_gets_wrong():
    """7T = 3T x (0.9 f, 0.8 f, 0.7)^2 (f a spatial field): a model predicting orders 0 and 2 right and order 4 as noise
    (a random ratio in every voxel) gets full strength and gain 1 for L0/L2; for L4 its map is
    dropped (strength 0) and the gain that matches the 7T mean, 0.7, takes its place."""
    k = np.array([0.9, 0.8, 0.7], np.float32)
    source, target = _shifted_pair(k)
    noise = np.random.default_rng(5).uniform(0.2, 3.0, SHAPE).astype(np.float32)

    def translate(rish, mask):
        pred = rish * _ratio(k) ** 2
        pred[..., 2] = rish[..., 2] * noise
        return Translation(pred, None, rish, {"CropBox": BOX})

    result = calibrate_scale_smoothing(translate, [(source, target)], GRID, candidates=(0.0, GLOBAL_SIGMA))
    assert result["strength"][:2] == [1.0, 1.0] and result["gain"][:2] == pytest.approx([1.0, 1.0], rel=0.01)
    assert result["strength"][2] == 0.0
    assert result["gain"][2] == pytest.approx(0.7, rel=0.02)
    nmse = np.asarray(result["nmse"])  # (sigma, strength, order), gain 1
    assert nmse.shape == (2, len(result["strengths"]), 3)
    assert nmse[..., :2][:, -1].min() < 1e-3  # the right orders at full strength: nearly exact
    assert np.asarray(result["nmse_gain"])[0, 0, 2] < 0.1 * nmse[0, 0, 2]  # the gain beats identity for L4


def test_calibration_gain_undoes_a_models_global_bias_and_leaves_identity_for_no_change():
    """A model whose L0 map is right in shape but 1.3x too large gets gain 1/1.3; where 3T and 7T
    agree (k = 1, order 4) and the model says so, nothing changes."""
    k = np.array([0.9, 1.0, 1.0], np.float32)
    source, target = _shifted_pair(k)

    def translate(rish, mask):
        pred = rish * _ratio(k) ** 2
        pred[..., 0] *= 1.3 ** 2
        return Translation(pred, None, rish, {"CropBox": BOX})

    result = calibrate_scale_smoothing(translate, [(source, target)], GRID, candidates=(0.0,))
    assert result["strength"][0] == 1.0 and result["gain"][0] == pytest.approx(1 / 1.3, rel=0.02)
    assert result["gain_estimator"][0] == MAP_GAIN  # a kept map: the interior least-squares gain
    lam = learned_scale_maps(translate(source.rish, source.mask).pred_7t, source.rish, source.mask, BOX, GRID,
                             result["sigma"], strength=result["strength"], gain=result["gain"])
    right = _ratio(k)[source.mask]
    np.testing.assert_allclose(lam[source.mask][:, :2], right[:, :2], rtol=0.03)
    np.testing.assert_allclose(lam[source.mask][:, 2], 1.0, rtol=1e-3)


def test_a_brain_wide_gain_is_the_ratio_of_the_brain_means_over_every_pair():
    """Validation pair 7T L4 = 3T x 0.7^2 and a training pair with 0.9^2 (the same head), the
    model's L4 map is noise, so L4 becomes one brain-wide factor (strength 0): its gain is fitted
    as rish-global fits it, g^2 = sum 7T / sum 3T over both pairs' brains = (0.7^2 + 0.9^2) / 2,
    whatever the validation pair alone says. A map that is kept (strength > 0) gets the interior
    least-squares gain (the test above)."""
    noise = np.random.default_rng(5).uniform(0.2, 3.0, SHAPE).astype(np.float32)

    def translate(rish, mask):
        pred = rish.copy()
        pred[..., 2] = rish[..., 2] * noise
        return Translation(pred, None, rish, {"CropBox": BOX})

    k_val, k_fit = np.array([1.0, 1.0, 0.7], np.float32), np.array([1.0, 1.0, 0.9], np.float32)
    source, target = _shifted_pair(k_val)
    other = _shifted_pair(k_fit)
    target = RishScan(np.roll(source.rish * k_val ** 2, (-1, 1, 0), (0, 1, 2)), target.mask, target.affine)
    other = (other[0], RishScan(np.roll(source.rish * k_fit ** 2, (-1, 1, 0), (0, 1, 2)), other[1].mask,
                                other[1].affine))
    result = calibrate_scale_smoothing(translate, [(source, target)], GRID, candidates=(0.0,),
                                       strengths=(0.0, 1.0), fit_pairs=[other])
    assert result["strength"][2] == 0.0
    assert result["gain"][2] == pytest.approx(np.sqrt((0.7 ** 2 + 0.9 ** 2) / 2), rel=1e-4)
    assert result["gain_estimator"][2] == BRAIN_WIDE_GAIN
    assert (result["n_pairs"], result["n_fit_pairs"]) == (1, 2)
    alone = calibrate_scale_smoothing(translate, [(source, target)], GRID, candidates=(0.0,), strengths=(0.0, 1.0))
    assert alone["gain"][2] == pytest.approx(0.7, rel=1e-4)


def test_the_calibration_region_is_both_brains_less_their_boundary():
    """A 3T brain cube of 8^3 voxels and a 7T one shifted by 2 voxels along x: the region is their
    overlap (6 x 8 x 8) eroded by one voxel (4 x 6 x 6)."""
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    mask3 = np.zeros((14, 14, 14), bool)
    mask3[3:11, 3:11, 3:11] = True
    mask7 = np.roll(mask3, 2, axis=0)
    rish = np.ones((14, 14, 14, 3), np.float32)
    region = interior_of_both(RishScan(rish, mask3, affine), RishScan(rish, mask7, affine))
    expected = np.zeros_like(mask3)
    expected[6:10, 4:10, 4:10] = True
    np.testing.assert_array_equal(region, expected)
    thin = np.zeros_like(mask3)
    thin[3:11, 3:11, 7] = True  # one slice thick: erosion leaves nothing, the overlap is kept
    region = interior_of_both(RishScan(rish, thin, affine), RishScan(rish, thin, affine))
    np.testing.assert_array_equal(region, thin)


def test_a_tie_within_the_tolerance_goes_to_the_simplest_candidate():
    """7T = 3T x 0.9^2 x (a 0.5 % spatial ripple) + 7T noise: the model predicts the ripple exactly,
    but one brain-wide gain of 0.9 scores within PARSIMONY_TOLERANCE of the exact map, so the
    calibration keeps the gain and drops the map (strength 0); with a 20 % spatial change the
    map wins (test_calibration_keeps_a_right_model...)."""
    from bids_dmri_ldm.ml.scalemaps import PARSIMONY_TOLERANCE

    rish3, mask3 = _rish(1)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    ripple = 1 + 0.005 * np.sin(np.arange(SHAPE[0]))[:, None, None, None]
    ratio = (0.9 * ripple * np.ones(SHAPE + (3,))).astype(np.float32)
    noise = 1 + 0.1 * np.random.default_rng(2).standard_normal(SHAPE + (3,))
    source = RishScan(rish3, mask3, affine)
    target = RishScan((rish3 * ratio ** 2 * noise).astype(np.float32), mask3, affine)

    def translate(rish, mask):
        return Translation(rish * ratio ** 2, None, rish, {"CropBox": BOX})

    result = calibrate_scale_smoothing(translate, [(source, target)], GRID, candidates=(0.0,))
    nmse = np.asarray(result["nmse_gain"])[0]  # (strength, order) with the fitted gain
    assert np.all(nmse[-1] < nmse[0])  # the exact map is better, but within the tolerance
    assert np.all(nmse[0] <= nmse.min(axis=0) * (1 + PARSIMONY_TOLERANCE))
    assert result["strength"] == [0.0, 0.0, 0.0]
    assert result["gain"] == pytest.approx([0.9, 0.9, 0.9], rel=0.02)
