"""Mask-normalised Gaussian smoothing and smoothed RISH scale maps (numpy/scipy, no I/O)."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.ndimage import gaussian_filter1d

from .resample import SeparableResampler, read_only_tensor
from .sh import DEFAULT_TAU, scale_maps

#: scipy's default Gaussian truncation (radius = ``truncate * sigma``).
GAUSSIAN_TRUNCATE = 4.0


def smooth_in_mask(volumes: np.ndarray, mask: np.ndarray, sigma: Sequence[float]) -> np.ndarray:
    """Mask-normalised Gaussian smoothing of ``(X, Y, Z, n)`` volumes (sigma in voxels per axis).

    smoothed = G * (v m) / G * m inside the mask, so values outside the brain do not pull the
    brain's edge toward them. ``G`` is scipy's ``gaussian_filter(mode="nearest")``
    (:class:`SeparableGaussian`).
    """
    return _smooth_many([volumes], mask, sigma)[0]


class SeparableGaussian:
    """``scipy.ndimage.gaussian_filter(volume, sigma, mode="nearest")`` of ``shape`` volumes as
    three matrix products.

    Along one axis the filter (with its ``nearest`` edges) is a linear map ``W_a (n_a, n_a)``,
    taken exactly from scipy: ``gaussian_filter1d`` of the identity. Why not scipy itself: the
    ldm's scale maps are smoothed with sigma ~20 input voxels at HCP size (taps over 4 sigma on
    each side), which cost scipy ~0.4 s per volume on 2 cores; dense products in torch
    (multi-threaded BLAS) cost ~0.05 s and give the same values to float32 rounding.
    """

    def __init__(self, shape: Sequence[int], sigma: Sequence[float]):
        import torch  # here: the main process loads this module, never torch
        self.shape = tuple(int(n) for n in shape[:3])
        self.weights = [torch.from_numpy(_gaussian_operator(n, float(s))) for n, s in zip(self.shape, sigma)]

    def __call__(self, volume: np.ndarray) -> np.ndarray:
        """Filtered ``(X, Y, Z)`` float32 volume (C-ordered)."""
        x = read_only_tensor(np.ascontiguousarray(volume, dtype=np.float32))
        return SeparableResampler._separable(x, *self.weights)


def _gaussian_operator(n: int, sigma: float) -> np.ndarray:
    """``(n, n)`` float32 matrix of ``gaussian_filter1d(., sigma, mode="nearest")`` on ``n``
    samples (the identity for sigma 0, which scipy leaves unfiltered)."""
    if sigma <= 1e-15:
        return np.eye(n, dtype=np.float32)
    return gaussian_filter1d(np.eye(n), sigma, axis=0, mode="nearest",
                             truncate=GAUSSIAN_TRUNCATE).astype(np.float32)


def _smooth_many(arrays: Sequence[np.ndarray], mask: np.ndarray, sigma: Sequence[float]) -> list[np.ndarray]:
    """:func:`smooth_in_mask` of several ``(X, Y, Z, n)`` arrays with one mask: ``G * m`` is
    filtered once."""
    mask = np.asarray(mask, bool)
    filtered = SeparableGaussian(mask.shape, sigma)
    weight = filtered(mask.astype(np.float32))
    inside = weight > 1e-6
    denominator = np.maximum(weight, 1e-6)
    smoothed = []
    for a in arrays:
        out = np.empty_like(a, dtype=np.float32)
        for k in range(a.shape[-1]):
            numerator = filtered(np.where(mask, a[..., k], 0).astype(np.float32))
            out[..., k] = np.where(inside, numerator / denominator, a[..., k])
        smoothed.append(out)
    return smoothed


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
        target, reference = _smooth_many([target, reference], mask, sigma)
    return scale_maps(target, reference, tau)
