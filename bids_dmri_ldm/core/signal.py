"""Signal normalisation and SH fit of one shell of a DWI, in chunks of voxels (numpy + torch, no BIDS).

Shapes: ``data (X, Y, Z, V)`` raw intensities; ``s0 (X, Y, Z)``; attenuation ``(X, Y, Z, M)`` =
S/S0 of the M shell volumes, clipped to [0, 1] inside the mask and 0 outside (the reference RISH
harmonisation tool does the same).
"""
from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np

from .sh import RISH_ORDERS, rish_selection

if TYPE_CHECKING:  # torch is imported where it is used: the main process loads this module, never torch
    import torch


DEFAULT_S0_FLOOR = 1.0
"""Lower bound on S0 (image intensity units) so S/S0 never divides by ~0."""


def sanitize(data: np.ndarray) -> tuple[np.ndarray, int]:
    """Replace NaN/Inf by 0 (in place for float arrays); return ``(data, n_bad_voxels)``.

    ``n_bad_voxels`` counts spatial voxels with at least one non-finite value; the caller masks
    them out and warns.
    """
    if not np.issubdtype(data.dtype, np.floating):
        return data, 0
    bad = ~np.isfinite(data)
    if not bad.any():
        return data, 0
    n_bad = int(bad.any(axis=-1).sum()) if data.ndim == 4 else int(bad.sum())
    data[bad] = 0
    return data, n_bad


def mean_b0(data: np.ndarray, b0_index: np.ndarray) -> np.ndarray:
    """Mean of the b0 volumes, ``(X, Y, Z)`` float32."""
    return np.mean(data[..., b0_index], axis=-1, dtype=np.float32)


def _chunks(index: np.ndarray, chunk_voxels: int):
    for start in range(0, index.size, chunk_voxels):
        yield index[start : start + chunk_voxels]


def _normalise_rows(rows: np.ndarray, b0_index, dwi_index, s0_floor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """S0 ``(n,)`` and clipped attenuation ``(n, M)`` of raw rows ``(n, V)``, float32 tensors.

    torch rather than numpy: its vectorised int16->float32 conversion and fused in-place clamps
    took 0.6x the CPU time of the numpy equivalent (measured, benchmarks/bench_sh_fit.py).
    """
    import torch
    raw = torch.from_numpy(rows)
    s0 = raw[:, b0_index].float().mean(dim=1).clamp_(min=s0_floor)
    att = raw[:, dwi_index].float()
    # In place only when .float() made a copy: float32 rows taken as a view (a slice of the
    # caller's data) must not change.
    att = att.div(s0[:, None]) if raw.dtype == torch.float32 else att.div_(s0[:, None])
    return s0, att.clamp_(0.0, 1.0)


def _as_index(index: np.ndarray) -> slice | torch.Tensor:
    """A slice when ``index`` is a contiguous run (views are ~2x faster than gathers), else a tensor."""
    import torch
    index = np.asarray(index, dtype=np.int64)
    if index.size and np.array_equal(index, np.arange(index[0], index[0] + index.size)):
        return slice(int(index[0]), int(index[0] + index.size))
    return torch.from_numpy(index)


def _over_masked_chunks(data, b0_index, dwi_index, mask, fit_mat, s0_floor, chunk_voxels, n_threads,
                        rish_selection=None):
    """Shared chunk loop: normalise masked voxels and SH-fit them (and, with ``rish_selection`` (K, n_orders), take the RISH features of each chunk while its
    coefficients are in cache).

    Voxels are visited in the memory order of ``data`` (Fortran order for the arrays nibabel
    maps from a NIfTI file, C order otherwise), so ``data`` is viewed as ``(n_voxels, V)`` without
    a copy and each chunk reads contiguous runs of every volume. torch releases the GIL in its
    kernels, so ``n_threads`` workers on disjoint chunks run in parallel (written here because
    dipy's fit converts the whole volume to float64 at once).
    """
    import torch
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != data.shape[:3]:
        raise ValueError(f"mask shape {mask.shape} does not match data shape {data.shape[:3]}")
    order = "F" if data.flags.f_contiguous and not data.flags.c_contiguous else "C"
    flat = data.reshape(-1, data.shape[-1], order=order)  # a view for C- or F-contiguous data
    width = fit_mat.shape[0]
    b0_index, dwi_index = _as_index(b0_index), _as_index(dwi_index)
    fit_t = torch.from_numpy(np.ascontiguousarray(fit_mat.T, dtype=np.float32))
    sel_t = None if rish_selection is None else torch.from_numpy(np.asarray(rish_selection, dtype=np.float32))
    s0 = np.zeros(mask.size, dtype=np.float32)
    out = np.zeros((mask.size, width), dtype=np.float32, order=order)
    rish = None if sel_t is None else np.zeros((mask.size, sel_t.shape[1]), dtype=np.float32, order=order)

    def work(rows) -> None:
        s0_rows, att_rows = _normalise_rows(flat[rows], b0_index, dwi_index, s0_floor)
        s0[rows] = s0_rows.numpy()
        result = att_rows @ fit_t
        out[rows] = result.numpy()
        if rish is not None:
            rish[rows] = (result * result @ sel_t).numpy()  # Eq. 1

    if mask.all():  # every voxel (the participant level): contiguous slices are views, no gather
        chunks = [slice(start, min(start + chunk_voxels, mask.size)) for start in range(0, mask.size, chunk_voxels)]
    else:
        chunks = list(_chunks(np.flatnonzero(mask.ravel(order=order)), chunk_voxels))
    if n_threads > 1 and len(chunks) > 1:
        with ThreadPoolExecutor(max_workers=n_threads) as pool:
            list(pool.map(work, chunks))
    else:
        for rows in chunks:
            work(rows)
    results = (s0.reshape(mask.shape, order=order), out.reshape(mask.shape + (width,), order=order))
    if rish is not None:
        results += (rish.reshape(mask.shape + (rish.shape[1],), order=order),)
    return results


#: Voxels per chunk of the SH fit: 16384 x 90 float32 (~6 MB) stays in cache through the
#: normalisation and the product; measured 0.3-0.5 s vs 0.9-1.5 s with 65536 (HCP-size shell,
#: two worker threads, benchmarks/bench_sh_fit.py).
FIT_CHUNK_VOXELS = 16384

#: Worker threads of the SH fit (torch releases the GIL; the participant nodes get 2 CPUs).
FIT_THREADS = 2


def fit_shell_sh(
    data: np.ndarray,
    b0_index: np.ndarray,
    dwi_index: np.ndarray,
    mask: np.ndarray,
    fit_mat: np.ndarray,
    s0_floor: float = DEFAULT_S0_FLOOR,
    chunk_voxels: int = FIT_CHUNK_VOXELS,
    n_threads: int = FIT_THREADS,
) -> tuple[np.ndarray, np.ndarray]:
    """Normalise and SH-fit in one pass, never holding the full attenuation array.

    ``S0`` = mean b0 floored at ``s0_floor``, attenuation ``S / S0`` clipped to [0, 1], then the
    least-squares SH coefficients ``att @ fit_mat.T``; memory bounded by the chunk size (an HCP-size fit needs a few hundred MB on top of the data).

    Parameters
    ----------
    fit_mat : ndarray, shape (K, M)
        SH fit matrix of the shell directions (``SHModel.fit_matrix``).

    Returns
    -------
    s0 : ndarray, shape (X, Y, Z), float32
    coeffs : ndarray, shape (X, Y, Z, K), float32
    """
    return _over_masked_chunks(data, b0_index, dwi_index, mask, fit_mat, s0_floor, chunk_voxels, n_threads)


def fit_shell_rish(
    data: np.ndarray,
    b0_index: np.ndarray,
    dwi_index: np.ndarray,
    mask: np.ndarray,
    fit_mat: np.ndarray,
    l_values: np.ndarray,
    orders: Sequence[int] = RISH_ORDERS,
    s0_floor: float = DEFAULT_S0_FLOOR,
    chunk_voxels: int = FIT_CHUNK_VOXELS,
    n_threads: int = FIT_THREADS,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`fit_shell_sh` and the RISH features (Eq. 1) in the same pass over the data.

    Same values as ``rish_features(fit_shell_sh(...)[1], l_values, orders)``, taken chunk by
    chunk while the coefficients are in cache (0 outside ``mask``, as the coefficients).

    Returns
    -------
    s0 : ndarray, shape (X, Y, Z), float32
    coeffs : ndarray, shape (X, Y, Z, K), float32
    rish : ndarray, shape (X, Y, Z, len(orders)), float32
    """
    return _over_masked_chunks(data, b0_index, dwi_index, mask, fit_mat, s0_floor, chunk_voxels, n_threads,
                               rish_selection=rish_selection(l_values, orders))


__all__ = [
    "DEFAULT_S0_FLOOR",
    "sanitize",
    "mean_b0",
    "fit_shell_sh",
    "fit_shell_rish",
]
