"""Image-similarity metrics and tensor maps used to score translations (paper Table 1).

Conventions (science notes): NMSE = sum_mask (x_hat - x)^2 / sum_mask x^2; SSIM in 3D (Wang's
form, Gaussian window sigma 1.5), averaged over the mask, data range = max - min of the reference
inside the mask; FA from dipy's ``TensorModel`` (WLS) with the same mask for every method.
"""
from __future__ import annotations

import numpy as np
from dipy.core.gradients import gradient_table
from dipy.reconst.dti import TensorModel

from .gradients import B0_THRESHOLD


def nmse(pred: np.ndarray, ref: np.ndarray, mask: np.ndarray) -> float:
    """Normalised mean squared error inside ``mask``: ``sum (pred - ref)^2 / sum ref^2``."""
    mask = np.asarray(mask, dtype=bool)
    p = np.asarray(pred, dtype=np.float64)[mask]
    r = np.asarray(ref, dtype=np.float64)[mask]
    denom = float(np.sum(r**2))
    if denom == 0.0:
        raise ValueError("reference is zero inside the mask: NMSE undefined")
    return float(np.sum((p - r) ** 2) / denom)


def ssim3d(pred: np.ndarray, ref: np.ndarray, mask: np.ndarray, sigma: float = 1.5, window: int = 11) -> float:
    """3D SSIM of two ``(X, Y, Z)`` volumes averaged inside ``mask`` (MONAI's SSIM map).

    Voxels outside the mask are zeroed in both volumes first; the window shrinks (odd size) for
    volumes smaller than it.
    """
    # torch and MONAI (~3 s to import on 2 cores) only here: the participant report imports this
    # module for its tensor fits and needs neither.
    import torch
    from monai.metrics.regression import compute_ssim_and_cs

    mask = np.asarray(mask, dtype=bool)
    r_in = np.asarray(ref, dtype=np.float64)[mask]
    data_range = float(r_in.max() - r_in.min()) if r_in.size else 0.0
    if data_range == 0.0:
        raise ValueError("reference is constant inside the mask: SSIM undefined")
    win = min(window, *[s if s % 2 else s - 1 for s in mask.shape])
    win = max(win, 3)
    p = torch.from_numpy(np.where(mask, pred, 0.0).astype(np.float32))[None, None]
    r = torch.from_numpy(np.where(mask, ref, 0.0).astype(np.float32))[None, None]
    ssim_map, _ = compute_ssim_and_cs(
        p, r, spatial_dims=3, kernel_size=[win] * 3, kernel_sigma=[sigma] * 3, data_range=data_range
    )
    # MONAI returns the 'valid' part of the map (no padding): crop the mask to match.
    ssim_map = ssim_map[0, 0].numpy()
    crop = tuple(slice((s - m) // 2, (s - m) // 2 + m) for s, m in zip(mask.shape, ssim_map.shape))
    inner = mask[crop]
    if not inner.any():
        return float(ssim_map.mean())
    return float(ssim_map[inner].mean())


def tensor_fit(
    data: np.ndarray, bvals: np.ndarray, bvecs: np.ndarray, mask: np.ndarray | None = None,
    fit_method: str = "WLS", dtype=np.float32,
) -> tuple[np.ndarray, np.ndarray]:
    """FA ``(..., )`` and principal eigenvector ``(..., 3)`` of ``data (..., N)`` from dipy's
    TensorModel: the one FA of the package.

    ``fit_method``: ``"WLS"`` (dipy's default; the evaluation and the validation numbers) or
    ``"OLS"`` (the participant report, which fits a few slices while the run waits: 5 µs per
    voxel instead of 80 µs for WLS, measured with 108 volumes). bvecs ``(N, 3)`` in the FSL
    convention; the eigenvectors are in the same frame. ``data`` is fitted as ``dtype``.
    """
    gtab = gradient_table(np.asarray(bvals, dtype=np.float64), bvecs=np.asarray(bvecs, dtype=np.float64), b0_threshold=B0_THRESHOLD)
    fit = TensorModel(gtab, fit_method=fit_method).fit(np.asarray(data, dtype=dtype), mask=mask)
    fa = np.nan_to_num(fit.fa).astype(np.float32)
    return fa, fit.evecs[..., :, 0].astype(np.float32)


def angular_error_deg(v1: np.ndarray, v2: np.ndarray) -> np.ndarray:
    """Angle in degrees between axial directions ``(..., 3)`` (sign-invariant)."""
    v1 = np.asarray(v1, dtype=np.float64)
    v2 = np.asarray(v2, dtype=np.float64)
    n = np.linalg.norm(v1, axis=-1) * np.linalg.norm(v2, axis=-1)
    cos = np.abs(np.sum(v1 * v2, axis=-1)) / np.where(n == 0, 1.0, n)
    return np.degrees(np.arccos(np.clip(cos, 0.0, 1.0)))
