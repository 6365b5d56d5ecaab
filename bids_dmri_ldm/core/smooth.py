"""Mask-normalised Gaussian smoothing and smoothed RISH scale maps (numpy/scipy, no I/O)."""
from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from scipy.ndimage import gaussian_filter

from .sh import DEFAULT_TAU, scale_maps


#: Threads of the Gaussian filters (scipy.ndimage releases the GIL: 2 filters in 2 threads took
#: 0.43 s against 0.81 s one after the other, 2-core VM).
SMOOTH_THREADS = 2


def smooth_in_mask(volumes: np.ndarray, mask: np.ndarray, sigma: Sequence[float],
                   n_threads: int = SMOOTH_THREADS) -> np.ndarray:
    """Mask-normalised Gaussian smoothing of ``(X, Y, Z, n)`` volumes (sigma in voxels per axis).

    smoothed = G * (v m) / G * m inside the mask, so values outside the brain do not pull the
    brain's edge toward them. The filters of the volumes (and of the mask) run in ``n_threads``
    threads; the values are those of the same filters run one after the other.
    """
    return _smooth_many([volumes], mask, sigma, n_threads)[0]


def _smooth_many(arrays: Sequence[np.ndarray], mask: np.ndarray, sigma: Sequence[float],
                 n_threads: int = SMOOTH_THREADS) -> list[np.ndarray]:
    """:func:`smooth_in_mask` of several ``(X, Y, Z, n)`` arrays with one mask: ``G * m`` is
    filtered once, and every filter runs in a pool of ``n_threads`` (large sigmas make each
    filter cost seconds at HCP size)."""
    mask = np.asarray(mask, bool)

    def filtered(volume: np.ndarray) -> np.ndarray:
        return gaussian_filter(volume, sigma, mode="nearest")

    jobs = [mask.astype(np.float32)] + [np.where(mask, a[..., k], 0).astype(np.float32)
                                        for a in arrays for k in range(a.shape[-1])]
    if n_threads > 1:
        with ThreadPoolExecutor(max_workers=n_threads) as pool:
            results = list(pool.map(filtered, jobs))
    else:
        results = [filtered(job) for job in jobs]
    weight, numerators = results[0], iter(results[1:])
    smoothed = []
    for a in arrays:
        out = np.empty_like(a, dtype=np.float32)
        for k in range(a.shape[-1]):
            out[..., k] = np.where(weight > 1e-6, next(numerators) / np.maximum(weight, 1e-6), a[..., k])
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
