"""Mask-normalised Gaussian smoothing and smoothed RISH scale maps (numpy/scipy, no I/O)."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.ndimage import gaussian_filter

from .sh import DEFAULT_TAU, scale_maps


def smooth_in_mask(volumes: np.ndarray, mask: np.ndarray, sigma: Sequence[float]) -> np.ndarray:
    """Mask-normalised Gaussian smoothing of ``(X, Y, Z, n)`` volumes (sigma in voxels per axis).

    smoothed = G * (v m) / G * m inside the mask, so values outside the brain do not pull the
    brain's edge toward them.
    """
    weight = gaussian_filter(mask.astype(np.float32), sigma, mode="nearest")
    out = np.empty_like(volumes, dtype=np.float32)
    for k in range(volumes.shape[-1]):
        num = gaussian_filter(np.where(mask, volumes[..., k], 0).astype(np.float32), sigma, mode="nearest")
        out[..., k] = np.where(weight > 1e-6, num / np.maximum(weight, 1e-6), volumes[..., k])
    return out


def smoothed_scale_maps(rish_target: np.ndarray, rish_reference: np.ndarray, mask: np.ndarray,
                        sigma: Sequence[float] | None, tau: float = DEFAULT_TAU) -> np.ndarray:
    """Scale maps (paper Eq. 2) from locally averaged RISH: lambda_l^2 = G*target_l / (G*ref_l + tau).

    ``G`` is :func:`smooth_in_mask` with ``sigma`` (voxels per axis; None or all zero: no
    smoothing, the voxel-wise Eq. 2).  The ratio of smoothed maps is the local mean of the
    voxel-wise lambda^2 weighted by the reference RISH: robust where the reference is small and
    noisy, unlike smoothing lambda after the division (the mean of ratios), whose single
    exploding ratios dominate.  Arrays ``(X, Y, Z, n_orders)``; ``mask`` ``(X, Y, Z)``.
    """
    target = np.clip(np.asarray(rish_target, np.float32), 0, None)
    reference = np.clip(np.asarray(rish_reference, np.float32), 0, None)
    if sigma is not None and any(s > 0 for s in sigma):
        mask = np.asarray(mask, bool)
        target = smooth_in_mask(target, mask, sigma)
        reference = smooth_in_mask(reference, mask, sigma)
    return scale_maps(target, reference, tau)
