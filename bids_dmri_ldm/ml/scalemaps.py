"""Scale maps of a learned translation (paper Eq. 2) and the per-order choice of their smoothing.

A learned method (ldm, cnn) predicts 7T RISH ``pred`` through a lossy path (model grid, and for
the ldm the VQ-VAE); its scale maps are

    lambda_l^2 = G_l * pred_l / (G_l * ref_l + tau)

with ``ref`` the input 3T RISH (``reference="input"``) or the 3T RISH through the same lossy path
(``"roundtrip"``), and ``G_l`` a mask-normalised Gaussian of sigma_l model-grid voxels (0: none;
:func:`bids_dmri_ldm.core.smooth.smoothed_scale_maps`), applied with a strength alpha_l in [0, 1]:
lambda_l -> lambda_l ** alpha_l (a shrinkage toward identity, lambda = 1, in the log domain).
The best sigma and strength differ between orders: L0 changes smoothly and its voxel-wise ratio
suffers from partial-volume edges; L4 is dominated by noise floors that a multiplicative map
cannot move, so a model's full L4 ratio can be worse than leaving L4 alone.
:func:`calibrate_scale_smoothing` picks (sigma_l, alpha_l) per order on the validation pairs
after training, and a brain-wide gain g_l: lambda_l -> g_l * lambda_l ** alpha_l, with g_l either 1
or fitted over every paired participant: the least-squares factor of the translated RISH against
the 7T RISH where the order keeps a map (alpha_l > 0), the ratio of the brain means (as
``rish-global``) where it is one brain-wide factor (alpha_l = 0).  The gain anchors the order's level to what the training domain measured brain-wide
(what ``rish-global`` does), and the model's map then only has to supply the spatial pattern
around it.  alpha_l = 0 with g_l = 1 means the model's order l did not beat identity there and is
left unchanged; alpha_l = 0 with g_l != 1 is one brain-wide factor per order.

Arrays: RISH and scale maps ``(X, Y, Z, n_orders)``, masks ``(X, Y, Z)`` bool, all in the
canonical orientation the networks see.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..core.resample import resample
from ..core.sh import DEFAULT_TAU
from ..core.smooth import smoothed_scale_maps
from .rish_global import ratio_of_sums

GLOBAL_SIGMA = 1e9
"""A sigma at or above this is infinitely wide: one factor per order for the whole brain, the
model's own brain-wide ratio for this scan, lambda_l^2 = sum_mask pred_l / (sum_mask ref_l + tau)."""

SMOOTHING_CANDIDATES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, GLOBAL_SIGMA)
"""sigma values (model-grid voxels) tried per order by :func:`calibrate_scale_smoothing`."""

STRENGTH_CANDIDATES = (0.0, 0.25, 0.5, 0.75, 1.0)
"""alpha values (lambda -> lambda ** alpha) tried per order by :func:`calibrate_scale_smoothing`."""

PARSIMONY_TOLERANCE = 0.02
"""Relative NMSE within which a validation score counts as a tie with the best: among the tied
candidates :func:`calibrate_scale_smoothing` takes the simplest (smallest strength, gain 1 before
a fitted gain, widest smoothing).  On the 5 validation pairs of the shipped demo model the
smallest NMSE of each order was matched within 1-2 % by dozens of candidates, and the strict
minimum picked a sharp (sigma = 1), weak (alpha = 0.25) L2 map that lowered SSIM L2 and SSIM FA
below identity's on those pairs (docs/evaluation_results.md)."""


def per_order(value: float | Sequence[float], n_orders: int) -> list[float]:
    """One sigma per order from a number or a sequence of ``n_orders`` numbers."""
    if np.isscalar(value):
        return [float(value)] * n_orders
    values = [float(v) for v in value]
    if len(values) != n_orders:
        raise ValueError(f"scale smoothing needs 1 or {n_orders} values (one per RISH order), got {len(values)}")
    return values


def input_sigma(sigma: float, crop_box: Sequence[Sequence[int]], grid: Sequence[int]) -> list[float] | None:
    """A sigma in model-grid voxels as per-axis sigmas in input voxels (through the crop box);
    None for no smoothing (0) and for the brain-wide factor (:data:`GLOBAL_SIGMA`)."""
    if sigma <= 0 or sigma >= GLOBAL_SIGMA:
        return None
    return [float(sigma) * (stop - start) / g for (start, stop), g in zip(crop_box, grid)]


def learned_scale_maps(pred: np.ndarray, reference: np.ndarray, mask: np.ndarray,
                       crop_box: Sequence[Sequence[int]], grid: Sequence[int],
                       sigma: float | Sequence[float], tau: float = DEFAULT_TAU,
                       strength: float | Sequence[float] = 1.0,
                       gain: float | Sequence[float] = 1.0) -> np.ndarray:
    """lambda ``(X, Y, Z, n_orders)`` float32: smoothed ratio per order, raised to ``strength`` and
    multiplied by ``gain`` inside ``mask``; 1 outside."""
    n = pred.shape[-1]
    mask = np.asarray(mask, bool)
    scale = np.empty(pred.shape, np.float32)
    for k, (s, a, g) in enumerate(zip(per_order(sigma, n), per_order(strength, n), per_order(gain, n))):
        if s >= GLOBAL_SIGMA:  # one factor: the brain-wide ratio (what smoothing tends to as sigma grows)
            lam = np.full(mask.shape + (1,), np.sqrt(np.clip(pred[..., k][mask], 0, None).sum(dtype=np.float64)
                                                    / (np.clip(reference[..., k][mask], 0, None).sum(dtype=np.float64)
                                                       + tau * max(int(mask.sum()), 1))), np.float32)
        else:
            lam = smoothed_scale_maps(pred[..., k:k + 1], reference[..., k:k + 1], mask,
                                      input_sigma(s, crop_box, grid), tau)
        scale[..., k:k + 1] = (lam if a == 1.0 else np.power(lam, np.float32(a))) * np.float32(g)
    return np.where(mask[..., None], scale, np.float32(1.0)).astype(np.float32)


def _on_target(volume: np.ndarray, source, target, mode: str = "nearest") -> np.ndarray:
    """A ``source``-grid volume (3D, or 4D with channels last) on the ``target`` grid through the
    affines (trilinear; ``mode`` outside the source)."""
    return resample(np.asarray(volume, np.float32), source.affine, target.affine, target.mask.shape,
                    order=1, mode=mode)


def overlap_of_both(source, target) -> np.ndarray:
    """Voxels of the 7T grid inside both brain masks (the 3T one brought there through the affines)
    and the 3T field of view ``(X, Y, Z)`` bool."""
    in_fov = _on_target(np.ones(source.mask.shape), source, target, mode="constant") > 0.5
    return np.asarray(target.mask, bool) & in_fov & (_on_target(source.mask, source, target) > 0.5)


def interior_of_both(source, target) -> np.ndarray:
    """Voxels of the 7T grid inside both brain masks (the 3T one brought there through the affines)
    and the 3T field of view, less their one-voxel boundary ``(X, Y, Z)`` bool (the overlap itself when
    nothing would be left).

    The boundary is where the two scans' partial volumes differ most (other voxel sizes, a brain
    edge that moved by a fraction of a voxel): measured on simulated pairs, its ~12 % of the voxels
    pulled a least-squares brain-wide L0 factor from 0.96 (interior, or the simulator's own brain
    mask) to 0.93 and the L4 one from 0.94 to 0.83 (docs/evaluation_results.md).
    """
    return _interior(overlap_of_both(source, target))


def _interior(both: np.ndarray) -> np.ndarray:
    """``both`` less its one-voxel boundary; ``both`` itself when nothing would be left."""
    from scipy.ndimage import binary_erosion

    interior = binary_erosion(both, iterations=1)
    return interior if interior.any() else both  # a brain thinner than 3 voxels keeps its overlap


def _pair_statistics(translate, source, target, grid, reference, candidates, strengths, tau):
    """Per (sigma, alpha, order) sums of one pair for :func:`calibrate_scale_smoothing`:
    ``(a.a, a.t, t.t)`` over the scored region, with ``a`` the translated RISH at gain 1 and ``t``
    the 7T RISH, shape ``(3, n_sigma, n_alpha, n_orders)``, and ``(sum 3T, sum 7T)`` RISH over the
    whole overlap of both brains, shape ``(2, n_orders)``; None when the region is empty."""
    both = overlap_of_both(source, target)
    region = _interior(both)
    if not region.any():
        return None
    result = translate(source.rish, source.mask)
    ref = source.rish if reference == "input" else result.recon_3t
    on_target = _on_target(source.rish, source, target)
    totals = np.stack([on_target[both].sum(axis=0, dtype=np.float64), target.rish[both].sum(axis=0, dtype=np.float64)])
    truth = target.rish[region].astype(np.float64)
    rish = on_target[region].astype(np.float64)
    stats = np.zeros((3, len(candidates), len(strengths), truth.shape[-1]))
    stats[2] = (truth ** 2).sum(axis=0)
    for i, sigma in enumerate(candidates):
        lam = learned_scale_maps(result.pred_7t, ref, source.mask, result.provenance["CropBox"], grid, sigma, tau)
        log_lam2 = _on_target(2.0 * np.log(np.maximum(lam, 1e-12)), source, target)[region].astype(np.float64)
        for j, alpha in enumerate(strengths):
            pred = np.exp(alpha * log_lam2) * rish
            stats[0, i, j] = (pred ** 2).sum(axis=0)
            stats[1, i, j] = (pred * truth).sum(axis=0)
    return stats, totals


BRAIN_WIDE_GAIN = "ratio of the brain means over every paired participant"
"""How the gain of an order left to one brain-wide factor (strength 0) is fitted: sqrt(sum 7T RISH /
sum 3T RISH) over the whole overlap of both brains, all pairs pooled: the statistic ``rish-global``
fits (:func:`bids_dmri_ldm.ml.rish_global.ratio_of_means`; here the 3T RISH reaches the 7T grid
trilinearly, as everywhere in this calibration, where rish-global's fit uses cubic B-splines). Measured on the shipped
ldm's order 2 (docs/evaluation_results.md): the interior least-squares gain 0.948 scored NMSE L2
0.0286 on the held-out default-physics participants, this one (0.932) 0.0260."""

MAP_GAIN = "least squares in the interior of both brains"
"""How the gain of an order that keeps a map (strength > 0) is fitted."""


def calibrate_scale_smoothing(translate: Callable[[np.ndarray, np.ndarray], Any], pairs, grid: Sequence[int],
                              reference: str = "roundtrip",
                              candidates: Sequence[float] = SMOOTHING_CANDIDATES,
                              tau: float = DEFAULT_TAU,
                              strengths: Sequence[float] = STRENGTH_CANDIDATES,
                              fit_pairs=()) -> dict[str, Any]:
    """Choose the smoothing sigma, the strength alpha and the gain g of each order.

    Parameters
    ----------
    translate : ``(rish, mask) -> Translation`` (``pred_7t``, ``recon_3t``, ``provenance["CropBox"]``)
        The trained model's prediction of one scan.
    pairs : sequence of (3T :class:`~.data.RishScan`, 7T :class:`~.data.RishScan` on its own grid)
        The validation pairs, both scans in canonical orientation, related by their affines.
    grid : the model grid.
    candidates, strengths : the sigma (model-grid voxels) and alpha values tried.
    fit_pairs : further pairs (the training participants) used, with ``pairs``, to fit the gains
        only: one number per (sigma, alpha, order) is estimated from every paired participant,
        while the choice among them is made on the held-out ``pairs`` alone.

    Returns
    -------
    dict
        ``{"sigma", "strength", "gain": [per order], "candidates", "strengths",
        "nmse": [[[per order] per strength] per sigma] at gain 1, "nmse_gain": the same with the
        fitted gain, "gains": that gain per (sigma, alpha, order), "n_pairs", "n_fit_pairs",
        "metric"}``.  The NMSE is that of the translated RISH (g^2 lambda^(2 alpha) x 3T RISH, what
        the participant level writes) against the real 7T RISH, scored as the evaluation does: on
        the 7T grid (3T RISH and log lambda^2 brought there through the affines, trilinear), inside
        both brains less their boundary (:func:`interior_of_both`), averaged over the validation
        pairs.  The fitted gain is the least-squares one, g^2 = sum_p a.t / |t|^2 over sum_p a.a / |t|^2 (each pair
        weighted as in the NMSE).  Each order takes, among the (sigma, alpha, g in {1, fitted})
        whose NMSE is within :data:`PARSIMONY_TOLERANCE` of its smallest, the simplest: smallest
        alpha, then g = 1, then the widest sigma.  alpha = 0 with g = 1 is identity, so the choice
        is never more than that tolerance worse than identity on the validation pairs.
    """
    args = (grid, reference, candidates, strengths, tau)
    scored_pairs = [s for s in (_pair_statistics(translate, a, b, *args) for a, b in pairs) if s is not None]
    if not scored_pairs:
        raise ValueError("no validation pair with brain voxels in both scans")
    fitted_pairs = scored_pairs + [s for s in (_pair_statistics(translate, a, b, *args) for a, b in fit_pairs)
                                   if s is not None]
    scored, fitted = [s for s, _ in scored_pairs], [s for s, _ in fitted_pairs]
    brain_wide = ratio_of_sums(*sum(t for _, t in fitted_pairs))  # (sum 3T, sum 7T) over every pair
    # each pair's sums over its 7T energy |t|^2: the NMSE's weighting
    aa, at = (sum(s[k] / s[2] for s in fitted) for k in (0, 1))
    g2 = np.stack([np.ones_like(aa), at / np.maximum(aa, 1e-30)])  # (gain kind, sigma, alpha, order)
    val_aa, val_at = (sum(s[k] / s[2] for s in scored) / len(scored) for k in (0, 1))
    nmse = g2 ** 2 * val_aa - 2.0 * g2 * val_at + 1.0  # mean_p |g^2 a - t|^2 / |t|^2
    sigma, strength, gain, estimator = [], [], [], []
    for k in range(aa.shape[-1]):
        best = nmse[..., k].min()
        tied = np.argwhere(nmse[..., k] <= best + PARSIMONY_TOLERANCE * abs(best) + 1e-12)
        which, i, j = min(tied, key=lambda c: (strengths[c[2]], c[0], -candidates[c[1]]))
        sigma.append(float(candidates[i]))
        strength.append(float(strengths[j]))
        if which == 1 and strengths[j] == 0.0:  # one brain-wide factor: fitted as rish-global fits it
            gain.append(float(brain_wide[k]))
            estimator.append(BRAIN_WIDE_GAIN)
        else:
            gain.append(float(np.sqrt(g2[which, i, j, k])))
            estimator.append(MAP_GAIN if which == 1 else "none")
    return {"sigma": sigma, "strength": strength, "gain": gain, "gain_estimator": estimator,
            "candidates": [float(c) for c in candidates],
            "strengths": [float(a) for a in strengths],
            "nmse": nmse[0].tolist(), "nmse_gain": nmse[1].tolist(), "gains": np.sqrt(g2[1]).tolist(),
            "n_pairs": len(scored), "n_fit_pairs": len(fitted),
            "metric": "NMSE of g^2 lambda^(2 alpha) x 3T RISH against the 7T RISH on the 7T grid, interior "
                      "of both brains, mean over validation pairs; g least-squares over all paired "
                      "participants; alpha = 0 with g = 1 is identity"}
