"""Spherical harmonics of single-shell signals, RISH features and RISH scale maps.

Basis
-----
Real, symmetric (even orders), orthonormal: dipy's ``descoteaux07`` basis with ``legacy=False``.
Orthonormality is what makes RISH features (:math:`\\|C_l\\|^2`) invariant to rotations of the
gradient set; dipy's legacy ``tournier07`` basis is not orthonormal and must not be used here.
Coefficients are ordered as dipy orders them (see ``l_values`` / ``m_values``).

Arrays keep gradients / coefficients / orders on the last axis, as in :mod:`dipy.reconst.shm`.

Why not ``dipy.reconst.shm.sf_to_sh``: it casts the whole volume to float64 and solves per call
(11 s and ~2.6 GB on an HCP-size b=1000 shell, see ``benchmarks/bench_sh_fit.py``). Here the
fit matrix (pseudo-inverse of the basis, :class:`SHModel`) is computed once, and applied as one
float32 matrix product over chunks of voxels, fused with the normalisation S/S0 and the RISH
features (:func:`bids_dmri_ldm.core.signal.fit_shell_rish`), so memory stays bounded.

References
----------
Zhu et al., "When Diffusion MRI Meets Diffusion Model", MICCAI 2024 — Eq. 1-3.
Mirzaalian et al., "Inter-site and inter-scanner diffusion MRI data harmonization", NeuroImage 2016.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from dipy.core.geometry import cart2sphere
from dipy.reconst.shm import real_sh_descoteaux

RISH_ORDERS: tuple[int, ...] = (0, 2, 4)
"""SH orders whose RISH features the method uses (paper: L0, L2, L4)."""

DEFAULT_TAU = 1e-8
"""Small constant of Eq. 2 guarding against division by zero."""

#: Unique directions each even SH order needs (the reference harmonisation tool's counts); the
#: one table of the package (:func:`max_sh_order`, :func:`~.shells.plan_volumes`, the group level).
DIRECTIONS_FOR_ORDER = {0: 1, 2: 6, 4: 15, 6: 28, 8: 45}


def max_sh_order(n_directions: int) -> int:
    """Highest even SH order that ``n_directions`` unique directions can support (0 if < 6)."""
    supported = [order for order, needed in DIRECTIONS_FOR_ORDER.items() if n_directions >= needed]
    return max(supported, default=0)


def n_coefficients(sh_order_max: int) -> int:
    """Number of coefficients of the symmetric basis up to even order ``sh_order_max``."""
    return (sh_order_max + 1) * (sh_order_max + 2) // 2


def sh_basis(bvecs: np.ndarray, sh_order_max: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Orthonormal real symmetric SH basis sampled on gradient directions.

    Parameters
    ----------
    bvecs : ndarray, shape (N, 3)
        Unit gradient directions (any consistent frame; RISH does not depend on it).
    sh_order_max : int
        Highest even order.

    Returns
    -------
    B : ndarray, shape (N, K)
        ``B[i, j] = Y_j(bvecs[i])``.
    m_values, l_values : ndarray, shape (K,)
        Phase factor and order of each basis function.
    """
    if sh_order_max < 0 or sh_order_max % 2:
        raise ValueError(f"sh_order_max must be a non-negative even integer, got {sh_order_max}")
    bvecs = np.asarray(bvecs, dtype=np.float64)
    _, theta, phi = cart2sphere(bvecs[:, 0], bvecs[:, 1], bvecs[:, 2])
    B, m_values, l_values = real_sh_descoteaux(sh_order_max, theta, phi, full_basis=False, legacy=False)
    return B, m_values, l_values


def fit_matrix(basis: np.ndarray, smooth: float = 0.0, l_values: np.ndarray | None = None) -> np.ndarray:
    """Least-squares fit matrix ``(K, N)`` so that ``coeffs = signal @ F.T``.

    With ``smooth > 0`` a Laplace-Beltrami penalty ``smooth * l^2 (l+1)^2`` is added (biases RISH
    when direction counts differ — science notes; default off).
    """
    if smooth == 0.0:
        return np.linalg.pinv(basis)
    if l_values is None:
        raise ValueError("l_values are required for a regularised fit")
    penalty = np.diag(smooth * (l_values * (l_values + 1.0)) ** 2)
    return np.linalg.solve(basis.T @ basis + penalty, basis.T)


def rish_features(coeffs: np.ndarray, l_values: np.ndarray, orders: Sequence[int] = RISH_ORDERS) -> np.ndarray:
    """Rotation-invariant SH features, paper Eq. 1: ``RISH_l = sum_m C_lm^2`` (no square root).

    Parameters
    ----------
    coeffs : ndarray, shape (..., K)
    l_values : ndarray, shape (K,)
    orders : sequence of int

    Returns
    -------
    ndarray, shape (..., len(orders)), float32
    """
    # One matrix product with a 0/1 order-selection matrix (K, n_orders): ~5x faster than
    # summing boolean-indexed copies per order on an HCP-size volume.
    return np.square(coeffs, dtype=np.float32) @ rish_selection(l_values, orders)


def rish_selection(l_values: np.ndarray, orders: Sequence[int] = RISH_ORDERS) -> np.ndarray:
    """0/1 matrix ``(K, len(orders))`` float32 summing squared coefficients by order (Eq. 1)."""
    l_values = np.asarray(l_values)
    missing = [order for order in orders if not np.any(l_values == order)]
    if missing:
        raise ValueError(f"orders {missing} are not in the SH basis (max order {int(l_values.max())})")
    return (l_values[:, None] == np.asarray(orders)[None, :]).astype(np.float32)


def scale_maps(rish_target: np.ndarray, rish_source: np.ndarray, tau: float = DEFAULT_TAU) -> np.ndarray:
    """RISH scale maps, paper Eq. 2: ``lambda_l = sqrt(RISH_l^target / (RISH_l^source + tau))``.

    Negative inputs (interpolation overshoot) are treated as zero. Shapes ``(..., n_orders)``.
    """
    target = np.clip(np.asarray(rish_target, dtype=np.float32), 0.0, None)
    source = np.clip(np.asarray(rish_source, dtype=np.float32), 0.0, None)
    return np.sqrt(target / (source + np.float32(tau)))


def scale_sh(
    coeffs: np.ndarray, lam: np.ndarray, l_values: np.ndarray, orders: Sequence[int] = RISH_ORDERS
) -> np.ndarray:
    """Scale SH coefficients by order, paper Eq. 3: ``C_hat_lm = lambda_l C_lm``.

    Orders present in the basis but not in ``orders`` are left unscaled (lambda = 1).

    Parameters
    ----------
    coeffs : ndarray, shape (..., K)
    lam : ndarray, shape (..., len(orders)) or (len(orders),)
    """
    lam = np.asarray(lam, dtype=np.float32)
    slots = order_slots(l_values, orders)
    scaled = [scale_coefficient(coeffs[..., j], lam, k) for j, k in enumerate(slots)]
    return np.stack(np.broadcast_arrays(*scaled), axis=-1).astype(np.float32, copy=False)


def order_slots(l_values: np.ndarray, orders: Sequence[int] = RISH_ORDERS) -> list[int | None]:
    """For each SH coefficient (``l_values`` order), the index of its order in ``orders`` (the
    last axis of the scale maps), or None for an order without a scale map (lambda = 1)."""
    slot = {int(order): k for k, order in enumerate(orders)}
    return [slot.get(int(order)) for order in np.asarray(l_values)]


def scale_coefficient(coeff: np.ndarray, lam: np.ndarray, slot: int | None) -> np.ndarray:
    """Eq. 3 for one coefficient: ``C_hat_lm = lambda_l C_lm``, the one kernel of both scalings
    (:func:`scale_sh` in memory, :func:`bids_dmri_ldm.core.rebuild.scale_channels` streamed).

    ``coeff`` is one coefficient, any shape ``(...)``; ``lam`` the scale maps ``(..., n_orders)``
    (or ``(n_orders,)``); ``slot`` its order's index there (:func:`order_slots`), None: unscaled.
    """
    return coeff if slot is None else coeff * lam[..., slot]


class SHModel:
    """Unregularised (by default) least-squares SH model of one shell, dipy-style Model/Fit.

    Parameters
    ----------
    bvecs : ndarray, shape (N, 3)
        Unit directions of the shell's volumes.
    sh_order_max : int
        Highest even order (default 4); must not exceed what the directions support.
    smooth : float
        Laplace-Beltrami regularisation weight (0: plain least squares).
    """

    def __init__(self, bvecs: np.ndarray, sh_order_max: int = 4, smooth: float = 0.0):
        bvecs = np.asarray(bvecs, dtype=np.float64)
        supported = max_sh_order(bvecs.shape[0])
        if sh_order_max > supported:
            raise ValueError(
                f"{bvecs.shape[0]} directions support SH order {supported} at most, {sh_order_max} requested"
            )
        self.bvecs = bvecs
        self.sh_order_max = sh_order_max
        self.smooth = smooth
        self.basis, self.m_values, self.l_values = sh_basis(bvecs, sh_order_max)
        self.fit_matrix = fit_matrix(self.basis, smooth, self.l_values)
