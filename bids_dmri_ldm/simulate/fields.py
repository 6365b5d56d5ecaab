"""Smooth scanner fields that make 3T -> 7T differ in space: gradient non-linearity and B1.

Gradient non-linearity
----------------------
Each gradient coil ``c`` (x, y, z) makes a field whose z component, per unit of the nominal
gradient, is ``B_c(r) = r_c + a_c h_c(r) / R0^2`` around the isocentre (``r`` in mm, ``R0`` =
100 mm). ``h_c`` are the lowest-order non-linear regular solid harmonics a gradient coil of that
symmetry has (order 3; Bammer et al. 2003; Janke et al. 2004):

.. math::

    h_x = x (4 z^2 - x^2 - y^2), \\quad h_y = y (4 z^2 - x^2 - y^2), \\quad
    h_z = z^3 - \\tfrac{3}{2} z (x^2 + y^2),

harmonic (:math:`\\nabla^2 h = 0`), as a static field in a current-free region must be. The gradient
a coil really produces is :math:`\\nabla B_c = e_c + L_{:, c}`, so a nominal gradient direction
``g`` (unit, world frame) with b-value ``b`` becomes ``(I + L) g`` and the voxel sees

.. math:: b_{eff} = b \\, |(I + L) g|^2, \\qquad g_{eff} = (I + L) g / |(I + L) g|.

``L`` is the per-voxel 3x3 *gradient deviation tensor* that the HCP distributes as
``grad_dev.nii.gz`` (FSL convention: 9 volumes, ``L[i, j]`` = volume ``3 j + i``, voxel axes of the
image, ``v_eff = (I + L) v`` applied to the FSL bvec ``v``; :func:`grad_dev_volumes`). The strength
is given as the b-value drop at ``R0`` on a coil's own axis (``(1 - 3 a)^2 = 1 - drop``, the
gradient rolling off away from the isocentre, as it does in real coils). With the default 3T drop of
0.2 the b-value over the brain deviates by up to about -20 % / +20 % at its edges and by a few
per cent near the centre: the HCP's Connectom Skyra reaches deviations of up to ~15 % of the
nominal gradient (Sotiropoulos et al. 2013).

B1 (transmit, receive, parallel-imaging noise)
---------------------------------------------
Three smooth maps, each a sum of Gaussian bumps in world millimetres (:class:`B1Pattern`):

- transmit efficiency ``kappa`` (actual / nominal flip angle). A 90-180 spin echo scales the
  signal by ``sin(kappa pi/2)^3`` (excitation ``sin(kappa 90)``, refocusing ``sin^2(kappa 90)``);
  at 7T ``kappa`` drops to ~0.55-0.6 in the temporal lobes and the cerebellum (Vaughan et al. 2001;
  Van de Moortele et al. 2005; Vu et al. 2015 on the HCP 7T diffusion data), giving the signal
  drop-out there;
- receive sensitivity ``rho``: multiplies the signal (central brightening at 7T; at 3T a 32-channel
  array is slightly more sensitive at the cortex than in the centre);
- noise amplification ``g`` (g-factor of in-plane x slice acceleration, largest in the centre):
  multiplies the noise SD.

The image intensity gain is ``sin(kappa pi/2)^3 rho`` (``param-gain`` in the truth) and the noise SD
is ``sigma0 g`` (``param-sigma``), so the local SNR ``SNR0 sin^3 rho / g`` follows the B1 pattern and
is not the intensity gain: the Rician floor of S/S0 varies in space and differently at 3T and 7T.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .acquisition import WORLD_CENTRE_MM, world_to_voxel_directions

GRADIENT_REFERENCE_RADIUS_MM = 100.0
"""``R0`` of the gradient non-linearity model (the strength is the b drop at this distance)."""


@dataclass(frozen=True)
class GradientNonlinearity:
    """Order-3 solid-harmonic gradient-coil model.

    Attributes
    ----------
    b_drop : float
        Fractional b-value drop at :data:`GRADIENT_REFERENCE_RADIUS_MM` from the isocentre along
        each coil's own axis (0: linear gradients). Valid range [0, 0.5].
    transverse_ratio : float
        Non-linearity of the x and y coils relative to the z coil.
    isocentre_offset_mm : tuple of 3 float
        Mean position of the isocentre relative to the field-of-view centre (world mm).
    isocentre_sd_mm : tuple of 3 float
        SD of each subject's positioning (head relative to isocentre), drawn per session.
    """

    b_drop: float = 0.0
    transverse_ratio: float = 1.0
    isocentre_offset_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    isocentre_sd_mm: tuple[float, float, float] = (2.0, 3.0, 5.0)

    @property
    def enabled(self) -> bool:
        return self.b_drop > 0.0

    def coefficients(self) -> np.ndarray:
        """``(a_x, a_y, a_z)``: roll-off along each coil's own axis gives ``b_drop`` at ``R0``."""
        a = (1.0 - np.sqrt(1.0 - self.b_drop)) / 3.0
        return np.array([a * self.transverse_ratio, a * self.transverse_ratio, -a])

    def isocentre(self, seed: int, session_code: int) -> np.ndarray:
        """World position (mm) of the isocentre for one subject's session (seeded positioning)."""
        rng = np.random.default_rng(np.random.SeedSequence([seed, 0x15C0, session_code]))
        return WORLD_CENTRE_MM + np.asarray(self.isocentre_offset_mm) + rng.normal(0.0, 1.0, 3) * np.asarray(self.isocentre_sd_mm)

    def deviation(self, points: np.ndarray, isocentre: np.ndarray) -> np.ndarray:
        """Gradient deviation tensor ``L`` ``(..., 3, 3)`` (world frame) at world points ``(..., 3)``.

        Column ``c`` is the gradient of coil ``c``'s field minus ``e_c``.
        """
        r = (np.asarray(points, dtype=np.float64) - isocentre) / GRADIENT_REFERENCE_RADIUS_MM
        x, y, z = r[..., 0], r[..., 1], r[..., 2]
        ax, ay, az = self.coefficients()
        out = np.empty(r.shape[:-1] + (3, 3))
        transverse = 4.0 * z * z - x * x - y * y
        out[..., :, 0] = np.stack([ax * (transverse - 2.0 * x * x), ax * (-2.0 * x * y), ax * 8.0 * x * z], -1)
        out[..., :, 1] = np.stack([ay * (-2.0 * x * y), ay * (transverse - 2.0 * y * y), ay * 8.0 * y * z], -1)
        out[..., :, 2] = np.stack([az * (-3.0 * x * z), az * (-3.0 * y * z), az * (3.0 * z * z - 1.5 * (x * x + y * y))], -1)
        return out


def effective_bscale(deviation: np.ndarray, gradients: np.ndarray) -> np.ndarray:
    """``|(I + L) g|^2`` ``(..., N)``: the factor on each volume's b-value in each voxel.

    Parameters
    ----------
    deviation : ndarray, shape (..., 3, 3)
        ``L`` (world frame).
    gradients : ndarray, shape (N, 3)
        Nominal unit directions (world frame; zero rows give 0).
    """
    m = np.eye(3) + np.asarray(deviation, dtype=np.float64)
    gram = np.einsum("...ki,...kj->...ij", m, m)  # (I + L)^T (I + L), 3x3 per voxel
    # Quadratic form g^T G g as one matrix product over the 6 distinct entries of G.
    rows, cols = np.triu_indices(3)
    outer = np.asarray(gradients, dtype=np.float64)[:, rows] * np.asarray(gradients, dtype=np.float64)[:, cols]
    outer[:, rows != cols] *= 2.0
    return gram[..., rows, cols] @ outer.T


def grad_dev_volumes(deviation_world: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """HCP/FSL ``grad_dev`` volumes ``(..., 9)`` of world-frame deviation tensors ``(..., 3, 3)``.

    The tensor is expressed in the frame of the FSL bvecs of an image with ``affine``
    (``L_vox = T L T^T`` with ``T`` the world-to-bvec rotation) and stored column by column:
    volume ``3 j + i`` holds ``L_vox[i, j]``, so that FSL's ``v_eff = (I + L) v``,
    ``b_eff = |v_eff|^2 b`` reproduces the simulation for the written bvecs ``v``.
    """
    to_bvec = world_to_voxel_directions(np.eye(3), affine)  # columns: images of world axes -> T
    voxel = np.einsum("ia,...ab,jb->...ij", to_bvec, deviation_world, to_bvec)
    return np.swapaxes(voxel, -1, -2).reshape(voxel.shape[:-2] + (9,))


Bump = tuple[tuple[float, float, float], float, float]
"""A Gaussian bump: centre (world mm), width (SD, mm), amplitude."""


@dataclass(frozen=True)
class B1Pattern:
    """Transmit efficiency, receive sensitivity and noise amplification as sums of Gaussian bumps.

    Each map is ``1 + sum_k amplitude_k exp(-|r - centre_k|^2 / (2 width_k^2))`` for its bumps,
    plus, for the receive map, ``rho_radial (|r - c|^2 / R0^2 - rho_radial_offset)`` (an array
    coil's higher sensitivity near the skull; ``c`` the field-of-view centre).
    """

    transmit: tuple[Bump, ...] = ()
    receive: tuple[Bump, ...] = ()
    noise: tuple[Bump, ...] = ()
    receive_radial: float = 0.0
    receive_radial_offset: float = 0.0


B1_7T = B1Pattern(
    transmit=(
        ((0.0, -15.0, 20.0), 55.0, 0.10),  # over-flip in the centre (central brightening of B1+)
        ((48.0, -12.0, -28.0), 22.0, -0.45),  # temporal lobes
        ((-48.0, -12.0, -28.0), 22.0, -0.45),
        ((0.0, -65.0, -42.0), 25.0, -0.45),  # cerebellum
    ),
    receive=(((0.0, -15.0, 20.0), 50.0, 0.35),),  # central brightening of the receive field
    noise=(((0.0, -18.0, 18.0), 45.0, 0.15),),  # g-factor of iPAT 3 x MB 2, peak ~1.15 in the centre
)
"""HCP-like 7T (single-channel transmit, 32-channel receive): local SNR ~1.1x the unit-gain value in
the centre, ~0.5x in the temporal poles and the cerebellum; intensity gain ~1.3x in the centre."""

B1_3T = B1Pattern(receive_radial=0.25, receive_radial_offset=0.4)
"""HCP-like 3T (body transmit, 32-channel receive): flat transmit, receive ~0.9x in the centre of
the brain, ~1.05-1.1x at the cortex; no g-factor (multiband 3 without in-plane acceleration)."""

B1_7T_SHIFTED = B1Pattern(
    transmit=(
        ((5.0, -10.0, 25.0), 50.0, 0.15),
        ((50.0, -8.0, -25.0), 20.0, -0.40),
        ((-46.0, -16.0, -30.0), 24.0, -0.55),  # asymmetric head position in the coil
        ((0.0, -70.0, -40.0), 28.0, -0.55),
        ((0.0, 60.0, -10.0), 20.0, -0.25),  # orbitofrontal loss
    ),
    receive=(((0.0, -20.0, 15.0), 45.0, 0.45),),
    noise=(((0.0, -18.0, 10.0), 40.0, 0.25),),
)
"""A different 7T coil / head position, for the held-out ``shifted`` preset."""

B1_3T_SHIFTED = B1Pattern(receive_radial=0.4, receive_radial_offset=0.4, noise=(((0.0, -18.0, 18.0), 45.0, 0.10),))
"""A 3T protocol with in-plane acceleration and a stronger array profile (``shifted`` preset)."""


@dataclass(frozen=True)
class B1Field:
    """A :class:`B1Pattern` with a strength (0: flat fields, 1: the pattern as given)."""

    pattern: B1Pattern = B1Pattern()
    strength: float = 0.0

    def maps(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Intensity gain and noise amplification ``(...,)`` float32 at world points ``(..., 3)``.

        Every map's deviation from 1 is scaled by ``strength``; the transmit efficiency is floored at
        0.1, the receive sensitivity at 0.2 and the noise amplification at 1.
        """
        points = np.asarray(points, dtype=np.float64)
        if self.strength == 0.0:
            flat = np.ones(points.shape[:-1], dtype=np.float32)
            return flat, flat.copy()
        kappa = np.maximum(1.0 + self.strength * _bumps(points, self.pattern.transmit), 0.1)
        receive = _bumps(points, self.pattern.receive)
        if self.pattern.receive_radial:
            r2 = np.sum((points - WORLD_CENTRE_MM) ** 2, axis=-1) / GRADIENT_REFERENCE_RADIUS_MM**2
            receive = receive + self.pattern.receive_radial * (np.minimum(r2, 1.5) - self.pattern.receive_radial_offset)
        rho = np.maximum(1.0 + self.strength * receive, 0.2)
        g = np.maximum(1.0 + self.strength * _bumps(points, self.pattern.noise), 1.0)
        gain = spin_echo_transmit_factor(kappa) * rho
        return gain.astype(np.float32), g.astype(np.float32)


def spin_echo_transmit_factor(kappa: np.ndarray) -> np.ndarray:
    """Signal of a 90-180 spin echo at relative flip angle ``kappa``: ``sin(kappa pi/2)^3``.

    Excitation gives ``sin(kappa 90 deg)``, an imperfect refocusing pulse ``sin^2(kappa 90 deg)``.
    """
    return np.abs(np.sin(np.asarray(kappa) * np.pi / 2.0)) ** 3


def _bumps(points: np.ndarray, bumps: tuple[Bump, ...]) -> np.ndarray:
    total = np.zeros(points.shape[:-1])
    for centre, width, amplitude in bumps:
        total += amplitude * np.exp(-np.sum((points - np.asarray(centre)) ** 2, axis=-1) / (2.0 * width**2))
    return total
