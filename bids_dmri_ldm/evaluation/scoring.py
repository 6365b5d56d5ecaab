"""Pure scoring functions of the evaluation (arrays in, numbers out; no files, no BIDS).

What is scored (paper Table 1 columns)
--------------------------------------
Four maps per scan, stacked on the last axis in the order of :data:`MAP_NAMES`:
RISH L0, L2, L4 (paper Eq. 1, ``RISH_l = sum_m C_lm^2`` of the b=1000 attenuation S/S0, real
orthonormal SH basis, lmax 4, unregularised least squares) and FA (dipy ``TensorModel``, WLS, on
the b0 + b=1000 volumes). Prediction and reference maps are computed by the same function,
:func:`diffusion_maps`, so any difference comes from the data, not the pipeline.

The prediction lives on its own grid (the 3T field of view at ~1.05 mm); its maps are resampled
into the reference (7T) grid with the two affines (:func:`maps_on_grid`, world space), then
both are compared inside one mask on the reference grid (:func:`score_maps`):

* NMSE = sum_mask (x_hat - x)^2 / sum_mask x^2 (``core.metrics.nmse``),
* SSIM = 3D SSIM (Gaussian window, sigma 1.5) averaged inside the mask, data range from the
  reference inside the mask (``core.metrics.ssim3d``).

Per-participant scores are summarised as mean and sample standard deviation (ddof = 1) over
participants (:func:`summarise`), as the paper reports mean ± sd over its 17 test subjects.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import ndimage

from ..core.gradients import check_gradients, select_shell
from ..core.metrics import nmse, ssim3d, tensor_fit
from ..core.resample import nearest_inside_index, resample, resample_mask
from ..core.sh import RISH_ORDERS, SHModel, rish_features
from ..core.signal import fit_shell_sh

MAP_NAMES: tuple[str, ...] = ("L0", "L2", "L4", "FA")
"""Names of the scored maps, in the order of the last axis of a maps array."""

RISH_NAMES: tuple[str, ...] = ("L0", "L2", "L4")
"""The RISH maps among :data:`MAP_NAMES` (the only ones a RISH-only truth can score)."""

METRICS: tuple[str, ...] = ("nmse", "ssim")
"""Metrics computed for every map."""

DEFAULT_SHELL = 1000.0
"""b-value (s/mm²) of the shell the paper uses."""

DEFAULT_SH_ORDER = 4
"""Highest SH order of the RISH fit (paper: L0, L2, L4)."""

FA_CHUNK_VOXELS = 100_000
"""Voxels per tensor fit (bounds dipy's float64 working memory to a few hundred MB)."""

FIT_MARGIN_VOXELS = 4
"""Dilation (voxels of the source grid) of the region fitted around the mask before resampling:
the cubic B-spline needs valid values a few voxels beyond the voxels it is evaluated at."""


def score_columns(names: Sequence[str] = MAP_NAMES) -> list[str]:
    """Column names ``nmse_<map>`` then ``ssim_<map>`` (the paper's column order)."""
    return [f"{metric}_{name}" for metric in METRICS for name in names]


def diffusion_maps(
    data: np.ndarray,
    bvals: np.ndarray,
    bvecs: np.ndarray,
    mask: np.ndarray,
    shell: float = DEFAULT_SHELL,
    tolerance: float = 100.0,
    sh_order_max: int = DEFAULT_SH_ORDER,
) -> np.ndarray:
    """RISH L0/L2/L4 and FA of a DWI, computed the same way for every scan.

    Parameters
    ----------
    data : ndarray, shape (X, Y, Z, N)
        Raw DWI intensities (any units).
    bvals : ndarray, shape (N,)
        b-values in s/mm².
    bvecs : ndarray, shape (N, 3)
        Gradient directions (FSL convention; RISH and FA do not depend on the frame).
    mask : ndarray of bool, shape (X, Y, Z)
        Voxels to fit; maps are 0 elsewhere.
    shell, tolerance : float
        Shell used (s/mm²): the b0 volumes (b <= 50) and the volumes within ``tolerance`` of
        ``shell``.
    sh_order_max : int
        Highest SH order of the unregularised least-squares fit.

    Returns
    -------
    maps : ndarray, shape (X, Y, Z, 4), float32
        RISH L0, L2, L4 of the attenuation S/S0 (paper Eq. 1, no square root; S/S0 clipped to
        [0, 1], S0 = mean b0 floored at 1) and FA in [0, 1], in the order of :data:`MAP_NAMES`.

    Raises
    ------
    core.gradients.GradientError
        Gradient table inconsistent with the data, no b0 or no volume near ``shell``.
    """
    if data.ndim != 4:
        raise ValueError(f"a DWI must be 4D, got shape {data.shape}")
    mask = np.asarray(mask, dtype=bool)
    clean = check_gradients(bvals, bvecs, data.shape[-1])
    selection = select_shell(bvals, clean, shell=shell, tolerance=tolerance)
    model = SHModel(selection.bvecs_shell, sh_order_max=sh_order_max, smooth=0.0)
    _, coeffs = fit_shell_sh(data, selection.b0_index, selection.shell_index, mask, model.fit_matrix)
    maps = np.zeros(mask.shape + (len(MAP_NAMES),), dtype=np.float32)
    maps[..., : len(RISH_ORDERS)] = rish_features(coeffs, model.l_values, RISH_ORDERS)  # Eq. 1
    maps[..., len(RISH_ORDERS)] = _fa_in_chunks(data, selection.index, selection.bvals, clean, mask)
    return maps


def _fa_in_chunks(
    data: np.ndarray, index: np.ndarray, bvals: np.ndarray, bvecs: np.ndarray, mask: np.ndarray,
    chunk_voxels: int = FA_CHUNK_VOXELS,
) -> np.ndarray:
    """FA ``(X, Y, Z)`` of the masked voxels, fitted ``chunk_voxels`` at a time.

    dipy's TensorModel works in float64 on every masked voxel at once (GBs at HCP size); fitting
    chunks of voxels gives the same FA with bounded memory.
    """
    fa = np.zeros(mask.shape, dtype=np.float32)
    coords = np.nonzero(mask)
    for start in range(0, coords[0].size, chunk_voxels):
        where = tuple(c[start : start + chunk_voxels] for c in coords)
        voxels = data[where][:, index]  # (V, n_b0 + M)
        chunk_fa, _ = tensor_fit(voxels[:, None, None, :], bvals[index], bvecs[index])
        fa[where] = np.clip(chunk_fa[:, 0, 0], 0.0, 1.0)
    return fa


def fov_mask(
    ref_affine: np.ndarray, ref_shape: Sequence[int], src_affine: np.ndarray, src_shape: Sequence[int]
) -> np.ndarray:
    """Voxels of the reference grid whose centre lies inside the source grid's field of view.

    Parameters
    ----------
    ref_affine, src_affine : ndarray, shape (4, 4)
        Voxel-to-world affines (mm) of the two grids.
    ref_shape, src_shape : sequence of 3 ints

    Returns
    -------
    ndarray of bool, shape ``ref_shape``
        True where the centre maps to source voxel coordinates within ``[-0.5, n - 0.5]`` on
        every axis (the outer faces of the source's edge voxels).
    """
    mapping = np.linalg.inv(np.asarray(src_affine, float)) @ np.asarray(ref_affine, float)
    ref_shape = tuple(int(s) for s in ref_shape[:3])
    inside = np.ones(ref_shape, dtype=bool)
    grids = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in ref_shape], indexing="ij", sparse=True)
    for axis in range(3):
        coord = mapping[axis, 3] + sum(mapping[axis, j] * grids[j] for j in range(3))
        inside &= (coord >= -0.5) & (coord <= src_shape[axis] - 0.5)
    return inside


def fit_region(
    ref_mask: np.ndarray,
    ref_affine: np.ndarray,
    src_affine: np.ndarray,
    src_shape: Sequence[int],
    margin: int = FIT_MARGIN_VOXELS,
) -> np.ndarray:
    """Voxels of a source grid to fit so that its maps can be resampled into ``ref_mask``.

    The reference mask is brought onto the source grid (world space) and dilated by ``margin``
    voxels, so the interpolation near the mask's edge uses fitted values, not zeros.

    Returns
    -------
    ndarray of bool, shape ``src_shape``
    """
    on_src = resample_mask(ref_mask, ref_affine, src_affine, tuple(src_shape[:3]))
    if margin > 0 and on_src.any():
        cube = ndimage.generate_binary_structure(3, 3)  # the spline support is a cube, not a ball
        on_src = ndimage.binary_dilation(on_src, structure=cube, iterations=margin)
    return on_src


def fill_invalid(maps: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Give every voxel outside ``valid`` the value of its nearest valid voxel.

    Done before interpolating into another grid so that voxels near the edge of a prediction's
    support (the participant level writes zeros outside its brain mask) are not pulled towards
    zero by the B-spline; which voxels are then scored is decided by the support itself.

    Parameters
    ----------
    maps : ndarray, shape (X, Y, Z, C)
    valid : ndarray of bool, shape (X, Y, Z)

    Returns
    -------
    ndarray, shape (X, Y, Z, C) (``maps`` itself when every voxel is valid or none is)
    """
    valid = np.asarray(valid, dtype=bool)
    if valid.all() or not valid.any():
        return maps
    return maps[tuple(nearest_inside_index(valid))]


def maps_on_grid(
    maps: np.ndarray,
    affine: np.ndarray,
    ref_affine: np.ndarray,
    ref_shape: Sequence[int],
    order: int = 3,
) -> np.ndarray:
    """Resample ``maps (X, Y, Z, C)`` from their grid into the reference grid (world space).

    Cubic B-spline by default (``core.resample.resample``); negative overshoot is clipped to 0
    because RISH and FA are non-negative.

    Returns
    -------
    ndarray, shape ``ref_shape + (C,)``, float32
    """
    out = resample(np.asarray(maps, dtype=np.float32), affine, ref_affine, tuple(ref_shape[:3]), order=order)
    np.clip(out, 0.0, None, out=out)
    return out


def score_maps(
    pred: np.ndarray,
    ref: np.ndarray,
    mask: np.ndarray,
    names: Sequence[str] = MAP_NAMES,
) -> dict[str, float]:
    """NMSE and SSIM of each map inside ``mask``.

    Parameters
    ----------
    pred, ref : ndarray, shape (X, Y, Z, C)
        Maps on the same grid, ``C == len(names)``, in the order of ``names``.
    mask : ndarray of bool, shape (X, Y, Z)
    names : sequence of str
        Map names (default :data:`MAP_NAMES`).

    Returns
    -------
    dict
        ``{"nmse_<name>": float, ..., "ssim_<name>": float, ...}``; NaN where a metric is
        undefined (reference zero or constant inside the mask).
    """
    pred = np.asarray(pred)
    ref = np.asarray(ref)
    mask = np.asarray(mask, dtype=bool)
    if pred.shape != ref.shape or pred.shape[:3] != mask.shape or pred.shape[-1] != len(names):
        raise ValueError(
            f"shapes do not match: prediction {pred.shape}, reference {ref.shape}, mask {mask.shape}, "
            f"{len(names)} names"
        )
    if not mask.any():
        raise ValueError("the evaluation mask is empty")
    scores: dict[str, float] = {}
    for metric, function in (("nmse", nmse), ("ssim", ssim3d)):
        for k, name in enumerate(names):
            try:
                scores[f"{metric}_{name}"] = function(pred[..., k], ref[..., k], mask)
            except ValueError:  # undefined for this reference (zero / constant in the mask)
                scores[f"{metric}_{name}"] = math.nan
    return scores


def summarise(rows: Sequence[Mapping[str, float]], columns: Sequence[str]) -> tuple[dict[str, float], dict[str, float]]:
    """Mean and sample standard deviation (ddof = 1) of each column over participants.

    NaN entries are ignored; a column with fewer than two finite values has sd NaN (and mean NaN
    when it has none).

    Returns
    -------
    mean, sd : dict
        ``{column: value}``.
    """
    mean: dict[str, float] = {}
    sd: dict[str, float] = {}
    for column in columns:
        values = np.array([row.get(column, math.nan) for row in rows], dtype=np.float64)
        values = values[np.isfinite(values)]
        mean[column] = float(values.mean()) if values.size else math.nan
        sd[column] = float(values.std(ddof=1)) if values.size > 1 else math.nan
    return mean, sd
