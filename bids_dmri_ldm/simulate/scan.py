"""Simulate one diffusion scan of a subject: partial-volume signal, noise, ground truth.

Each output voxel is split into 2 x 2 x 2 sub-voxels. Tissue fractions of every sub-voxel are
exact box averages of the subject's fine tissue lattice (:mod:`.anatomy`); fibre populations
are evaluated at sub-voxel centres (:mod:`.fibres`); the voxel signal is the volume-weighted mean
of the sub-voxel signals (:mod:`.signal`), i.e. a simulation on a grid twice as fine, averaged
down, computed slab by slab so memory stays bounded. Noise (:mod:`.noise`) is drawn per slab
from a generator seeded by (subject seed, protocol, slab), so results do not depend on how
subjects are spread over processes.

Spatial fields (:mod:`.fields`) are evaluated at voxel centres: the gradient deviation tensor
changes each voxel's effective b-values and directions (all its sub-voxels share it: the field
varies over ~10 cm, a voxel is ~1-5 mm); the B1 maps give the intensity gain and the noise SD.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..core.sh import fit_matrix, rish_features, sh_basis
from . import fibres
from .acquisition import world_to_voxel_directions
from .anatomy import (
    Subject,
    TissueLattice,
    box_average_matrix,
    check_axis_aligned,
    interpolate_coarse,
    voxel_edges,
)
from .fields import effective_bscale, grad_dev_volumes
from .noise import SCANNER_GAIN, add_rician_noise, noise_sigma, to_int16
from .physics import ScanPhysics
from .signal import SignalModel, fibre_signal, isotropic_signals, physical_bvals, tract_intra_fractions

SUBDIVISIONS = 2
"""Sub-voxels per voxel and axis (the "finer grid")."""

RISH_SHELL = 1000.0
"""Shell whose noiseless RISH features are written as ground truth."""

RISH_SH_ORDER = 4
VOXELS_PER_SLAB = 40000
SUBVOXELS_PER_CHUNK = 4096


@dataclass
class ScanResult:
    """A simulated scan and its ground truth (all on the scan's grid).

    Attributes
    ----------
    dwi : ndarray, shape (X, Y, Z, N), int16
        Magnitude images.
    bvals : ndarray, shape (N,)
    bvecs : ndarray, shape (3, N)
        FSL convention (voxel axes).
    affine : ndarray, shape (4, 4)
    tissue : ndarray, shape (X, Y, Z, 3), float32
        WM, GM, CSF volume fractions.
    peak_directions : ndarray, shape (X, Y, Z, 3, 3), float32
        Up to three fibre directions per voxel (world RAS frame), strongest first; zero when absent.
    peak_fractions : ndarray, shape (X, Y, Z, 3), float32
        Volume fraction of each peak's population in the voxel (at most the WM fraction in
        total: populations beyond the third strongest are left out).
    rish : ndarray, shape (X, Y, Z, 3), float32
        Noiseless b = 1000 RISH L0, L2, L4 of S/S0 (order 4, unregularised fit of the nominal
        gradient table, i.e. what the acquired data give, gradient non-linearity included).
    gain : ndarray, shape (X, Y, Z), float32
        Intensity gain (B1 transmit x receive) the signal was multiplied by.
    noise_sd : ndarray, shape (X, Y, Z), float32
        Noise SD of each voxel (``sigma`` x g-factor), same units as ``dwi``.
    sigma : float
        Reference noise SD ``sigma0`` (unit gain, unit g-factor).
    grad_dev : ndarray, shape (X, Y, Z, 9) float32, or None
        HCP/FSL ``grad_dev`` volumes of the gradient non-linearity used (None: linear gradients).
    isocentre : ndarray, shape (3,), or None
        World position (mm) of the gradient isocentre (None: linear gradients).
    """

    dwi: np.ndarray
    bvals: np.ndarray
    bvecs: np.ndarray
    affine: np.ndarray
    tissue: np.ndarray
    peak_directions: np.ndarray
    peak_fractions: np.ndarray
    rish: np.ndarray
    gain: np.ndarray
    noise_sd: np.ndarray
    sigma: float
    grad_dev: np.ndarray | None = None
    isocentre: np.ndarray | None = None


def rish_fit_matrix(gradients: np.ndarray, sh_order_max: int = RISH_SH_ORDER) -> tuple[np.ndarray, np.ndarray]:
    """Unregularised least-squares SH fit matrix ``(K, M)`` and ``l_values`` for a shell."""
    basis, _, l_values = sh_basis(gradients, sh_order_max)
    return fit_matrix(basis, smooth=0.0).astype(np.float32), l_values


def noiseless_rish(signal: np.ndarray, s0: np.ndarray, fit: np.ndarray, l_values: np.ndarray) -> np.ndarray:
    """RISH L0/L2/L4 ``(V, 3)`` of ``signal (V, M) / s0 (V,)`` (zero where ``s0 <= 0``)."""
    attenuation = np.where(s0[:, None] > 0, signal / np.maximum(s0[:, None], 1e-12), 0.0).astype(np.float32)
    return rish_features(attenuation @ fit.T, l_values, (0, 2, 4))


def simulate_scan(
    subject: Subject,
    lattice: TissueLattice,
    scan: ScanPhysics,
    voxel_scale: float,
    noise_seed: int,
    noise: bool = True,
) -> ScanResult:
    """Simulate one scan of ``subject``.

    Parameters
    ----------
    subject : Subject
    lattice : TissueLattice
        The subject's tissue fractions on a fine world lattice.
    scan : ScanPhysics
        Protocol, signal model (echo time, T2, diffusivities), SNR, gradient non-linearity, B1.
    voxel_scale : float
    noise_seed : int
        Seed of this scan's noise.
    noise : bool
        False returns the noiseless magnitude (rounded to int16), for tests.
    """
    protocol, model = scan.protocol, scan.model
    shape, affine = protocol.grid(voxel_scale)
    check_axis_aligned(affine)
    bvals, gradients = protocol.gradient_table()
    b_phys = physical_bvals(bvals)
    n_vol = bvals.size
    sigma = noise_sigma(model.white_matter_b0, scan.snr)
    shell = np.flatnonzero(np.abs(bvals - RISH_SHELL) < 100)
    b0_index = int(np.flatnonzero(b_phys == 0)[0])
    fit, l_values = rish_fit_matrix(gradients[shell])
    grad32 = np.asarray(gradients, dtype=np.float32)
    session_code = int(protocol.field_strength_t * 10)
    isocentre = scan.gradient.isocentre(subject.seed, session_code) if scan.gradient.enabled else None

    # Separable box averages: lattice -> sub-voxels along x and y now, along z per slab.
    edges = voxel_edges(affine, shape, SUBDIVISIONS)
    weights = [box_average_matrix(lattice.axes[d], *edges[d]).astype(np.float32) for d in range(3)]
    # Stored z-first and contiguous so that each slab is one plain matrix product (a tensordot
    # over a middle axis would copy the whole array for every slab).
    partial = np.tensordot(weights[0], lattice.tissue, axes=(1, 0))  # (SX, Ly, Lz, 3)
    partial = np.tensordot(weights[1], partial, axes=(1, 1))  # (SY, SX, Lz, 3)
    partial = np.ascontiguousarray(partial.transpose(2, 1, 0, 3))  # (Lz, SX, SY, 3)
    lz, sx, sy, _ = partial.shape
    partial_2d = partial.reshape(lz, -1)
    sub_centres = [(lo + hi) / 2.0 for lo, hi in edges]

    out = {
        # Fortran order: the NIfTI on-disk order, so the writer streams it without reordering.
        "dwi": np.zeros(shape + (n_vol,), dtype=np.int16, order="F"),
        "tissue": np.zeros(shape + (3,), dtype=np.float32),
        "peak_directions": np.zeros(shape + (3, 3), dtype=np.float32),
        "peak_fractions": np.zeros(shape + (3,), dtype=np.float32),
        "rish": np.zeros(shape + (3,), dtype=np.float32),
        "gain": np.ones(shape, dtype=np.float32),
        "noise_sd": np.full(shape, sigma, dtype=np.float32),
        "grad_dev": np.zeros(shape + (9,), dtype=np.float32) if isocentre is not None else None,
    }
    planes = max(1, VOXELS_PER_SLAB // (shape[0] * shape[1]))
    seed_sequence = np.random.SeedSequence([noise_seed, session_code])
    slab_seeds = seed_sequence.spawn(int(np.ceil(shape[2] / planes)))
    for slab, z0 in enumerate(range(0, shape[2], planes)):
        z1 = min(z0 + planes, shape[2])
        rows = weights[2][SUBDIVISIONS * z0 : SUBDIVISIONS * z1]
        used = np.flatnonzero(rows.any(axis=0))  # the few lattice planes these sub-voxels overlap
        sub_tissue = (rows[:, used] @ partial_2d[used]) if used.size else np.zeros((rows.shape[0], partial_2d.shape[1]), np.float32)
        sub_tissue = np.moveaxis(sub_tissue.reshape(-1, sx, sy, 3), 0, 2)  # (SX, SY, s, 3)
        slab_shape = (shape[0], shape[1], z1 - z0)
        centres = _voxel_centres(affine, slab_shape, z0)
        gain, amplification = scan.b1.maps(centres)
        deviation = None
        if isocentre is not None:
            deviation = scan.gradient.deviation(centres, isocentre)  # (X, Y, s, 3, 3) world frame
            out["grad_dev"][:, :, z0:z1] = grad_dev_volumes(deviation, affine)
            deviation = deviation.reshape(-1, 3, 3)
        signal, voxel_flat, peaks = _slab_signal(
            subject, model, b_phys, grad32, sub_tissue, sub_centres, z0, slab_shape, deviation
        )
        brain = voxel_flat.sum(axis=1) > 1e-6
        rish = np.zeros((voxel_flat.shape[0], 3), dtype=np.float32)
        rish[brain] = noiseless_rish(signal[brain][:, shell], signal[brain][:, b0_index], fit, l_values)
        magnitude = signal.reshape(slab_shape + (n_vol,)) * (np.float32(SCANNER_GAIN) * gain[..., None])
        noise_sd = np.float32(sigma) * amplification
        if noise:
            slab_sigma = sigma if np.all(amplification == 1.0) else noise_sd[..., None]
            magnitude = add_rician_noise(magnitude, slab_sigma, np.random.Generator(np.random.SFC64(slab_seeds[slab])))
        out["dwi"][:, :, z0:z1] = to_int16(magnitude)
        out["tissue"][:, :, z0:z1] = voxel_flat.reshape(slab_shape + (3,))
        out["peak_directions"][:, :, z0:z1] = peaks[0].reshape(slab_shape + (3, 3))
        out["peak_fractions"][:, :, z0:z1] = peaks[1].reshape(slab_shape + (3,))
        out["rish"][:, :, z0:z1] = rish.reshape(slab_shape + (3,))
        out["gain"][:, :, z0:z1] = gain
        out["noise_sd"][:, :, z0:z1] = noise_sd
    return ScanResult(bvals=np.asarray(bvals), bvecs=world_to_voxel_directions(np.asarray(gradients), affine),
                      affine=affine, sigma=sigma, isocentre=isocentre, **out)


def _voxel_centres(affine: np.ndarray, slab_shape: tuple[int, int, int], z0: int) -> np.ndarray:
    """World coordinates ``(X, Y, s, 3)`` of the voxel centres of a slab starting at plane ``z0``."""
    i, j, k = np.meshgrid(*(np.arange(n) for n in slab_shape[:2]), np.arange(z0, z0 + slab_shape[2]), indexing="ij")
    index = np.stack([i, j, k], axis=-1).astype(np.float64)
    return index @ affine[:3, :3].T + affine[:3, 3]


def _slab_signal(
    subject: Subject,
    model: SignalModel,
    b_phys: np.ndarray,
    gradients: np.ndarray,
    sub_tissue: np.ndarray,
    sub_centres: list[np.ndarray],
    z0: int,
    slab_shape: tuple[int, int, int],
    deviation: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """Noiseless voxel signals ``(V, N)`` of a slab (per unit proton density), the voxel tissue
    fractions ``(V, 3)`` and the fibre peaks.

    The isotropic compartments only need voxel fractions; white matter is summed over sub-voxels,
    each with its own fibre populations. ``deviation (V, 3, 3)``: gradient deviation tensor of each
    voxel (world frame), None for linear gradients.
    """
    n_vox = int(np.prod(slab_shape))
    n_sub = SUBDIVISIONS**3
    # Voxel-major order: the 8 sub-voxels of a voxel are contiguous, (voxel, sx, sy, sz).
    by_voxel = sub_tissue.reshape(slab_shape[0], 2, slab_shape[1], 2, slab_shape[2], 2, 3)
    by_voxel = by_voxel.transpose(0, 2, 4, 1, 3, 5, 6).reshape(n_vox, n_sub, 3)
    voxel_tissue = by_voxel.mean(axis=1)
    d_perp = model.diffusivities.extra_perpendicular
    row_of_voxel = None
    if deviation is None:
        gm_signal, csf_signal = isotropic_signals(model, b_phys)
        signal = voxel_tissue[:, 1:2] * gm_signal + voxel_tissue[:, 2:3] * csf_signal
    else:
        # Per-voxel b-value factors |(I + L) g|^2, only where there is tissue.
        tissue_rows = np.flatnonzero(voxel_tissue.sum(axis=1) > 0)
        row_of_voxel = np.full(n_vox, -1, dtype=np.intp)
        row_of_voxel[tissue_rows] = np.arange(tissue_rows.size)
        b_local = (effective_bscale(deviation[tissue_rows], gradients.astype(np.float64)) * b_phys).astype(np.float32)
        gm_signal, csf_signal = isotropic_signals(model, b_local)
        signal = np.zeros((n_vox, b_phys.size), dtype=np.float32)
        signal[tissue_rows] = voxel_tissue[tissue_rows, 1:2] * gm_signal + voxel_tissue[tissue_rows, 2:3] * csf_signal
        perpendicular = b_local
        perpendicular *= np.float32(-d_perp)
        np.exp(perpendicular, out=perpendicular)  # (rows, N)
        del gm_signal, csf_signal
    n_pop = len(fibres.BUNDLE_NAMES)
    tract_fraction = tract_intra_fractions(model.diffusivities) if model.diffusivities.tract_variation else None
    pop_weight = np.zeros((n_vox, n_pop), dtype=np.float64)
    pop_vector = np.zeros((n_vox, n_pop, 3), dtype=np.float64)
    offsets = np.array([(a, b, c) for a in range(2) for b in range(2) for c in range(2)])
    voxel_index = np.stack(np.unravel_index(np.arange(n_vox), slab_shape), axis=1)

    wm_flat = np.flatnonzero(by_voxel[..., 0].ravel() > 1e-3)  # sorted by voxel
    for start in range(0, wm_flat.size, SUBVOXELS_PER_CHUNK):
        flat = wm_flat[start : start + SUBVOXELS_PER_CHUNK]
        voxel, sub = np.divmod(flat, n_sub)
        f_wm = by_voxel[voxel, sub, 0]
        sub_idx = SUBDIVISIONS * voxel_index[voxel] + offsets[sub]
        points = np.stack(
            [sub_centres[0][sub_idx[:, 0]], sub_centres[1][sub_idx[:, 1]], sub_centres[2][SUBDIVISIONS * z0 + sub_idx[:, 2]]], axis=1
        )
        template_points = subject.template_points(points, interpolate_coarse(subject, points, channels=3))
        labels, fractions, directions = fibres.strongest_populations(*fibres.all_populations(template_points))
        directions = subject.template_to_subject_directions(directions).astype(np.float32)
        encoded, sub_perpendicular = directions, None
        if deviation is not None:
            # (n.(I + L) g)^2 = ((I + L)^T n . g)^2: transform the fibre directions once instead of
            # the gradient table for every voxel; exp(-b D_perp |(I + L) g|^2) is per voxel.
            encoded = directions @ (np.eye(3) + deviation[voxel]).astype(np.float32)
            sub_perpendicular = perpendicular[row_of_voxel[voxel]]
        volume = (f_wm / n_sub).astype(np.float32)
        weights = fractions * volume[:, None]  # (P, K): volume fraction of each population
        sub_signal = np.zeros((flat.size, gradients.shape[0]), dtype=np.float32)
        for k in range(labels.shape[1]):  # populations sorted by fraction: later slots are sparser
            active = np.flatnonzero(fractions[:, k] > 0)
            if active.size == 0:
                break
            cos2 = encoded[active, k] @ gradients.T
            cos2 *= cos2
            every = active.size == flat.size
            factor = None if sub_perpendicular is None else (sub_perpendicular if every else sub_perpendicular[active])
            f_in = None if tract_fraction is None else tract_fraction[labels[active, k]]
            population = fibre_signal(model, b_phys, cos2, factor, f_in)
            population *= weights[active, k, None]
            if every:
                sub_signal += population
            else:
                sub_signal[active] += population
        # Sum the sub-voxels of each voxel (contiguous runs).
        first = np.flatnonzero(np.r_[True, voxel[1:] != voxel[:-1]])
        signal[voxel[first]] += np.add.reduceat(sub_signal, first, axis=0)
        # Fibre peaks: volume-weighted sums per (voxel, population); tangents of one population
        # are consistently oriented, so their weighted sum is the mean direction.
        v0, v1 = voxel[0], voxel[-1] + 1
        key = ((voxel - v0)[:, None] * n_pop + labels).ravel()
        size = (v1 - v0) * n_pop
        flat_weights = weights.ravel().astype(np.float64)
        pop_weight[v0:v1] += np.bincount(key, weights=flat_weights, minlength=size).reshape(-1, n_pop)
        for c in range(3):
            pop_vector[v0:v1, :, c] += np.bincount(
                key, weights=flat_weights * directions[..., c].ravel(), minlength=size
            ).reshape(-1, n_pop)
    return signal.astype(np.float32, copy=False), voxel_tissue, _peaks(pop_weight, pop_vector)


def _peaks(weight: np.ndarray, vector: np.ndarray, keep: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """The ``keep`` strongest populations of each voxel: unit directions ``(V, keep, 3)``, fractions ``(V, keep)``."""
    order = np.argsort(-weight, axis=1, kind="stable")[:, :keep]
    fractions = np.take_along_axis(weight, order, axis=1)
    vectors = np.take_along_axis(vector, order[..., None], axis=1)
    norm = np.linalg.norm(vectors, axis=-1, keepdims=True)
    directions = np.where(norm > 1e-12, vectors / np.maximum(norm, 1e-12), 0.0)
    directions[fractions <= 1e-6] = 0.0
    return directions.astype(np.float32), np.where(fractions > 1e-6, fractions, 0.0).astype(np.float32)
