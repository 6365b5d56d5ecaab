"""Scale maps of a learned translation (paper Eq. 2) and the per-order choice of their smoothing.

A learned method (ldm, cnn) predicts 7T RISH ``pred`` through a lossy path (model grid, and for
the ldm the VQ-VAE); its scale maps are

    lambda_l^2 = G_l * pred_l / (G_l * ref_l + tau)

with ``ref`` the input 3T RISH (``reference="input"``) or the 3T RISH through the same lossy path
(``"roundtrip"``), and ``G_l`` a mask-normalised Gaussian of sigma_l model-grid voxels (0: none;
:func:`bids_dmri_ldm.core.smooth.smoothed_scale_maps`).  The best sigma differs between orders:
L0 changes smoothly and its voxel-wise ratio suffers from partial-volume edges, L4 is noisy but
its local structure matters.  :func:`calibrate_scale_smoothing` picks sigma_l per order on the
validation pairs after training.

Arrays: RISH and scale maps ``(X, Y, Z, n_orders)``, masks ``(X, Y, Z)`` bool, all in the
canonical orientation the networks see.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..core.sh import DEFAULT_TAU
from ..core.smooth import smoothed_scale_maps

SMOOTHING_CANDIDATES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0)
"""sigma values (model-grid voxels) tried per order by :func:`calibrate_scale_smoothing`."""


def per_order(value: float | Sequence[float], n_orders: int) -> list[float]:
    """One sigma per order from a number or a sequence of ``n_orders`` numbers."""
    if np.isscalar(value):
        return [float(value)] * n_orders
    values = [float(v) for v in value]
    if len(values) != n_orders:
        raise ValueError(f"scale smoothing needs 1 or {n_orders} values (one per RISH order), got {len(values)}")
    return values


def input_sigma(sigma: float, crop_box: Sequence[Sequence[int]], grid: Sequence[int]) -> list[float] | None:
    """A sigma in model-grid voxels as per-axis sigmas in input voxels (through the crop box)."""
    if sigma <= 0:
        return None
    return [float(sigma) * (stop - start) / g for (start, stop), g in zip(crop_box, grid)]


def learned_scale_maps(pred: np.ndarray, reference: np.ndarray, mask: np.ndarray,
                       crop_box: Sequence[Sequence[int]], grid: Sequence[int],
                       sigma: float | Sequence[float], tau: float = DEFAULT_TAU) -> np.ndarray:
    """lambda ``(X, Y, Z, n_orders)`` float32: smoothed ratio per order inside ``mask``, 1 outside."""
    n = pred.shape[-1]
    mask = np.asarray(mask, bool)
    scale = np.empty(pred.shape, np.float32)
    for k, s in enumerate(per_order(sigma, n)):
        scale[..., k:k + 1] = smoothed_scale_maps(pred[..., k:k + 1], reference[..., k:k + 1], mask,
                                                  input_sigma(s, crop_box, grid), tau)
    return np.where(mask[..., None], scale, np.float32(1.0)).astype(np.float32)


def calibrate_scale_smoothing(translate: Callable[[np.ndarray, np.ndarray], Any], pairs, grid: Sequence[int],
                              reference: str = "roundtrip",
                              candidates: Sequence[float] = SMOOTHING_CANDIDATES,
                              tau: float = DEFAULT_TAU) -> dict[str, Any]:
    """Choose the smoothing sigma of each order on position-paired validation scans.

    Parameters
    ----------
    translate : ``(rish, mask) -> Translation`` (``pred_7t``, ``recon_3t``, ``provenance["CropBox"]``)
        The trained model's prediction of one scan.
    pairs : sequence of (3T :class:`~.data.RishScan`, 7T on the 3T grid :class:`~.data.RishScan`)
    grid : the model grid.

    Returns
    -------
    dict
        ``{"sigma": [per order], "candidates", "nmse": [[per order] per candidate], "metric"}``:
        for each candidate the NMSE of the translated RISH (lambda^2 x 3T RISH, what the
        participant level writes) against the real 7T RISH inside both brains, averaged over the
        pairs; each order takes its smallest.
    """
    n = None
    table = None
    count = 0
    for source, target in pairs:
        both = np.asarray(source.mask, bool) & np.asarray(target.mask, bool)
        if not both.any():
            continue
        result = translate(source.rish, source.mask)
        ref = source.rish if reference == "input" else result.recon_3t
        n = source.rish.shape[-1]
        table = np.zeros((len(candidates), n)) if table is None else table
        truth = target.rish[both].astype(np.float64)
        energy = np.maximum((truth ** 2).sum(axis=0), 1e-30)
        for i, sigma in enumerate(candidates):
            lam = learned_scale_maps(result.pred_7t, ref, source.mask, result.provenance["CropBox"], grid, sigma, tau)
            pred = (lam ** 2 * source.rish)[both].astype(np.float64)
            table[i] += ((pred - truth) ** 2).sum(axis=0) / energy
        count += 1
    if table is None:
        raise ValueError("no validation pair with brain voxels in both scans")
    table /= count
    best = [float(candidates[int(np.argmin(table[:, k]))]) for k in range(n)]
    return {"sigma": best, "candidates": [float(c) for c in candidates],
            "nmse": [[float(v) for v in row] for row in table],
            "metric": "NMSE of lambda^2 x 3T RISH against the 7T RISH on the 3T grid, both brains, "
                      "mean over validation pairs"}
