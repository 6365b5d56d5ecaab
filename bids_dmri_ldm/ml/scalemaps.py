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
after training; alpha_l = 0 means the model's order l did not beat identity there and is left
unchanged.

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

GLOBAL_SIGMA = 1e9
"""A sigma at or above this is infinitely wide: one factor per order for the whole brain, the
model's own brain-wide ratio for this scan, lambda_l^2 = sum_mask pred_l / (sum_mask ref_l + tau)."""

SMOOTHING_CANDIDATES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, GLOBAL_SIGMA)
"""sigma values (model-grid voxels) tried per order by :func:`calibrate_scale_smoothing`."""

STRENGTH_CANDIDATES = (0.0, 0.25, 0.5, 0.75, 1.0)
"""alpha values (lambda -> lambda ** alpha) tried per order by :func:`calibrate_scale_smoothing`."""


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
                       strength: float | Sequence[float] = 1.0) -> np.ndarray:
    """lambda ``(X, Y, Z, n_orders)`` float32: smoothed ratio per order, raised to ``strength``,
    inside ``mask``; 1 outside."""
    n = pred.shape[-1]
    mask = np.asarray(mask, bool)
    scale = np.empty(pred.shape, np.float32)
    for k, (s, a) in enumerate(zip(per_order(sigma, n), per_order(strength, n))):
        if s >= GLOBAL_SIGMA:  # one factor: the brain-wide ratio (what smoothing tends to as sigma grows)
            lam = np.full(mask.shape + (1,), np.sqrt(np.clip(pred[..., k][mask], 0, None).sum(dtype=np.float64)
                                                    / (np.clip(reference[..., k][mask], 0, None).sum(dtype=np.float64)
                                                       + tau * max(int(mask.sum()), 1))), np.float32)
        else:
            lam = smoothed_scale_maps(pred[..., k:k + 1], reference[..., k:k + 1], mask,
                                      input_sigma(s, crop_box, grid), tau)
        scale[..., k:k + 1] = lam if a == 1.0 else np.power(lam, np.float32(a))
    return np.where(mask[..., None], scale, np.float32(1.0)).astype(np.float32)


def calibrate_scale_smoothing(translate: Callable[[np.ndarray, np.ndarray], Any], pairs, grid: Sequence[int],
                              reference: str = "roundtrip",
                              candidates: Sequence[float] = SMOOTHING_CANDIDATES,
                              tau: float = DEFAULT_TAU,
                              strengths: Sequence[float] = STRENGTH_CANDIDATES) -> dict[str, Any]:
    """Choose the smoothing sigma and the strength alpha of each order on validation scans.

    Parameters
    ----------
    translate : ``(rish, mask) -> Translation`` (``pred_7t``, ``recon_3t``, ``provenance["CropBox"]``)
        The trained model's prediction of one scan.
    pairs : sequence of (3T :class:`~.data.RishScan`, 7T :class:`~.data.RishScan` on its own grid)
        Both in canonical orientation, related by their affines.
    grid : the model grid.
    candidates, strengths : the sigma (model-grid voxels) and alpha values tried.

    Returns
    -------
    dict
        ``{"sigma": [per order], "strength": [per order], "candidates", "strengths",
        "nmse": [[[per order] per strength] per sigma], "metric"}``: for each (sigma, alpha) the NMSE
        of the translated RISH (lambda^(2 alpha) x 3T RISH, what the participant level writes) against
        the real 7T RISH, scored as the evaluation does: on the 7T grid (3T RISH and log lambda^2
        brought there through the affines, trilinear), inside the 7T brain within the 3T field of
        view, averaged over the pairs; each order takes its smallest (alpha = 0 is identity, so
        the choice is never worse than identity on these pairs).
    """
    table = None
    count = 0
    for source, target in pairs:
        def on_target(volume, mode="nearest", source=source, target=target):
            return resample(np.asarray(volume, np.float32), source.affine, target.affine, target.mask.shape,
                            order=1, mode=mode)

        in_fov = on_target(np.ones(source.mask.shape, np.float32), mode="constant") > 0.5
        region = np.asarray(target.mask, bool) & in_fov
        if not region.any():
            continue
        result = translate(source.rish, source.mask)
        ref = source.rish if reference == "input" else result.recon_3t
        n = source.rish.shape[-1]
        if table is None:
            table = np.zeros((len(candidates), len(strengths), n))
        truth = target.rish[region].astype(np.float64)
        rish = on_target(source.rish)[region].astype(np.float64)
        energy = np.maximum((truth ** 2).sum(axis=0), 1e-30)
        for i, sigma in enumerate(candidates):
            lam = learned_scale_maps(result.pred_7t, ref, source.mask, result.provenance["CropBox"], grid, sigma, tau)
            log_lam2 = on_target(2.0 * np.log(np.maximum(lam, 1e-12)))[region].astype(np.float64)
            for j, alpha in enumerate(strengths):
                pred = np.exp(alpha * log_lam2) * rish
                table[i, j] += ((pred - truth) ** 2).sum(axis=0) / energy
        count += 1
    if table is None:
        raise ValueError("no validation pair with brain voxels in both scans")
    table /= count
    sigma, strength = [], []
    for k in range(table.shape[-1]):
        i, j = np.unravel_index(int(np.argmin(table[..., k])), table.shape[:2])
        sigma.append(float(candidates[i]))
        strength.append(float(strengths[j]))
    return {"sigma": sigma, "strength": strength, "candidates": [float(c) for c in candidates],
            "strengths": [float(a) for a in strengths],
            "nmse": [[[float(v) for v in row] for row in plane] for plane in table],
            "metric": "NMSE of lambda^(2 alpha) x 3T RISH against the 7T RISH on the 3T grid, both brains, "
                      "mean over validation pairs; alpha = 0 is identity"}
