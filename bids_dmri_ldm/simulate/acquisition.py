"""HCP-like 3T and 7T diffusion protocols: gradient tables, imaging grids and sidecar metadata.

World space
-----------
All simulation happens in one physical ("world", scanner RAS+, millimetre) space shared by the
3T and 7T sessions of a subject; it coincides with MNI152 space before the subject's random
deformation (see :mod:`.anatomy`). Each protocol has its own voxel grid in that space.

Image orientation and bvecs
---------------------------
Grids are written LAS (x voxel axis pointing to world left, affine determinant < 0), as HCP
data are. Gradient directions are generated in world space and written as FSL bvecs, i.e. in the
image's voxel axes; with a negative determinant FSL applies no extra flip, so
``bvec = R.T @ g_world`` with ``R = diag(-1, 1, 1)`` (only the x component changes sign).

Direction sets
--------------
Electrostatic repulsion on the half sphere (Jones et al. 1999), one set per shell, deterministic
from a fixed per-protocol seed (the protocol does not change between subjects, as on a scanner).
The HCP 3T table itself ships only with dmipy, which is not a dependency here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

B0_WRITTEN = 5.0
"""b-value written for non-diffusion-weighted volumes (HCP writes 5 s/mm^2; b <= 50 is b0)."""

WORLD_CENTRE_MM = np.array([0.0, -18.0, 18.0])
"""Centre of the HCP/MNI field of view (x -90..90, y -126..90, z -72..108 mm)."""

MIN_GRID_VOXELS = 8
"""Smallest number of voxels allowed along any axis (below this a scan is meaningless)."""

MIN_VOXEL_SCALE = 0.8
"""Smallest ``--voxel-scale``: 1.0 mm at 3T, 0.84 mm at 7T; finer grids would only resample the
1 mm template (and a 3T scan would need over 4 GB)."""


@dataclass(frozen=True)
class Protocol:
    """An HCP-like diffusion acquisition.

    Attributes
    ----------
    name : str
        Session label (``3T`` / ``7T``).
    field_strength_t : float
        Main field in tesla.
    voxel_mm : float
        Isotropic voxel size at ``--voxel-scale 1``.
    shape : tuple of int
        Grid at ``--voxel-scale 1`` (HCP preprocessed grids).
    echo_time_ms, repetition_time_s : float
    n_b0 : int
        Number of b = 0 volumes (written with b = 5).
    shells : tuple of float
        Diffusion-weighted shells in s/mm^2.
    n_directions : int
        Directions per shell (a different set per shell).
    direction_seed : int
        Seed of the electrostatic-repulsion direction sets.
    snr_b0_wm : float
        Default b0 SNR in pure white matter at unit receive gain.
    phase_encoding_direction : str
        BIDS ``PhaseEncodingDirection`` (voxel axis i/j/k, ``-`` for reversed).
    effective_echo_spacing_s : float
        Effective echo spacing (after in-plane acceleration), seconds.
    big_delta_ms, small_delta_ms : float
        Separation and duration of the (monopolar, Stejskal-Tanner) diffusion gradient pulses.
    metadata : dict
        Other sidecar fields of a real acquisition.
    """

    name: str
    field_strength_t: float
    voxel_mm: float
    shape: tuple[int, int, int]
    echo_time_ms: float
    repetition_time_s: float
    n_b0: int
    shells: tuple[float, ...]
    n_directions: int
    direction_seed: int
    snr_b0_wm: float
    phase_encoding_direction: str
    effective_echo_spacing_s: float
    big_delta_ms: float
    small_delta_ms: float
    metadata: dict = field(default_factory=dict)

    def gradient_table(self) -> tuple[np.ndarray, np.ndarray]:
        """Volumes in acquisition order: ``(bvals (N,), directions_world (N, 3))``.

        b0 volumes (b = 5, zero vector) are spread evenly through the series and the shells are
        interleaved, as in the HCP acquisitions.
        """
        return _gradient_table(self.n_b0, self.shells, self.n_directions, self.direction_seed)

    def grid(self, voxel_scale: float = 1.0) -> tuple[tuple[int, int, int], np.ndarray]:
        """Grid ``(shape, affine)`` of this protocol with voxels ``voxel_scale`` times larger.

        The field of view stays the HCP one (about 181 x 217 x 181 mm), centred on
        :data:`WORLD_CENTRE_MM`; the affine is LAS (determinant < 0).
        """
        return protocol_grid(self.voxel_mm, self.shape, voxel_scale)

    def sidecar(self, shape: tuple[int, int, int]) -> dict:
        """BIDS sidecar of a DWI run of this protocol on a grid of ``shape``.

        ``TotalReadoutTime`` follows from the number of phase-encoding lines of the grid.
        """
        axis = "ijk".index(self.phase_encoding_direction[0])
        n_pe = shape[axis]
        sidecar = {
            "Manufacturer": "Simulated",
            "ManufacturersModelName": f"bids-dmri-ldm simulator, HCP-like {self.name}",
            "MagneticFieldStrength": self.field_strength_t,
            "EchoTime": round(self.echo_time_ms / 1000.0, 6),
            "RepetitionTime": self.repetition_time_s,
            "PhaseEncodingDirection": self.phase_encoding_direction,
            "EffectiveEchoSpacing": self.effective_echo_spacing_s,
            "TotalReadoutTime": round(self.effective_echo_spacing_s * (n_pe - 1), 6),
        }
        sidecar.update(self.metadata)
        return sidecar


def protocol_grid(voxel_mm: float, shape: tuple[int, int, int], voxel_scale: float) -> tuple[tuple[int, int, int], np.ndarray]:
    """Grid of an HCP field of view with ``voxel_scale`` times larger voxels.

    Parameters
    ----------
    voxel_mm : float
        Voxel size of the reference grid (mm).
    shape : tuple of int
        Reference grid shape.
    voxel_scale : float
        Multiplier of the voxel size; the shape shrinks by the same factor (rounded half up).

    Returns
    -------
    shape : tuple of int
    affine : ndarray, shape (4, 4)
        LAS voxel-to-world affine; voxel centres are symmetric about :data:`WORLD_CENTRE_MM`.
    """
    voxel = voxel_mm * voxel_scale
    new_shape = tuple(int(np.floor(n / voxel_scale + 0.5)) for n in shape)
    affine = np.diag([-voxel, voxel, voxel, 1.0])
    half = (np.array(new_shape) - 1) / 2.0
    affine[:3, 3] = WORLD_CENTRE_MM - affine[:3, :3] @ half
    return new_shape, affine


def check_voxel_scale(voxel_scale: float, protocols: tuple[Protocol, ...]) -> None:
    """Raise ``ValueError`` (one line) when ``voxel_scale`` cannot give a usable grid."""
    if not np.isfinite(voxel_scale) or voxel_scale < MIN_VOXEL_SCALE:
        raise ValueError(f"--voxel-scale must be a number >= {MIN_VOXEL_SCALE}, got {voxel_scale}")
    for protocol in protocols:
        shape, _ = protocol.grid(voxel_scale)
        if min(shape) < MIN_GRID_VOXELS:
            largest = min(protocol.shape) / (MIN_GRID_VOXELS - 0.5)
            raise ValueError(
                f"--voxel-scale {voxel_scale} leaves the {protocol.name} grid {shape} with fewer than "
                f"{MIN_GRID_VOXELS} voxels along an axis; use at most {largest:.1f}"
            )


def world_to_voxel_directions(directions_world: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """FSL bvecs ``(3, N)`` of world gradient directions ``(N, 3)`` for an image ``affine``.

    The directions are expressed in the voxel axes (rotation part of the affine); FSL flips the
    x component once more when the affine determinant is positive.
    """
    rotation = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    vox = directions_world @ rotation  # (N,3): components along each voxel axis
    if np.linalg.det(affine[:3, :3]) > 0:
        vox[:, 0] = -vox[:, 0]
    return vox.T


def electrostatic_directions(n: int, seed: int, iterations: int = 200) -> np.ndarray:
    """``n`` unit vectors spread over the half sphere by electrostatic repulsion.

    Each direction is a pair of antipodal charges (Jones et al. 1999); the energy
    :math:`\\sum_{i<j} 1/|p_i - p_j| + 1/|p_i + p_j|` is minimised by projected gradient
    descent with a step that shrinks when the energy rises. Written here rather than calling
    :func:`dipy.core.sphere.disperse_charges` because that is a Python loop (12.5 s for 90
    points on these machines); this vectorised version takes milliseconds.

    Parameters
    ----------
    n : int
        Number of directions.
    seed : int
        Seed of the random start (the result is deterministic).
    iterations : int
        Gradient steps.

    Returns
    -------
    ndarray, shape (n, 3)
        Unit vectors with non-negative z (hemisphere convention).
    """
    rng = np.random.default_rng(seed)
    points = rng.standard_normal((n, 3))
    points /= np.linalg.norm(points, axis=1, keepdims=True)
    step = 0.1 / n

    def energy_and_force(p: np.ndarray) -> tuple[float, np.ndarray]:
        # For unit vectors |p_i -+ p_j|^2 = 2 -+ 2 p_i.p_j: all pairs from one matrix product.
        dot = np.clip(p @ p.T, -1.0, 1.0)
        inv_plus = 1.0 / np.sqrt(np.maximum(2.0 - 2.0 * dot, 1e-12))
        inv_minus = 1.0 / np.sqrt(np.maximum(2.0 + 2.0 * dot, 1e-12))
        np.fill_diagonal(inv_plus, 0.0)
        np.fill_diagonal(inv_minus, 0.0)
        energy = float(inv_plus.sum() + inv_minus.sum()) / 2.0
        cube_plus, cube_minus = inv_plus**3, inv_minus**3
        force = p * (cube_plus + cube_minus).sum(axis=1, keepdims=True) - (cube_plus - cube_minus) @ p
        return energy, force

    energy, force = energy_and_force(points)
    for _ in range(iterations):
        trial = points + step * force
        trial /= np.linalg.norm(trial, axis=1, keepdims=True)
        trial_energy, trial_force = energy_and_force(trial)
        if trial_energy < energy:
            points, energy, force = trial, trial_energy, trial_force
            step *= 1.1
        else:
            step *= 0.5
    points = points * np.where(points[:, 2:3] < 0, -1.0, 1.0)
    return points


@lru_cache(maxsize=8)
def _gradient_table(n_b0: int, shells: tuple[float, ...], n_directions: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    shell_dirs = [electrostatic_directions(n_directions, seed + 1000 * k) for k in range(len(shells))]
    # Interleave shells: direction i of shell 0, of shell 1, ... then direction i + 1.
    dw_bvals = np.array([shells[k] for _ in range(n_directions) for k in range(len(shells))])
    dw_dirs = np.array([shell_dirs[k][i] for i in range(n_directions) for k in range(len(shells))])
    n_total = n_b0 + dw_bvals.size
    # b0 positions spread evenly, the first volume being a b0 (as in HCP).
    b0_positions = np.unique(np.round(np.linspace(0, n_total - 1, n_b0 + 1)[:-1]).astype(int))
    is_b0 = np.zeros(n_total, dtype=bool)
    is_b0[b0_positions] = True
    bvals = np.empty(n_total)
    dirs = np.zeros((n_total, 3))
    bvals[is_b0] = B0_WRITTEN
    bvals[~is_b0] = dw_bvals
    dirs[~is_b0] = dw_dirs
    bvals.setflags(write=False)
    dirs.setflags(write=False)
    return bvals, dirs


PROTOCOL_3T = Protocol(
    name="3T",
    field_strength_t=3.0,
    voxel_mm=1.25,
    shape=(145, 174, 145),
    echo_time_ms=89.5,
    repetition_time_s=5.52,
    n_b0=18,
    shells=(1000.0, 2000.0, 3000.0),
    n_directions=90,
    direction_seed=3,
    snr_b0_wm=25.0,
    phase_encoding_direction="i-",
    effective_echo_spacing_s=0.00078,
    big_delta_ms=43.1,  # Sotiropoulos et al. 2013
    small_delta_ms=10.6,
    metadata={
        "FlipAngle": 78,
        "MultibandAccelerationFactor": 3,
        "PulseSequenceType": "Spin-echo EPI (simulated)",
    },
)
"""HCP 3T (WU-Minn, customised Skyra): 1.25 mm, TE 89.5 ms, TR 5.52 s, 18 b0, 3 x 90 directions."""

PROTOCOL_7T = Protocol(
    name="7T",
    field_strength_t=7.0,
    voxel_mm=1.05,
    shape=(173, 207, 173),
    echo_time_ms=71.2,
    repetition_time_s=7.0,
    n_b0=15,
    shells=(1000.0, 2000.0),
    n_directions=64,
    direction_seed=7,
    # 3T 25 x ~2 (intrinsic field gain, Pohmann 2016 measured less than the (7/3)^1.65 scaling)
    # x 0.59 (voxel volume 1.05^3 / 1.25^3) x 0.78 (WM b0 at TE 71.2/T2 47 vs TE 89.5/T2 71 ms)
    # ~= 23 in WM at unit receive gain; the receive field lowers it further in temporal lobes.
    snr_b0_wm=23.0,
    phase_encoding_direction="j-",
    effective_echo_spacing_s=0.00082 / 3,
    # Derived, not read from a publication: b_max 2000 s/mm^2 on the 70 mT/m SC72 gradient (Vu et
    # al. 2015) with Delta = TE/2 - 1.65 ms as in the 3T protocol (43.1 ms at TE 89.5 ms) gives
    # delta^2 (Delta - delta/3) = b / (gamma G)^2 -> Delta 34 ms, delta 14 ms.
    big_delta_ms=34.0,
    small_delta_ms=14.0,
    metadata={
        "FlipAngle": 90,
        "MultibandAccelerationFactor": 2,
        "ParallelReductionFactorInPlane": 3,
        "PulseSequenceType": "Spin-echo EPI (simulated)",
    },
)
"""HCP 7T (Siemens Magnetom 7T): 1.05 mm, TE 71.2 ms, TR 7 s, 15 b0, 2 x 64 directions."""

PROTOCOLS = {"3T": PROTOCOL_3T, "7T": PROTOCOL_7T}
