"""Numbers and fits of the participant report: white-matter summary of the scale maps, tensor
fits on a lattice of voxels (no file is read here).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from bids_dmri_ldm.reports.html import (
    ReportInputError,
)

#: FA above which a brain voxel counts as white-matter-like in the summary.
WM_FA_THRESHOLD = 0.4
#: Every ``LATTICE_STEP``-th voxel along each axis is tensor-fitted for the
#: white-matter summary (1/27 of the brain): medians over ~1e5 voxels are
#: stable to the third digit, and the fit stays within the time budget.
LATTICE_STEP = 3


def summary_numbers(
    scale: np.ndarray | None,
    mask: np.ndarray | None,
    fa: np.ndarray | None,
    orders: Sequence[int] = (0, 2, 4),
    fa_threshold: float = WM_FA_THRESHOLD,
) -> list[tuple]:
    """Median lambda_l in the brain and in white-matter-like voxels.

    Parameters
    ----------
    scale : ndarray, shape (X, Y, Z, n_orders)
        Scale maps lambda_l (paper Eq. 2).
    mask : ndarray of bool, shape (X, Y, Z)
    fa : ndarray, shape (X, Y, Z), or None
        FA of the 3T input; voxels with FA > ``fa_threshold`` (NaN = not
        fitted, excluded) are white-matter-like.
    orders : sequence of int

    Returns
    -------
    list of tuple
        Rows ``(quantity, value)``; ``None`` where undefined.
    """
    if scale is None or mask is None:
        raise ReportInputError("scale maps or brain mask not available")
    mask = np.asarray(mask).astype(bool)
    scale = np.asarray(scale)  # medians in float64 of the selected voxels only, not of the whole grid
    if scale.shape[:3] != mask.shape:
        raise ValueError(f"scale maps {scale.shape} and mask {mask.shape} are on different grids")
    rows: list[tuple] = [("brain voxels", int(mask.sum()))]
    wm = None
    if fa is not None and np.shape(fa) == mask.shape:
        with np.errstate(invalid="ignore"):
            wm = mask & (np.asarray(fa) > fa_threshold)
        rows.append((f"WM-like voxels (FA > {fa_threshold:g}, of those fitted)", int(wm.sum())))
    for i, order in enumerate(orders[: scale.shape[-1]]):
        lam = scale[..., i]
        finite = np.isfinite(lam)
        inside = lam[mask & finite].astype(np.float64)
        rows.append((f"median λ{order} in brain", float(np.median(inside)) if inside.size else None))
        if wm is not None:
            sel = lam[wm & finite].astype(np.float64)
            rows.append((f"median λ{order} in WM-like voxels",
                         float(np.median(sel)) if sel.size else None))
    return rows


def lattice_voxels(mask: np.ndarray, step: int = LATTICE_STEP) -> np.ndarray:
    """Brain voxels on a regular lattice of every ``step``-th voxel."""
    lattice = np.zeros(mask.shape, bool)
    lattice[::step, ::step, ::step] = True
    return lattice & mask


def fit_tensor_at(
    signals: np.ndarray, bvals: np.ndarray, bvecs: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """FA and principal eigenvector of a set of voxels (dipy TensorModel, OLS).

    ``core.metrics.tensor_fit`` with OLS instead of WLS: the report is
    visual and must stay within seconds; measured on this machine, dipy WLS
    took 80 µs per voxel and OLS 5 µs (108 volumes).

    Parameters
    ----------
    signals : ndarray, shape (V, N)
        DWI signal of V voxels, N volumes (b0 + one shell).
    bvals : ndarray, shape (N,)
        s/mm².
    bvecs : ndarray, shape (N, 3)
        Unit directions in voxel axes (FSL convention), zero for b0.

    Returns
    -------
    fa : ndarray, shape (V,)
    evec : ndarray, shape (V, 3)
    """
    from bids_dmri_ldm.core.metrics import tensor_fit

    with np.errstate(all="ignore"):
        # non-finite input voxels (NaN/inf in a raw scan) would break the whole OLS fit
        # (in place on one float64 copy: three copies of a few hundred MB cost ~1 s at HCP size)
        clean = np.array(signals, np.float64)
        clean[~np.isfinite(clean)] = 0.0
        np.clip(clean, 1e-6, None, out=clean)
        fa, evec = tensor_fit(clean, bvals, bvecs, fit_method="OLS", dtype=np.float64)
    return fa, np.nan_to_num(evec)


def flatten(mapping: Mapping, prefix: str = "") -> dict[str, object]:
    """Nested dict -> ``{"a.b": value}`` (lists of scalars kept as lists)."""
    flat: dict[str, object] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat
